"""The planner: one ``Site`` per conv of a model, with the decision taken for it and why.

fx graphs speak for the parts that trace; an example run, when given, for the rest; the source code, failing
both, for convs that untraceable code only ever calls.  Nothing here changes the model.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from .. import repopt
from ..blocks import BLOCK_CONVS, is_block
from ..errors import warn
from ..modules import class_path, names_by_module
from .adapters import conv_adapter, plain_conv
from .example_run import probe_flow
from .flow import Flow
from .fx_reading import trace_flow
from .options import PlanOptions
from .reasons import Reason
from .record import Plan, Site
from .rules import absorbable_bn, base_conv, choose_class, kernel_range_problem, matches, sole_bn, why_not_eligible
from .source_proof import not_provably_called_only

_CALLED_ONLY = Reason(
    "untraceable-called-only",
    "in code torch.fx cannot trace, only ever called: converted without absorbing a BatchNorm",
)


def analyze(model: nn.Module, options: PlanOptions = PlanOptions()) -> Plan:
    """Decide, for every Conv2d, Conv3d and ConvTranspose2d of ``model``, whether and how it becomes a block."""
    plan = Plan()
    traced = trace_flow(model, plan.trace_failures)
    needs_run = options.example_inputs is not None and plan.trace_failures
    probed = probe_flow(model, options.example_inputs) if needs_run else Flow()
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
            site = _conv_site(model, name, module, names=names, flows=(traced, probed), flow=flow, claimed=claimed,
                              options=options)  # fmt: skip
            plan.sites.append(site)
    _warn_unmatched(model, options.include, "include")
    _warn_unmatched(model, options.exclude, "exclude")
    return plan


def _conv_site(
    model: nn.Module,
    name: str,
    conv: nn.Module,
    *,
    names: dict[int, list[str]],
    flows: tuple[Flow, Flow],
    flow: Flow,
    claimed: set[str],
    options: PlanOptions,
) -> Site:
    """The decision for one conv: skip (and why), or convert as which block, absorbing which BatchNorm.

    ``flows`` are the fx and example-run analyses, ``flow`` the one that speaks for this conv; ``claimed`` holds
    the BatchNorms already absorbed by other convs.
    """
    site = Site(name, tuple(conv.kernel_size), tuple(conv.stride), conv.groups, "convert",
                conv_type=base_conv(conv).__name__, aliases=names[id(conv)][1:], conv_bias=conv.bias is not None)
    why_not = why_not_eligible(name, conv, flows, options)
    if not why_not and name not in flow.covered:
        why_not = not_provably_called_only(model, name)
    cls, notes = None, ()
    if conv_adapter(conv) is not None:
        site.adapter, conv = class_path(type(conv)), plain_conv(conv)
    if not why_not:
        cls, why_not, notes = choose_class(name, conv, options)
    why_not = why_not or kernel_range_problem(site.kernel, options)
    if why_not:
        site.action = "skip"
        site.explain(why_not)
        return site
    site.kind, site.mode, site.layout = cls.kind, cls.mode, options.layout
    site.options = cls.resolve_options(options.block_options.get(cls.kind))
    site.branches = cls.describe(conv, options.layout, **site.options)
    if options.mode == "repopt":
        site.mode, site.branches = "repopt", repopt.describe(cls.kind, conv)
    if name not in flow.covered:
        site.evidence, reason = "source", _CALLED_ONLY
    else:
        site.evidence = "fx" if name in flows[0].covered else "example run"
        modules = dict(model.named_modules())
        bn_name, reason = absorbable_bn(name, modules, flow, claimed)
        if bn_name and cls.absorbs_bn:
            bn = modules[bn_name]
            claimed.add(bn_name)
            site.bn, site.bn_aliases, site.bn_eps, site.bn_affine = bn_name, names[id(bn)][1:], bn.eps, bn.affine
        else:
            site.bn_after = bn_name or sole_bn(name, modules, flow)
            if bn_name:
                where = "conv" if site.mode == "repopt" else "block"
                reason = Reason("bn-kept", f"BatchNorm {bn_name} stays after the {where} ({site.mode} mode)")
    site.explain(*notes, *([reason] if reason else []))
    return site


def _done_site(name: str, block: nn.Module, names: dict[int, list[str]]) -> Site:
    """The site of a block that is already in the model."""
    site = Site(name, tuple(block.kernel_size), tuple(block.stride), block.groups, "done",
                conv_type=getattr(block, "conv_type", nn.Conv2d).__name__,
                branches=type(block).describe(block, block.layout, **block.options), kind=block.kind,
                mode=block.mode, layout=block.layout, options=dict(block.options),
                aliases=names[id(block)][1:])  # fmt: skip
    site.explain(Reason("already-block", f"already a {type(block).__name__}"))
    return site


def _inside_block(name: str, modules: dict[str, nn.Module]) -> bool:
    parts = name.split(".")
    return any(is_block(modules.get(".".join(parts[:i]))) for i in range(1, len(parts)))


def _warn_unmatched(model: nn.Module, patterns: Sequence[str] | None, what: str) -> None:
    names = [n for n, m in model.named_modules() if isinstance(m, BLOCK_CONVS)]
    for pattern in patterns or ():
        if not any(matches(n, pattern) for n in names):
            warn(f"{what} pattern {pattern!r} matches no conv; names look like {names[:3]}")
