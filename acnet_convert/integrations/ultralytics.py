"""Train any Ultralytics model with re-parameterisable blocks using Ultralytics' own trainer, then ship it plain.

``model.train(trainer=acnet_trainer(model, **options), ...)`` builds the blocks into the model the trainer creates,
before its optimizer, EMA and checkpoints exist.  The trained model (and every checkpoint written) deploys its blocks
into plain convs when Ultralytics fuses it (``predict``, ``val``, ``export``); ``save_deployed`` writes a checkpoint
that holds no block at all, for machines without acnet-convert.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn
from ultralytics.engine.model import Model
from ultralytics.nn.modules import Conv2, RepConv, RepVGGDW

from ..analysis import Plan
from ..api import PLAN_ATTR, OwnFusion, acify, deploy
from ..blocks import has_blocks, is_block
from ..errors import ACNetError
from ..files.rebuild import rebuild
from ..repopt import has_masks
from ..training import check_acify_options

# Ultralytics modules whose own fusion reads their convs' weights directly: their convs stay plain.
OWN_REPARAM_MODULES = (Conv2, RepConv, RepVGGDW)


def acnet_trainer(model: Any, **options: Any) -> type:
    """The trainer class of ``model``'s task, building blocks with ``acify(**options)`` into every model it creates."""
    if not isinstance(model, Model):
        raise ACNetError(f"acnet_trainer expects an Ultralytics model such as YOLO('yolov8n.yaml'), got {model!r}")
    check_acify_options(options)
    base = model.task_map[model.task]["trainer"]
    return type(f"ACNet{base.__name__}", (_ACNetTrainer, base), {"acnet_options": dict(options)})


class _ACNetTrainer:
    """Mixed into a task's trainer: the model it builds carries blocks before the optimizer and EMA see it."""

    acnet_options: dict[str, Any] = {}

    def get_model(self, cfg: Any = None, weights: nn.Module | None = None, verbose: bool = True) -> nn.Module:
        """Build the task's model with blocks: new ones from ``acnet_options``, or the ones ``weights`` trained."""
        trained = _trained_plan(weights)
        model = super().get_model(cfg=cfg, weights=None if trained else weights, verbose=verbose)
        if trained is None:
            return acify_model(model, **self.acnet_options)
        rebuild(model, trained, "acified", source=f"the {type(weights).__name__} to train from")
        model.load(weights)  # what fits, as Ultralytics transfers it: a head for other classes starts afresh
        return model


def acify_model(model: nn.Module, **options: Any) -> nn.Module:
    """Acify an Ultralytics model in place (convs of its own re-parameterisable modules stay plain); return it.

    Its ``fuse`` (what Ultralytics calls before predicting, validating and exporting) deploys the blocks first, as
    that of any acified Ultralytics model does.
    """
    options.setdefault("example_inputs", (_example_input(model),))
    options["exclude"] = [*_as_list(options.get("exclude")), *_own_reparam_names(model)] or None
    acify(model, inplace=True, **options)
    if not (has_blocks(model) or has_masks(model)):
        raise ACNetError(
            f"acify converted no conv of this {type(model).__name__} (see model.{PLAN_ATTR}); "
            "widen include/exclude or train it without ACNet"
        )
    return model


def deploy_model(model: nn.Module) -> nn.Module:
    """Fuse the blocks of an acified Ultralytics model in place (checked in float64): a plain Ultralytics model again.

    A ``Conv`` whose BatchNorm a block absorbed loses its ``bn`` and runs ``forward_fuse``, as Ultralytics' own
    ``fuse`` leaves it; everything else keeps its class and name.
    """
    absorbed = [m for m in model.modules() if _absorbed_bn(m)]
    deploy(model, inplace=True)
    for module in absorbed:
        del module.bn
        module.forward = module.forward_fuse
    for attr in (PLAN_ATTR, "fuse"):
        model.__dict__.pop(attr, None)
    return model


def save_deployed(checkpoint: str | os.PathLike, out: str | os.PathLike | None = None) -> Path:
    """Write an acified Ultralytics checkpoint (``best.pt``, ``last.pt``) as a plain one; return its path.

    The blocks are deployed (exactly, checked in float64) and no acnet-convert object is left in the file, so
    ``YOLO(out)`` loads, predicts, validates and exports where acnet-convert is not installed.  ``out`` defaults
    to ``<name>-deployed.pt`` beside the checkpoint.  Like Ultralytics' final checkpoints it keeps the EMA weights
    in half precision and drops the optimizer.
    """
    path = Path(checkpoint)
    out = path.with_name(f"{path.stem}-deployed.pt") if out is None else Path(out)
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    model = ckpt.get("ema") or ckpt.get("model")
    if not isinstance(model, nn.Module) or not (has_blocks(model) or has_masks(model)):
        raise ACNetError(f"{path} holds no ACNet blocks: it is plain already, use it as it is")
    plain = deploy_model(model.float()).half().requires_grad_(False)
    ckpt.update(model=plain, ema=None, optimizer=None, scaler=None, updates=None, best_fitness=None, epoch=-1)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(f".{out.name}.partial")
    torch.save(ckpt, partial)
    os.replace(partial, out)
    return out


_DeployThenFuse = OwnFusion  # the name checkpoints written by 0.2 pickled for an acified model's fuse


def _trained_plan(weights: nn.Module | None) -> Plan | None:
    """The plan ``weights`` was acified with, or None when it holds no blocks."""
    if not isinstance(weights, nn.Module) or not (has_blocks(weights) or has_masks(weights)):
        return None
    trained = getattr(weights, PLAN_ATTR, None)
    if trained is None:
        raise ACNetError(
            f"the {type(weights).__name__} to train from holds ACNet blocks but no {PLAN_ATTR}: "
            "start from the checkpoint the ACNet trainer wrote"
        )
    return trained


def _absorbed_bn(module: nn.Module) -> bool:
    """Whether ``module`` is an Ultralytics conv wrapper whose BatchNorm its block absorbed."""
    absorbed = is_block(getattr(module, "conv", None)) and isinstance(getattr(module, "bn", None), nn.Identity)
    return absorbed and hasattr(module, "forward_fuse")


def _own_reparam_names(model: nn.Module) -> list[str]:
    """Names of the Ultralytics modules that re-parameterise themselves."""
    return [name for name, m in model.named_modules() if isinstance(m, OWN_REPARAM_MODULES)]


def _example_input(model: nn.Module) -> torch.Tensor:
    """A zero batch the model accepts: its channels, twice its largest stride (at least 64 pixels) on each side."""
    channels = getattr(model, "yaml", {}).get("channels", 3)
    stride = getattr(model, "stride", None)
    size = 2 * max(32, int(stride.max()) if isinstance(stride, torch.Tensor) else 32)
    return torch.zeros(1, channels, size, size)


def _as_list(patterns: Any) -> list[str]:
    """``include``/``exclude`` patterns as a list."""
    return [] if patterns is None else [patterns] if isinstance(patterns, str) else list(patterns)
