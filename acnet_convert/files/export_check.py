"""Exports checked against the deployed model: run on several inputs, written all or none, and a traced file
refused where the plan says the model's path may depend on its input.

A tracing exporter (TorchScript, or ONNX's when ``torch.export`` cannot capture the model) records the path the
example input took; each file is therefore run on the example, on the example negated (a branch on a sign or a
threshold takes its other side) and on random inputs at another batch size, and says which inputs it was checked on.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

from ..api import PLAN_ATTR
from ..checks.verify import Comparison, verify
from ..constants import ARTIFACT_FORMATS
from ..errors import ACNetError, VerificationError, warn
from . import checkpoint
from .export import RUNNERS, Exported, export_onnx, export_pt2, export_torchscript, load_artifact
from .inputs import at_batch, random_inputs

OnCheck = Callable[[str, Comparison], None]


def export_checked(
    model: nn.Module,
    inputs: tuple[Tensor, ...],
    path: str | Path,
    format: str,
    *,
    opset: int | None = None,
    dynamic: bool = True,
    force: bool = False,
    rtol: float = 1e-4,
    shapes: list[tuple[int, ...]] | None = None,
    allow_traced: bool = False,
    on_check: OnCheck | None = None,
) -> Exported:
    """Export ``model`` (deployed, on the CPU) as ``format`` to ``path``, kept only if it computes the same.

    The file is run on ``inputs``, on ``inputs`` negated and on random inputs (of ``shapes``, default the inputs'
    shapes) at another batch size when the batch is dynamic; outputs that differ beyond ``rtol`` (relative to
    max(1, max|ref|)) raise ``VerificationError`` and leave ``path`` as it was.  A traced file of a model whose plan
    has convs decided by the example run is refused unless ``allow_traced``.  ``on_check`` sees each comparison.
    """
    return export_all(model, inputs, {format: path}, opset=opset, dynamic=dynamic, force=force, rtol=rtol,
                      shapes=shapes, allow_traced=allow_traced, on_check=on_check)[0]  # fmt: skip


def export_all(
    model: nn.Module,
    inputs: tuple[Tensor, ...],
    targets: Mapping[str, str | Path],
    *,
    opset: int | None = None,
    dynamic: bool = True,
    force: bool = False,
    rtol: float = 1e-4,
    shapes: list[tuple[int, ...]] | None = None,
    allow_traced: bool = False,
    on_check: OnCheck | None = None,
) -> list[Exported]:
    """``export_checked`` for each format -> path of ``targets``: every file is written, or none is."""
    for format in targets:
        if format not in ARTIFACT_FORMATS:
            raise ACNetError(f"unknown export format {format!r}: use one of {', '.join(ARTIFACT_FORMATS)}")
    runs = check_inputs(model, inputs, dynamic=dynamic, shapes=shapes)
    with contextlib.ExitStack() as files:  # each file is moved into place only once every file has passed
        written = []
        for format, path in targets.items():
            tmp = files.enter_context(checkpoint.atomic_output(path, force=force))
            written.append(_export_one(model, runs, Path(path), format, tmp, opset=opset, dynamic=dynamic, rtol=rtol,
                                       allow_traced=allow_traced, on_check=on_check))  # fmt: skip
    return written


def check_inputs(
    model: nn.Module, inputs: tuple[Tensor, ...], *, dynamic: bool, shapes: list[tuple[int, ...]] | None
) -> list[tuple[str, tuple[Tensor, ...]]]:
    """The inputs an export is checked on, each with its description: the example first (the one traced)."""
    batch = int(inputs[0].shape[0])
    runs = [(f"the example (batch {batch})", inputs)]
    if any(x.is_floating_point() for x in inputs):
        runs.append((f"the example negated (batch {batch})", tuple(-x if x.is_floating_point() else x for x in inputs)))
    other = (1 if batch > 1 else 3) if dynamic else batch
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    others = at_batch(shapes or [tuple(x.shape) for x in inputs], other)
    runs.append((f"random inputs (batch {other})", random_inputs(others, dtype, seed=1)))
    return runs


def _export_one(
    model: nn.Module, runs: list[tuple[str, tuple[Tensor, ...]]], path: Path, format: str, tmp: Path, *,
    opset: int | None, dynamic: bool, rtol: float, allow_traced: bool, on_check: OnCheck | None,
) -> Exported:  # fmt: skip
    """One file written to ``tmp`` and checked on every run; named ``path`` in what it says."""
    example = runs[0][1]
    batch = int(example[0].shape[0])
    # a batch of 1 would be recorded as a constant: export at 2 so that the dynamic dimension stays symbolic
    traced_on = example if not dynamic or batch > 1 else tuple(t.repeat(2, *[1] * (t.dim() - 1)) for t in example)
    if format == "onnx":
        exported = export_onnx(model, traced_on, tmp, opset=opset, dynamic=dynamic)
    elif format == "pt2":
        exported = export_pt2(model, traced_on, tmp, dynamic=dynamic)
    else:
        exported = export_torchscript(model, traced_on, tmp)
    checked = [what for what, _ in runs]
    if exported.traced:
        _refuse_input_dependent(model, path, exported, allow_traced)
        how = f"torch.export could not capture the model ({exported.fallback}); the tracing exporter" if (
            exported.fallback) else "TorchScript"  # fmt: skip
        warn(
            f"{how} recorded in {path} only the path the example took through the model: it is checked on "
            f"{listing(checked)}, and other inputs may take other paths"
        )
    artifact = load_artifact(tmp, format=format)
    failed = None
    for what, x in runs:
        label = f"{RUNNERS[format]} ({path}) vs deployed on {what}"
        result = verify(model, artifact, *x, rtol=math.inf)
        if on_check is not None:
            on_check(label, result)
        if result.relative > rtol and failed is None:
            failed = check_failure(label, result, rtol, cause=_traced_cause(exported) if x is not example else "")
    if failed is not None:
        raise failed
    exported.path, exported.checked_on = path, checked
    return exported


def _refuse_input_dependent(model: nn.Module, path: Path, exported: Exported, allow_traced: bool) -> None:
    """``ACNetError`` for a traced file of a model whose plan says its path may depend on the input."""
    plan = getattr(model, PLAN_ATTR, None)
    decided = plan.input_dependent if plan is not None else []
    if allow_traced or not decided:
        return
    names = ", ".join(decided[:3]) + (", ..." if len(decided) > 3 else "")
    advice = "" if exported.fallback else "use export_pt2 where torch.export can capture the model, or "
    raise ACNetError(
        f"{path} would be traced, recording only the path the example took, and the model's plan has "
        f"{len(decided)} conv(s) decided by the example run ({names}), so its path may depend on the input: "
        f"{advice}pass allow_traced=True to write it, checked on the example, its negation and random inputs only"
    )


def check_failure(label: str, result: Comparison, rtol: float, *, cause: str = "") -> VerificationError:
    """The error of a comparison beyond ``rtol``, naming it and its likely ``cause``."""
    return VerificationError(
        f"check {label} failed: max abs error {result.max_abs:.3g}, relative {result.relative:.3g} exceeds "
        f"rtol={rtol:g}; {cause or 'did the model change after deploy, or is it not deterministic in eval?'}"
    )


def _traced_cause(exported: Exported) -> str:
    """Why a traced file computes something else on an input other than its example ('' for a file not traced)."""
    if not exported.traced:
        return ""
    fix = "make the model capturable by torch.export (torch.cond for a branch on tensor values)" if (
        exported.fallback) else "use export_pt2 where torch.export can capture the model"  # fmt: skip
    return f"the file was traced: it holds the path the example took, and this input takes another; {fix}"


def listing(items: list[str]) -> str:
    """'a', 'a and b', 'a, b and c'."""
    return " and ".join(items) if len(items) < 3 else f"{', '.join(items[:-1])} and {items[-1]}"
