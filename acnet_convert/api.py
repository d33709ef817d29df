"""The public entry points: plan, acify and deploy, and applying a recorded plan to a freshly built model."""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from . import repopt
from .analysis import (
    NEEDS_EXAMPLE_RUN,
    BlockChoice,
    Plan,
    PlanOptions,
    Site,
    analyze,
    batchnorm_part,
    conv_adapter,
    norm_tail,
    own_fusion,
    plain_conv,
)  # fmt: skip
from .blocks import BLOCK_CONVS, PaddedBlock, block_class, has_blocks, is_block, resolve_padding
from .constants import (
    DEFAULT_GAMMA,
    DEFAULT_KIND,
    DEFAULT_MIN_KERNEL,
    DEFAULT_REPOPT_SCALE,
    INITS,
    LAYOUTS,
    MODES,
    REPOPT_KINDS,
)
from .errors import ACNetError, warn
from .modules import class_path, modes_kept, replace_module

PLAN_ATTR = "acnet_plan"


def plan(
    model: nn.Module,
    *,
    block: BlockChoice = DEFAULT_KIND,
    mode: str = "exact",
    include: Sequence[str] | str | None = None,
    exclude: Sequence[str] | str | None = None,
    min_kernel: int = DEFAULT_MIN_KERNEL,
    max_kernel: int | None = None,
    example_inputs: tuple | None = None,
    layout3d: str = "lines",
    block_options: Mapping[str, Mapping[str, int]] | None = None,
) -> Plan:
    """Report, without changing anything, what ``acify`` with the same options would do with every conv."""
    _check_model(model, "plan")
    if layout3d not in LAYOUTS:
        raise ACNetError(f"unknown layout3d {layout3d!r}: use one of {', '.join(LAYOUTS)}")
    _check_block_choice(block, mode)
    block_options = _checked_block_options(block, mode, block_options)
    if example_inputs is not None and not isinstance(example_inputs, tuple):
        example_inputs = (example_inputs,)
    options = PlanOptions(
        include=_patterns(include), exclude=_patterns(exclude), min_kernel=min_kernel, max_kernel=max_kernel,
        example_inputs=example_inputs, layout=layout3d, block=block, mode=mode, block_options=block_options,
    )  # fmt: skip
    return analyze(model, options)


def acify(
    model: nn.Module,
    *,
    inplace: bool = False,
    block: BlockChoice = DEFAULT_KIND,
    mode: str = "exact",
    include: Sequence[str] | str | None = None,
    exclude: Sequence[str] | str | None = None,
    init: str = "preserve",
    gamma_init: float = DEFAULT_GAMMA,
    min_kernel: int = DEFAULT_MIN_KERNEL,
    max_kernel: int | None = None,
    example_inputs: tuple | None = None,
    layout3d: str = "lines",
    block_options: Mapping[str, Mapping[str, int]] | None = None,
) -> nn.Module:
    """Turn every eligible Conv2d, Conv3d and ConvTranspose2d (with the BatchNorm after it) into a training block.

    Returns a model of the same class (a copy unless ``inplace``); its ``acnet_plan`` attribute lists every conv
    site with the decision taken and why.  ``block`` is a kind (``"acb"``, ``"dbb"``, ``"repvgg"``, ...) or a
    mapping from qualified-name pattern to kind (first match wins, unmatched convs get ``"acb"``).
    ``mode="exact"`` builds the paper's blocks (a BatchNorm per branch, absorbing the conv's BatchNorm);
    ``mode="fast"`` builds their linearised form (one conv per forward, every BatchNorm left in place);
    ``mode="repopt"`` keeps every conv as it is and preconditions its weight gradient as the kind's CSLA block
    (constant branch scales of ``DEFAULT_REPOPT_SCALE``, or those ``search_scales`` found), exact under SGD.
    ``example_inputs`` (run once in eval mode) let convs inside code that torch.fx cannot trace be analysed too.
    ``layout3d`` picks ACB's branches of 3D kernels: ``"lines"`` or ``"planes"``.  ``block_options`` sets the
    options of the kinds that have some, by kind: ``{"mobileone": {"k": 2}}`` (the plan records every value).
    """
    _check_model(model, "acify")
    if init not in INITS:
        raise ACNetError(f"unknown init {init!r}: use one of {', '.join(INITS)}")
    if isinstance(model, BLOCK_CONVS):
        raise ACNetError("acify needs a model that contains convs; wrap a single conv with ACBlock.from_conv")
    new_plan = plan(
        model, block=block, mode=mode, include=include, exclude=exclude, min_kernel=min_kernel,
        max_kernel=max_kernel, example_inputs=example_inputs, layout3d=layout3d, block_options=block_options,
    )  # fmt: skip
    if not inplace:
        model = copy.deepcopy(model)
    apply_plan(model, new_plan, init=init, gamma_init=gamma_init)
    if example_inputs is None:
        _warn_untraced(new_plan)
    return model


def apply_plan(
    model: nn.Module, plan: Plan, *, init: str = "preserve", gamma_init: float = DEFAULT_GAMMA
) -> nn.Module:
    """Build the blocks ``plan`` records into ``model`` (in place) without analysing it again; return it.

    Every recorded site is checked against the model first, so a plan that does not fit changes nothing.  A model
    whose class fuses itself (an Ultralytics model's ``fuse``) gets that method as ``OwnFusion``.
    """
    located = [_locate_site(model, site) for site in plan.converted]
    for site, (conv, bn) in zip(plan.converted, located):
        if site.mode == "repopt":
            site.scales = site.scales or repopt.default_scales(site.kind, conv, DEFAULT_REPOPT_SCALE)
            repopt.attach(conv, site.kind, site.scales, init=init)
            continue
        inner = plain_conv(conv) if site.adapter else conv
        block = block_class(site.kind, site.mode).from_conv(
            inner, None if bn is None else batchnorm_part(bn), init=init, gamma_init=gamma_init, layout=site.layout,
            **site.options,
        )
        if site.adapter:
            block = PaddedBlock(conv_adapter(conv).pad(conv), block, conv)
        for name in site.names:
            replace_module(model, name, block)
        if bn is not None:
            tail = norm_tail(bn)
            for name in (site.bn, *site.bn_aliases):
                replace_module(model, name, tail)
    setattr(model, PLAN_ATTR, plan)
    if own_fusion(model):
        setattr(model, own_fusion(model), OwnFusion(model))
    return model


class OwnFusion:
    """The own fusion method of an acified model whose class fuses itself, as the instance's attribute.

    That method folds each conv's BatchNorm into the conv by reading both, so it runs on the structure it was written
    for: every block deployed in place, every absorbed BatchNorm back as an exact identity that carries the fused
    bias.  Then the class's method runs, and it computes what the blocks did.
    """

    def __init__(self, model: nn.Module):
        self.model = model

    def __call__(self, *args, **kwargs):
        model, method = self.model, own_fusion(self.model)
        if has_blocks(model):
            deploy(model, inplace=True)
        for site in getattr(model, PLAN_ATTR).converted:
            if site.bn:
                _restore_bn(model, site)
        model.__dict__.pop(method, None)
        return getattr(model, method)(*args, **kwargs)


def _restore_bn(model: nn.Module, site: Site) -> None:
    """Put a BatchNorm back where ``site``'s conv absorbed one: mean -bias and variance 1 - eps add the fused bias."""
    here = model.get_submodule(site.bn)
    if isinstance(here, _BatchNorm):
        return  # restored already (a model deployed, then fused)
    if not isinstance(here, nn.Identity):
        raise ACNetError(f"{site.bn} holds a {type(here).__name__}, where only a BatchNorm can be put back: "
                         "deploy the model with acnet_convert.deploy instead of its own fusion")  # fmt: skip
    conv = model.get_submodule(site.name)
    bias = conv.weight.new_zeros(conv.out_channels) if conv.bias is None else conv.bias.detach().clone()
    norm = (nn.BatchNorm3d if conv.weight.dim() == 5 else nn.BatchNorm2d)(
        conv.out_channels, eps=site.bn_eps, affine=site.bn_affine, device=bias.device, dtype=bias.dtype
    )
    with torch.no_grad():
        norm.running_mean.copy_(-bias)
        norm.running_var.fill_(1.0 - site.bn_eps)
    norm.train(conv.training)
    if conv.bias is not None:
        conv.bias = None if not site.conv_bias else nn.Parameter(torch.zeros_like(bias))
    for name in (site.bn, *site.bn_aliases):
        replace_module(model, name, norm)


def deploy(model: nn.Module, *, inplace: bool = False, check: bool = True, report_quant: bool = False) -> nn.Module:
    """Fuse every block into one plain conv; the result computes the same function in eval mode.

    With ``check`` each fused conv is compared with its block in float64 on a random
    input first; a mismatch raises ``ACNetError`` and leaves the model untouched.  The
    deployed model keeps the ``acnet_plan`` it was acified with.  ``report_quant`` prints one line on how its
    weights will quantise (``quant_report(...).summary()``: the worst layer and its INT8 SQNR).
    """
    deployed = _deploy(model, inplace, check)
    if report_quant:
        from .checks.quant import quant_report  # torch.ao and the report are imported only when asked for

        print(f"quantisation: {quant_report(deployed).summary()}")
    return deployed


def _deploy(model: nn.Module, inplace: bool, check: bool) -> nn.Module:
    _check_model(model, "deploy")
    if is_block(model):
        raise ACNetError("deploy needs a model that contains blocks; for a single block call block.fuse()")
    names: dict[int, list[str]] = {}
    blocks: dict[int, nn.Module] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        if is_block(module):
            names.setdefault(id(module), []).append(name)
            blocks[id(module)] = module
    if not blocks and not repopt.has_masks(model):
        _warn_no_blocks(model)
    fused = {}
    for key, block in blocks.items():
        weight, bias = block.fused_kernel()
        fused[key] = block.fuse(weight, bias)
        if check:
            _check_fusion(names[key][0], block, fused[key], weight, bias)
    if inplace:
        for key, conv in fused.items():
            for name in names[key]:
                replace_module(model, name, conv)
    else:
        model = copy.deepcopy(model, memo=dict(fused))
    for conv in model.modules():
        if repopt.is_masked(conv):
            repopt.strip(conv)
    return model


def _locate_site(model: nn.Module, site: Site) -> tuple[nn.Module, nn.Module | None]:
    """The conv (and absorbed BatchNorm) a recorded site names, checked against what was recorded."""
    conv = _module_at(model, site.names, "conv")
    if type(conv).__name__ != site.conv_type and not any(c.__name__ == site.conv_type for c in type(conv).__mro__):
        _misfit(site.name, f"is a {type(conv).__name__}, the record says {site.conv_type}")
    if tuple(conv.kernel_size) != tuple(site.kernel) or tuple(conv.stride) != tuple(site.stride):
        _misfit(site.name, f"has kernel {tuple(conv.kernel_size)}, stride {tuple(conv.stride)}; the record says "
                           f"{tuple(site.kernel)}, {tuple(site.stride)}")  # fmt: skip
    if conv.groups != site.groups or (conv.bias is not None) != site.conv_bias:
        _misfit(site.name, "has other groups or bias than recorded")
    if site.adapter and (class_path(type(conv)) != site.adapter or conv_adapter(conv) is None):
        _misfit(site.name, f"is a {class_path(type(conv))}, the record says {site.adapter} (with a conv adapter)")
    bn = None
    if site.bn:
        bn = _module_at(model, [site.bn, *site.bn_aliases], "BatchNorm")
        if not isinstance(bn, _BatchNorm):
            _misfit(site.bn, f"is a {type(bn).__name__}, not a BatchNorm")
    return conv, bn


def _module_at(model: nn.Module, names: list[str], what: str) -> nn.Module:
    """The one module registered under every name in ``names``."""
    found = []
    for name in names:
        try:
            found.append(model.get_submodule(name))
        except AttributeError:
            _misfit(name, f"does not exist (a {what} was recorded there)")
    if any(module is not found[0] for module in found):
        _misfit(names[0], f"is no longer the same module as {', '.join(names[1:])}")
    if is_block(found[0]):
        _misfit(names[0], "is already a block: apply the plan to the unmodified model")
    if repopt.is_masked(found[0]):
        _misfit(names[0], "already has a repopt gradient preconditioner: apply the plan to the unmodified model")
    return found[0]


def _misfit(name: str, problem: str) -> None:
    raise ACNetError(
        f"the recorded plan does not fit this model: {name or '<root>'} {problem}; "
        "build the model (class and arguments) the plan was recorded for"
    )


def _check_fusion(
    name: str, block: nn.Module, conv: nn.Module, weight: torch.Tensor, bias: torch.Tensor, tolerance: float = 1e-8
) -> None:
    """Compare the block with ``conv`` running the fused float64 kernel on a small random float64 input."""
    k, s, d = conv.kernel_size, conv.stride, conv.dilation
    pad = resolve_padding(conv.padding, k, d)
    size = [di * (ki - 1) + 1 + 2 * si + 2 * pi for ki, si, di, pi in zip(k, s, d, pad)]
    x = torch.randn(1, conv.in_channels, *size, dtype=torch.float64, device=weight.device)
    state = {n: t.detach().to(torch.float64) for n, t in [*block.named_parameters(), *block.named_buffers()]
             if t.is_floating_point()}  # fmt: skip
    with modes_kept(block, training=False), torch.no_grad(), torch.autocast(x.device.type, enabled=False):
        want = torch.func.functional_call(block, state, (x,))
        fused = {"weight": weight} | ({"bias": bias} if conv.bias is not None else {})
        got = torch.func.functional_call(conv, fused, (x,))
    err = (want - got).abs().max().item()
    if err > tolerance * max(1.0, want.abs().max().item()):
        raise ACNetError(f"fusing {name or '<root>'} is not exact (max error {err:.3g}); the model was left unchanged")


def _check_model(model: object, what: str) -> None:
    if not isinstance(model, nn.Module):
        raise ACNetError(f"{what} expects a torch.nn.Module, got {type(model).__name__}")


def _check_block_choice(block: BlockChoice, mode: str) -> None:
    """Every kind ``block`` names exists in ``mode`` (``ACNetError`` naming the registered ones otherwise)."""
    if mode not in MODES:
        raise ACNetError(f"unknown mode {mode!r}: use one of {', '.join(MODES)}")
    if mode == "repopt":  # a kind's repopt form preconditions what its fast block trains
        named = [block] if isinstance(block, str) else list(block.values()) if isinstance(block, Mapping) else []
        for kind in named:
            if isinstance(kind, str) and kind not in REPOPT_KINDS:
                block_class(kind, "exact")  # an unknown kind is named as such
                raise ACNetError(f"block kind {kind!r} has no repopt mode: use one of {', '.join(REPOPT_KINDS)}")
        mode = "fast"
    if isinstance(block, str):
        block_class(block, mode)
        return
    if not isinstance(block, Mapping) or not all(isinstance(k, str) and isinstance(v, str) for k, v in block.items()):
        raise ACNetError(f"block must be a kind or a mapping from name pattern to kind, got {type(block).__name__}")
    for kind in (*block.values(), DEFAULT_KIND):
        block_class(kind, mode)


def _checked_block_options(
    block: BlockChoice, mode: str, block_options: Mapping[str, Mapping[str, int]] | None
) -> dict[str, dict[str, int]]:
    """``block_options`` as kind -> options, each kind one that ``block`` chooses and each option one it takes."""
    if block_options is None:
        return {}
    if not isinstance(block_options, Mapping) or not all(isinstance(v, Mapping) for v in block_options.values()):
        raise ACNetError("block_options must map a block kind to its options, e.g. {'mobileone': {'k': 2}}")
    chosen = {block} if isinstance(block, str) else {*block.values(), DEFAULT_KIND}
    for kind, options in block_options.items():
        if kind not in chosen:
            raise ACNetError(f"block_options: block kind {kind!r} is not one that block chooses ({', '.join(chosen)})")
        block_class(kind, mode).resolve_options(options)
    return {kind: dict(options) for kind, options in block_options.items()}


def _warn_untraced(plan: Plan) -> None:
    """One warning when code torch.fx cannot trace left convs unconverted or without their BatchNorm."""
    skipped = sum(1 for s in plan.skipped if s.code in NEEDS_EXAMPLE_RUN)
    alone = sum(1 for s in plan.converted if s.evidence == "source")
    if not skipped and not alone:
        return
    first = next(iter(plan.trace_failures)) or "<root>"
    warn(
        f"torch.fx could not trace {len(plan.trace_failures)} module(s) (first: {first}): {skipped} conv(s) there "
        f"were left unconverted and {alone} converted without their BatchNorm; pass example_inputs=(a batch the "
        f"model accepts,) to acify to analyse them by running the model once (see model.{PLAN_ATTR})"
    )


def _warn_no_blocks(model: nn.Module) -> None:
    recorded = getattr(model, PLAN_ATTR, None)
    if isinstance(recorded, Plan) and not recorded.converted:
        warn(f"no ACNet blocks found: acify converted no conv of this model (see model.{PLAN_ATTR})")
    else:
        warn("no ACNet blocks found: did you use the model acify returned?")


def _patterns(patterns: Sequence[str] | str | None) -> tuple[str, ...] | None:
    if patterns is None:
        return None
    return (patterns,) if isinstance(patterns, str) else tuple(patterns)
