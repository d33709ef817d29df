"""Gradient re-parameterisation (RepOpt): a plain conv whose weight gradient is preconditioned as a CSLA block's.

The conv keeps its class and state-dict keys.  Its preconditioner is held in non-persistent buffers (``.to()``
moves them, ``state_dict()`` leaves them out) and applied by a tensor hook on the weight.  Tensor hooks do not
survive ``copy.deepcopy`` or pickling, so a forward pre-hook, which does, hooks every weight tensor it has not
hooked yet.  The hook runs before any optimizer sees the gradient: SGD adds weight decay after it, DDP all-reduces
the preconditioned gradient, AMP's scale passes through it (all linear).
"""

from __future__ import annotations

import os
import weakref

import torch
from torch import Tensor, nn
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

from .blocks import block_class
from .constants import REPOPT_KINDS
from .errors import ACNetError, warn
from .preconditioners import branches, csla_kernel, precondition, preconditioner

MASK, POOL, ADAM = "repopt_mask", "repopt_pool", "repopt_adam"  # the buffers of a conv with a preconditioner
ADAMS = (torch.optim.Adam, torch.optim.AdamW)  # their update is scaled by ADAM (see preconditioners.py)
ADAPTIVE = (torch.optim.Adamax, torch.optim.NAdam, torch.optim.RAdam, torch.optim.Adagrad, torch.optim.Adadelta,
            torch.optim.RMSprop, torch.optim.SparseAdam)  # fmt: skip
_HOOKED: dict[int, tuple[weakref.ref, weakref.ref]] = {}  # id -> (weight tensor, its conv), for hooked weights
_CHECKED: weakref.WeakSet = weakref.WeakSet()  # optimizers whose algorithm was checked at their first step
_ADAM_STEPS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # Adam(W) -> the weights before its step
_TORCH = os.path.dirname(torch.__file__) + os.sep  # warnings point past torch.optim, at the caller of step()


def conv_problem(kind: str, conv: nn.Module) -> str:
    """Why ``kind``'s gradient preconditioner cannot train ``conv``, or '' when it can."""
    if kind not in REPOPT_KINDS:
        return f"block kind {kind!r} has no repopt mode (it has one for {', '.join(REPOPT_KINDS)})"
    return block_class(kind, "fast").conv_problem(conv)


def describe(kind: str, conv: nn.Module) -> str:
    """The CSLA branches whose training the preconditioner reproduces, e.g. ``3x3 + 1x3 + 3x1 (gradient)``."""
    kh, kw = conv.kernel_size
    avg = "avg" if _depthwise(conv) else "1x1-avg"
    names = {"square": f"{kh}x{kw}", "row": f"1x{kw}", "column": f"{kh}x1", "pointwise": "1x1", "avg": avg}
    shown = [names[b] for b in branches(kind, depthwise=_depthwise(conv))]
    if kind == "repvgg" and _identity(conv):
        shown.append("identity")
    return " + ".join(shown) + " (gradient)"


def default_scales(kind: str, conv: nn.Module, scale: float) -> dict[str, list[float]]:
    """Every branch's constant scale at ``scale`` (one value for all output channels), as a plan records it."""
    return {name: [float(scale)] for name in branches(kind, depthwise=_depthwise(conv))}


def attach(conv: nn.Conv2d, kind: str, scales: dict[str, list[float]], *, init: str = "preserve") -> None:
    """Precondition ``conv``'s weight gradient as ``kind``'s CSLA block with ``scales`` (changed in place; the plan
    has checked that ``kind`` takes it).

    ``init="scratch"`` first sets the kernel to the CSLA sum of the branches' own initial kernels.
    """
    wanted = branches(kind, depthwise=_depthwise(conv))
    if sorted(scales) != sorted(wanted) or any(len(v) not in (1, conv.out_channels) for v in scales.values()):
        raise ACNetError(f"the plan's {kind} repopt scales must give {', '.join(wanted)}, each one value or one per output "
                         f"channel ({conv.out_channels}); got {({k: len(v) for k, v in scales.items()})}")
    tensors = {name: torch.tensor(values, dtype=torch.float64) for name, values in scales.items()}
    if init == "scratch":
        with torch.no_grad():
            conv.weight.copy_(_scratch_kernel(conv, kind, tensors))
    mask, pool = preconditioner(kind, conv.weight.shape, conv.groups, tensors, identity=_identity(conv))
    factory = {"dtype": conv.weight.dtype, "device": conv.weight.device}
    conv.register_buffer(MASK, mask.to(**factory), persistent=False)
    if pool is not None:
        conv.register_buffer(POOL, pool.to(**factory), persistent=False)
    else:
        adam, _ = preconditioner(kind, conv.weight.shape, conv.groups, tensors, identity=_identity(conv), power=1)
        conv.register_buffer(ADAM, adam.to(**factory), persistent=False)
    conv.register_forward_pre_hook(WeightHook())
    _watch_optimizers()


def strip(conv: nn.Conv2d) -> None:
    """Remove the preconditioner from ``conv``: a fresh weight parameter (no tensor hook), no buffers, no pre-hook."""
    for key, hook in list(conv._forward_pre_hooks.items()):
        if isinstance(hook, WeightHook):
            del conv._forward_pre_hooks[key]
    for name in (MASK, POOL, ADAM):
        conv._buffers.pop(name, None)
        conv._non_persistent_buffers_set.discard(name)
    conv.weight = nn.Parameter(conv.weight.detach(), requires_grad=conv.weight.requires_grad)


def is_masked(module: nn.Module) -> bool:
    """Whether ``module`` is a conv whose weight gradient is preconditioned."""
    return isinstance(module, nn.Conv2d) and any(isinstance(h, WeightHook) for h in module._forward_pre_hooks.values())


def has_masks(model: nn.Module) -> bool:
    """Whether ``model`` holds a conv whose weight gradient is preconditioned."""
    return any(is_masked(m) for m in model.modules())


class WeightHook:
    """A conv's forward pre-hook: hooks the preconditioner onto each weight tensor the conv gets (after a copy,
    a pickle round trip or ``load_state_dict(assign=True)``), once.  A weight that several convs share (tied
    weights) is one kernel, trained as one CSLA block: it is hooked once, by the first of them to run."""

    def __init__(self):
        self.hooked = None  # a weak reference to the weight tensor last seen

    def __call__(self, conv: nn.Module, args: tuple) -> None:
        weight = conv.weight
        if not weight.requires_grad or (self.hooked is not None and self.hooked() is weight):
            return
        self.hooked = weakref.ref(weight)
        if _conv_of(weight) is None:
            weight.register_hook(_Precondition(conv))
            key = id(weight)
            _HOOKED[key] = (weakref.ref(weight, lambda _: _HOOKED.pop(key, None)), weakref.ref(conv))

    def __getstate__(self) -> dict:
        return {"hooked": None}  # a copy's weight is a new tensor, without the hook


class _Precondition:
    """The tensor hook: the weight's gradient through ``P``; nothing once the conv's preconditioner is removed."""

    def __init__(self, conv: nn.Module):
        self.conv = weakref.ref(conv)

    def __call__(self, grad: Tensor) -> Tensor | None:
        conv = self.conv()
        mask = None if conv is None else conv._buffers.get(MASK)
        return None if mask is None else precondition(grad, mask, conv._buffers.get(POOL))


def _watch_optimizers() -> None:
    """Check every optimizer at its first step; let Adam and AdamW move preconditioned kernels as CSLA blocks."""
    global _watching
    if not _watching:
        register_optimizer_step_pre_hook(_before_step)
        register_optimizer_step_post_hook(_after_step)
        _watching = True


_watching = False


def _before_step(optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
    if optimizer not in _CHECKED:
        _CHECKED.add(optimizer)
        _check(optimizer)
    if isinstance(optimizer, ADAMS):
        _ADAM_STEPS[optimizer] = [(p, group, p.detach().clone()) for group in optimizer.param_groups
                                  for p in group["params"] if _adam_scale(p) is not None]  # fmt: skip


def _after_step(optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
    """Scale the adaptive part of each preconditioned kernel's Adam(W) step by ``Σᵢ|αᵢ|``; decoupled decay as is."""
    with torch.no_grad():
        for p, group, before in _ADAM_STEPS.pop(optimizer, ()):
            decayed = before
            if group.get("decoupled_weight_decay", isinstance(optimizer, torch.optim.AdamW)):
                decayed = before * (1 - group["lr"] * group["weight_decay"])
            p.copy_(decayed + _adam_scale(p) * (p - decayed))


def _conv_of(weight: Tensor) -> nn.Module | None:
    """The conv whose preconditioner ``weight`` carries, or None."""
    tensor, conv = _HOOKED.get(id(weight), (lambda: None, lambda: None))
    return conv() if tensor() is weight else None


def _adam_scale(weight: Tensor) -> Tensor | None:
    conv = _conv_of(weight)
    return None if conv is None or conv.weight is not weight else conv._buffers.get(ADAM)


def _check(optimizer: torch.optim.Optimizer) -> None:
    """One warning, at an optimizer's first step, when it breaks the equivalence with the CSLA block."""
    masked = [p for group in optimizer.param_groups for p in group["params"] if _conv_of(p) is not None]
    if not masked or type(optimizer) is torch.optim.SGD:
        return
    name = type(optimizer).__name__
    coupled = [g for g in optimizer.param_groups if g.get("weight_decay") and not g.get("decoupled_weight_decay")]
    if isinstance(optimizer, ADAMS) and any(_adam_scale(p) is None for p in masked):
        why = f"{name}, under which DBB's average-pool branch has no equivalent (it is exact under SGD)"
    elif type(optimizer) is torch.optim.Adam and coupled:
        why = f"{name} with weight_decay (L2 added to the gradient, then normalised): use AdamW"
    elif isinstance(optimizer, ADAMS):
        return
    elif isinstance(optimizer, ADAPTIVE):
        why = f"{name}, which scales each weight's step by its own gradient's size, so the preconditioner barely acts"
    else:
        why = f"{name}: the equivalence with the CSLA block holds for SGD and Adam(W) only"
    warn(f"{len(masked)} weight(s) with a repopt gradient preconditioner are trained by {why}; use "
         "torch.optim.SGD (exact) or AdamW (exact up to its eps), or acify with mode='fast'", skip=(_TORCH,))


def _scratch_kernel(conv: nn.Conv2d, kind: str, scales: dict[str, Tensor]) -> Tensor:
    """The CSLA sum of the branches' initial kernels: the conv's own kernel as the KxK branch, PyTorch's default
    initialisation for the others, 1 for a depthwise DBB's per-channel average and for RepVGG's identity."""
    kh, kw = conv.kernel_size
    shapes = {"row": (1, kw), "column": (kh, 1), "pointwise": (1, 1), "avg": (1, 1)}
    factory = {"dtype": torch.float64, "device": conv.weight.device}
    kernels = {"square": conv.weight.detach().to(**factory)}
    for name in branches(kind, depthwise=_depthwise(conv))[1:]:
        if name == "avg" and _depthwise(conv):
            kernels[name] = torch.ones(conv.out_channels, 1, 1, 1, **factory)
        else:
            template = nn.Conv2d(conv.in_channels, conv.out_channels, shapes[name], groups=conv.groups, bias=False)
            kernels[name] = template.weight.detach().to(**factory)
    scales = {name: values.to(conv.weight.device) for name, values in scales.items()}
    kernel = csla_kernel(kind, kernels, scales, conv.groups, identity=_identity(conv))
    return kernel.to(conv.weight.dtype)


def _depthwise(conv: nn.Module) -> bool:
    return conv.groups == conv.in_channels == conv.out_channels


def _identity(conv: nn.Module) -> bool:
    return conv.in_channels == conv.out_channels and tuple(conv.stride) == (1, 1)
