"""Stable codes for the reasons ``plan`` gives for each conv site, for scripts that read ``--json`` output.

A site's reason is one text or several joined by ``"; "`` (a note, then the decision's reason); each part maps to
one code. The codes never change meaning; a text that no rule knows (e.g. a user block kind's own wording for a
conv it cannot wrap, without the kind's name in front) gets ``"other"``.
"""

from __future__ import annotations

import re

OTHER = "other"
_RULES: tuple[tuple[str, str], ...] = (  # (code, regular expression matched at the start of one part)
    ("overrides-forward", r"\w+ overrides forward\(\)"),
    ("parametrized", r"weight is parametrized"),
    ("lazy", r"lazy conv not initialised"),
    ("not-floating-point", r"weight dtype .* is not floating point"),
    ("not-included", r"not matched by include$"),
    ("excluded", r"matched by exclude$"),
    ("hooks", r"has hooks registered on it"),
    ("extra-arguments", r"called with extra arguments"),
    ("attribute-read", r"its attribute \S+ is read directly"),
    ("parameter-used-outside", r"a parameter of it is used by .* outside its call"),
    ("untraceable-container", r"in a \w+ used by code torch\.fx cannot trace"),
    ("untraceable-no-source", r"source of \w+ unavailable"),
    ("untraceable-attribute-use", r"\w+ uses \.\w+ other than by calling it"),
    ("below-min-kernel", r"kernel side below min_kernel"),
    ("above-max-kernel", r"kernel side above max_kernel"),
    ("untraceable-called-only", r"in code torch\.fx cannot trace, only ever called"),
    ("not-called", r"not called by forward\(\)"),
    ("repeated-calls", r"shared: called \d+ times per forward"),
    ("output-unused", r"its output is (unused|not used)"),
    ("output-shared", r"its output feeds \d+ operations"),
    ("output-returned", r"its output is returned by forward\(\)"),
    ("no-batchnorm-after", r"its output feeds .*, not a BatchNorm"),
    ("bn-differs-by-mode", r"feeds different BatchNorms in train and eval mode"),
    ("bn-kept", r"BatchNorm \S+ stays after the block"),
    ("bn-wrong-type", r"BatchNorm \S+ is a \w+, not "),
    ("bn-no-running-stats", r"BatchNorm \S+ tracks no running statistics"),
    ("bn-channels", r"BatchNorm \S+ has a different number of channels"),
    ("bn-repeated-calls", r"BatchNorm \S+ is called more than once"),
    ("bn-other-inputs", r"BatchNorm \S+ also receives other inputs"),
    ("bn-hooks", r"BatchNorm \S+ has hooks"),
    ("bn-claimed", r"BatchNorm \S+ is already absorbed"),
    ("bn-unsafe", r"BatchNorm \S+ (its attribute|called with extra|a parameter of it)"),
    ("fallback-kind", r"converted as \w+$"),
    ("already-block", r"already a \w+"),
    ("block-unsupported", r"(even kernel side|needs at least two kernel sides|fast mode |1x1 conv: |\w+ is not a )"),
    ("kind-unsupported", r"\w+: "),  # "<kind>: <why that kind cannot wrap the conv>"
)
_COMPILED = tuple((code, re.compile(pattern)) for code, pattern in _RULES)
CODES = tuple(code for code, _ in _RULES) + (OTHER,)


def reason_codes(reason: str) -> list[str]:
    """The code of every part of a site's reason, in order (empty for a site without a reason)."""
    return [_code(part) for part in _parts(reason)]


def reason_code(reason: str) -> str:
    """The code of a site's reason: that of its first part, or '' for a site without a reason."""
    codes = reason_codes(reason)
    return codes[0] if codes else ""


def _parts(reason: str) -> list[str]:
    """The parts of a reason: the texts joined by "; "."""
    return [part.strip() for part in re.split(r";\s+", reason) if part.strip()]


def _code(part: str) -> str:
    return next((code for code, pattern in _COMPILED if pattern.match(part)), OTHER)
