"""Exceptions users can cause, and warnings that point at the user's own line."""

import os
import sys
import warnings
from pathlib import Path

_PACKAGE = str(Path(__file__).parent) + os.sep


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
