"""The ``acnet`` command line: the group, its version option, and one line per command (in the order --help lists them).

A command is a module of ``commands/`` named as the command; torch is imported only inside commands, so that
``acnet --help`` and ``acnet --version`` answer at once.
"""

from typing import Annotated

import typer

from .. import __version__
from .framework import EXIT_CODES, Group, add_command

app = typer.Typer(
    name="acnet",
    cls=Group,
    epilog=EXIT_CODES,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _show_version(value: bool) -> None:
    if value:
        typer.echo(f"acnet-convert {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[
        bool, typer.Option("--version", callback=_show_version, is_eager=True, help="Show the version and exit.")
    ] = False,
) -> None:
    """ACNet for any PyTorch model: train with re-parameterisable blocks, deploy as plain convs.

    SPEC is path/model.py[:NAME], package.module[:NAME], torchvision:NAME or timm:NAME (see docs/cli.md).
    """


add_command(app, "inspect")
add_command(app, "convert")
add_command(app, "deploy")
add_command(app, "verify")
add_command(app, "export")
add_command(app, "quantcheck")
add_command(app, "demo")
