"""Time acify + deploy: resnet50, and a chain of N conv-BN-ReLU layers to show the cost is linear in N.

Usage: python scripts/bench_convert.py [--repeats 7] [--chain 25,50,100] [--out docs/benchmarks.md]
Prints medians (seconds) and writes a markdown section when --out is given.
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import time

import torch
import torchvision
from torch import nn

from acnet_convert import acify, deploy


def chain(n: int, width: int = 16) -> nn.Sequential:
    layers = [nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU()]
    for _ in range(n - 1):
        layers += [nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU()]
    return nn.Sequential(*layers)


def median_times(model: nn.Module, repeats: int, inplace: bool) -> tuple[float, float]:
    """Median seconds of acify and of deploy (fresh copies each round when inplace)."""
    acify_t, deploy_t = [], []
    for _ in range(repeats):
        subject = copy.deepcopy(model) if inplace else model
        start = time.perf_counter()
        acified = acify(subject, inplace=inplace)
        mid = time.perf_counter()
        deploy(acified, inplace=inplace)
        acify_t.append(mid - start)
        deploy_t.append(time.perf_counter() - mid)
    return statistics.median(acify_t), statistics.median(deploy_t)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--chain", default="25,50,100,200,400", help="comma-separated chain lengths")
    parser.add_argument("--out", help="write the tables as markdown to this file")
    args = parser.parse_args()
    torch.manual_seed(0)

    lines = [
        "# Benchmarks",
        "",
        "## acify + deploy wall time",
        "",
        f"Machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}, torchvision {torchvision.__version__}. Medians of {args.repeats} runs, seconds.",
        "",
        "| model | convs converted | mode | acify | deploy | total |",
        "|---|---|---|---|---|---|",
    ]
    resnet = torchvision.models.resnet50(weights=None)
    for inplace in (False, True):
        a, d = median_times(resnet, args.repeats, inplace)
        mode = "inplace" if inplace else "copy"
        lines.append(f"| resnet50 | {len(acify(resnet).acnet_plan.converted)} | {mode} | {a:.3f} | {d:.3f} | {a + d:.3f} |")
    lines += ["", "Cost against the number of convs (chain of conv3x3-BN-ReLU, 16 channels, inplace):", "",
              "| convs | acify + deploy (s) | per conv (ms) |", "|---|---|---|"]  # fmt: skip
    for n in (int(v) for v in args.chain.split(",")):
        a, d = median_times(chain(n), args.repeats, inplace=True)
        lines.append(f"| {n} | {a + d:.3f} | {1000 * (a + d) / n:.2f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
