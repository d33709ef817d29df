"""How long ``acnet --help`` and ``acnet --version`` take in a fresh process, beside a bare ``python -c pass``.

Prints the medians of interleaved rounds: ``python scripts/bench_cli.py [--rounds 7]``.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    acnet = shutil.which("acnet") or sys.exit("acnet is not on the PATH: install the project first")
    commands = {"python -c pass": [sys.executable, "-c", "pass"], "acnet --help": [acnet, "--help"],
                "acnet --version": [acnet, "--version"]}  # fmt: skip
    times: dict[str, list[float]] = {name: [] for name in commands}
    for _ in range(args.rounds):
        for name, command in commands.items():
            start = time.perf_counter()
            subprocess.run(command, capture_output=True, check=True)
            times[name].append(time.perf_counter() - start)
    for name, values in times.items():
        print(f"{name:16} median {statistics.median(values) * 1000:7.1f} ms over {args.rounds} rounds")


if __name__ == "__main__":
    main()
