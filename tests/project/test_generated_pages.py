"""Every generated page says what its saved record says: rendered anew from the record, it is the committed page."""

import importlib.util
import json
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"


def script(name):
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        spec = importlib.util.spec_from_file_location(f"page_{name}", ROOT / "scripts" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses look their module up there
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    return module


def record(name):
    return json.loads((DOCS / name).read_text())


def rendered(page):
    """The page as its script writes it from the saved record(s)."""
    if page == "benchmarks.md":
        return script("bench_render").markdown([record("benchmarks.json"), record("benchmarks-h100.json")])
    if page.startswith("accuracy"):
        return script("accuracy_study").report(record(page.removesuffix(".md") + ".json"))
    saved = record("timm-sweep.json")
    return script("timm_sweep").render(saved["records"], saved["meta"])


GENERATED = ["benchmarks.md", "accuracy.md", "accuracy-mobileone-repopt.md", "accuracy-large-kernel.md", "timm-sweep.md"]


@pytest.mark.parametrize("page", GENERATED)
def test_generated_page_matches_its_record(page):
    assert (DOCS / page).read_text() == rendered(page), f"docs/{page} is stale: rerun its script's render step"


FIGURE = re.compile(r"(?<![\w.])(\d+(?:\.\d+)?)(?:-(\d+(?:\.\d+)?))?([x%])(?!\w)")  # 1.02x, 1.6-2.4x, 93.1%


def test_every_figure_the_readme_quotes_is_on_a_generated_page():
    generated = " ".join((DOCS / page).read_text() for page in GENERATED)
    quoted = [(match[0], number + match[3]) for match in FIGURE.finditer((ROOT / "README.md").read_text())
              for number in filter(None, match.groups()[:2])]  # fmt: skip
    assert [figure for figure, number in quoted if number not in generated] == []
