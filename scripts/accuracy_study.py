"""Baseline vs ACNet (exact and fast modes) over several seeds; mean and standard deviation written as markdown.

Usage:
    python scripts/accuracy_study.py                     # 8x8 digits, SmallCNN, writes docs/accuracy.md
    python scripts/accuracy_study.py --dataset cifar10 --data-dir PATH --device cuda --out cifar10.md

Every seed fixes the initial weights (the ACNet variants start from the baseline's kernels) and the batch
order; the train/test split is fixed.  The page is written from the runs, whatever they show.
"""

from __future__ import annotations

import argparse
import copy
import inspect
import math
import platform
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from acnet_convert import ACNetError, acify, deploy
from acnet_convert.experiment import Recipe, Split, load_cifar10, load_digits, predict, single_thread, train
from acnet_convert.models import CifarResNet, SmallCNN

ROOT = Path(__file__).resolve().parent.parent
VARIANTS = ("baseline", "exact", "fast")
VARIANT_NOTES = {
    "baseline": "baseline: the plain model, trained as it is",
    "exact": "exact: the paper's block, KxK + 1xK + Kx1 convs each with its BatchNorm, summed",
    "fast": "fast: one conv per forward whose kernel is composed from scaled KxK, 1xK and Kx1 kernels; the "
    "BatchNorm after the conv stays (a linearised variant, not the paper's block)",
}
MODELS = {
    "small_cnn": lambda split: SmallCNN(split.in_channels, split.num_classes),
    "resnet56": lambda split: CifarResNet(56, split.num_classes, split.in_channels),
}


@dataclass(frozen=True)
class Preset:
    """The default model, training recipe and new-branch gamma for one data set."""

    model: str
    recipe: Recipe
    gamma_init: float
    seeds: int
    description: str


PRESETS = {
    "digits": Preset(
        "small_cnn", Recipe(epochs=30, batch_size=64, lr=0.05, weight_decay=1e-4), 1.0, 10,
        "the 30-epoch recipe of the demo (SGD, cosine learning rate, no augmentation); new-branch gamma 1 "
        "(BatchNorm's default)",
    ),
    "cifar10": Preset(
        "resnet56", Recipe(epochs=400, batch_size=128, lr=0.2, weight_decay=1e-4, augment=True), 1 / 3, 5,
        "the ACNet authors' released ResNet-56 configuration: SGD with momentum 0.9, batch 128, cosine learning "
        "rate from 0.2 to 0 over 400 epochs, weight decay 1e-4, new-branch gamma 1/3; the standard CIFAR "
        "augmentation (pad to 40x40, random 32x32 crop, horizontal flip)",
    ),
}  # fmt: skip


@dataclass
class Run:
    """One trained model: its final test accuracy, and for ACNet how many deployed predictions matched."""

    variant: str
    seed: int
    accuracy: float
    seconds: float
    same_predictions: int | None


def supported_variants() -> set[str]:
    """The variants this installation can train: ``fast`` needs ``acify(..., mode=...)``."""
    has_mode = "mode" in inspect.signature(acify).parameters
    return set(VARIANTS) if has_mode else {"baseline", "exact"}


def build_variant(base: nn.Module, variant: str, gamma_init: float) -> nn.Module:
    """The baseline (a copy of ``base``) or ``base`` acified in the given mode, paper-style initialisation."""
    if variant == "baseline":
        return copy.deepcopy(base)
    mode = {"mode": variant} if "mode" in inspect.signature(acify).parameters else {}
    return acify(base, init="scratch", gamma_init=gamma_init, **mode)


def run_one(split: Split, model: str, variant: str, seed: int, recipe: Recipe, gamma_init: float, device: str) -> Run:
    """Train one variant from the seed's initial weights; deploy and compare predictions for ACNet variants."""
    torch.manual_seed(seed)
    trained = build_variant(MODELS[model](split), variant, gamma_init).to(device)
    history = train(trained, split, recipe, seed)
    same = None
    if variant != "baseline":
        x_test = split.x_test.to(device)
        same = (predict(deploy(trained.eval()), x_test) == predict(trained, x_test)).sum().item()
    return Run(variant, seed, history.accuracy[-1], history.seconds, same)


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def results_table(runs: list[Run], variants: list[str], test_size: int) -> list[str]:
    """Markdown rows: accuracy statistics per variant, paired differences with the baseline, deployment check."""
    by_variant = {v: sorted((r for r in runs if r.variant == v), key=lambda r: r.seed) for v in variants}
    baseline = [r.accuracy for r in by_variant.get("baseline", [])]
    rows = [
        "| variant | mean top-1 (%) | std | min | max | minus baseline, paired (points) | better / same / worse "
        "| deployed = trained | train time (s) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for variant, variant_runs in by_variant.items():
        acc = [r.accuracy for r in variant_runs]
        mean, std = mean_std(acc)
        paired = better = "n/a"
        if variant != "baseline" and len(baseline) == len(acc):
            diffs = [a - b for a, b in zip(acc, baseline)]
            diff_mean, diff_std = mean_std(diffs)
            paired = f"{diff_mean:+.2f} ± {diff_std:.2f}"
            better = f"{sum(d > 0 for d in diffs)} / {sum(d == 0 for d in diffs)} / {sum(d < 0 for d in diffs)}"
        same = [r.same_predictions for r in variant_runs if r.same_predictions is not None]
        deployed = f"{sum(same)}/{len(same) * test_size}" if same else "n/a"
        seconds = statistics.fmean(r.seconds for r in variant_runs)
        rows.append(
            f"| {variant} | {mean:.2f} | {std:.2f} | {min(acc):.2f} | {max(acc):.2f} | {paired} | {better} "
            f"| {deployed} | {seconds:.1f} |"
        )
    return rows


def paired_summary(runs: list[Run], variants: list[str]) -> list[str]:
    """One markdown bullet per ACNet variant: paired mean difference with the baseline and its standard error."""
    accuracy = {(r.variant, r.seed): r.accuracy for r in runs}
    seeds = sorted({r.seed for r in runs})
    if "baseline" not in variants or len(seeds) < 2:
        return []
    lines = []
    for variant in (v for v in variants if v != "baseline"):
        diff_mean, diff_std = mean_std([accuracy[variant, s] - accuracy["baseline", s] for s in seeds])
        error = diff_std / math.sqrt(len(seeds))
        verdict = "more" if abs(diff_mean) > 2 * error else "less"
        lines.append(
            f"- {variant} minus baseline: {diff_mean:+.2f} points, standard error {error:.2f} over {len(seeds)} "
            f"seeds: {verdict} than two standard errors from zero."
        )
    return [*lines, ""]


def per_seed_table(runs: list[Run], variants: list[str]) -> list[str]:
    """Markdown rows: every run's accuracy, one row per seed."""
    seeds = sorted({r.seed for r in runs})
    accuracy = {(r.variant, r.seed): r.accuracy for r in runs}
    rows = ["| seed | " + " | ".join(variants) + " |", "|---" * (len(variants) + 1) + "|"]
    rows += [f"| {s} | " + " | ".join(f"{accuracy[v, s]:.2f}" for v in variants) + " |" for s in seeds]
    return rows


def code_version() -> str:
    """The git commit the study ran on, noting uncommitted changes to the library or the script."""
    def git(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True)

    try:
        commit = git("rev-parse", "--short", "HEAD")
        changed = git("status", "--porcelain", "--", "acnet_convert", "scripts/accuracy_study.py").stdout.strip()
    except OSError:
        return "unknown (no git)"
    if commit.returncode:
        return "unknown (not a git checkout)"
    return f"commit {commit.stdout.strip()}" + (" with uncommitted changes" if changed else "")


def report(args: argparse.Namespace, split: Split, recipe: Recipe, runs: list[Run], variants: list[str],
           pending: list[str], seconds: float) -> str:  # fmt: skip
    """The whole markdown page."""
    preset = PRESETS[args.dataset]
    command = shlex.join(["python", "scripts/accuracy_study.py", *sys.argv[1:]])
    lines = [
        "# Accuracy study",
        "",
        "<!-- Written by scripts/accuracy_study.py from its runs: rerun the script instead of editing. -->",
        "",
        "Does training with Asymmetric Convolution Blocks give a better plain model than training the plain model?",
        "Each seed fixes the initial weights (the ACNet variants start from the baseline's kernels) and the batch",
        "order; the train/test split is the same for every run. Accuracy is top-1 on the test split after the last",
        "epoch. *Minus baseline, paired* is the mean and standard deviation over seeds of (variant - baseline) for",
        "the same seed. *Deployed = trained* counts test images on which the deployed plain model predicts the same",
        "class as the trained ACNet model.",
        "",
        "## Setup",
        "",
        f"- data: {split.name}, {len(split.y_train):,} training and {len(split.y_test):,} test images of "
        f"{'x'.join(map(str, split.x_train.shape[1:]))}; one test image is {100 / len(split.y_test):.2f} points",
        f"- model: `{args.model}`",
        f"- recipe: {recipe.epochs} epochs, batch {recipe.batch_size}, SGD lr {recipe.lr:g} (cosine to 0), momentum "
        f"{recipe.momentum:g}, weight decay {recipe.weight_decay:g}, augmentation {'on' if recipe.augment else 'off'}",
        f"- the {args.dataset} preset (options on the command line override it): {preset.description}",
        f"- variants (ACNet ones built by `acify(model, init=\"scratch\", gamma_init={args.gamma_init:.4g}, "
        "mode=...)`):",
        *(f"  - {VARIANT_NOTES[v]}" for v in variants),
        f"- seeds: {', '.join(map(str, args.seed_list))}",
        f"- ran on: {args.device}{' (one torch thread)' if args.device == 'cpu' else ''}, torch {torch.__version__}, Python {platform.python_version()}, "
        f"{seconds / 60:.1f} minutes in all",
        f"- command: `{command}`; code: {code_version()}",
        "",
        "## Results",
        "",
        *results_table(runs, variants, len(split.y_test)),
        "",
    ]
    if pending:
        missing = ", ".join(pending)
        lines += [f"Results for {missing} mode are pending: this installation's `acify` has no such mode.", ""]
    lines += [*paired_summary(runs, variants), "Per seed (top-1 %):", "", *per_seed_table(runs, variants), ""]
    return "\n".join(lines) + GUIDE


GUIDE = """
## How to read this

The study measures what ACNet does for one model on one data set with one recipe. The ACNet paper's gains
were measured on CIFAR and ImageNet with long schedules; a difference smaller than the spread over seeds here
is not evidence either way, and a near-saturated data set such as the 8x8 digits leaves little room for any
method. The part that is not statistical is the *deployed = trained* column: the deployed plain model must
agree with the trained ACNet model on every test image.

## Checking the paper on CIFAR-10

The paper reports, among others, ResNet-56 on CIFAR-10 going from 94.31% to 95.09% top-1. With CIFAR-10 on
disk (the python version, `cifar-10-batches-py`, as `torchvision.datasets.CIFAR10(PATH, download=True)`
leaves it; the script itself never downloads) and a GPU:

```bash
python scripts/accuracy_study.py --dataset cifar10 --data-dir PATH --device cuda --out cifar10-study.md
```

`--dataset cifar10` selects `--model resnet56` (He et al.'s CIFAR ResNet-56, 0.85M parameters, from
`acnet_convert.models.CifarResNet`) and this recipe: standard augmentation (zero-pad to 40x40, random 32x32
crop, random horizontal flip), SGD with momentum 0.9, batch 128, weight decay 1e-4, learning rate 0.2 with a
cosine schedule to 0 over 400 epochs, every branch's BatchNorm gamma 1/3 (the authors' released ResNet-56
configuration). Each option can be overridden (`--epochs`, `--batch-size`, `--lr`, `--weight-decay`,
`--gamma-init`, `--seeds`, `--modes`). That is 400 epochs per model, three variants and five seeds by
default: plan GPU days, or start with `--seeds 1 --epochs 100` to see the trend.
"""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options; unset training options come from the data set's preset."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", choices=sorted(PRESETS), default="digits")
    parser.add_argument("--data-dir", help="folder holding CIFAR-10's cifar-10-batches-py (for --dataset cifar10)")
    parser.add_argument("--model", choices=sorted(MODELS), help="default: the data set's preset")
    parser.add_argument("--modes", default=",".join(VARIANTS), help="comma-separated: baseline, exact, fast")
    parser.add_argument("--seeds", type=int, help="use seeds 0..N-1 (default: 10 for digits, 5 for cifar10)")
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--lr", type=float)
    parser.add_argument("--weight-decay", type=float)
    parser.add_argument("--gamma-init", type=float, help="initial BatchNorm gamma of the new branches")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=str(ROOT / "docs" / "accuracy.md"), help="markdown file to write")
    args = parser.parse_args(argv)
    preset = PRESETS[args.dataset]
    args.model = args.model or preset.model
    args.gamma_init = preset.gamma_init if args.gamma_init is None else args.gamma_init
    args.seeds = preset.seeds if args.seeds is None else args.seeds
    args.seed_list = list(range(args.seeds))
    args.variants = [v.strip() for v in args.modes.split(",") if v.strip()]
    unknown = set(args.variants) - set(VARIANTS)
    if unknown or args.seeds < 1:
        parser.error(f"--modes takes {', '.join(VARIANTS)}; --seeds at least 1 (got {args.modes!r}, {args.seeds})")
    if args.dataset == "cifar10" and not args.data_dir:
        parser.error("--dataset cifar10 needs --data-dir PATH (nothing is downloaded)")
    return args


def make_recipe(args: argparse.Namespace) -> Recipe:
    """The preset's recipe with the options given on the command line."""
    overrides = {k: getattr(args, k) for k in ("epochs", "batch_size", "lr", "weight_decay")}
    return replace(PRESETS[args.dataset].recipe, **{k: v for k, v in overrides.items() if v is not None})


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    recipe = make_recipe(args)
    try:
        split = load_digits() if args.dataset == "digits" else load_cifar10(args.data_dir)
    except ACNetError as error:
        raise SystemExit(f"error: {error}") from None
    available = supported_variants()
    variants = [v for v in args.variants if v in available]
    pending = [v for v in args.variants if v not in available]
    start = time.perf_counter()
    runs = []
    with single_thread():
        for seed in args.seed_list:
            for variant in variants:
                run = run_one(split, args.model, variant, seed, recipe, args.gamma_init, args.device)
                runs.append(run)
                print(f"seed {seed} {variant:<8} top-1 {run.accuracy:6.2f}%  {run.seconds:6.1f} s", flush=True)
    page = report(args, split, recipe, runs, variants, pending, time.perf_counter() - start)
    Path(args.out).write_text(page)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
