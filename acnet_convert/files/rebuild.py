"""Rebuilding a model in the form its weights were written in, by the plan that defines its structure.

``rebuild`` is the core: a plan, a form and (optionally) a state dict turn a freshly built model into the acified
model (the plan's blocks), the plain one (those blocks fused) or the original one (the model itself).
``rebuild_from_checkpoint`` takes all three from a checkpoint: the plan it records, else one made with the options
it records (or, for a file without acnet metadata, the options given).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from .. import api
from ..analysis import Plan
from ..blocks import has_blocks, kinds
from ..constants import FILE_FORMATS
from ..errors import ACNetError
from ..repopt import has_masks
from . import checkpoint

NOT_STRUCTURE = ("init", "gamma_init")  # acify options that only set the initial weights, which a file replaces


def rebuild(
    model: nn.Module,
    plan: Plan | None,
    form: str,
    state_dict: Mapping[str, Tensor] | None = None,
    *,
    source: str = "the state dict",
    hint: str = "pass the model it was saved from",
) -> nn.Module:
    """``model`` (freshly built, unmodified; changed in place) in ``form``, its weights from ``state_dict``.

    ``"acified"``: ``plan``'s blocks built in; ``"plain"``: those blocks fused; ``"original"``: the model as it is
    (``plan`` may be None).  ``state_dict``, when given, is loaded strictly; a mismatch names ``source`` and ``hint``.
    """
    if form not in FILE_FORMATS:
        raise ACNetError(f"unknown format {form!r}: use one of {', '.join(FILE_FORMATS)}")
    if form != "original":
        if plan is None:
            raise ACNetError(f"the {form} form is built by a plan: pass the plan the weights were written with")
        _check_kinds(plan, source)
        api.apply_plan(model, plan)
        if form == "plain" and (has_blocks(model) or has_masks(model)):
            api.deploy(model, inplace=True, check=False)  # the structure only: the weights come from state_dict
    if state_dict is not None:
        checkpoint.load_strict(model, state_dict, source=source, hint=hint)
    return model


def rebuild_from_checkpoint(
    model: nn.Module,
    ckpt: checkpoint.Checkpoint,
    *,
    source: str,
    options: Mapping[str, object] | None = None,
    example_inputs: tuple | None = None,
    hint: str | None = None,
) -> str:
    """Rebuild ``model`` (freshly built, unmodified; changed in place) in the form ``ckpt`` holds; return the form.

    The structure is the plan ``ckpt`` records; without one, the plan of ``options`` (else those ``ckpt``
    records) on ``example_inputs`` (else a random input of the recorded shape).  A file without acnet metadata
    holds the original model when its keys are the model's, else the acified model (or, when its keys say so, the
    plain one).  ``hint`` says what to check when such a file does not fit; files written by acnet say what they
    were written for.  An acified model without blocks is reported as ``"plain"``.
    """
    form, plan = ckpt.get("format"), ckpt.plan
    hint = _written_for(ckpt) if form is not None or hint is None else hint
    if form is None and set(ckpt.state_dict) == set(model.state_dict()):
        form = "original"
    if form != "original" and plan is None:
        plan = _plan_of_options(model, ckpt, options, example_inputs)
    if form is None:
        acified = api.apply_plan(copy.deepcopy(model), plan)
        form = "acified" if set(ckpt.state_dict) == set(acified.state_dict()) else "plain"
    rebuild(model, plan, form, ckpt.state_dict, source=source, hint=hint)
    return "plain" if form == "acified" and not (has_blocks(model) or has_masks(model)) else form


def _written_for(ckpt: checkpoint.Checkpoint) -> str:
    """What a file says it was written for, to put beside a mismatch."""
    spec, args, model = ckpt.get("spec"), ckpt.get("args"), ckpt.get("model")
    if spec:
        return f"it was written for {spec}" + (f" with arguments {' '.join(args)}" if args else "")
    if model:
        return f"it was written for a {model}: build that model with the same arguments"
    return "the file records no model: pass the model it was saved from"


def _plan_of_options(
    model: nn.Module, ckpt: checkpoint.Checkpoint, options: Mapping[str, object] | None, example_inputs: tuple | None
) -> Plan:
    """The plan of a file that records none: ``plan`` with the options given, else those the file records."""
    chosen = dict(ckpt.get("options") or {}) if options is None else dict(options)
    if example_inputs is None and ckpt.get("input_shape"):
        example_inputs = (torch.randn(ckpt.get("input_shape"), generator=torch.Generator().manual_seed(0)),)
    structure = {name: value for name, value in chosen.items() if name not in NOT_STRUCTURE}
    return api.plan(model, example_inputs=example_inputs, **structure)


def _check_kinds(plan: Plan, source: str) -> None:
    missing = sorted({site.kind for site in plan.converted} - set(kinds()))
    if missing:
        raise ACNetError(
            f"{source} uses block kind {missing[0]!r}, which is not registered: import the module that calls "
            f"register_block({missing[0]!r}, ...) before loading"
        )
