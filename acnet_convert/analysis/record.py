"""The plan's record: one ``Site`` per conv, its dict form (what checkpoints and ``--json`` store) and its text."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field, fields

from ..errors import ACNetError
from .reasons import OTHER, Reason


@dataclass
class Site:
    """One conv of the model and what acify does with it; converted sites carry all that rebuilding needs."""

    name: str
    kernel: tuple[int, ...]
    stride: tuple[int, ...]
    groups: int
    action: str  # "convert", "skip" or "done" (already a block)
    reason: str = ""  # the text of every part of the reason, joined by "; "
    bn: str | None = None  # the BatchNorm absorbed into the block, if any
    conv_type: str = "Conv2d"
    branches: str = ""  # the block's branches, e.g. "3x3 + 3x1 + 1x3"
    kind: str | None = None  # the block kind ("acb", "dbb", ...); None for a skipped conv
    mode: str | None = None  # "exact", "fast" or "repopt"; None for a skipped conv
    layout: str = "lines"  # the block's branch arrangement option (ACB's 3D lines or planes)
    options: dict[str, int] = field(default_factory=dict)  # the block kind's options (e.g. MobileOne's k), all set
    aliases: list[str] = field(default_factory=list)  # other names the same conv is registered under
    bn_aliases: list[str] = field(default_factory=list)  # other names of the absorbed BatchNorm
    bn_after: str | None = None  # a BatchNorm that alone receives this conv's output but stays in the model
    conv_bias: bool = False  # whether the original conv has a bias
    bn_eps: float | None = None  # the absorbed BatchNorm's eps
    bn_affine: bool = True  # whether the absorbed BatchNorm has gamma and beta
    adapter: str | None = None  # the conv class whose own padding the block repeats (see adapters.py)
    evidence: str = ""  # "fx", "example run" or "source": what the decision rests on
    codes: list[str] = field(default_factory=list)  # the stable code of every part of the reason, in order
    scales: dict[str, list[float]] = field(default_factory=dict)  # repopt: each CSLA branch's constant scales

    @property
    def code(self) -> str:
        """The code of the reason's first part, or '' for a site without a reason."""
        return self.codes[0] if self.codes else ""

    @property
    def names(self) -> list[str]:
        """Every qualified name the conv is registered under."""
        return [self.name, *self.aliases]

    def explain(self, *reasons: Reason) -> None:
        """Record ``reasons`` as this site's reason, in order."""
        self.reason = "; ".join(r.text for r in reasons)
        self.codes = [r.code for r in reasons]

    def as_dict(self) -> dict:
        """The site as JSON-ready values; ``options`` only where the kind has some, ``scales`` only where a repopt site
        has them (a 0.2.0 site has neither)."""
        return {key: list(value) if isinstance(value, tuple) else value for key, value in self.__dict__.items()
                if key not in ("options", "scales") or value}  # fmt: skip

    @classmethod
    def from_dict(cls, data: Mapping) -> Site:
        """The site ``as_dict`` recorded; one recorded without codes (0.2.0) has ``other`` for a reason."""
        known = {f.name for f in fields(cls)}
        values = {key: value for key, value in data.items() if key in known}
        for key in ("kernel", "stride"):
            values[key] = tuple(values[key])
        values.setdefault("codes", [OTHER] if values.get("reason") else [])
        return cls(**values)


@dataclass
class Plan:
    """Every conv site of a model with the decision taken for it."""

    sites: list[Site] = field(default_factory=list)
    trace_failures: dict[str, str] = field(default_factory=dict)  # module name -> why fx could not trace it

    @property
    def converted(self) -> list[Site]:
        return [s for s in self.sites if s.action == "convert"]

    @property
    def skipped(self) -> list[Site]:
        return [s for s in self.sites if s.action == "skip"]

    @property
    def input_dependent(self) -> list[str]:
        """Converted convs whose decision rests on the example run, so a different input could change it."""
        return [s.name for s in self.converted if s.evidence == "example run"]

    def summary(self) -> str:
        absorbed = sum(1 for s in self.converted if s.bn)
        done = len(self.sites) - len(self.converted) - len(self.skipped)
        kinds = Counter(f"{s.kind} {s.mode}" for s in self.converted)
        by_kind = f" as {', '.join(f'{n} {k}' for k, n in kinds.items())}" if len(kinds) > 1 else ""
        by_input = f"; {len(self.input_dependent)} decided by the example run" if self.input_dependent else ""
        return (
            f"{len(self.sites)} conv sites: {len(self.converted)} converted{by_kind} ({absorbed} with their "
            f"BatchNorm), {len(self.skipped)} skipped, {done} already converted{by_input}"
        )

    def to_dict(self) -> dict:
        """A JSON-ready record of every decision (what checkpoints store)."""
        return {"sites": [site.as_dict() for site in self.sites], "trace_failures": dict(self.trace_failures)}

    @classmethod
    def from_dict(cls, data: Mapping) -> Plan:
        """The plan ``to_dict`` recorded."""
        try:
            sites = [Site.from_dict(site) for site in data["sites"]]
        except (KeyError, TypeError, ValueError) as exc:
            raise ACNetError(f"the recorded plan is damaged ({exc}): write the checkpoint again") from exc
        return cls(sites, dict(data.get("trace_failures", {})))

    def __str__(self) -> str:
        rows = [f"{s.action:8} {s.name or '<root>'}  {s.conv_type} k={s.kernel} s={s.stride} g={s.groups}"
                + (f"  {s.kind}/{s.mode} [{s.branches}]" if s.kind else "") + (f"  +bn {s.bn}" if s.bn else "")
                + (f"  ({s.reason})" if s.reason else "") for s in self.sites]  # fmt: skip
        return "\n".join([*rows, self.summary()])
