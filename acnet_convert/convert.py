"""The public entry points: plan, acify and deploy."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Sequence

import torch
from torch import nn

from .block import BLOCK_CONVS, INITS, LAYOUTS, ACBlock, resolve_padding
from .errors import ACNetError
from .fast_block import FastACBlock
from .graph import Plan, analyze
from .surgery import replace_module

PLAN_ATTR = "acnet_plan"
MODES = ("exact", "fast")


def plan(
    model: nn.Module,
    *,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    min_kernel: int = 3,
    max_kernel: int | None = None,
    example_inputs: tuple | None = None,
    layout3d: str = "lines",
) -> Plan:
    """Report, without changing anything, what ``acify`` would do with every conv of ``model``."""
    _check_model(model, "plan")
    if layout3d not in LAYOUTS:
        raise ACNetError(f"unknown layout3d {layout3d!r}: use one of {', '.join(LAYOUTS)}")
    if example_inputs is not None and not isinstance(example_inputs, tuple):
        example_inputs = (example_inputs,)
    return analyze(model, _patterns(include), _patterns(exclude), min_kernel, max_kernel, example_inputs, layout3d)


def acify(
    model: nn.Module,
    *,
    inplace: bool = False,
    include: Sequence[str] | str | None = None,
    exclude: Sequence[str] | str | None = None,
    init: str = "preserve",
    gamma_init: float = 1.0,
    min_kernel: int = 3,
    max_kernel: int | None = None,
    example_inputs: tuple | None = None,
    mode: str = "exact",
    layout3d: str = "lines",
) -> nn.Module:
    """Turn every eligible Conv2d, Conv3d and ConvTranspose2d (with the BatchNorm after it) into an ACBlock.

    Returns a model of the same class (a copy unless ``inplace``); its ``acnet_plan``
    attribute lists every conv site with the decision taken and why.  ``example_inputs``
    (run once in eval mode) let convs inside code that torch.fx cannot trace be analysed too.
    ``mode="fast"`` makes each Conv2d a ``FastACBlock`` instead (one conv per forward, linear
    branches) and leaves every BatchNorm in place.  ``layout3d`` picks the branches of 3D kernels:
    ``"lines"`` (Kdx1x1, 1xKhx1, 1x1xKw) or ``"planes"`` (1xKhxKw, Kdx1xKw, KdxKhx1).
    """
    _check_model(model, "acify")
    if init not in INITS:
        raise ACNetError(f"unknown init {init!r}: use one of {', '.join(INITS)}")
    if mode not in MODES:
        raise ACNetError(f"unknown mode {mode!r}: use one of {', '.join(MODES)}")
    if isinstance(model, BLOCK_CONVS):
        raise ACNetError("acify needs a model that contains convs; wrap a single conv with ACBlock.from_conv")
    report = plan(
        model, include=include, exclude=exclude, min_kernel=min_kernel, max_kernel=max_kernel,
        example_inputs=example_inputs, layout3d=layout3d,
    )  # fmt: skip
    if not inplace:
        model = copy.deepcopy(model)
    for site in report.converted:
        conv = model.get_submodule(site.name)
        if mode == "fast" and type(conv) is not nn.Conv2d:
            site.action, site.bn, site.layout, site.reason = "skip", None, "", "fast mode converts Conv2d only"
            continue
        if mode == "fast":
            replace_module(model, site.name, FastACBlock.from_conv(conv, init=init, gamma_init=gamma_init))
            if site.bn:
                site.bn, site.reason = None, f"fast mode: BatchNorm {site.bn} stays after the block"
            continue
        bn = model.get_submodule(site.bn) if site.bn else None
        block = ACBlock.from_conv(conv, bn, init=init, gamma_init=gamma_init, layout=layout3d)
        replace_module(model, site.name, block)
        if site.bn:
            replace_module(model, site.bn, nn.Identity())
    setattr(model, PLAN_ATTR, report)
    untraced = [s.name for s in report.skipped if "example_inputs" in s.reason]
    if untraced:
        first = next(iter(report.trace_failures)) or "<root>"
        warnings.warn(
            f"torch.fx could not trace {len(report.trace_failures)} module(s) (first: {first}); "
            f"{len(untraced)} conv(s) there were left unconverted: "
            f"pass example_inputs=... to acify to analyse them, see model.{PLAN_ATTR}",
            stacklevel=2,
        )
    return model


def deploy(model: nn.Module, *, inplace: bool = False, check: bool = True) -> nn.Module:
    """Fuse every ACBlock and FastACBlock into one plain conv; the result computes the same function in eval mode.

    With ``check`` each fused conv is compared with its block in float64 on a random
    input first; a mismatch raises ``ACNetError`` and leaves the model untouched.
    """
    _check_model(model, "deploy")
    if isinstance(model, (ACBlock, FastACBlock)):
        raise ACNetError("deploy needs a model that contains ACBlocks; for a single block call block.fuse()")
    blocks = {name: m for name, m in model.named_modules() if isinstance(m, (ACBlock, FastACBlock))}
    fused = {}
    for name, block in blocks.items():
        weight, bias = block.fused_kernel()
        fused[name] = block.fuse(weight, bias)
        if check:
            _check_fusion(name, block, fused[name], weight, bias)
    if inplace:
        for name, conv in fused.items():
            replace_module(model, name, conv)
    else:
        model = copy.deepcopy(model, memo={id(blocks[name]): conv for name, conv in fused.items()})
    model.__dict__.pop(PLAN_ATTR, None)
    return model


def _check_fusion(
    name: str, block: nn.Module, conv: nn.Module, weight: torch.Tensor, bias: torch.Tensor, tolerance: float = 1e-8
) -> None:
    """Compare the block with ``conv`` running the fused float64 kernel on a small random float64 input."""
    k, s, d = block.kernel_size, block.stride, block.dilation
    pad = resolve_padding(block.padding, k, d)
    size = [di * (ki - 1) + 1 + 2 * si + 2 * pi for ki, si, di, pi in zip(k, s, d, pad)]
    x = torch.randn(1, block.in_channels, *size, dtype=torch.float64, device=weight.device)
    state = {n: t.detach().to(torch.float64) for n, t in [*block.named_parameters(), *block.named_buffers()]
             if t.is_floating_point()}  # fmt: skip
    was_training = block.training
    block.eval()
    try:
        with torch.no_grad(), torch.autocast(x.device.type, enabled=False):
            want = torch.func.functional_call(block, state, (x,))
            fused = {"weight": weight} | ({"bias": bias} if conv.bias is not None else {})
            got = torch.func.functional_call(conv, fused, (x,))
    finally:
        block.train(was_training)
    err = (want - got).abs().max().item()
    if err > tolerance * max(1.0, want.abs().max().item()):
        raise ACNetError(f"fusing {name or '<root>'} is not exact (max error {err:.3g}); the model was left unchanged")


def _check_model(model: object, what: str) -> None:
    if not isinstance(model, nn.Module):
        raise ACNetError(f"{what} expects a torch.nn.Module, got {type(model).__name__}")


def _patterns(patterns: Sequence[str] | str | None) -> list[str] | None:
    if patterns is None:
        return None
    return [patterns] if isinstance(patterns, str) else list(patterns)
