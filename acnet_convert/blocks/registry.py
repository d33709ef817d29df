"""Block kinds: the protocol every re-parameterisable block implements, and the one map from kind to class.

A block kind is a name (``"acb"``, ``"dbb"``, ``"repvgg"``, ...) with one class per mode: ``"exact"`` (the
paper's block, a BatchNorm on every branch) and, where its branches are linear, ``"fast"`` (one conv per
forward, the BatchNorm after the conv left in place).  Everything else in the package reaches block classes
through ``block_class`` and ``is_block``.
"""

from __future__ import annotations

import importlib
from typing import ClassVar

from torch import Tensor, nn

from ..errors import ACNetError

MODES = ("exact", "fast")
INITS = ("preserve", "scratch")
DEFAULT_KIND = "acb"
DEFAULT_GAMMA = 1 / 3  # the new branches' initial gamma with init="scratch" (chosen by docs/accuracy.md)
_BUILTIN_MODULES = ("acb", "acb_fast", "repvgg", "qarepvgg", "dbb")
_CLASSES: dict[tuple[str, str], type[ReparamBlock]] = {}
_loaded = False


class ReparamBlock(nn.Module):
    """The training form of one conv: branches that fold back into a single conv of the original's class.

    A subclass sets ``kind``, ``mode`` and ``absorbs_bn`` and implements the methods below; ``register_block``
    makes it available to ``acify(model, block=kind, mode=mode)``, ``deploy``, ``load`` and the command line.
    """

    kind: ClassVar[str]
    mode: ClassVar[str] = "exact"
    absorbs_bn: ClassVar[bool] = True  # takes the BatchNorm that follows the conv into the block
    layout: str = "lines"  # the branch arrangement it was built with (ACB's 3D option), recorded in checkpoints

    @classmethod
    def conv_problem(cls, conv: nn.Module, layout: str = "lines") -> str:
        """Why this kind cannot be built around ``conv``, or '' when it can."""
        raise NotImplementedError

    @classmethod
    def describe(cls, conv: nn.Module, layout: str = "lines") -> str:
        """The branches the block would have around ``conv``, as one short line (e.g. ``3x3 + 1x3 + 3x1``)."""
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
    ) -> ReparamBlock:
        """Wrap ``conv`` (and, when ``absorbs_bn``, the BatchNorm after it), keeping their weights.

        ``init="preserve"``: the block computes what ``bn(conv(x))`` did (new branches start at zero);
        ``init="scratch"``: every branch's scale (BN gamma) starts at ``gamma_init``.
        """
        raise NotImplementedError

    def equivalent_kernel(self) -> tuple[Tensor, Tensor]:
        """The kernel and bias of the single conv this block equals in eval mode, differentiable, in its dtype."""
        raise NotImplementedError

    def fused_kernel(self) -> tuple[Tensor, Tensor]:
        """``equivalent_kernel`` computed in float64, detached: what ``deploy`` writes into the fused conv."""
        raise NotImplementedError

    def fuse(self, weight: Tensor | None = None, bias: Tensor | None = None) -> nn.Module:
        """The equivalent plain conv (the original conv's class), with ``fused_kernel()`` or the given kernel."""
        raise NotImplementedError



def register_block(kind: str, cls: type[ReparamBlock], *, mode: str | None = None) -> None:
    """Make ``cls`` the block of ``kind`` in its mode (``cls.mode`` unless ``mode`` is given)."""
    if not (isinstance(cls, type) and issubclass(cls, ReparamBlock)):
        raise ACNetError(f"register_block({kind!r}, ...) needs a subclass of acnet_convert.ReparamBlock")
    mode = mode or cls.mode
    if mode not in MODES:
        raise ACNetError(f"unknown mode {mode!r} for block kind {kind!r}: use one of {', '.join(MODES)}")
    if not kind or not kind.replace("_", "").isalnum():
        raise ACNetError(f"block kind {kind!r} is not a simple name: use letters, digits and underscores")
    _CLASSES[(kind, mode)] = cls


def block_class(kind: str, mode: str = "exact") -> type[ReparamBlock]:
    """The class registered for ``kind`` in ``mode``; ``ACNetError`` naming the registered ones otherwise."""
    _load_builtins()
    if mode not in MODES:
        raise ACNetError(f"unknown mode {mode!r}: use one of {', '.join(MODES)}")
    cls = _CLASSES.get((kind, mode))
    if cls is None:
        if kind in kinds():
            modes = [m for k, m in _CLASSES if k == kind]
            raise ACNetError(f"block kind {kind!r} has no {mode} mode: use mode={modes[0]!r}")
        raise ACNetError(f"unknown block kind {kind!r}: use one of {', '.join(kinds())}")
    return cls


def kinds() -> tuple[str, ...]:
    """The registered block kinds, in registration order."""
    _load_builtins()
    return tuple(dict.fromkeys(kind for kind, _ in _CLASSES))


def is_block(module: object) -> bool:
    """Whether ``module`` is a re-parameterisable block (of any kind)."""
    return isinstance(module, ReparamBlock)


def has_blocks(model: nn.Module) -> bool:
    """Whether ``model`` contains a block (or is one)."""
    return any(is_block(m) for m in model.modules())


def _load_builtins() -> None:
    """Import the built-in block modules, each of which registers its classes."""
    global _loaded
    if not _loaded:
        _loaded = True
        for name in _BUILTIN_MODULES:
            importlib.import_module(f"{__package__}.{name}")
