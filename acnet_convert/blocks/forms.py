"""The two forms a built-in block takes while training, and the one way both fold back into a conv.

``SummedBranches`` (exact mode) runs its branches and sums them; ``ComposedKernel`` (fast mode) composes one
kernel from scaled branch kernels and runs one conv.  Either equals, in eval mode, one conv of ``conv_type`` with
the wrapped conv's settings, and their common base builds it from ``equivalent_kernel`` in float64.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..constants import DEFAULT_GAMMA, INITS
from ..errors import ACNetError
from ..kernels import Kernel, sum_branches
from .base import CONV_SETTINGS, ReparamBlock
from .branches import init_new_branches
from .geometry import BLOCK_CONVS, conv_padding, pad_like_conv


def copy_settings(block: ReparamBlock, conv: nn.Module) -> None:
    """Give ``block`` the settings of ``conv`` (``CONV_SETTINGS``, ``output_padding`` of a transposed conv), the
    built-in class it is and the conv it fuses into (``conv``'s own class and attributes, without its weights)."""
    for name in CONV_SETTINGS:
        setattr(block, name, getattr(conv, name))
    block.conv_type = next(c for c in BLOCK_CONVS if isinstance(conv, c))
    if block.conv_type is nn.ConvTranspose2d:
        block.output_padding = conv.output_padding
    block.__dict__["fuses_into"] = conv_skeleton(conv)  # not a submodule: no state-dict keys, no parameters


def conv_skeleton(conv: nn.Module) -> nn.Module:
    """A copy of ``conv`` (its class, attributes and buffers) whose parameters are on the meta device."""
    memo = {id(p): nn.Parameter(torch.empty_like(p, device="meta"), p.requires_grad) for p in conv.parameters()}
    return copy.deepcopy(conv, memo)


def conv_holding(skeleton: nn.Module, weight: Tensor, bias: Tensor | None) -> nn.Module:
    """A copy of ``skeleton`` (a ``conv_skeleton``) holding ``weight`` and ``bias`` (None: no bias), on their
    device."""
    conv = copy.deepcopy(skeleton)
    conv.weight = nn.Parameter(weight)
    conv.bias = None if bias is None else nn.Parameter(bias)
    return conv.to(device=weight.device)


def conv_args(block: ReparamBlock, **override) -> dict:
    """The constructor arguments of a conv with ``block``'s settings, with ``override`` applied."""
    args = {name: getattr(block, name) for name in CONV_SETTINGS}
    if block.conv_type is nn.ConvTranspose2d:
        args["output_padding"] = block.output_padding
    return {**args, **override}


def settings_repr(block: ReparamBlock) -> str:
    """The conv settings of ``block`` as ``extra_repr`` text."""
    return ", ".join(f"{name}={getattr(block, name)}" for name in CONV_SETTINGS)


class ConvEquivalentBlock(ReparamBlock):
    """A block equal, in eval mode, to one conv of ``conv_type`` with the wrapped conv's settings.

    A subclass builds itself around a conv (``build``), starts its new branches for ``init`` (``init_branches``) and
    computes ``equivalent_kernel(dtype)``; ``from_conv``, ``fused_kernel`` and ``fuse`` are the same for every kind.
    """

    @classmethod
    def refuse(cls, conv: nn.Module) -> None:
        """Raise ``ACNetError`` when this kind cannot wrap ``conv``."""
        problem = cls.conv_problem(conv)
        if problem:
            raise ACNetError(f"{cls.__name__} cannot wrap this conv ({problem}): use another block kind for it")

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
    ) -> ConvEquivalentBlock:
        """Wrap ``conv`` (and, when ``absorbs_bn``, the BatchNorm after it), keeping their parameters.

        ``init="preserve"``: the block computes what ``bn(conv(x))`` did; ``init="scratch"``: every new branch's
        scale (BN gamma) starts at ``gamma_init``, and in exact mode the absorbed BatchNorm's gamma too.
        ``options``: the kind's options (``kind_options``; defaults for those not given), read by ``build``.
        """
        if init not in INITS:
            raise ACNetError(f"unknown init {init!r}: use one of {', '.join(INITS)}")
        block = cls.__new__(cls)
        nn.Module.__init__(block)
        block.options = cls.resolve_options(options)
        block.build(conv, bn, layout)
        block.init_branches(bn, init, gamma_init)
        block.train(conv.training)
        return block

    def build(self, conv: nn.Module, bn: nn.Module | None, layout: str) -> None:
        """Take over ``conv``'s settings and parameters (and ``bn``) and add the new branches."""
        raise NotImplementedError

    def init_branches(self, absorbed: nn.Module | None, init: str, gamma: float) -> None:
        """Start the new branches as ``init`` says (``gamma`` for ``"scratch"``)."""
        raise NotImplementedError

    @property
    def conv_weight(self) -> Tensor:
        """The wrapped conv's weight, which holds the block's dtype and device."""
        raise NotImplementedError

    def equivalent_kernel(self, dtype: torch.dtype | None = None) -> Kernel:
        """The weight and bias of the single conv this block equals in eval mode, differentiable, in ``dtype``
        (default: the block's)."""
        raise NotImplementedError

    def fused_kernel(self) -> Kernel:
        """``equivalent_kernel`` in float64, detached."""
        with torch.no_grad():
            return self.equivalent_kernel(torch.float64)

    def fused_has_bias(self) -> bool:
        """Whether the fused conv has a bias."""
        return True

    def fuse(self, weight: Tensor | None = None, bias: Tensor | None = None) -> nn.Module:
        """The equivalent conv, of the wrapped conv's own class (a subclass stays itself) and with its settings, in
        this block's dtype and device, holding ``fused_kernel()`` or the given (already computed) ``weight`` and
        ``bias``."""
        if weight is None or bias is None:
            weight, bias = self.fused_kernel()
        ref = self.conv_weight
        weight = weight.to(device=ref.device, dtype=ref.dtype, copy=True)
        bias = bias.to(device=ref.device, dtype=ref.dtype, copy=True) if self.fused_has_bias() else None
        conv = conv_holding(self.fuses_into, weight, bias)
        conv.train(self.training)
        return conv


class SummedBranches(ConvEquivalentBlock):
    """A block whose ``branches`` (each with a ``kernel(dtype)``), ``square`` the wrapped conv, run on the same
    input and are summed."""

    def new_branches(self, conv: nn.Module, bn: nn.Module | None, **factory) -> dict[str, nn.Module]:
        """Every branch of the block around ``conv`` and ``bn``, ``square`` (the one holding ``conv``) first."""
        raise NotImplementedError

    def build(self, conv: nn.Module, bn: nn.Module | None, layout: str) -> None:
        self.refuse(conv)
        copy_settings(self, conv)
        factory = {"device": conv.weight.device, "dtype": conv.weight.dtype}
        self.branches = nn.ModuleDict(self.new_branches(conv, bn, **factory))

    def init_branches(self, absorbed: nn.Module | None, init: str, gamma: float) -> None:
        init_new_branches(self.branches, absorbed, init, gamma)

    @property
    def conv_weight(self) -> Tensor:
        return self.branches["square"].conv.weight

    def branch_outputs(self, x: Tensor) -> Iterator[Tensor]:
        """Every branch's output for input ``x``, in order."""
        return (branch(x) for branch in self.branches.values())

    def forward(self, x: Tensor) -> Tensor:
        outputs = self.branch_outputs(x)
        out, second = next(outputs), next(outputs, None)
        if second is None:  # a single branch (MobileOne's 1x1 conv with k = 1 and no identity)
            return out
        out = out + second
        for output in outputs:
            out += output  # in place: one full-size temporary fewer, same sum
        return out

    def equivalent_kernel(self, dtype: torch.dtype | None = None) -> Kernel:
        dtype = dtype or self.conv_weight.dtype
        return sum_branches((branch.kernel(dtype) for branch in self.branches.values()), self.kernel_size)

    def extra_repr(self) -> str:
        return settings_repr(self)


class ComposedKernel(ConvEquivalentBlock):
    """A fast block: one conv per forward with the original's settings and its ``weight`` and ``bias``, the kernel
    composed from the scaled branch kernels by ``composed_weight(dtype)``; per-channel ``scale_*`` parameters."""

    def new_kernels(self, conv: nn.Conv2d, **factory) -> None:
        """Add the new branches' kernels and every branch's per-channel scale (each 1), after ``weight`` and
        ``bias``."""
        raise NotImplementedError

    def composed_weight(self, dtype: torch.dtype | None = None) -> Tensor:
        """The KxK kernel this block runs (differentiable in every weight and scale), in ``dtype`` or the weight's."""
        raise NotImplementedError

    def build(self, conv: nn.Module, bn: nn.Module | None, layout: str) -> None:
        self.refuse(conv)
        copy_settings(self, conv)
        self.explicit_padding = conv_padding(conv)
        self.weight = conv.weight
        self.register_parameter("bias", conv.bias)
        self.new_kernels(conv, device=conv.weight.device, dtype=conv.weight.dtype)

    def init_branches(self, absorbed: nn.Module | None, init: str, gamma: float) -> None:
        """``scale_square`` stays 1 (the original conv); the new branches' scales start at 0 or ``gamma``."""
        with torch.no_grad():
            for name, scale in self.named_parameters(recurse=False):
                if name.startswith("scale_") and name != "scale_square":
                    scale.fill_(0.0 if init == "preserve" else gamma)

    @property
    def conv_weight(self) -> Tensor:
        return self.weight

    def forward(self, x: Tensor) -> Tensor:
        weight = self.composed_weight()
        if self.padding_mode != "zeros":  # as nn.Conv2d does it
            x = pad_like_conv(x, self.explicit_padding, self.padding_mode)
            return F.conv2d(x, weight, self.bias, self.stride, 0, self.dilation, self.groups)
        return F.conv2d(x, weight, self.bias, self.stride, self.padding, self.dilation, self.groups)

    def equivalent_kernel(self, dtype: torch.dtype | None = None) -> Kernel:
        """The composed kernel and the conv's bias (zeros without one), differentiable, in ``dtype`` or the block's."""
        dtype = dtype or self.weight.dtype
        bias = self.weight.new_zeros(self.out_channels, dtype=dtype) if self.bias is None else self.bias.to(dtype)
        return self.composed_weight(dtype), bias

    def fused_has_bias(self) -> bool:
        """Only if the original conv had one."""
        return self.bias is not None

    def extra_repr(self) -> str:
        return settings_repr(self) + f", bias={self.bias is not None}"
