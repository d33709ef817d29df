"""What a command run reports: text on stdout, notes and warnings on stderr, or one JSON document; progress displays."""

from __future__ import annotations

import contextlib
import json
import math
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.console import Console
from rich.table import Table

if TYPE_CHECKING:
    from ..checks.verify import Comparison

err = Console(stderr=True, highlight=False)
PIPE_WIDTH = 100_000  # tables take their natural width: no row is wrapped or cut where nobody reads at a width


def error_line(message: str) -> None:
    """The one ``error:`` line of a failed run."""
    typer.echo(f"error: {' '.join(message.split())}", err=True)


@dataclass
class Session:
    """One command run: renders text unless --json or --quiet, and collects the JSON document."""

    command: str
    as_json: bool = False
    quiet: bool = False
    record: dict = field(default_factory=dict)
    failed: list[tuple[str, Comparison, float]] = field(default_factory=list)  # the checks beyond their rtol

    def __post_init__(self) -> None:
        self.record = {"command": self.command, "ok": True, "files": [], "checks": [], "notes": [], "warnings": []}

    @property
    def out(self) -> Console:
        return Console(highlight=False, quiet=self.quiet or self.as_json)

    def say(self, text: str) -> None:
        """A line of the text output (stdout)."""
        self.out.print(text, soft_wrap=True, markup=False)

    def table(self, table: Table) -> None:
        """A table on stdout: a terminal's width, else as wide as its rows (a pipe or a file has no width)."""
        console = self.out
        if not console.is_terminal:
            console.width = PIPE_WIDTH
        console.print(table)

    def note(self, text: str) -> None:
        self.record["notes"].append(text)
        if not self.quiet:
            typer.echo(f"note: {' '.join(text.split())}", err=True)

    def warn(self, text: str) -> None:
        self.record["warnings"].append(text)
        typer.echo(f"warning: {' '.join(text.split())}", err=True)

    def check(self, label: str, result: Comparison, rtol: float) -> None:
        """Record and show one comparison."""
        self.record["checks"].append(check_record(label, result, rtol))
        if result.relative > rtol:
            self.failed.append((label, result, rtol))
        verdict = "ok" if result.relative <= rtol else "MISMATCH"
        self.say(f"check {label}: max abs error {result.max_abs:.3g}, relative {result.relative:.3g} ({verdict})")

    def wrote(self, path: Path | str, what: str) -> None:
        """Record and show a file written."""
        self.record_file(path, what)
        self.say(f"wrote {path} ({what})")

    def record_file(self, path: Path | str, what: str, **details: object) -> None:
        """Record a file written in the JSON document (``what``: its format, under the key "kind")."""
        self.record["files"].append({"path": str(path), "kind": what, **details})

    def finish(self) -> None:
        if self.as_json:
            typer.echo(json.dumps(jsonable(self.record), indent=2))

    def fail(self, message: str, code: int) -> None:
        error_line(message)
        if self.as_json:
            self.record.update(ok=False, error=" ".join(message.split()), exit_code=code)
            self.finish()

    @contextlib.contextmanager
    def library_warnings(self, flags: Mapping[str, str] | None = None, *, every: bool = True) -> Iterator[None]:
        """The warnings raised inside as warning lines (each one line, however long, and each text once), with the
        Python names in ``flags`` replaced by the command line's flags; all of them, or unless ``every`` only those
        the warning filters in force show (Python's hide other packages' deprecation warnings)."""
        with warnings.catch_warnings(record=True) as caught:
            if every:
                warnings.simplefilter("always")
            try:
                yield
            finally:
                for text in dict.fromkeys(str(warning.message) for warning in caught):
                    for name, replacement in (flags or {}).items():
                        text = text.replace(name, replacement)
                    self.warn(text)

    def spinner(self, description: str) -> contextlib.AbstractContextManager[None]:
        """A transient spinner on stderr (on a terminal, without --quiet)."""
        return _spinner(self, description)

    def bar(self, description: str, total: int) -> contextlib.AbstractContextManager[Callable[[], None]]:
        """A transient progress bar on stderr; the context gives the function that advances it."""
        return _bar(self, description, total)


def check_record(label: str, result: Comparison, rtol: float) -> dict:
    """One comparison as the JSON document lists it."""
    return {"label": label, "max_abs": result.max_abs, "max_ref": result.max_ref, "relative": result.relative,
            "rtol": rtol, "passed": result.relative <= rtol}  # fmt: skip


def jsonable(value: object) -> object:
    """``value`` with tuples as lists, paths as strings and non-finite floats as None."""
    if isinstance(value, dict):
        return {str(key): jsonable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(item) for item in value]
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _progress(session: Session, *columns):
    from rich.progress import Progress, TimeElapsedColumn

    disable = session.quiet or not err.is_terminal
    return Progress(*columns, TimeElapsedColumn(), console=err, transient=True, disable=disable)


@contextlib.contextmanager
def _spinner(session: Session, description: str) -> Iterator[None]:
    from rich.progress import SpinnerColumn, TextColumn

    with _progress(session, SpinnerColumn(), TextColumn("{task.description}")) as progress:
        progress.add_task(description, total=None)
        yield


@contextlib.contextmanager
def _bar(session: Session, description: str, total: int) -> Iterator[Callable[[], None]]:
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn

    with _progress(session, TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn()) as progress:
        task = progress.add_task(description, total=total)
        yield lambda: progress.advance(task)
