"""Baseline vs every block kind and mode over several seeds: accuracy, robustness and quantisation, as markdown.

Usage:
    python scripts/accuracy_study.py                     # 8x8 digits, SmallCNN: docs/accuracy.md and .json
    python scripts/accuracy_study.py --render docs/accuracy.json --out docs/accuracy.md   # the page only
    python scripts/accuracy_study.py --dataset cifar10 --data-dir PATH --device cuda --out cifar10.md

Every seed fixes the initial weights (the converted variants start from the baseline's kernels) and the batch
order; the train/test split is fixed.  The page is written from the runs, whatever they show.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
import types
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from fractions import Fraction
from pathlib import Path

import torch
from torch import nn

from acnet_convert import ACNetError, acify, deploy, plan, quant_report, search_scales
from acnet_convert.constants import BUILTIN_VARIANTS, DEFAULT_REPOPT_SCALE
from acnet_convert.demo.experiment import (
    Recipe,
    Split,
    accuracy,
    fold_conv_bn,
    int8_ptq_accuracy,
    load_cifar10,
    load_digits,
    predict,
    quantize_weights,
    single_thread,
    train,
    transformed_accuracy,
)
from acnet_convert.demo.models import CifarResNet, LargeKernelCNN, SmallCNN

ROOT = Path(__file__).resolve().parent.parent
REPOPT_VARIANTS = ("acb-repopt", "repvgg-repopt", "acb-repopt-searched", "repvgg-repopt-searched")  # no gamma
KIND_MODES = (*BUILTIN_VARIANTS, *REPOPT_VARIANTS)
SEARCH_EPOCHS = 2  # the scale search's epochs on the training split, before the repopt model trains
KIND_NOTES = {
    "acb-exact": "the ACNet paper's block: KxK, 1xK and Kx1 convs, each with its BatchNorm, summed",
    "acb-fast": "one conv per forward whose kernel is composed from scaled KxK, 1xK and Kx1 kernels; the BatchNorm "
    "after the conv stays (a linearised ACNet, not the paper's block)",
    "dbb-exact": "the Diverse Branch Block (ACNet v2): KxK, 1x1, 1x1 then average pooling, and 1x1 then KxK "
    "branches, each with its BatchNorm, summed",
    "dbb-fast": "DBB linearised like acb-fast: one conv whose kernel is composed from the branches' scaled kernels",
    "repvgg-exact": "RepVGG's block: KxK, 1x1 and (where shapes allow) identity branches, each with its BatchNorm",
    "repvgg-fast": "RepVGG linearised like acb-fast",
    "qarepvgg-exact": "QARepVGG's block: KxK with its BatchNorm, plain 1x1 and (where shapes allow) identity, one "
    "BatchNorm after the sum",
    "mobileone-exact": "MobileOne's block: k KxK convs (k = 4), a 1x1 for KxK convs and (where shapes allow) "
    "identity, each with its BatchNorm, on 1x1 and depthwise convs too",
    "mobileone-fast": "MobileOne linearised like acb-fast",
    "dilated-exact": "UniRepLKNet's Dilated Reparam Block on depthwise KxK convs, K >= 5: smaller dilated "
    "depthwise convs, each with its BatchNorm, summed (other convs fall back to acb-exact)",
    "dilated-fast": "the Dilated Reparam Block linearised like acb-fast (other convs fall back to acb-fast)",
    "acb-repopt": f"the plain model, each conv's gradient preconditioned as ACB's CSLA block with every scale "
    f"{DEFAULT_REPOPT_SCALE:g} (`acify(model, block=\"acb\", mode=\"repopt\", init=\"scratch\")`)",
    "repvgg-repopt": f"the plain model, each conv's gradient preconditioned as RepVGG's CSLA block with every scale "
    f"{DEFAULT_REPOPT_SCALE:g}",
    "acb-repopt-searched": f"acb-repopt with the scales `search_scales` finds in {SEARCH_EPOCHS} epochs of the fast "
    "blocks on the training split (same recipe), then the plain model trained with them",
    "repvgg-repopt-searched": "repvgg-repopt with searched scales, as acb-repopt-searched",
}
TRANSFORM_LABELS = {"flip_lr": "flipped left-right", "flip_ud": "flipped up-down", "rot90": "rotated 90°"}
QUANT_SETTINGS = {  # name: (bits, per output channel?)
    "int8_tensor": (8, False), "int8_channel": (8, True), "int4_tensor": (4, False), "int4_channel": (4, True),
}  # fmt: skip
QUANT_LABELS = {
    "int8_tensor": "INT8 W, per tensor", "int8_channel": "INT8 W, per channel", "int4_tensor": "INT4 W, per tensor",
    "int4_channel": "INT4 W, per channel", "int8_ptq": "INT8 W+A (PTQ)",
}  # fmt: skip
WEIGHT_LABELS = {
    "int8_tensor_sqnr_db": "INT8 per-tensor SQNR (dB)", "int4_tensor_sqnr_db": "INT4 per-tensor SQNR (dB)",
    "max_over_std": "max\\|w\\|/std", "channel_spread": "channel max/median", "centre_cross_energy": "centre cross",
}  # fmt: skip
CALIBRATION_IMAGES = 512
MODELS = {
    "small_cnn": lambda split: SmallCNN(split.in_channels, split.num_classes),
    "large_kernel_cnn": lambda split: LargeKernelCNN(split.in_channels, split.num_classes),
    "resnet20": lambda split: CifarResNet(20, split.num_classes, split.in_channels),
    "resnet56": lambda split: CifarResNet(56, split.num_classes, split.in_channels),
}


@dataclass(frozen=True)
class Preset:
    """The default model, training recipe, new-branch gammas and seeds for one data set."""

    model: str
    recipe: Recipe
    gammas: tuple[str, ...]
    seeds: int
    description: str


PRESETS = {
    "digits": Preset(
        "small_cnn", Recipe(epochs=20, batch_size=64, lr=0.05, weight_decay=1e-4), ("1", "1/3"), 10,
        "SGD, cosine learning rate, no augmentation, 20 epochs (the demo trains 30; 20 keeps the fifteen variants "
        "of ten seeds within about 25 minutes on one CPU thread); every kind at new-branch gamma 1 (BatchNorm's "
        "default) and 1/3 (the ACNet authors' released ResNet setting)",
    ),
    "cifar10": Preset(
        "resnet56", Recipe(epochs=400, batch_size=128, lr=0.2, weight_decay=1e-4, augment=True), ("1/3",), 5,
        "the ACNet authors' released ResNet-56 configuration: SGD with momentum 0.9, batch 128, cosine learning "
        "rate from 0.2 to 0 over 400 epochs, weight decay 1e-4, new-branch gamma 1/3; the standard CIFAR "
        "augmentation (pad to 40x40, random 32x32 crop, horizontal flip)",
    ),
}  # fmt: skip


@dataclass(frozen=True)
class Variant:
    """What is trained: the baseline, or one block kind in one mode with the new branches' initial gamma."""

    kind_mode: str | None = None  # e.g. "dbb-exact"; None for the baseline
    gamma: str | None = None  # as written, e.g. "1/3"

    @property
    def name(self) -> str:
        """``baseline`` or ``kind-mode@gamma``."""
        return self.kind_mode + (f"@{self.gamma}" if self.gamma else "") if self.kind_mode else "baseline"

    def build(self, base: nn.Module, *, split: Split | None = None, recipe: Recipe | None = None, seed: int = 0,
              device: str = "cpu") -> nn.Module:  # fmt: skip
        """``base`` itself for the baseline, otherwise a converted copy with paper-style (scratch) initialisation;
        a searched repopt variant first searches its scales on ``split``'s training images (on ``device``)."""
        if not self.kind_mode:
            return base
        kind, mode, *searched = self.kind_mode.split("-")
        if searched:
            order = torch.randperm(len(split.y_train), generator=torch.Generator().manual_seed(seed))
            x, y = split.x_train[order].to(device), split.y_train[order].to(device)
            batches = [(x[i : i + recipe.batch_size], y[i : i + recipe.batch_size])
                       for i in range(0, len(y), recipe.batch_size)]  # fmt: skip
            return search_scales(base.to(device), batches, block=kind, epochs=SEARCH_EPOCHS, lr=recipe.lr,
                                 momentum=recipe.momentum, weight_decay=recipe.weight_decay, init="scratch")
        if mode == "repopt":
            return acify(base, block=kind, mode=mode, init="scratch")
        return acify(base, block=kind, mode=mode, init="scratch", gamma_init=float(Fraction(self.gamma)))


def variants_of(kind_modes: list[str], gammas: list[str]) -> list[Variant]:
    """The baseline, then every kind and mode at every gamma (the repopt variants, which have none, once)."""
    gammas_of = {km: [None] if km in REPOPT_VARIANTS else gammas for km in kind_modes}
    return [Variant(), *(Variant(km, g) for km in kind_modes for g in gammas_of[km])]


def run_one(split: Split, model: str, variant: Variant, seed: int, recipe: Recipe, device: str) -> dict:
    """Train one variant from the seed's initial weights, deploy it and measure everything on the deployed model."""
    torch.manual_seed(seed)
    trained = variant.build(MODELS[model](split), split=split, recipe=recipe, seed=seed, device=device).to(device)
    history = train(trained, split, recipe, seed)
    deployed = deploy(trained.eval()) if variant.kind_mode else trained.eval()
    x_test = split.x_test.to(device)
    same = (predict(deployed, x_test) == predict(trained, x_test)).sum().item() if variant.kind_mode else None
    deployed = deployed.cpu()
    return {
        "variant": variant.name, "seed": seed, "accuracy": history.accuracy[-1], "seconds": history.seconds,
        "same_predictions": same, "transformed": transformed_accuracy(deployed, split),
        "quantized": quantized_accuracy(deployed, split), "weights": weight_figures(deployed),
    }  # fmt: skip


def quantized_accuracy(model: nn.Module, split: Split) -> dict[str, float]:
    """Test accuracy with weight-only fake quantisation (BatchNorm folded first) and with static INT8 PTQ."""
    folded = fold_conv_bn(model)
    x, y = split.x_test, split.y_test
    result = {name: accuracy(quantize_weights(folded, *setting), x, y) for name, setting in QUANT_SETTINGS.items()}
    result["int8_ptq"] = int8_ptq_accuracy(model, split.x_train[:CALIBRATION_IMAGES], x, y)
    return result


def weight_figures(model: nn.Module) -> dict[str, float | None]:
    """Medians over the conv layers of ``quant_report``'s figures (the BatchNorm after each conv folded in)."""
    layers = [layer for layer in quant_report(model, ptq=False).layers if layer.type.startswith("Conv")]
    values: dict[str, list[float]] = {
        "int8_tensor_sqnr_db": [layer.figures.sqnr_db["int8"]["per_tensor"] for layer in layers],
        "int4_tensor_sqnr_db": [layer.figures.sqnr_db["int4"]["per_tensor"] for layer in layers],
    }
    for key in ("max_over_std", "channel_spread", "centre_cross_energy"):
        values[key] = [v for layer in layers if (v := getattr(layer.figures, key)) is not None]
    return {key: statistics.median(v) if v else None for key, v in values.items()}


# --------------------------------------------------------------------------- statistics


def by_variant_seed(runs: list[dict]) -> dict[tuple[str, int], dict]:
    """The runs keyed by (variant, seed)."""
    return {(r["variant"], r["seed"]): r for r in runs}


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def mean_se(values: list[float]) -> tuple[float, float]:
    """Mean and its standard error (0 for a single value)."""
    mean, std = mean_std(values)
    return mean, std / math.sqrt(len(values))


def differences(runs: list[dict], variant: str, other: str, metric: Callable[[dict], float]) -> list[float]:
    """``metric(variant) - metric(other)`` for every seed both were run with."""
    table = by_variant_seed(runs)
    seeds = sorted(s for v, s in table if v == variant and (other, s) in table)
    return [metric(table[variant, s]) - metric(table[other, s]) for s in seeds]


def paired_cell(runs: list[dict], variant: str, metric: Callable[[dict], float]) -> str:
    """``mean (difference with the baseline ± standard error)`` of ``metric``; the mean alone for the baseline."""
    values = [metric(r) for r in runs if r["variant"] == variant]
    cell = f"{statistics.fmean(values):.2f}"
    if variant == "baseline":
        return cell
    diff, error = mean_se(differences(runs, variant, "baseline", metric))
    return f"{cell} ({diff:+.2f} ± {error:.2f})"


def top1(run: dict) -> float:
    """A run's test accuracy."""
    return run["accuracy"]


# --------------------------------------------------------------------------- page


def results_table(runs: list[dict], variants: list[str], test_size: int) -> list[str]:
    """Markdown rows: accuracy per variant, paired difference with the baseline, deployment check, train time."""
    rows = [
        "| variant | mean top-1 (%) | std | min | max | minus baseline, paired (points ± s.e.) | better / same / "
        "worse | deployed = trained | train time (s) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for variant in variants:
        variant_runs = [r for r in runs if r["variant"] == variant]
        mean, std = mean_std([r["accuracy"] for r in variant_runs])
        paired = counts = deployed = "n/a"
        if variant != "baseline":
            diffs = differences(runs, variant, "baseline", top1)
            diff, error = mean_se(diffs)
            paired = f"{diff:+.2f} ± {error:.2f}"
            counts = f"{sum(d > 0 for d in diffs)} / {sum(d == 0 for d in diffs)} / {sum(d < 0 for d in diffs)}"
            deployed = f"{sum(r['same_predictions'] for r in variant_runs)}/{len(variant_runs) * test_size}"
        low, high = min(r["accuracy"] for r in variant_runs), max(r["accuracy"] for r in variant_runs)
        seconds = statistics.fmean(r["seconds"] for r in variant_runs)
        rows.append(f"| {variant} | {mean:.2f} | {std:.2f} | {low:.2f} | {high:.2f} | {paired} | {counts} | "
                    f"{deployed} | {seconds:.1f} |")  # fmt: skip
    return rows


def gamma_section(runs: list[dict], kind_modes: list[str], gammas: list[str], image_points: float) -> list[str]:
    """The gamma comparison: per kind and mode, pooled, the worst runs, and the default the figures support."""
    if len(gammas) != 2:
        return []
    low, high = gammas
    rows = [
        f"| kind, mode | top-1 at gamma {low} | minus baseline | worst seed vs baseline | top-1 at gamma {high} "
        f"| minus baseline | worst seed vs baseline | {high} minus {low}, paired |",
        "|---|---|---|---|---|---|---|---|",
    ]
    worst: dict[str, float] = {}
    for km in kind_modes:
        cells = []
        for gamma in gammas:
            variant = f"{km}@{gamma}"
            diffs = differences(runs, variant, "baseline", top1)
            worst[variant] = min(diffs)
            mean = statistics.fmean(r["accuracy"] for r in runs if r["variant"] == variant)
            cells += [f"{mean:.2f}", "{:+.2f} ± {:.2f}".format(*mean_se(diffs)), f"{min(diffs):+.2f}"]
        between = "{:+.2f} ± {:.2f}".format(*mean_se(differences(runs, f"{km}@{high}", f"{km}@{low}", top1)))
        rows.append(f"| {km} | " + " | ".join(cells) + f" | {between} |")
    pooled = pooled_gamma_difference(runs, kind_modes, low, high)
    lowest = {g: min(worst[f"{km}@{g}"] for km in kind_modes) for g in gammas}
    return [
        "## Initial gamma of the new branches: 1 against 1/3" if gammas == ["1", "1/3"] else "## Initial gamma",
        "",
        "`acify(..., init=\"scratch\", gamma_init=g)` starts every branch's BatchNorm scale (the fast modes: every "
        "new branch's scale) at g. Means over seeds, *minus baseline* paired by seed (± standard error), *worst "
        "seed* the lowest of those per-seed differences, and the last column the paired difference between the "
        "two gammas for the same kind, mode and seed.",
        "",
        *rows,
        "",
        f"Pooled over the {len(kind_modes)} kinds and modes (per seed, the mean over them of {high} minus {low}): "
        f"{pooled[0]:+.2f} ± {pooled[1]:.2f} points. Worst single run against the baseline of its seed: "
        f"{lowest[low]:+.2f} points at gamma {low}, {lowest[high]:+.2f} at gamma {high}.",
        "",
        default_verdict(pooled, lowest, low, high, image_points),
        "",
    ]


def pooled_gamma_difference(runs: list[dict], kind_modes: list[str], low: str, high: str) -> tuple[float, float]:
    """Mean and standard error over seeds of the mean over kinds and modes of (top-1 at ``high`` - at ``low``)."""
    per_kind = [differences(runs, f"{km}@{high}", f"{km}@{low}", top1) for km in kind_modes]
    return mean_se([statistics.fmean(seed_diffs) for seed_diffs in zip(*per_kind)])


def default_verdict(pooled: tuple[float, float], lowest: dict[str, float], low: str, high: str,
                    image_points: float) -> str:  # fmt: skip
    """The sentence naming the gamma the figures support and why: the mean first, then the worst runs."""
    diff, error = pooled
    if abs(diff) > 2 * error:
        choice = high if diff > 0 else low
        why = "its pooled mean is higher by more than two standard errors"
    elif abs(lowest[high] - lowest[low]) > image_points:
        choice = max((low, high), key=lambda g: lowest[g])
        why = (f"the pooled means are within two standard errors of each other, and its worst run falls less far "
               f"below the baseline of the same seed ({lowest[choice]:+.2f} against "
               f"{lowest[low if choice == high else high]:+.2f} points)")  # fmt: skip
    else:
        choice, why = "1", "neither the pooled means nor the worst runs separate them; 1 is BatchNorm's default"
    return f"**The figures support gamma {choice} as the default**: {why}."


def robustness_table(runs: list[dict], variants: list[str]) -> list[str]:
    """Markdown rows: accuracy on the test set as it is and transformed, each with the paired difference."""
    header = "| variant | test set | " + " | ".join(TRANSFORM_LABELS.values()) + " |"
    rows = [header, "|---" * (len(TRANSFORM_LABELS) + 2) + "|"]
    for variant in variants:
        cells = [paired_cell(runs, variant, top1)]
        cells += [paired_cell(runs, variant, lambda r, k=key: r["transformed"][k]) for key in TRANSFORM_LABELS]
        rows.append(f"| {variant} | " + " | ".join(cells) + " |")
    return rows


def robustness_verdict(runs: list[dict], variants: list[str]) -> str:
    """One sentence: how many (variant, transform) pairs are more than two standard errors above or below."""
    above = below = 0
    for variant in variants[1:]:
        for key in TRANSFORM_LABELS:
            diff, error = mean_se(differences(runs, variant, "baseline", lambda r, k=key: r["transformed"][k]))
            above += diff > 2 * error
            below += diff < -2 * error
    pairs = (len(variants) - 1) * len(TRANSFORM_LABELS)
    return (f"Of the {pairs} variant and transform pairs, {above} are more than two standard errors above the "
            f"baseline and {below} more than two standard errors below it.")  # fmt: skip


def quantization_table(runs: list[dict], variants: list[str]) -> list[str]:
    """Markdown rows: accuracy of each deployed model in float and quantised, with the paired differences."""
    rows = ["| variant | float | " + " | ".join(QUANT_LABELS.values()) + " |", "|---" * (len(QUANT_LABELS) + 2) + "|"]
    for variant in variants:
        cells = [paired_cell(runs, variant, top1)]
        cells += [paired_cell(runs, variant, lambda r, k=key: r["quantized"][k]) for key in QUANT_LABELS]
        rows.append(f"| {variant} | " + " | ".join(cells) + " |")
    return rows


def weights_table(runs: list[dict], variants: list[str]) -> list[str]:
    """Markdown rows: per variant, the mean over seeds of each model's median conv-layer weight figure."""
    rows = ["| variant | " + " | ".join(WEIGHT_LABELS.values()) + " |", "|---" * (len(WEIGHT_LABELS) + 1) + "|"]
    for variant in variants:
        cells = []
        for key in WEIGHT_LABELS:
            values = [r["weights"][key] for r in runs if r["variant"] == variant and r["weights"][key] is not None]
            value = statistics.fmean(values) if values else None
            cells.append("-" if value is None else f"{value:.0%}" if key == "centre_cross_energy" else f"{value:.2f}")
        rows.append(f"| {variant} | " + " | ".join(cells) + " |")
    return rows


def per_seed_table(runs: list[dict], variants: list[str]) -> list[str]:
    """Markdown rows: every run's accuracy, one row per variant, one column per seed."""
    seeds = sorted({r["seed"] for r in runs})
    table = by_variant_seed(runs)
    rows = ["| variant | " + " | ".join(f"seed {s}" for s in seeds) + " |", "|---" * (len(seeds) + 1) + "|"]
    rows += [f"| {v} | " + " | ".join(f"{table[v, s]['accuracy']:.2f}" for s in seeds) + " |" for v in variants]
    return rows


def load_line(setup: dict) -> str:
    """How busy the machine was: the 1-minute load averages sampled at the start and after every seed."""
    loads = setup["load_averages"]
    if not loads:
        return "load average not available"
    return (f"1-minute load average from {min(loads):.1f} to {max(loads):.1f} (median {statistics.median(loads):.1f}) "
            f"on {setup['cores']} cores, sampled at the start and after every seed")  # fmt: skip


def report(record: dict) -> str:
    """The whole markdown page, from a study's JSON record."""
    setup, runs = record["setup"], record["runs"]
    variants = list(dict.fromkeys(r["variant"] for r in runs))
    recipe = Recipe(**setup["recipe"])
    gammas = ", ".join(setup["gammas"])
    image_points = 100 / setup["test_size"]
    lines = [
        "# Accuracy study",
        "",
        "<!-- Written by scripts/accuracy_study.py from its runs (the JSON record beside this page): rerun the "
        "script instead of editing. -->",
        "",
        "Does training with re-parameterisable blocks give a better plain model than training the plain model, and",
        "how does the deployed model stand up to flipped and rotated inputs and to quantisation? Each seed fixes the",
        "initial weights (the converted variants start from the baseline's kernels) and the batch order; the",
        "train/test split is the same for every run. Accuracy is top-1 on the test split after the last epoch, in",
        "percent. *Paired* differences are taken seed by seed against the baseline trained from the same seed;",
        "*± s.e.* is the standard error of their mean (standard deviation over seeds / sqrt(seeds)). *Deployed =",
        "trained* counts test images on which the deployed plain model predicts the same class as the trained one.",
        "",
        "## Setup",
        "",
        f"- data: {setup['data']}, {setup['train_size']:,} training and {setup['test_size']:,} test images of "
        f"{setup['image_shape']}; one test image is {image_points:.2f} points",
        f"- model: `{setup['model']}`",
        f"- recipe: {recipe.epochs} epochs, batch {recipe.batch_size}, SGD lr {recipe.lr:g} (cosine to 0), momentum "
        f"{recipe.momentum:g}, weight decay {recipe.weight_decay:g}, augmentation {'on' if recipe.augment else 'off'}",
        f"- the {setup['dataset']} preset (options on the command line override it): {setup['preset']}",
        f"- variants: the baseline (the plain model, trained as it is) and `acify(model, block=KIND, mode=MODE, "
        f"init=\"scratch\", gamma_init=g)`, named `KIND-MODE@g`, for g in {gammas}"
        f"{' (the repopt variants have no gamma)' if set(setup['kind_modes']) & set(REPOPT_VARIANTS) else ''}:",
        *(f"  - {km}: {KIND_NOTES[km]}" for km in setup["kind_modes"]),
        f"- seeds: {', '.join(map(str, setup['seeds']))}",
        f"- ran on: {setup['device']}{' (one torch thread)' if setup['device'] == 'cpu' else ''}, {setup['cpu']}, "
        f"torch {setup['torch']}, Python {setup['python']}, {setup['seconds'] / 60:.1f} minutes in all; "
        f"{load_line(setup)}",
        f"- command: `{setup['command']}`; code: {setup['code']}",
        "",
        "## Results",
        "",
        *results_table(runs, variants, setup["test_size"]),
        "",
        *gamma_section(runs, [km for km in setup["kind_modes"] if km not in REPOPT_VARIANTS], setup["gammas"],
                       image_points),
        "## Robustness to flipped and rotated inputs",
        "",
        "The ACNet paper reports that the asymmetric branches make a model more robust to flipped and rotated images.",
        "Here every trained model, deployed, is evaluated on the test set as it is, flipped left-right, flipped",
        "up-down and rotated by 90° (none of which it saw in training). Each cell: mean top-1 (paired difference with",
        "the baseline on the same transformed images ± s.e.).",
        "",
        *robustness_table(runs, variants),
        "",
        robustness_verdict(runs, variants),
        "",
        "## Quantisation",
        "",
        "Accuracy of each deployed model with its weights quantised. *W* columns: weight-only fake quantisation",
        "(`acnet_convert.demo.experiment.quantize_weights`): every BatchNorm folded into the conv before it, then every",
        "conv and linear weight rounded with symmetric max-abs scales, `s = max|w| / (2^(b-1) - 1)` over the whole",
        "tensor or over each output channel; biases and activations stay in float. *W+A (PTQ)*: static INT8",
        "post-training quantisation of weights and activations by the flow of `acnet_convert.checks.ptq` (torch.ao FX, the",
        f"x86/fbgemm default qconfig mapping: per-channel weights), calibrated on the first {CALIBRATION_IMAGES} "
        "training images,",
        "then run on the test set. Each cell: mean top-1 (paired difference with the baseline quantised the same way",
        "± s.e.).",
        "",
        *quantization_table(runs, variants),
        "",
        "Weight figures of the deployed models from `quant_report` (each conv's BatchNorm folded in): per model the",
        "median over its conv layers, then the mean over seeds. See [Quantizing a deployed model](quantization.md) for",
        "what each figure means.",
        "",
        *weights_table(runs, variants),
        "",
        "## Every run",
        "",
        "Top-1 (%) per variant and seed:",
        "",
        *per_seed_table(runs, variants),
        "",
    ]
    return "\n".join(lines) + GUIDE


GUIDE = """
## How to read this

The study measures what each block does for one model on one data set with one recipe. The papers' gains were
measured on CIFAR and ImageNet with long schedules; a difference smaller than two standard errors here is not
evidence either way, and a near-saturated data set such as the 8x8 digits leaves little room for any method.
The part that is not statistical is the *deployed = trained* column: the deployed plain model must agree with
the trained model on every test image.

## Checking the paper on CIFAR-10

The ACNet paper reports, among others, ResNet-56 on CIFAR-10 going from 94.31% to 95.09% top-1. With CIFAR-10
on disk (the python version, `cifar-10-batches-py`, as `torchvision.datasets.CIFAR10(PATH, download=True)`
leaves it; the script itself never downloads) and a GPU:

```bash
python scripts/accuracy_study.py --dataset cifar10 --data-dir PATH --device cuda --out cifar10-study.md
```

`--dataset cifar10` selects `--model resnet56` (He et al.'s CIFAR ResNet-56, 0.85M parameters, from
`acnet_convert.demo.models.CifarResNet`) and this recipe: standard augmentation (zero-pad to 40x40, random 32x32
crop, random horizontal flip), SGD with momentum 0.9, batch 128, weight decay 1e-4, learning rate 0.2 with a
cosine schedule to 0 over 400 epochs, every branch's BatchNorm gamma 1/3 (the authors' released ResNet-56
configuration). Each option can be overridden (`--epochs`, `--batch-size`, `--lr`, `--weight-decay`,
`--gammas`, `--seeds`, `--variants`). That is 400 epochs per model, eight models (the baseline and seven kinds
and modes) and five seeds by default: plan GPU days, or start with `--variants acb-exact --seeds 1 --epochs 100`
to see the trend.

The same comparison on a deeper network without CIFAR-10: `--model resnet20` trains He et al.'s CIFAR ResNet-20
on the digits, e.g. `--model resnet20 --variants acb-exact --gammas 1,1/3 --seeds 5 --out resnet20-digits.md`.
"""


# --------------------------------------------------------------------------- command line


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options; unset training options come from the data set's preset."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", choices=sorted(PRESETS), default="digits")
    parser.add_argument("--data-dir", help="folder holding CIFAR-10's cifar-10-batches-py (for --dataset cifar10)")
    parser.add_argument("--model", choices=sorted(MODELS), help="default: the data set's preset")
    parser.add_argument("--variants", help="comma-separated KIND-MODE list, trained beside the baseline (default: "
                        "every one that converts a conv of the model as its own kind)")  # fmt: skip
    parser.add_argument("--gammas", help="comma-separated new-branch gammas, e.g. 1,1/3 (default: the preset's)")
    parser.add_argument("--seeds", type=int, help="use seeds 0..N-1 (default: 10 for digits, 5 for cifar10)")
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--lr", type=float)
    parser.add_argument("--weight-decay", type=float)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=str(ROOT / "docs" / "accuracy.md"), help="markdown file to write")
    parser.add_argument("--json", help="JSON record to write (default: the markdown file's name with .json)")
    parser.add_argument("--render", metavar="JSON", help="train nothing: write the page from this record")
    args = parser.parse_args(argv)
    args.command = shlex.join(["python", "scripts/accuracy_study.py", *(sys.argv[1:] if argv is None else argv)])
    preset = PRESETS[args.dataset]
    args.model = args.model or preset.model
    args.gamma_list = [g.strip() for g in args.gammas.split(",")] if args.gammas else list(preset.gammas)
    args.seeds = preset.seeds if args.seeds is None else args.seeds
    args.kind_modes = ([v.strip() for v in args.variants.split(",") if v.strip()] if args.variants
                       else applicable_kind_modes(args.model))  # fmt: skip
    unknown = set(args.kind_modes) - set(KIND_MODES)
    if unknown or args.seeds < 1 or not all(_is_gamma(g) for g in args.gamma_list):
        parser.error(f"--variants takes {', '.join(KIND_MODES)}; --gammas positive numbers or fractions such as "
                     f"1/3; --seeds at least 1 (got {args.variants!r}, {args.gammas!r}, {args.seeds})")  # fmt: skip
    if args.dataset == "cifar10" and not args.data_dir and not args.render:
        parser.error("--dataset cifar10 needs --data-dir PATH (nothing is downloaded)")
    args.json = args.json or str(Path(args.out).with_suffix(".json"))
    return args


def applicable_kind_modes(model: str) -> list[str]:
    """The kinds and modes that convert at least one conv of ``model`` as their own kind (not only by falling back)."""
    built = MODELS[model](types.SimpleNamespace(in_channels=3, num_classes=10))
    applicable = []
    for km in KIND_MODES:
        kind, mode, *_ = km.split("-")
        if any(site.kind == kind for site in plan(built, block=kind, mode=mode).converted):
            applicable.append(km)
    return applicable


def _is_gamma(text: str) -> bool:
    """Whether ``text`` is a positive number or fraction."""
    try:
        return Fraction(text) > 0
    except (ValueError, ZeroDivisionError):
        return False


def make_recipe(args: argparse.Namespace) -> Recipe:
    """The preset's recipe with the options given on the command line."""
    overrides = {k: getattr(args, k) for k in ("epochs", "batch_size", "lr", "weight_decay")}
    return replace(PRESETS[args.dataset].recipe, **{k: v for k, v in overrides.items() if v is not None})


def code_version() -> str:
    """The git commit the study starts on, noting uncommitted changes to the library or the script."""

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


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo, or what the platform module knows."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def load_average() -> list[float]:
    """The 1-minute load average as a one-element list (empty where the platform has none)."""
    return [os.getloadavg()[0]] if hasattr(os, "getloadavg") else []


def study(args: argparse.Namespace, split: Split) -> dict:
    """Train every variant for every seed; the JSON-ready record of the setup and the runs."""
    recipe = make_recipe(args)
    variants = variants_of(args.kind_modes, args.gamma_list)
    code, loads, runs, start = code_version(), load_average(), [], time.perf_counter()
    with single_thread():
        for seed in range(args.seeds):
            for variant in variants:
                run = run_one(split, args.model, variant, seed, recipe, args.device)
                runs.append(run)
                print(f"seed {seed} {variant.name:<20} top-1 {run['accuracy']:6.2f}%  {run['seconds']:6.1f} s",
                      flush=True)  # fmt: skip
            loads += load_average()
    setup = {
        "dataset": args.dataset, "preset": PRESETS[args.dataset].description, "model": args.model,
        "recipe": asdict(recipe), "kind_modes": args.kind_modes, "gammas": args.gamma_list,
        "seeds": list(range(args.seeds)), "data": split.name, "train_size": len(split.y_train),
        "test_size": len(split.y_test), "image_shape": "x".join(map(str, split.x_train.shape[1:])),
        "device": args.device, "cpu": cpu_name(), "cores": os.cpu_count(), "torch": torch.__version__,
        "python": platform.python_version(), "seconds": time.perf_counter() - start, "load_averages": loads,
        "command": args.command, "code": code, "search_epochs": SEARCH_EPOCHS,
    }  # fmt: skip
    return {"setup": setup, "runs": runs}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.render:
        record = json.loads(Path(args.render).read_text())
    else:
        try:
            split = load_digits() if args.dataset == "digits" else load_cifar10(args.data_dir)
        except ACNetError as error:
            raise SystemExit(f"error: {error}") from None
        record = study(args, split)
        Path(args.json).write_text(json.dumps(record, indent=1) + "\n")
        print(f"wrote {args.json}")
    Path(args.out).write_text(report(record))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
