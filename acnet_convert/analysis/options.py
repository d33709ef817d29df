"""What the planner is asked for: which convs, which kernel sizes, which block kind and mode, which example run."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from ..constants import DEFAULT_KIND, DEFAULT_MIN_KERNEL

BlockChoice = str | Mapping[str, str]  # one kind, or qualified-name pattern -> kind (first match wins)


@dataclass(frozen=True)
class PlanOptions:
    """The options of ``plan`` and ``acify`` that decide the plan (checked by the public API)."""

    include: tuple[str, ...] | None = None  # name patterns a conv must match to be converted
    exclude: tuple[str, ...] | None = None  # name patterns that keep a conv as it is
    min_kernel: int = DEFAULT_MIN_KERNEL  # smallest kernel side above 1 that is converted
    max_kernel: int | None = None  # largest kernel side that is converted
    example_inputs: tuple | None = None  # one batch to run the model on where torch.fx cannot trace it
    layout: str = "lines"  # ACB's branches of a 3D kernel
    block: BlockChoice = DEFAULT_KIND
    mode: str = "exact"
    block_options: Mapping[str, Mapping[str, int]] = field(default_factory=dict)  # kind -> its options' values
