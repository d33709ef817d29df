"""docs/benchmarks.md from the JSON records of scripts/bench.py: a summary, the targets, one part per machine."""

from __future__ import annotations

import copy
import statistics

from bench_harness import KIND_MODES, MiB

OLD_NAMES = {"exact": "acb-exact", "fast": "acb-fast"}  # records written before there were several block kinds
TARGETS = {  # (kind-mode, model, batch, side): (step-time ratio at most, peak-memory ratio at most or None)
    ("dbb-fast", "resnet18", 32, 224): (1.15, 1.20),
    ("dbb-exact", "resnet18", 32, 224): (3.0, None),
    ("dbb-exact", "mobilenet_v2", 32, 224): (2.5, None),
}
UNCONVERTED = ("original", "control")  # the model as given, and a second copy of it timed beside it
REPOPT_LIMIT = 1.03  # every repopt variant's step-time and peak-memory ratio, in every case measured
FLOP_SLACK = 1.10  # exact DBB's step-time ratio at most this multiple of its forward FLOP ratio


def normalised(result: dict) -> dict:
    """A copy of a record with the variant names of the records made before there were several kinds updated."""
    result = copy.deepcopy(result)
    for row in result.get("train", []):
        row["variant"] = OLD_NAMES.get(row["variant"], row["variant"])
    for row in result.get("inference", []):
        head, _, tail = row["variant"].partition(", ")
        row["variant"] = f"{OLD_NAMES[head]}, {tail}" if head in OLD_NAMES else row["variant"]
    return result


def merge_results(results: list[dict]) -> list[dict]:
    """Results of several commands on one machine joined into one (sections concatenated), machine by machine."""
    merged: dict[tuple, dict] = {}
    for result in map(normalised, results):
        m = result["machine"]
        key = (m["cpu"], m["cores"], m["device"], m["accelerator"])
        commands = [result["command"]] if isinstance(result["command"], str) else list(result["command"])
        if key not in merged:
            merged[key] = {**result, "command": commands}
            continue
        into = merged[key]
        into["command"] += commands
        for section in result["sections"]:
            if section not in into["sections"]:
                into["sections"].append(section)
            if isinstance(result[section], list):
                into[section] = into.get(section, []) + result[section]
            else:
                into[section] = result[section]
    return list(merged.values())


def markdown(results: list[dict]) -> str:
    """The whole of docs/benchmarks.md: a summary, the targets, then one part per machine."""
    results = merge_results(results)
    lines = [
        "# Benchmarks",
        "",
        "Each part of this page was written by `scripts/bench.py` on the machine it names; the commands are given "
        "in each part. To regenerate, run a part's commands with `--json FILE`, then "
        "`python scripts/bench.py --render FILE... --out docs/benchmarks.md` (the JSON files beside this page are "
        "the records this page was rendered from) rather than editing this page. Variants are measured interleaved "
        "(the order rotates every round); every time is a median over rounds, and ratios are against the "
        "unconverted model measured in the same rounds.",
        "",
        *_summary_md(results),
        "",
        *_targets_md(results),
        "",
    ]
    for result in results:
        lines += _machine_md(result)
    return "\n".join(lines + NOTES + [""])


def busy_note(result: dict) -> str:
    """A sentence on how loaded the machine was: load averages at start and end against the benchmark's threads."""
    m = result["machine"]
    loads = [load[0] for load in (m["load_average"], result["load_average_end"]) if load]
    if not loads:
        return ""
    busy = max(loads) > m["torch_threads"] + 0.5  # more than the benchmark's own threads were running
    state = "busy: other work shared the cores, so wall-clock figures are noisy" if busy else "quiet"
    steadier = "" if m["accelerator"] else "; CPU-time ratios are the steadier figures"
    return (
        f"1-minute load average {loads[0]:.1f} at the start and {loads[-1]:.1f} at the end, with {m['cores']} cores "
        f"and {m['torch_threads']} benchmark threads ({state}{steadier})."
    )


def _machine_name(m: dict) -> str:
    """``GPU: <name>`` or ``CPU: <model>, <n> cores``."""
    return f"GPU: {m['accelerator']}" if m["accelerator"] else f"CPU: {m['cpu']}, {m['cores']} cores"


def _eager_rows(result: dict) -> list[dict]:
    """The training rows measured without torch.compile."""
    return [r for r in result.get("train", []) if not r.get("compiled")]


def _cases(rows: list[dict]) -> dict[tuple[str, int, int], dict[str, dict]]:
    """Training rows grouped by (model, batch, side), then by variant."""
    cases: dict[tuple[str, int, int], dict[str, dict]] = {}
    for r in rows:  # the first row of a variant is kept: the originals of later timing groups repeat it
        cases.setdefault((r["model"], r["batch"], r["side"]), {}).setdefault(r["variant"], r)
    return cases


def _summary_md(results: list[dict]) -> list[str]:
    """Step-time and memory ratios of every kind and mode, one row per machine and case."""
    present = {r["variant"] for result in results for r in _eager_rows(result)}
    columns = [km for km in KIND_MODES if km in present]
    lines = [
        "## Summary",
        "",
        "Training-step time and peak training memory of each block kind and mode against the unconverted model, "
        "as *step / memory* ratios, from the training tables below (eager mode); - where a machine's records do "
        "not have that kind.",
        "",
        "| machine | model | batch, input | " + " | ".join(km.replace("-", ", ") for km in columns) + " |",
        "|---" * (len(columns) + 3) + "|",
    ]
    for result in results:
        marker = " (see its note)" if result.get("note") else ""
        for (model, batch, side), by_variant in _cases(_eager_rows(result)).items():
            cells = [f"{by_variant[km]['wall_ms_ratio']:.2f}x / {by_variant[km]['peak_bytes_ratio']:.2f}x"
                     if km in by_variant else "-" for km in columns]  # fmt: skip
            lines.append(f"| {_machine_name(result['machine'])}{marker} | {model} | {batch}, {side}x{side} | "
                         + " | ".join(cells) + " |")  # fmt: skip
    return lines


def _targets_md(results: list[dict]) -> list[str]:
    """The CPU targets, each met or missed with the measured figure."""
    rows, floors = [], []
    for result in (r for r in results if r["machine"]["device"] == "cpu"):
        cases = _cases(_eager_rows(result))
        for (km, *case), (max_step, max_memory) in TARGETS.items():
            row = cases.get(tuple(case), {}).get(km)
            label = f"{km.replace('-', ', ')}, {case[0]}, batch {case[1]}, {case[2]}x{case[2]}"
            if row is None:
                rows.append(f"| {label} | not measured | at most {max_step:.2f}x | - |")
                continue
            rows.append(_target_row(f"{label}: step time", row["wall_ms_ratio"], max_step))
            if max_memory is not None:
                rows.append(_target_row(f"{label}: peak memory", row["peak_bytes_ratio"], max_memory))
                floors.extend(_floor_note(label, row, cases[tuple(case)].get("original")))
        for (model, batch, side), by_variant in cases.items():
            for km in (km for km in by_variant if km.endswith("-repopt")):
                label = f"{km.replace('-', ', ')}, {model}, batch {batch}, {side}x{side}"
                rows.append(_target_row(f"{label}: step time", by_variant[km]["wall_ms_ratio"], REPOPT_LIMIT))
                rows.append(_target_row(f"{label}: peak memory", by_variant[km]["peak_bytes_ratio"], REPOPT_LIMIT))
            if "dbb-exact" in by_variant:
                row = by_variant["dbb-exact"]
                rows.append(_target_row(
                    f"dbb, exact, {model}, batch {batch}, {side}x{side}: step ratio over FLOP ratio "
                    f"({row['wall_ms_ratio']:.2f}x / {row['forward_flops_ratio']:.2f})",
                    row["wall_ms_ratio"] / row["forward_flops_ratio"], FLOP_SLACK,
                ))  # fmt: skip
    if not rows:
        return []
    return [
        "## Targets",
        "",
        "Measured on the CPU, eager mode, against the unconverted model: "
        + "; ".join(f"`block=\"{km.split('-')[0]}\", mode=\"{km.split('-')[1]}\"` at most {step:.2f}x the step time"
                    + (f" and {memory:.2f}x the peak memory" if memory is not None else "")
                    + f" of {model} at batch {batch}, {side}x{side}"
                    for (km, model, batch, side), (step, memory) in TARGETS.items())
        + f"; every `mode=\"repopt\"` variant at most {REPOPT_LIMIT:.2f}x the step time and the peak memory in every "
        f"case measured; exact DBB's step-time ratio within {FLOP_SLACK - 1:.0%} of the FLOP ratio its branches imply (the "
        "forward FLOP ratio of the training tables, which counts every branch's convs).",
        "",
        "| target | measured | limit | |",
        "|---|---|---|---|",
        *rows,
        *_control_note(results),
        *floors,
    ]


def _control_note(results: list[dict]) -> list[str]:
    """How far apart two copies of the original measured, in the rounds the repopt variants were timed in."""
    measured = []
    for result in (r for r in results if r["machine"]["device"] == "cpu"):
        rows = _eager_rows(result)
        timed_with_repopt = {_round_key(r) for r in rows if r["variant"].endswith("-repopt")}
        measured += [f"{r['wall_ms_ratio']:.2f}x step time and {r['peak_bytes_ratio']:.2f}x peak memory "
                     f"({r['model']}, batch {r['batch']}, {r['side']}x{r['side']})"
                     for r in rows if r["variant"] == "control" and _round_key(r) in timed_with_repopt]  # fmt: skip
    if not measured:
        return []
    return ["", "The control, a second copy of the unconverted model timed in the same rounds as the repopt "
            f"variants, measured {'; '.join(measured)}: ratios that close to 1 cannot be told apart from two "
            "identical models on this machine."]  # fmt: skip


def _round_key(row: dict) -> tuple:
    """The rounds a training row was timed in: its case and timing group."""
    return row["model"], row["batch"], row["side"], row.get("group", 0)


def _floor_note(label: str, row: dict, original: dict | None) -> list[str]:
    """What a block's own parameters and kernel composition cost at the least, from the same record."""
    if original is None or "params" not in row:
        return []
    extra = (row["params"] - original["params"]) * 4 * 3  # float32 weights, their gradients, SGD momentum
    memory = (original["peak_bytes"] + extra) / original["peak_bytes"]
    return [
        "",
        f"Floors for {label}, from the same record: its extra parameters ({row['params'] - original['params']:,}), "
        f"with their gradients and SGD momentum, alone take the peak memory to {memory:.2f}x, whatever the "
        f"implementation; its forward FLOP ratio, kernel composition included, is {row['forward_flops_ratio']:.2f}.",
    ]


def _target_row(label: str, value: float, limit: float) -> str:
    """One target as a table row, with met or missed."""
    return f"| {label} | {value:.2f}x | at most {limit:.2f}x | {'met' if value <= limit else '**missed**'} |"


def _machine_md(result: dict) -> list[str]:
    """One machine's part: how it was measured, then every section its records have."""
    m = result["machine"]
    kinds = [km for km in KIND_MODES if any(r["variant"] == km for r in result.get("train", []))]
    lines = [
        f"## {_machine_name(m)}",
        "",
        "Measured by " + "; ".join(f"`{c}`" for c in result["command"]) + ".",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['torch_threads']} torch threads, device `{m['device']}`"
        + (f" ({m['accelerator']})" if m["accelerator"] else "")
        + f", torch {m['torch']}, torchvision {m['torchvision']}, Python {m['python']}. {busy_note(result)}",
        "",
    ]
    if kinds:
        lines += [f"Block kinds and modes measured in this part: {', '.join(kinds)}.", ""]
    if result.get("note"):
        lines += [f"Note: {result['note']}", ""]
    for section, render in (("train", _train_md), ("inference", _inference_md), ("candidates", _candidates_md),
                            ("convert", _convert_md)):  # fmt: skip
        if section in result:
            lines += render(result[section], m) + [""]
    return lines


def _variant_name(variant: str) -> str:
    """How a training variant is named in the tables."""
    if variant == "naive":
        return "naive ACNet reference"
    if variant == "control":
        return "control, second copy of the original"
    return variant if variant == "original" else f"`block=\"{variant.split('-')[0]}\"`, {variant.split('-')[1]}"


def _train_md(rows: list[dict], m: dict) -> list[str]:
    """The training-step table."""
    lines = [
        "### Training step",
        "",
        "One step = forward, cross-entropy, backward and an SGD-with-momentum update on a fixed random batch, train "
        "mode, every model built by `acify(model, block=KIND, mode=MODE, init=\"scratch\")`. The naive ACNet "
        "reference (`scripts/naive_acnet.py`) is the straightforward implementation of exact ACB: module walk, "
        "three separate conv + BatchNorm branches, no optimisation. *FLOP ratio* is the forward FLOP count over "
        "the original's (torch.utils.flop_counter, which counts convs and matrix products, including those that "
        "compose a fast block's kernel): the limit the step-time ratio of a block that computes every branch can "
        "approach.",
        "",
        _memory_definition(m),
        "",
        *_control_definition(rows),
        *_groups_note(rows),
        "| model | batch, input | variant | step (ms) | ratio | CPU time ratio | peak memory (MiB) | memory ratio "
        "| FLOP ratio |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        group = f" (group {r['group'] + 1})" if r["variant"] in UNCONVERTED and r.get("group") else ""
        lines.append(
            f"| {r['model']} | {r['batch']}, {r['side']}x{r['side']} | {_variant_name(r['variant'])}{group}"
            f"{_compiled(r.get('compiled'))} | "
            f"{r['wall_ms']:.1f} | {r['wall_ms_ratio']:.2f}x | {r['cpu_ms_ratio']:.2f}x | "
            f"{r['peak_bytes'] / MiB:.1f} | {r['peak_bytes_ratio']:.2f}x | {r['forward_flops_ratio']:.2f} |"
        )
    return lines


def _control_definition(rows: list[dict]) -> list[str]:
    """What the control row is, when a record has one."""
    if not any(r["variant"] == "control" for r in rows):
        return []
    return ["The *control* is a second copy of the original model, timed in the same rounds: its ratio is how far "
            "apart two identical models measure on this machine.", ""]  # fmt: skip


def _groups_note(rows: list[dict]) -> list[str]:
    """How the variants were grouped for timing, when they were: each group's rounds had the original and the
    control too."""
    groups: dict[int, list[str]] = {}
    rounds: dict[int, int] = {}
    for r in rows:
        if r["variant"] not in groups.setdefault(r.get("group", 0), []) and r["variant"] not in UNCONVERTED:
            groups[r.get("group", 0)].append(r["variant"])
        rounds.setdefault(r.get("group", 0), len(r.get("wall_samples", [])))
    if len(groups) < 2:
        return []
    listed = "; ".join(f"group {n + 1} ({rounds[n]} rounds): {', '.join(variants)}"
                       for n, variants in sorted(groups.items()))  # fmt: skip
    return [f"The variants were timed in groups, each in rounds of its own with the original and the control "
            f"(rows of their own, marked with the group after the first), and each ratio is against the original "
            f"of its group's rounds: {listed}.", ""]  # fmt: skip


def _compiled(mode: str | bool | None) -> str:
    """How a training row's model was compiled, as a suffix of its variant name."""
    if not mode:
        return ""
    return ", compiled" if mode in (True, "default") else f", compiled ({mode})"


def _memory_definition(m: dict) -> str:
    """What *peak memory* means on the record's device."""
    if m["device"].startswith("cuda"):
        return "*Peak memory* is `torch.cuda.max_memory_allocated` over one training step."
    return (
        "*Peak memory* is the most the CPU allocator held during one training step, from its allocation and free "
        "events as `torch.profiler` records them, including parameters, gradients and optimizer state: the "
        "quantity `torch.cuda.max_memory_allocated` gives on a GPU."
    )


def _inference_md(rows: list[dict], m: dict) -> list[str]:
    """The inference-latency table."""
    lines = [
        "### Inference after deployment",
        "",
        "Eval mode, `torch.inference_mode()`. `deploy` fuses the blocks; the conv + BatchNorm pairs it does "
        "not touch (1x1 convs, and in fast mode every converted conv, whose BatchNorm stays) are then folded exactly "
        "as in the folded original, so the deployed models have the original's architecture.",
        "",
        "| model | batch, input | variant | parameters | same as folded | latency (ms) | vs original | vs folded |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['batch']}, {r['side']}x{r['side']} | {r['variant']} | {r['params']:,} | "
            f"{'yes' if r['params_equal_folded'] else 'no'} | {r['wall_ms']:.2f} | {r['wall_vs_original']:.2f}x | "
            f"{r['wall_vs_folded']:.2f}x |"
        )
    return lines


def _candidates_md(rows: list[dict], m: dict) -> list[str]:
    """The table of the ACB implementations that were tried, from the records that measured them."""
    case = f"{rows[0]['model']}, batch {rows[0]['batch']}, {rows[0]['side']}x{rows[0]['side']}" if rows else ""
    lines = [
        "### What was tried",
        "",
        f"Training-step ratio of each implementation of the ACB blocks that was tried ({case}), against the original "
        "model run the same way, measured in the same interleaved rounds. Every candidate computed the same "
        "function, gradients and BatchNorm statistics as the shipped block (checked in float64); it was kept only if "
        "the measurements favoured it (time, then peak memory). The candidates' code is not shipped; this table "
        "keeps the figures of the run that measured them.",
        "",
        "The memory ratio is the peak memory of the training table, against the same original.",
        "",
        "| candidate | what | step ratio | CPU time ratio | memory ratio | kept |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['candidate']} | {r['what']} | {r['wall_ratio']:.2f}x | {r['cpu_ratio']:.2f}x | "
                     f"{r['memory_ratio']:.2f}x | {'yes' if r['kept'] else 'no'} |")  # fmt: skip
    return lines


def _convert_md(conv: dict, m: dict) -> list[str]:
    """The conversion-time tables: resnet50, chains of convs, the torchvision zoo."""
    lines = [
        "### acify + deploy wall time",
        "",
        "resnet50, ACB (medians, seconds; `inplace` converts a fresh copy each round):",
        "",
        "| mode | inplace | convs converted | acify | deploy | total |",
        "|---|---|---|---|---|---|",
    ]
    for r in conv["resnet50"]:
        lines.append(f"| {r['mode']} | {'yes' if r['inplace'] else 'no'} | {r['converted']} | {r['acify_s']:.3f} | "
                     f"{r['deploy_s']:.3f} | {r['acify_s'] + r['deploy_s']:.3f} |")  # fmt: skip
    lines += ["", "Cost against the number of convs (chain of conv3x3-BN-ReLU, 16 channels, exact mode, inplace):", "",
              "| convs | acify + deploy (s) | per conv (ms) |", "|---|---|---|"]  # fmt: skip
    lines += [f"| {r['convs']} | {r['total_s']:.3f} | {r['per_conv_ms']:.2f} |" for r in conv["chain"]]
    zoo = conv["zoo"]
    if zoo:
        totals = sorted(((r["acify_s"] + r["deploy_s"], r["model"]) for r in zoo), reverse=True)
        lines += [
            "",
            f"The torchvision classification zoo ({len(zoo)} models, exact mode, inplace, one run each): "
            f"{sum(r['converted'] for r in zoo)} convs converted, acify + deploy {sum(t for t, _ in totals):.1f} s in "
            f"all, median {statistics.median(t for t, _ in totals):.2f} s per model; slowest: "
            + ", ".join(f"{name} {t:.2f} s" for t, name in totals[:5]) + ". Per model in the JSON file.",
        ]  # fmt: skip
    return lines


NOTES = [
    "## Notes on the figures",
    "",
    "- Fast DBB composes the kernel of its 1x1-then-KxK branch by multiplying the two kernels, work that grows with "
    "the cube of the channel count and not with the batch or the image; the FLOP counter sees it, so its FLOP ratio "
    "in the training tables is far above 1 at small batches and images and falls as they grow.",
    "- Exact DBB computes four branches with up to six BatchNorms and an average pool: passes over full-size activations "
    "that the FLOP count does not see, which is why its step-time ratio stays well above its FLOP ratio, most of "
    "all for MobileNetV2, whose converted convs are depthwise.",
    "- The notes on ACB's implementation, written from the runs that measured its candidates, are on "
    "[their own page](benchmarks-notes.md).",
]
