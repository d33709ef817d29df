"""Reading a model without changing it: which convs to convert, as which block, absorbing which BatchNorm."""

from .adapters import batchnorm_part, conv_adapter, norm_tail, plain_conv
from .graph import BlockChoice, Plan, Site, analyze

__all__ = ["BlockChoice", "Plan", "Site", "analyze", "batchnorm_part", "conv_adapter", "norm_tail", "plain_conv"]
