"""The Asymmetric Convolution Block (training form) and its fusion into one conv.

One class serves ``Conv2d``, ``Conv3d`` and ``ConvTranspose2d``: the branches are centred
sub-kernels of the full kernel, and only their geometry differs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..errors import ACNetError
from ..kernels import Kernel, fold_bn, sum_branches
from .registry import DEFAULT_GAMMA, INITS, ReparamBlock, register_block

LAYOUTS = ("lines", "planes")
BLOCK_CONVS = (nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d)
_LINE_NAMES = {2: ("ver", "hor"), 3: ("depth", "ver", "hor")}  # a centre line along each axis
_PLANE_NAMES = ("plane_hw", "plane_dw", "plane_dh")  # a centre plane across each axis of a 3D kernel


@dataclass(frozen=True)
class BranchGeometry:
    """How one branch reproduces its slice of the full kernel: its kernel, conv padding, input crop, output pad."""

    kernel: tuple[int, ...]
    padding: tuple[int, ...]
    crop: tuple[int, ...]
    pad: tuple[int, ...]


def resolve_padding(padding: str | Sequence[int], kernel: Sequence[int], dilation: Sequence[int]) -> tuple[int, ...]:
    """Per-axis symmetric padding of a conv with odd kernel sides ('same' and 'valid' resolved)."""
    if padding == "valid":
        return (0,) * len(kernel)
    if padding == "same":
        return tuple(d * (k - 1) // 2 for k, d in zip(kernel, dilation))
    return tuple(padding)


def branch_geometry(
    full_kernel: Sequence[int],
    branch_kernel: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    transposed: bool = False,
) -> BranchGeometry:
    """Geometry of a centred sub-kernel branch.

    A branch whose kernel is shorter along an axis sees the input shifted by
    ``dilation * (K - k) // 2`` there.  Reducing the padding by that offset reproduces
    the shift.  Where the padding is smaller than the offset, a conv crops its input
    instead (the full conv never reads those border rows through the centre line) and a
    transposed conv zero-pads its output (the centre line never writes there).
    """
    pads, crops, out_pads = [], [], []
    for full, k, p, d in zip(full_kernel, branch_kernel, padding, dilation):
        shifted = p - d * (full - k) // 2
        pads.append(max(shifted, 0))
        (out_pads if transposed else crops).append(max(-shifted, 0))
        (crops if transposed else out_pads).append(0)
    return BranchGeometry(tuple(branch_kernel), tuple(pads), tuple(crops), tuple(out_pads))


def branch_kernels(kernel: Sequence[int], layout: str = "lines") -> dict[str, tuple[int, ...]]:
    """The kernels of the asymmetric branches: a centre line along each side >= 3, or for
    ``layout="planes"`` (3D kernels with every side >= 3) the centre plane across each axis."""
    if layout not in LAYOUTS:
        raise ACNetError(f"unknown layout {layout!r}: use one of {', '.join(LAYOUTS)}")
    kernel = tuple(kernel)
    if layout == "planes" and len(kernel) == 3 and min(kernel) >= 3:
        return {name: kernel[:axis] + (1,) + kernel[axis + 1 :] for axis, name in enumerate(_PLANE_NAMES)}
    return {
        name: tuple(k if i == axis else 1 for i, k in enumerate(kernel))
        for axis, name in enumerate(_LINE_NAMES[len(kernel)])
        if kernel[axis] >= 3
    }


def describe_layout(kernel: Sequence[int], layout: str = "lines") -> str:
    """The block's branches as text, e.g. ``3x3 + 3x1 + 1x3``."""
    shapes = [tuple(kernel), *branch_kernels(kernel, layout).values()]
    return " + ".join("x".join(map(str, shape)) for shape in shapes)


def kernel_problem(kernel: Sequence[int]) -> str:
    """Why an ACBlock cannot be built around ``kernel``, or '' when it can."""
    if any(k % 2 == 0 for k in kernel):
        return "even kernel side: the branches have no centre line"
    if sum(k >= 3 for k in kernel) < 2:
        return "needs at least two kernel sides >= 3"
    return ""


class ACBranch(nn.Module):
    """One branch: optional input crop, a conv, optional output zero-pad, and a BatchNorm (or Identity)."""

    def __init__(self, conv: nn.Module, bn: nn.Module, crop: tuple[int, ...], pad: tuple[int, ...] = ()):
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

    def kernel(self, dtype: torch.dtype | None = None) -> Kernel:
        """This branch's kernel and bias with its BatchNorm folded in (in ``dtype``, else the weight's)."""
        return fold_bn(self.conv.weight.to(dtype or self.conv.weight.dtype), self.conv.bias, self.bn,
                       transposed=self.conv.transposed, groups=self.conv.groups)  # fmt: skip

    def extra_repr(self) -> str:
        parts = [f"crop={self.crop}"] if any(self.crop) else []
        return ", ".join(parts + ([f"pad={self.pad}"] if any(self.pad) else []))


class ACBlock(ReparamBlock):
    """A KxK conv plus its centre-line branches (1xK and Kx1 in 2D), each followed by a BatchNorm, outputs summed.

    Accepts everything ``nn.Conv2d`` does for kernels whose sides are odd and >= 3; ``from_conv``
    also wraps ``nn.Conv3d`` and ``nn.ConvTranspose2d``.  ``fuse()`` returns the equivalent single
    conv (with bias).
    """

    kind = "acb"
    mode = "exact"
    absorbs_bn = True

    @classmethod
    def conv_problem(cls, conv: nn.Module, layout: str = "lines") -> str:
        if not isinstance(conv, BLOCK_CONVS):
            return f"{type(conv).__name__} is not a Conv2d, Conv3d or ConvTranspose2d"
        return kernel_problem(conv.kernel_size)

    @classmethod
    def describe(cls, conv: nn.Module, layout: str = "lines") -> str:
        return describe_layout(conv.kernel_size, layout if len(conv.kernel_size) == 3 else "lines")

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
        self._build(square, bn, "lines")

    @classmethod
    def from_conv(
        cls,
        conv: nn.Module,
        bn: _BatchNorm | None = None,
        *,
        init: str = "preserve",
        gamma_init: float = DEFAULT_GAMMA,
        layout: str = "lines",
    ) -> ACBlock:
        """Wrap an existing conv (and the BatchNorm after it), keeping the conv's weights and the BN's statistics.

        ``init="preserve"`` starts the new branches with BN gamma = beta = 0, so in eval mode
        the block computes exactly what ``bn(conv(x))`` did; ``init="scratch"`` (the paper's
        setting, for training from scratch) starts every branch's gamma, the absorbed
        BatchNorm's included, at ``gamma_init``.  ``layout`` chooses the branches of a 3D
        kernel: ``"lines"`` (Kdx1x1, 1xKhx1, 1x1xKw) or ``"planes"`` (1xKhxKw, Kdx1xKw, KdxKhx1).
        """
        if init not in INITS:
            raise ACNetError(f"unknown init {init!r}: use one of {', '.join(INITS)}")
        block = cls.__new__(cls)
        nn.Module.__init__(block)
        block._build(conv, bn, layout)
        for name, branch in block.branches.items():
            if name != "square":
                with torch.no_grad():
                    branch.bn.weight.fill_(0.0 if init == "preserve" else gamma_init)
                    branch.bn.bias.zero_()
        if init == "scratch" and bn is not None and bn.weight is not None:
            with torch.no_grad():
                bn.weight.fill_(gamma_init)
        block.train(conv.training)
        return block

    def _build(self, square: nn.Module, bn: _BatchNorm | None, layout: str) -> None:
        """Set up the branches around ``square`` (whose weights are kept as they are)."""
        kinds = [c for c in BLOCK_CONVS if isinstance(square, c)]
        if not kinds:
            raise ACNetError(f"ACBlock wraps Conv2d, Conv3d or ConvTranspose2d, got {type(square).__name__}")
        problem = kernel_problem(square.kernel_size)
        if problem:
            raise ACNetError(f"ACBlock needs odd kernel sides, at least two of them >= 3: {square.kernel_size} ({problem})")
        self.conv_type, self.layout = kinds[0], layout
        self.in_channels, self.out_channels = square.in_channels, square.out_channels
        self.kernel_size, self.stride, self.dilation = square.kernel_size, square.stride, square.dilation
        self.padding, self.groups, self.padding_mode = square.padding, square.groups, square.padding_mode
        self.transposed, self.output_padding = square.transposed, square.output_padding
        padding = resolve_padding(square.padding, square.kernel_size, square.dilation)
        factory = {"device": square.weight.device, "dtype": square.weight.dtype}
        no_crop = (0,) * len(square.kernel_size)
        branches = {"square": ACBranch(square, bn if bn is not None else nn.Identity(), no_crop, no_crop)}
        for name, kernel in branch_kernels(square.kernel_size, layout).items():
            geo = branch_geometry(square.kernel_size, kernel, padding, square.dilation, square.transposed)
            conv = self.conv_type(**self._conv_args(kernel=geo.kernel, padding=geo.padding, bias=False), **factory)
            branches[name] = ACBranch(conv, _branch_bn(bn, square, **factory), geo.crop, geo.pad)
        self.branches = nn.ModuleDict(branches)

    def _conv_args(self, **override) -> dict:
        """Constructor arguments of a conv like this block's square one, with ``override`` applied."""
        args = {
            "in_channels": self.in_channels, "out_channels": self.out_channels, "kernel_size": self.kernel_size,
            "stride": self.stride, "padding": self.padding, "dilation": self.dilation, "groups": self.groups,
            "padding_mode": self.padding_mode, "bias": True,
        }  # fmt: skip
        if self.transposed:
            args["output_padding"] = self.output_padding
        args.update({"kernel_size" if k == "kernel" else k: v for k, v in override.items()})
        return args

    def forward(self, x: Tensor) -> Tensor:
        branches = iter(self.branches.values())
        out = next(branches)(x) + next(branches)(x)
        for branch in branches:
            out += branch(x)  # in place: one full-size temporary fewer, same sum
        return out

    def equivalent_kernel(self) -> Kernel:
        """The single kernel and bias equivalent to this block in eval mode (differentiable, in its dtype)."""
        return sum_branches((branch.kernel() for branch in self.branches.values()), self.kernel_size)

    def fused_kernel(self) -> Kernel:
        """The single kernel and bias (float64) equivalent to this block in eval mode."""
        with torch.no_grad():
            return sum_branches((branch.kernel(torch.float64) for branch in self.branches.values()), self.kernel_size)

    def fuse(self, weight: Tensor | None = None, bias: Tensor | None = None) -> nn.Module:
        """The equivalent conv (same class as the wrapped one, with bias), in this block's dtype and device.

        ``weight``/``bias`` may pass an already computed ``fused_kernel()``.
        """
        if weight is None or bias is None:
            weight, bias = self.fused_kernel()
        ref = self.branches["square"].conv.weight
        conv = torch.nn.utils.skip_init(self.conv_type, **self._conv_args(), device=ref.device, dtype=ref.dtype)
        with torch.no_grad():
            conv.weight.copy_(weight)
            conv.bias.copy_(bias)
        conv.train(self.training)
        return conv

    def extra_repr(self) -> str:
        extra = f", output_padding={self.output_padding}" if self.transposed else ""
        return (
            f"{self.conv_type.__name__}({self.in_channels}, {self.out_channels}), "
            f"branches={describe_layout(self.kernel_size, self.layout)}, stride={self.stride}, "
            f"padding={self.padding}, dilation={self.dilation}, groups={self.groups}, "
            f"padding_mode={self.padding_mode}{extra}"
        )


def _branch_bn(absorbed: _BatchNorm | None, square: nn.Module, **factory) -> _BatchNorm:
    """A fresh affine BatchNorm for a new branch: class, eps and momentum follow the absorbed one, if any."""
    channels = square.out_channels
    plain = nn.BatchNorm3d if isinstance(square, nn.Conv3d) else nn.BatchNorm2d
    if absorbed is None:
        return plain(channels, **factory)
    cls = nn.SyncBatchNorm if isinstance(absorbed, nn.SyncBatchNorm) else plain
    return cls(channels, eps=absorbed.eps, momentum=absorbed.momentum, **factory)


register_block("acb", ACBlock)
