"""The protocol every re-parameterisable block implements: what the rest of the package reads and calls."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import ClassVar

from torch import Tensor, nn

from ..constants import DEFAULT_GAMMA
from ..errors import ACNetError
from ..kernels import Kernel

# The settings of the conv a block wraps, which every block exposes under the conv's attribute names.
CONV_SETTINGS = (
    "in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups", "padding_mode"
)  # fmt: skip


@dataclass(frozen=True)
class KindOption:
    """An integer option of a block kind (``acify(block_options={kind: {name: value}})``): default, least value."""

    default: int
    minimum: int
    meaning: str  # what it counts, as a short noun phrase


class ReparamBlock(nn.Module):
    """The training form of one conv: branches that fold back into a single conv of the original's class.

    A subclass sets ``kind``, ``mode`` and ``absorbs_bn``, gives each block the settings of the conv it wraps
    (``CONV_SETTINGS``) and implements the methods below; ``register_block(cls)`` makes it available to
    ``acify(model, block=kind, mode=mode)``, ``deploy``, ``load`` and the command line.
    """

    kind: ClassVar[str]  # the block kind, a simple name ("acb", "dbb", ...)
    mode: ClassVar[str] = "exact"  # "exact" (a BatchNorm on every branch) or "fast" (one conv per forward)
    absorbs_bn: ClassVar[bool] = True  # takes the BatchNorm that follows the conv into the block
    conv_type: type[nn.Module] = nn.Conv2d  # the class of the conv it wraps and fuses into
    layout: str = "lines"  # the branch arrangement it was built with (ACB's 3D option), recorded in checkpoints
    kind_options: ClassVar[Mapping[str, KindOption]] = MappingProxyType({})  # the options its kind takes, by name
    options: Mapping[str, int] = MappingProxyType({})  # the values of those options it was built with
    in_channels: int
    out_channels: int
    kernel_size: tuple[int, ...]
    stride: tuple[int, ...]
    padding: str | tuple[int, ...]
    dilation: tuple[int, ...]
    groups: int
    padding_mode: str = "zeros"

    @classmethod
    def resolve_options(cls, given: Mapping[str, object] | None = None) -> dict[str, int]:
        """Every option of this kind: those ``given``, checked, and the defaults of the others."""
        given = dict(given or {})
        unknown = sorted(set(given) - set(cls.kind_options))
        if unknown:
            takes = f"its options are {', '.join(cls.kind_options)}" if cls.kind_options else "it takes none"
            raise ACNetError(f"block_options: block kind {cls.kind!r} has no option {unknown[0]!r} ({takes})")
        resolved = {}
        for name, option in cls.kind_options.items():
            value = given.get(name, option.default)
            if isinstance(value, bool) or not isinstance(value, int) or value < option.minimum:
                raise ACNetError(f"block_options: {name}={value!r} for block kind {cls.kind!r} must be an integer >= "
                                 f"{option.minimum} ({option.meaning})")  # fmt: skip
            resolved[name] = value
        return resolved

    @classmethod
    def conv_problem(cls, conv: nn.Module, layout: str = "lines") -> str:
        """Why this kind cannot be built around ``conv``, or '' when it can."""
        raise NotImplementedError

    @classmethod
    def describe(cls, conv: nn.Module, layout: str = "lines", **options: int) -> str:
        """The branches the block would have around ``conv`` (with the kind's ``options``), as one short line (e.g.
        ``3x3 + 1x3 + 3x1``)."""
        raise NotImplementedError

    @classmethod
    def from_conv(
        cls,
        conv: nn.Module,
        bn: nn.Module | None = None,
        *,
        init: str = "preserve",
        gamma_init: float = DEFAULT_GAMMA,
        layout: str = "lines",
        **options: int,
    ) -> ReparamBlock:
        """Wrap ``conv`` (and, when ``absorbs_bn``, the BatchNorm after it), keeping their weights.

        ``init="preserve"``: the block computes what ``bn(conv(x))`` did (new branches start at zero);
        ``init="scratch"``: every branch's scale (BN gamma) starts at ``gamma_init``.  ``options`` are the kind's
        (``kind_options``); the callers pass them only to a kind that has some.
        """
        raise NotImplementedError

    def equivalent_kernel(self) -> Kernel:
        """The weight and bias of the single conv this block equals in eval mode, differentiable, in its dtype."""
        raise NotImplementedError

    def fused_kernel(self) -> Kernel:
        """``equivalent_kernel`` computed in float64, detached: what ``deploy`` writes into the fused conv."""
        raise NotImplementedError

    def fuse(self, weight: Tensor | None = None, bias: Tensor | None = None) -> nn.Module:
        """The equivalent plain conv (of ``conv_type``), with ``fused_kernel()`` or the given weight and bias."""
        raise NotImplementedError
