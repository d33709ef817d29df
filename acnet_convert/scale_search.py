"""RepOpt's scale search: a few epochs of the fast blocks (CSLA with trainable scales) on the user's data, the
scales they reach frozen into the gradient preconditioners of a ``mode="repopt"`` model."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from . import api
from .analysis import BlockChoice
from .blocks import PaddedBlock
from .constants import DEFAULT_KIND
from .errors import ACNetError

# Each fast block's scale parameter behind each CSLA branch (RepVGG's identity and DBB's 1x1-KxK branch aside).
SCALE_PARAMETERS = {
    "acb": {"square": "scale_square", "row": "scale_hor", "column": "scale_ver"},
    "repvgg": {"square": "scale_square", "pointwise": "scale_1x1"},
    "dbb": {"square": "scale_square", "pointwise": "scale_1x1", "avg": "scale_avg"},
}
_LEFT_OUT = ("scale_kxk", "weight_inner", "weight_outer")  # DBB's bilinear branch, held at zero while searching


def search_scales(
    model: nn.Module,
    data: Iterable,
    *,
    block: BlockChoice = DEFAULT_KIND,
    epochs: int = 1,
    lr: float = 0.01,
    momentum: float = 0.9,
    weight_decay: float = 1e-4,
    loss: Callable = F.cross_entropy,
    init: str = "scratch",
    **options,
) -> nn.Module:
    """``model`` acified with ``mode="repopt"`` (a copy), its scales found by training its fast blocks on ``data``.

    ``data`` yields ``(inputs, targets)`` batches and is read ``epochs`` times; ``loss(model(inputs), targets)`` is
    minimised by SGD with ``lr``, ``momentum`` and ``weight_decay``, every fast scale starting at 1.  ``init`` and
    ``options`` (``include``, ``exclude``, ``min_kernel``, ...) are acify's.  The plan records the scales found.
    """
    if epochs < 1:
        raise ACNetError(f"search_scales needs epochs >= 1, got {epochs}")
    recorded = api.plan(model, block=block, mode="repopt", **options)
    searcher = api.acify(model, block=block, mode="fast", init="scratch", gamma_init=1.0, **options)
    blocks = {site.name: _fast_block(searcher.get_submodule(site.name)) for site in recorded.converted}
    _train(searcher, blocks, data, epochs, loss, lr=lr, momentum=momentum, weight_decay=weight_decay)
    for site in recorded.converted:
        found = blocks[site.name]
        site.scales = {branch: getattr(found, name).detach().double().cpu().tolist()
                       for branch, name in SCALE_PARAMETERS[site.kind].items() if getattr(found, name) is not None}
    return api.apply_plan(copy.deepcopy(model), recorded, init=init)


def _fast_block(module: nn.Module) -> nn.Module:
    return module.block if isinstance(module, PaddedBlock) else module


def _train(searcher: nn.Module, blocks: dict[str, nn.Module], data: Iterable, epochs: int, loss: Callable,
           **sgd) -> None:  # fmt: skip
    for block in blocks.values():
        for name in _LEFT_OUT:
            tensor = getattr(block, name, None)
            if tensor is not None:
                with torch.no_grad():
                    tensor.zero_()
                tensor.requires_grad_(False)
    optimizer = torch.optim.SGD([p for p in searcher.parameters() if p.requires_grad], **sgd)
    searcher.train()
    for _ in range(epochs):
        batches = 0
        for inputs, targets in data:
            optimizer.zero_grad()
            loss(searcher(inputs), targets).backward()
            optimizer.step()
            batches += 1
        if not batches:
            raise ACNetError("search_scales got no batches: pass data that yields (inputs, targets) every epoch")
