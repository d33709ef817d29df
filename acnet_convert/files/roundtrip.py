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

from . import checkpoint
from ..api import PLAN_ATTR, acify, apply_plan, deploy
from ..errors import ACNetError
from ..analysis import Plan, Site
from ..modules import names_by_module
from ..blocks import is_block, kinds

FORMATS = checkpoint.FORMATS
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
    has_blocks = any(is_block(m) for m in model.modules())
    fmt = format or ("acified" if has_blocks else "plain")
    if fmt not in FORMATS:
        raise ACNetError(f"unknown format {fmt!r}: use one of {', '.join(FORMATS)}")
    if fmt == "acified" and not has_blocks:
        raise ACNetError("the model contains no block, so it has no acified form: save the model acify returned")
    if fmt == "original":
        state = original_state_dict(model)
    elif fmt == "plain" and has_blocks:
        state = deploy(model).state_dict()
    else:
        state = model.state_dict()
    report = getattr(model, PLAN_ATTR, None)
    recorded = {**getattr(model, ORIGIN_ATTR, {}), **dict(origin or {})}
    metadata = checkpoint.metadata(fmt, report, model=_class_path(model), **recorded)
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
    fmt, recorded = ckpt.get("format"), ckpt.plan
    if not inplace:
        model = copy.deepcopy(model)
    if recorded is not None and fmt in ("acified", "plain"):
        _check_kinds(recorded, path)
        apply_plan(model, recorded)
    elif fmt in ("acified", "plain"):
        _acify_as_recorded(model, ckpt)
    elif fmt is None and set(ckpt.state_dict) != set(model.state_dict()):
        _acify_as_recorded(model, ckpt)
        fmt = "acified" if set(ckpt.state_dict) == set(model.state_dict()) else "plain"
    if fmt == "plain" and any(is_block(m) for m in model.modules()):
        deploy(model, inplace=True, check=False)  # the structure only: the weights come from the file
    checkpoint.load_strict(model, ckpt.state_dict, source=str(path), hint=_written_for(ckpt))
    origin = {name: ckpt.get(name) for name in _ORIGIN_KEYS if ckpt.get(name) is not None}
    if origin:
        setattr(model, ORIGIN_ATTR, origin)
    return model


def original_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The weights of an acified or deployed ``model`` laid out for the unmodified original class.

    Fused weights go into the original convs; a fused bias goes into the conv's own bias if it has one, else into
    the absorbed BatchNorm (set to an exact identity plus that bias), else into the running mean of a BatchNorm
    that alone follows the conv (its eval output is unchanged).  ``ACNetError`` when a bias has no such place.
    """
    report = getattr(model, PLAN_ATTR, None)
    if not isinstance(report, Plan):
        raise ACNetError(
            "the model carries no acnet_plan: pass the model that acify, deploy or load returned"
        )
    if any(site.action == "done" for site in report.sites):
        raise ACNetError("the original model already contains blocks, which no plain conv can hold: use format plain")
    deployed = deploy(model) if any(is_block(m) for m in model.modules()) else model
    state = deployed.state_dict()
    names = names_by_module(deployed)
    for site in report.converted:
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
        raise ACNetError(
            f"conv {site.name} has no bias and no BatchNorm after it, so its fused bias "
            f"(max |b| = {bias.abs().max().item():.3g}) has no place in the original model: use format plain"
        )


def _identity_bn(name: str, site: Site, beta: Tensor) -> dict[str, Tensor]:
    """A BatchNorm state that computes x + beta exactly in eval mode: mean 0, var 1 - eps, gamma 1."""
    if not site.bn_eps < 1:
        raise ACNetError(f"BatchNorm {name} has eps={site.bn_eps:g} >= 1 and cannot act as an identity: use format plain")
    if not site.bn_affine and beta.any():
        raise ACNetError(f"BatchNorm {name} has no affine bias to carry the fused bias: use format plain")
    state = {
        f"{name}.running_mean": torch.zeros_like(beta),
        f"{name}.running_var": torch.full_like(beta, 1.0 - site.bn_eps),
        f"{name}.num_batches_tracked": torch.tensor(0, dtype=torch.long),
    }
    if site.bn_affine:
        state[f"{name}.weight"] = torch.ones_like(beta)
        state[f"{name}.bias"] = beta.clone()
    return state


def _acify_as_recorded(model: nn.Module, ckpt: checkpoint.Checkpoint) -> None:
    """Rebuild a file without a recorded plan: acify with the options (and example input shape) it records."""
    options = dict(ckpt.get("options") or {})
    shape = ckpt.get("input_shape")
    example = (torch.randn(shape, generator=torch.Generator().manual_seed(0)),) if shape else None
    acify(model, inplace=True, example_inputs=example, **options)


def _check_kinds(report: Plan, path: str | os.PathLike) -> None:
    missing = sorted({site.kind for site in report.converted} - set(kinds()))
    if missing:
        raise ACNetError(
            f"{path} uses block kind {missing[0]!r}, which is not registered: import the module that calls "
            f"register_block({missing[0]!r}, ...) before loading"
        )


def _written_for(ckpt: checkpoint.Checkpoint) -> str:
    """What a file says it was written for, to put beside a mismatch."""
    spec, args, model = ckpt.get("spec"), ckpt.get("args"), ckpt.get("model")
    if spec:
        return f"it was written for {spec}" + (f" with arguments {' '.join(args)}" if args else "")
    if model:
        return f"it was written for a {model}: build that model with the same arguments"
    return "the file records no model: pass the model it was saved from"


def _class_path(model: nn.Module) -> str:
    return f"{type(model).__module__}.{type(model).__qualname__}"

