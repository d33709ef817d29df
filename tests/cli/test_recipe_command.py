"""The recipe for a new command, followed on a copy of the package: one module in cli/commands/, one wiring line.

The recipe (docs/cli.md has a section per command as well):
  1. write ``acnet_convert/cli/commands/NAME.py`` with ``EPILOG = epilog(<examples>)`` and
     ``def main(session: Session, <options typed from cli.options>) -> None`` (its docstring is the help line);
  2. add ``add_command(app, "NAME")`` to ``acnet_convert/cli/app.py`` where --help should list it.
"""

import subprocess
import sys

from testkit import changed_files, copy_package

KINDS_COMMAND = '''"""``acnet kinds``: the registered block kinds."""

from ..framework import epilog
from ..session import Session

EPILOG = epilog("acnet kinds", "acnet kinds --json")


def main(session: Session) -> None:
    """List the registered block kinds."""
    from ...blocks import kinds

    session.record["kinds"] = kinds()
    session.say(", ".join(kinds()))
'''
PLACES_IN_THE_RECIPE = 2


def test_a_new_command_is_one_module_and_one_wiring_line(tmp_path):
    copy = copy_package(tmp_path)
    (copy / "cli" / "commands" / "kinds.py").write_text(KINDS_COMMAND)
    app_module = copy / "cli" / "app.py"
    app_module.write_text(app_module.read_text() + 'add_command(app, "kinds")\n')
    assert changed_files(copy) == ["cli/app.py", "cli/commands/kinds.py"]
    assert len(changed_files(copy)) == PLACES_IN_THE_RECIPE

    def acnet(*args: str) -> subprocess.CompletedProcess:
        probe = f"import sys\nsys.path.insert(0, {str(tmp_path)!r})\nfrom acnet_convert.cli import app\n"
        probe += f"app({list(args)!r})"
        return subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120,
                              env={"COLUMNS": "200", "PATH": ""})  # fmt: skip

    listed = acnet("--help")
    assert listed.returncode == 0 and "kinds" in listed.stdout and "List the registered block kinds." in listed.stdout
    ran = acnet("kinds")
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout.strip().startswith("acb, dbb, repvgg, qarepvgg")
    assert "acnet kinds --json" in acnet("kinds", "--help").stdout
