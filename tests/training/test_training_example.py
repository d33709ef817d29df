"""The plain-PyTorch training example runs end to end (smoke size; accuracy is asserted in test_training.py)."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_train_digits_example_deploys_with_the_same_predictions(tmp_path):
    out = tmp_path / "deployed.safetensors"
    result = subprocess.run(
        [sys.executable, "examples/train_digits.py", "--steps", "20", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "same predictions on all test images: True" in result.stdout
    assert float(result.stdout.split("max relative output error ")[1].split()[0]) <= 1e-5
    assert out.stat().st_size > 0
