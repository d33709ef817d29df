"""The reasons a plan gives for each conv site: a stable code chosen where the decision is taken, and its text.

A site's reason may have several parts (a note on the block kind, then the decision), each with its own code.
The codes never change meaning; scripts that read ``--json`` output compare codes, not texts.  A plan read from a
file written before codes were recorded (0.2.0) has the code ``other`` for every site with a reason: its codes
are not known, and no code is guessed from the text (plan the model again to get them).
"""

from __future__ import annotations

from dataclasses import dataclass

OTHER = "other"
CODES = (  # every code, in the order the documentation lists them
    "overrides-forward", "parametrized", "lazy", "not-floating-point", "not-included", "excluded", "hooks",
    "extra-arguments", "attribute-read", "parameter-used-outside", "untraceable-container", "untraceable-no-source",
    "untraceable-attribute-use", "below-min-kernel", "above-max-kernel", "untraceable-called-only", "not-called",
    "repeated-calls", "output-unused", "output-shared", "output-returned", "no-batchnorm-after", "bn-differs-by-mode",
    "bn-kept", "bn-wrong-type", "bn-no-running-stats", "bn-channels", "bn-repeated-calls", "bn-other-inputs",
    "bn-hooks", "bn-claimed", "bn-unsafe", "fallback-kind", "already-block", "block-unsupported", "kind-unsupported",
    OTHER,
)  # fmt: skip
NEEDS_EXAMPLE_RUN = ("untraceable-container", "untraceable-no-source", "untraceable-attribute-use")


@dataclass(frozen=True)
class Reason:
    """One part of a site's reason: its stable code (one of ``CODES``) and the text a person reads."""

    code: str
    text: str

    def __post_init__(self) -> None:
        if self.code not in CODES:
            raise ValueError(f"unknown reason code {self.code!r}")
