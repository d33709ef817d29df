"""Numerical comparison of two models (e.g. an acified model and its deployed form)."""

from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..blocks import is_block
from ..errors import ACNetError, VerificationError
from ..modules import modes_kept
from .outputs import float_tensors, layer_outputs


@dataclass
class Comparison:
    """Largest output difference and the scale it is judged against."""

    max_abs: float
    max_ref: float

    @property
    def relative(self) -> float:
        """Max abs error over max(1, max |reference|): the figure compared with the tolerance."""
        return self.max_abs / max(1.0, self.max_ref)


@dataclass
class VerifyResult(Comparison):
    """The outcome of ``verify``: output error, and per-layer errors when asked for."""

    layers: dict[str, Comparison] = field(default_factory=dict)


def verify(
    reference: nn.Module, candidate: nn.Module, *inputs, rtol: float = 1e-4, layers: bool = False
) -> VerifyResult:
    """Run both models in eval mode on ``inputs`` and compare every output tensor.

    Passes when max |ref - cand| <= rtol * max(1, max |ref|); raises ``VerificationError``
    otherwise.  With ``layers`` the output of every block of ``reference`` is compared
    with the module of the same name in ``candidate``.
    """
    if not inputs:
        raise ACNetError("verify needs at least one example input, e.g. verify(ref, cand, torch.randn(1, 3, 224, 224))")
    ref_layers: dict[str, list[Tensor]] = {}
    cand_layers: dict[str, list[Tensor]] = {}
    names = [n for n, m in reference.named_modules() if is_block(m)] if layers else []
    with modes_kept(reference, training=False), modes_kept(candidate, training=False), torch.no_grad():
        with _recorded(reference, names, ref_layers):
            want = reference(*inputs)
        with _recorded(candidate, names, cand_layers):
            got = candidate(*inputs)
    overall = _compare(want, got)
    result = VerifyResult(overall.max_abs, overall.max_ref)
    for name in names:
        if name in ref_layers and name in cand_layers:
            result.layers[name] = _compare(ref_layers[name], cand_layers[name])
    if result.relative > rtol:
        raise VerificationError(
            f"outputs differ: max abs error {result.max_abs:.3g} = {result.relative:.3g} x max(1, max|ref|) "
            f"exceeds rtol={rtol:g}; did you call deploy() on the trained model and compare in eval mode?"
        )
    return result


def _compare(want, got) -> Comparison:
    a, b = float_tensors(want), float_tensors(got)
    if len(a) != len(b) or any(x.shape != y.shape for x, y in zip(a, b)):
        raise VerificationError("the two models return outputs of different structure or shape")
    if not a:
        return Comparison(0.0, 0.0)
    max_abs = max((x.double() - y.double()).abs().max().item() if x.numel() else 0.0 for x, y in zip(a, b))
    max_ref = max(x.double().abs().max().item() if x.numel() else 0.0 for x in a)
    return Comparison(max_abs, max_ref)


def _recorded(model: nn.Module, names: list[str], store: dict[str, list[Tensor]]) -> AbstractContextManager[None]:
    """Append the outputs of ``model``'s modules called ``names`` to ``store[name]`` while inside."""
    modules = dict(model.named_modules())
    layers = {name: modules[name] for name in names if name in modules}
    return layer_outputs(layers, lambda name, out: store.setdefault(name, []).append(out))
