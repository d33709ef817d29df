"""The Lightning callback's import path of 0.2 (``acnet_convert.integrations.lightning`` holds it)."""

from .integrations.lightning import ACNetCallback

__all__ = ["ACNetCallback"]
