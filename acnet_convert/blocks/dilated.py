"""UniRepLKNet's Dilated Reparam Block: a large depthwise KxK conv plus smaller dilated depthwise convs, each with a
BatchNorm, summed; exact and fast.

Each branch is a depthwise ``k x k`` conv with dilation ``d`` (extent ``d * (k - 1) + 1 <= K``) and the conv's
stride, centred on the large kernel, its padding reduced (or its input cropped) by its offset from the large
kernel's corner, so the sum is exact for any padding.  It folds into the large kernel as the sparse kernel with its
taps ``d`` apart (``kernels.dilate_kernel``), embedded at the centre.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..kernels import Kernel, dilate_kernel, embed_centre, scaled
from .branches import ConvBranch, conv2d_problem, new_bn
from .forms import ComposedKernel, SummedBranches
from .geometry import branch_geometry, conv_padding

# K -> its branches as (kernel side, dilation): the table of DilatedReparamBlock in unireplknet.py of the paper's
# code (Ding et al., "UniRepLKNet", CVPR 2024; github.com/AILab-CVC/UniRepLKNet).
PAPER_BRANCHES = {
    5: ((3, 1), (3, 2)),
    7: ((5, 1), (3, 2), (3, 3)),
    9: ((5, 1), (5, 2), (3, 3), (3, 4)),
    11: ((5, 1), (5, 2), (3, 3), (3, 4), (3, 5)),
    13: ((5, 1), (7, 2), (3, 3), (3, 4), (3, 5)),
}


def dilated_branches(size: int) -> tuple[tuple[int, int], ...]:
    """The (kernel side, dilation) of each branch beside a depthwise ``size x size`` conv (odd, >= 5).

    The paper's table for 5 to 13; a larger kernel gets the branches of the largest size in the table, 13 (each a
    smaller odd kernel whose dilated extent fits within ``size``).
    """
    return PAPER_BRANCHES.get(size, PAPER_BRANCHES[max(PAPER_BRANCHES)])


def dilated_problem(conv: nn.Module) -> str:
    """Why a Dilated Reparam Block cannot wrap ``conv``, or '' when it can."""
    if problem := conv2d_problem(conv):
        return problem
    if not conv.groups == conv.in_channels == conv.out_channels:
        return "not a depthwise conv (groups == in == out channels)"
    kh, kw = conv.kernel_size
    if kh != kw or kh % 2 == 0 or kh < min(PAPER_BRANCHES):
        return f"kernel {kh}x{kw}: the dilated branches need a square odd kernel of at least {min(PAPER_BRANCHES)}"
    if tuple(conv.dilation) != (1, 1):
        return "dilation > 1: the dilated branches assume a dense large kernel"
    return ""


def describe_dilated(conv: nn.Module) -> str:
    """The branches of a Dilated Reparam Block around ``conv`` as text, e.g. ``7x7 + 5x5 d1 + 3x3 d2 + 3x3 d3``."""
    size = conv.kernel_size[0]
    return " + ".join([f"{size}x{size}", *(f"{k}x{k} d{d}" for k, d in dilated_branches(size))])


class DilatedBranch(ConvBranch):
    """A dilated depthwise conv and its BatchNorm, whose kernel is the dense (sparse) kernel it applies."""

    def kernel(self, dtype: torch.dtype) -> Kernel:
        weight, bias = super().kernel(dtype)
        return dilate_kernel(weight, self.conv.dilation), bias


class DilatedBlock(SummedBranches):
    """The Dilated Reparam Block around a depthwise KxK conv (K odd, >= 5): KxK-BN plus one dilated k x k-BN per
    entry of ``dilated_branches(K)``, summed.

    ``init="preserve"`` starts the dilated branches' BatchNorms with gamma = beta = 0; ``init="scratch"`` every
    gamma, the absorbed BatchNorm's included, at ``gamma_init``.
    """

    kind = "dilated"
    mode = "exact"
    absorbs_bn = True

    @classmethod
    def conv_problem(cls, conv: nn.Module, layout: str = "lines") -> str:
        return dilated_problem(conv)

    @classmethod
    def describe(cls, conv: nn.Module, layout: str = "lines") -> str:
        return describe_dilated(conv)

    def new_branches(self, conv: nn.Conv2d, bn: nn.Module | None, **factory) -> dict[str, nn.Module]:
        size, channels, padding = conv.kernel_size[0], conv.out_channels, conv_padding(conv)
        branches = {"square": ConvBranch(conv, bn if bn is not None else nn.Identity())}
        for k, d in dilated_branches(size):
            extent = d * (k - 1) + 1
            geo = branch_geometry((size, size), (extent, extent), padding, (1, 1))
            small = nn.Conv2d(channels, channels, k, conv.stride, geo.padding, d, groups=channels, bias=False,
                              padding_mode=conv.padding_mode, **factory)  # fmt: skip
            branches[f"k{k}d{d}"] = DilatedBranch(small, new_bn(bn, channels, **factory), geo.crop)
        return branches


class FastDilatedBlock(ComposedKernel):
    """The Dilated Reparam Block linearised: one conv whose kernel is composed, every forward, from the scaled large
    kernel and the scaled dilated kernels, each spread out to its taps and embedded at the centre.

    One learnable scale per output channel and branch; no BatchNorm inside (the one after the conv stays in the
    model) and the conv's own bias, if any, is kept.
    """

    kind = "dilated"
    mode = "fast"
    absorbs_bn = False

    @classmethod
    def conv_problem(cls, conv: nn.Module, layout: str = "lines") -> str:
        return dilated_problem(conv)

    @classmethod
    def describe(cls, conv: nn.Module, layout: str = "lines") -> str:
        return describe_dilated(conv) + " (composed)"

    def new_kernels(self, conv: nn.Conv2d, **factory) -> None:
        """One depthwise kernel and one scale per branch (``weight_k5d1``, ``scale_k5d1``, ...), PyTorch's default
        conv initialisation for the kernels."""
        channels = conv.out_channels
        self.scale_square = nn.Parameter(torch.ones(channels, **factory))
        self.dilations = tuple(d for _, d in dilated_branches(conv.kernel_size[0]))
        for k, d in dilated_branches(conv.kernel_size[0]):
            template = nn.Conv2d(channels, channels, k, groups=channels, bias=False, **factory)
            setattr(self, f"weight_k{k}d{d}", template.weight)
            setattr(self, f"scale_k{k}d{d}", nn.Parameter(torch.ones(channels, **factory)))

    def composed_weight(self, dtype: torch.dtype | None = None) -> Tensor:
        names = [f"k{k}d{d}" for k, d in dilated_branches(self.kernel_size[0])]
        tensors = (self.weight, self.scale_square, *(getattr(self, f"{p}_{n}") for n in names for p in ("weight",
                   "scale")))  # fmt: skip
        tensors = tuple(t if dtype is None else t.to(dtype) for t in tensors)
        return compose_dilated(tensors[0], tensors[1], tensors[2::2], tensors[3::2], self.dilations)


@torch.fx.wrap
def compose_dilated(
    weight: Tensor, scale_square: Tensor, kernels: tuple[Tensor, ...], scales: tuple[Tensor, ...],
    dilations: tuple[int, ...],
) -> Tensor:
    """``scale_square * weight`` plus each scaled small kernel spread to its dilated taps, at the centre.

    One node in a ``torch.fx`` graph: symbolic tracing records the call, not its shape-dependent steps.
    """
    kernel = scaled(weight, scale_square)
    for small, scale, d in zip(kernels, scales, dilations):
        kernel = kernel + embed_centre(dilate_kernel(scaled(small, scale), (d, d)), weight.shape[2:])
    return kernel
