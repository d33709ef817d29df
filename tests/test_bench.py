"""scripts/bench.py at smoke size: it runs, its report is complete and consistent, and its candidates are exact.

Timings are printed by the benchmark, never checked here; what is checked is deterministic (structure, counts).
"""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

from acnet_convert import acify

ROOT = Path(__file__).resolve().parent.parent


def load(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


bench = load("bench")


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    command = [sys.executable, "scripts/bench.py", "--smoke", "--threads", "1", "--out", str(out / "bench.md"),
               "--json", str(out / "bench.json")]  # fmt: skip
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    return json.loads((out / "bench.json").read_text()), (out / "bench.md").read_text(), done.stdout


def test_training_table_has_every_variant_with_consistent_ratios(smoke):
    result, _, _ = smoke
    cases = {(r["model"], r["batch"], r["side"]) for r in result["train"]}
    assert cases == set(bench.SMOKE.train)
    for case in cases:
        rows = {r["variant"]: r for r in result["train"] if (r["model"], r["batch"], r["side"]) == case}
        assert set(rows) == {"original", "exact", "fast", "naive"}
        for row in rows.values():
            assert row["wall_ms"] > 0 and len(row["wall_samples"]) == bench.SMOKE.repeats
            assert row["wall_ms_ratio"] == pytest.approx(row["wall_ms"] / rows["original"]["wall_ms"], rel=1e-12)
        # deterministic facts: the naive reference and exact mode build the same blocks; fast mode runs one conv
        assert rows["naive"]["params"] == rows["exact"]["params"]
        assert rows["naive"]["forward_flops"] == rows["exact"]["forward_flops"] > rows["original"]["forward_flops"]
        assert rows["fast"]["forward_flops"] == rows["original"]["forward_flops"]
        # the allocator's peak includes the extra kernels' parameters and momentum, at the least
        model = acify(torchvision.models.get_model(case[0]), mode="fast")
        extra = sum(p.nbytes for n, p in model.named_parameters() if n.split(".")[-1] not in ("weight", "bias"))
        assert rows["fast"]["peak_bytes"] - rows["original"]["peak_bytes"] >= 2 * extra
        assert rows["exact"]["peak_bytes"] > rows["original"]["peak_bytes"]


def test_deployed_models_have_the_parameter_count_of_the_folded_original(smoke):
    result, _, _ = smoke
    rows = {r["variant"]: r for r in result["inference"]}
    assert rows["original, conv+BN folded"]["params"] < rows["original"]["params"]
    for variant in ("exact, deployed and folded", "fast, deployed and folded"):
        assert rows[variant]["params_equal_folded"] and rows[variant]["wall_ms"] > 0


def test_candidates_and_conversion_sections_are_complete(smoke):
    result, _, _ = smoke
    assert [r["candidate"] for r in result["candidates"]] == list(bench.CANDIDATES)
    assert all(r["memory_ratio"] > 0 and r["wall_ratio"] > 0 for r in result["candidates"])
    assert {(r["mode"], r["inplace"]) for r in result["convert"]["resnet50"]} == {
        (m, i) for m in ("exact", "fast") for i in (False, True)
    }
    assert all(r["converted"] == 17 for r in result["convert"]["resnet50"])  # resnet50's 3x3 and 7x7 convs
    assert [r["convs"] for r in result["convert"]["chain"]] == bench.SMOKE.chain
    assert [r["model"] for r in result["convert"]["zoo"]] == bench.SMOKE.zoo


def test_report_describes_the_machine_and_every_section(smoke):
    result, text, stdout = smoke
    assert text in stdout
    assert result["machine"]["cpu"] in text and f"{result['machine']['cores']} cores" in text
    for heading in ("## Summary", "### Training step", "### Inference after deployment", "### What was tried",
                    "### acify + deploy", "## Notes on the figures"):  # fmt: skip
        assert heading in text
    assert f"## CPU: {result['machine']['cpu']}" in text and result["command"] in text


def test_render_joins_the_results_of_one_machine_and_gives_each_machine_its_part(smoke, tmp_path):
    result, _, _ = smoke
    train_only = {**result, "sections": ["train"], "command": "python scripts/bench.py --sections train"}
    for section in ("inference", "candidates", "convert"):
        del train_only[section]
    gpu = {**train_only, "machine": {**result["machine"], "device": "cuda", "accelerator": "Some GPU"}}
    files = []
    for i, part in enumerate((result, train_only, gpu)):
        files.append(tmp_path / f"{i}.json")
        files[-1].write_text(json.dumps(part))
    out = tmp_path / "page.md"
    assert bench.main(["--render", *map(str, files), "--out", str(out)]) == 0
    page = out.read_text()
    assert page.count("## CPU: ") == 1 and page.count("## GPU: Some GPU") == 1
    cpu_part = page[page.index("## CPU: ") : page.index("## GPU: ")]
    assert result["command"] in cpu_part and train_only["command"] in cpu_part
    cases = len(bench.SMOKE.train)
    assert cpu_part.count("| `acify` (exact) |") == 2 * cases  # the CPU training rows of both commands
    summary = page[page.index("## Summary") : page.index("## CPU: ")]
    assert summary.count("| CPU: ") == cases and summary.count("| GPU: Some GPU |") == cases  # one row per case


def small_net():
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 5, padding=2, stride=2),
        nn.BatchNorm2d(8, momentum=0.3),
    ).double()  # fmt: skip


@pytest.mark.parametrize(
    "mode, candidate",
    [("exact", bench._sum_out_of_place), ("exact", bench._joint_asymmetric), ("exact", bench._custom_batch_norm_sum),
     ("exact", bench._asymmetric_channels_last),
     ("fast", bench._fast_recomputed), ("fast", bench._fast_padded)],  # fmt: skip
)
def test_every_candidate_computes_what_the_shipped_block_computes(mode, candidate):
    shipped = acify(small_net(), init="scratch", mode=mode).train()
    other = bench._with_forward(shipped, candidate)
    x = torch.randn(4, 3, 9, 9, dtype=torch.float64)
    want, got = shipped(x), other(x)
    assert (want - got).abs().max().item() <= 1e-12  # float64 rounding only
    grads = [torch.autograd.grad(out.square().sum(), list(m.parameters()))
             for out, m in ((want, shipped), (got, other))]  # fmt: skip
    assert all(torch.allclose(a, b, rtol=1e-10, atol=1e-10) for a, b in zip(*grads))
    assert all(torch.allclose(a.double(), b.double(), rtol=1e-12, atol=1e-14)
               for a, b in zip(shipped.buffers(), other.buffers()))  # BatchNorm statistics  # fmt: skip


def test_naive_reference_converts_what_acify_converts_in_resnet18():
    naive = load("naive_acnet")
    model = torchvision.models.resnet18()
    blocks = [n for n, m in naive.naive_acify(model).named_modules() if isinstance(m, naive.NaiveACBlock)]
    assert blocks == [s.name for s in acify(model).acnet_plan.converted]


def test_naive_reference_builds_its_branches_like_the_conv_it_replaces():
    naive = load("naive_acnet")
    model = naive.naive_acify(torchvision.models.resnet18(num_classes=4).double())
    assert {p.dtype for p in model.parameters()} == {torch.float64}  # device and dtype follow the conv
    assert model(torch.randn(2, 3, 32, 32, dtype=torch.float64)).shape == (2, 4)
