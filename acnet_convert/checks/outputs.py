"""Outputs as the checks see them: the floating-point tensors of a model's output, and the outputs of its layers."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager

from torch import Tensor, nn


def float_tensors(out: object) -> list[Tensor]:
    """Floating-point tensors of a (nested) output, in a stable order."""
    if isinstance(out, Tensor):
        return [out] if out.is_floating_point() else []
    if isinstance(out, dict):
        return [t for key in sorted(out, key=str) for t in float_tensors(out[key])]
    if isinstance(out, (list, tuple)):
        return [t for item in out for t in float_tensors(item)]
    return []


@contextmanager
def layer_outputs(layers: Mapping[str, nn.Module], record: Callable[[str, object], None]) -> Iterator[None]:
    """While inside, ``record(name, output)`` is called after every forward of ``layers[name]``."""
    handles = [m.register_forward_hook(lambda _m, _i, out, name=name: record(name, out)) for name, m in layers.items()]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
