"""What scripts/bench.py measures with: interleaved timing, one training step, its peak memory, FLOPs, the machine."""

from __future__ import annotations

import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from acnet_convert.constants import BUILTIN_VARIANTS, REPOPT_KINDS

MiB = 2**20
# every built-in kind in each of its modes, then each gradient preconditioner, in the order the pages list them
KIND_MODES = (*BUILTIN_VARIANTS, *(f"{kind}-repopt" for kind in REPOPT_KINDS))


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
            sync(device)
            w0, c0 = time.perf_counter(), time.process_time()
            steps[name]()
            sync(device)
            wall[name].append(1000 * (time.perf_counter() - w0))
            cpu[name].append(1000 * (time.process_time() - c0))
    return {n: Timing(statistics.median(wall[n]), statistics.median(cpu[n]), wall[n]) for n in names}


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on the CPU)."""
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


def build(name: str, device: torch.device) -> nn.Module:
    """A torchvision model with random weights, the same ones on every call."""
    torch.manual_seed(0)
    return torchvision.models.get_model(name, weights=None).to(device)


def calibrated(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """``model`` after a few train-mode forwards, so that BatchNorm statistics and deployment are not trivial."""
    model.train()
    with torch.no_grad():
        for _ in range(2):
            model(x)
    return model.eval()


def load_average() -> list[float] | None:
    """The 1-, 5- and 15-minute load averages, or None where the platform has none."""
    return list(os.getloadavg()) if hasattr(os, "getloadavg") else None


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
        "load_average": load_average(),
    }  # fmt: skip
