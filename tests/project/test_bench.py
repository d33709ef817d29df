"""scripts/bench.py at smoke size: it runs, and its record and page are complete and consistent.

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

from acnet_convert import acify

ROOT = Path(__file__).resolve().parents[2]


def load(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


bench = load("bench")
render = sys.modules["bench_render"]
FAST = [km for km in bench.KIND_MODES if km.endswith("-fast")]
REPOPT = [km for km in bench.KIND_MODES if km.endswith("-repopt")]


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    command = [sys.executable, "scripts/bench.py", "--smoke", "--threads", "1", "--out", str(out / "bench.md"),
               "--json", str(out / "bench.json")]  # fmt: skip
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    return json.loads((out / "bench.json").read_text()), (out / "bench.md").read_text(), done.stdout


def test_training_table_has_every_kind_and_mode_with_consistent_ratios(smoke):
    result, _, _ = smoke
    cases = {(r["model"], r["batch"], r["side"]) for r in result["train"]}
    assert cases == set(bench.SMOKE.train) and result["smoke"] is True
    for case in cases:
        rows = {r["variant"]: r for r in result["train"] if (r["model"], r["batch"], r["side"]) == case}
        assert set(rows) == {"original", "control", "naive", *bench.KIND_MODES}
        for row in rows.values():
            assert row["wall_ms"] > 0 and len(row["wall_samples"]) == bench.SMOKE.repeats
            for key in ("wall_ms", "peak_bytes", "forward_flops"):
                assert row[f"{key}_ratio"] == pytest.approx(row[key] / rows["original"][key], rel=1e-12)
        assert (rows["control"]["params"], rows["control"]["forward_flops"]) == (
            rows["original"]["params"], rows["original"]["forward_flops"])  # fmt: skip
        # deterministic facts: the naive reference and exact ACB build the same blocks; fast ACB and RepVGG run
        # one conv of the original's size; exact DBB adds more branches than exact ACB
        assert rows["naive"]["params"] == rows["acb-exact"]["params"]
        assert rows["naive"]["forward_flops"] == rows["acb-exact"]["forward_flops"] > rows["original"]["forward_flops"]
        assert rows["acb-fast"]["forward_flops"] == rows["repvgg-fast"]["forward_flops"]
        assert rows["repvgg-fast"]["forward_flops"] == rows["original"]["forward_flops"]
        assert rows["dbb-exact"]["forward_flops"] > rows["acb-exact"]["forward_flops"]
        # the allocator's peak includes the extra parameters and their momentum, at the least
        for kind_mode in FAST:
            extra = 4 * (rows[kind_mode]["params"] - rows["original"]["params"])  # float32 bytes
            assert extra > 0 and rows[kind_mode]["peak_bytes"] - rows["original"]["peak_bytes"] >= 2 * extra
        for kind_mode in set(bench.KIND_MODES) - set(FAST) - set(REPOPT):
            assert rows[kind_mode]["peak_bytes"] > rows["original"]["peak_bytes"]
        # a repopt model is the original model: its parameters and its forward are the original's
        assert REPOPT
        for kind_mode in REPOPT:
            assert rows[kind_mode]["params"] == rows["original"]["params"]
            assert rows[kind_mode]["forward_flops"] == rows["original"]["forward_flops"]


def test_block_counts_match_what_acify_converts():
    model = torchvision.models.resnet18()
    for kind_mode in bench.KIND_MODES:
        converted = bench.converted(model, kind_mode)
        kind, mode = kind_mode.split("-")
        names = [site.name for site in acify(model, block=kind, mode=mode).acnet_plan.converted]
        sites = converted.acnet_plan.converted
        assert [site.name for site in sites] == names
        assert all(s.kind == kind or (s.kind == "acb" and "fallback-kind" in s.codes) for s in sites)
        assert any(s.kind == kind for s in sites) == (kind != "dilated")  # resnet18 has no large depthwise conv


def test_every_deployed_model_has_the_parameter_count_of_the_folded_original(smoke):
    result, _, _ = smoke
    rows = {r["variant"]: r for r in result["inference"]}
    assert rows["original, conv+BN folded"]["params"] < rows["original"]["params"]
    assert set(rows) == {"original", "original, conv+BN folded", *(f"{km}, deployed and folded" for km in
                                                                    bench.KIND_MODES)}  # fmt: skip
    for variant in rows:
        assert rows[variant]["wall_ms"] > 0
        assert rows[variant]["params_equal_folded"] == (variant != "original")


def test_conversion_section_is_complete(smoke):
    result, _, _ = smoke
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
    for heading in ("## Summary", "## Targets", "### Training step", "### Inference after deployment",
                    "### acify + deploy", "## Notes on the figures"):  # fmt: skip
        assert heading in text
    assert "### What was tried" not in text  # only records that measured candidates have that table
    assert f"## CPU: {result['machine']['cpu']}" in text and result["command"] in text
    summary = text[text.index("## Summary") : text.index("## Targets")]
    assert summary.count("| CPU: ") == len(bench.SMOKE.train)
    header = next(line for line in summary.splitlines() if line.startswith("| machine |"))
    assert all(f" {km.replace('-', ', ')} |" in header for km in bench.KIND_MODES)


def test_render_joins_the_results_of_one_machine_and_gives_each_machine_its_part(smoke, tmp_path):
    result, _, _ = smoke
    train_only = {**result, "sections": ["train"], "command": "python scripts/bench.py --sections train"}
    for section in ("inference", "convert"):
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
    assert cpu_part.count('| `block="dbb"`, exact |') == 2 * cases  # the CPU training rows of both commands
    summary = page[page.index("## Summary") : page.index("## Targets")]
    assert summary.count("| CPU: ") == cases and summary.count("| GPU: Some GPU |") == cases  # one row per case


def case_rows(variant_ratios: dict[str, tuple[float, float, float]], model="resnet18", batch=32, side=224):
    """Training rows of one case: variant -> (step ratio, memory ratio, FLOP ratio)."""
    return [{"model": model, "batch": batch, "side": side, "variant": v, "wall_ms": 100 * w, "cpu_ms": 100 * w,
             "wall_ms_ratio": w, "cpu_ms_ratio": w, "peak_bytes": 2**20 * m, "peak_bytes_ratio": m,
             "forward_flops_ratio": f, "compiled": None} for v, (w, m, f) in variant_ratios.items()]  # fmt: skip


def record(train: list[dict], device="cpu") -> dict:
    machine = {"cpu": "Test CPU", "cores": 2, "torch_threads": 2, "device": device, "accelerator": None,
               "torch": "t", "torchvision": "v", "python": "p", "load_average": [0.5, 0.5, 0.5]}  # fmt: skip
    return {"machine": machine, "sections": ["train"], "train": train, "load_average_end": [0.5, 0.5, 0.5],
            "command": "python scripts/bench.py", "smoke": False}  # fmt: skip


def target_verdicts(page: str) -> dict[str, str]:
    section = page[page.index("## Targets") :].split("\n## ")[0]
    return {row.split(" | ")[0].lstrip("| "): row.rstrip(" |").split(" | ")[-1] for row in section.splitlines()
            if row.startswith("| dbb")}  # fmt: skip


def test_targets_are_met_or_missed_by_the_recorded_figures():
    ratios = {"original": (1.0, 1.0, 1.0), "dbb-fast": (1.10, 1.30, 1.2), "dbb-exact": (2.50, 2.0, 2.34)}
    verdicts = target_verdicts(render.markdown([record(case_rows(ratios))]))
    assert verdicts == {
        "dbb, fast, resnet18, batch 32, 224x224: step time": "met",
        "dbb, fast, resnet18, batch 32, 224x224: peak memory": "**missed**",
        "dbb, exact, resnet18, batch 32, 224x224: step time": "met",
        "dbb, exact, mobilenet_v2, batch 32, 224x224": "-",  # no such case in the record
        "dbb, exact, resnet18, batch 32, 224x224: step ratio over FLOP ratio (2.50x / 2.34)": "met",
    }
    ratios = {"original": (1.0, 1.0, 1.0), "dbb-fast": (1.16, 1.20, 1.2), "dbb-exact": (3.10, 2.0, 2.30),
              "acb-repopt": (1.02, 1.04, 1.0)}  # fmt: skip
    verdicts = target_verdicts(render.markdown([record(case_rows(ratios))]))
    assert list(verdicts.values()) == ["**missed**", "met", "**missed**", "-", "**missed**"]
    page = render.markdown([record(case_rows(ratios))])
    assert "| acb, repopt, resnet18, batch 32, 224x224: step time | 1.02x | at most 1.03x | met |" in page
    assert "| acb, repopt, resnet18, batch 32, 224x224: peak memory | 1.04x | at most 1.03x | **missed** |" in page
    gpu_only = render.markdown([record(case_rows(ratios), device="cuda")])
    assert "## Targets" not in gpu_only  # the targets are the CPU's


def test_records_from_before_the_block_kinds_render_under_the_acb_names():
    old = record(case_rows({"original": (1.0, 1.0, 1.0), "exact": (1.8, 1.7, 1.6), "fast": (1.2, 1.5, 1.0)}))
    page = render.markdown([old])
    old["inference"] = [{"variant": "exact, deployed and folded"}]
    new = render.normalised(old)
    assert [r["variant"] for r in new["train"]] == ["original", "acb-exact", "acb-fast"]
    assert new["inference"][0]["variant"] == "acb-exact, deployed and folded"
    assert old["train"][1]["variant"] == "exact"  # the record itself is left as it was
    assert "| acb, exact | acb, fast |" in page and "1.80x / 1.70x | 1.20x / 1.50x |" in page
    assert "Block kinds and modes measured in this part: acb-exact, acb-fast." in page


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


def test_variant_groups_are_timed_apart_each_with_its_own_original(monkeypatch, tmp_path):
    timed = []

    def interleaved(steps, repeats, warmup, device):
        timed.append(list(steps))
        return {name: sys.modules["bench_harness"].Timing(100.0 * (1 + len(timed)), 1.0, [1.0] * repeats)
                for name in steps}  # a slower original later  # fmt: skip

    monkeypatch.setattr(bench, "interleaved", interleaved)
    monkeypatch.setattr(bench, "peak_training_memory", lambda step: 2**20)
    argv = ["--sections", "train", "--train", "resnet18:2:32", "--variants", "acb-fast/acb-repopt,dbb-repopt",
            "--repeats", "3/5", "--json", str(tmp_path / "r.json"), "--out", str(tmp_path / "r.md")]  # fmt: skip
    assert bench.main(argv) == 0
    assert timed == [["original", "control", "acb-fast", "naive"], ["original", "control", "acb-repopt", "dbb-repopt"]]
    rows = json.loads((tmp_path / "r.json").read_text())["train"]
    assert [(r["variant"], r["group"], len(r["wall_samples"])) for r in rows] == [
        ("original", 0, 3), ("control", 0, 3), ("acb-fast", 0, 3), ("naive", 0, 3),
        ("original", 1, 5), ("control", 1, 5), ("acb-repopt", 1, 5), ("dbb-repopt", 1, 5)]  # fmt: skip
    assert all(r["wall_ms_ratio"] == 1.0 for r in rows)  # each against its own group's original
    page = (tmp_path / "r.md").read_text()
    assert "group 1 (3 rounds): acb-fast, naive; group 2 (5 rounds): acb-repopt, dbb-repopt" in page
    assert "| resnet18 | 2, 32x32 | original (group 2) |" in page
    assert "| resnet18 | 2, 32x32 | control, second copy of the original (group 2) |" in page


@pytest.mark.parametrize("repeats", ["0", "3/4/5", "x", "3/"])
def test_a_bad_repeats_count_is_refused_naming_the_flag(repeats, capsys):
    with pytest.raises(SystemExit):
        bench.main(["--sections", "train", "--variants", "acb-fast/acb-repopt", "--repeats", repeats])
    assert f"bad --repeats {repeats!r}" in capsys.readouterr().err


def test_the_control_beside_the_repopt_variants_is_quoted_under_the_targets():
    rows = case_rows({"original": (1.0, 1.0, 1.0), "control": (1.02, 1.0, 1.0), "acb-fast": (1.1, 1.1, 1.0)})
    rows += [{**r, "group": 1} for r in case_rows({"original": (1.0, 1.0, 1.0), "control": (0.98, 1.01, 1.0),
                                                   "acb-repopt": (1.01, 1.0, 1.0)})]  # fmt: skip
    page = render.markdown([record(rows)])
    assert ("timed in the same rounds as the repopt variants, measured 0.98x step time and 1.01x peak memory "
            "(resnet18, batch 32, 224x224):") in page  # the group-2 control, not group 1's
    assert "control" not in page.split("## Summary")[1].split("## Targets")[0]  # not a kind: no summary column
