"""Results of a benchmark run: rows of medians with their per-round values and targets, rendered
as one markdown table per benchmark (printed, and written to a file for docs/benchmarks.md)."""

from __future__ import annotations

import operator
import statistics
import textwrap
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

_COMPARE = {
    "<": (operator.lt, "<"),
    "<=": (operator.le, "≤"),
    ">": (operator.gt, ">"),
    ">=": (operator.ge, "≥"),
}


@dataclass(frozen=True)
class Target:
    """A goal for a figure: `op` ("<", "<=", ">" or ">=") `limit`; `stretch` marks a
    nice-to-have."""

    op: str
    limit: float
    stretch: bool = False

    def met(self, value: float) -> bool:
        """Whether `value` reaches the goal."""
        return _COMPARE[self.op][0](value, self.limit)

    def __str__(self) -> str:
        text = f"{_COMPARE[self.op][1]} {self.limit:g}"
        return f"{text} (stretch)" if self.stretch else text


@dataclass(frozen=True)
class Row:
    """One figure: the median of `values` (one per round, or one in all), in `unit`."""

    measure: str
    values: Sequence[float]
    unit: str = ""
    target: Target | None = None
    digits: int = 2

    @property
    def median(self) -> float:
        """The median of the values."""
        return statistics.median(self.values)

    @property
    def verdict(self) -> str:
        """Whether the median reaches the target: met, missed, or empty without a target."""
        if self.target is None:
            return ""
        return "met" if self.target.met(self.median) else "**missed**"

    def cells(self) -> list[str]:
        """The table cells: measure, median, unit, per-round values, target, verdict."""
        each = ", ".join(self._format(v) for v in self.values) if len(self.values) > 1 else ""
        target = str(self.target) if self.target else ""
        return [self.measure, self._format(self.median), self.unit, each, target, self.verdict]

    def _format(self, value: float) -> str:
        return f"{value:,.{self.digits}f}"


@dataclass
class Section:
    """The results of one benchmark: what ran (`setup`), its rows, and notes on what was seen."""

    title: str
    setup: str
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0


HEADER = ["measure", "median", "unit", "per round", "target", "verdict"]
WIDTH = 100  # prose is wrapped here; table rows are not


def wrap(text: str, indent: str = "") -> str:
    """`text` wrapped at WIDTH, continuation lines indented by `indent`."""
    return textwrap.fill(text, WIDTH, subsequent_indent=indent, break_on_hyphens=False)


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """A markdown table with columns padded to line up in a terminal too."""
    rows = [list(header), *map(list, rows)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = [
        "| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |"
        for row in rows
    ]
    lines.insert(1, "| " + " | ".join("-" * w for w in widths) + " |")
    return "\n".join(lines)


def render_section(section: Section) -> str:
    """The markdown of one section: heading, setup, table, notes."""
    parts = [f"## {section.title}", "", wrap(section.setup), ""]
    parts.append(markdown_table(HEADER, (row.cells() for row in section.rows)))
    if section.notes:
        parts += ["", *(wrap(f"- {note}", "  ") for note in section.notes)]
    if section.seconds:
        parts += ["", f"_Took {section.seconds:.0f} s._"]
    return "\n".join(parts)


def render(title: str, preamble: Sequence[str], sections: Iterable[Section]) -> str:
    """The whole report: a title, preamble lines, then each section."""
    parts = [f"# {title}", "", *(wrap(line, "  ") for line in preamble)]
    for section in sections:
        parts += ["", render_section(section)]
    return "\n".join(parts) + "\n"
