"""The ACNet algebra: pure functions on kernels and BatchNorm statistics.

Every function works in the dtype it is given (float64 for a fusion, the training dtype for a
differentiable equivalent kernel) and on any number of spatial dimensions (weight shape
``(out, in/groups, *spatial)``), so 2D and 3D blocks share it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Kernel = tuple[Tensor, Tensor]  # (weight, bias)


def fold_bn(
    weight: Tensor, bias: Tensor | None, bn: nn.Module | None, *, transposed: bool = False, groups: int = 1
) -> Kernel:
    """Fold an eval-mode BatchNorm that follows a conv into the conv's kernel and bias, in ``weight``'s dtype.

    Differentiable in every argument; call it on float64 copies under ``torch.no_grad()`` for a fusion.
    A transposed conv's kernel is laid out ``(in, out/groups, *spatial)``, so its output
    channels are found per group along the second axis.
    """
    w = weight
    out_channels = w.shape[1] * groups if transposed else w.shape[0]
    b = w.new_zeros(out_channels) if bias is None else bias.to(w.dtype)
    if bn is None or isinstance(bn, nn.Identity):
        return w, b
    mean = bn.running_mean.to(w.dtype)
    std = torch.sqrt(bn.running_var.to(w.dtype) + bn.eps)
    gamma = torch.ones_like(std) if bn.weight is None else bn.weight.to(w.dtype)
    beta = torch.zeros_like(std) if bn.bias is None else bn.bias.to(w.dtype)
    scale = gamma / std
    spatial = [1] * (w.dim() - 2)
    if transposed:
        per_group = scale.reshape(groups, 1, -1, *spatial)
        w = (w.reshape(groups, -1, *w.shape[1:]) * per_group).reshape(w.shape)
    else:
        w = w * scale.reshape(-1, 1, *spatial)
    return w, beta + (b - mean) * scale


def scaled(weight: Tensor, scale: Tensor) -> Tensor:
    """A 2D conv's ``weight`` with each output channel multiplied by its entry of ``scale``."""
    return weight * scale.reshape(-1, 1, 1, 1)


def centre_slices(small: Sequence[int], full: Sequence[int]) -> tuple[slice, ...]:
    """Where an odd-sided kernel of spatial size ``small`` sits at the centre of one of size ``full``."""
    slices = []
    for have, want in zip(small, full):
        if have > want or (want - have) % 2:
            raise ValueError(f"cannot centre a kernel side of {have} inside {want}")
        start = (want - have) // 2
        slices.append(slice(start, start + have))
    return tuple(slices)


def sum_branches(kernels: Iterable[Kernel], spatial: Sequence[int]) -> Kernel:
    """Sum branch kernels, each added at the centre of a ``spatial`` kernel, and their biases."""
    weight = bias = None
    for w, b in kernels:
        if weight is None:
            weight = w.new_zeros(*w.shape[:2], *spatial)
            bias = torch.zeros_like(b)
        weight = weight + embed_centre(w, spatial)
        bias = bias + b
    return weight, bias


def embed_centre(kernel: Tensor, spatial: Sequence[int]) -> Tensor:
    """``kernel`` zero-padded to spatial size ``spatial``, sitting at its centre (differentiable)."""
    where = centre_slices(kernel.shape[2:], spatial)
    pads = [p for s, full in zip(reversed(where), reversed(tuple(spatial))) for p in (s.start, full - s.stop)]
    return F.pad(kernel, pads)


def identity_kernel(
    out_channels: int, in_channels: int, groups: int, *, dtype: torch.dtype | None = None, device=None
) -> Tensor:
    """A 1x1 kernel in which output channel ``i`` of each group copies input channel ``i mod width`` of its group.

    With ``out_channels == in_channels`` it is the identity map of a conv with ``groups`` groups.
    """
    width = in_channels // groups
    per_group = out_channels // groups
    local = torch.arange(out_channels, device=device) % per_group % width
    kernel = torch.zeros(out_channels, width, 1, 1, dtype=dtype, device=device)
    kernel[torch.arange(out_channels, device=device), local] = 1.0
    return kernel


def avg_pool_kernel(
    channels: int, kernel_size: Sequence[int], groups: int, *, dtype: torch.dtype | None = None, device=None
) -> Tensor:
    """The kernel of an average pool over ``kernel_size`` as a conv with ``groups`` groups (zero padding counted)."""
    taps = 1
    for side in kernel_size:
        taps *= side
    identity = identity_kernel(channels, channels, groups, dtype=dtype, device=device)
    return identity.expand(*identity.shape[:2], *kernel_size) / taps


def compose_1x1_kxk(first: Kernel, second: Kernel, groups: int) -> Kernel:
    """A 1x1 conv followed by a KxK conv (kernels and biases, both with ``groups`` groups) as one KxK conv.

    Exact when the intermediate is padded with the first conv's bias wherever the KxK conv pads it.
    """
    (w1, b1), (w2, b2) = first, second
    out, mid_width = w2.shape[:2]
    w2_sums = w2.reshape(groups, out // groups, mid_width, -1).sum(3)
    bias = torch.einsum("gom,gm->go", w2_sums, b1.reshape(groups, mid_width)).reshape(out)
    return compose_1x1_kxk_weight(w1, w2, groups), bias + b2


def compose_1x1_kxk_weight(w1: Tensor, w2: Tensor, groups: int) -> Tensor:
    """The kernel of a bias-free 1x1 conv followed by a bias-free KxK conv (both with ``groups`` groups)."""
    out, mid_width, *spatial = w2.shape
    w1 = w1.reshape(groups, w1.shape[0] // groups, w1.shape[1])  # (group, mid per group, in per group)
    w2 = w2.reshape(groups, out // groups, mid_width, *spatial)
    return torch.einsum("gom...,gmi->goi...", w2, w1).reshape(out, w1.shape[2], *spatial)


def bn_zero_output(bn: nn.Module, dtype: torch.dtype) -> Tensor:
    """What an eval-mode BatchNorm outputs, per channel, for a zero input (in ``dtype``)."""
    scale = torch.rsqrt(bn.running_var.to(dtype) + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight.to(dtype)
    shift = -bn.running_mean.to(dtype) * scale
    return shift if bn.bias is None else shift + bn.bias.to(dtype)


def channel_moments(x: Tensor, groups: int) -> tuple[Tensor, Tensor]:
    """The mean of each channel of ``x`` (batch, channels, *spatial) and the covariance of the channels within each
    of ``groups`` groups, ``(groups, width, width)``, over the batch and every position (biased, as BatchNorm's)."""
    if x.shape[1] == groups:
        var, mean = torch.var_mean(x, [0, *range(2, x.dim())], correction=0)
        return mean, var.reshape(groups, 1, 1)
    return _ChannelMoments.apply(x, groups)


class _ChannelMoments(torch.autograd.Function):
    """``channel_moments`` for groups of more than one channel, as one batched product per sample (no copy of
    ``x`` laid out channel-first) and a backward of one product: the centred input sums to zero over the
    positions, so the covariance's gradient has no share through the mean."""

    @staticmethod
    def forward(ctx, x: Tensor, groups: int) -> tuple[Tensor, Tensor]:
        batch, width = x.shape[0], x.shape[1] // groups
        mean = x.mean([0, *range(2, x.dim())])
        centred = (x - mean.reshape(1, -1, *[1] * (x.dim() - 2))).reshape(batch * groups, width, -1)
        count = batch * centred.shape[2]
        cov = torch.bmm(centred, centred.transpose(1, 2)).reshape(batch, groups, width, width).sum(0) / count
        ctx.save_for_backward(centred)
        ctx.shape, ctx.groups, ctx.count = x.shape, groups, count
        return mean, cov

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_mean: Tensor | None, grad_cov: Tensor | None) -> tuple[Tensor | None, None]:
        (centred,) = ctx.saved_tensors
        batch, channels = ctx.shape[:2]
        grad = None
        if grad_cov is not None:
            symmetric = (grad_cov + grad_cov.transpose(1, 2)) / ctx.count
            centred = centred.reshape(batch, ctx.groups, channels // ctx.groups, -1)
            grad = torch.matmul(symmetric.unsqueeze(0), centred).reshape(ctx.shape)
        if grad_mean is not None:
            spread = (grad_mean / ctx.count).reshape(1, -1, *[1] * (len(ctx.shape) - 2))
            grad = spread.expand(ctx.shape) if grad is None else grad + spread
        return grad, None


def pointwise_moments(weight: Tensor, mean: Tensor, cov: Tensor, groups: int) -> tuple[Tensor, Tensor]:
    """The mean and (biased) variance of each output channel of a bias-free 1x1 conv with ``groups`` groups, from its
    input's ``channel_moments``: ``w·mean`` and ``wᵀ·cov·w`` per output channel."""
    w = weight.reshape(groups, weight.shape[0] // groups, weight.shape[1])
    out_mean = torch.einsum("goi,gi->go", w, mean.reshape(groups, -1)).reshape(-1)
    out_var = torch.einsum("goi,gij,goj->go", w, cov, w).reshape(-1)
    return out_mean, out_var


def dilate_kernel(kernel: Tensor, dilation: Sequence[int]) -> Tensor:
    """The dense kernel a conv with ``dilation`` applies: ``kernel``'s taps ``dilation`` apart, zeros between them.

    Side ``k`` becomes ``d * (k - 1) + 1``; differentiable.  (The same as a transposed conv of ``kernel`` by a 1x1
    identity at stride ``d``.)
    """
    spatial = [d * (k - 1) + 1 for k, d in zip(kernel.shape[2:], dilation)]
    dense = kernel.new_zeros(*kernel.shape[:2], *spatial)
    dense[(..., *(slice(None, None, d) for d in dilation))] = kernel
    return dense
