"""How long rebuilding an acified checkpoint takes: the recorded plan applied, against the model analysed again.

Prints the medians of interleaved rounds and their ratios: ``python scripts/bench_load.py [--model resnet50]``.
Structure only: ``acify`` (trace and decide, then build the blocks) against ``apply_plan`` (build the recorded
blocks).  Whole rebuild: ``acify`` + read + ``load_state_dict`` (a file without a plan) against ``load``.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torchvision

from acnet_convert import acify, load, save_weights
from acnet_convert.api import apply_plan
from acnet_convert.files.checkpoint import read


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet50", help="torchvision model name")
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(2)
    build = lambda: torchvision.models.get_model(args.model, weights=None)  # noqa: E731
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "acified.safetensors"
        save_weights(acify(build()), path)
        recorded = read(path).plan
        steps = {
            "acify": lambda m: acify(m, inplace=True),
            "apply_plan": lambda m: apply_plan(m, recorded),
            "acify + read + load_state_dict": lambda m: acify(m, inplace=True).load_state_dict(read(path).state_dict),
            "load": lambda m: load(m, path, inplace=True),
        }
        times: dict[str, list[float]] = {what: [] for what in steps}
        for _ in range(args.rounds):
            for what, step in steps.items():
                model = build()
                start = time.perf_counter()
                step(model)
                times[what].append(time.perf_counter() - start)
    ms = {what: statistics.median(values) * 1000 for what, values in times.items()}
    print(f"{args.model}, torch {torch.__version__}, {args.rounds} interleaved rounds, medians "
          "(building the model itself not included):")  # fmt: skip
    for what, value in ms.items():
        print(f"  {what:32} {value:8.1f} ms")
    print(f"  structure: apply_plan / acify = {ms['apply_plan'] / ms['acify']:.2f}")
    print(f"  whole rebuild: load / (acify + read + load_state_dict) = "
          f"{ms['load'] / ms['acify + read + load_state_dict']:.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
