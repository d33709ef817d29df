"""Data-flow analysis with torch.fx: which convs to convert, and which BatchNorm each absorbs.

Nothing here mutates the model: ``analyze`` returns plain ``Site`` records.
"""

from __future__ import annotations

import ast
import fnmatch
import inspect
import logging
import textwrap
import warnings
from collections import Counter, defaultdict
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, fields

import torch.fx as fx
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .adapters import class_path, conv_adapter, norm_adapter, plain_conv
from ..blocks import BLOCK_CONVS
from ..errors import ACNetError, warn
from .flow import Flow
from ..blocks import block_class, is_block
from ..constants import DEFAULT_KIND
from .example_run import probe_flow

FOLDABLE_BN = {  # the BatchNorms that may be folded into each kind of conv
    nn.Conv2d: (nn.BatchNorm2d, nn.SyncBatchNorm),
    nn.ConvTranspose2d: (nn.BatchNorm2d, nn.SyncBatchNorm),
    nn.Conv3d: (nn.BatchNorm3d, nn.SyncBatchNorm),
}
EVIDENCE = ("fx", "example run", "source")  # what a site's decision rests on: a trace, one run, or the source code
BlockChoice = str | Mapping[str, str]  # one kind, or qualified-name pattern -> kind (first match wins)


@dataclass
class Site:
    """One conv of the model and what acify does with it; converted sites carry all that rebuilding needs."""

    name: str
    kernel: tuple[int, ...]
    stride: tuple[int, ...]
    groups: int
    action: str  # "convert", "skip" or "done" (already a block)
    reason: str = ""
    bn: str | None = None  # the BatchNorm absorbed into the block, if any
    conv_type: str = "Conv2d"
    branches: str = ""  # the block's branches, e.g. "3x3 + 3x1 + 1x3"
    kind: str | None = None  # the block kind ("acb", "dbb", ...); None for a skipped conv
    mode: str | None = None  # "exact" or "fast"; None for a skipped conv
    layout: str = "lines"  # the block's branch arrangement option (ACB's 3D lines or planes)
    aliases: list[str] = field(default_factory=list)  # other names the same conv is registered under
    bn_aliases: list[str] = field(default_factory=list)  # other names of the absorbed BatchNorm
    bn_after: str | None = None  # a BatchNorm that alone receives this conv's output but stays in the model
    conv_bias: bool = False  # whether the original conv has a bias
    bn_eps: float | None = None  # the absorbed BatchNorm's eps
    bn_affine: bool = True  # whether the absorbed BatchNorm has gamma and beta
    adapter: str | None = None  # the conv class whose own padding the block repeats (see adapters.py)
    evidence: str = ""  # "fx", "example run" or "source": what the decision rests on

    @property
    def codes(self) -> list[str]:
        """The stable code of every part of the reason, in order."""
        from .reasons import reason_codes

        return reason_codes(self.reason)

    @property
    def code(self) -> str:
        """The code of the reason's first part, or '' for a site without a reason."""
        return self.codes[0] if self.codes else ""

    @property
    def names(self) -> list[str]:
        """Every qualified name the conv is registered under."""
        return [self.name, *self.aliases]

    def as_dict(self) -> dict:
        return {key: list(value) if isinstance(value, tuple) else value for key, value in self.__dict__.items()}

    @classmethod
    def from_dict(cls, data: Mapping) -> Site:
        known = {f.name for f in fields(cls)}
        values = {key: value for key, value in data.items() if key in known}
        for key in ("kernel", "stride"):
            values[key] = tuple(values[key])
        return cls(**values)


@dataclass
class Plan:
    """Every conv site of a model with the decision taken for it."""

    sites: list[Site] = field(default_factory=list)
    trace_failures: dict[str, str] = field(default_factory=dict)  # module name -> why fx could not trace it

    @property
    def converted(self) -> list[Site]:
        return [s for s in self.sites if s.action == "convert"]

    @property
    def skipped(self) -> list[Site]:
        return [s for s in self.sites if s.action == "skip"]

    @property
    def input_dependent(self) -> list[str]:
        """Converted convs whose decision rests on the example run, so a different input could change it."""
        return [s.name for s in self.converted if s.evidence == "example run"]

    def summary(self) -> str:
        absorbed = sum(1 for s in self.converted if s.bn)
        done = len(self.sites) - len(self.converted) - len(self.skipped)
        kinds = Counter(f"{s.kind} {s.mode}" for s in self.converted)
        by_kind = f" as {', '.join(f'{n} {k}' for k, n in kinds.items())}" if len(kinds) > 1 else ""
        by_input = f"; {len(self.input_dependent)} decided by the example run" if self.input_dependent else ""
        return (
            f"{len(self.sites)} conv sites: {len(self.converted)} converted{by_kind} ({absorbed} with their "
            f"BatchNorm), {len(self.skipped)} skipped, {done} already converted{by_input}"
        )

    def to_dict(self) -> dict:
        """A JSON-ready record of every decision (what checkpoints store)."""
        return {"sites": [site.as_dict() for site in self.sites], "trace_failures": dict(self.trace_failures)}

    @classmethod
    def from_dict(cls, data: Mapping) -> Plan:
        """The plan ``to_dict`` recorded."""
        try:
            sites = [Site.from_dict(site) for site in data["sites"]]
        except (KeyError, TypeError, ValueError) as exc:
            raise ACNetError(f"the recorded plan is damaged ({exc}): write the checkpoint again") from exc
        return cls(sites, dict(data.get("trace_failures", {})))

    def __str__(self) -> str:
        rows = [f"{s.action:8} {s.name or '<root>'}  {s.conv_type} k={s.kernel} s={s.stride} g={s.groups}"
                + (f"  {s.kind}/{s.mode} [{s.branches}]" if s.kind else "") + (f"  +bn {s.bn}" if s.bn else "")
                + (f"  ({s.reason})" if s.reason else "") for s in self.sites]  # fmt: skip
        return "\n".join([*rows, self.summary()])


class _Tracer(fx.Tracer):
    """Stops at convs, BatchNorms and ACBlocks so that each shows up as one call."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, (*BLOCK_CONVS, _BatchNorm)) or is_block(m) or super().is_leaf_module(m, qualname)


def analyze(
    model: nn.Module,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    min_kernel: int = 3,
    max_kernel: int | None = None,
    example_inputs: tuple | None = None,
    layout3d: str = "lines",
    block: BlockChoice = DEFAULT_KIND,
    mode: str = "exact",
) -> Plan:
    """Decide, for every Conv2d, Conv3d and ConvTranspose2d of ``model``, whether and how it becomes a block.

    fx graphs speak for the parts that trace; ``example_inputs``, when given, are run once
    to speak for the rest.
    """
    plan = Plan()
    traced = _trace_flow(model, plan.trace_failures)
    probed = probe_flow(model, example_inputs) if example_inputs is not None and plan.trace_failures else Flow()
    names = names_by_module(model)
    modules = dict(model.named_modules())
    claimed: set[str] = set()
    for name, module in modules.items():
        if _inside_block(name, modules):
            continue
        if is_block(module):
            plan.sites.append(_done_site(name, module, names))
        elif isinstance(module, BLOCK_CONVS):
            flow = traced if name in traced.covered else probed
            site = _conv_site(model, name, module, names, (traced, probed), flow, claimed, include, exclude,
                              min_kernel, max_kernel, layout3d, block, mode)  # fmt: skip
            plan.sites.append(site)
    _warn_unmatched(model, include, "include")
    _warn_unmatched(model, exclude, "exclude")
    return plan


def _conv_site(model, name, conv, names, flows, flow, claimed, include, exclude, min_kernel, max_kernel, layout, block,
               mode) -> Site:  # fmt: skip
    """The decision for one conv: skip (and why), or convert as which block, absorbing which BatchNorm."""
    site = Site(name, tuple(conv.kernel_size), tuple(conv.stride), conv.groups, "convert",
                conv_type=_base_conv(conv).__name__, aliases=names[id(conv)][1:], conv_bias=conv.bias is not None)
    why_not = _why_not_eligible(name, conv, flows, include, exclude)
    if not why_not and name not in flow.covered:
        why_not = _not_provably_called_only(model, name)
    cls, note = None, ""
    if conv_adapter(conv) is not None:
        site.adapter, conv = class_path(type(conv)), plain_conv(conv)
    if not why_not:
        cls, why_not, note = _choose_class(name, conv, block, mode, layout)
    why_not = why_not or _kernel_range_problem(site.kernel, min_kernel, max_kernel)
    if why_not:
        site.action, site.reason = "skip", why_not
        return site
    site.kind, site.mode, site.layout, site.branches = cls.kind, cls.mode, layout, cls.describe(conv, layout)
    if name not in flow.covered:
        site.evidence = "source"
        reason = "in code torch.fx cannot trace, only ever called: converted without absorbing a BatchNorm"
    else:
        site.evidence = "fx" if name in flows[0].covered else "example run"
        modules = dict(model.named_modules())
        bn_name, reason = _absorbable_bn(name, modules, names, flow, claimed)
        if bn_name and cls.absorbs_bn:
            bn = modules[bn_name]
            claimed.add(bn_name)
            site.bn, site.bn_aliases, site.bn_eps, site.bn_affine = bn_name, names[id(bn)][1:], bn.eps, bn.affine
        else:
            site.bn_after = bn_name or _sole_bn(name, modules, flow)
            if bn_name:
                reason = f"BatchNorm {bn_name} stays after the block ({cls.mode} mode)"
    site.reason = "; ".join(filter(None, (note, reason)))
    return site


def _done_site(name: str, block: nn.Module, names: dict[int, list[str]]) -> Site:
    """The report entry of a block that is already in the model."""
    return Site(name, tuple(block.kernel_size), tuple(block.stride), block.groups, "done",
                f"already a {type(block).__name__}", conv_type=getattr(block, "conv_type", nn.Conv2d).__name__,
                branches=type(block).describe(block, block.layout), kind=block.kind, mode=block.mode,
                layout=block.layout, aliases=names[id(block)][1:])  # fmt: skip


def _choose_class(name: str, conv: nn.Module, block: BlockChoice, mode: str, layout: str) -> tuple:
    """(class, why not, note): the block class for this conv, falling back to the default kind where needed."""
    kind = kind_for(name, block)
    cls = block_class(kind, mode)
    problem = cls.conv_problem(conv, layout)
    if not problem:
        return cls, "", ""
    if kind == DEFAULT_KIND:
        return None, problem, ""
    fallback = block_class(DEFAULT_KIND, mode)
    if fallback.conv_problem(conv, layout):
        return None, f"{kind}: {problem}", ""
    return fallback, "", f"{kind}: {problem}; converted as {DEFAULT_KIND}"


def kind_for(name: str, block: BlockChoice) -> str:
    """The block kind ``block`` chooses for the conv called ``name`` (first matching pattern; else the default)."""
    if isinstance(block, str):
        return block
    return next((kind for pattern, kind in block.items() if matches(name, pattern)), DEFAULT_KIND)


def matches(name: str, pattern: str) -> bool:
    """Shell-pattern match on a qualified name; a plain module name also matches everything under it."""
    return fnmatch.fnmatchcase(name, pattern) or name.startswith(pattern + ".")


def names_by_module(model: nn.Module) -> dict[int, list[str]]:
    """Every qualified name each module is registered under, the one ``named_modules()`` gives first."""
    names: dict[int, list[str]] = defaultdict(list)
    for name, module in model.named_modules(remove_duplicate=False):
        if name not in names[id(module)]:
            names[id(module)].append(name)
    return names


def _trace_flow(model: nn.Module, failures: dict[str, str]) -> Flow:
    """Trace the model (or else its largest traceable submodules) in train and eval mode."""
    flow = Flow()
    modes = {m: m.training for m in model.modules()}
    try:
        _trace_region(model, "", flow, failures)
    finally:
        for m, training in modes.items():
            m.training = training
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
            flow.unsafe.setdefault(prefix + owner, f"its attribute {node.target} is read directly")
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
                flow.unsafe.setdefault(name, "called with extra arguments (e.g. output_size)")
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


def _describe_users(users: list[fx.Node], root: nn.Module) -> str:
    if not users:
        return "its output is unused"
    if len(users) > 1:
        return f"its output feeds {len(users)} operations"
    user = users[0]
    if user.op == "output":
        return "its output is returned by forward()"
    if user.op == "call_module":
        return f"its output feeds {user.target} ({type(root.get_submodule(str(user.target))).__name__}), not a BatchNorm"
    return f"its output feeds {getattr(user.target, '__name__', user.target)}(), not a BatchNorm module"


def _kernel_range_problem(kernel: tuple[int, ...], min_kernel: int, max_kernel: int | None) -> str:
    if any(1 < k < min_kernel for k in kernel):
        return f"kernel side below min_kernel={min_kernel}"
    if max_kernel is not None and any(k > max_kernel for k in kernel):
        return f"kernel side above max_kernel={max_kernel}"
    return ""


def _why_not_eligible(name, conv, flows, include, exclude) -> str:
    """Why ``conv`` must not become a block of any kind, or '' when it may."""
    base = _base_conv(conv)
    overridden = any(getattr(type(conv), m, None) is not getattr(base, m, None) for m in ("forward", "_conv_forward"))
    if overridden and conv_adapter(conv) is None:
        return f"{type(conv).__name__} overrides forward() (describe it in the conv adapter table if it only pads)"
    if hasattr(conv, "parametrizations"):
        return "weight is parametrized (e.g. weight/spectral norm)"
    if isinstance(conv.weight, nn.parameter.UninitializedParameter):
        return "lazy conv not initialised yet: run one forward first"
    if not conv.weight.is_floating_point():
        return f"weight dtype {conv.weight.dtype} is not floating point"
    if include is not None and not any(matches(name, p) for p in include):
        return "not matched by include"
    if exclude is not None and any(matches(name, p) for p in exclude):
        return "matched by exclude"
    if _has_hooks(conv):
        return "has hooks registered on it"
    for flow in flows:
        if name in flow.unsafe:
            return flow.unsafe[name]
    return ""


def _absorbable_bn(name, modules, names, flow, claimed) -> tuple[str | None, str]:
    """The BatchNorm this conv may absorb (proven by every traced graph), and a note when none."""
    seen = flow.users.get(name)
    if not seen:
        return None, "not called by forward(): converted without absorbing a BatchNorm"
    calls = flow.max_calls(name)
    if calls > 1:
        return None, f"shared: called {calls} times per forward, so it absorbs no BatchNorm"
    if name in flow.blockers:
        return None, flow.blockers[name]
    bn_names = set(seen)
    if len(bn_names) > 1:
        return None, "feeds different BatchNorms in train and eval mode"
    bn_name = bn_names.pop()
    bn = modules.get(bn_name)
    problem = _bn_problem(bn_name, bn, modules[name], flow, claimed, name)
    if problem:
        return None, f"BatchNorm {bn_name} {problem}"
    return bn_name, ""


def _sole_bn(name: str, modules: dict[str, nn.Module], flow: Flow) -> str | None:
    """A BatchNorm (of any class) that alone receives this conv's only output, or None: where a bias can go."""
    seen = set(flow.users.get(name, ()))
    if len(seen) != 1 or None in seen or name in flow.blockers or flow.max_calls(name) != 1:
        return None
    bn_name = seen.pop()
    bn = modules.get(bn_name)
    if not isinstance(bn, _BatchNorm) or not bn.track_running_stats or bn.running_mean is None:
        return None
    if flow.max_calls(bn_name) != 1 or flow.bn_input[bn_name] != {name} or bn_name in flow.unsafe:
        return None
    return bn_name


def _bn_problem(bn_name, bn, conv, flow, claimed, conv_name) -> str:
    foldable = FOLDABLE_BN[_base_conv(conv)]
    if type(bn) not in foldable and not (norm_adapter(bn) and isinstance(bn, foldable)):
        return f"is a {type(bn).__name__}, not {'/'.join(c.__name__ for c in foldable)}"
    if not bn.track_running_stats or bn.running_mean is None:
        return "tracks no running statistics, so it cannot be folded"
    if bn.num_features != conv.out_channels:
        return "has a different number of channels"
    if flow.max_calls(bn_name) > 1:
        return "is called more than once per forward"
    if flow.bn_input[bn_name] != {conv_name}:
        return "also receives other inputs"
    if _has_hooks(bn):
        return "has hooks registered on it"
    if bn_name in flow.unsafe:
        return flow.unsafe[bn_name]
    if bn_name in claimed:
        return "is already absorbed by another conv"
    return ""


def _not_provably_called_only(model: nn.Module, name: str) -> str:
    """'' when the untraceable code around conv ``name`` provably uses it only by calling it, else why not.

    Reads the source of every enclosing module: the conv's attribute may appear (outside
    ``__init__``) only as ``obj.attr(...)``.
    """
    parts = name.split(".")
    hint = "pass example_inputs to acify to analyse it by running the model"
    parent = model.get_submodule(".".join(parts[:-1]))
    if isinstance(parent, (nn.Sequential, nn.ModuleList, nn.ModuleDict)):
        return f"in a {type(parent).__name__} used by code torch.fx cannot trace: {hint}"
    for depth in range(len(parts) - 1, -1, -1):
        owner = model.get_submodule(".".join(parts[:depth]))
        try:
            uses = _attribute_uses(type(owner), parts[depth:])
        except (OSError, TypeError, SyntaxError):
            return f"source of {type(owner).__name__} unavailable, torch.fx cannot trace it: {hint}"
        if not all(uses):
            return f"{type(owner).__name__} uses .{parts[-1]} other than by calling it: {hint}"
    return ""


def _attribute_uses(cls: type, path: list[str]) -> list[bool]:
    """For each read in the methods of ``cls`` (and its non-torch bases) that can be the submodule at ``path`` (relative
    to an instance of ``cls``): is it a direct call?"""
    attr = path[-1]
    found: list[bool] = []
    for klass in cls.__mro__:
        if klass.__module__.startswith("torch.nn") or klass is object:
            continue
        tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
        for node in ast.walk(tree):
            method = _enclosing_function(node, parents)
            if method == "__init__":
                continue
            if isinstance(node, ast.Attribute) and node.attr == attr and isinstance(node.ctx, ast.Load):
                if not _may_be(node, path):
                    continue
                call = parents.get(node)
                found.append(isinstance(call, ast.Call) and call.func is node)
            elif isinstance(node, ast.Call) and getattr(node.func, "id", None) in ("getattr", "setattr", "delattr"):
                found.append(not any(isinstance(a, ast.Constant) and a.value == attr for a in node.args))
    return found


def _may_be(node: ast.Attribute, path: list[str]) -> bool:
    """Whether ``a.b.c`` can be the submodule at ``path``: looked up on ``self``, the chain is the path; on
    anything else, the chain is the end of the path."""
    chain, base = [], node
    while isinstance(base, ast.Attribute):
        chain.insert(0, base.attr)
        base = base.value
    if isinstance(base, ast.Name) and base.id == "self":
        return chain == path
    return len(chain) <= len(path) and path[len(path) - len(chain) :] == chain


def _enclosing_function(node: ast.AST, parents: dict) -> str | None:
    while node in parents:
        node = parents[node]
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            return node.name
    return None


def _base_conv(conv: nn.Module) -> type:
    """The torch conv class that ``conv`` is (or derives from)."""
    return next(c for c in BLOCK_CONVS if isinstance(conv, c))


def _has_hooks(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks)


def _inside_block(name: str, modules: dict[str, nn.Module]) -> bool:
    parts = name.split(".")
    return any(is_block(modules.get(".".join(parts[:i]))) for i in range(1, len(parts)))


def _warn_unmatched(model: nn.Module, patterns: Sequence[str] | None, what: str) -> None:
    names = [n for n, m in model.named_modules() if isinstance(m, BLOCK_CONVS)]
    for pattern in patterns or ():
        if not any(matches(n, pattern) for n in names):
            warn(f"{what} pattern {pattern!r} matches no conv; names look like {names[:3]}")
