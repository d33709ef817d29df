"""The RepVGG block (KxK-BN + 1x1-BN + identity-BN), exact and fast."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..kernels import embed_centre, identity_kernel, scaled
from .branches import ConvBranch, IdentityBranch, has_identity, new_bn, plain_conv_problem, pointwise_branch
from .forms import ComposedKernel, SummedBranches


class RepVGGBlock(SummedBranches):
    """RepVGG's training block: KxK-BN + 1x1-BN (+ identity-BN when in == out channels and stride 1), summed.

    Any padding and padding mode: the 1x1 and identity branches sit on the kernel's centre tap,
    with their padding reduced (or the input cropped) by the centre's offset.
    """

    kind = "repvgg"
    mode = "exact"
    absorbs_bn = True

    @classmethod
    def conv_problem(cls, conv: nn.Module, layout: str = "lines") -> str:
        return plain_conv_problem(conv)

    @classmethod
    def describe(cls, conv: nn.Module, layout: str = "lines") -> str:
        kh, kw = conv.kernel_size
        return f"{kh}x{kw} + 1x1" + (" + identity" if has_identity(conv) else "")

    def new_branches(self, conv: nn.Conv2d, bn: nn.Module | None, **factory) -> dict[str, nn.Module]:
        branches = {
            "square": ConvBranch(conv, bn if bn is not None else nn.Identity()),
            "pointwise": pointwise_branch(conv, new_bn(bn, conv.out_channels, **factory), **factory),
        }
        if has_identity(conv):
            branches["identity"] = IdentityBranch(conv, new_bn(bn, conv.out_channels, **factory))
        return branches


class FastRepVGGBlock(ComposedKernel):
    """RepVGG linearised: one conv whose kernel is composed, every forward, from scaled KxK, 1x1 and identity kernels.

    ``kernel = scale_square * weight + centre(scale_1x1 * weight_1x1 + scale_identity * I)``, one
    learnable scale per output channel and branch; no BatchNorm inside (the one after the conv stays
    in the model) and the conv's own bias, if any, is kept.
    """

    kind = "repvgg"
    mode = "fast"
    absorbs_bn = False

    @classmethod
    def conv_problem(cls, conv: nn.Module, layout: str = "lines") -> str:
        return plain_conv_problem(conv)

    @classmethod
    def describe(cls, conv: nn.Module, layout: str = "lines") -> str:
        return RepVGGBlock.describe(conv, layout) + " (composed)"

    def new_kernels(self, conv: nn.Conv2d, **factory) -> None:
        template = nn.Conv2d(conv.in_channels, conv.out_channels, 1, groups=conv.groups, bias=False, **factory)
        self.weight_1x1 = template.weight
        self.scale_square = nn.Parameter(torch.ones(conv.out_channels, **factory))
        self.scale_1x1 = nn.Parameter(torch.ones(conv.out_channels, **factory))
        identity = has_identity(conv)
        self.register_parameter("scale_identity", nn.Parameter(torch.ones(conv.out_channels, **factory)) if identity
                                else None)  # fmt: skip
        eye = identity_kernel(conv.out_channels, conv.in_channels, conv.groups, **factory) if identity else None
        self.register_buffer("eye", eye, persistent=False)

    def composed_weight(self, dtype: torch.dtype | None = None) -> Tensor:
        tensors = (self.weight, self.weight_1x1, self.eye, self.scale_square, self.scale_1x1, self.scale_identity)
        return compose_repvgg(*(t if dtype is None or t is None else t.to(dtype) for t in tensors))


@torch.fx.wrap
def compose_repvgg(
    weight: Tensor, weight_1x1: Tensor, eye: Tensor | None, scale_square: Tensor, scale_1x1: Tensor,
    scale_identity: Tensor | None,
) -> Tensor:
    """``scale_square * weight`` plus, at its centre tap, ``scale_1x1 * weight_1x1 + scale_identity * eye``.

    One node in a ``torch.fx`` graph: symbolic tracing records the call, not its shape-dependent steps.
    """
    centre = scaled(weight_1x1, scale_1x1)
    if eye is not None:
        centre = centre + scaled(eye, scale_identity)
    return scaled(weight, scale_square) + embed_centre(centre, weight.shape[2:])

