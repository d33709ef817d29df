"""One layer's weight as a quantiser sees it: symmetric max-abs quantisation, SQNR, outliers and centre energy.

For ``b`` bits, ``Q = 2**(b-1) - 1``, ``s = max|w| / Q`` (over the whole tensor, or over each output channel) and
``q(w) = clamp(round(w / s), -Q, Q) * s``, the scheme of most INT8 back ends;
``SQNR = 10 log10(sum w^2 / sum (w - q(w))^2)`` in dB, capped at ``SQNR_CAP_DB`` (an exact representation, e.g.
an all-zero weight), so every figure is a finite float.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn

SQNR_CAP_DB = 200.0


@dataclass
class WeightFigures:
    """What one layer looks like to a quantiser: its weight's outliers and SQNR, and its output range."""

    max_over_std: float | None  # max|w| / std(w) over the whole weight; None for a constant weight
    channel_spread: float | None  # max over median of the per-output-channel max|w|; None when that median is 0
    centre_cross_energy: float | None  # share of sum w^2 on the lines through the kernel's centre tap
    centre_tap_energy: float | None  # share of sum w^2 on the centre tap
    sqnr_db: dict[str, dict[str, float]]  # "int8" -> {"per_tensor": dB, "per_channel": dB}
    activation: dict[str, float] | None = None  # {"min", "max"} of the layer's output over the inputs

    def to_dict(self) -> dict:
        """A JSON-ready copy of every figure."""
        return asdict(self)


def quantize_symmetric(w: Tensor, peak: Tensor | float, bits: int) -> Tensor:
    """``w`` rounded to ``bits`` bits with symmetric scales ``peak / (2**(bits-1) - 1)`` (``peak``: max|w| over the
    tensor, or per channel, shaped to broadcast); an all-zero part stays exact."""
    levels = 2 ** (bits - 1) - 1
    peak = torch.as_tensor(peak, dtype=w.dtype, device=w.device)
    scale = torch.where(peak > 0, peak / levels, torch.ones_like(peak))
    return (w / scale).round().clamp(-levels, levels) * scale


def sqnr_db(w: Tensor, peak: Tensor | float, bits: int) -> float:
    """SQNR in dB of ``w`` quantised to ``bits`` with symmetric max-abs scales ``peak / (2**(bits-1) - 1)``."""
    error = w - quantize_symmetric(w, peak, bits)
    signal, noise = w.square().sum().item(), error.square().sum().item()
    if noise == 0:
        return SQNR_CAP_DB
    return min(SQNR_CAP_DB, 10 * math.log10(signal / noise)) if signal > 0 else SQNR_CAP_DB


def weight_figures(
    module: nn.Module, bits: tuple[int, ...], activation: dict | None = None, bn: nn.Module | None = None
) -> WeightFigures:
    """The outlier, centre-energy and SQNR figures of one conv or linear layer's weight, ``bn`` folded in."""
    w = module.weight.detach().to("cpu", torch.float64)
    rows = _output_channels(module, w)
    if bn is not None:
        gamma = bn.weight.detach() if bn.weight is not None else torch.ones_like(bn.running_var)
        rows = rows * (gamma.double().cpu() / (bn.running_var.double().cpu() + bn.eps).sqrt())[:, None]
    peak, std = rows.abs().max().item(), rows.std(correction=0).item()
    channel_peaks = rows.abs().amax(1)
    median = channel_peaks.median().item()
    cross, tap = _centre_energy(rows.reshape(rows.shape[0], -1, *w.shape[2:]))
    sqnr = {
        f"int{b}": {"per_tensor": sqnr_db(rows, peak, b), "per_channel": sqnr_db(rows, channel_peaks[:, None], b)}
        for b in bits
    }
    return WeightFigures(
        peak / std if std > 0 else None, channel_peaks.max().item() / median if median > 0 else None, cross, tap,
        sqnr, activation,
    )  # fmt: skip


def _output_channels(module: nn.Module, w: Tensor) -> Tensor:
    """The weight as one row per output channel (a transposed conv stores them in dim 1, per group)."""
    if isinstance(module, nn.modules.conv._ConvTransposeNd):
        groups = module.groups
        w = w.reshape(groups, w.shape[0] // groups, *w.shape[1:]).transpose(1, 2).flatten(0, 1)
    return w.flatten(1)


def _centre_energy(w: Tensor) -> tuple[float | None, float | None]:
    """Shares of ``sum w^2`` on the centre lines and on the centre tap; None unless every side is odd and >= 3."""
    sides = w.shape[2:]
    energy = w.square().sum((0, 1)) if sides else None
    if not sides or any(side < 3 or side % 2 == 0 for side in sides) or energy.sum() == 0:
        return None, None
    grids = torch.meshgrid(*(torch.arange(side) != side // 2 for side in sides), indexing="ij")
    off_centre = torch.stack(grids).sum(0)  # how many coordinates differ from the centre
    total = energy.sum().item()
    return energy[off_centre <= 1].sum().item() / total, energy[off_centre == 0].sum().item() / total
