"""Models from the command line's arguments: built from a spec, acified with its options, rebuilt from a checkpoint.

The library decides how a checkpoint is rebuilt (``files.rebuild``); this module adds what only the command line
has: the spec and its stored arguments, the options given as flags, the example inputs and the device, and the
notes and warnings that say what was chosen.
"""

from __future__ import annotations

import copy
import pickle
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..constants import SEARCH_BATCH
from ..errors import ACNetError, first_line
from .examples import Examples
from .options import Structure, acify_options, flag
from .session import Session
from .spec import ModelSpec

if TYPE_CHECKING:
    from torch import nn

    from ..files.checkpoint import Checkpoint

NO_METADATA_HINT = (
    "the file carries no acnet metadata: pass the --arg, --block, --mode, --include, --exclude, "
    "--min-kernel, --max-kernel and --input-shape values used with acnet convert; for a model acified in Python, "
    "write the file with acnet_convert.save_weights(model, path), which records the plan it was acified by"
)


@dataclass
class Loaded:
    """A model rebuilt from a checkpoint, with the form it is in and what it was rebuilt from."""

    spec: ModelSpec
    options: dict
    examples: Examples
    model: nn.Module
    form: str  # "acified", "plain" or "original"
    path: str

    def require(self, form: str, fix: str) -> nn.Module:
        """The model, when it is in ``form``; ``ACNetError`` ending with ``fix`` otherwise."""
        if self.form != form:
            raise ACNetError(f"{self.path} holds the {self.form} model, not the {form} one: {fix}")
        return self.model

    def origin(self) -> dict:
        """What the command line records in the files it writes from this model."""
        return {"spec": self.spec.text, "args": self.spec.args, "options": self.options, **self.examples.recorded()}


def restore(
    session: Session, spec: str, weights: str, key: str | None, arg: list[str] | None, structure: Structure,
    examples: Examples,
) -> Loaded:  # fmt: skip
    """Rebuild the model a checkpoint holds: by the plan it records, else by acify with the options given or stored."""
    from ..files import checkpoint
    from ..files.rebuild import rebuild_from_checkpoint

    ckpt = checkpoint.read(weights, key)
    note_entries(session, weights, ckpt, key)
    model_spec = _stored_spec(session, spec, arg, ckpt, weights)
    given = structure.given()
    if ckpt.plan is not None and given:
        flags = ", ".join(flag(name) for name in given)
        session.warn(f"{flags} ignored: {weights} records the structure it was converted with")
    options = acify_options(ckpt.get("options") or {}, structure=structure)
    stored = ckpt.get("input_shapes") or ([ckpt.get("input_shape")] if ckpt.get("input_shape") else None)
    examples.settle([tuple(shape) for shape in stored] if stored else None)
    with session.spinner(f"rebuilding {spec}"):
        model = model_spec.build().to(examples.device)
        with session.library_warnings(), examples.errors():
            form = rebuild_from_checkpoint(model, ckpt, source=weights, options=options,
                                           example_inputs=examples.first(model), hint=NO_METADATA_HINT)  # fmt: skip
    return Loaded(model_spec, options, examples, model.eval(), form, weights)


def note_entries(session: Session, path: str, ckpt: Checkpoint, key: str | None) -> None:
    """Say which entry of a file with several state dicts was read, and how to choose another."""
    others = [entry for entry in ckpt.entries if entry != ckpt.key]
    if key is None and ckpt.key and others:
        session.note(f"read {ckpt.key!r} of {path}, which also holds {', '.join(others)}: choose with --checkpoint-key")


def _stored_spec(session: Session, spec: str, arg: list[str] | None, ckpt: Checkpoint, path: str) -> ModelSpec:
    """The spec with the --arg values given, else those stored in the checkpoint (and a note saying so)."""
    stored = tuple(ckpt.get("args") or ())
    if not arg and stored:
        written_for = ckpt.get("spec")
        other = f", not {spec}" if written_for and written_for != spec else ""
        session.note(f"using --arg {' '.join(stored)} stored in {path} (written for {written_for}{other})")
    return model_spec(session, spec, arg or list(stored))


def model_spec(session: Session, spec: str, arg: list[str] | None) -> ModelSpec:
    """The spec with its --arg values, parsed before anything slow; recorded in the JSON document."""
    parsed = ModelSpec(spec, tuple(arg or ()))
    parsed.kwargs  # noqa: B018
    session.record.update(spec=spec, args=list(parsed.args))
    return parsed


def check_block(spec: ModelSpec, options: dict) -> None:
    """Every kind --block names is registered, once the spec's module (which may register its own) is imported."""
    from ..blocks import kinds

    spec.factory  # imports the model's module  # noqa: B018
    block = options["block"]
    for kind in [block] if isinstance(block, str) else block.values():
        if kind not in kinds():
            raise ACNetError(
                f"unknown block kind {kind!r} in --block: the registered kinds are {', '.join(kinds())} (a model "
                "file adds its own with acnet_convert.register_block)"
            )


def acified(session: Session, model: nn.Module, options: dict, examples: Examples, *, inplace: bool) -> nn.Module:
    """``acify`` with the example inputs (for code torch.fx cannot trace); its warnings become warning lines."""
    from ..api import acify

    with session.library_warnings(), examples.errors():
        return acify(model, inplace=inplace, example_inputs=examples.first(model), **options)


def searched(
    session: Session, model: nn.Module, options: dict, examples: Examples, batches: list, epochs: int
) -> nn.Module:  # fmt: skip
    """``search_scales`` on ``batches`` with acify's options; its warnings become warning lines."""
    from ..scale_search import search_scales

    structure = {name: value for name, value in options.items() if name not in ("mode", "gamma_init")}
    device = next(model.parameters()).device
    batches = [(x.to(device), y.to(device)) for x, y in batches]
    with session.library_warnings(), examples.errors():
        found = search_scales(model, batches, epochs=epochs, example_inputs=examples.first(model), **structure)
    return found.eval()


def search_batches(path: str, size: int = SEARCH_BATCH) -> list:
    """The (inputs, targets) batches of ``size`` in a .pt file holding an ``inputs`` and a ``targets`` tensor."""
    import torch

    try:
        data = torch.load(path, weights_only=True, map_location="cpu")
    except (OSError, RuntimeError, pickle.UnpicklingError) as exc:
        raise ACNetError(f"cannot read --search-scales {path} ({first_line(exc)}): write it with torch.save") from exc
    inputs, targets = (data.get(key) if isinstance(data, dict) else None for key in ("inputs", "targets"))
    if not (isinstance(inputs, torch.Tensor) and isinstance(targets, torch.Tensor)) or len(inputs) != len(targets):
        raise ACNetError(f"--search-scales {path} must hold {{'inputs': tensor, 'targets': tensor}} of one length: "
                         "torch.save({'inputs': x, 'targets': y}, path)")  # fmt: skip
    return [(inputs[i : i + size], targets[i : i + size]) for i in range(0, len(inputs), size)]


def load_original_weights(session: Session, model: nn.Module, path: str, key: str | None) -> None:
    """Load the weights of the unconverted model into ``model``, strictly; refuse a file acnet wrote."""
    from ..files import checkpoint

    start = checkpoint.read(path, key)
    note_entries(session, path, start, key)
    if start.get("format") is not None:
        raise ACNetError(f"{path} was written by acnet ({start.get('format')}): pass weights of the unconverted model")
    hint = "pass weights of the unconverted model built from SPEC with the same --arg values"
    checkpoint.load_strict(model, start.state_dict, source=path, hint=hint)


def load_shipped(path: str, loaded: Loaded, deployed: nn.Module | None) -> nn.Module:
    """The model a shipped file holds: an exported artifact, or deployed weights (plain or original layout)."""
    from ..files import checkpoint
    from ..files.export import artifact_format, load_artifact

    if artifact_format(path):
        return load_artifact(path, device=loaded.examples.device)
    shipped = checkpoint.read(path)
    form = shipped.get("format")
    if form == "acified":
        raise ACNetError(f"{path} is an acified checkpoint: pass the file written by acnet deploy, or an exported one")
    if form is None:
        form = "plain" if deployed is not None and set(shipped.state_dict) == set(deployed.state_dict()) else "original"
    if form == "plain" and deployed is None:
        raise ACNetError(f"{path} holds plain deployed weights: pass the acified checkpoint as --weights")
    model = copy.deepcopy(deployed) if form == "plain" else loaded.spec.build()
    hint = "pass the file acnet deploy wrote for this SPEC and these weights"
    checkpoint.load_strict(model, shipped.state_dict, source=path, hint=hint)
    return model.to(loaded.examples.device).eval()
