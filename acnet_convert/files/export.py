"""Exported artifacts of a deployed model: ONNX, ``torch.export`` programs (``.pt2``) and TorchScript.

Each exporter writes one file for ``model(*inputs)``; ``load_artifact`` reads any of them back as a callable
module, so that an artifact can be compared with the model it came from; ``export_checked`` does both, and keeps
the file only when it computes what the model computes. Inputs are named ``input`` (or
``input_0`` ... ``input_n``); outputs ``output``, ``output_0`` ... ``output_n``, or the keys of a dict output.
The batch (first) dimension of every input is dynamic unless ``dynamic=False``.
"""

from __future__ import annotations

import contextlib
import io
import math
import re
import warnings
import zipfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_map

from ..checks.verify import Comparison, verify
from ..constants import ARTIFACT_FORMATS
from ..errors import ACNetError, VerificationError, first_line, warn
from . import checkpoint
from .inputs import at_batch, random_inputs

RUNNERS = {"onnx": "onnxruntime", "pt2": "torch.export", "torchscript": "TorchScript"}  # what runs each format
ONNX_MODULES = ("onnx", "onnxruntime", "onnxscript")
_OUTPUT_INDEX = re.compile(r"output_\d+")


@dataclass
class Exported:
    """What an exporter wrote: the file, its format, the names of its inputs and outputs, and how it was made."""

    path: Path
    format: str
    input_names: list[str]
    output_names: list[str]
    dynamic: bool
    opset: int | None = None
    fallback: str = ""  # why torch.export could not capture the model, when the tracing exporter wrote the file
    checked_batches: list[int] = field(default_factory=list)  # the batch sizes export_checked ran the file at


def input_names(count: int) -> list[str]:
    """``["input"]`` for one input, else ``input_0`` ... ``input_{count-1}``."""
    return ["input"] if count == 1 else [f"input_{i}" for i in range(count)]


def output_names(output: object) -> list[str]:
    """The names of a model output's tensors: ``output``, ``output_i`` for a tuple or list, the keys of a dict."""
    if isinstance(output, Tensor):
        return ["output"]
    if isinstance(output, Mapping) and all(isinstance(v, Tensor) for v in output.values()):
        return [str(key) for key in output]
    if isinstance(output, (tuple, list)) and all(isinstance(v, Tensor) for v in output):
        return [f"output_{i}" for i in range(len(output))]
    raise ACNetError(
        f"the model returns a {type(output).__name__} that is not a tensor, a tuple of tensors or a dict of tensors: "
        "export a wrapper module that returns those"
    )


def export_onnx(
    model: nn.Module, inputs: tuple[Tensor, ...], path: str | Path, *, opset: int | None = None, dynamic: bool = True
) -> Exported:
    """Write ``model`` as one self-contained ONNX file with torch.export, else with the tracing exporter."""
    require_onnx()
    names, outputs = input_names(len(inputs)), _output_names(model, inputs)
    common = {"input_names": names, "output_names": outputs, "opset_version": opset}
    try:
        with quiet():
            shapes = _dynamic_shapes(inputs) if dynamic else None
            torch.onnx.export(
                model, inputs, str(path), dynamic_shapes=shapes, dynamo=True, external_data=False, **common
            )
        fallback = ""
    except Exception as exc:  # torch.export raises many types on data-dependent code
        fallback = first_line(exc)
        axes = {name: {0: "batch"} for name in [*names, *outputs]} if dynamic else None
        try:
            with quiet():
                torch.onnx.export(model, inputs, str(path), dynamic_axes=axes, dynamo=False, **common)
        except Exception as exc2:
            raise ACNetError(
                f"ONNX export failed ({first_line(exc2)}): save_weights(model, path, \"plain\") still works"
            ) from exc2
    return Exported(Path(path), "onnx", names, outputs, dynamic, _opset(path), fallback)


def export_pt2(model: nn.Module, inputs: tuple[Tensor, ...], path: str | Path, *, dynamic: bool = True) -> Exported:
    """Capture ``model`` with ``torch.export`` and save the program with ``torch.export.save``."""
    try:
        with quiet():
            program = torch.export.export(model, inputs, dynamic_shapes=_dynamic_shapes(inputs) if dynamic else None)
            buffer = io.BytesIO()
            torch.export.save(program, buffer)
    except Exception as exc:  # torch.export raises many types on code it cannot capture
        raise ACNetError(
            f"torch.export cannot capture the model ({first_line(exc)}): use export_onnx (which falls back to the "
            "tracing exporter) or export_torchscript instead"
        ) from exc
    Path(path).write_bytes(buffer.getvalue())
    return Exported(Path(path), "pt2", input_names(len(inputs)), _output_names(model, inputs), dynamic)


def export_torchscript(model: nn.Module, inputs: tuple[Tensor, ...], path: str | Path) -> Exported:
    """Trace ``model`` on ``inputs`` with ``torch.jit.trace`` (deprecated by torch) and save it."""
    try:
        with quiet():
            torch.jit.save(torch.jit.trace(model, inputs, strict=False), str(path))
    except Exception as exc:
        raise ACNetError(f"TorchScript tracing failed ({first_line(exc)}): try export_pt2 or export_onnx") from exc
    return Exported(Path(path), "torchscript", input_names(len(inputs)), _output_names(model, inputs), True)


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
    on_check: Callable[[str, Comparison], None] | None = None,
) -> Exported:
    """Export ``model`` (deployed, on the CPU) as ``format`` to ``path``, kept only if it computes the same.

    The file is run at the batch size of ``inputs`` and, with a dynamic batch, at another one (random inputs of
    ``shapes``, default the inputs' shapes); outputs that differ beyond ``rtol`` (relative to max(1, max|ref|))
    raise ``VerificationError`` and leave ``path`` as it was.  ``on_check`` sees each comparison, labelled.
    """
    if format not in ARTIFACT_FORMATS:
        raise ACNetError(f"unknown export format {format!r}: use one of {', '.join(ARTIFACT_FORMATS)}")
    batch = int(inputs[0].shape[0])
    traced = inputs if not dynamic or batch > 1 else tuple(t.repeat(2, *[1] * (t.dim() - 1)) for t in inputs)
    with checkpoint.atomic_output(path, force=force) as tmp:
        if format == "onnx":
            exported = export_onnx(model, traced, tmp, opset=opset, dynamic=dynamic)
        elif format == "pt2":
            exported = export_pt2(model, traced, tmp, dynamic=dynamic)
        else:
            exported = export_torchscript(model, traced, tmp)
        if exported.fallback:
            warn(
                f"torch.export could not capture the model ({exported.fallback}); the tracing exporter wrote {path}: "
                "it holds only the path the example input took through data-dependent code"
            )
        artifact = load_artifact(tmp, format=format)
        runs = [(batch, inputs)]
        if dynamic and not exported.fallback:  # a traced file holds the example's path: other inputs may differ
            other = 1 if batch > 1 else 3
            dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
            others = at_batch(shapes or [tuple(x.shape) for x in inputs], other)
            runs.append((other, random_inputs(others, dtype, seed=1)))
        failed = None
        for size, x in runs:
            label = f"{RUNNERS[format]} ({path}) vs deployed at batch {size}"
            result = verify(model, artifact, *x, rtol=math.inf)
            if on_check is not None:
                on_check(label, result)
            if result.relative > rtol and failed is None:
                failed = check_failure(label, result, rtol)
        if failed is not None:
            raise failed
    exported.path, exported.checked_batches = Path(path), [size for size, _ in runs]
    return exported


def check_failure(label: str, result: Comparison, rtol: float) -> VerificationError:
    """The error of a comparison beyond ``rtol``, naming it."""
    return VerificationError(
        f"check {label} failed: max abs error {result.max_abs:.3g}, relative {result.relative:.3g} exceeds "
        f"rtol={rtol:g}; did the model change after deploy, or is it not deterministic in eval?"
    )


def artifact_format(path: str | Path) -> str | None:
    """'onnx', 'pt2' or 'torchscript' for an exported file (by its name or its contents), else None."""
    path = Path(path)
    if path.suffix == ".onnx":
        return "onnx"
    if not zipfile.is_zipfile(path):
        return None
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
    if any(name.endswith("/archive_format") for name in names):
        return "pt2"
    if any("/code/" in name for name in names) and any(name.endswith("/constants.pkl") for name in names):
        return "torchscript"
    return None


def load_artifact(path: str | Path, *, format: str | None = None, device: str = "cpu") -> Artifact:
    """An exported file (of ``format``, else recognised by ``artifact_format``) as a module run on the CPU."""
    path = Path(path)
    if not path.is_file():
        raise ACNetError(f"{path} not found: check the path")
    format = format or artifact_format(path)
    if format not in ARTIFACT_FORMATS:
        raise ACNetError(f"{path} is not an exported model: give an .onnx, .pt2 or TorchScript file")
    try:
        with quiet():
            if format == "onnx":
                runner = OnnxModel(path)
            elif format == "pt2":
                runner = torch.export.load(io.BytesIO(path.read_bytes())).module()
            else:
                runner = torch.jit.load(str(path), map_location="cpu")
    except ACNetError:
        raise
    except Exception as exc:
        raise ACNetError(f"{path} is not a readable {format} file ({first_line(exc)}): export it again") from exc
    return Artifact(runner, format, device)


class Artifact(nn.Module):
    """An exported model's runner, fed on the CPU; its outputs come back on ``device``."""

    def __init__(self, runner: object, format: str, device: str = "cpu"):
        super().__init__()
        self.__dict__["runner"] = runner  # not a submodule: eval() and train() leave the exported program alone
        self.format, self.device = format, device

    def forward(self, *inputs: Tensor):
        with torch.no_grad(), quiet():
            output = self.runner(*(x.cpu() for x in inputs))
        return tree_map(lambda t: t.to(self.device) if isinstance(t, Tensor) else t, output)


class OnnxModel(nn.Module):
    """An ONNX file run by onnxruntime on the CPU, called like the model it was exported from."""

    def __init__(self, path: str | Path):
        super().__init__()
        require_onnx(("onnxruntime",))
        import onnxruntime

        self.session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        self.names = [arg.name for arg in self.session.get_outputs()]

    def forward(self, *inputs: Tensor):
        expected = self.session.get_inputs()
        if len(inputs) != len(expected):
            raise ACNetError(f"the ONNX file takes {len(expected)} input(s), {len(inputs)} given")
        feed = {arg.name: x.detach().cpu().numpy() for arg, x in zip(expected, inputs)}
        outputs = [torch.from_numpy(y) for y in self.session.run(None, feed)]
        if self.names == ["output"]:
            return outputs[0]
        if all(_OUTPUT_INDEX.fullmatch(name) for name in self.names):
            return tuple(outputs)
        return dict(zip(self.names, outputs))


def _output_names(model: nn.Module, inputs: tuple[Tensor, ...]) -> list[str]:
    with torch.no_grad():
        return output_names(model(*inputs))


def _dynamic_shapes(inputs: tuple[Tensor, ...]) -> tuple[dict, ...]:
    """A dynamic first dimension for every input: one shared ``batch`` when all are equal, else one each."""
    if len({x.shape[0] for x in inputs if x.dim()}) <= 1:
        batch = torch.export.Dim("batch", min=1)
        return tuple({0: batch} if x.dim() else {} for x in inputs)
    return tuple({0: torch.export.Dim(f"batch_{i}", min=1)} if x.dim() else {} for i, x in enumerate(inputs))


def _opset(path: str | Path) -> int | None:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return next((entry.version for entry in model.opset_import if entry.domain in ("", "ai.onnx")), None)


def require_onnx(modules: tuple[str, ...] = ONNX_MODULES) -> None:
    """``ACNetError`` naming the extra to install when a module ONNX export or checking needs is missing."""
    for module in modules:
        try:
            __import__(module)
        except ImportError as exc:
            raise ACNetError(f"ONNX needs {module}: pip install 'acnet-convert[onnx]'") from exc


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Hide the progress prints, graph dumps and deprecation warnings of torch's exporters and loaders."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        with contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
