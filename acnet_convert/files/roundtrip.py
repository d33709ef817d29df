"""The round trip: weights written with their recorded plan, models rebuilt from it, weights for the original class.

``save_weights`` writes a model in one of three formats; ``load`` turns a freshly built, unmodified model into
the form a file holds by applying the plan recorded in it; ``original_state_dict`` lays deployed weights out for
the unmodified model class.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

from ..analysis import Plan, Site
from ..api import PLAN_ATTR, deploy
from ..blocks import has_blocks
from ..constants import FILE_FORMATS
from ..errors import ACNetError
from ..modules import class_path, names_by_module
from ..repopt import has_masks
from . import checkpoint
from .rebuild import rebuild_from_checkpoint

ORIGIN_ATTR = "acnet_origin"  # how a loaded model was built (spec, arguments, input shapes), written back on save
_ORIGIN_KEYS = ("spec", "args", "input_shape")


def save_weights(
    model: nn.Module,
    path: str | os.PathLike,
    format: str | None = None,
    *,
    force: bool = True,
    origin: Mapping[str, object] | None = None,
) -> Path:
    """Write ``model``'s weights atomically with the plan it was acified with, in the chosen ``format``.

    ``"acified"`` (the default for a model with blocks): the training form, rebuilt by ``load``; ``"plain"`` (the
    default without blocks): the deployed form; ``"original"``: weights that load with ``strict=True`` into the
    unmodified model class.  ``.safetensors`` (recommended) or ``.pt``/``.pth``; missing folders are created.
    ``origin`` adds how the model was built (the command line records its spec and arguments); a model that
    ``load`` returned carries what its file recorded, and writes it again.
    """
    path = Path(path)
    blocks = has_blocks(model) or has_masks(model)
    fmt = format or ("acified" if blocks else "plain")
    if fmt not in FILE_FORMATS:
        raise ACNetError(f"unknown format {fmt!r}: use one of {', '.join(FILE_FORMATS)}")
    if fmt == "acified" and not blocks:
        raise ACNetError("the model contains no block, so it has no acified form: save the model acify returned")
    if fmt == "original":
        state = original_state_dict(model)
    elif fmt == "plain" and blocks:
        state = deploy(model).state_dict()
    else:
        state = model.state_dict()
    recorded = {**getattr(model, ORIGIN_ATTR, {}), **dict(origin or {})}
    metadata = checkpoint.metadata(fmt, getattr(model, PLAN_ATTR, None), model=class_path(type(model)), **recorded)
    path.parent.mkdir(parents=True, exist_ok=True)
    return checkpoint.write(path, state, metadata, force=force)


def load(model: nn.Module, path: str | os.PathLike, *, inplace: bool = False, key: str | None = None) -> nn.Module:
    """``model`` (freshly built, unmodified) in the form the file at ``path`` holds, its weights loaded strictly.

    An acified file gives the acified model (ready to resume training), a plain one the deployed model, an
    original one the model itself.  The structure comes from the plan recorded in the file: nothing is traced
    or run.  Files without a recorded plan are rebuilt from the options they record.  A copy unless ``inplace``;
    ``key`` picks the entry of a PyTorch checkpoint that holds several state dicts (e.g. ``"state_dict_ema"``).
    """
    if not isinstance(model, nn.Module):
        raise ACNetError(f"load expects the freshly built torch.nn.Module, got {type(model).__name__}")
    if hasattr(model, PLAN_ATTR):
        raise ACNetError("load takes the unmodified model, but this one was acified already: build it afresh")
    ckpt = checkpoint.read(path, key)
    if not inplace:
        model = copy.deepcopy(model)
    rebuild_from_checkpoint(model, ckpt, source=str(path))
    origin = {name: ckpt.get(name) for name in _ORIGIN_KEYS if ckpt.get(name) is not None}
    if origin:
        setattr(model, ORIGIN_ATTR, origin)
    return model


def original_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The weights of an acified or deployed ``model`` laid out for the unmodified original class.

    Fused weights go into the original convs; a fused bias goes into the conv's own bias if it has one, else into
    the absorbed BatchNorm (set to an exact identity plus that bias: in its bias, or in minus its running mean
    when it has no affine parameters), else into the running mean of a BatchNorm that alone follows the conv (its
    eval output is unchanged).  ``ACNetError`` when a bias has no such place.
    """
    plan = getattr(model, PLAN_ATTR, None)
    if not isinstance(plan, Plan):
        raise ACNetError(
            "the model carries no acnet_plan: pass the model that acify, deploy or load returned"
        )
    if any(site.action == "done" for site in plan.sites):
        raise ACNetError("the original model already contains blocks, which no plain conv can hold: use format plain")
    deployed = deploy(model) if has_blocks(model) or has_masks(model) else model
    state = deployed.state_dict()
    names = names_by_module(deployed)
    for site in plan.converted:
        _place_site(site, deployed, state, names)
    return state


def _place_site(site: Site, deployed: nn.Module, state: dict[str, Tensor], names: dict[int, list[str]]) -> None:
    """Lay one fused conv out for the original model: its bias where the original can hold it."""
    fused = deployed.get_submodule(site.name)
    bias = torch.zeros_like(fused.weight[:, 0, 0, 0]) if fused.bias is None else fused.bias.detach()
    if site.conv_bias:
        bias = torch.zeros_like(bias)
    elif fused.bias is not None:
        for name in site.names:
            del state[f"{name}.bias"]
    if site.bn:
        for name in (site.bn, *site.bn_aliases):
            state.update(_identity_bn(name, site, bias))
    elif site.bn_after and bias.any():
        bn = deployed.get_submodule(site.bn_after)
        mean = (bn.running_mean.detach().double() - bias.double()).to(bn.running_mean.dtype)
        for name in names[id(bn)]:
            state[f"{name}.running_mean"] = mean
    elif bias.any():
        why = "is shared (called more than once per forward, so it absorbs no BatchNorm) and has no bias" if (
            "repeated-calls" in site.codes) else "has no bias and no BatchNorm after it"  # fmt: skip
        raise ACNetError(
            f"conv {site.name} {why}, so its fused bias (max |b| = {bias.abs().max().item():.3g}) has no place in "
            "the original model: use format plain"
        )


def _identity_bn(name: str, site: Site, beta: Tensor) -> dict[str, Tensor]:
    """A BatchNorm state that computes x + beta in eval mode, (x - mean) / sqrt(var + eps) * gamma + bias: var
    1 - eps, then gamma 1 and bias beta with mean 0, or, without affine parameters, mean -beta."""
    if not site.bn_eps < 1:
        raise ACNetError(
            f"BatchNorm {name} has eps={site.bn_eps:g} >= 1 and cannot act as an identity: use format plain"
        )
    state = {
        f"{name}.running_mean": torch.zeros_like(beta) if site.bn_affine else -beta,
        f"{name}.running_var": torch.full_like(beta, 1.0 - site.bn_eps),
        f"{name}.num_batches_tracked": torch.tensor(0, dtype=torch.long),
    }
    if site.bn_affine:
        state[f"{name}.weight"] = torch.ones_like(beta)
        state[f"{name}.bias"] = beta.clone()
    return state

