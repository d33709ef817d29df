"""The quantization-friendly RepVGG block (QARepVGG): BatchNorm on the KxK branch only, and one after the sum."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..kernels import Kernel, fold_bn, identity_kernel
from .branches import ConvBranch, IdentityBranch, has_identity, new_bn, plain_conv_problem, pointwise_branch, set_affine
from .forms import SummedBranches
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

    def build(self, conv: nn.Conv2d, bn: nn.Module | None, layout: str) -> None:
        super().build(conv, bn, layout)
        self.post_bn = bn if bn is not None else nn.Identity()

    def new_branches(self, conv: nn.Conv2d, bn: nn.Module | None, **factory) -> dict[str, nn.Module]:
        branches = {
            "square": ConvBranch(conv, new_bn(bn, conv.out_channels, **factory)),
            "pointwise": pointwise_branch(conv, nn.Identity(), **factory),
        }
        if has_identity(conv):
            branches["identity"] = IdentityBranch(conv, nn.Identity())
        return branches

    def init_branches(self, absorbed: nn.Module | None, init: str, gamma: float) -> None:
        """``"preserve"``: the KxK branch's BatchNorm starts as the identity (in eval mode) and the 1x1 kernel as
        minus the identity branch (zero without one); ``"scratch"``: both BatchNorms' gamma start at ``gamma``,
        the 1x1 kernel at PyTorch's default."""
        dense_bn = self.branches["square"].bn
        if init == "scratch":
            set_affine(dense_bn, gamma, 0.0)
            set_affine(self.post_bn, gamma)
            return
        set_affine(dense_bn, math.sqrt(1.0 + dense_bn.eps), 0.0)  # default running statistics: mean 0, var 1
        with torch.no_grad():
            pointwise = self.branches["pointwise"].conv.weight
            pointwise.zero_()
            if "identity" in self.branches:
                pointwise.sub_(identity_kernel(self.out_channels, self.in_channels, self.groups, dtype=pointwise.dtype,
                                               device=pointwise.device))  # fmt: skip

    def forward(self, x: Tensor) -> Tensor:
        return self.post_bn(super().forward(x))

    def equivalent_kernel(self, dtype: torch.dtype | None = None) -> Kernel:
        return fold_bn(*super().equivalent_kernel(dtype), self.post_bn)
