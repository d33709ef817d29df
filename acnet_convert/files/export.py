"""Exported artifacts of a deployed model: ONNX, ``torch.export`` programs (``.pt2``) and TorchScript.

Each exporter writes one file for ``model(*inputs)``; ``load_artifact`` reads any of them back as a callable
module, so that an artifact can be compared with the model it came from (``export_check`` does both). A traced
file says so in its own metadata, and ``load_artifact`` reads it back. Inputs are named ``input`` (or
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

from ..constants import ARTIFACT_FORMATS
from ..errors import ACNetError, first_line, in_one_line

MARK, TRACED = "acnet_convert.export", "traced"  # the metadata entry of a file that holds one traced path
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
    checked_on: list[str] = field(default_factory=list)  # the inputs the file was checked on, described

    @property
    def traced(self) -> bool:
        """Whether the file holds only the path its example input took (TorchScript, or ONNX's tracing exporter)."""
        return self.format == "torchscript" or bool(self.fallback)


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
        fallback = in_one_line(exc.__cause__ or exc)  # torch.onnx wraps torch.export's error in steps to take
        axes = {name: {0: "batch"} for name in [*names, *outputs]} if dynamic else None
        try:
            with quiet():
                torch.onnx.export(model, inputs, str(path), dynamic_axes=axes, dynamo=False, **common)
        except Exception as exc2:
            raise ACNetError(
                f"ONNX export failed ({in_one_line(exc2)}): save_weights(model, path, \"plain\") still works"
            ) from exc2
        _mark_traced(path)
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
            f"torch.export cannot capture the model ({in_one_line(exc)}): use export_onnx (which falls back to the "
            "tracing exporter) or export_torchscript instead"
        ) from exc
    Path(path).write_bytes(buffer.getvalue())
    return Exported(Path(path), "pt2", input_names(len(inputs)), _output_names(model, inputs), dynamic)


def export_torchscript(model: nn.Module, inputs: tuple[Tensor, ...], path: str | Path) -> Exported:
    """Trace ``model`` on ``inputs`` with ``torch.jit.trace`` (deprecated by torch) and save it."""
    try:
        with quiet():
            torch.jit.save(torch.jit.trace(model, inputs, strict=False), str(path), _extra_files={MARK: TRACED})
    except Exception as exc:
        raise ACNetError(f"TorchScript tracing failed ({in_one_line(exc)}): try export_pt2 or export_onnx") from exc
    return Exported(Path(path), "torchscript", input_names(len(inputs)), _output_names(model, inputs), True)


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
    extra = {MARK: ""}
    try:
        with quiet():
            if format == "onnx":
                runner = OnnxModel(path)
                extra[MARK] = runner.metadata.get(MARK, "")
            elif format == "pt2":
                runner = torch.export.load(io.BytesIO(path.read_bytes())).module()
            else:
                runner = torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
    except ACNetError:
        raise
    except Exception as exc:
        raise ACNetError(f"{path} is not a readable {format} file ({first_line(exc)}): export it again") from exc
    return Artifact(runner, format, device, traced=extra[MARK] in (TRACED, TRACED.encode()))  # TorchScript: bytes


class Artifact(nn.Module):
    """An exported model's runner, fed on the CPU; its outputs come back on ``device``; ``traced`` when the file
    says that it holds one traced path."""

    def __init__(self, runner: object, format: str, device: str = "cpu", *, traced: bool = False):
        super().__init__()
        self.__dict__["runner"] = runner  # not a submodule: eval() and train() leave the exported program alone
        self.format, self.device, self.traced = format, device, traced

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

        self.path = Path(path)
        self.session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        self.names = [arg.name for arg in self.session.get_outputs()]
        self.metadata = dict(self.session.get_modelmeta().custom_metadata_map)

    def forward(self, *inputs: Tensor):
        expected = self.session.get_inputs()
        if len(inputs) != len(expected):
            raise ACNetError(f"the ONNX file takes {len(expected)} input(s), {len(inputs)} given")
        for arg, x in zip(expected, inputs):
            self._check_size(arg, tuple(x.shape), len(expected) > 1)
        feed = {arg.name: x.detach().cpu().numpy() for arg, x in zip(expected, inputs)}
        outputs = [torch.from_numpy(y) for y in self.session.run(None, feed)]
        if self.names == ["output"]:
            return outputs[0]
        if all(_OUTPUT_INDEX.fullmatch(name) for name in self.names):
            return tuple(outputs)
        return dict(zip(self.names, outputs))

    def _check_size(self, arg, shape: tuple[int, ...], named: bool) -> None:
        """``ACNetError`` for an input whose size the file fixes otherwise (onnxruntime's own error is many lines)."""
        fixed = [size if isinstance(size, int) else None for size in arg.shape]  # None: a dynamic dimension
        if len(fixed) == len(shape) and all(size in (None, given) for size, given in zip(fixed, shape)):
            return
        size = "x".join("N" if s is None else str(s) for s in fixed)
        dynamic = [i for i, s in enumerate(fixed) if s is None]
        which = "no dimension is dynamic" if not dynamic else "only the batch N is dynamic" if dynamic == [0] else (
            "N marks its dynamic dimensions")  # fmt: skip
        where = f"'s input {arg.name}" if named else ""
        raise ACNetError(
            f"{self.path.name}{where} has a fixed input size {size} ({which}), given {'x'.join(map(str, shape))}: run "
            "it on inputs of that size, or export it again at the size needed"
        )


def _mark_traced(path: str | Path) -> None:
    """Record in an ONNX file's metadata that it holds one traced path."""
    import onnx

    model = onnx.load(str(path))
    onnx.helper.set_model_props(model, {MARK: TRACED})
    onnx.save(model, str(path))


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
