"""Results as the command line shows them: the plan, the comparisons, the quantisation table, and their verdicts."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING

from rich import box
from rich.table import Column, Table

from ..errors import ACNetError, VerificationError
from .session import Session, check_record

if TYPE_CHECKING:
    from torch import nn

    from ..analysis import Plan
    from ..checks.verify import Comparison
    from .examples import Examples


def report_plan(session: Session, plan: Plan, title: str) -> None:
    """The per-site decisions: a table, or the JSON record's sites (each with its reason's stable code)."""
    session.record.update(
        summary=plan.summary(),
        sites=[{**site.as_dict(), "code": site.code, "codes": site.codes} for site in plan.sites],
        trace_failures=dict(plan.trace_failures),
    )
    headers = ["kernel", "stride", "groups", "kind", folding("branches"), folding("absorbs BN"), "action"]
    table = Table(folding("conv"), "type", *headers, folding("why"), box=box.SIMPLE, title=title)
    for s in plan.sites:
        kind = f"{s.kind} {s.mode}" if s.kind else "-"
        shape = (_shape_text(s.kernel), _shape_text(s.stride), str(s.groups), kind, s.branches or "-", s.bn or "-")
        table.add_row(s.name or "<root>", s.conv_type, *shape, s.action, s.reason)
    session.table(table)
    session.say(plan.summary())
    for module, why in plan.trace_failures.items():
        session.warn(f"torch.fx could not trace {module or '<root>'} ({why})")


def nothing_converted(plan: Plan) -> str:
    """Why no conv was converted: the count of each reason, and what to change."""
    if not plan.sites:
        return "the model has no Conv2d, Conv3d or ConvTranspose2d to convert: check the spec"
    reasons = Counter(site.reason for site in plan.sites if site.action == "skip")
    listing = "; ".join(f"{count} x {reason}" for reason, count in reasons.most_common(3))
    return (
        f"no conv was converted ({len(plan.sites)} conv sites: {listing}): change --include, --exclude, --block or "
        "--min-kernel/--max-kernel, or pass --allow-empty to write the checkpoint anyway"
    )


def report_rows(
    session: Session, rows: dict[str, Comparison], spec: str, examples: Examples, rtol: float,
    cause: Callable[[str], str] | None = None,
) -> None:  # fmt: skip
    """The worst error of every layer and output, as a table and as checks; ``VerificationError`` on a mismatch,
    ending with ``cause(worst row)`` when given."""
    from ..files.inputs import shape_text

    real = f" and the inputs from {examples.source}" if examples.real else ""
    title = f"{spec}: worst over random inputs of shape {shape_text(examples.shapes)}{real}"
    table = Table(folding("layer"), "max abs error", "max |ref|", "relative", "", box=box.SIMPLE, title=title)
    for name, c in rows.items():
        status = "ok" if c.relative <= rtol else "[bold red]MISMATCH[/]"
        table.add_row(name, f"{c.max_abs:.3g}", f"{c.max_ref:.3g}", f"{c.relative:.3g}", status)
        session.record["checks"].append(check_record(name, c, rtol))
    session.table(table)
    failed = [name for name, c in rows.items() if c.relative > rtol]
    if failed:
        worst = max(failed, key=lambda name: rows[name].relative)
        why = (cause and cause(worst)) or (
            "deploy or export the checkpoint again, and check it was saved from the trained model")  # fmt: skip
        raise VerificationError(
            f"{len(failed)} of {len(rows)} comparisons exceed rtol={rtol:g} (worst: {worst}, relative "
            f"{rows[worst].relative:.3g}): {why}"
        )
    session.say(f"all {len(rows)} comparisons within rtol={rtol:g}")


def raise_failed(session: Session) -> None:
    """``VerificationError`` naming the first recorded check that exceeds its tolerance."""
    from ..files.export_check import check_failure

    if session.failed:
        raise check_failure(*session.failed[0])


def keep_worst(rows: dict[str, Comparison], new: dict[str, Comparison]) -> None:
    """Keep, for each name, the comparison with the largest relative error."""
    for name, comparison in new.items():
        if name not in rows or comparison.relative > rows[name].relative:
            rows[name] = comparison


def report_quant_table(session: Session, rows: list[list[str]], title: str) -> None:
    """The quantisation report's rows (headers first) as a table; layer names are never wrapped or cut."""
    names = Column(rows[0][0], no_wrap=True, min_width=max(len(row[0]) for row in rows))
    table = Table(names, *(folding(header) for header in rows[0][1:]), box=box.SIMPLE, title=title)
    for row in rows[1:]:
        table.add_row(*row)
    session.table(table)


def quant_summary(session: Session, deployed: nn.Module) -> None:
    """One line on how the deployed weights will quantise."""
    import warnings

    from ..checks.quant import quant_report

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            summary = quant_report(deployed, ptq=False).summary()
    except ACNetError as exc:
        session.note(f"no quantisation summary: {exc}")
        return
    session.record["quant_summary"] = summary
    session.say(f"quantisation: {summary} (details: acnet quantcheck)")


def folding(header: str) -> Column:
    """A column of names: wrapped rather than cut short when the table is too wide."""
    return Column(header, overflow="fold")


def _shape_text(shape: tuple[int, ...]) -> str:
    return "x".join(map(str, shape))
