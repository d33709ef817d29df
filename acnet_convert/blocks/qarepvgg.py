"""The quantization-friendly RepVGG block (QARepVGG): BatchNorm on the KxK branch only, and one after the sum."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .acb import ACBranch
from ..kernels import Kernel, fold_bn, identity_kernel
from .registry import DEFAULT_GAMMA, register_block
from .branches import (
    IdentityBranch, SummedBranches, check_conv, copy_settings, has_identity, new_bn, plain_conv_problem,
    pointwise_branch, set_affine,
)  # fmt: skip
from .repvgg import RepVGGBlock


class QARepVGGBlock(SummedBranches):
    """``post_bn(KxK-BN(x) + 1x1(x) + x)``: RepVGG with plain 1x1 and identity branches and a BatchNorm after the sum.

    The absorbed BatchNorm becomes the one after the sum; the KxK conv gets a new BatchNorm of its own.
    The identity branch exists when in == out channels and stride 1.
    """

    kind = "qarepvgg"
    mode = "exact"
    absorbs_bn = True

    @classmethod
    def conv_problem(cls, conv: nn.Module, layout: str = "lines") -> str:
        return plain_conv_problem(conv)

    @classmethod
    def describe(cls, conv: nn.Module, layout: str = "lines") -> str:
        return f"({RepVGGBlock.describe(conv, layout)})-BN"

    @classmethod
    def from_conv(
        cls, conv: nn.Conv2d, bn: nn.Module | None = None, *, init: str = "preserve", gamma_init: float = DEFAULT_GAMMA,
        layout: str = "lines",
    ) -> QARepVGGBlock:
        """Wrap ``conv`` and the BatchNorm after it (kept as they are, that BatchNorm now after the sum).

        ``init="preserve"``: the KxK branch's new BatchNorm starts as the identity (in eval mode) and the
        1x1 kernel as minus the identity branch (zero without one), so the block computes ``bn(conv(x))``;
        ``init="scratch"``: both BatchNorms' gamma start at ``gamma_init``, the 1x1 kernel at PyTorch's default.
        """
        check_conv(cls, conv, init)
        block = cls()
        copy_settings(block, conv)
        factory = {"device": conv.weight.device, "dtype": conv.weight.dtype}
        dense_bn = new_bn(bn, conv.out_channels, **factory)
        branches = {
            "square": ACBranch(conv, dense_bn, (0, 0)),
            "pointwise": pointwise_branch(conv, nn.Identity(), **factory),
        }
        if has_identity(conv):
            branches["identity"] = IdentityBranch(conv, nn.Identity())
        block.branches = nn.ModuleDict(branches)
        block.post_bn = bn if bn is not None else nn.Identity()
        if init == "preserve":
            set_affine(dense_bn, math.sqrt(1.0 + dense_bn.eps), 0.0)  # default running statistics: mean 0, var 1
            with torch.no_grad():
                pointwise = branches["pointwise"].conv.weight
                pointwise.zero_()
                if has_identity(conv):
                    pointwise.sub_(identity_kernel(conv.out_channels, conv.in_channels, conv.groups, **factory))
        else:
            set_affine(dense_bn, gamma_init, 0.0)
            set_affine(block.post_bn, gamma_init)
        block.train(conv.training)
        return block

    def forward(self, x: Tensor) -> Tensor:
        return self.post_bn(super().forward(x))

    def _kernel(self, dtype: torch.dtype) -> Kernel:
        return fold_bn(*super()._kernel(dtype), self.post_bn)


register_block("qarepvgg", QARepVGGBlock)
