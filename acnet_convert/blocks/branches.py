"""The branches an exact block sums: a conv and its norm, the input itself, and how new branches start."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..kernels import Kernel, fold_bn, identity_kernel
from .geometry import branch_geometry, conv_padding, pad_like_conv


def conv2d_problem(conv: nn.Module) -> str:
    """Why ``conv`` is not a Conv2d that computes Conv2d's convolution (a subclass may add attributes), or ''."""
    if not isinstance(conv, nn.Conv2d):
        return f"{type(conv).__name__} is not a plain nn.Conv2d"
    if overrides_forward(conv, nn.Conv2d):
        return f"{type(conv).__name__} overrides forward(): the block would compute the plain convolution instead"
    return ""


def plain_conv_problem(conv: nn.Module) -> str:
    """Why a block that adds 1x1-centred branches cannot wrap ``conv``, or '' when it can."""
    if problem := conv2d_problem(conv):
        return problem
    if any(k % 2 == 0 for k in conv.kernel_size):
        return "even kernel side: the kernel has no centre tap"
    if max(conv.kernel_size) == 1:
        return "1x1 conv: the branches would add nothing a 1x1 kernel cannot hold"
    return ""


def overrides_forward(conv: nn.Module, base: type[nn.Module]) -> bool:
    """Whether ``conv``'s class computes something else than ``base``'s convolution (its own ``forward``)."""
    return any(getattr(type(conv), m, None) is not getattr(base, m, None) for m in ("forward", "_conv_forward"))


def has_identity(conv: nn.Module) -> bool:
    """Whether an identity branch fits ``conv``: as many outputs as inputs and stride 1."""
    return conv.in_channels == conv.out_channels and tuple(conv.stride) == (1, 1)


class ConvBranch(nn.Module):
    """One branch: optional input crop, a conv, optional output zero-pad, and a BatchNorm (or Identity)."""

    def __init__(self, conv: nn.Module, bn: nn.Module, crop: tuple[int, ...] = (), pad: tuple[int, ...] = ()):
        super().__init__()
        self.conv = conv
        self.bn = bn
        self.crop = crop
        self.pad = pad

    def forward(self, x: Tensor) -> Tensor:
        if any(self.crop):
            x = x[(..., *(slice(c, -c or None) for c in self.crop))]
        y = self.conv(x)
        if any(self.pad):  # before the BN, so that the BN's bias lands there too, as in the fused conv
            y = F.pad(y, [p for p in reversed(self.pad) for _ in range(2)])
        return self.bn(y)

    def kernel(self, dtype: torch.dtype) -> Kernel:
        """This branch's weight and bias with its BatchNorm folded in, in ``dtype``."""
        return fold_bn(self.conv.weight.to(dtype), self.conv.bias, self.bn, transposed=self.conv.transposed,
                       groups=self.conv.groups)  # fmt: skip

    def extra_repr(self) -> str:
        parts = [f"crop={self.crop}"] if any(self.crop) else []
        return ", ".join(parts + ([f"pad={self.pad}"] if any(self.pad) else []))


def pointwise_branch(conv: nn.Conv2d, bn: nn.Module, **factory) -> ConvBranch:
    """A 1x1 conv and ``bn`` aligned on the centre tap of ``conv``'s kernel (padding reduced or input cropped)."""
    geo = branch_geometry(conv.kernel_size, (1, 1), conv_padding(conv), conv.dilation)
    pointwise = nn.Conv2d(conv.in_channels, conv.out_channels, 1, conv.stride, geo.padding, groups=conv.groups,
                          bias=False, padding_mode=conv.padding_mode, **factory)  # fmt: skip
    return ConvBranch(pointwise, bn, geo.crop)


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
        """This branch's 1x1 weight and bias with its norm folded in."""
        return fold_bn(self.eye.to(dtype), None, self.bn)

    def extra_repr(self) -> str:
        return ", ".join([f"crop={self.crop}"] * any(self.crop) + [f"pad={self.pad}"] * any(self.pad))


def new_bn(absorbed: nn.Module | None, channels: int, *, dims: int = 2, **factory) -> _BatchNorm:
    """A fresh BatchNorm (``dims`` spatial dimensions) for a new branch: class, eps and momentum follow the absorbed
    one, if any."""
    plain = nn.BatchNorm3d if dims == 3 else nn.BatchNorm2d
    if not isinstance(absorbed, _BatchNorm):
        return plain(channels, **factory)
    cls = nn.SyncBatchNorm if isinstance(absorbed, nn.SyncBatchNorm) else plain
    return cls(channels, eps=absorbed.eps, momentum=absorbed.momentum, **factory)


def set_affine(bn: nn.Module, gamma: float, beta: float | None = None) -> None:
    """Fill an affine BatchNorm's gamma (and beta, if given); other modules are left alone."""
    if isinstance(bn, _BatchNorm) and bn.affine:
        with torch.no_grad():
            bn.weight.fill_(gamma)
            if beta is not None:
                bn.bias.fill_(beta)


def init_new_branches(branches: nn.ModuleDict, absorbed: nn.Module | None, init: str, gamma: float) -> None:
    """Every branch but ``square`` starts at zero (``"preserve"``) or with gamma ``gamma`` (``"scratch"``, which
    also sets the absorbed BatchNorm's gamma)."""
    for name, branch in branches.items():
        if name != "square":
            set_affine(branch.bn, 0.0 if init == "preserve" else gamma, 0.0)
    if init == "scratch" and absorbed is not None:
        set_affine(absorbed, gamma)
