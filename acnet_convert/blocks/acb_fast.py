"""The fast block: ACNet linearised, so that training runs one conv per block."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .acb import resolve_padding
from ..errors import ACNetError
from ..kernels import Kernel, sum_branches
from .registry import DEFAULT_GAMMA, INITS, ReparamBlock, register_block


class FastACBlock(ReparamBlock):
    """A conv whose KxK kernel is composed, every forward, from scaled KxK, 1xK and Kx1 kernels.

    ``kernel = scale_square * weight + row(scale_hor * weight_hor) + column(scale_ver * weight_ver)``
    with one learnable scale per output channel and branch.  This is the linearised (OREPA-style)
    variant of ACNet, not the paper's block: the branches have no BatchNorm of their own, the
    BatchNorm after the conv stays in the model, and each forward runs a single conv with the
    original conv's settings.  ``fuse()`` returns that conv as a plain ``nn.Conv2d``.
    """

    kind = "acb"
    mode = "fast"
    absorbs_bn = False

    @classmethod
    def conv_problem(cls, conv: nn.Module, layout: str = "lines") -> str:
        if type(conv) is not nn.Conv2d:
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
        device=None,
        dtype=None,
    ):
        super().__init__()
        conv = nn.Conv2d(
            in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias, padding_mode, device, dtype
        )
        self._build(conv, scale_new=1.0)

    @classmethod
    def from_conv(
        cls, conv: nn.Conv2d, bn: None = None, *, init: str = "preserve", gamma_init: float = DEFAULT_GAMMA,
        layout: str = "lines",
    ) -> FastACBlock:
        """Wrap an existing conv, keeping its weight and bias (the same Parameter objects).

        ``scale_square`` starts at 1 (the square branch is the original conv); ``init="preserve"``
        starts ``scale_hor`` and ``scale_ver`` at 0, so the block computes exactly what ``conv`` did,
        and ``init="scratch"`` starts them at ``gamma_init``.
        """
        if init not in INITS:
            raise ACNetError(f"unknown init {init!r}: use one of {', '.join(INITS)}")
        block = cls.__new__(cls)
        nn.Module.__init__(block)
        block._build(conv, scale_new=0.0 if init == "preserve" else gamma_init)
        block.train(conv.training)
        return block

    def _build(self, conv: nn.Conv2d, scale_new: float) -> None:
        """Take over ``conv``'s settings, weight and bias; add the 1xK and Kx1 kernels and the scales."""
        kh, kw = conv.kernel_size
        if kh % 2 == 0 or kw % 2 == 0 or kh < 3 or kw < 3:
            raise ACNetError(f"FastACBlock needs odd kernel sides >= 3, got {conv.kernel_size}")
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.kernel_size, self.stride, self.dilation = conv.kernel_size, conv.stride, conv.dilation
        self.padding, self.groups, self.padding_mode = conv.padding, conv.groups, conv.padding_mode
        pad_h, pad_w = resolve_padding(conv.padding, conv.kernel_size, conv.dilation)
        self._explicit_padding = (pad_w, pad_w, pad_h, pad_h)  # F.pad order, used when padding_mode != "zeros"
        factory = {"device": conv.weight.device, "dtype": conv.weight.dtype}
        self.weight = conv.weight
        self.register_parameter("bias", conv.bias)
        for name, kernel in (("weight_hor", (1, kw)), ("weight_ver", (kh, 1))):
            template = nn.Conv2d(conv.in_channels, conv.out_channels, kernel, groups=conv.groups, bias=False, **factory)
            setattr(self, name, template.weight)  # the default Conv2d initialisation, as in exact mode
        self.scale_square = nn.Parameter(torch.ones(conv.out_channels, **factory))
        self.scale_hor = nn.Parameter(torch.full((conv.out_channels,), scale_new, **factory))
        self.scale_ver = nn.Parameter(torch.full((conv.out_channels,), scale_new, **factory))

    def composed_weight(self) -> Tensor:
        """The KxK kernel this block runs (differentiable in every weight and scale)."""
        kernels_and_scales = self._kernels_and_scales()
        if isinstance(self.weight, torch.fx.Proxy):  # symbolic tracing records the plain operations instead
            return compose_kernel(kernels_and_scales, self.kernel_size)
        return _ComposedKernel.apply(self.kernel_size, *kernels_and_scales)

    def forward(self, x: Tensor) -> Tensor:
        if self.padding_mode != "zeros":  # as nn.Conv2d does it
            x = F.pad(x, self._explicit_padding, mode=self.padding_mode)
            return F.conv2d(x, self.composed_weight(), self.bias, self.stride, 0, self.dilation, self.groups)
        return F.conv2d(x, self.composed_weight(), self.bias, self.stride, self.padding, self.dilation, self.groups)

    def _kernels_and_scales(self) -> tuple[Tensor, ...]:
        return (self.weight, self.weight_hor, self.weight_ver, self.scale_square, self.scale_hor, self.scale_ver)

    def equivalent_kernel(self) -> Kernel:
        """The composed kernel and the conv's bias (zeros without one), differentiable, in the block's dtype."""
        bias = self.weight.new_zeros(self.out_channels) if self.bias is None else self.bias
        return self.composed_weight(), bias

    def fused_kernel(self) -> Kernel:
        """The composed kernel and the conv's bias (zeros without one), in float64."""
        branches = ((self.weight, self.scale_square), (self.weight_hor, self.scale_hor),
                    (self.weight_ver, self.scale_ver))  # fmt: skip
        with torch.no_grad():
            kernels = [(_scaled(w.double(), s.double()), w.new_zeros(self.out_channels, dtype=torch.float64))
                       for w, s in branches]  # fmt: skip
            weight, bias = sum_branches(kernels, self.kernel_size)
            return weight, bias if self.bias is None else bias + self.bias.double()

    def fuse(self, weight: Tensor | None = None, bias: Tensor | None = None) -> nn.Conv2d:
        """The equivalent ``nn.Conv2d``, with a bias only if the original conv had one.

        ``weight``/``bias`` may pass an already computed ``fused_kernel()``.
        """
        if weight is None or bias is None:
            weight, bias = self.fused_kernel()
        conv = torch.nn.utils.skip_init(
            nn.Conv2d, self.in_channels, self.out_channels, self.kernel_size, self.stride, self.padding,
            self.dilation, self.groups, self.bias is not None, self.padding_mode,
            device=self.weight.device, dtype=self.weight.dtype,
        )  # fmt: skip
        with torch.no_grad():
            conv.weight.copy_(weight)
            if conv.bias is not None:
                conv.bias.copy_(bias)
        conv.train(self.training)
        return conv

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding}, dilation={self.dilation}, groups={self.groups}, "
            f"bias={self.bias is not None}, padding_mode={self.padding_mode}"
        )


def compose_kernel(kernels_and_scales: tuple[Tensor, ...], kernel_size: tuple[int, int]) -> Tensor:
    """``scale_square * weight`` with the scaled 1xK and Kx1 kernels added at its centre row and column.

    ``kernels_and_scales`` is ``(weight, weight_hor, weight_ver, scale_square, scale_hor, scale_ver)``.
    """
    weight, weight_hor, weight_ver, scale_square, scale_hor, scale_ver = kernels_and_scales
    row, column = _centre_lines(kernel_size)
    kernel = _scaled(weight, scale_square)
    kernel[row].addcmul_(weight_hor, scale_hor.reshape(-1, 1, 1, 1))
    kernel[column].addcmul_(weight_ver, scale_ver.reshape(-1, 1, 1, 1))
    return kernel


def compose_kernel_backward(grad_kernel: Tensor, kernels_and_scales: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    """The gradients of ``compose_kernel``'s inputs, in their order, given the gradient of its output."""
    weights, scales = kernels_and_scales[:3], kernels_and_scales[3:]
    grad_weights, grad_scales = [], []
    for weight, scale, where in zip(weights, scales, ((...,), *_centre_lines(grad_kernel.shape[2:]))):
        g = grad_kernel[where]
        grad_weights.append(_scaled(g, scale))
        grad_scales.append((g * weight).sum((1, 2, 3)))
    return (*grad_weights, *grad_scales)


class _ComposedKernel(torch.autograd.Function):
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


def _scaled(weight: Tensor, scale: Tensor) -> Tensor:
    """``weight`` with each output channel multiplied by its entry of ``scale``."""
    return weight * scale.reshape(-1, 1, 1, 1)


register_block("acb", FastACBlock)
