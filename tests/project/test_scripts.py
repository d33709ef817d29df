"""The scripts a user runs: they must keep working (smoke sizes; the figures are not checked here)."""

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]


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


def load_device_check():
    spec = importlib.util.spec_from_file_location("device_check", ROOT / "scripts" / "device_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_device_check_passes_on_the_cpu(capsys):
    assert load_device_check().main(["--device", "cpu", "--side", "32"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3 and all(line.startswith("ok") for line in lines), lines  # gradients, exact, fast
    assert "exact autocast bfloat16" in lines[1] and "fast  autocast bfloat16" in lines[2]


def test_device_check_fails_when_deployment_is_wrong(capsys):
    check = load_device_check()
    real_deploy = check.deploy

    def off_by_a_little(model):
        deployed = real_deploy(model)
        with torch.no_grad():
            deployed.conv1.weight.mul_(1.001)
        return deployed

    check.deploy = off_by_a_little
    assert check.main(["--device", "cpu", "--side", "32"]) == 1
    assert capsys.readouterr().out.count("FAIL") == 2


FAKE_PYTHON = """#!/usr/bin/env bash
case "$1 $2" in "-m pip"|"-m pytest") echo "$*" >> "$CALLS"; exit 0;; esac
exec {python} "$@"
"""


def test_the_setup_installs_each_scripts_extra_once_per_change_of_pyproject(tmp_path):
    for name in ("_venv.sh", "demo", "test"):
        (tmp_path / "scripts").mkdir(exist_ok=True)
        shutil.copy2(ROOT / "scripts" / name, tmp_path / "scripts" / name)
    (tmp_path / "pyproject.toml").write_text("[project]\nname = 'x'\n")
    bin_dir = tmp_path / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    (bin_dir / "python").write_text(FAKE_PYTHON.format(python=sys.executable))
    (bin_dir / "acnet").write_text("#!/usr/bin/env bash\n")
    for tool in ("python", "acnet"):
        (bin_dir / tool).chmod(0o755)
    calls = tmp_path / "calls"

    def installs(script: str) -> list[str]:
        before = calls.read_text().splitlines() if calls.exists() else []
        result = subprocess.run([f"scripts/{script}", "--help"], cwd=tmp_path, env={**os.environ, "CALLS": str(calls)},
                                capture_output=True, text=True, timeout=60)  # fmt: skip
        assert result.returncode == 0, result.stderr
        return [call.split()[-1] for call in calls.read_text().splitlines()[len(before):] if "pip" in call]

    assert installs("demo") == ['.[demo]'] and installs("demo") == []
    assert installs("test") == ['.[test]'] and installs("test") == []
    (tmp_path / "pyproject.toml").write_text("[project]\nname = 'x'\nversion = '2'\n")
    assert installs("demo") == ['.[demo]']
