"""Data-flow analysis by running the model once: for convs inside code that torch.fx cannot trace.

Module hooks say which conv and BatchNorm calls happen; a ``TorchFunctionMode`` sees every
torch function a conv's output or parameters reach outside the conv's own call.
"""

from __future__ import annotations

from collections import Counter

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from ..modules import modes_kept
from .flow import EXTRA_ARGUMENTS, Flow
from .reasons import Reason


def probe_flow(model: nn.Module, example_inputs: tuple) -> Flow:
    """Run ``model(*example_inputs)`` once in eval mode under no_grad and record how convs and BatchNorms are used."""
    watched = {m: n for n, m in model.named_modules() if isinstance(m, (_ConvNd, _BatchNorm))}
    recorder = _Recorder(watched)
    handles = []
    for module in watched:
        handles.append(module.register_forward_pre_hook(recorder.enter, with_kwargs=True))
        handles.append(module.register_forward_hook(recorder.leave, always_call=True))
    try:
        with modes_kept(model, training=False), torch.no_grad(), recorder:
            model(*example_inputs)
    finally:
        for h in handles:
            h.remove()
    return recorder.flow()


class _Recorder(TorchFunctionMode):
    def __init__(self, watched: dict[nn.Module, str]):
        super().__init__()
        self.names = watched
        self.owner = {id(p): n for m, n in watched.items() for p in m.parameters(recurse=False)}
        self.stack: list[nn.Module] = []
        self.outputs: dict[int, tuple[str, Tensor, list[str]]] = {}  # id(conv output) -> (conv, tensor, consumers)
        self.calls: Counter = Counter()
        self.bn_input: dict[str, set[str]] = {}
        self.unsafe: dict[str, Reason] = {}

    def enter(self, module, args, kwargs):
        name = self.names[module]
        self.calls[name] += 1
        if isinstance(module, _ConvNd) and (len(args) != 1 or kwargs):
            self.unsafe.setdefault(name, EXTRA_ARGUMENTS)
        if isinstance(module, _BatchNorm):
            source = self.outputs.get(id(args[0])) if len(args) == 1 and not kwargs else None
            self.bn_input.setdefault(name, set()).add(source[0] if source else "<other input>")
            if source:
                source[2].append(name)
        self.stack.append(module)

    def leave(self, module, args, output):
        self.stack.pop()
        if isinstance(module, _ConvNd) and isinstance(output, Tensor):
            self.outputs[id(output)] = (self.names[module], output, [])

    def __torch_function__(self, func, types, args=(), kwargs=None):
        current = self.stack[-1] if self.stack else None
        for value in tree_flatten((args, kwargs or {}))[0]:
            if not isinstance(value, Tensor):
                continue
            owner = self.owner.get(id(value))
            if owner is not None and (current is None or self.names[current] != owner):
                used = Reason("parameter-used-outside", f"a parameter of it is used by {_name(func)} outside its call")
                self.unsafe.setdefault(owner, used)
            source = self.outputs.get(id(value))
            if source is None or _reads_metadata(func):
                continue
            if not (isinstance(current, _BatchNorm) and self.names[current] in source[2]):
                source[2].append(f"{_name(func)}()")
        return func(*args, **(kwargs or {}))

    def flow(self) -> Flow:
        result = Flow(calls=[self.calls], unsafe=self.unsafe)
        result.covered.update(name for name, count in self.calls.items() if count)
        for bn, sources in self.bn_input.items():
            result.bn_input[bn] = sources
        for conv, _, consumers in self.outputs.values():
            bns = [c for c in consumers if not c.endswith("()")]
            if len(consumers) == 1 and bns:
                result.users[conv].append(bns[0])
            else:
                result.users[conv].append(None)
                result.blockers.setdefault(conv, _describe(consumers))
        return result


def _describe(consumers: list[str]) -> Reason:
    if not consumers:
        return Reason("output-unused", "its output is not used by a torch operation")
    if len(consumers) > 1:
        return Reason("output-shared", f"its output feeds {len(consumers)} operations")
    return Reason("no-batchnorm-after", f"its output feeds {consumers[0]}, not a BatchNorm module")


def _name(func) -> str:
    return getattr(func, "__name__", str(func))


_METADATA = {"size", "dim", "ndimension", "numel", "nelement", "stride", "is_contiguous", "is_floating_point",
             "__len__", "shape", "ndim", "dtype", "device", "layout", "requires_grad", "is_cuda",
             "grad_fn"}  # fmt: skip


def _reads_metadata(func) -> bool:
    """Whether ``func`` only looks at a tensor's shape, dtype or device (property getters included)."""
    name = _name(func)
    if name == "__get__":
        name = getattr(getattr(func, "__self__", None), "__name__", name)
    return name in _METADATA
