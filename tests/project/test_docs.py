"""The documentation cannot drift: every code block marked runnable in README.md and docs/ is executed.

A fenced block whose info string is ``python runnable`` is run with ``exec`` in a fresh namespace; a
``bash runnable`` block is run by bash with this interpreter's scripts (``acnet``) first on the PATH.
Both run in an empty temporary directory. Relative links must point to existing files and headings.
"""

import importlib.util
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import pytest
import torch

from acnet_convert.constants import DEFAULT_GAMMA

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(?P<info>[^\n`]*)\n(?P<code>.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)
LANGUAGES = ("python", "bash")


@dataclass(frozen=True)
class Block:
    """One fenced code block: where it is, its info string and its code."""

    page: str
    line: int
    info: str
    code: str

    @property
    def runnable(self) -> bool:
        """True when the info string carries the ``runnable`` marker."""
        return "runnable" in self.info.split()

    @property
    def language(self) -> str:
        """The first word of the info string."""
        return (self.info.split() or [""])[0]


def blocks() -> list[Block]:
    """Every fenced block of README.md and docs/*.md."""
    found = []
    for page in PAGES:
        text = page.read_text()
        for match in FENCE.finditer(text):
            line = text.count("\n", 0, match.start()) + 1
            found.append(Block(str(page.relative_to(ROOT)), line, match["info"].strip(), match["code"]))
    return found


RUNNABLE = [block for block in blocks() if block.runnable]


@pytest.mark.parametrize("block", RUNNABLE, ids=[f"{b.page}:{b.line}" for b in RUNNABLE])
def test_runnable_block(block, tmp_path, monkeypatch, one_thread):
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    if block.language == "python":
        exec(compile(block.code, f"{block.page}:{block.line}", "exec"), {"__name__": "__main__"})
    else:
        path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
        env = {**os.environ, "PATH": path, "OMP_NUM_THREADS": "1"}
        done = subprocess.run(["bash", "-euo", "pipefail", "-c", block.code], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=300)  # fmt: skip
        assert done.returncode == 0, f"{block.page}:{block.line}\n{done.stdout}\n{done.stderr}"


def test_runnable_blocks_use_a_supported_language():
    assert all(block.language in LANGUAGES for block in RUNNABLE), [b for b in RUNNABLE if b.language not in LANGUAGES]


def test_readme_python_example_and_every_how_to_page_are_executed():
    pages_with_runnable = {block.page for block in RUNNABLE if block.language == "python"}
    for page in ("README.md", "docs/getting-started.md", "docs/recipes.md", "docs/faq.md"):
        assert page in pages_with_runnable, page


def test_acblock_figure_shows_branches_that_sum_to_the_deployed_kernel(tmp_path):
    spec = importlib.util.spec_from_file_location("make_figures", ROOT / "scripts" / "make_figures.py")
    figures = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(figures)
    grids = figures.branch_kernels(figures.example_block())
    branches = torch.stack([grids[name] for name in ("square", "hor", "ver")])
    assert torch.allclose(branches.nansum(0), grids["fused"])
    assert grids["hor"].isnan().sum() == 6 and grids["ver"].isnan().sum() == 6
    path = figures.make_acblock_figure(tmp_path / "acblock.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "img/acblock.png" in (ROOT / "docs" / "how-it-works.md").read_text()


def anchors(page: Path) -> set[str]:
    """GitHub's anchors for the headings of ``page``."""
    headings = re.findall(r"^#+\s+(.*)$", FENCE.sub("", page.read_text()), re.MULTILINE)
    return {re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-") for heading in headings}


def test_relative_links_point_to_existing_files_and_headings():
    link = re.compile(r"\]\((?!https?://|mailto:)([^)#\s]*)(?:#([^)\s]*))?\)")
    broken = []
    for page in PAGES:
        for target, anchor in link.findall(FENCE.sub("", page.read_text())):
            path = page.parent / target if target else page
            if not path.exists() or (anchor and path.suffix == ".md" and anchor not in anchors(path)):
                broken.append(f"{page.relative_to(ROOT)} -> {target}#{anchor}")
    assert not broken, broken


DEFAULT_GAMMA_TEXT = re.compile(r"(?:gamma_init`, |init=\"scratch\"`: BatchNorm gamma )(\d+(?:\.\d+)?(?:/\d+)?)")


def test_the_default_gamma_the_docs_give_is_the_library_default():
    given = [(page.name, match[1]) for page in PAGES for match in DEFAULT_GAMMA_TEXT.finditer(page.read_text())]
    assert given, "no page states the default gamma_init any more: update this test's pattern"
    default = Fraction(DEFAULT_GAMMA).limit_denominator(1000)
    assert [(name, value) for name, value in given if Fraction(value) != default] == []


def test_the_mode_table_lists_the_kinds_each_mode_has():
    from acnet_convert.constants import BUILTIN_KINDS, BUILTIN_VARIANTS, REPOPT_KINDS

    row = next(line for line in (ROOT / "docs" / "training.md").read_text().splitlines() if line.startswith("| kinds |"))
    exact, fast, repopt = (cell.strip() for cell in row.strip("|").split("|")[1:])
    assert exact == "all" and all(f"{kind}-exact" in BUILTIN_VARIANTS for kind in BUILTIN_KINDS)
    without_fast = [kind for kind in BUILTIN_KINDS if f"{kind}-fast" not in BUILTIN_VARIANTS]
    assert fast == "all but " + ", ".join(f"`{kind}`" for kind in without_fast)
    assert sorted(re.findall(r"`(\w+)`", repopt)) == sorted(REPOPT_KINDS)
