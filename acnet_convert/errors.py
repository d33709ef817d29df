"""Exceptions users can cause, and warnings that point at the user's own line."""

import os
import re
import sys
import warnings
from pathlib import Path

_PACKAGE = str(Path(__file__).parent) + os.sep
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_RAISED_BY = re.compile(r'The following call raised this error:\s*File "([^"]+)", line (\d+)[^\n]*\n\s*([^\n]+)')


class ACNetError(Exception):
    """A model, option or file that acnet-convert cannot work with; the message says how to fix it."""


class VerificationError(ACNetError):
    """A converted model whose outputs differ from the reference beyond tolerance."""


def warn(message: str, category: type[Warning] = UserWarning, *, skip: tuple[str, ...] = ()) -> None:
    """``warnings.warn`` attributed to the first caller outside this package (and outside the folders ``skip``)."""
    frame, level = sys._getframe(1), 2
    while frame is not None and frame.f_code.co_filename.startswith((_PACKAGE, *skip)):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level)


def first_line(exc: BaseException | Warning, *, with_type: bool = True) -> str:
    """The first line of an exception's or warning's message, after ``Type: `` unless not ``with_type``; just the
    type for an empty message."""
    lines = str(exc).strip().splitlines()
    if not lines:
        return type(exc).__name__
    return f"{type(exc).__name__}: {lines[0]}" if with_type else lines[0]


def in_one_line(exc: BaseException) -> str:
    """An exception's first paragraph, all of its lines, as one line after ``Type: ``, with the user's line that
    raised it where torch names one; just the type for an empty message."""
    text = _ANSI.sub("", str(exc)).strip()
    paragraph = " ".join(text.split("\n\n", 1)[0].split())
    if not paragraph:
        return type(exc).__name__
    raised = _RAISED_BY.search(text)
    where = f" (raised by {Path(raised[1]).name}:{raised[2]}: {raised[3].strip()})" if raised else ""
    return f"{type(exc).__name__}: {paragraph}{where}"
