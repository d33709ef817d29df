"""A Lightning callback that trains a LightningModule with ACNet blocks and deploys it at the end of fit."""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from torch import nn

from ..analysis import Plan
from ..api import PLAN_ATTR, apply_plan, deploy, plan
from ..constants import FILE_FORMATS
from ..errors import ACNetError
from ..files.rebuild import rebuild
from ..files.roundtrip import save_weights
from ..modules import replace_module
from ..training import check_acify_options

CHECKPOINT_KEY = "acnet_plan"  # the entry of a Lightning checkpoint that records the structure


class ACNetCallback(pl.Callback):
    """Acify the LightningModule in ``setup`` (before optimizers are built and checkpoints restored); deploy it when
    fit ends, keep the result in ``deployed`` and, with ``out``, write its weights in ``format`` from global rank 0.

    Lightning checkpoints carry the plan; resuming with ``fit(..., ckpt_path=...)`` rebuilds the blocks from it
    before the weights are loaded, so a resumed run has the structure the checkpoint was written with.
    """

    def __init__(
        self, *, out: str | os.PathLike | None = None, format: str = "plain", check: bool = True, **options: Any
    ):
        super().__init__()
        check_acify_options(options)
        if format not in FILE_FORMATS:
            raise ACNetError(f"unknown format {format!r}: use one of {', '.join(FILE_FORMATS)}")
        self.options = options
        self.out = None if out is None else Path(out)
        self.format = format
        self.check = check
        self.deployed: nn.Module | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Convert the module in place, for every stage, so that acified checkpoints load into it."""
        if hasattr(pl_module, PLAN_ATTR):
            return
        build = {k: v for k, v in self.options.items() if k not in ("init", "gamma_init")}
        new_plan = plan(pl_module, **build)
        if not any(site.action in ("convert", "done") for site in new_plan.sites):
            raise ACNetError(
                f"{type(pl_module).__name__} has no conv that acify can convert when the callback runs; if its layers "
                "are built in setup() or configure_model(), call acify there instead of using ACNetCallback"
            )
        originals = _originals(pl_module, new_plan)
        init = {k: v for k, v in self.options.items() if k in ("init", "gamma_init")}
        apply_plan(pl_module, new_plan, **init)
        _follow_recorded_plans(pl_module, originals)

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        """Record the plan in the checkpoint."""
        recorded = getattr(pl_module, PLAN_ATTR, None)
        if isinstance(recorded, Plan):
            checkpoint[CHECKPOINT_KEY] = recorded.to_dict()

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Deploy the trained module and write its weights on global rank 0."""
        self.deployed = deploy(pl_module, check=self.check).eval()
        if self.out is not None and trainer.is_global_zero:
            save_weights(pl_module if self.format == "acified" else self.deployed, self.out, self.format)


def _originals(module: nn.Module, converting: Plan) -> dict[str, nn.Module]:
    """Copies of the convs and BatchNorms ``converting`` converts, by every name they have (to undo the conversion)."""
    copies: dict[int, nn.Module] = {}
    found = {}
    for site in converting.converted:
        for name in (*site.names, *([site.bn, *site.bn_aliases] if site.bn else [])):
            original = module.get_submodule(name)
            found[name] = copies.setdefault(id(original), copy.deepcopy(original))
    return found


def _follow_recorded_plans(module: pl.LightningModule, originals: dict[str, nn.Module]) -> None:
    """Make the module rebuild its blocks from the plan of a checkpoint Lightning restores, before its weights load."""
    hook = module.on_load_checkpoint

    def on_load_checkpoint(checkpoint: dict[str, Any]) -> None:
        recorded = checkpoint.get(CHECKPOINT_KEY)
        if recorded is not None and _structure(Plan.from_dict(recorded)) != _structure(getattr(module, PLAN_ATTR)):
            for name, original in originals.items():
                replace_module(module, name, original)
            rebuild(module, Plan.from_dict(recorded), "acified", source="the Lightning checkpoint")  # Lightning loads
        hook(checkpoint)

    module.on_load_checkpoint = on_load_checkpoint


def _structure(recorded: Plan) -> list[dict]:
    """What of a plan decides the structure it builds (the reasons do not)."""
    return [site.as_dict() | {"reason": "", "codes": []} for site in recorded.converted]
