"""The scripts a user runs: they must keep working (smoke sizes; the figures are not checked here)."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run(*args):
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_quickstart_example_deploys_exactly():
    result = run("examples/quickstart.py")
    assert result.returncode == 0, result.stderr
    assert "3 conv sites: 3 converted (3 with their BatchNorm)" in result.stdout
    error = float(result.stdout.split("relative ")[1].split(")")[0])
    assert error < 1e-5


def test_conversion_benchmark_runs(tmp_path):
    out = tmp_path / "bench.md"
    result = run("scripts/bench.py", "--smoke", "--sections", "convert", "--threads", "1", "--out", str(out))
    assert result.returncode == 0, result.stderr
    text = out.read_text()
    assert "| exact | no | 17 |" in text and "| fast | yes | 17 |" in text and "| 6 |" in text
