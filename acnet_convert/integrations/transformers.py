"""Hugging Face transformers vision models with ACNet blocks: trained by ``Trainer``, shipped by ``save_pretrained``.

``ACNetCallback`` acifies the Trainer's model when the Trainer is built, before its optimizer exists; the plan is
recorded in the model's config, so every checkpoint's ``config.json`` carries it and a model built from that config
gets the same blocks back.  When training ends the callback writes the deployed model with ``save_pretrained`` in
the original format: ``from_pretrained`` into the unmodified class loads it and computes what the blocks did.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel, TrainerCallback

from ..analysis import Plan
from ..api import PLAN_ATTR, acify, apply_plan, deploy
from ..blocks import has_blocks
from ..errors import ACNetError
from ..files.rebuild import NOT_STRUCTURE
from ..files.roundtrip import original_state_dict
from ..training import check_acify_options

CONFIG_KEY = "acnet_plan"  # the attribute of the model's config (a key of config.json) that records the plan


def example_inputs(model: PreTrainedModel) -> tuple[torch.Tensor] | None:
    """A zero batch of ``pixel_values`` as the model's config describes them (``num_channels`` x ``image_size``), or
    None when it names no size."""
    channels, size = getattr(model.config, "num_channels", None), getattr(model.config, "image_size", None)
    if not channels or not size:
        return None
    height, width = (size, size) if isinstance(size, int) else size
    weight = next(model.parameters())
    return (torch.zeros(1, channels, height, width, dtype=weight.dtype, device=weight.device),)


def acify_model(model: PreTrainedModel, **options: Any) -> PreTrainedModel:
    """Acify ``model`` in place with ``acify``'s ``options`` and record the plan in its config; return it.

    A config that records a plan already (the model was built from a checkpoint's config) gets that plan's blocks,
    whatever ``options`` say, so that the checkpoint's weights fit.  Without ``example_inputs`` the model runs once
    on a zero batch its config describes (when it gives ``image_size``), so that convs in code torch.fx cannot trace
    are analysed too.
    """
    check_acify_options(options)
    if not isinstance(model, PreTrainedModel):
        raise ACNetError(f"acify_model expects a transformers PreTrainedModel, got {type(model).__name__}")
    if hasattr(model, PLAN_ATTR):
        return model
    recorded = getattr(model.config, CONFIG_KEY, None)
    if recorded is not None:
        return apply_plan(model, Plan.from_dict(recorded), **{k: v for k, v in options.items() if k in NOT_STRUCTURE})
    options.setdefault("example_inputs", example_inputs(model))
    acify(model, inplace=True, **options)
    if not has_blocks(model):
        raise ACNetError(
            f"acify converted no conv of this {type(model).__name__} (see model.{PLAN_ATTR}): "
            "widen include/exclude or train it without ACNet"
        )
    setattr(model.config, CONFIG_KEY, getattr(model, PLAN_ATTR).to_dict())
    return model


def save_original(model: PreTrainedModel, save_directory: str | os.PathLike, **kwargs: Any) -> Path:
    """Write an acified or deployed ``model`` with ``save_pretrained`` in the original format; return the folder.

    The blocks are deployed (checked in float64) and their weights laid out for the unmodified class, whose
    ``from_pretrained`` loads them without missing or unexpected keys; the config no longer records a plan.
    ``kwargs`` go to ``save_pretrained``.
    """
    if not hasattr(model, PLAN_ATTR):
        raise ACNetError("save_original takes a model that acify_model, acify or deploy returned")
    deployed = deploy(model) if has_blocks(model) else model
    state = original_state_dict(deployed)
    config = deployed.config
    deployed.config = copy.deepcopy(config)
    deployed.config.__dict__.pop(CONFIG_KEY, None)
    try:
        deployed.save_pretrained(save_directory, state_dict=state, **kwargs)
    finally:
        deployed.config = config
    return Path(save_directory)


class ACNetCallback(TrainerCallback):
    """Train a transformers model with ACNet blocks under ``Trainer``; deploy it when training ends.

    The Trainer's model is acified (``acify_model`` with ``options``) when the Trainer is built, before it creates
    its optimizer.  When training ends the deployed model is kept in ``deployed`` and, with ``out``, written there
    by ``save_original`` from the main process.
    """

    def __init__(self, *, out: str | os.PathLike | None = None, **options: Any):
        check_acify_options(options)
        self.options = options
        self.out = None if out is None else Path(out)
        self.deployed: PreTrainedModel | None = None

    def on_init_end(self, args: Any, state: Any, control: Any, model: Any = None, optimizer: Any = None, **kwargs):
        """Acify the model the Trainer holds, in place."""
        if optimizer is not None and not hasattr(model, PLAN_ATTR):
            raise ACNetError(
                "the Trainer was given an optimizer for the parameters acify replaces: call "
                "acify_model(model) before building the optimizer, or let the Trainer build it"
            )
        acify_model(model, **self.options)

    def on_train_end(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs):
        """Deploy the trained model; write it in the original format from the main process."""
        self.deployed = deploy(model).eval()
        if self.out is not None and state.is_world_process_zero:
            save_original(self.deployed, self.out)
