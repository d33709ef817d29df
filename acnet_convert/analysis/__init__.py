"""Reading a model without changing it: which convs to convert, as which block, absorbing which BatchNorm."""

from .adapters import (
    batchnorm_part,
    conv_adapter,
    norm_tail,
    own_fusion,
    plain_conv,
    register_conv_adapter,
    register_norm_adapter,
)
from .options import BlockChoice, PlanOptions
from .planner import analyze
from .reasons import CODES, NEEDS_EXAMPLE_RUN, OTHER, Reason
from .record import Plan, Site

__all__ = ["CODES", "NEEDS_EXAMPLE_RUN", "OTHER", "BlockChoice", "Plan", "PlanOptions", "Reason", "Site", "analyze",
           "batchnorm_part", "conv_adapter", "norm_tail", "own_fusion", "plain_conv", "register_conv_adapter",
           "register_norm_adapter"]  # fmt: skip
