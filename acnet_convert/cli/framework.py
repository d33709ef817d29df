"""How an acnet command runs: typer's classes adjusted, option bundles unpacked, errors turned into exit codes.

A command is a module of ``acnet_convert.cli.commands`` with ``EPILOG`` and a function ``main(session, ...)``;
``add_command`` registers it under the module's name.  Every command gets the ``Output`` options last.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import inspect
import sys
import traceback
import typing
from collections.abc import Callable, Iterator, Mapping

import typer
from typer import _click as click
from typer.core import TyperCommand, TyperGroup, TyperOption

from ..errors import ACNetError, VerificationError, first_line
from .options import Output
from .session import Session, error_line

EXIT_FAILED, EXIT_INPUT, EXIT_UNEXPECTED, EXIT_INTERRUPTED = 1, 2, 3, 130
EXIT_CODES = (
    "Exit codes: 0 success; 1 a check failed (outputs differ beyond --rtol) or convert converted nothing; "
    "2 usage or input error (bad option, spec, file or weights); 3 unexpected error (rerun with --debug)."
)


class NothingConverted(ACNetError):
    """convert found no conv to convert (exit 1 unless --allow-empty)."""


def _plain_flags(params: list) -> list:
    """Parameters with the type column of every on/off flag left empty (no ``<bool>``)."""
    for param in params:
        if getattr(param, "is_flag", False) and param.metavar is None:
            param.metavar = ""
    return params


class Command(TyperCommand):
    """An acnet command: on/off flags show no value type in --help; an option of one value given twice is an
    error (click would keep the last)."""

    def get_params(self, ctx: click.Context) -> list:
        return _plain_flags(super().get_params(ctx))

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        _refuse_repeated(self.get_params(ctx), args, ctx)
        return super().parse_args(ctx, args)


def _refuse_repeated(params: list, args: list[str], ctx: click.Context) -> None:
    """``UsageError`` for an option that takes one value (or is an on/off flag) given more than once."""
    single = {name: param for param in params if isinstance(param, TyperOption) and not param.multiple
              for name in [*param.opts, *param.secondary_opts]}  # fmt: skip
    given: dict[str, list[str]] = {}
    for i, arg in enumerate(args[: args.index("--") if "--" in args else len(args)]):
        name, _, value = arg.partition("=")
        param = single.get(name)
        if param is None:
            continue
        if not value and not param.is_flag:
            value = args[i + 1] if i + 1 < len(args) else ""
        given.setdefault(param.name, []).append(f"{name} {value}".strip())
    for uses in given.values():
        if len(uses) > 1:
            values = f" ({', '.join(uses)})" if uses[0] != uses[-1] else ""
            raise click.exceptions.UsageError(
                f"{uses[0].split()[0]} is given {len(uses)} times{values}: give it once", ctx=ctx
            )


class Group(TyperGroup):
    """The acnet group: usage errors are one ``error: ... (try: ...)`` line and exit 2, like every other error."""

    def get_params(self, ctx: click.Context) -> list:
        return _plain_flags(super().get_params(ctx))

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            code = super().main(args, prog_name or "acnet", complete_var, standalone_mode=False, **extra)
        except click.exceptions.NoArgsIsHelpError:
            sys.exit(0)  # the help has been shown
        except click.exceptions.UsageError as exc:
            where = exc.ctx.command_path if exc.ctx else "acnet"
            error_line(f"{_usage_message(exc)} (try: {where} --help)")
            sys.exit(EXIT_INPUT)
        except click.exceptions.ClickException as exc:
            error_line(exc.format_message())
            sys.exit(exc.exit_code)
        except typer.Abort:
            sys.exit(EXIT_INTERRUPTED)
        sys.exit(code if isinstance(code, int) else 0)


def _usage_message(exc: click.exceptions.UsageError) -> str:
    """click's message for a usage error, as one lower-case clause, with the checks typer leaves to pydantic in our
    words."""
    text = exc.format_message()
    problems = getattr(exc.__cause__, "errors", None)
    if isinstance(exc, click.exceptions.BadParameter) and callable(problems):
        text = text.replace(exc.message, _in_our_words(problems()[0], exc.message))
    text = " ".join(text.replace("Value error, ", "").split()).rstrip(".")
    return text[:1].lower() + text[1:]


def _in_our_words(problem: Mapping, message: str) -> str:
    """What one of pydantic's validation errors says, about the value given."""
    given, bounds = problem.get("input"), problem.get("ctx") or {}
    words = {
        "greater_than_equal": f"{given} is less than {bounds.get('ge')}: give {bounds.get('ge')} or more",
        "less_than_equal": f"{given} is more than {bounds.get('le')}: give {bounds.get('le')} or less",
        "int_parsing": f"{given!r} is not a whole number", "int_from_float": f"{given!r} is not a whole number",
        "float_parsing": f"{given!r} is not a number",
    }  # fmt: skip
    return words.get(problem.get("type"), message)


def epilog(*examples: str, note: str = "") -> str:
    """Help text shown after the options: examples, one per paragraph, then a note."""
    return "\n\n".join(["Examples:", *(f"  {example}" for example in examples), *([note] if note else [])])


LIBRARY_ARGUMENTS = {"choose one with key=": "choose one with --checkpoint-key", "pass force=True": "pass --force",
                     "block_options:": "--block-option:", "that block chooses": "that --block chooses"}  # fmt: skip


@contextlib.contextmanager
def as_flags(flags: Mapping[str, str]) -> Iterator[None]:
    """Library errors with the Python names in ``flags`` replaced by the command line's flags."""
    try:
        yield
    except ACNetError as exc:
        message = str(exc)
        for name, replacement in flags.items():
            message = message.replace(name, replacement)
        if message == str(exc):
            raise
        raise type(exc)(message) from exc


def add_command(app: typer.Typer, name: str) -> None:
    """Register the command module ``commands.<name>`` as ``acnet <name>``."""
    module = importlib.import_module(f"{__package__}.commands.{name}")
    app.command(name, cls=Command, epilog=module.EPILOG)(guarded(module.main, name))


def guarded(command: Callable[..., None], name: str) -> Callable[..., None]:
    """``command`` as typer calls it: its bundles' options spread out, the ``Output`` options added, its
    ``Session`` passed first; errors become one line on stderr and a documented exit code."""
    parameters = list(inspect.signature(command, eval_str=True).parameters.values())[1:]
    bundles = {p.name: p.annotation for p in parameters if dataclasses.is_dataclass(p.annotation)}
    spread = [q.replace(kind=q.KEYWORD_ONLY) for p in parameters
              for q in (_fields(p.annotation) if p.name in bundles else [p])]  # fmt: skip

    def run(**kwargs) -> None:
        output = Output(**{f.name: kwargs.pop(f.name) for f in dataclasses.fields(Output)})
        for key, bundle in bundles.items():
            kwargs[key] = bundle(**{f.name: kwargs.pop(f.name) for f in dataclasses.fields(bundle)})
        session = Session(name, output.as_json, output.quiet)
        try:
            with session.library_warnings(LIBRARY_ARGUMENTS, every=False):  # none is shown as Python's two lines
                command(session, **kwargs)
            session.finish()
            return
        except (VerificationError, NothingConverted) as exc:
            error, message, code = exc, str(exc), EXIT_FAILED
        except ACNetError as exc:
            error, message, code = exc, str(exc), EXIT_INPUT
            for argument, flag in LIBRARY_ARGUMENTS.items():  # the library names Python arguments
                message = message.replace(argument, flag)
        except KeyboardInterrupt as exc:
            error, message, code = exc, "interrupted", EXIT_INTERRUPTED
        except typer.Exit:
            raise
        except Exception as exc:
            error, code = exc, EXIT_UNEXPECTED
            message = f"unexpected {first_line(exc)} (rerun with --debug for the traceback)"
        if output.debug:
            traceback.print_exception(error)
        session.fail(message, code)
        raise typer.Exit(code)

    run.__name__, run.__doc__ = command.__name__, command.__doc__
    run.__signature__ = inspect.Signature([*spread, *_fields(Output)])
    return run


def _fields(bundle: type) -> list[inspect.Parameter]:
    """A bundle's options as parameters, with their option types and defaults."""
    hints = typing.get_type_hints(bundle, include_extras=True)
    kind = inspect.Parameter.KEYWORD_ONLY
    return [inspect.Parameter(f.name, kind, default=f.default, annotation=hints[f.name])
            for f in dataclasses.fields(bundle)]  # fmt: skip
