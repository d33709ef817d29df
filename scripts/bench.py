"""Training cost, inference latency and conversion time of every block kind and mode, side by side, as ratios.

Full size, by hand (about 30 minutes on two CPU cores):
    python scripts/bench.py --threads 2 --json docs/benchmarks.json
then the page, from every saved record (one per machine):
    python scripts/bench.py --render docs/benchmarks.json docs/benchmarks-h100.json --out docs/benchmarks.md
Smoke size, in the test suite (well under a minute):
    python scripts/bench.py --smoke
On a CUDA machine the same command measures the GPU (more rounds: a step is short there).
Variants are interleaved (the order rotates every round) and every figure is a median over rounds.
``main(argv)`` is the entry point for other front ends; the measuring tools are in bench_harness.py and the page
is written by bench_render.py.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torchvision
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_harness import (
    KIND_MODES,
    TrainStep,
    build,
    calibrated,
    forward_flops,
    interleaved,
    load_average,
    machine,
    n_params,
    peak_training_memory,
)
from bench_render import markdown
from naive_acnet import naive_acify

from acnet_convert import acify, deploy
from acnet_convert.demo.experiment import fold_conv_bn

SECTIONS = ("train", "inference", "convert")


@dataclass
class Sizes:
    """What to measure and how much: the full-size run, the smoke run, or either with overrides."""

    train: list[tuple[str, int, int]]  # (torchvision model, batch, input side)
    repeats: int  # rounds of every timing group, unless group_repeats gives each group its own
    warmup: int
    infer_models: list[str]
    infer_batch: int
    infer_size: int
    infer_repeats: int
    convert_repeats: int
    chain: list[int]
    zoo: list[str] | None  # None: every torchvision classification model
    kind_modes: tuple[str, ...] = KIND_MODES
    groups: tuple[tuple[str, ...], ...] = ()  # training variants timed in rounds of their own, with the original
    group_repeats: tuple[int, ...] = ()  # rounds of each group of ``groups``
    compile: str | None = None  # torch.compile mode for every model of the training section


FULL = Sizes(
    train=[("resnet18", 32, 64), ("mobilenet_v2", 32, 64), ("convnext_tiny", 32, 64), ("resnet18", 32, 224),
           ("mobilenet_v2", 32, 224), ("convnext_tiny", 32, 224)],
    repeats=9, warmup=1, infer_models=["resnet18", "mobilenet_v2", "convnext_tiny"], infer_batch=1, infer_size=224,
    infer_repeats=30, convert_repeats=5, chain=[25, 50, 100, 200], zoo=None,
)  # fmt: skip
FULL_CUDA = replace(FULL, repeats=25, warmup=3, infer_repeats=100)  # a GPU step is short: more rounds
SMOKE = Sizes(
    train=[("resnet18", 2, 32), ("mobilenet_v2", 2, 32)],
    repeats=2, warmup=0, infer_models=["resnet18"], infer_batch=1, infer_size=32, infer_repeats=2,
    convert_repeats=1, chain=[3, 6], zoo=["resnet18", "squeezenet1_1"],
)  # fmt: skip


def converted(base: nn.Module, kind_mode: str) -> nn.Module:
    """``base`` converted to one block kind in one mode, paper-style initialisation."""
    kind, mode = kind_mode.split("-")
    return acify(base, block=kind, mode=mode, init="scratch")


def training_variants(base: nn.Module, kind_modes: tuple[str, ...], naive: bool = True) -> dict[str, nn.Module]:
    """The model as given, a second copy of it (the control: how far two identical models time apart), each kind
    and mode, and the naive ACNet reference, all in train mode."""
    variants = {"original": copy.deepcopy(base), "control": copy.deepcopy(base),
                **{km: converted(base, km) for km in kind_modes}}  # fmt: skip
    if naive:
        variants["naive"] = naive_acify(base)
    return {name: model.train() for name, model in variants.items()}


def bench_training(sizes: Sizes, device: torch.device) -> list[dict]:
    """Training-step time, peak memory and forward FLOPs of the original model and every converted form.

    Each group of ``sizes.groups`` (by default one: every kind and mode, and the naive reference) is timed in
    rounds of its own with the original, and its ratios are against the original of those rounds."""
    rows = []
    groups = sizes.groups or (sizes.kind_modes,)
    for name, batch, side in sizes.train:
        base = build(name, device)
        x = torch.randn(batch, 3, side, side, device=device)
        y = torch.randint(0, 1000, (batch,), device=device)
        for number, group in enumerate(groups):
            models = training_variants(base, group, naive=number == 0)
            steps = {v: TrainStep(torch.compile(m, mode=sizes.compile) if sizes.compile else m, x, y)
                     for v, m in models.items()}  # fmt: skip
            repeats = sizes.group_repeats[number] if sizes.group_repeats else sizes.repeats
            timings = interleaved(steps, repeats, sizes.warmup, device)
            for variant, model in models.items():
                rows.append({"model": name, "batch": batch, "side": side, "variant": variant,
                             **asdict(timings[variant]), "peak_bytes": peak_training_memory(steps[variant]),
                             "forward_flops": forward_flops(model, x), "params": n_params(model),
                             "compiled": sizes.compile, "group": number})  # fmt: skip
            add_ratios(rows[-len(models) :], ("wall_ms", "cpu_ms", "peak_bytes", "forward_flops"))
            del models, steps
            gc.collect()
        del base
    return rows


def add_ratios(group: list[dict], keys: tuple[str, ...]) -> None:
    """Add ``<key>_ratio`` to every row of ``group``: its value over the first (original) row's."""
    for row in group:
        for key in keys:
            row[f"{key}_ratio"] = row[key] / group[0][key]


def bench_inference(sizes: Sizes, device: torch.device) -> list[dict]:
    """Eval latency of the deployed models against the original, unfolded and with conv + BatchNorm folded."""
    rows = []
    for name in sizes.infer_models:
        base = build(name, device)
        x = torch.randn(sizes.infer_batch, 3, sizes.infer_size, sizes.infer_size, device=device)
        calib = torch.randn(8, 3, sizes.infer_size, sizes.infer_size, device=device)
        original = calibrated(copy.deepcopy(base), calib)
        models = {"original": original, "original, conv+BN folded": fold_conv_bn(original)}
        for km in sizes.kind_modes:
            models[f"{km}, deployed and folded"] = fold_conv_bn(deploy(calibrated(converted(base, km), calib)))
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
    """One forward of ``model`` on ``x`` in inference mode, as a callable."""

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
        count = len(acify(model, inplace=True).acnet_plan.converted)
        mid = time.perf_counter()
        deploy(model, inplace=True)
        zoo_rows.append({"model": name, "converted": count, "acify_s": mid - start,
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
    """``n`` conv3x3-BN-ReLU layers in a row."""
    layers: list[nn.Module] = []
    for i in range(n):
        layers += [nn.Conv2d(3 if i == 0 else width, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU()]
    return nn.Sequential(*layers)


def run(sections: tuple[str, ...], sizes: Sizes, device: torch.device, log: Callable[[str], None] = print) -> dict:
    """Measure the chosen sections; return everything as a JSON-ready dict."""
    result: dict = {"machine": machine(device), "sections": list(sections)}
    measures = {
        "train": lambda: bench_training(sizes, device),
        "inference": lambda: bench_inference(sizes, device),
        "convert": lambda: bench_conversion(sizes),
    }
    for section in sections:
        start = time.perf_counter()
        result[section] = measures[section]()
        log(f"{section}: {time.perf_counter() - start:.1f} s")
    result["load_average_end"] = load_average()
    return result


def _training_case(text: str) -> tuple[str, int, int]:
    """``resnet18:32:64`` -> ("resnet18", 32, 64)."""
    try:
        name, batch, side = text.split(":")
        return name, int(batch), int(side)
    except ValueError:
        raise SystemExit(f"bench.py: bad --train case {text!r}: write MODEL:BATCH:SIDE, e.g. resnet18:32:64") from None


def _repeats(text: str, n_groups: int, parser: argparse.ArgumentParser) -> tuple[int, ...]:
    """``--repeats 9`` or ``9/31`` (one count per group of --variants): the rounds of each group."""
    try:
        counts = tuple(int(n) for n in text.split("/"))
    except ValueError:
        counts = ()
    if not counts or min(counts) < 1 or len(counts) not in (1, n_groups):
        parser.error(f"bad --repeats {text!r}: give one positive count, or one per group of --variants ({n_groups})")
    return counts * n_groups if len(counts) == 1 else counts


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point: measure, print the tables, write markdown and JSON when asked."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, for the test suite")
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {SECTIONS}")
    parser.add_argument("--variants", default=",".join(KIND_MODES),
                        help="comma-separated KIND-MODE list; '/' splits it into groups, each timed in training "
                        "rounds of its own with the original and the control")  # fmt: skip
    parser.add_argument("--repeats", help="training rounds (default: the run's own); N/M/... gives each group of "
                        "--variants its own")  # fmt: skip
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
    groups = tuple(tuple(v for v in group.split(",") if v) for group in args.variants.split("/"))
    groups = tuple(group for group in groups if group)
    kind_modes = tuple(v for group in groups for v in group)
    unknown = [s for s in sections if s not in SECTIONS] + [v for v in kind_modes if v not in KIND_MODES]
    if unknown:
        parser.error(f"unknown section(s) or variant(s) {', '.join(unknown)}: choose from {', '.join(SECTIONS)} "
                     f"and {', '.join(KIND_MODES)}")  # fmt: skip
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    sizes = SMOKE if args.smoke else FULL_CUDA if device.type == "cuda" else FULL
    if args.train:
        sizes = replace(sizes, train=[_training_case(case) for case in args.train.split(",")])
    sizes = replace(sizes, compile=args.compile, kind_modes=kind_modes, groups=groups if len(groups) > 1 else ())
    if args.repeats:
        sizes = replace(sizes, group_repeats=_repeats(args.repeats, len(groups), parser))
    result = run(sections, sizes, device)
    result["smoke"], result["command"] = args.smoke, shlex.join(["python", "scripts/bench.py", *argv])
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return _write(markdown([result]), args.out)


def _write(text: str, out: Path | None) -> int:
    """Print ``text`` and write it to ``out`` when given."""
    print(text)
    if out:
        out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
