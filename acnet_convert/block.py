"""The Asymmetric Convolution Block (training form) and its fusion into one conv."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from .errors import ACNetError
from .kernels import Kernel, fold_bn, sum_branches

INITS = ("preserve", "scratch")


@dataclass(frozen=True)
class BranchGeometry:
    """How one branch reproduces its slice of the full kernel: its kernel, conv padding and input crop."""

    kernel: tuple[int, ...]
    padding: tuple[int, ...]
    crop: tuple[int, ...]


def resolve_padding(padding: str | Sequence[int], kernel: Sequence[int], dilation: Sequence[int]) -> tuple[int, ...]:
    """Per-axis symmetric padding of a conv with odd kernel sides ('same' and 'valid' resolved)."""
    if padding == "valid":
        return (0,) * len(kernel)
    if padding == "same":
        return tuple(d * (k - 1) // 2 for k, d in zip(kernel, dilation))
    return tuple(padding)


def branch_geometry(
    full_kernel: Sequence[int], branch_kernel: Sequence[int], padding: Sequence[int], dilation: Sequence[int]
) -> BranchGeometry:
    """Geometry of a centred sub-kernel branch.

    A branch whose kernel is shorter along an axis sees the input shifted by
    ``dilation * (K - k) // 2`` there.  Reducing the padding by that offset reproduces
    the shift; where the padding is smaller than the offset the input is cropped
    instead (the full conv never reads those border rows through the centre line).
    """
    pads, crops = [], []
    for full, k, p, d in zip(full_kernel, branch_kernel, padding, dilation):
        shifted = p - d * (full - k) // 2
        pads.append(max(shifted, 0))
        crops.append(max(-shifted, 0))
    return BranchGeometry(tuple(branch_kernel), tuple(pads), tuple(crops))


class ACBranch(nn.Module):
    """One branch: optional input crop, a conv, and a BatchNorm (or Identity)."""

    def __init__(self, conv: nn.Conv2d, bn: nn.Module, crop: tuple[int, ...]):
        super().__init__()
        self.conv = conv
        self.bn = bn
        self.crop = crop

    def forward(self, x: Tensor) -> Tensor:
        if any(self.crop):
            x = x[(..., *(slice(c, size - c) for c, size in zip(self.crop, x.shape[-len(self.crop) :])))]
        return self.bn(self.conv(x))

    def kernel(self) -> Kernel:
        """This branch's kernel and bias with its BatchNorm folded in (float64)."""
        return fold_bn(self.conv.weight, self.conv.bias, self.bn)

    def extra_repr(self) -> str:
        return f"crop={self.crop}" if any(self.crop) else ""


class ACBlock(nn.Module):
    """KxK, 1xK and Kx1 convs, each followed by a BatchNorm, outputs summed.

    Accepts everything ``nn.Conv2d`` does for kernels whose sides are odd and >= 3.
    ``fuse()`` returns the equivalent single ``nn.Conv2d`` (with bias).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: str | int | tuple[int, int] = 0,
        dilation: int | tuple[int, int] = 1,
        groups: int = 1,
        bias: bool = False,
        padding_mode: str = "zeros",
        *,
        square_bn: bool = True,
        bn_eps: float = 1e-5,
        bn_momentum: float | None = 0.1,
        device=None,
        dtype=None,
    ):
        super().__init__()
        square = nn.Conv2d(
            in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias, padding_mode, device, dtype
        )
        bn = nn.BatchNorm2d(out_channels, bn_eps, bn_momentum, device=device, dtype=dtype) if square_bn else None
        self._build(square, bn)

    @classmethod
    def from_conv(
        cls, conv: nn.Conv2d, bn: _BatchNorm | None = None, *, init: str = "preserve", gamma_init: float = 1.0
    ) -> ACBlock:
        """Wrap an existing conv (and the BatchNorm after it) without changing their weights.

        ``init="preserve"`` starts the new branches with BN gamma = beta = 0, so in eval mode
        the block computes exactly what ``bn(conv(x))`` did; ``init="scratch"`` starts them
        with gamma = ``gamma_init`` as in the paper.
        """
        if init not in INITS:
            raise ACNetError(f"unknown init {init!r}: use one of {', '.join(INITS)}")
        block = cls.__new__(cls)
        nn.Module.__init__(block)
        block._build(conv, bn)
        for name in ("hor", "ver"):
            new_bn = block.branches[name].bn
            with torch.no_grad():
                new_bn.weight.fill_(0.0 if init == "preserve" else gamma_init)
                new_bn.bias.zero_()
        block.train(conv.training)
        return block

    def _build(self, square: nn.Conv2d, bn: _BatchNorm | None) -> None:
        """Set up the three branches around ``square`` (whose weights are kept as they are)."""
        kh, kw = square.kernel_size
        if kh % 2 == 0 or kw % 2 == 0 or kh < 3 or kw < 3:
            raise ACNetError(f"ACBlock needs odd kernel sides >= 3, got {square.kernel_size}")
        self.in_channels, self.out_channels = square.in_channels, square.out_channels
        self.kernel_size, self.stride, self.dilation = square.kernel_size, square.stride, square.dilation
        self.padding, self.groups, self.padding_mode = square.padding, square.groups, square.padding_mode
        padding = resolve_padding(square.padding, square.kernel_size, square.dilation)
        factory = {"device": square.weight.device, "dtype": square.weight.dtype}
        branches = {"square": ACBranch(square, bn if bn is not None else nn.Identity(), (0, 0))}
        for name, kernel in (("hor", (1, kw)), ("ver", (kh, 1))):
            geo = branch_geometry(square.kernel_size, kernel, padding, square.dilation)
            conv = nn.Conv2d(
                square.in_channels, square.out_channels, geo.kernel, square.stride, geo.padding,
                square.dilation, square.groups, False, square.padding_mode, **factory,
            )  # fmt: skip
            branches[name] = ACBranch(conv, _branch_bn(bn, square.out_channels, **factory), geo.crop)
        self.branches = nn.ModuleDict(branches)

    def forward(self, x: Tensor) -> Tensor:
        square, hor, ver = self.branches.values()
        out = square(x) + hor(x)
        out += ver(x)  # in place: one full-size temporary fewer, same sum
        return out

    def fused_kernel(self) -> Kernel:
        """The single kernel and bias (float64) equivalent to this block in eval mode."""
        return sum_branches((branch.kernel() for branch in self.branches.values()), self.kernel_size)

    def fuse(self, weight: Tensor | None = None, bias: Tensor | None = None) -> nn.Conv2d:
        """The equivalent ``nn.Conv2d(bias=True)``, in this block's dtype and device.

        ``weight``/``bias`` may pass an already computed ``fused_kernel()``.
        """
        if weight is None or bias is None:
            weight, bias = self.fused_kernel()
        ref = self.branches["square"].conv.weight
        conv = torch.nn.utils.skip_init(
            nn.Conv2d, self.in_channels, self.out_channels, self.kernel_size, self.stride, self.padding,
            self.dilation, self.groups, True, self.padding_mode, device=ref.device, dtype=ref.dtype,
        )  # fmt: skip
        with torch.no_grad():
            conv.weight.copy_(weight)
            conv.bias.copy_(bias)
        conv.train(self.training)
        return conv

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding}, dilation={self.dilation}, groups={self.groups}, padding_mode={self.padding_mode}"
        )


def _branch_bn(absorbed: _BatchNorm | None, channels: int, **factory) -> _BatchNorm:
    """A fresh affine BatchNorm for a new branch: class, eps and momentum follow the absorbed one, if any."""
    if absorbed is None:
        return nn.BatchNorm2d(channels, **factory)
    cls = nn.SyncBatchNorm if isinstance(absorbed, nn.SyncBatchNorm) else nn.BatchNorm2d
    return cls(channels, eps=absorbed.eps, momentum=absorbed.momentum, **factory)
