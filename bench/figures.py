"""Figures, their spread and their targets; the table and the JSON object.

Every figure of ``python -m bench`` is a :class:`Figure`: one number (or the
reason it could not be measured), the number of samples behind it, the 10th
and 90th percentiles of those samples, the target it is judged against and
free-form details (the baseline's own numbers, the raw series). The JSON
shape is documented in ``bench/README.md``; :meth:`Figure.to_json` is the one
place that produces it.
"""

from __future__ import annotations

import logging
import math
import operator
import typing as t
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from gitplug.errors import GitplugError

__all__ = [
    "Unmeasurable",
    "Target",
    "Spread",
    "Figure",
    "FigureSpec",
    "spread",
    "quantile",
    "median_ci",
    "figure",
    "unmeasured",
    "guarded",
    "render_table",
]

logger = logging.getLogger(__name__)


class Unmeasurable(GitplugError):  # the bench's own: not a product error
    """A figure cannot be measured on this machine; the message says why and what to do."""


_OPS: dict[str, Callable[[float, float], bool]] = {
    "<=": operator.le,
    "<": operator.lt,
    ">=": operator.ge,
    ">": operator.gt,
}


@dataclass(frozen=True)
class Target:
    """``value <op> threshold``, e.g. ``Target("<=", 1.05)``."""

    op: str
    threshold: float

    def met(self, value: float | None) -> bool | None:
        """True/False, or None when there is no value to judge."""
        if value is None or math.isnan(value):
            return None
        return _OPS[self.op](value, self.threshold)

    def __str__(self) -> str:
        return f"{self.op} {self.threshold:g}"


@dataclass(frozen=True)
class Spread:
    """Order statistics of a list of samples (linear interpolation)."""

    n: int
    p10: float
    p50: float
    p90: float
    p99: float
    min: float
    max: float


def quantile(samples: Sequence[float], q: float) -> float:
    """The ``q`` quantile (0..1) of ``samples``, interpolated linearly.

    Infinite samples (timeouts) sort last, so a p99 over them is infinite.
    """
    if not samples:
        raise ValueError("quantile of no samples")
    ordered = sorted(samples)
    pos = (len(ordered) - 1) * q
    low = math.floor(pos)
    high = min(low + 1, len(ordered) - 1)
    frac = pos - low
    if frac == 0 or ordered[high] == ordered[low]:
        return ordered[low]
    if math.isinf(ordered[high]):
        return ordered[high]
    return ordered[low] + (ordered[high] - ordered[low]) * frac


def median_ci(samples: Sequence[float], level: float = 0.95) -> tuple[float, float] | None:
    """A distribution-free confidence interval of the median: two order statistics.

    The widest ``(x_k, x_n-k+1)`` whose coverage (binomial, p = 1/2) is at
    least ``level``; None when there are too few samples for it (fewer than 6
    at 95 %). Nothing is assumed about the samples' distribution, which on
    a shared machine has long tails.
    """
    n = len(samples)
    ordered = sorted(samples)
    best = None
    for k in range(1, n // 2 + 1):
        # P(x_k <= median <= x_{n-k+1}) = 1 - 2 * P(Binomial(n, 1/2) < k)
        below = sum(math.comb(n, i) for i in range(k)) / 2**n
        if 1 - 2 * below < level:
            break
        best = (ordered[k - 1], ordered[n - k])
    return best


def spread(samples: Sequence[float]) -> Spread:
    """Summarise ``samples`` (at least one)."""
    return Spread(
        n=len(samples),
        p10=quantile(samples, 0.10),
        p50=quantile(samples, 0.5),
        p90=quantile(samples, 0.90),
        p99=quantile(samples, 0.99),
        min=min(samples),
        max=max(samples),
    )


@dataclass(frozen=True)
class Figure:
    """One measured figure, or the reason it could not be measured.

    ``value`` is None exactly when ``error`` says why.
    """

    key: str
    title: str
    unit: str
    #: None for a figure that is reported, not judged.
    target: Target | None
    value: float | None = None
    n: int = 0
    p10: float | None = None
    p90: float | None = None
    baseline: str | None = None
    note: str | None = None
    error: str | None = None
    detail: Mapping[str, t.Any] = field(default_factory=dict)
    #: 95 % confidence interval of ``value`` when it is a median of samples (:func:`median_ci`).
    ci95: tuple[float, float] | None = None

    @property
    def met(self) -> bool | None:
        return self.target.met(self.value) if self.target is not None else None

    @property
    def settled(self) -> bool | None:
        """Whether noise could not flip :attr:`met`: both ends of :attr:`ci95` agree with it.

        None without a verdict or without an interval (too few samples, or a
        value that is not a median).
        """
        if self.target is None or self.met is None or self.ci95 is None:
            return None
        return self.target.met(self.ci95[0]) == self.met == self.target.met(self.ci95[1])

    def to_json(self) -> dict[str, t.Any]:
        return {
            "value": _num(self.value),
            "unit": self.unit,
            "n": self.n,
            "p10": _num(self.p10),
            "p90": _num(self.p90),
            "target": None if self.target is None else str(self.target),
            "met": self.met,
            "ci95": None if self.ci95 is None else [_num(self.ci95[0]), _num(self.ci95[1])],
            "settled": self.settled,
            "baseline": self.baseline,
            "note": self.note,
            "error": self.error,
            "detail": _jsonable(self.detail),
        }


#: ``(key, title, unit, target)``: what a figure is, before it is measured.
FigureSpec = tuple[str, str, str, Target | None]


def figure(spec: FigureSpec, **kwargs: t.Any) -> Figure:
    """A measured figure of ``spec``; ``kwargs`` are :class:`Figure` fields."""
    key, title, unit, target = spec
    return Figure(key=key, title=title, unit=unit, target=target, **kwargs)


def unmeasured(key: str, title: str, unit: str, target: Target | None, why: str, **extra: t.Any) -> Figure:
    """A figure that could not be measured, saying why."""
    return Figure(key=key, title=title, unit=unit, target=target, error=why, **extra)


def guarded(keys: Sequence[FigureSpec], run: Callable[[], list[Figure]]) -> list[Figure]:
    """Run ``run``; if it fails, every figure it owed says why instead of a number.

    ``keys`` lists ``(key, title, unit, target)`` of the figures ``run`` returns.
    """
    try:
        return run()
    except Unmeasurable as exc:
        why = str(exc)
    except Exception as exc:  # noqa: BLE001 - one broken figure must not hide the others
        logger.exception("bench: measuring %s failed", ", ".join(k for k, *_ in keys))
        why = f"{type(exc).__name__}: {exc}"
    return [unmeasured(key, title, unit, target, why) for key, title, unit, target in keys]


def _num(value: float | None) -> float | str | None:
    """JSON has no infinity: a timeout is the string "inf"."""
    if value is None:
        return None
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return round(value, 6)


def _jsonable(value: t.Any) -> t.Any:
    if isinstance(value, float):
        return _num(value)
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


# --------------------------------------------------------------------------- the table


def _fmt(value: float | None, unit: str) -> str:
    if value is None:
        return "-"
    if math.isinf(value):
        return "inf"
    if unit == "ms":
        return f"{value:.1f}"
    if unit in ("s", "MiB"):
        return f"{value:.3f}"
    return f"{value:.3f}" if abs(value) < 100 else f"{value:.0f}"


def render_table(figures: Sequence[Figure], meta: Mapping[str, t.Any]) -> str:
    """The human-readable table (one line per figure, then notes and errors)."""
    header = ("figure", "value", "unit", "target", "met", "n", "p10", "p90")
    rows = [header]
    for fig in figures:
        met = {True: "yes", False: "NO", None: "-"}[fig.met]
        if fig.settled is False:
            met = "~" + met  # the median's 95 % interval straddles the target
        rows.append(
            (
                fig.key,
                _fmt(fig.value, fig.unit) if fig.error is None else "n/a",
                fig.unit,
                "-" if fig.target is None else str(fig.target),
                met,
                str(fig.n),
                _fmt(fig.p10, fig.unit),
                _fmt(fig.p90, fig.unit),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = [
        f"gitplug bench ({meta.get('mode')}) {meta.get('date')}  python {meta.get('python')}"
        f"  nproc {meta.get('nproc')}  load avg {meta.get('loadavg_start')} -> {meta.get('loadavg_end')}"
        f"  {meta.get('duration_s')} s",
        "",
    ]
    for i, row in enumerate(rows):
        lines.append("  ".join(cell.ljust(widths[j]) if j in (0, 2, 3) else cell.rjust(widths[j]) for j, cell in enumerate(row)).rstrip())
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    notes = [(fig.key, fig.baseline, fig.note, fig.error) for fig in figures]
    lines.append("")
    if any(fig.settled is False for fig in figures):
        lines.append("~: the median's 95 % confidence interval straddles the target: noise can flip"
                     " this verdict; a full run (more samples) decides")
        lines.append("")
    for key, baseline, note, error in notes:
        if error:
            lines.append(f"{key}: NOT MEASURED: {error}")
            continue
        parts = [p for p in (f"baseline: {baseline}" if baseline else None, note) if p]
        if parts:
            lines.append(f"{key}: {'; '.join(parts)}")
    return "\n".join(lines)
