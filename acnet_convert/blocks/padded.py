"""A block for a conv subclass that pads its input in ``forward``: the same padding, then a block of any kind."""

from __future__ import annotations

from torch import Tensor, nn

from ..kernels import Kernel
from .base import CONV_SETTINGS, ReparamBlock
from .forms import conv_holding, conv_skeleton


class PaddedBlock(ReparamBlock):
    """``block(pad(x))``: a block around the plain convolution of a conv subclass that pads in ``forward`` (timm's
    ``Conv2dSame``, ...), fusing back into a conv of that subclass (with a bias)."""

    def __init__(self, pad: nn.Module, block: ReparamBlock, original: nn.Module):
        super().__init__()
        self.pad = pad
        self.block = block
        self.kind, self.mode, self.layout, self.conv_type = block.kind, block.mode, block.layout, block.conv_type
        self.options = block.options
        for name in CONV_SETTINGS:
            setattr(self, name, getattr(block, name))
        self.__dict__["fuses_into"] = conv_skeleton(original)  # class, settings and buffers, no weights

    @classmethod
    def describe(cls, conv: nn.Module, layout: str = "lines", **options: int) -> str:
        return type(conv.block).describe(conv.block, layout, **options)

    def forward(self, x: Tensor) -> Tensor:
        return self.block(self.pad(x))

    def equivalent_kernel(self) -> Kernel:
        return self.block.equivalent_kernel()

    def fused_kernel(self) -> Kernel:
        return self.block.fused_kernel()

    def fuse(self, weight: Tensor | None = None, bias: Tensor | None = None) -> nn.Module:
        """A conv of the original subclass holding the block's fused kernel."""
        inner = self.block.fuse(weight, bias)
        conv = conv_holding(self.fuses_into, inner.weight, inner.bias)
        conv.train(self.training)
        return conv
