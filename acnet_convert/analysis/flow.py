"""What an analysis (fx tracing or one example run) found out about how modules are used."""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field

from .reasons import Reason

EXTRA_ARGUMENTS = Reason("extra-arguments", "called with extra arguments (e.g. output_size)")  # a conv's call


@dataclass
class Flow:
    """Module use, by qualified name; filled by fx_reading.py (fx) or example_run.py (an example run)."""

    calls: list[Counter] = field(default_factory=list)  # per graph or run: module -> number of calls
    users: dict[str, list[str | None]] = field(default_factory=lambda: defaultdict(list))  # conv -> its BN, per call
    blockers: dict[str, Reason] = field(default_factory=dict)  # conv -> why its output cannot be absorbed
    bn_input: dict[str, set[str]] = field(default_factory=lambda: defaultdict(set))  # BN -> what feeds it
    unsafe: dict[str, Reason] = field(default_factory=dict)  # module -> why replacing it could change behaviour
    covered: set[str] = field(default_factory=set)  # modules this analysis can speak for

    def max_calls(self, name: str) -> int:
        """Most calls of ``name`` in any one graph or run."""
        return max((c[name] for c in self.calls), default=0)
