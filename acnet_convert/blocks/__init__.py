"""Block kinds: the protocol, the registry, the shared branch machinery and one module per kind."""

from .base import ReparamBlock
from .geometry import BLOCK_CONVS, resolve_padding
from .padded import PaddedBlock
from .registry import block_class, has_blocks, is_block, kinds, register_block

__all__ = ["BLOCK_CONVS", "PaddedBlock", "ReparamBlock", "block_class", "has_blocks", "is_block", "kinds",
           "register_block", "resolve_padding"]
