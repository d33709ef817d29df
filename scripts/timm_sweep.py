"""Try one model per timm family: how many eligible convs convert, how many absorb their BatchNorm, is deploy exact.

Writes docs/timm-sweep.md and docs/timm-sweep.json from the run (random weights, nothing downloaded):
``python scripts/timm_sweep.py [--families resnet,efficientnet] [--size 64]``.  Not run by the test suite.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import sys
import time
import traceback
from pathlib import Path

import timm
import torch
from torch import nn

from acnet_convert import acify, deploy, verify
from acnet_convert.blocks.registry import is_block

ROOT = Path(__file__).resolve().parent.parent
SMALL = ("atto", "femto", "pico", "nano", "tiny", "xxs", "xs", "small", "mini", "s", "b0", "18", "050", "002")


def pick(family: str) -> str | None:
    """The family's model most likely to be small: a size word in its name, then the shortest name."""
    names = timm.list_models(module=family)
    if not names:
        return None

    def rank(name: str) -> tuple[int, int, str]:
        words = re.split(r"[_.]", name)
        size = next((i for i, word in enumerate(SMALL) if word in words), len(SMALL))
        return size, len(name), name

    return min(names, key=rank)


def eligible(model: nn.Module) -> int:
    """Convs ACB applies to, counted without the library: plain Conv2d, odd sides, at least two >= 3."""
    return sum(1 for m in model.modules() if isinstance(m, nn.Conv2d) and all(k % 2 for k in m.kernel_size)
               and sum(k >= 3 for k in m.kernel_size) >= 2)  # fmt: skip


def followed_by_bn(report) -> int:
    """Converted convs whose output a BatchNorm alone receives (absorbed or not)."""
    return sum(1 for s in report.converted if s.bn or s.bn_after)


def example(model: nn.Module, size: int) -> torch.Tensor:
    """A batch at ``size``, or at the model's own input size when it takes only that (or fails at ``size``)."""
    cfg = getattr(model, "pretrained_cfg", {}) or {}
    own = cfg.get("input_size", (3, 224, 224))[-1]
    if not cfg.get("fixed_input_size"):
        x = torch.randn(2, 3, size, size)
        try:
            with torch.no_grad():
                model.eval()(x)
            return x
        except Exception:  # e.g. attention windows that need a multiple of their size: use the model's own
            pass
    return torch.randn(2, 3, own, own)


def sweep_one(name: str, size: int) -> dict:
    """Build, convert, take a train step, deploy in float64 and compare; a record of what happened."""
    record: dict = {"model": name}
    start = time.perf_counter()
    try:
        model = timm.create_model(name, pretrained=False)
        x = example(model, size)
        side = x.shape[-1]
        record.update(params=sum(p.numel() for p in model.parameters()), eligible=eligible(model), input=side)
        acified = acify(model, init="scratch", example_inputs=(x,))
        report = acified.acnet_plan
        record.update(converted=len({id(m) for m in acified.modules() if is_block(m)}),
                      absorbed=sum(1 for s in report.converted if s.bn), followed=followed_by_bn(report),
                      skipped_reasons=sorted({s.reason for s in report.skipped if s.reason})[:5])  # fmt: skip
        acified.train()
        out = acified(x)
        (out if isinstance(out, torch.Tensor) else out[0]).float().sum().backward()
        acified.zero_grad(set_to_none=True)
        acified.eval().double()
        result = verify(acified, deploy(acified), x.double(), rtol=1e-6)
        record["deploy_error"] = result.relative
    except Exception as exc:  # a family that fails is a row of the table, not the end of the sweep
        record["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"
        record["where"] = traceback.extract_tb(exc.__traceback__)[-1].name
    record["seconds"] = round(time.perf_counter() - start, 1)
    return record


def render(records: list[dict], meta: dict) -> str:
    """The markdown page."""
    ok = [r for r in records if "error" not in r]
    with_eligible = [r for r in ok if r.get("eligible")]
    full = [r for r in with_eligible if r["converted"] >= r["eligible"]]
    absorbing = [r for r in with_eligible if r["absorbed"]]
    lines = [
        "# timm sweep", "",
        "<!-- Written by scripts/timm_sweep.py from its run: rerun the script instead of editing. -->", "",
        "One model per timm family, random weights, converted with `acify(model, init=\"scratch\", "
        "example_inputs=...)`, one train step, then deployed and compared with the trained blocks in float64. "
        "*Eligible* counts the convs ACB applies to (plain `Conv2d`, odd sides, at least two >= 3), without the "
        "library; *converted* counts blocks (a shared conv is one block); *absorbed* counts convs that took their "
        "BatchNorm into the block; *BN after* counts converted convs whose output a BatchNorm alone receives.", "",
        f"- timm {meta['timm']}, torch {meta['torch']}, Python {meta['python']}; input side {meta['size']} "
        f"(fixed-size models at their own); {meta['minutes']:.1f} minutes",
        f"- families tried: {len(records)}; built, converted and deployed: {len(ok)}; with eligible convs: "
        f"{len(with_eligible)}; every eligible conv converted: {len(full)} of {len(with_eligible)}; some BatchNorm "
        f"absorbed: {len(absorbing)} of {len(with_eligible)}; errors: {len(records) - len(ok)}",
        f"- converted convs a BatchNorm alone follows: {sum(r['followed'] for r in ok)}; of them absorbed into their "
        f"block: {sum(r['absorbed'] for r in ok)}",
        f"- largest deploy error (relative, float64): "
        f"{max((r['deploy_error'] for r in ok), default=0.0):.2g}", "",
        "| family | model | eligible | converted | absorbed | BN after | deploy error | seconds | note |",
        "|---|---|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    for r in records:
        if "error" in r:
            lines.append(f"| {r['family']} | {r['model']} | | | | | | {r['seconds']} | error in {r['where']}: "
                         f"{r['error'].replace('|', '/')} |")  # fmt: skip
            continue
        note = "; ".join(r["skipped_reasons"]).replace("|", "/")[:160]
        lines.append(f"| {r['family']} | {r['model']} | {r['eligible']} | {r['converted']} | {r['absorbed']} | "
                     f"{r['followed']} | {r['deploy_error']:.1e} | {r['seconds']} | {note} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", help="comma-separated timm modules (default: all)")
    parser.add_argument("--size", type=int, default=64, help="input side for models that take any size")
    parser.add_argument("--out", default=str(ROOT / "docs" / "timm-sweep.md"))
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    families = args.families.split(",") if args.families else sorted(timm.list_modules())
    start, records = time.perf_counter(), []
    for family in families:
        name = pick(family)
        if name is None:
            continue
        record = {"family": family, **sweep_one(name, args.size)}
        print(json.dumps(record), flush=True)
        records.append(record)
    meta = {"timm": timm.__version__, "torch": torch.__version__, "python": platform.python_version(),
            "size": args.size, "minutes": (time.perf_counter() - start) / 60}  # fmt: skip
    Path(args.out).write_text(render(records, meta))
    Path(args.out).with_suffix(".json").write_text(json.dumps({"meta": meta, "records": records}, indent=1) + "\n")
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
