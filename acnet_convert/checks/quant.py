"""Per-layer quantisation readiness of a deployed model: weight outliers, SQNR at each bit width, optional INT8 PTQ.

Weights are measured as ``checks.weights`` describes (symmetric max-abs scales, SQNR capped at ``SQNR_CAP_DB``).
The weight measured is the one a quantiser sees: a BatchNorm that alone consumes a layer's output is folded in
first, as PyTorch's FX quantisation and ONNX exporters do.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, fx, nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..blocks import is_block
from ..errors import ACNetError, first_line, warn
from ..modules import modes_kept
from .outputs import layer_outputs
from .ptq import PTQResult, static_int8_ptq
from .weights import SQNR_CAP_DB, WeightFigures, weight_figures

LAYERS = (nn.modules.conv._ConvNd, nn.Linear)
DB_PER_BIT = 20 * math.log10(2)  # one bit more halves the step: 6.02 dB more SQNR
DEFAULT_THRESHOLD_DB = 30.0  # at 8 bits: rounding noise above 0.1% of the weight energy, max|w| beyond ~14 std
DEFAULT_MARGIN_DB = 3.0  # half a bit: the rounding noise energy doubled relative to the reference layer
PER_CHANNEL_ADVICE = (
    "quantise this layer's weights per output channel, which passes the rule (PyTorch's x86/fbgemm default "
    "qconfigs do; ONNX Runtime needs per_channel=True)"
)
KEEP_ADVICE = (
    "keep this layer in higher precision (float16 or 16-bit weights), or retrain with acify(..., mode=\"fast\") "
    "or block=\"qarepvgg\" and check again"
)


@dataclass
class LayerReport:
    """The figures of one conv or linear layer, the reference's for the same name, and the verdict."""

    name: str
    type: str
    shape: list[int]
    bn: str | None  # the BatchNorm folded into the weight before measuring, if any
    figures: WeightFigures
    reference: WeightFigures | None
    flagged: bool
    reason: str  # why the layer is flagged; '' when it is not
    advice: str  # what to do about it; '' when it is not flagged

    def to_dict(self) -> dict:
        """The layer's figures flat beside its name, verdict and the reference's figures (or None)."""
        reference = self.reference.to_dict() if self.reference else None
        head = {"name": self.name, "type": self.type, "shape": list(self.shape), "bn": self.bn}
        verdict = {"flagged": self.flagged, "reason": self.reason, "advice": self.advice, "reference": reference}
        return {**head, **self.figures.to_dict(), **verdict}


@dataclass
class QuantReport:
    """Every conv and linear layer of a model with its quantisation figures, plus the INT8 PTQ check when run."""

    layers: list[LayerReport]
    bits: tuple[int, ...]
    threshold_db: float
    margin_db: float
    ptq: PTQResult | None = None
    reference_ptq: PTQResult | None = None

    @property
    def key(self) -> str:
        """The bit width the flags and the summary use (the first of ``bits``), e.g. ``"int8"``."""
        return f"int{self.bits[0]}"

    @property
    def flagged(self) -> list[LayerReport]:
        """The layers that break the flag rule."""
        return [layer for layer in self.layers if layer.flagged]

    @property
    def worst(self) -> LayerReport:
        """The layer with the lowest per-tensor SQNR at the first bit width."""
        return min(self.layers, key=lambda layer: layer.figures.sqnr_db[self.key]["per_tensor"])

    @property
    def rule(self) -> str:
        """The flag rule in words."""
        return (
            f"{self.key} per-tensor weight SQNR below {self.threshold_db:.1f} dB, or more than "
            f"{self.margin_db:.1f} dB below the reference layer's"
        )

    def to_dict(self) -> dict:
        """A JSON-ready record: settings, the rule, every layer and the PTQ check (None when not run)."""
        ptq = None
        if self.ptq:
            ptq = {**self.ptq.to_dict(), "reference": self.reference_ptq.to_dict() if self.reference_ptq else None}
        record = {
            "bits": list(self.bits), "threshold_db": self.threshold_db, "margin_db": self.margin_db,
            "sqnr_cap_db": SQNR_CAP_DB, "flag_rule": self.rule, "summary": self.summary(),
            "layers": [layer.to_dict() for layer in self.layers], "ptq": ptq,
        }  # fmt: skip
        return _finite(record)

    def summary(self) -> str:
        """One line: the worst layer with its SQNR (and the reference's), the flag count and the PTQ outcome."""
        worst = self.worst
        line = f"worst layer {worst.name or '<root>'} ({worst.type}): {self.key} per-tensor SQNR "
        line += f"{worst.figures.sqnr_db[self.key]['per_tensor']:.1f} dB"
        if worst.reference:
            line += f" (reference {worst.reference.sqnr_db[self.key]['per_tensor']:.1f} dB)"
        line += f"; {len(self.flagged)} of {len(self.layers)} layers flagged"
        if self.ptq:
            line += f"; INT8 PTQ top-1 agreement {self.ptq.top1_agreement:.1%}"
            if self.reference_ptq:
                line += f" (reference {self.reference_ptq.top1_agreement:.1%})"
            line += f", relative output error {self.ptq.relative_error:.3g}"
        return line

    def table(self) -> list[list[str]]:
        """Rows of strings, the header first; a figure with a reference reads ``model (reference)``."""
        with_ranges = any(layer.figures.activation for layer in self.layers)
        header = ["layer", "type", "max|w|/std", "channel max/median", "centre cross"]
        header += [f"int{b} {scope} dB" for b in self.bits for scope in ("tensor", "channel")]
        header += ["output range"] * with_ranges + ["flag", "advice"]
        rows = [header]
        for layer in self.layers:
            fig, ref = layer.figures, layer.reference
            row = [layer.name or "<root>", layer.type]
            row += [_pair(getattr(fig, f), ref and getattr(ref, f), ".2f") for f in ("max_over_std", "channel_spread")]
            row.append(_pair(fig.centre_cross_energy, ref and ref.centre_cross_energy, ".0%"))
            row += [_pair(fig.sqnr_db[f"int{b}"][scope], ref and ref.sqnr_db[f"int{b}"][scope], ".1f")
                    for b in self.bits for scope in ("per_tensor", "per_channel")]  # fmt: skip
            row += [_range(fig.activation)] * with_ranges
            rows.append([*row, "FLAG" if layer.flagged else "", layer.advice])
        return rows

    def __str__(self) -> str:
        """The table as aligned plain text, followed by the summary line."""
        rows = self.table()
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
        lines = ["  ".join([*(cell.ljust(w) for cell, w in zip(row, widths)), row[-1]]).rstrip() for row in rows]
        return "\n".join([*lines, self.summary()])


def quant_report(
    model: nn.Module,
    *,
    reference: nn.Module | None = None,
    inputs: Tensor | tuple[Tensor, ...] | None = None,
    bits: tuple[int, ...] = (8, 4),
    threshold_db: float | None = None,
    margin_db: float = DEFAULT_MARGIN_DB,
    ptq: bool = True,
) -> QuantReport:
    """Measure how well every conv and linear layer of a deployed ``model`` survives quantisation.

    Weight figures for each layer, the BatchNorm that follows it folded in (and the same for ``reference``'s
    layer of the same name, e.g. the unconverted model); a layer is flagged when its per-tensor SQNR at
    ``bits[0]`` is below ``threshold_db`` (default 30 dB at 8 bits, 6.02 dB less per bit fewer) or more than
    ``margin_db`` below the reference's.  With ``inputs`` the output range of each layer is recorded and, unless
    ``ptq=False``, a CPU copy is statically quantised to INT8 (calibrated on ``inputs``) and compared with the
    float model.
    """
    bits = _check_bits(bits)
    threshold = DEFAULT_THRESHOLD_DB - DB_PER_BIT * (8 - bits[0]) if threshold_db is None else float(threshold_db)
    layers, bns = _layers(model, "model"), _batchnorms(model)
    ref_layers = _layers(reference, "reference") if reference is not None else {}
    ref_bns = _batchnorms(reference) if reference is not None else {}
    if reference is not None and not ref_layers.keys() & layers.keys():
        raise ACNetError(
            "reference shares no layer names with model: pass the same architecture before conversion "
            "(acify keeps every conv's name, so the unconverted model or the baseline you trained matches)"
        )
    inputs = _inputs(inputs)
    ranges = _activation_ranges(model, layers, inputs) if inputs else {}
    ref_ranges = _activation_ranges(reference, ref_layers, inputs) if inputs and reference is not None else {}
    report = QuantReport([], bits, threshold, float(margin_db))
    for name, module in layers.items():
        figures = weight_figures(module, bits, ranges.get(name), _folded(model, bns, name))
        ref = None
        if name in ref_layers:
            ref = weight_figures(ref_layers[name], bits, ref_ranges.get(name), _folded(reference, ref_bns, name))
        flagged, reason, advice = _judge(figures, ref, report.key, threshold, report.margin_db)
        shape, layer_type = list(module.weight.shape), type(module).__name__
        report.layers.append(LayerReport(name, layer_type, shape, bns.get(name), figures, ref, flagged, reason, advice))
    if inputs and ptq:
        report.ptq = static_int8_ptq(model, inputs)
        report.reference_ptq = static_int8_ptq(reference, inputs) if reference is not None else None
    return report


def _judge(fig: WeightFigures, ref: WeightFigures | None, key: str, threshold: float, margin: float):
    """Whether the layer breaks the flag rule at ``key``, why, and the advice that fits."""
    tensor, channel = fig.sqnr_db[key]["per_tensor"], fig.sqnr_db[key]["per_channel"]
    reasons = [f"{key} per-tensor SQNR {tensor:.1f} dB < {threshold:.1f} dB"] * (tensor < threshold)
    if ref is not None and ref.sqnr_db[key]["per_tensor"] - tensor > margin:
        reasons.append(f"{ref.sqnr_db[key]['per_tensor'] - tensor:.1f} dB below the reference")
    if not reasons:
        return False, "", ""
    channel_ok = channel >= threshold and (ref is None or ref.sqnr_db[key]["per_channel"] - channel <= margin)
    return True, "; ".join(reasons), PER_CHANNEL_ADVICE if channel_ok else KEEP_ADVICE


def _layers(model: nn.Module, what: str) -> dict[str, nn.Module]:
    """The conv and linear layers of a plain model by qualified name; ``ACNetError`` for an unfused one."""
    if not isinstance(model, nn.Module):
        raise ACNetError(f"quant_report needs an nn.Module as {what}, got {type(model).__name__}")
    blocks = [name for name, m in model.named_modules() if is_block(m)]
    if blocks:
        raise ACNetError(
            f"{what} still has {len(blocks)} training block(s) (first: {blocks[0] or '<root>'}): "
            f"quantise the deployed model, deploy({what}) first"
        )
    layers = {name: m for name, m in model.named_modules() if isinstance(m, LAYERS)}
    if not layers:
        raise ACNetError(f"{what} has no conv or linear layer to report on: pass the network, not a part without any")
    return layers


def _batchnorms(model: nn.Module) -> dict[str, str]:
    """For each conv or linear layer whose output only a BatchNorm (with running statistics) reads, that BatchNorm."""
    if not any(isinstance(m, _BatchNorm) for m in model.modules()):
        return {}
    try:
        graph = fx.symbolic_trace(model).graph
    except Exception as exc:  # torch.fx raises many types for code it cannot trace
        warn(
            f"torch.fx cannot trace {type(model).__name__} ({first_line(exc, with_type=False)}): quant_report "
            "measures its conv weights without folding in the BatchNorms after them; measure a traceable model for "
            "the folded figures"
        )
        return {}
    modules = dict(model.named_modules())
    found = {}
    for node in graph.nodes:
        users = list(node.users)
        if node.op != "call_module" or not isinstance(modules.get(node.target), LAYERS) or len(users) != 1:
            continue
        bn = modules.get(users[0].target) if users[0].op == "call_module" else None
        if isinstance(bn, _BatchNorm) and bn.running_var is not None:
            found[node.target] = users[0].target
    return found


def _folded(model: nn.Module, bns: dict[str, str], name: str) -> nn.Module | None:
    """The BatchNorm to fold into layer ``name`` of ``model``, if ``bns`` has one."""
    return model.get_submodule(bns[name]) if name in bns else None


def _check_bits(bits) -> tuple[int, ...]:
    """``bits`` as a non-empty tuple of widths from 2 to 16."""
    bits = (bits,) if isinstance(bits, int) else tuple(bits)
    if not bits or any(not isinstance(b, int) or not 2 <= b <= 16 for b in bits):
        raise ACNetError(f"bits={bits!r}: give bit widths from 2 to 16, e.g. bits=(8, 4)")
    return bits


def _inputs(inputs) -> tuple[Tensor, ...]:
    """``inputs`` as a tuple of tensors (empty when None)."""
    if inputs is None:
        return ()
    inputs = (inputs,) if isinstance(inputs, Tensor) else tuple(inputs)
    if not inputs or not all(isinstance(x, Tensor) for x in inputs):
        raise ACNetError(
            "inputs must be a tensor or a tuple of tensors for model(*inputs), e.g. torch.randn(8, 3, 32, 32)"
        )
    return inputs


def _activation_ranges(model: nn.Module, layers: dict[str, nn.Module], inputs: tuple) -> dict[str, dict[str, float]]:
    """The min and max of every layer's output while ``model`` runs once on ``inputs`` in eval mode."""
    ranges: dict[str, dict[str, float]] = {}

    def widen(name: str, out: object) -> None:
        if isinstance(out, Tensor) and out.is_floating_point() and out.numel():
            low, high = out.min().item(), out.max().item()
            seen = ranges.setdefault(name, {"min": low, "max": high})
            seen["min"], seen["max"] = min(seen["min"], low), max(seen["max"], high)

    with layer_outputs(layers, widen), modes_kept(model, training=False), torch.no_grad():
        model(*inputs)
    return ranges


def _pair(value: float | None, ref: float | None, spec: str) -> str:
    """``value`` formatted, followed by the reference's in brackets when there is one."""
    text = "-" if value is None else format(value, spec)
    return text if ref is None else f"{text} ({format(ref, spec)})"


def _range(activation: dict | None) -> str:
    """An output range as ``[min, max]``, or ``-`` when the layer did not run."""
    return "-" if activation is None else f"[{activation['min']:.3g}, {activation['max']:.3g}]"


def _finite(value):
    """``value`` with every non-finite float (an overflowing activation, a NaN output) replaced by None."""
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_finite(item) for item in value]
    return None if isinstance(value, float) and not math.isfinite(value) else value
