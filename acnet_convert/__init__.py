"""acnet-convert: train any PyTorch CNN with Asymmetric Convolution Blocks, deploy it as plain convs."""

import importlib
import sys
import types
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("acnet-convert")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0"

# Every public name is imported on first use, so that ``import acnet_convert`` (and ``acnet --help``) does not
# import torch. Each maps to the submodule that defines it.
_EXPORTS = {
    "ACBlock": "blocks.acb",
    "ACNetCallback": "integrations.lightning",
    "ACNetError": "errors",
    "ACNetTraining": "training",
    "FastACBlock": "blocks.acb",
    "Plan": "analysis.record",
    "QuantReport": "checks.quant",
    "ReparamBlock": "blocks.base",
    "Site": "analysis.record",
    "VerificationError": "errors",
    "VerifyResult": "checks.verify",
    "acify": "api",
    "acnet_model": "training",
    "deploy": "api",
    "load": "files.roundtrip",
    "original_state_dict": "files.roundtrip",
    "plan": "api",
    "quant_report": "checks.quant",
    "register_block": "blocks.registry",
    "register_conv_adapter": "analysis.adapters",
    "register_norm_adapter": "analysis.adapters",
    "save_weights": "files.roundtrip",
    "search_scales": "scale_search",
    "verify": "checks.verify",
}


class _Package(types.ModuleType):
    """The package module: exports resolved on first use; a submodule never hides the export of the same name."""

    def __getattr__(self, name: str):
        if name in _EXPORTS:
            value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
        else:
            try:
                value = importlib.import_module(f"{__name__}.{name}")
            except ModuleNotFoundError as exc:
                if exc.name != f"{__name__}.{name}":
                    raise
                raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from exc
        object.__setattr__(self, name, value)
        return value

    def __setattr__(self, name: str, value) -> None:
        if not (name in _EXPORTS and isinstance(value, types.ModuleType)):  # `import acnet_convert.verify`
            super().__setattr__(name, value)

    def __dir__(self) -> list[str]:
        return sorted({*super().__dir__(), *_EXPORTS})


sys.modules[__name__].__class__ = _Package

__all__ = [*(name for name in _EXPORTS if name != "ACNetCallback"), "__version__"]
