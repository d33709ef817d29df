"""The ACNet algebra: pure functions on kernels and BatchNorm statistics.

Every function works in float64 and on any number of spatial dimensions
(kernel layout ``(out, in/groups, *spatial)``), so 2D and 3D blocks share it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import Tensor, nn

Kernel = tuple[Tensor, Tensor]  # (weight, bias), both float64


def fold_bn(
    weight: Tensor, bias: Tensor | None, bn: nn.Module | None, *, transposed: bool = False, groups: int = 1
) -> Kernel:
    """Fold an eval-mode BatchNorm that follows a conv into the conv's kernel and bias.

    A transposed conv's kernel is laid out ``(in, out/groups, *spatial)``, so its output
    channels are found per group along the second axis.
    """
    w = weight.detach().to(torch.float64)
    out_channels = w.shape[1] * groups if transposed else w.shape[0]
    b = torch.zeros(out_channels, dtype=torch.float64, device=w.device)
    if bias is not None:
        b = bias.detach().to(torch.float64)
    if bn is None or isinstance(bn, nn.Identity):
        return w, b
    mean = bn.running_mean.detach().to(torch.float64)
    std = torch.sqrt(bn.running_var.detach().to(torch.float64) + bn.eps)
    gamma = torch.ones_like(std) if bn.weight is None else bn.weight.detach().to(torch.float64)
    beta = torch.zeros_like(std) if bn.bias is None else bn.bias.detach().to(torch.float64)
    scale = gamma / std
    spatial = [1] * (w.dim() - 2)
    if transposed:
        per_group = scale.reshape(groups, 1, -1, *spatial)
        w = (w.reshape(groups, -1, *w.shape[1:]) * per_group).reshape(w.shape)
    else:
        w = w * scale.reshape(-1, 1, *spatial)
    return w, beta + (b - mean) * scale


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
        weight[(..., *centre_slices(w.shape[2:], spatial))] += w
        bias += b
    return weight, bias
