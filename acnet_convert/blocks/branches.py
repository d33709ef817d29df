"""What the Conv2d block kinds beyond ACB share: settings, branch modules, and the block whose branches are summed."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from .acb import ACBranch, branch_geometry, resolve_padding
from ..errors import ACNetError
from ..kernels import Kernel, fold_bn, identity_kernel, sum_branches
from .registry import INITS, ReparamBlock

_SETTINGS = ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups", "padding_mode")


def plain_conv_problem(conv: nn.Module) -> str:
    """Why a block that adds 1x1-centred branches cannot wrap ``conv``, or '' when it can."""
    if type(conv) is not nn.Conv2d:
        return f"{type(conv).__name__} is not a plain nn.Conv2d"
    if any(k % 2 == 0 for k in conv.kernel_size):
        return "even kernel side: the kernel has no centre tap"
    if max(conv.kernel_size) == 1:
        return "1x1 conv: the branches would add nothing a 1x1 kernel cannot hold"
    return ""


def has_identity(conv: nn.Module) -> bool:
    """Whether an identity branch fits ``conv``: as many outputs as inputs and stride 1."""
    return conv.in_channels == conv.out_channels and tuple(conv.stride) == (1, 1)


def check_conv(cls: type[ReparamBlock], conv: nn.Module, init: str) -> None:
    """Raise ``ACNetError`` when ``cls`` cannot wrap ``conv`` or ``init`` is unknown."""
    if init not in INITS:
        raise ACNetError(f"unknown init {init!r}: use one of {', '.join(INITS)}")
    problem = cls.conv_problem(conv)
    if problem:
        raise ACNetError(f"{cls.__name__} cannot wrap this conv ({problem}): use another block kind for it")


def copy_settings(block: nn.Module, conv: nn.Conv2d) -> None:
    """Give ``block`` the settings attributes of ``conv`` that the rest of the package reads."""
    for name in _SETTINGS:
        setattr(block, name, getattr(conv, name))


def new_bn(absorbed: nn.Module | None, channels: int, **factory) -> _BatchNorm:
    """A fresh BatchNorm2d for a new branch: class, eps and momentum follow the absorbed one, if any."""
    if not isinstance(absorbed, _BatchNorm):
        return nn.BatchNorm2d(channels, **factory)
    cls = nn.SyncBatchNorm if isinstance(absorbed, nn.SyncBatchNorm) else nn.BatchNorm2d
    return cls(channels, eps=absorbed.eps, momentum=absorbed.momentum, **factory)


def set_affine(bn: nn.Module, gamma: float, beta: float | None = None) -> None:
    """Fill an affine BatchNorm's gamma (and beta, if given); other modules are left alone."""
    if isinstance(bn, _BatchNorm) and bn.affine:
        with torch.no_grad():
            bn.weight.fill_(gamma)
            if beta is not None:
                bn.bias.fill_(beta)


def pointwise_branch(conv: nn.Conv2d, bn: nn.Module, **factory) -> ACBranch:
    """A 1x1 conv and ``bn`` aligned on the centre tap of ``conv``'s kernel (padding reduced or input cropped)."""
    geo = branch_geometry(conv.kernel_size, (1, 1), conv_padding(conv), conv.dilation)
    pointwise = nn.Conv2d(conv.in_channels, conv.out_channels, 1, conv.stride, geo.padding, groups=conv.groups,
                          bias=False, padding_mode=conv.padding_mode, **factory)  # fmt: skip
    return ACBranch(pointwise, bn, geo.crop)


def conv_padding(conv: nn.Module) -> tuple[int, int]:
    """The symmetric padding ``conv`` applies on each axis ('same' and 'valid' resolved)."""
    return resolve_padding(conv.padding, conv.kernel_size, conv.dilation)


def pad_like_conv(x: Tensor, padding: tuple[int, int], padding_mode: str) -> Tensor:
    """``x`` padded as a conv with ``padding_mode`` pads its input."""
    if not any(padding):
        return x
    pads = (padding[1], padding[1], padding[0], padding[0])
    return F.pad(x, pads) if padding_mode == "zeros" else F.pad(x, pads, mode=padding_mode)


class IdentityBranch(nn.Module):
    """The input itself, aligned on the kernel's centre tap (cropped or padded as the conv pads), then a norm."""

    def __init__(self, conv: nn.Conv2d, bn: nn.Module):
        super().__init__()
        geo = branch_geometry(conv.kernel_size, (1, 1), conv_padding(conv), conv.dilation)
        self.crop, self.pad, self.padding_mode = geo.crop, geo.padding, conv.padding_mode
        eye = identity_kernel(conv.in_channels, conv.in_channels, conv.groups, dtype=conv.weight.dtype,
                              device=conv.weight.device)  # fmt: skip
        self.register_buffer("eye", eye, persistent=False)
        self.bn = bn

    def forward(self, x: Tensor) -> Tensor:
        x = x[(..., *(slice(c, -c if c else None) for c in self.crop))]
        return self.bn(pad_like_conv(x, self.pad, self.padding_mode))

    def kernel(self, dtype: torch.dtype) -> Kernel:
        """This branch's 1x1 kernel and bias with its norm folded in."""
        return fold_bn(self.eye.to(dtype), None, self.bn)

    def extra_repr(self) -> str:
        return ", ".join([f"crop={self.crop}"] * any(self.crop) + [f"pad={self.pad}"] * any(self.pad))


def fused_conv(block: ReparamBlock, weight: Tensor, bias: Tensor | None, ref: Tensor) -> nn.Conv2d:
    """A plain ``nn.Conv2d`` with ``block``'s settings holding ``weight`` (and ``bias``), ``ref``'s device and dtype."""
    conv = torch.nn.utils.skip_init(
        nn.Conv2d, block.in_channels, block.out_channels, block.kernel_size, block.stride, block.padding,
        block.dilation, block.groups, bias is not None, block.padding_mode, device=ref.device, dtype=ref.dtype,
    )  # fmt: skip
    with torch.no_grad():
        conv.weight.copy_(weight)
        if bias is not None:
            conv.bias.copy_(bias)
    conv.train(block.training)
    return conv


def fast_conv(block: ReparamBlock, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """Run ``block``'s single conv with ``weight`` on ``x``, padding as the original conv does."""
    if block.padding_mode != "zeros":
        x = pad_like_conv(x, block.explicit_padding, block.padding_mode)
        return F.conv2d(x, weight, bias, block.stride, 0, block.dilation, block.groups)
    return F.conv2d(x, weight, bias, block.stride, block.padding, block.dilation, block.groups)


def scaled(weight: Tensor, scale: Tensor) -> Tensor:
    """``weight`` with each output channel multiplied by its entry of ``scale``."""
    return weight * scale.reshape(-1, 1, 1, 1)


def settings_repr(block: ReparamBlock) -> str:
    """The conv settings of ``block`` as ``extra_repr`` text."""
    return ", ".join(f"{name}={getattr(block, name)}" for name in _SETTINGS)


def init_new_branches(branches: dict[str, nn.Module], absorbed: nn.Module | None, init: str, gamma: float) -> None:
    """Every branch but ``square`` starts at zero (``"preserve"``) or with gamma ``gamma`` (``"scratch"``, which
    also sets the absorbed BatchNorm's gamma)."""
    for name, branch in branches.items():
        if name != "square":
            set_affine(branch.bn, 0.0 if init == "preserve" else gamma, 0.0)
    if init == "scratch" and absorbed is not None:
        set_affine(absorbed, gamma)


class SummedBranches(ReparamBlock):
    """A block whose ``branches`` (each with a ``kernel(dtype)``) run on the same input and are summed."""

    def forward(self, x: Tensor) -> Tensor:
        branches = iter(self.branches.values())
        out = next(branches)(x)
        for branch in branches:
            out = out + branch(x)
        return out

    def _kernel(self, dtype: torch.dtype) -> Kernel:
        return sum_branches((branch.kernel(dtype) for branch in self.branches.values()), self.kernel_size)

    def equivalent_kernel(self) -> Kernel:
        """The kernel and bias of the single conv this block equals in eval mode (differentiable, its dtype)."""
        return self._kernel(self.branches["square"].conv.weight.dtype)

    def fused_kernel(self) -> Kernel:
        """``equivalent_kernel`` in float64, detached."""
        with torch.no_grad():
            return self._kernel(torch.float64)

    def fuse(self, weight: Tensor | None = None, bias: Tensor | None = None) -> nn.Conv2d:
        """The equivalent ``nn.Conv2d`` (with bias), or one holding the given ``weight`` and ``bias``."""
        if weight is None or bias is None:
            weight, bias = self.fused_kernel()
        return fused_conv(self, weight, bias, self.branches["square"].conv.weight)

    def extra_repr(self) -> str:
        return settings_repr(self)


class ComposedKernel(ReparamBlock):
    """A fast block: one conv per forward with the original's settings, its kernel from ``composed_weight(dtype)``."""

    def composed_weight(self, dtype: torch.dtype | None = None) -> Tensor:
        """The KxK kernel this block runs (differentiable in every weight and scale), in ``dtype`` or the weight's."""
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        return fast_conv(self, x, self.composed_weight(), self.bias)

    def _kernel(self, dtype: torch.dtype) -> Kernel:
        bias = self.weight.new_zeros(self.out_channels, dtype=dtype) if self.bias is None else self.bias.to(dtype)
        return self.composed_weight(dtype), bias

    def equivalent_kernel(self) -> Kernel:
        """The composed kernel and the conv's bias (zeros without one), differentiable, in the block's dtype."""
        return self._kernel(self.weight.dtype)

    def fused_kernel(self) -> Kernel:
        """``equivalent_kernel`` in float64, detached."""
        with torch.no_grad():
            return self._kernel(torch.float64)

    def fuse(self, weight: Tensor | None = None, bias: Tensor | None = None) -> nn.Conv2d:
        """The equivalent ``nn.Conv2d``, with a bias only if the original conv had one."""
        if weight is None or bias is None:
            weight, bias = self.fused_kernel()
        return fused_conv(self, weight, None if self.bias is None else bias, self.weight)

    def extra_repr(self) -> str:
        return settings_repr(self) + f", bias={self.bias is not None}"
