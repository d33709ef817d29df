"""The Asymmetric Convolution Block: exact (``ACBlock``, a BatchNorm on every branch) and fast (``FastACBlock``).

``ACBlock`` serves ``Conv2d``, ``Conv3d`` and ``ConvTranspose2d``: the branches are centred sub-kernels of the
full kernel, and only their geometry differs.  ``FastACBlock`` composes the KxK kernel from scaled KxK, 1xK and Kx1
kernels every forward and runs one ``Conv2d``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..errors import ACNetError
from ..kernels import scaled
from .branches import ConvBranch, new_bn, overrides_forward
from .forms import ComposedKernel, SummedBranches, conv_args
from .geometry import BLOCK_CONVS, branch_geometry, branch_kernels, conv_padding, describe_layout, kernel_problem


class ACBlock(SummedBranches):
    """A KxK conv plus its centre-line branches (1xK and Kx1 in 2D), each followed by a BatchNorm, outputs summed.

    Accepts everything ``nn.Conv2d`` does for kernels whose sides are odd and >= 3; ``from_conv`` also wraps
    ``nn.Conv3d`` and ``nn.ConvTranspose2d``, and ``layout`` chooses the branches of a 3D kernel: ``"lines"``
    (Kdx1x1, 1xKhx1, 1x1xKw) or ``"planes"`` (1xKhxKw, Kdx1xKw, KdxKhx1).  ``init="preserve"`` starts the new
    branches' BatchNorms with gamma = beta = 0; ``init="scratch"`` (the paper's setting) starts every branch's
    gamma, the absorbed BatchNorm's included, at ``gamma_init``.  ``fuse()`` returns the equivalent single conv
    (with bias).
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

    @classmethod
    def refuse(cls, conv: nn.Module) -> None:
        if not isinstance(conv, BLOCK_CONVS):
            raise ACNetError(f"ACBlock wraps Conv2d, Conv3d or ConvTranspose2d, got {type(conv).__name__}")
        problem = kernel_problem(conv.kernel_size)
        if problem:
            raise ACNetError(
                f"ACBlock needs odd kernel sides, at least two of them >= 3: {conv.kernel_size} ({problem})"
            )

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
        self.build(square, bn, "lines")

    def build(self, conv: nn.Module, bn: nn.Module | None, layout: str) -> None:
        self.layout = layout
        super().build(conv, bn, layout)

    def new_branches(self, conv: nn.Module, bn: nn.Module | None, **factory) -> dict[str, nn.Module]:
        padding = conv_padding(conv)
        branches = {"square": ConvBranch(conv, bn if bn is not None else nn.Identity())}
        for name, kernel in branch_kernels(conv.kernel_size, self.layout).items():
            geo = branch_geometry(conv.kernel_size, kernel, padding, conv.dilation, conv.transposed)
            line = self.conv_type(**conv_args(self, kernel_size=geo.kernel, padding=geo.padding, bias=False), **factory)
            norm = new_bn(bn, conv.out_channels, dims=len(conv.kernel_size), **factory)
            branches[name] = ConvBranch(line, norm, geo.crop, geo.pad)
        return branches

    def extra_repr(self) -> str:
        extra = f", output_padding={self.output_padding}" if self.conv_type is nn.ConvTranspose2d else ""
        return (
            f"{self.conv_type.__name__}({self.in_channels}, {self.out_channels}), "
            f"branches={describe_layout(self.kernel_size, self.layout)}, stride={self.stride}, "
            f"padding={self.padding}, dilation={self.dilation}, groups={self.groups}, "
            f"padding_mode={self.padding_mode}{extra}"
        )


class FastACBlock(ComposedKernel):
    """A conv whose KxK kernel is composed, every forward, from scaled KxK, 1xK and Kx1 kernels.

    ``kernel = scale_square * weight + row(scale_hor * weight_hor) + column(scale_ver * weight_ver)``
    with one learnable scale per output channel and branch.  This is the linearised (OREPA-style)
    variant of ACNet, not the paper's block: the branches have no BatchNorm of their own, the
    BatchNorm after the conv stays in the model, and each forward runs a single conv with the
    original conv's settings.  ``from_conv`` keeps the conv's weight and bias (the same Parameters);
    ``init="preserve"`` starts ``scale_hor`` and ``scale_ver`` at 0, ``init="scratch"`` at ``gamma_init``.
    ``fuse()`` returns the conv as a plain ``nn.Conv2d``.
    """

    kind = "acb"
    mode = "fast"
    absorbs_bn = False

    @classmethod
    def conv_problem(cls, conv: nn.Module, layout: str = "lines") -> str:
        if not isinstance(conv, nn.Conv2d) or overrides_forward(conv, nn.Conv2d):
            return "fast mode converts Conv2d only"
        kh, kw = conv.kernel_size
        if kh % 2 == 0 or kw % 2 == 0:
            return "even kernel side: the branches have no centre line"
        if kh < 3 or kw < 3:
            return "fast mode needs both kernel sides >= 3"
        return ""

    @classmethod
    def describe(cls, conv: nn.Module, layout: str = "lines") -> str:
        kh, kw = conv.kernel_size
        return f"{kh}x{kw} + 1x{kw} + {kh}x1 (composed)"

    @classmethod
    def refuse(cls, conv: nn.Module) -> None:
        kh, kw = conv.kernel_size
        if kh % 2 == 0 or kw % 2 == 0 or kh < 3 or kw < 3:
            raise ACNetError(f"FastACBlock needs odd kernel sides >= 3, got {conv.kernel_size}")

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1, padding: str | int | tuple[int, int] = 0,
        dilation: int | tuple[int, int] = 1, groups: int = 1, bias: bool = False, padding_mode: str = "zeros", *,
        device=None, dtype=None,
    ):  # fmt: skip
        """A block from scratch with ``nn.Conv2d``'s arguments: every scale 1 (``init="scratch"``, gamma 1)."""
        super().__init__()
        self.build(nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
                             padding_mode, device, dtype), None, "lines")  # fmt: skip

    def new_kernels(self, conv: nn.Conv2d, **factory) -> None:
        kh, kw = conv.kernel_size
        for name, kernel in (("weight_hor", (1, kw)), ("weight_ver", (kh, 1))):
            template = nn.Conv2d(conv.in_channels, conv.out_channels, kernel, groups=conv.groups, bias=False, **factory)
            setattr(self, name, template.weight)  # the default Conv2d initialisation, as in exact mode
        for name in ("scale_square", "scale_hor", "scale_ver"):
            setattr(self, name, nn.Parameter(torch.ones(conv.out_channels, **factory)))

    def composed_weight(self, dtype: torch.dtype | None = None) -> Tensor:
        tensors = (self.weight, self.weight_hor, self.weight_ver, self.scale_square, self.scale_hor, self.scale_ver)
        if isinstance(self.weight, torch.fx.Proxy):  # symbolic tracing records the plain operations instead
            return compose_kernel(tensors, self.kernel_size)
        return _ComposeKernel.apply(self.kernel_size, *(t if dtype is None else t.to(dtype) for t in tensors))


def compose_kernel(kernels_and_scales: tuple[Tensor, ...], kernel_size: tuple[int, int]) -> Tensor:
    """``scale_square * weight`` with the scaled 1xK and Kx1 kernels added at its centre row and column.

    ``kernels_and_scales`` is ``(weight, weight_hor, weight_ver, scale_square, scale_hor, scale_ver)``.
    """
    weight, weight_hor, weight_ver, scale_square, scale_hor, scale_ver = kernels_and_scales
    row, column = _centre_lines(kernel_size)
    kernel = scaled(weight, scale_square)
    kernel[row].addcmul_(weight_hor, scale_hor.reshape(-1, 1, 1, 1))
    kernel[column].addcmul_(weight_ver, scale_ver.reshape(-1, 1, 1, 1))
    return kernel


def compose_kernel_backward(grad_kernel: Tensor, kernels_and_scales: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    """The gradients of ``compose_kernel``'s inputs, in their order, given the gradient of its output."""
    weights, scales = kernels_and_scales[:3], kernels_and_scales[3:]
    grad_weights, grad_scales = [], []
    for weight, scale, where in zip(weights, scales, ((...,), *_centre_lines(grad_kernel.shape[2:]))):
        g = grad_kernel[where]
        grad_weights.append(scaled(g, scale))
        grad_scales.append((g * weight).sum((1, 2, 3)))
    return (*grad_weights, *grad_scales)


class _ComposeKernel(torch.autograd.Function):
    """``compose_kernel`` with its backward written out: autograd through the in-place adds would copy the
    kernel's gradient once per add.  The backward is made of differentiable operations (double backward
    works), and ``torch.func.vmap`` runs it per sample."""

    generate_vmap_rule = True

    @staticmethod
    def forward(kernel_size: tuple[int, int], *kernels_and_scales: Tensor) -> Tensor:
        return compose_kernel(kernels_and_scales, kernel_size)

    @staticmethod
    def setup_context(ctx, inputs: tuple, output: Tensor) -> None:
        ctx.kernel_size, *kernels_and_scales = inputs
        ctx.save_for_backward(*kernels_and_scales)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return None, *compose_kernel_backward(grad, ctx.saved_tensors)


def _centre_lines(kernel_size: tuple[int, int]) -> tuple[tuple, tuple]:
    """The indices of a kernel's centre row and centre column (odd sides)."""
    kh, kw = kernel_size
    return (..., slice(kh // 2, kh // 2 + 1), slice(None)), (..., slice(None), slice(kw // 2, kw // 2 + 1))
