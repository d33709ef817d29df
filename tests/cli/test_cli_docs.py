"""docs/cli.md stays in sync with the command line: every command and each of its options is documented."""

import re
from pathlib import Path

import typer

from acnet_convert.cli import app

DOC = (Path(__file__).resolve().parents[2] / "docs" / "cli.md").read_text()
SHARED = DOC.split("## Commands", 1)[1].split("\n### ", 1)[0]  # the options several commands share


def commands() -> dict:
    return typer.main.get_command(app).commands


def section(command: str) -> str:
    """The text of the ``### `acnet COMMAND ...`` section, up to the next heading."""
    match = re.search(rf"^### `acnet {command}\b.*?(?=^#)", DOC, flags=re.MULTILINE | re.DOTALL)
    assert match, f"docs/cli.md has no section for acnet {command}"
    return match.group(0)


def mentions(text: str, option: str) -> bool:
    return re.search(re.escape(option) + r"(?![\w-])", text) is not None


def test_every_command_has_a_section_and_every_section_a_command():
    documented = set(re.findall(r"^### `acnet (\w+)", DOC, flags=re.MULTILINE))
    assert documented == set(commands())


def test_every_option_of_every_command_is_documented_in_its_section_or_as_shared():
    missing = [
        f"acnet {name} {opt}"
        for name, command in commands().items()
        for param in command.params
        for opt in param.opts
        if opt.startswith("--") and opt != "--help" and not (mentions(section(name), opt) or mentions(SHARED, opt))
    ]
    assert not missing, f"options missing from docs/cli.md: {missing}"
