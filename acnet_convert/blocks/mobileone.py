"""The MobileOne block: k parallel KxK conv-BN branches, a 1x1 conv-BN and a BatchNorm identity; exact and fast.

MobileOne (Vasu et al., CVPR 2023) over-parameterises depthwise and pointwise convs alike: the wrapped conv is one
of k KxK branches, a KxK conv (K > 1) gets a 1x1 "scale" branch on its centre tap, and a conv with as many outputs as
inputs and stride 1 a BatchNorm of the input itself.  k is the kind's option ``k``; its default, 4, is the paper's
for MobileOne-S0, the variant it over-parameterises (apple/ml-mobileone builds S1 to S4 with k = 1).
"""

from __future__ import annotations

from types import MappingProxyType

import torch
from torch import Tensor, nn

from ..kernels import embed_centre, identity_kernel, scaled
from .base import KindOption
from .branches import ConvBranch, IdentityBranch, conv2d_problem, has_identity, new_bn, pointwise_branch
from .forms import ComposedKernel, SummedBranches, conv_args

OPTIONS = MappingProxyType({"k": KindOption(4, 1, "the number of parallel KxK conv branches")})


def mobileone_problem(conv: nn.Module) -> str:
    """Why a MobileOne block cannot wrap ``conv``, or '' when it can (1x1 convs included)."""
    if problem := conv2d_problem(conv):
        return problem
    if any(k % 2 == 0 for k in conv.kernel_size):
        return "even kernel side: the kernel has no centre tap"
    return ""


def describe_mobileone(conv: nn.Module, k: int) -> str:
    """The branches of a MobileOne block around ``conv`` as text, e.g. ``3x3 x4 + 1x1 + identity``."""
    parts = ["x".join(map(str, conv.kernel_size)) + f" x{k}"]
    parts += ["1x1"] * (max(conv.kernel_size) > 1) + ["identity"] * has_identity(conv)
    return " + ".join(parts)


class MobileOneBlock(SummedBranches):
    """MobileOne's training block: k KxK-BN branches (the wrapped conv first), 1x1-BN for K > 1 and identity-BN
    when in == out channels and stride 1, summed.

    Every KxK branch has the conv's settings (grouped and depthwise included); the 1x1 and identity branches sit on
    the kernel's centre tap as RepVGG's do, so any padding and padding mode is exact.
    """

    kind = "mobileone"
    mode = "exact"
    absorbs_bn = True
    kind_options = OPTIONS

    @classmethod
    def conv_problem(cls, conv: nn.Module, layout: str = "lines") -> str:
        return mobileone_problem(conv)

    @classmethod
    def describe(cls, conv: nn.Module, layout: str = "lines", k: int = OPTIONS["k"].default) -> str:
        return describe_mobileone(conv, k)

    def new_branches(self, conv: nn.Conv2d, bn: nn.Module | None, **factory) -> dict[str, nn.Module]:
        channels = conv.out_channels
        branches = {"square": ConvBranch(conv, bn if bn is not None else nn.Identity())}
        for i in range(1, self.options["k"]):
            twin = nn.Conv2d(**conv_args(self, bias=False), **factory)
            branches[f"square_{i}"] = ConvBranch(twin, new_bn(bn, channels, **factory))
        if max(conv.kernel_size) > 1:
            branches["pointwise"] = pointwise_branch(conv, new_bn(bn, channels, **factory), **factory)
        if has_identity(conv):
            branches["identity"] = IdentityBranch(conv, new_bn(bn, channels, **factory))
        return branches


class FastMobileOneBlock(ComposedKernel):
    """MobileOne linearised: one conv whose kernel is composed, every forward, from the scaled branch kernels.

    ``kernel = scale_square * weight + sum_i scale_extra[i] * weight_extra[i] + centre(scale_1x1 * weight_1x1 +
    scale_identity * I)``, one learnable scale per output channel and branch; no BatchNorm inside (the one after
    the conv stays in the model) and the conv's own bias, if any, is kept.
    """

    kind = "mobileone"
    mode = "fast"
    absorbs_bn = False
    kind_options = OPTIONS

    @classmethod
    def conv_problem(cls, conv: nn.Module, layout: str = "lines") -> str:
        return mobileone_problem(conv)

    @classmethod
    def describe(cls, conv: nn.Module, layout: str = "lines", k: int = OPTIONS["k"].default) -> str:
        return describe_mobileone(conv, k) + " (composed)"

    def new_kernels(self, conv: nn.Conv2d, **factory) -> None:
        """The k - 1 further KxK kernels start as PyTorch initialises a conv's, as in exact mode."""
        channels, extra = conv.out_channels, self.options["k"] - 1
        twins = [nn.Conv2d(**conv_args(self, bias=False), **factory).weight.detach() for _ in range(extra)]
        self.register_parameter("weight_extra", nn.Parameter(torch.stack(twins)) if extra else None)
        pointwise = max(conv.kernel_size) > 1
        template = nn.Conv2d(conv.in_channels, channels, 1, groups=conv.groups, bias=False, **factory)
        self.register_parameter("weight_1x1", template.weight if pointwise else None)
        self.scale_square = nn.Parameter(torch.ones(channels, **factory))
        self.register_parameter("scale_extra", nn.Parameter(torch.ones(extra, channels, **factory)) if extra else None)
        self.register_parameter("scale_1x1", nn.Parameter(torch.ones(channels, **factory)) if pointwise else None)
        identity = has_identity(conv)
        self.register_parameter("scale_identity", nn.Parameter(torch.ones(channels, **factory)) if identity
                                else None)  # fmt: skip
        eye = identity_kernel(channels, conv.in_channels, conv.groups, **factory) if identity else None
        self.register_buffer("eye", eye, persistent=False)

    def composed_weight(self, dtype: torch.dtype | None = None) -> Tensor:
        tensors = (self.weight, self.weight_extra, self.weight_1x1, self.eye, self.scale_square, self.scale_extra,
                   self.scale_1x1, self.scale_identity)  # fmt: skip
        return compose_mobileone(*(t if dtype is None or t is None else t.to(dtype) for t in tensors))


@torch.fx.wrap
def compose_mobileone(
    weight: Tensor, weight_extra: Tensor | None, weight_1x1: Tensor | None, eye: Tensor | None, scale_square: Tensor,
    scale_extra: Tensor | None, scale_1x1: Tensor | None, scale_identity: Tensor | None,
) -> Tensor:
    """The fast MobileOne kernel: the scaled KxK kernels summed, the scaled 1x1 and identity added at the centre tap.

    One node in a ``torch.fx`` graph: symbolic tracing records the call, not its shape-dependent steps.
    """
    kernel = scaled(weight, scale_square)
    if weight_extra is not None:
        kernel = kernel + (weight_extra * scale_extra.reshape(*scale_extra.shape, 1, 1, 1)).sum(0)
    centre = [scaled(w, s) for w, s in ((weight_1x1, scale_1x1), (eye, scale_identity)) if w is not None]
    if centre:
        kernel = kernel + embed_centre(sum(centre[1:], centre[0]), weight.shape[2:])
    return kernel
