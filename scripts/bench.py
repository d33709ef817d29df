"""Training cost, inference latency and conversion time of acnet-convert, side by side, as ratios.

Full size, by hand (about 20 minutes on two CPU cores):
    python scripts/bench.py --threads 2 --json docs/benchmarks.json
then the page, from every saved record (one per machine):
    python scripts/bench.py --render docs/benchmarks.json docs/benchmarks-h100.json --out docs/benchmarks.md
Smoke size, in the test suite (well under a minute):
    python scripts/bench.py --smoke
On a CUDA machine the same command measures the GPU (more rounds: a step is short there).
Variants are interleaved (the order rotates every round) and every figure is a median over rounds.
``main(argv)`` is the entry point for other front ends.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from naive_acnet import naive_acify  # noqa: E402

from acnet_convert import ACBlock, FastACBlock, acify, deploy, plan  # noqa: E402
from acnet_convert.fast_block import compose_kernel, compose_kernel_backward  # noqa: E402
from acnet_convert.surgery import replace_module  # noqa: E402

MiB = 2**20
SECTIONS = ("train", "inference", "candidates", "convert")


@dataclass
class Sizes:
    """What to measure and how much: the full-size run, the smoke run, or either with overrides."""

    train: list[tuple[str, int, int]]  # (torchvision model, batch, input side)
    repeats: int
    warmup: int
    infer_models: list[str]
    infer_batch: int
    infer_size: int
    infer_repeats: int
    candidate_case: tuple[str, int, int]
    convert_repeats: int
    chain: list[int]
    zoo: list[str] | None  # None: every torchvision classification model
    compile: str | None = None  # torch.compile mode for every model of the training section


FULL = Sizes(
    train=[("resnet18", 32, 64), ("mobilenet_v2", 32, 64), ("resnet18", 32, 224), ("mobilenet_v2", 32, 224)],
    repeats=15, warmup=2, infer_models=["resnet18", "mobilenet_v2"], infer_batch=1, infer_size=224,
    infer_repeats=30, candidate_case=("resnet18", 32, 64), convert_repeats=5, chain=[25, 50, 100, 200], zoo=None,
)  # fmt: skip
FULL_CUDA = replace(FULL, repeats=25, warmup=3, infer_repeats=100)  # a GPU step is short: more rounds
SMOKE = Sizes(
    train=[("resnet18", 2, 32), ("mobilenet_v2", 2, 32), ("resnet18", 2, 48)],
    repeats=2, warmup=1, infer_models=["resnet18"], infer_batch=1, infer_size=32, infer_repeats=2,
    candidate_case=("resnet18", 2, 32), convert_repeats=1, chain=[3, 6], zoo=["resnet18", "squeezenet1_1"],
)  # fmt: skip


# --------------------------------------------------------------------------- measuring


@dataclass
class Timing:
    """Median wall-clock and process CPU time of one variant, in milliseconds, with the samples."""

    wall_ms: float
    cpu_ms: float
    wall_samples: list[float] = field(default_factory=list)


def interleaved(steps: dict[str, Callable[[], None]], repeats: int, warmup: int, device: torch.device) -> dict:
    """Run every step ``warmup`` times, then ``repeats`` rounds in a rotating order; medians per step."""
    for step in steps.values():
        for _ in range(warmup):
            step()
    names = list(steps)
    wall: dict[str, list[float]] = {n: [] for n in names}
    cpu: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            _sync(device)
            w0, c0 = time.perf_counter(), time.process_time()
            steps[name]()
            _sync(device)
            wall[name].append(1000 * (time.perf_counter() - w0))
            cpu[name].append(1000 * (time.process_time() - c0))
    return {n: Timing(statistics.median(wall[n]), statistics.median(cpu[n]), wall[n]) for n in names}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class TrainStep:
    """One SGD-with-momentum step of a model on a fixed batch; call it to run the step."""

    def __init__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, context=nullcontext):
        self.model, self.x, self.y, self.context = model, x, y, context
        self.optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

    def __call__(self) -> None:
        with self.context():
            self.optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(self.model(self.x), self.y).backward()
            self.optimizer.step()

    def state_bytes(self) -> int:
        """Bytes of the parameters and the optimizer state."""
        state = self.optimizer.state.values()
        return sum(p.nbytes for p in self.model.parameters()) + sum(
            t.nbytes for s in state for t in s.values() if torch.is_tensor(t)
        )


def peak_training_memory(step: TrainStep) -> int:
    """Peak bytes of one training step (run the step once first): parameters and optimizer state, plus the
    most that the allocator held above them during the step (CUDA: its peak statistic; CPU: its allocation
    and free events, as torch.profiler records them)."""
    step.model.zero_grad(set_to_none=True)
    if step.x.device.type == "cuda":
        before = torch.cuda.memory_allocated(step.x.device)
        torch.cuda.reset_peak_memory_stats(step.x.device)
        step()
        return torch.cuda.max_memory_allocated(step.x.device) - before + step.state_bytes()
    with _quiet_stderr(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                                 profile_memory=True) as prof:  # fmt: skip
        step()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    live = peak = 0
    for _, nbytes in events:  # frees of what was allocated before the step are not recorded: it starts at 0
        live += nbytes
        peak = max(peak, live)
    return peak + step.state_bytes()


@contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Silence the profiler's own log lines, which its C++ side writes straight to file descriptor 2."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(os.devnull, "w") as devnull:
        os.dup2(devnull.fileno(), 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def forward_flops(model: nn.Module, x: torch.Tensor) -> int:
    """FLOPs of one forward pass, as counted by torch.utils.flop_counter."""
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x)
    return counter.get_total_flops()


def n_params(model: nn.Module) -> int:
    """Number of parameter elements."""
    return sum(p.numel() for p in model.parameters())


# --------------------------------------------------------------------------- models


def build(name: str, device: torch.device) -> nn.Module:
    """A torchvision model with random weights, the same ones on every call."""
    torch.manual_seed(0)
    return torchvision.models.get_model(name, weights=None).to(device)


def training_variants(base: nn.Module) -> dict[str, nn.Module]:
    """The model as given and its three ACNet forms, all in train mode."""
    variants = {
        "original": copy.deepcopy(base),
        "exact": acify(base, init="scratch"),
        "fast": acify(base, init="scratch", mode="fast"),
        "naive": naive_acify(base),
    }
    return {name: model.train() for name, model in variants.items()}


def fold_conv_bn(model: nn.Module) -> nn.Module:
    """An eval-mode copy of ``model`` with every conv + BatchNorm pair the data flow proves folded into the conv."""
    model = copy.deepcopy(model).eval()
    for site in plan(model, min_kernel=1).sites:
        if site.bn:
            conv, bn = model.get_submodule(site.name), model.get_submodule(site.bn)
            replace_module(model, site.name, fuse_conv_bn_eval(conv, bn))
            replace_module(model, site.bn, nn.Identity())
    return model


def calibrated(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """``model`` after a few train-mode forwards, so that BatchNorm statistics and deployment are not trivial."""
    model.train()
    with torch.no_grad():
        for _ in range(2):
            model(x)
    return model.eval()


# --------------------------------------------------------------------------- sections


def bench_training(sizes: Sizes, device: torch.device) -> list[dict]:
    """Training-step time and peak memory of the original model and its three ACNet forms."""
    rows = []
    for name, batch, side in sizes.train:
        base = build(name, device)
        x = torch.randn(batch, 3, side, side, device=device)
        y = torch.randint(0, 1000, (batch,), device=device)
        models = training_variants(base)
        steps = {v: TrainStep(torch.compile(m, mode=sizes.compile) if sizes.compile else m, x, y)
                 for v, m in models.items()}  # fmt: skip
        timings = interleaved(steps, sizes.repeats, sizes.warmup, device)
        flops = {variant: forward_flops(model, x) for variant, model in models.items()}
        for variant, model in models.items():
            rows.append({"model": name, "batch": batch, "side": side, "variant": variant, **asdict(timings[variant]),
                         "peak_bytes": peak_training_memory(steps[variant]), "forward_flops": flops[variant],
                         "params": n_params(model), "compiled": sizes.compile})  # fmt: skip
        _add_ratios(rows[-len(models) :], ("wall_ms", "cpu_ms", "peak_bytes", "forward_flops"))
        del base, models, steps
        gc.collect()
    return rows


def bench_inference(sizes: Sizes, device: torch.device) -> list[dict]:
    """Eval latency of the deployed models against the original, unfolded and with conv + BatchNorm folded."""
    rows = []
    for name in sizes.infer_models:
        base = build(name, device)
        x = torch.randn(sizes.infer_batch, 3, sizes.infer_size, sizes.infer_size, device=device)
        calib = torch.randn(8, 3, sizes.infer_size, sizes.infer_size, device=device)
        exact = calibrated(acify(base, init="scratch"), calib)
        fast = calibrated(acify(base, init="scratch", mode="fast"), calib)
        original = calibrated(base, calib)
        models = {
            "original": original,
            "original, conv+BN folded": fold_conv_bn(original),
            "exact, deployed and folded": fold_conv_bn(deploy(exact)),
            "fast, deployed and folded": fold_conv_bn(deploy(fast)),
        }
        steps = {variant: _inference(model, x) for variant, model in models.items()}
        timings = interleaved(steps, sizes.infer_repeats, 2, device)
        group = [
            {"model": name, "batch": sizes.infer_batch, "side": sizes.infer_size, "variant": variant,
             **asdict(timings[variant]), "params": n_params(model)}
            for variant, model in models.items()
        ]  # fmt: skip
        folded = group[1]
        for row in group:
            row["wall_vs_original"] = row["wall_ms"] / group[0]["wall_ms"]
            row["wall_vs_folded"] = row["wall_ms"] / folded["wall_ms"]
            row["params_equal_folded"] = row["params"] == folded["params"]
        rows += group
    return rows


def _inference(model: nn.Module, x: torch.Tensor) -> Callable[[], None]:
    def run() -> None:
        with torch.inference_mode():
            model(x)

    return run


def bench_conversion(sizes: Sizes) -> dict:
    """Wall time of acify + deploy: resnet50 in both modes, chains of growing length, the torchvision zoo."""
    resnet = build("resnet50", torch.device("cpu"))
    resnet_rows = []
    for mode in ("exact", "fast"):
        for inplace in (False, True):
            a, d = _convert_times(resnet, sizes.convert_repeats, inplace, mode)
            resnet_rows.append({"mode": mode, "inplace": inplace, "acify_s": a, "deploy_s": d,
                                "converted": len(acify(resnet, mode=mode).acnet_plan.converted)})  # fmt: skip
    chain_rows = []
    for n in sizes.chain:
        a, d = _convert_times(_chain(n), sizes.convert_repeats, True, "exact")
        chain_rows.append({"convs": n, "total_s": a + d, "per_conv_ms": 1000 * (a + d) / n})
    zoo_rows = []
    names = sizes.zoo if sizes.zoo is not None else torchvision.models.list_models(module=torchvision.models)
    for name in names:
        model = build(name, torch.device("cpu"))
        start = time.perf_counter()
        converted = len(acify(model, inplace=True).acnet_plan.converted)
        mid = time.perf_counter()
        deploy(model, inplace=True)
        zoo_rows.append({"model": name, "converted": converted, "acify_s": mid - start,
                         "deploy_s": time.perf_counter() - mid})  # fmt: skip
        del model
        gc.collect()
    return {"resnet50": resnet_rows, "chain": chain_rows, "zoo": zoo_rows}


def _convert_times(model: nn.Module, repeats: int, inplace: bool, mode: str) -> tuple[float, float]:
    """Median seconds of acify and of deploy (a fresh copy each round when inplace)."""
    acify_t, deploy_t = [], []
    for _ in range(repeats):
        subject = copy.deepcopy(model) if inplace else model
        start = time.perf_counter()
        acified = acify(subject, inplace=inplace, mode=mode)
        mid = time.perf_counter()
        deploy(acified, inplace=inplace)
        acify_t.append(mid - start)
        deploy_t.append(time.perf_counter() - mid)
    return statistics.median(acify_t), statistics.median(deploy_t)


def _chain(n: int, width: int = 16) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(n):
        layers += [nn.Conv2d(3 if i == 0 else width, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU()]
    return nn.Sequential(*layers)


def _add_ratios(group: list[dict], keys: tuple[str, ...]) -> None:
    """Add ``<key>_ratio`` to every row of ``group``: its value over the first (original) row's."""
    for row in group:
        for key in keys:
            row[f"{key}_ratio"] = row[key] / group[0][key]


# --------------------------------------------------------------------------- implementation candidates


class _Candidate(nn.Module):
    """A block run by an alternative forward: same parameters, same function."""

    def __init__(self, block: nn.Module, forward: Callable[[nn.Module, torch.Tensor], torch.Tensor]):
        super().__init__()
        self.block, self.run = block, forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.run(self.block, x)


def _with_forward(model: nn.Module, forward: Callable[[nn.Module, torch.Tensor], torch.Tensor]) -> nn.Module:
    """A copy of ``model`` whose ACBlocks and FastACBlocks run ``forward`` instead of their own."""
    model = copy.deepcopy(model)
    for name, module in list(model.named_modules()):
        if isinstance(module, (ACBlock, FastACBlock)):
            replace_module(model, name, _Candidate(module, forward))
    return model


def _sum_out_of_place(block: ACBlock, x: torch.Tensor) -> torch.Tensor:
    square, hor, ver = block.branches.values()
    return square(x) + hor(x) + ver(x)


def _joint_asymmetric(block: ACBlock, x: torch.Tensor) -> torch.Tensor:
    """The 1xK and Kx1 branches as one conv (both kernels zero-padded to KxK, 2C outputs) and one BatchNorm call."""
    square, hor, ver = block.branches.values()
    bns = (hor.bn, ver.bn)
    if block.groups != 1 or any(type(bn) is not nn.BatchNorm2d or bn.momentum is None for bn in bns):
        return _sum_out_of_place(block, x)
    weight = torch.cat([_padded(hor.conv.weight, block.kernel_size), _padded(ver.conv.weight, block.kernel_size)])
    running = [torch.cat([getattr(bn, buffer) for bn in bns]) for buffer in ("running_mean", "running_var")]
    z = square.conv._conv_forward(x, weight, None)
    z = F.batch_norm(z, *running, torch.cat([bn.weight for bn in bns]), torch.cat([bn.bias for bn in bns]),
                     block.training, hor.bn.momentum, hor.bn.eps)  # fmt: skip
    with torch.no_grad():
        for bn, mean, var in zip(bns, *(r.chunk(2) for r in running)):
            bn.running_mean.copy_(mean)
            bn.running_var.copy_(var)
            bn.num_batches_tracked += block.training
    z_hor, z_ver = z.chunk(2, dim=1)
    out = square(x) + z_hor
    out += z_ver
    return out


def _asymmetric_channels_last(block: ACBlock, x: torch.Tensor) -> torch.Tensor:
    """The 1xK and Kx1 branches on a channels_last copy of the input (oneDNN runs thin kernels faster so)."""
    square, hor, ver = block.branches.values()
    x_last = x.contiguous(memory_format=torch.channels_last)
    out = square(x)
    out += hor(x_last)
    out += ver(x_last)
    return out


def _padded(weight: torch.Tensor, kernel: tuple[int, int]) -> torch.Tensor:
    (kh, kw), (h, w) = kernel, weight.shape[2:]
    return F.pad(weight, ((kw - w) // 2, (kw - w) // 2, (kh - h) // 2, (kh - h) // 2))


class _BatchNormSum(torch.autograd.Function):
    """BN_1(z_1) + BN_2(z_2) + BN_3(z_3) in training mode, written out with a single output buffer."""

    @staticmethod
    def forward(ctx, eps, *tensors):  # z1, z2, z3, gamma1, gamma2, gamma3, beta1, beta2, beta3
        zs, gammas, betas = tensors[:3], tensors[3:6], tensors[6:]
        out, shift, means, variances, invstds = None, 0, [], [], []
        for z, gamma, beta in zip(zs, gammas, betas):
            var, mean = torch.var_mean(z, dim=(0, 2, 3), correction=0)
            invstd = torch.rsqrt(var + eps)
            scale = gamma * invstd
            shift = shift + beta - mean * scale
            out = z * scale[:, None, None] if out is None else out.addcmul_(z, scale[:, None, None])
            means.append(mean), variances.append(var), invstds.append(invstd)
        out += shift[:, None, None]
        ctx.save_for_backward(*zs, *gammas, *means, *invstds)
        ctx.mark_non_differentiable(*means, *variances)
        return (out, *means, *variances)

    @staticmethod
    def backward(ctx, grad, *_):
        saved = ctx.saved_tensors
        n = grad.numel() / grad.shape[1]
        grad_sum = grad.sum((0, 2, 3))
        dz, dgamma = [], []
        for z, gamma, mean, invstd in zip(saved[:3], saved[3:6], saved[6:9], saved[9:]):
            centred_dot = torch.einsum("nchw,nchw->c", grad, z) - mean * grad_sum  # sum of grad * (z - mean)
            scale = gamma * invstd
            k = -scale * invstd * invstd * centred_dot / n
            d = grad * scale[:, None, None]
            d.addcmul_(z, k[:, None, None])
            d += (-scale * grad_sum / n - k * mean)[:, None, None]
            dz.append(d), dgamma.append(centred_dot * invstd)
        return (None, *dz, *dgamma, grad_sum, grad_sum, grad_sum)


def _custom_batch_norm_sum(block: ACBlock, x: torch.Tensor) -> torch.Tensor:
    """The three BatchNorms and the sum as one autograd function (training mode, plain BatchNorm2d only)."""
    branches = list(block.branches.values())
    bns = [b.bn for b in branches]
    if not block.training or any(type(bn) is not nn.BatchNorm2d or bn.momentum is None for bn in bns) or any(
        any(b.crop) for b in branches
    ):
        return _sum_out_of_place(block, x)
    zs = [b.conv(x) for b in branches]
    out, *stats = _BatchNormSum.apply(bns[0].eps, *zs, *[bn.weight for bn in bns], *[bn.bias for bn in bns])
    n = zs[0].numel() / zs[0].shape[1]
    with torch.no_grad():
        for bn, mean, var in zip(bns, stats[:3], stats[3:]):
            bn.running_mean.lerp_(mean, bn.momentum)
            bn.running_var.lerp_(var * n / (n - 1), bn.momentum)
            bn.num_batches_tracked += 1
    return out


class _RecomputedKernelConv(torch.autograd.Function):
    """``conv2d(x, compose_kernel(...), bias)`` that composes the kernel again in backward instead of keeping it."""

    @staticmethod
    def forward(x, bias, conv_args, kernel_size, *kernels_and_scales):
        return F.conv2d(x, compose_kernel(kernels_and_scales, kernel_size), bias, *conv_args)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, bias, ctx.conv_args, ctx.kernel_size, *kernels_and_scales = inputs
        ctx.save_for_backward(x, bias, *kernels_and_scales)

    @staticmethod
    def backward(ctx, grad):
        x, bias, *kernels_and_scales = ctx.saved_tensors
        kernel = compose_kernel(kernels_and_scales, ctx.kernel_size)
        mask = [ctx.needs_input_grad[0], True, bias is not None]
        grad_x, grad_kernel, grad_bias = torch.ops.aten.convolution_backward(
            grad, x, kernel, None if bias is None else [bias.shape[0]], *ctx.conv_args[:3], False, [0, 0],
            ctx.conv_args[3], mask,
        )  # fmt: skip
        return grad_x, grad_bias, None, None, *compose_kernel_backward(grad_kernel, kernels_and_scales)


def _fast_recomputed(block: FastACBlock, x: torch.Tensor) -> torch.Tensor:
    """FastACBlock's forward with the kernel composed again in backward (zero padding, int padding only)."""
    conv_args = (list(block.stride), list(block.padding), list(block.dilation), block.groups)
    return _RecomputedKernelConv.apply(x, block.bias, conv_args, block.kernel_size, *block._kernels_and_scales())


def _fast_padded(block: FastACBlock, x: torch.Tensor) -> torch.Tensor:
    """FastACBlock's first forward: scaled kernels zero-padded by ``F.pad`` and summed, autograd throughout."""
    weight, weight_hor, weight_ver, *scales = block._kernels_and_scales()
    kernel = weight * scales[0].reshape(-1, 1, 1, 1)
    for small, scale in ((weight_hor, scales[1]), (weight_ver, scales[2])):
        kernel = kernel + _padded(small * scale.reshape(-1, 1, 1, 1), block.kernel_size)
    return F.conv2d(x, kernel, block.bias, block.stride, block.padding, block.dilation, block.groups)


@contextmanager
def _onednn_off() -> Iterator[None]:
    with torch.backends.mkldnn.flags(enabled=False):
        yield


CANDIDATES = {
    # name: (what it is, the variant it is compared with, kept?)
    "exact, as shipped": ("`ACBlock.forward`: three conv + BN branches, the third output added in place", "original",
                          True),  # fmt: skip
    "exact, out-of-place sum": ("`square(x) + hor(x) + ver(x)`, the first implementation", "original", False),
    "exact, joint 1xK + Kx1 conv": ("both asymmetric kernels zero-padded to KxK, one conv with 2C outputs and one "
                                    "BatchNorm call", "original", False),  # fmt: skip
    "exact, custom BN + sum": ("the three BatchNorms and the sum as one autograd function", "original", False),
    "exact, asymmetric branches channels_last": ("inside the block, the 1xK and Kx1 convs run on a "
                                                 "channels_last copy of the input", "original", False),  # fmt: skip
    "exact, channels_last": ("model and input in channels_last", "original, channels_last", False),
    "exact, oneDNN off": ("`torch.backends.mkldnn` disabled", "original, oneDNN off", False),
    "fast, as shipped": ("`FastACBlock`: the composition as one autograd function with a hand-written backward "
                         "(a multiply and in-place row and column adds forward), then `F.conv2d`, which keeps the "
                         "composed kernel for backward", "original", True),  # fmt: skip
    "fast, kernel recomputed": ("composition and conv as one autograd function that keeps no kernel and composes "
                                "it again in backward", "original", False),  # fmt: skip
    "fast, `F.pad` composition": ("scaled kernels zero-padded with `F.pad` and summed, autograd throughout "
                                  "(the kernel kept)", "original", False),  # fmt: skip
}


def bench_candidates(sizes: Sizes, device: torch.device) -> list[dict]:
    """Training-step ratios of the block implementations that were tried, each against its own original."""
    name, batch, side = sizes.candidate_case
    base = build(name, device).train()
    exact = acify(base, init="scratch").train()
    fast = acify(base, init="scratch", mode="fast").train()
    x = torch.randn(batch, 3, side, side, device=device)
    y = torch.randint(0, 1000, (batch,), device=device)
    x_last = x.contiguous(memory_format=torch.channels_last)
    models = {
        "original": copy.deepcopy(base),
        "exact, as shipped": exact,
        "exact, out-of-place sum": _with_forward(exact, _sum_out_of_place),
        "exact, joint 1xK + Kx1 conv": _with_forward(exact, _joint_asymmetric),
        "exact, custom BN + sum": _with_forward(exact, _custom_batch_norm_sum),
        "exact, asymmetric branches channels_last": _with_forward(exact, _asymmetric_channels_last),
        "original, channels_last": copy.deepcopy(base).to(memory_format=torch.channels_last),
        "exact, channels_last": copy.deepcopy(exact).to(memory_format=torch.channels_last),
        "original, oneDNN off": copy.deepcopy(base),
        "exact, oneDNN off": copy.deepcopy(exact),
        "fast, as shipped": fast,
        "fast, kernel recomputed": _with_forward(fast, _fast_recomputed),
        "fast, `F.pad` composition": _with_forward(fast, _fast_padded),
    }
    if device.type != "cpu":
        models = {k: m for k, m in models.items() if "oneDNN" not in k}
    steps = {}
    for key, model in models.items():
        context = _onednn_off if "oneDNN" in key else nullcontext
        steps[key] = TrainStep(model, x_last if "channels_last" in key else x, y, context)
    timings = interleaved(steps, sizes.repeats, sizes.warmup, device)
    memory = {key: peak_training_memory(step) for key, step in steps.items()}
    rows = []
    for candidate, (what, reference, kept) in CANDIDATES.items():
        if candidate in timings:
            t, ref = timings[candidate], timings[reference]
            rows.append({"candidate": candidate, "what": what, "kept": kept, "model": name, "batch": batch,
                         "side": side, "wall_ratio": t.wall_ms / ref.wall_ms, "cpu_ratio": t.cpu_ms / ref.cpu_ms,
                         "wall_ms": t.wall_ms, "reference_wall_ms": ref.wall_ms,
                         "memory_ratio": memory[candidate] / memory[reference]})  # fmt: skip
    return rows


# --------------------------------------------------------------------------- report


def machine(device: torch.device) -> dict:
    """What the figures were measured on, and how busy the machine was."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {
        "cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "device": str(device),
        "accelerator": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "torch": torch.__version__, "torchvision": torchvision.__version__, "python": platform.python_version(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }  # fmt: skip


def run(sections: tuple[str, ...], sizes: Sizes, device: torch.device, log: Callable[[str], None] = print) -> dict:
    """Measure the chosen sections; return everything as a JSON-ready dict."""
    result: dict = {"machine": machine(device), "smoke": sizes is SMOKE, "sections": list(sections)}
    measures = {
        "train": lambda: bench_training(sizes, device),
        "inference": lambda: bench_inference(sizes, device),
        "candidates": lambda: bench_candidates(sizes, device),
        "convert": lambda: bench_conversion(sizes),
    }
    for section in sections:
        start = time.perf_counter()
        result[section] = measures[section]()
        log(f"{section}: {time.perf_counter() - start:.1f} s")
    result["load_average_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    return result


def busy_note(result: dict) -> str:
    """A sentence on how loaded the machine was: load averages at start and end against the benchmark's threads."""
    m = result["machine"]
    loads = [load[0] for load in (m["load_average"], result["load_average_end"]) if load]
    if not loads:
        return ""
    busy = max(loads) > m["torch_threads"] + 0.5  # more than the benchmark's own threads were running
    state = "busy: other work shared the cores, so wall-clock figures are noisy" if busy else "quiet"
    steadier = "" if m["accelerator"] else "; CPU-time ratios are the steadier figures"
    return (
        f"1-minute load average {loads[0]:.1f} at the start and {loads[-1]:.1f} at the end, with {m['cores']} cores "
        f"and {m['torch_threads']} benchmark threads ({state}{steadier})."
    )


def merge_results(results: list[dict]) -> list[dict]:
    """Results of several commands on one machine joined into one (sections concatenated), machine by machine."""
    merged: dict[tuple, dict] = {}
    for result in results:
        m = result["machine"]
        key = (m["cpu"], m["cores"], m["device"], m["accelerator"])
        if key not in merged:
            merged[key] = {**copy.deepcopy(result), "command": [result["command"]] if isinstance(result["command"],
                           str) else list(result["command"])}  # fmt: skip
            continue
        into = merged[key]
        into["command"] += [result["command"]] if isinstance(result["command"], str) else result["command"]
        for section in result["sections"]:
            if section not in into["sections"]:
                into["sections"].append(section)
            if isinstance(result[section], list):
                into[section] = into.get(section, []) + result[section]
            else:
                into[section] = result[section]
    return list(merged.values())


def markdown(results: list[dict]) -> str:
    """The whole of docs/benchmarks.md: a summary, then one part per machine."""
    results = merge_results(results)
    lines = [
        "# Benchmarks",
        "",
        "Each part of this page was written by `scripts/bench.py` on the machine it names; the commands are given "
        "in each part. To regenerate, run a part's commands with `--json FILE`, then "
        "`python scripts/bench.py --render FILE... --out docs/benchmarks.md` (the JSON files beside this page are "
        "the records this page was rendered from) rather than editing this page. Variants are measured interleaved "
        "(the order rotates every round); every time is a median over rounds, and ratios are against the "
        "unconverted model measured in the same rounds.",
        "",
        *_summary_md(results),
        "",
    ]
    for result in results:
        lines += _machine_md(result)
    return "\n".join(lines + NOTES + [""])


def _machine_name(m: dict) -> str:
    return f"GPU: {m['accelerator']}" if m["accelerator"] else f"CPU: {m['cpu']}, {m['cores']} cores"


def _summary_md(results: list[dict]) -> list[str]:
    lines = [
        "## Summary",
        "",
        "Training-step time and training memory of the two modes against the unconverted model, from the training "
        "tables below (eager mode).",
        "",
        "| machine | model | batch, input | exact: step | exact: memory | fast: step | fast: memory |",
        "|---|---|---|---|---|---|---|",
    ]
    for result in results:
        rows = [r for r in result.get("train", []) if not r.get("compiled")]
        for case in dict.fromkeys((r["model"], r["batch"], r["side"]) for r in rows):
            by_variant = {r["variant"]: r for r in rows if (r["model"], r["batch"], r["side"]) == case}
            exact, fast = by_variant["exact"], by_variant["fast"]
            marker = " (see its note)" if result.get("note") else ""
            lines.append(
                f"| {_machine_name(result['machine'])}{marker} | {case[0]} | {case[1]}, {case[2]}x{case[2]} | "
                f"{exact['wall_ms_ratio']:.2f}x | {exact['peak_bytes_ratio']:.2f}x | {fast['wall_ms_ratio']:.2f}x | "
                f"{fast['peak_bytes_ratio']:.2f}x |"
            )
    return lines


def _machine_md(result: dict) -> list[str]:
    m = result["machine"]
    commands = result["command"] if isinstance(result["command"], list) else [result["command"]]
    lines = [
        f"## {_machine_name(m)}",
        "",
        "Measured by " + "; ".join(f"`{c}`" for c in commands) + ".",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['torch_threads']} torch threads, device `{m['device']}`"
        + (f" ({m['accelerator']})" if m["accelerator"] else "")
        + f", torch {m['torch']}, torchvision {m['torchvision']}, Python {m['python']}. {busy_note(result)}",
        "",
    ]
    if result.get("note"):
        lines += [f"Note: {result['note']}", ""]
    for section, render in (("train", _train_md), ("inference", _inference_md), ("candidates", _candidates_md),
                            ("convert", _convert_md)):  # fmt: skip
        if section in result:
            lines += render(result[section], m) + [""]
    return lines


VARIANT_NAMES = {
    "original": "original",
    "exact": "`acify` (exact)",
    "fast": "`acify(mode=\"fast\")`",
    "naive": "naive reference",
}


def _train_md(rows: list[dict], m: dict) -> list[str]:
    lines = [
        "### Training step",
        "",
        "One step = forward, cross-entropy, backward and an SGD-with-momentum update on a fixed random batch, train "
        "mode. The naive reference (`scripts/naive_acnet.py`) is the straightforward implementation: module walk, "
        "three separate conv + BatchNorm branches, no optimisation. *FLOP ratio* is the forward FLOP count over "
        "the original's (torch.utils.flop_counter): the limit the step-time ratio of a block that computes every "
        "branch can approach.",
        "",
        _memory_definition(m),
        "",
        "| model | batch, input | variant | step (ms) | ratio | CPU time ratio | peak memory (MiB) | memory ratio "
        "| FLOP ratio |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['batch']}, {r['side']}x{r['side']} | {VARIANT_NAMES[r['variant']]}"
            f"{_compiled(r.get('compiled'))} | "
            f"{r['wall_ms']:.1f} | {r['wall_ms_ratio']:.2f}x | {r['cpu_ms_ratio']:.2f}x | "
            f"{r['peak_bytes'] / MiB:.1f} | {r['peak_bytes_ratio']:.2f}x | {r['forward_flops_ratio']:.2f} |"
        )
    return lines


def _compiled(mode: str | bool | None) -> str:
    """How a training row's model was compiled, as a suffix of its variant name."""
    if not mode:
        return ""
    return ", compiled" if mode in (True, "default") else f", compiled ({mode})"


def _memory_definition(m: dict) -> str:
    if m["device"].startswith("cuda"):
        return "*Peak memory* is `torch.cuda.max_memory_allocated` over one training step."
    return (
        "*Peak memory* is the most the CPU allocator held during one training step, from its allocation and free "
        "events as `torch.profiler` records them, including parameters, gradients and optimizer state: the "
        "quantity `torch.cuda.max_memory_allocated` gives on a GPU."
    )


def _inference_md(rows: list[dict], m: dict) -> list[str]:
    lines = [
        "### Inference after deployment",
        "",
        "Eval mode, `torch.inference_mode()`. `deploy` fuses the ACNet blocks; the conv + BatchNorm pairs it does "
        "not touch (1x1 convs, and in fast mode every converted conv, whose BatchNorm stays) are then folded exactly "
        "as in the folded original, so the deployed models have the original's architecture.",
        "",
        "| model | batch, input | variant | parameters | same as folded | latency (ms) | vs original | vs folded |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['batch']}, {r['side']}x{r['side']} | {r['variant']} | {r['params']:,} | "
            f"{'yes' if r['params_equal_folded'] else 'no'} | {r['wall_ms']:.2f} | {r['wall_vs_original']:.2f}x | "
            f"{r['wall_vs_folded']:.2f}x |"
        )
    return lines


def _candidates_md(rows: list[dict], m: dict) -> list[str]:
    case = f"{rows[0]['model']}, batch {rows[0]['batch']}, {rows[0]['side']}x{rows[0]['side']}" if rows else ""
    lines = [
        "### What was tried",
        "",
        f"Training-step ratio of each implementation of the blocks that was tried ({case}), against the original "
        "model run the same way, measured in the same interleaved rounds. Every candidate computes the same "
        "function, gradients and BatchNorm statistics as the shipped block (checked in float64 by "
        "`tests/test_bench.py`); it is kept only if the measurements favour it (time, then peak memory).",
        "",
        "The memory ratio is the peak memory of the training table, against the same original.",
        "",
        "| candidate | what | step ratio | CPU time ratio | memory ratio | kept |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['candidate']} | {r['what']} | {r['wall_ratio']:.2f}x | {r['cpu_ratio']:.2f}x | "
                     f"{r['memory_ratio']:.2f}x | {'yes' if r['kept'] else 'no'} |")  # fmt: skip
    return lines


NOTES = [
    "## Notes on the figures",
    "",
    "- The exact block computes every branch, so its step-time ratio cannot go below the FLOP ratio of the training "
    "tables. What it pays above that is memory-bound work that the FLOP count does not see: two more BatchNorms per "
    "block (statistics, normalisation and their backward are passes over the branch outputs), the branch outputs "
    "themselves, and the libraries' lower throughput on 1xK and Kx1 kernels (oneDNN on the CPU, cuDNN on the GPU). "
    "For MobileNetV2, whose converted convs are depthwise (memory-bound themselves), that work is nearly all of it: "
    "its FLOP ratio says little there. The naive reference runs the same native kernels, so exact mode can only "
    "beat it by what it does around them, and it is level with it.",
    "- Adding the third branch in place saves one full-size temporary per block; its time gain is within noise.",
    "- Zero-padding the asymmetric kernels to KxK to run them as one conv triples their FLOPs, which costs far more "
    "than the saved call. A custom BN + sum function written with PyTorch operations needs more passes over the "
    "activations than the native fused BatchNorm kernels, in both directions.",
    "- channels_last and disabling oneDNN change the original model as much as the acified one, so they do not "
    "move the ratio in ACNet's favour (and oneDNN off is slower in absolute terms). Timed alone, oneDNN runs 1x3 "
    "and 3x1 convs two to three times faster on channels_last input than on the default layout, but converting "
    "the input inside the block and summing outputs of mixed layouts costs that back, and how much depends on "
    "what else ran in the process: slightly faster than the shipped block in the CPU table above (1.81x against "
    "1.89x), but slower when the two are timed against the original alone (2.11-2.18x against 1.84-1.88x at "
    "64x64, 2.64x against 2.04x at 224x224) and when each model trains alone in its own process, as in real "
    "training (ResNet-18 at 64x64: 252-258 ms against 209-216 ms a step). It was not adopted.",
    "- The crop a branch applies when the conv's padding is smaller than the branch offset is a view, and it does "
    "not occur in ResNet or MobileNetV2 (every branch reaches its pixels through padding alone), so avoiding it "
    "was not measured here.",
    "- Fast mode: composing the kernel again in backward instead of keeping it was tried. It keeps one "
    "kernel-sized tensor fewer per converted conv from forward to backward, but the peak comes in backward, "
    "when the gradients are being written and the last layers' kernels are freed already: the peak barely moves "
    "(ResNet-18 at batch 32, 64x64: 1.46x against 1.50x on the CPU, 1.44x against 1.45x on the H100), while the "
    "extra composition and the operations around it cost time (CPU at 64x64: from level to 7% of a step across "
    "runs; H100 at batch 32, where the host is the bottleneck: 2.38x against 1.93x). The shipped block keeps "
    "the kernel. An earlier "
    "memory account that summed everything saved for backward with every gradient overstated the saving "
    "(1.67x -> 1.44x); the tables now give the allocator's peak on both devices.",
    "- Fast mode's remaining cost is proportional to the number of weights, not to the batch or the image: the "
    "composition, and the gradients and optimizer state of the extra 1xK and Kx1 kernels. Those kernels hold two "
    "thirds as many weights as the 3x3 kernels (7.3 million in ResNet-18); with their gradients and SGD momentum "
    "they alone add 84 MiB to the peak training memory of ResNet-18 at batch 32 (182 MiB for the original at "
    "64x64, 779 MiB at 224x224): floors of 1.46x and 1.11x for any implementation that trains separate kernels. "
    "The shipped block's peaks are 6 MiB above those floors (1.50x and 1.12x on the CPU): the composed kernels "
    "still alive when the peak comes. The time follows the same pattern: a "
    "visible share of a step at 64x64, where ResNet-18's "
    "last stage works on 2x2 maps, and a few percent at 224x224; MobileNetV2's converted convs are depthwise, so "
    "it is small there.",
    "- On the GPU, a batch of 32 leaves the H100 idle most of the step: ResNet-18 takes 10-13 ms per step at both "
    "64x64 and 224x224, the time the host needs to issue its operations. There every extra operation costs its "
    "launch, whatever its size: exact mode adds two convs, two BatchNorms and two sums per block, fast mode a "
    "dozen small operations on the kernels, and both cost about twice the original's step. At batch 256 the GPU "
    "is the bottleneck and fast mode costs 1.04x (ResNet-18) and 1.02x (MobileNetV2) in time and 1.01x / 1.00x "
    "in memory, while exact mode's extra activations and BatchNorms cost 2.34x / 1.93x. torch.compile (default "
    "mode) at batch 32, 64x64 takes fast mode to 1.47x and exact mode to 2.14x; CUDA graphs (`mode=\"reduce-"
    "overhead\"`), which remove launch costs, were not measured.",
]


def _convert_md(conv: dict, m: dict) -> list[str]:
    lines = [
        "### acify + deploy wall time",
        "",
        "resnet50 (medians, seconds; `inplace` converts a fresh copy each round):",
        "",
        "| mode | inplace | convs converted | acify | deploy | total |",
        "|---|---|---|---|---|---|",
    ]
    for r in conv["resnet50"]:
        lines.append(f"| {r['mode']} | {'yes' if r['inplace'] else 'no'} | {r['converted']} | {r['acify_s']:.3f} | "
                     f"{r['deploy_s']:.3f} | {r['acify_s'] + r['deploy_s']:.3f} |")  # fmt: skip
    lines += ["", "Cost against the number of convs (chain of conv3x3-BN-ReLU, 16 channels, exact mode, inplace):", "",
              "| convs | acify + deploy (s) | per conv (ms) |", "|---|---|---|"]  # fmt: skip
    lines += [f"| {r['convs']} | {r['total_s']:.3f} | {r['per_conv_ms']:.2f} |" for r in conv["chain"]]
    zoo = conv["zoo"]
    if zoo:
        totals = sorted(((r["acify_s"] + r["deploy_s"], r["model"]) for r in zoo), reverse=True)
        lines += [
            "",
            f"The torchvision classification zoo ({len(zoo)} models, exact mode, inplace, one run each): "
            f"{sum(r['converted'] for r in zoo)} convs converted, acify + deploy {sum(t for t, _ in totals):.1f} s in "
            f"all, median {statistics.median(t for t, _ in totals):.2f} s per model; slowest: "
            + ", ".join(f"{name} {t:.2f} s" for t, name in totals[:5]) + ". Per model in the JSON file.",
        ]  # fmt: skip
    return lines


def _training_case(text: str) -> tuple[str, int, int]:
    """``resnet18:32:64`` -> ("resnet18", 32, 64)."""
    try:
        name, batch, side = text.split(":")
        return name, int(batch), int(side)
    except ValueError:
        raise SystemExit(f"bench.py: bad --train case {text!r}: write MODEL:BATCH:SIDE, e.g. resnet18:32:64") from None


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point: measure, print the tables, write markdown and JSON when asked."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, for the test suite")
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {SECTIONS}")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    parser.add_argument("--train", help="training cases as MODEL:BATCH:SIDE,... (default: the run's own)")
    parser.add_argument("--compile", nargs="?", const="default", metavar="MODE",
                        help="torch.compile every model of the training section (optionally: the compile mode)")
    parser.add_argument("--out", type=Path, help="write the markdown report here")
    parser.add_argument("--json", type=Path, help="write every figure and sample here")
    parser.add_argument("--render", type=Path, nargs="+", metavar="JSON",
                        help="measure nothing: write the page from these saved results")
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    if args.render:
        return _write(markdown([json.loads(path.read_text()) for path in args.render]), args.out)
    sections = tuple(s for s in args.sections.split(",") if s)
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown:
        parser.error(f"unknown section(s) {', '.join(unknown)}: choose from {', '.join(SECTIONS)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    sizes = SMOKE if args.smoke else FULL_CUDA if device.type == "cuda" else FULL
    if args.train:
        sizes = replace(sizes, train=[_training_case(case) for case in args.train.split(",")])
    sizes = replace(sizes, compile=args.compile)
    result = run(sections, sizes, device)
    result["command"] = shlex.join(["python", "scripts/bench.py", *argv])
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return _write(markdown([result]), args.out)


def _write(text: str, out: Path | None) -> int:
    print(text)
    if out:
        out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
