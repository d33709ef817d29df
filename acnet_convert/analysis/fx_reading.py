"""Reading a model's fx graphs (train and eval mode) into a ``Flow``: who feeds which BatchNorm, what is unsafe."""

from __future__ import annotations

import logging
import warnings
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager

import torch.fx as fx
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..blocks import BLOCK_CONVS, is_block
from ..modules import modes_kept
from .flow import EXTRA_ARGUMENTS, Flow
from .reasons import Reason


class _Tracer(fx.Tracer):
    """Stops at convs, BatchNorms and blocks so that each shows up as one call."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, (*BLOCK_CONVS, _BatchNorm)) or is_block(m) or super().is_leaf_module(m, qualname)


def trace_flow(model: nn.Module, failures: dict[str, str]) -> Flow:
    """Trace the model (or else its largest traceable submodules) in train and eval mode; ``failures`` gets
    each module fx could not trace, with why."""
    flow = Flow()
    with modes_kept(model):
        _trace_region(model, "", flow, failures)
    return flow


def _trace_region(module: nn.Module, prefix: str, flow: Flow, failures: dict[str, str]) -> None:
    if isinstance(module, (*BLOCK_CONVS, _BatchNorm)) or is_block(module) or not any(
        isinstance(m, BLOCK_CONVS) for m in module.modules()
    ):
        return
    graphs = []
    try:
        with _quiet():
            for training in (True, False):
                module.train(training)
                graphs.append(_Tracer().trace(module))
    except Exception as exc:  # fx raises many kinds of errors on untraceable code
        failures[prefix.rstrip(".")] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:200]
        for child_name, child in module.named_children():
            _trace_region(child, f"{prefix}{child_name}.", flow, failures)
        return
    flow.covered.update(f"{prefix}{n}" for n, _ in module.named_modules())
    for graph in graphs:
        _read_graph(graph, module, prefix, flow)


@contextmanager
def _quiet() -> Iterator[None]:
    """Silence the warnings and log lines fx emits while tracing user code."""
    logger = logging.getLogger("torch.fx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def _read_graph(graph: fx.Graph, root: nn.Module, prefix: str, flow: Flow) -> None:
    calls: Counter = Counter()
    for node in graph.nodes:
        if node.op == "get_attr":
            owner = str(node.target).rpartition(".")[0]
            read = Reason("attribute-read", f"its attribute {node.target} is read directly")
            flow.unsafe.setdefault(prefix + owner, read)
        if node.op != "call_module":
            continue
        name = prefix + str(node.target)
        calls[name] += 1
        module = root.get_submodule(str(node.target))
        if isinstance(module, _BatchNorm):
            sources = [a for a in node.all_input_nodes]
            flow.bn_input[name].update(prefix + str(a.target) if a.op == "call_module" else a.name for a in sources)
            if len(node.args) != 1 or node.kwargs:
                flow.bn_input[name].add("<extra arguments>")
        if isinstance(module, BLOCK_CONVS):
            if len(node.args) != 1 or node.kwargs:
                flow.unsafe.setdefault(name, EXTRA_ARGUMENTS)
            users = list(node.users)
            user = users[0] if len(users) == 1 else None
            if user is not None and user.op == "call_module" and isinstance(
                root.get_submodule(str(user.target)), _BatchNorm
            ):
                flow.users[name].append(prefix + str(user.target))
            else:
                flow.users[name].append(None)
                flow.blockers.setdefault(name, _describe_users(users, root))
    flow.calls.append(calls)


def _describe_users(users: list[fx.Node], root: nn.Module) -> Reason:
    if not users:
        return Reason("output-unused", "its output is unused")
    if len(users) > 1:
        return Reason("output-shared", f"its output feeds {len(users)} operations")
    user = users[0]
    if user.op == "output":
        return Reason("output-returned", "its output is returned by forward()")
    if user.op == "call_module":
        used_by = f"{user.target} ({type(root.get_submodule(str(user.target))).__name__})"
        return Reason("no-batchnorm-after", f"its output feeds {used_by}, not a BatchNorm")
    function = getattr(user.target, "__name__", user.target)
    return Reason("no-batchnorm-after", f"its output feeds {function}(), not a BatchNorm module")
