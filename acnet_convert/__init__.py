"""acnet-convert: train any PyTorch CNN with Asymmetric Convolution Blocks, deploy it as plain convs."""

from importlib.metadata import PackageNotFoundError, version

from .block import ACBlock
from .convert import acify, deploy, plan
from .errors import ACNetError, VerificationError
from .fast_block import FastACBlock
from .graph import Plan, Site
from .verify import VerifyResult, verify

try:
    __version__ = version("acnet-convert")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0"

__all__ = [
    "ACBlock",
    "ACNetError",
    "FastACBlock",
    "Plan",
    "Site",
    "VerificationError",
    "VerifyResult",
    "acify",
    "deploy",
    "plan",
    "verify",
    "__version__",
]
