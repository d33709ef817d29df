"""Drop ACNet into an existing training script: a model-factory decorator, a train-then-deploy helper, weight files."""

from __future__ import annotations

import functools
import inspect
import os
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any, ParamSpec

import torch.distributed as dist
from torch import nn

from .api import acify, deploy
from .constants import FILE_FORMATS
from .errors import ACNetError
from .files.roundtrip import save_weights

P = ParamSpec("P")

# Keyword options of acify that the helpers pass through ("inplace" is decided by each helper).
ACIFY_OPTIONS = tuple(name for name in inspect.signature(acify).parameters if name not in ("model", "inplace"))


def check_acify_options(options: dict[str, Any], allowed: tuple[str, ...] = ACIFY_OPTIONS) -> None:
    """Raise ``ACNetError`` naming the first option that ``acify`` (as called by a helper) does not take."""
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ACNetError(f"unknown acify option {unknown[0]!r}: use one of {', '.join(allowed)}")


def is_main_process() -> bool:
    """True unless torch.distributed is initialised and this process is not global rank 0."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def acnet_model(
    factory: Callable[P, nn.Module] | None = None, /, **options: Any
) -> Callable[P, nn.Module] | Callable[[Callable[P, nn.Module]], Callable[P, nn.Module]]:
    """Decorate a model factory so that the model it builds is returned acified with ``options``.

    Use it bare (``@acnet_model``) or with acify's options (``@acnet_model(init="scratch", gamma_init=1/3)``).
    The freshly built model is converted in place.
    """
    check_acify_options(options)
    if factory is None:
        return functools.partial(acnet_model, **options)

    @functools.wraps(factory)
    def build(*args: P.args, **kwargs: P.kwargs) -> nn.Module:
        return acify(factory(*args, **kwargs), inplace=True, **options)

    return build


class ACNetTraining:
    """Acify a model for training, then deploy it and write the deployed weights when training is done.

    ``run.model`` is the acified model to train (build the optimizer from it, wrap it in DDP or compile it as
    usual).  ``run.finish()``, or leaving a ``with`` block without an exception, deploys it, keeps the result in
    ``run.deployed`` (eval mode) and, when ``out`` is given, writes its weights there from the main process only,
    in ``format``: ``"plain"`` (the deployed model), ``"original"`` (loads into the unmodified class) or
    ``"acified"`` (the trained blocks, for ``acnet_convert.load``).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        out: str | os.PathLike | None = None,
        format: str = "plain",
        check: bool = True,
        **options: Any,
    ):
        check_acify_options(options, (*ACIFY_OPTIONS, "inplace"))
        if format not in FILE_FORMATS:
            raise ACNetError(f"unknown format {format!r}: use one of {', '.join(FILE_FORMATS)}")
        self.model = acify(model, **options)
        self.out = None if out is None else Path(out)
        self.format = format
        self.check = check
        self.deployed: nn.Module | None = None

    def __enter__(self) -> ACNetTraining:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        if exc_type is None:
            self.finish()

    def finish(self) -> nn.Module:
        """Deploy the trained model, write its weights to ``out`` on the main process, and return it."""
        self.deployed = deploy(self.model, check=self.check).eval()
        if self.out is not None and is_main_process():
            save_weights(self.model if self.format == "acified" else self.deployed, self.out, self.format)
        return self.deployed
