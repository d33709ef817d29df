"""The accuracy study script, its data and evaluation helpers and the CIFAR ResNet it trains (smoke sizes)."""

import importlib.util
import json
import math
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from acnet_convert import ACNetError, acify, deploy, verify
from acnet_convert.demo.experiment import (
    Recipe,
    Split,
    accuracy,
    flip_and_crop,
    fold_conv_bn,
    int8_ptq_accuracy,
    load_cifar10,
    load_digits,
    quantize_weights,
    train,
    transformed_accuracy,
)
from acnet_convert.demo.models import CifarResNet, SmallCNN

ROOT = Path(__file__).resolve().parents[2]
VARIANTS = ["baseline", "acb-exact@1", "acb-exact@1/3", "dbb-fast@1", "dbb-fast@1/3"]


def load_script():
    spec = importlib.util.spec_from_file_location("accuracy_study", ROOT / "scripts" / "accuracy_study.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["accuracy_study"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


study_module = load_script()


def study(*args):
    command = [sys.executable, "scripts/accuracy_study.py", *args]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)


def markdown_rows(page: str, header_start: str, after: str = "") -> list[list[str]]:
    """Body rows of the first markdown table after ``after`` whose header row starts with ``header_start``."""
    lines = page[page.index(after) :].splitlines()
    first = next(i for i, line in enumerate(lines) if line.startswith(header_start)) + 2
    rows = []
    for line in lines[first:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows


def mean_se(values):
    return statistics.fmean(values), statistics.stdev(values) / math.sqrt(len(values))


def cell(value_and_pair: str) -> tuple[float, float | None, float | None]:
    """``98.00 (+0.50 ± 0.20)`` -> (98.0, 0.5, 0.2); a bare mean -> (mean, None, None)."""
    mean, _, rest = value_and_pair.partition(" (")
    if not rest:
        return float(mean), None, None
    diff, error = rest.rstrip(")").split(" ± ")
    return float(mean), float(diff), float(error)


@pytest.fixture(scope="module")
def small_study(tmp_path_factory):
    out = tmp_path_factory.mktemp("study") / "accuracy.md"
    done = study("--seeds", "2", "--epochs", "1", "--variants", "acb-exact,dbb-fast", "--gammas", "1,1/3",
                 "--out", str(out))  # fmt: skip
    assert done.returncode == 0, done.stderr
    return json.loads(out.with_suffix(".json").read_text()), out.read_text(), out


def test_study_record_has_every_variant_and_seed_with_every_measurement(small_study):
    record, _, _ = small_study
    assert [(r["variant"], r["seed"]) for r in record["runs"]] == [(v, s) for s in (0, 1) for v in VARIANTS]
    test_size = record["setup"]["test_size"]
    for run in record["runs"]:
        assert 10 < run["accuracy"] <= 100
        assert set(run["transformed"]) == {"flip_lr", "flip_ud", "rot90"}
        assert set(run["quantized"]) == {"int8_tensor", "int8_channel", "int4_tensor", "int4_channel", "int8_ptq"}
        assert all(0 <= a <= 100 for a in [*run["transformed"].values(), *run["quantized"].values()])
        assert run["same_predictions"] == (None if run["variant"] == "baseline" else test_size)
        assert 20 < run["weights"]["int8_tensor_sqnr_db"] < 60 and run["weights"]["max_over_std"] > 1
        assert run["weights"]["int4_tensor_sqnr_db"] < run["weights"]["int8_tensor_sqnr_db"]
        assert 0 < run["weights"]["centre_cross_energy"] <= 1


def test_study_page_statistics_match_its_record(small_study):
    record, page, _ = small_study
    runs = {(r["variant"], r["seed"]): r for r in record["runs"]}
    summary = {row[0]: row for row in markdown_rows(page, "| variant | mean top-1")}
    per_seed = {row[0]: row[1:] for row in markdown_rows(page, "| variant | seed 0")}
    assert list(summary) == list(per_seed) == VARIANTS
    for variant in VARIANTS:
        accuracies = [runs[variant, s]["accuracy"] for s in (0, 1)]
        assert [float(a) for a in per_seed[variant]] == pytest.approx(accuracies, abs=0.005)
        assert float(summary[variant][1]) == pytest.approx(statistics.fmean(accuracies), abs=0.005)
        assert float(summary[variant][2]) == pytest.approx(statistics.stdev(accuracies), abs=0.005)
        if variant == "baseline":
            continue
        diff, error = mean_se([runs[variant, s]["accuracy"] - runs["baseline", s]["accuracy"] for s in (0, 1)])
        assert summary[variant][5] == f"{diff:+.2f} ± {error:.2f}"
        same, total = map(int, summary[variant][7].split("/"))
        assert same == total == 2 * record["setup"]["test_size"]


@pytest.mark.parametrize(
    "title, header, key",
    [("## Robustness", "| variant | test set", ("transformed", "rot90", 4)),
     ("## Quantisation", "| variant | float", ("quantized", "int4_tensor", 4)),
     ("## Quantisation", "| variant | float", ("quantized", "int8_ptq", 6))],  # fmt: skip
)
def test_robustness_and_quantisation_cells_are_paired_with_the_baseline(small_study, title, header, key):
    record, page, _ = small_study
    group, name, column = key
    runs = {(r["variant"], r["seed"]): r[group][name] for r in record["runs"]}
    rows = {row[0]: row for row in markdown_rows(page, header, after=title)}
    assert list(rows) == VARIANTS
    assert cell(rows["baseline"][column]) == (pytest.approx(statistics.fmean(runs["baseline", s] for s in (0, 1)),
                                                            abs=0.005), None, None)  # fmt: skip
    for variant in VARIANTS[1:]:
        mean, diff, error = cell(rows[variant][column])
        want_diff, want_error = mean_se([runs[variant, s] - runs["baseline", s] for s in (0, 1)])
        assert mean == pytest.approx(statistics.fmean(runs[variant, s] for s in (0, 1)), abs=0.005)
        assert (diff, error) == (pytest.approx(want_diff, abs=0.005), pytest.approx(want_error, abs=0.005))


def test_gamma_section_compares_the_two_gammas_of_every_kind(small_study):
    record, page, _ = small_study
    rows = {row[0]: row for row in markdown_rows(page, "| kind, mode |")}
    assert list(rows) == ["acb-exact", "dbb-fast"]
    runs = {(r["variant"], r["seed"]): r["accuracy"] for r in record["runs"]}
    for kind_mode, row in rows.items():
        diff, error = mean_se([runs[f"{kind_mode}@1/3", s] - runs[f"{kind_mode}@1", s] for s in (0, 1)])
        assert row[-1] == f"{diff:+.2f} ± {error:.2f}"
    assert "**The figures support gamma 1" in page
    assert "Of the 12 variant and transform pairs, " in page  # 4 converted variants, 3 transforms
    weights = {row[0] for row in markdown_rows(page, "| variant | INT8 per-tensor SQNR")}
    assert weights == set(VARIANTS)


def test_render_rewrites_the_same_page_from_the_record(small_study, tmp_path):
    _, page, out = small_study
    again = tmp_path / "again.md"
    study_module.main(["--render", str(out.with_suffix(".json")), "--out", str(again)])
    assert again.read_text() == page


def test_default_verdict_follows_the_mean_then_the_worst_runs():
    verdict = study_module.default_verdict
    assert "gamma 1/3 as the default**: its pooled mean" in verdict((0.5, 0.2), {"1": -1, "1/3": -1}, "1", "1/3", 0.22)
    assert "gamma 1 as the default**: its pooled mean" in verdict((-0.5, 0.2), {"1": -9, "1/3": 0}, "1", "1/3", 0.22)
    tied_mean = verdict((0.1, 0.2), {"1": -5.5, "1/3": -0.4}, "1", "1/3", 0.22)
    assert "gamma 1/3 as the default**" in tied_mean and "(-0.40 against -5.50 points)" in tied_mean
    assert "1 is BatchNorm's default" in verdict((0.1, 0.2), {"1": -0.5, "1/3": -0.4}, "1", "1/3", 0.22)


@pytest.mark.parametrize("args", [["--variants", "acb-slow"], ["--variants", "qarepvgg-fast"], ["--gammas", "0"],
                                  ["--gammas", "x"], ["--seeds", "0"]])  # fmt: skip
def test_study_rejects_unknown_variants_gammas_and_seeds(args, capsys):
    with pytest.raises(SystemExit) as exit_info:
        study_module.parse_args(args)
    assert exit_info.value.code == 2 and "--variants takes" in capsys.readouterr().err


def test_study_options_override_the_preset():
    args = study_module.parse_args(["--variants", "dbb-exact", "--gammas", "1/3", "--epochs", "3"])
    assert (args.kind_modes, args.gamma_list, args.seeds, args.json) == (["dbb-exact"], ["1/3"], 10,
                                                                          str(ROOT / "docs" / "accuracy.json"))
    recipe = study_module.make_recipe(args)
    assert (recipe.epochs, recipe.batch_size) == (3, study_module.PRESETS["digits"].recipe.batch_size)
    variants = study_module.variants_of(args.kind_modes, args.gamma_list)
    assert [v.name for v in variants] == ["baseline", "dbb-exact@1/3"]
    block = variants[1].build(SmallCNN(1, 10, width=4)).features[0][0]
    gammas = [branch.bn.weight for branch in block.branches.values()]
    assert type(block).__name__ == "DBBlock" and all(torch.allclose(g, torch.tensor(1 / 3)) for g in gammas)


def test_default_variants_are_the_kinds_that_convert_a_conv_of_the_model_as_their_own():
    small = study_module.parse_args([]).kind_modes
    large_kernel = study_module.parse_args(["--model", "large_kernel_cnn"]).kind_modes
    assert small == [km for km in study_module.KIND_MODES if not km.startswith("dilated-")]  # no depthwise conv
    assert large_kernel == list(study_module.KIND_MODES)  # its 7x7 depthwise convs take the dilated kind too
    model = study_module.MODELS["large_kernel_cnn"](study_module.types.SimpleNamespace(in_channels=1, num_classes=10))
    acified = acify(model, block="dilated")
    assert sum(s.kind == "dilated" for s in acified.acnet_plan.converted) == 3
    assert acified(torch.randn(2, 1, 8, 8)).shape == (2, 10)


def test_repopt_variants_have_no_gamma_and_keep_the_plain_convs():
    variants = study_module.variants_of(["acb-repopt", "acb-exact", "repvgg-repopt-searched"], ["1", "1/3"])
    assert [v.name for v in variants] == ["baseline", "acb-repopt", "acb-exact@1", "acb-exact@1/3",
                                          "repvgg-repopt-searched"]  # fmt: skip
    conv = variants[1].build(SmallCNN(1, 10, width=4)).features[0][0]
    assert type(conv) is torch.nn.Conv2d and conv.repopt_mask.max() == 3  # the centre: three branches at scale 1


def test_quantize_weights_rounds_to_the_grid_of_its_scales():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 4 * 4, 5))
    with torch.no_grad():
        model[0].weight[0] *= 10  # one channel with a far larger range
    for bits, per_channel in ((8, False), (8, True), (4, False), (4, True)):
        quantized = quantize_weights(model, bits, per_channel)
        levels = 2 ** (bits - 1) - 1
        for layer, original in ((quantized[0], model[0]), (quantized[2], model[2])):
            rows, want = layer.weight.flatten(1), original.weight.flatten(1)
            peaks = want.abs().amax(1, keepdim=True) if per_channel else want.abs().max()
            steps = rows / (peaks / levels)
            assert torch.allclose(steps, steps.round(), atol=1e-4) and steps.abs().max() <= levels + 1e-4
            assert torch.allclose(rows.abs().amax(1) if per_channel else rows.abs().max(),
                                  want.abs().amax(1) if per_channel else want.abs().max())  # fmt: skip
            assert (rows - want).abs().max() <= (peaks / levels / 2 + 1e-6).max()
            assert torch.equal(layer.bias, original.bias)
    coarse = quantize_weights(model, 4, False)[0].weight[1:]
    assert coarse.unique().numel() < quantize_weights(model, 4, True)[0].weight[1:].unique().numel()


def test_transformed_accuracy_flips_and_rotates_the_test_images():
    x = torch.zeros(2, 1, 2, 2)
    x[0, 0, 0, 1] = 1  # class 0: bright top-right pixel
    x[1, 0, 0, 0] = 1  # class 1: bright top-left pixel
    y = torch.tensor([0, 1])
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 2, bias=False))
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor([[0.0, 1, 0, 0], [1, 0, 0, 0]]))
    split = Split("toy", x, y, x, y, 2)
    assert accuracy(model, x, y) == 100
    # left-right swaps the two classes; up-down moves both pixels off the weights (a tie, class 0);
    # a quarter turn counter-clockwise moves top-right to top-left and top-left off the weights
    assert transformed_accuracy(model, split) == {"flip_lr": 0, "flip_ud": 50, "rot90": 0}


def test_folding_and_int8_ptq_keep_a_trained_model_s_predictions():
    split = load_digits()
    torch.manual_seed(0)
    model = acify(SmallCNN(1, 10, width=8), block="dbb", init="scratch")
    train(model, split, Recipe(epochs=2), seed=0)
    deployed = deploy(model.eval())
    folded = fold_conv_bn(deployed)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    verify(deployed, folded, split.x_test[:64])
    float_accuracy = accuracy(deployed, split.x_test, split.y_test)
    ptq = int8_ptq_accuracy(deployed, split.x_train[:256], split.x_test, split.y_test)
    assert abs(ptq - float_accuracy) < 3 and float_accuracy > 50


def test_folding_takes_1x1_convs_and_their_batchnorm_too():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 6, 1), nn.BatchNorm2d(6))
    model.train()(torch.randn(4, 3, 6, 6))  # running statistics away from their defaults
    folded = fold_conv_bn(model)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    verify(model.eval(), folded, torch.randn(2, 3, 6, 6))


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
