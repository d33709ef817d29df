"""Exported artifacts of a deployed model: ONNX, ``torch.export`` programs (``.pt2``) and TorchScript.

Each exporter writes one file for ``model(*inputs)``; ``load_artifact`` reads any of them back as a callable
module, so that an artifact can be compared with the model it came from. Inputs are named ``input`` (or
``input_0`` ... ``input_n``); outputs ``output``, ``output_0`` ... ``output_n``, or the keys of a dict output.
The batch (first) dimension of every input is dynamic unless ``dynamic=False``.
"""

from __future__ import annotations

import contextlib
import io
import re
import warnings
import zipfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_map

from ..errors import ACNetError

KINDS = ("onnx", "pt2", "torchscript")
_OUTPUT_INDEX = re.compile(r"output_\d+")


@dataclass
class Exported:
    """What an exporter wrote: the file, its kind, the names of its inputs and outputs, and how it was made."""

    path: Path
    kind: str
    input_names: list[str]
    output_names: list[str]
    dynamic: bool
    opset: int | None = None
    fallback: str = ""  # why torch.export could not capture the model, when the tracing exporter wrote the file
    notes: list[str] = field(default_factory=list)


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
    _require("onnx", "onnxruntime", "onnxscript")
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
        fallback = _first_line(exc)
        axes = {name: {0: "batch"} for name in [*names, *outputs]} if dynamic else None
        try:
            with quiet():
                torch.onnx.export(model, inputs, str(path), dynamic_axes=axes, dynamo=False, **common)
        except Exception as exc2:
            raise ACNetError(
                f"ONNX export failed ({_first_line(exc2)}): acnet deploy --format plain still works"
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
            f"torch.export cannot capture the model ({_first_line(exc)}): export --onnx (which falls back to the "
            "tracing exporter) or --torchscript instead"
        ) from exc
    Path(path).write_bytes(buffer.getvalue())
    return Exported(Path(path), "pt2", input_names(len(inputs)), _output_names(model, inputs), dynamic)


def export_torchscript(model: nn.Module, inputs: tuple[Tensor, ...], path: str | Path) -> Exported:
    """Trace ``model`` on ``inputs`` with ``torch.jit.trace`` (deprecated by torch) and save it."""
    try:
        with quiet():
            torch.jit.save(torch.jit.trace(model, inputs, strict=False), str(path))
    except Exception as exc:
        raise ACNetError(f"TorchScript tracing failed ({_first_line(exc)}): try --pt2 or --onnx") from exc
    return Exported(Path(path), "torchscript", input_names(len(inputs)), _output_names(model, inputs), True)


def artifact_kind(path: str | Path) -> str | None:
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


def load_artifact(path: str | Path, *, kind: str | None = None, device: str = "cpu") -> Artifact:
    """An exported file (of ``kind``, else recognised by ``artifact_kind``) as a module that runs it on the CPU."""
    path = Path(path)
    if not path.is_file():
        raise ACNetError(f"{path} not found: check the path")
    kind = kind or artifact_kind(path)
    if kind not in KINDS:
        raise ACNetError(f"{path} is not an exported model: give an .onnx, .pt2 or TorchScript file")
    try:
        with quiet():
            if kind == "onnx":
                runner = OnnxModel(path)
            elif kind == "pt2":
                runner = torch.export.load(io.BytesIO(path.read_bytes())).module()
            else:
                runner = torch.jit.load(str(path), map_location="cpu")
    except ACNetError:
        raise
    except Exception as exc:
        raise ACNetError(f"{path} is not a readable {kind} file ({_first_line(exc)}): export it again") from exc
    return Artifact(runner, kind, device)


class Artifact(nn.Module):
    """An exported model's runner, fed on the CPU; its outputs come back on ``device``."""

    def __init__(self, runner: object, kind: str, device: str = "cpu"):
        super().__init__()
        self.__dict__["runner"] = runner  # not a submodule: eval() and train() leave the exported program alone
        self.kind, self.device = kind, device

    def forward(self, *inputs: Tensor):
        with torch.no_grad(), quiet():
            output = self.runner(*(x.cpu() for x in inputs))
        return tree_map(lambda t: t.to(self.device) if isinstance(t, Tensor) else t, output)


class OnnxModel(nn.Module):
    """An ONNX file run by onnxruntime on the CPU, called like the model it was exported from."""

    def __init__(self, path: str | Path):
        super().__init__()
        _require("onnxruntime")
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


def _require(*modules: str) -> None:
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


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__
