"""timm models with ACNet blocks under their own names, for anything that builds models through ``timm.create_model``.

Importing this module registers, in timm's model registry, an entrypoint ``acnet_<arch>`` for every architecture
timm lists: ``timm.create_model("acnet_resnet18", **kwargs)`` builds timm's ``resnet18`` with the same arguments
(pretrained weights and tags included) and acifies it in place.  acify's options are fixed per name by ``register``
or given per call as keyword arguments prefixed ``acnet_`` (``acnet_init="scratch"``, ``acnet_mode="fast"``; on
timm's train.py: ``--model-kwargs acnet_init=scratch``).  ``timm.utils.reparameterize_model`` deploys the result.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import timm
from timm.models import register_model
from torch import nn

from ..api import acify
from ..blocks import has_blocks
from ..errors import ACNetError
from ..training import check_acify_options

PREFIX = "acnet_"


def register(arch: str, name: str | None = None, **options: Any) -> str:
    """Register ``name`` (default ``acnet_<arch>``) with timm as timm's ``arch`` acified with ``options``; return it."""
    if not timm.is_model(arch):
        raise ACNetError(f"timm has no model {arch!r}: use a name from timm.list_models()")
    check_acify_options(options)
    name = name or f"{PREFIX}{arch}"
    entrypoint = _entrypoint(arch, name, options)
    globals()[name] = entrypoint  # timm lists every registered entrypoint in its module's __all__
    register_model(entrypoint)
    return name


def _entrypoint(arch: str, name: str, options: dict[str, Any]) -> Callable[..., nn.Module]:
    """A timm entrypoint called ``name`` that builds ``arch`` and acifies it with ``options`` and the call's own."""

    def build(pretrained: bool = False, **kwargs: Any) -> nn.Module:
        chosen = {**options, **_pop_acnet_options(kwargs)}
        check_acify_options(chosen)
        model = acify(timm.create_model(arch, pretrained=pretrained, **kwargs), inplace=True, **chosen)
        if not has_blocks(model):
            raise ACNetError(f"acify converts no conv of timm's {arch} (acnet_convert.plan says why): use {arch}")
        return model

    build.__name__ = build.__qualname__ = name
    build.__module__ = __name__
    build.__doc__ = f"timm's {arch} with ACNet blocks (acify options {options or 'by default'})."
    return build


def _pop_acnet_options(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Remove the ``acnet_``-prefixed keyword arguments from ``kwargs``; return them without the prefix."""
    return {key.removeprefix(PREFIX): kwargs.pop(key) for key in [k for k in kwargs if k.startswith(PREFIX)]}


def _register_all() -> None:
    """Register ``acnet_<arch>`` for every architecture timm lists."""
    for arch in timm.list_models():
        if not arch.startswith(PREFIX):
            register(arch)


_register_all()
