"""Replace modules by qualified name on the user's own module tree."""

from __future__ import annotations

from torch import nn


def replace_module(root: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` where ``root.get_submodule(name)`` was, by setting the attribute on its parent."""
    parent_name, _, attr = name.rpartition(".")
    setattr(root.get_submodule(parent_name), attr, new)
