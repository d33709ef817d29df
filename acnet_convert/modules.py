"""The user's module tree: replacing modules by name, every name a module has, modes kept across a probe."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn


def replace_module(root: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` where ``root.get_submodule(name)`` was, by setting the attribute on its parent."""
    parent_name, _, attr = name.rpartition(".")
    setattr(root.get_submodule(parent_name), attr, new)


def names_by_module(model: nn.Module) -> dict[int, list[str]]:
    """Every qualified name each module is registered under, the one ``named_modules()`` gives first."""
    names: dict[int, list[str]] = defaultdict(list)
    for name, module in model.named_modules(remove_duplicate=False):
        if name not in names[id(module)]:
            names[id(module)].append(name)
    return names


@contextmanager
def modes_kept(model: nn.Module, *, training: bool | None = None) -> Iterator[nn.Module]:
    """Run a block with ``model`` in train (``training=True``) or eval mode, or as it is (``None``); every
    submodule's own mode is restored afterwards, whatever mode it was in."""
    modes = {m: m.training for m in model.modules()}
    if training is not None:
        model.train(training)
    try:
        yield model
    finally:
        for m, was_training in modes.items():
            m.training = was_training


def class_path(cls: type) -> str:
    """``module.QualName`` of a class, as checkpoints and plans record it."""
    return f"{cls.__module__}.{cls.__qualname__}"
