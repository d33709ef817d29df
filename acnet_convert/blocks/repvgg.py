"""The RepVGG block (KxK-BN + 1x1-BN + identity-BN), exact and fast."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .acb import ACBranch
from .branches import (
    ComposedKernel, IdentityBranch, SummedBranches, check_conv, conv_padding, copy_settings, has_identity,
    init_new_branches, new_bn, plain_conv_problem, pointwise_branch, scaled,
)  # fmt: skip
from ..kernels import embed_centre, identity_kernel
from .registry import DEFAULT_GAMMA, register_block


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

    @classmethod
    def from_conv(
        cls, conv: nn.Conv2d, bn: nn.Module | None = None, *, init: str = "preserve", gamma_init: float = DEFAULT_GAMMA,
        layout: str = "lines",
    ) -> RepVGGBlock:
        """Wrap ``conv`` and the BatchNorm after it (kept as they are) and add the 1x1 and identity branches.

        ``init="preserve"``: the new branches' BatchNorms start with gamma = beta = 0 (eval output unchanged);
        ``init="scratch"``: every branch's gamma, the absorbed BatchNorm's included, starts at ``gamma_init``.
        """
        check_conv(cls, conv, init)
        block = cls()
        copy_settings(block, conv)
        factory = {"device": conv.weight.device, "dtype": conv.weight.dtype}
        branches = {
            "square": ACBranch(conv, bn if bn is not None else nn.Identity(), (0, 0)),
            "pointwise": pointwise_branch(conv, new_bn(bn, conv.out_channels, **factory), **factory),
        }
        if has_identity(conv):
            branches["identity"] = IdentityBranch(conv, new_bn(bn, conv.out_channels, **factory))
        block.branches = nn.ModuleDict(branches)
        init_new_branches(branches, bn, init, gamma_init)
        block.train(conv.training)
        return block


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

    @classmethod
    def from_conv(
        cls, conv: nn.Conv2d, bn: None = None, *, init: str = "preserve", gamma_init: float = DEFAULT_GAMMA,
        layout: str = "lines",
    ) -> FastRepVGGBlock:
        """Wrap ``conv`` (its weight and bias Parameters kept); new scales start at 0 (preserve) or ``gamma_init``."""
        check_conv(cls, conv, init)
        block = cls()
        copy_settings(block, conv)
        block.explicit_padding = conv_padding(conv)
        factory = {"device": conv.weight.device, "dtype": conv.weight.dtype}
        block.weight = conv.weight
        block.register_parameter("bias", conv.bias)
        template = nn.Conv2d(conv.in_channels, conv.out_channels, 1, groups=conv.groups, bias=False, **factory)
        block.weight_1x1 = template.weight
        scale_new = 0.0 if init == "preserve" else gamma_init
        block.scale_square = nn.Parameter(torch.ones(conv.out_channels, **factory))
        block.scale_1x1 = nn.Parameter(torch.full((conv.out_channels,), scale_new, **factory))
        identity = has_identity(conv)
        scale_identity = nn.Parameter(torch.full((conv.out_channels,), scale_new, **factory)) if identity else None
        block.register_parameter("scale_identity", scale_identity)
        eye = identity_kernel(conv.out_channels, conv.in_channels, conv.groups, **factory) if identity else None
        block.register_buffer("eye", eye, persistent=False)
        block.train(conv.training)
        return block

    def composed_weight(self, dtype: torch.dtype | None = None) -> Tensor:
        """The KxK kernel this block runs (differentiable in every weight and scale), in ``dtype`` or the weight's."""
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


register_block("repvgg", RepVGGBlock)
register_block("repvgg", FastRepVGGBlock)
