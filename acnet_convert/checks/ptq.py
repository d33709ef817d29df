"""Static INT8 post-training quantisation on the CPU, the one place that touches ``torch.ao.quantization``.

PyTorch marks ``torch.ao.quantization`` deprecated (in favour of torchao's PT2E flow, a separate package), but
its FX path still runs on a stock CPU build and needs nothing else installed.  Its warnings are recorded on the
result (``upstream_warnings``) instead of being shown, and ``path`` says which flow produced the figures.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor, nn

from ..errors import ACNetError, first_line
from .outputs import float_tensors

ENGINES = ("x86", "fbgemm")  # CPU engines whose default qconfig mapping quantises weights per channel
PATH = "torch.ao.quantization.quantize_fx (prepare_fx/convert_fx), default static qconfig mapping, per-channel weights"
SKIP_HINT = "pass ptq=False to quant_report to keep the weight figures and activation ranges only"


@dataclass
class PTQResult:
    """How far a statically INT8-quantised copy of a model lands from the float model on the calibration inputs."""

    path: str  # the quantisation flow used
    engine: str  # the quantized engine the copy ran on
    max_abs_error: float  # max |float output - quantised output| over every floating output tensor
    relative_error: float  # max_abs_error / max |float output|
    top1_agreement: float  # share of positions whose argmax over the last dim is the same in both outputs
    upstream_warnings: list[str] = field(default_factory=list)  # first line of each distinct torch warning, recorded

    def to_dict(self) -> dict:
        """A JSON-ready copy of every field."""
        return asdict(self)


def static_int8_ptq(model: nn.Module, inputs: tuple[Tensor, ...]) -> PTQResult:
    """Quantise a CPU copy of ``model`` (static INT8, calibrated on ``inputs``) and compare it with the float copy."""
    engine = engine_name()
    float_model = copy.deepcopy(model).cpu().eval()
    cpu_inputs = tuple(x.cpu() for x in inputs)
    with warnings.catch_warnings(record=True) as caught, quantized_engine(engine), torch.no_grad():
        warnings.simplefilter("always")
        want = float_model(*cpu_inputs)
        quantized = quantize_int8(copy.deepcopy(float_model), cpu_inputs, engine)
        got = _run(quantized, cpu_inputs, engine)
    notes = list(dict.fromkeys(" ".join(first_line(w.message, with_type=False).split()) for w in caught))
    return _compare(want, got, engine, notes)


def engine_name() -> str:
    """The first of ``ENGINES`` this torch build supports; ``ACNetError`` when it has none."""
    supported = list(torch.backends.quantized.supported_engines)
    for engine in ENGINES:
        if engine in supported:
            return engine
    raise ACNetError(
        f"ptq: this torch build has no {' or '.join(ENGINES)} quantized engine "
        f"(it has {', '.join(supported) or 'none'}): install the standard x86 CPU build of torch, or {SKIP_HINT}"
    )


@contextmanager
def quantized_engine(engine: str) -> Iterator[None]:
    """Select ``engine`` for quantized ops while inside, then restore the previous one."""
    previous = torch.backends.quantized.engine
    torch.backends.quantized.engine = engine
    try:
        yield
    finally:
        torch.backends.quantized.engine = previous


def quantize_int8(model: nn.Module, inputs: tuple[Tensor, ...], engine: str) -> nn.Module:
    """``model`` statically quantised to INT8: traced, calibrated on ``inputs`` and converted with the default
    static qconfig mapping of ``engine`` (run the result inside ``quantized_engine(engine)``)."""
    try:
        from torch.ao.quantization import get_default_qconfig_mapping
        from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx
    except ImportError as exc:
        raise ACNetError(f"ptq: this torch has no torch.ao.quantization FX flow ({exc}); {SKIP_HINT}") from exc
    try:
        prepared = prepare_fx(model, get_default_qconfig_mapping(engine), inputs)
    except Exception as exc:  # torch.fx raises many types for code it cannot trace
        raise ACNetError(
            f"ptq: torch.fx cannot trace {type(model).__name__} ({first_line(exc, with_type=False)}): make its "
            f"forward traceable (no Python control flow on tensor values), or {SKIP_HINT}"
        ) from exc
    _run(prepared, inputs, engine)
    return convert_fx(prepared)


def _run(model: nn.Module, inputs: tuple[Tensor, ...], engine: str):
    """``model(*inputs)``, with a failing quantized op reported as ``ACNetError``."""
    try:
        return model(*inputs)
    except (RuntimeError, NotImplementedError) as exc:
        raise ACNetError(
            f"ptq: the INT8 model does not run on the {engine} engine ({first_line(exc, with_type=False)}): "
            f"quantise the layers the engine supports by hand, or {SKIP_HINT}"
        ) from exc


def _compare(want, got, engine: str, notes: list[str]) -> PTQResult:
    """Output error and top-1 agreement of the quantised outputs ``got`` against the float outputs ``want``."""
    pairs = [(a.double(), b.double()) for a, b in zip(float_tensors(want), float_tensors(got)) if a.numel()]
    if not pairs:
        raise ACNetError(f"ptq: the model returns no floating-point tensor to compare: return one, or {SKIP_HINT}")
    max_abs = max((a - b).abs().max().item() for a, b in pairs)
    max_ref = max(a.abs().max().item() for a, _ in pairs)
    same = sum((a.argmax(-1) == b.argmax(-1)).sum().item() for a, b in pairs)
    positions = sum(a.argmax(-1).numel() for a, _ in pairs)
    return PTQResult(PATH, engine, max_abs, max_abs / max(max_ref, 1e-12), same / positions, notes)
