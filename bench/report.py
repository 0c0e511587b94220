"""A figure measured for the service and for each peer, rounds alternating, reported as
medians and ratios (this machine is noisy: the ratios are what to read)."""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field

__all__ = ["SERVICE", "Figure", "quantile", "render"]

SERVICE = "service"


def quantile(values: list[float], q: float) -> float:
    """The sample at quantile ``q`` (0-1) of ``values``, nearest rank."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


@dataclass
class Figure:
    """One figure: samples per contender (the service under :data:`SERVICE`)."""

    key: str
    name: str
    unit: str
    #: True for rates, False for latencies and costs (smaller is better).
    higher_is_better: bool = True
    target: str = ""
    samples: dict[str, list[float]] = field(default_factory=dict)
    #: Why a contender has no samples (a peer that could not be installed or started).
    skipped: dict[str, str] = field(default_factory=dict)
    #: The contender the others are compared with (the service, or e.g. the smallest log).
    reference: str = SERVICE

    def add(self, contender: str, value: float) -> None:
        self.samples.setdefault(contender, []).append(value)

    def skip(self, contender: str, reason: str) -> None:
        self.skipped[contender] = reason

    def median(self, contender: str) -> float | None:
        values = self.samples.get(contender)
        return statistics.median(values) if values else None

    def ratio(self, contender: str) -> float | None:
        """How the reference (the service) compares with ``contender``: above 1 means the
        reference is better (for latencies: the contender's median over the reference's)."""
        ours, theirs = self.median(self.reference), self.median(contender)
        if ours is None or theirs is None or ours == 0 or theirs == 0:
            return None
        return ours / theirs if self.higher_is_better else theirs / ours

    def as_json(self) -> dict[str, object]:
        return {
            "key": self.key,
            "name": self.name,
            "unit": self.unit,
            "higher_is_better": self.higher_is_better,
            "target": self.target,
            "samples": self.samples,
            "medians": {name: self.median(name) for name in self.samples},
            "reference": self.reference,
            "ratios": {name: self.ratio(name) for name in self.samples if name != self.reference},
            "skipped": self.skipped,
        }


def _number(value: float | None) -> str:
    if value is None:
        return "-"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:,.2f}"


def render(figures: list[Figure]) -> str:
    """A table: one block per figure, the reference (the service) first, then each peer with
    the ratio (reference better when > 1)."""
    lines: list[str] = []
    for figure in figures:
        better = "higher is better" if figure.higher_is_better else "lower is better"
        heading = f"{figure.name}  [{figure.unit}, {better}]"
        if figure.target:
            heading += f"  target: {figure.target}"
        lines.append(heading)
        reference = figure.reference
        contenders = [reference, *(name for name in figure.samples if name != reference)]
        for name in contenders:
            if name not in figure.samples:
                continue
            median = _number(figure.median(name))
            rounds = len(figure.samples[name])
            if name == reference:
                lines.append(f"  {name:<44} {median:>14}   (n={rounds})")
            else:
                ratio = figure.ratio(name)
                shown = "-" if ratio is None else f"{ratio:.2f}x"
                lines.append(f"  {name:<44} {median:>14}   (n={rounds})  {reference}: {shown}")
        for name, reason in figure.skipped.items():
            lines.append(f"  {name:<44} {'skipped':>14}   {reason}")
        lines.append("")
    return "\n".join(lines)
