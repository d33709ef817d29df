"""The accuracy study script, its data helpers and the CIFAR ResNet it trains (smoke sizes)."""

import inspect
import re
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from acnet_convert import ACNetError, acify, deploy, verify
from acnet_convert.experiment import Recipe, flip_and_crop, load_cifar10, train
from acnet_convert.models import CifarResNet, SmallCNN

ROOT = Path(__file__).resolve().parent.parent


def study(*args):
    command = [sys.executable, "scripts/accuracy_study.py", *args]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)


def markdown_rows(page: str, header_start: str) -> list[list[str]]:
    """Body rows of the markdown table whose header row starts with ``header_start``."""
    lines = page.splitlines()
    first = next(i for i, line in enumerate(lines) if line.startswith(header_start)) + 2
    rows = []
    for line in lines[first:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows


def test_study_writes_statistics_that_match_its_per_seed_runs(tmp_path):
    out = tmp_path / "accuracy.md"
    done = study("--seeds", "2", "--epochs", "1", "--out", str(out))
    assert done.returncode == 0, done.stderr
    page = out.read_text()
    fast_available = "mode" in inspect.signature(acify).parameters
    expected = ["baseline", "exact", "fast"] if fast_available else ["baseline", "exact"]

    per_seed = markdown_rows(page, "| seed |")
    assert [row[0] for row in per_seed] == ["0", "1"]
    summary = {row[0]: row for row in markdown_rows(page, "| variant |")}
    assert list(summary) == expected
    assert ("fast mode are pending" in page) is not fast_available
    for column, variant in enumerate(expected, start=1):
        accuracies = [float(row[column]) for row in per_seed]
        mean, std = (float(x) for x in summary[variant][1:3])
        assert mean == pytest.approx(statistics.fmean(accuracies), abs=0.015)
        assert std == pytest.approx(statistics.stdev(accuracies), abs=0.015)
        assert all(10 < a <= 100 for a in accuracies)
        if variant != "baseline":
            same, total = map(int, summary[variant][7].split("/"))
            assert same == total == 2 * int(re.search(r"and ([\d,]+) test images", page)[1].replace(",", ""))


def test_study_refuses_cifar10_without_local_data(tmp_path):
    done = study("--dataset", "cifar10", "--data-dir", str(tmp_path), "--seeds", "1", "--out", str(tmp_path / "x"))
    assert done.returncode != 0
    assert "cifar-10-batches-py" in done.stderr and not (tmp_path / "x").exists()


def test_load_cifar10_names_what_is_missing(tmp_path):
    with pytest.raises(ACNetError, match="no CIFAR-10 under"):
        load_cifar10(tmp_path)


class FakeCIFAR10:
    """Stands in for torchvision's CIFAR10: random uint8 HWC images and integer targets."""

    def __init__(self, root, train, download):
        assert download is False
        shape = (48 if train else 16, 32, 32, 3)
        generator = torch.Generator().manual_seed(int(train))
        self.data = torch.randint(0, 256, shape, dtype=torch.uint8, generator=generator).numpy()
        self.targets = [i % 10 for i in range(len(self.data))]


def test_cifar10_split_trains_with_augmentation(monkeypatch, tmp_path):
    monkeypatch.setattr("torchvision.datasets.CIFAR10", FakeCIFAR10)
    split = load_cifar10(tmp_path)
    assert split.x_train.shape == (48, 3, 32, 32) and split.x_test.shape == (16, 3, 32, 32)
    assert split.y_train.tolist() == [i % 10 for i in range(48)]
    assert abs(split.x_train.mean().item()) < 0.5 and split.in_channels == 3
    history = train(acify(SmallCNN()), split, Recipe(epochs=2, batch_size=16, augment=True), seed=0)
    assert len(history.loss) == 2 and all(0 <= a <= 100 for a in history.accuracy)


def test_flip_and_crop_returns_shifted_or_mirrored_windows_of_the_padded_image():
    x = torch.randn(16, 3, 6, 6)
    out = flip_and_crop(x, torch.Generator().manual_seed(0), pad=2)
    assert out.shape == x.shape
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for image, source in zip(out, padded):
        windows = [src[:, i : i + 6, j : j + 6] for src in (source, source.flip(2)) for i in range(5) for j in range(5)]
        assert any(torch.equal(image, w) for w in windows)


def test_cifar_resnet56_is_acified_whole_and_deploys_exactly():
    model = CifarResNet(56)
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(0.85e6, rel=0.01)
    acified = acify(model, init="scratch")
    assert len(acified.acnet_plan.converted) == 55 and not acified.acnet_plan.skipped
    x = torch.randn(2, 3, 32, 32)
    acified.train()
    acified(x)  # give the BatchNorms running statistics
    verify(acified, deploy(acified.eval()), x)
    with pytest.raises(ValueError, match="6n\\+2"):
        CifarResNet(40)
