"""The rules: which convs may become blocks, which BatchNorm each absorbs, and which block kind wraps it."""

from __future__ import annotations

import fnmatch

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .. import repopt
from ..blocks import BLOCK_CONVS, ReparamBlock, block_class
from ..constants import DEFAULT_KIND
from .adapters import conv_adapter, norm_adapter
from .flow import Flow
from .options import BlockChoice, PlanOptions
from .reasons import Reason

FOLDABLE_BN = {  # the BatchNorms that may be folded into each kind of conv
    nn.Conv2d: (nn.BatchNorm2d, nn.SyncBatchNorm),
    nn.ConvTranspose2d: (nn.BatchNorm2d, nn.SyncBatchNorm),
    nn.Conv3d: (nn.BatchNorm3d, nn.SyncBatchNorm),
}


def why_not_eligible(name: str, conv: nn.Module, flows: tuple[Flow, ...], options: PlanOptions) -> Reason | None:
    """Why ``conv`` must not become a block of any kind, or None when it may."""
    base = base_conv(conv)
    overridden = any(getattr(type(conv), m, None) is not getattr(base, m, None) for m in ("forward", "_conv_forward"))
    if overridden and conv_adapter(conv) is None:
        text = f"{type(conv).__name__} overrides forward() (describe it in the conv adapter table if it only pads)"
        return Reason("overrides-forward", text)
    if hasattr(conv, "parametrizations"):
        return Reason("parametrized", "weight is parametrized (e.g. weight/spectral norm)")
    if isinstance(conv.weight, nn.parameter.UninitializedParameter):
        return Reason("lazy", "lazy conv not initialised yet: run one forward first")
    if not conv.weight.is_floating_point():
        return Reason("not-floating-point", f"weight dtype {conv.weight.dtype} is not floating point")
    if options.include is not None and not any(matches(name, p) for p in options.include):
        return Reason("not-included", "not matched by include")
    if options.exclude is not None and any(matches(name, p) for p in options.exclude):
        return Reason("excluded", "matched by exclude")
    if repopt.is_masked(conv):
        return Reason("hooks", "already has a repopt gradient preconditioner (a hook; deploy removes it)")
    if has_hooks(conv):
        return Reason("hooks", "has hooks registered on it")
    return next((flow.unsafe[name] for flow in flows if name in flow.unsafe), None)


def kernel_range_problem(kernel: tuple[int, ...], options: PlanOptions) -> Reason | None:
    """Why the kernel size is outside ``min_kernel`` .. ``max_kernel``, or None."""
    if any(1 < k < options.min_kernel for k in kernel):
        return Reason("below-min-kernel", f"kernel side below min_kernel={options.min_kernel}")
    if options.max_kernel is not None and any(k > options.max_kernel for k in kernel):
        return Reason("above-max-kernel", f"kernel side above max_kernel={options.max_kernel}")
    return None


def choose_class(
    name: str, conv: nn.Module, options: PlanOptions
) -> tuple[type[ReparamBlock] | None, Reason | None, tuple[Reason, ...]]:
    """(class, why not, notes): the block class for this conv, falling back to the default kind where needed."""
    kind = kind_for(name, options.block)
    cls = _class_of(kind, options.mode)
    problem = _problem(cls, conv, options)
    if not problem:
        return cls, None, ()
    if kind == DEFAULT_KIND:
        return None, Reason("block-unsupported", problem), ()
    unsupported = Reason("kind-unsupported", f"{kind}: {problem}")
    fallback = _class_of(DEFAULT_KIND, options.mode)
    if _problem(fallback, conv, options):
        return None, unsupported, ()
    return fallback, None, (unsupported, Reason("fallback-kind", f"converted as {DEFAULT_KIND}"))


def _class_of(kind: str, mode: str) -> type[ReparamBlock]:
    """The block class of ``kind`` in ``mode``; for repopt, the fast one, whose linear branches the gradient
    preconditioner reproduces."""
    return block_class(kind, "fast" if mode == "repopt" else mode)


def _problem(cls: type[ReparamBlock], conv: nn.Module, options: PlanOptions) -> str:
    if options.mode == "repopt":
        return repopt.conv_problem(cls.kind, conv)
    return cls.conv_problem(conv, options.layout)


def kind_for(name: str, block: BlockChoice) -> str:
    """The block kind ``block`` chooses for the conv called ``name`` (first matching pattern; else the default)."""
    if isinstance(block, str):
        return block
    return next((kind for pattern, kind in block.items() if matches(name, pattern)), DEFAULT_KIND)


def matches(name: str, pattern: str) -> bool:
    """Shell-pattern match on a qualified name; a plain module name also matches everything under it."""
    return fnmatch.fnmatchcase(name, pattern) or name.startswith(pattern + ".")


def absorbable_bn(
    name: str, modules: dict[str, nn.Module], flow: Flow, claimed: set[str]
) -> tuple[str | None, Reason | None]:
    """The BatchNorm this conv may absorb (proven by every traced graph), or None and why not."""
    seen = flow.users.get(name)
    if not seen:
        return None, Reason("not-called", "not called by forward(): converted without absorbing a BatchNorm")
    calls = flow.max_calls(name)
    if calls > 1:
        return None, Reason("repeated-calls", f"shared: called {calls} times per forward, so it absorbs no BatchNorm")
    if name in flow.blockers:
        return None, flow.blockers[name]
    bn_names = set(seen)
    if len(bn_names) > 1:
        return None, Reason("bn-differs-by-mode", "feeds different BatchNorms in train and eval mode")
    bn_name = bn_names.pop()
    problem = _bn_problem(bn_name, modules.get(bn_name), modules[name], flow, claimed, name)
    if problem:
        return None, Reason(problem.code, f"BatchNorm {bn_name} {problem.text}")
    return bn_name, None


def sole_bn(name: str, modules: dict[str, nn.Module], flow: Flow) -> str | None:
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


def _bn_problem(bn_name, bn, conv, flow, claimed, conv_name) -> Reason | None:
    """Why the BatchNorm ``bn`` after ``conv`` cannot be absorbed (the text follows its name), or None."""
    foldable = FOLDABLE_BN[base_conv(conv)]
    if type(bn) not in foldable and not (norm_adapter(bn) and isinstance(bn, foldable)):
        return Reason("bn-wrong-type", f"is a {type(bn).__name__}, not {'/'.join(c.__name__ for c in foldable)}")
    if not bn.track_running_stats or bn.running_mean is None:
        return Reason("bn-no-running-stats", "tracks no running statistics, so it cannot be folded")
    if bn.num_features != conv.out_channels:
        return Reason("bn-channels", "has a different number of channels")
    if flow.max_calls(bn_name) > 1:
        return Reason("bn-repeated-calls", "is called more than once per forward")
    if flow.bn_input[bn_name] != {conv_name}:
        return Reason("bn-other-inputs", "also receives other inputs")
    if has_hooks(bn):
        return Reason("bn-hooks", "has hooks registered on it")
    if bn_name in flow.unsafe:
        return Reason("bn-unsafe", flow.unsafe[bn_name].text)
    if bn_name in claimed:
        return Reason("bn-claimed", "is already absorbed by another conv")
    return None


def base_conv(conv: nn.Module) -> type:
    """The torch conv class that ``conv`` is (or derives from)."""
    return next(c for c in BLOCK_CONVS if isinstance(conv, c))


def has_hooks(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks)
