"""A Lightning callback that trains a LightningModule with ACNet blocks and deploys it at the end of fit."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from torch import nn

from .convert import acify, deploy
from .errors import ACNetError
from .training import check_acify_options, save_weights


class ACNetCallback(pl.Callback):
    """Acify the LightningModule in ``setup`` (before optimizers are built and checkpoints restored); deploy it when
    fit ends, keep the result in ``deployed`` and, with ``out``, write its weights from global rank 0.
    """

    def __init__(self, *, out: str | os.PathLike | None = None, check: bool = True, **options: Any):
        super().__init__()
        check_acify_options(options)
        self.options = options
        self.out = None if out is None else Path(out)
        self.check = check
        self.deployed: nn.Module | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Convert the module in place, for every stage, so that acified checkpoints load into it."""
        report = acify(pl_module, inplace=True, **self.options).acnet_plan
        if not any(site.action in ("convert", "done") for site in report.sites):
            raise ACNetError(
                f"{type(pl_module).__name__} has no conv that acify can convert when the callback runs; if its layers "
                "are built in setup() or configure_model(), call acify there instead of using ACNetCallback"
            )

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Deploy the trained module and write its weights on global rank 0."""
        self.deployed = deploy(pl_module, check=self.check).eval()
        if self.out is not None and trainer.is_global_zero:
            save_weights(self.deployed, self.out)
