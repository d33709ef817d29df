"""acnet-convert: train any PyTorch CNN with Asymmetric Convolution Blocks, deploy it as plain convs."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("acnet-convert")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0"

# The version is set first: submodules that write checkpoints record it.

from .block import ACBlock
from .convert import acify, deploy, plan
from .errors import ACNetError, VerificationError
from .fast_block import FastACBlock
from .graph import Plan, Site
from .quant import QuantReport, quant_report
from .registry import ReparamBlock, register_block
from .roundtrip import load, original_state_dict, save_weights
from .training import ACNetTraining, acnet_model
from .verify import VerifyResult, verify


def __getattr__(name: str):
    """Import the Lightning callback on first use, so that ``import acnet_convert`` never imports Lightning."""
    if name == "ACNetCallback":
        from .lightning_callback import ACNetCallback

        return ACNetCallback
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "ACBlock",
    "ACNetError",
    "ACNetTraining",
    "FastACBlock",
    "Plan",
    "QuantReport",
    "ReparamBlock",
    "Site",
    "VerificationError",
    "VerifyResult",
    "acify",
    "acnet_model",
    "deploy",
    "load",
    "original_state_dict",
    "plan",
    "quant_report",
    "register_block",
    "save_weights",
    "verify",
    "__version__",
]
