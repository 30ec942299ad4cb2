"""The release report, imported lazily by ``views.report_page``.

Lazy imports inside functions work unchanged under gitplug: the import is
resolved within the release that serves the request. Note that gitplug
still compiles and imports every module of the package before a release goes
live, so a broken module fails the deploy instead of the first request.
"""

from __future__ import annotations

from dataclasses import dataclass

from .stats import Summary

__all__ = ["Report", "NameShare", "build"]


@dataclass(frozen=True)
class NameShare:
    name: str
    count: int
    #: Percentage of all greetings, 0-100, for the bar chart.
    percent: int


@dataclass(frozen=True)
class Report:
    started_at: str
    uptime_s: float
    greetings: int
    per_minute: float
    names: tuple[NameShare, ...]


def build(summary: Summary) -> Report:
    """Turn raw counters into what the report page shows."""
    total = summary.greetings
    # Over the first minute the rate is simply the count: no 60/min after one second.
    minutes = max(summary.uptime_s / 60.0, 1.0)
    names = tuple(
        NameShare(name=name, count=count, percent=round(100 * count / total) if total else 0)
        for name, count in summary.top_names
    )
    return Report(
        started_at=summary.started_at.strftime("%Y-%m-%d %H:%M:%S UTC"),
        uptime_s=summary.uptime_s,
        greetings=total,
        per_minute=round(total / minutes, 2),
        names=names,
    )
