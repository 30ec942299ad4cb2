"""``python -m bench [--quick] [--json] [--only KEY,...] [--keep] [-v]``.

Runs every figure (in-process ones first, then the gunicorn ones), prints the
table on stdout, or with ``--json`` one JSON object on stdout and the table on
stderr (the shape is in ``bench/README.md``). Progress goes to stderr. Exit status 0 whether or not
targets are met (the table says which); 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import logging
import os
import platform
import shutil
import signal
import sys
import tempfile
import time
import typing as t
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from . import canary, fleet, inprocess, live, memory, staging, underload
from .figures import Figure, FigureSpec, guarded, render_table
from .fixtures import REPO_ROOT
from .site import LivePlan

__all__ = ["Plan", "QUICK", "FULL", "KEYS", "run", "main"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Plan:
    """How many samples each figure takes in one mode."""

    mode: str
    overhead_rounds: int
    overhead_per_round: int
    scale_plugins: int
    scale_rounds: int
    scale_per_round: int
    swap_samples: int
    rss_warmup: int
    rss_cycles: int
    rss_window: int
    leak_timer_cycles: int
    live: LivePlan
    #: Deploys of ``fleet_convergence_s_p99`` (3 hosts on PostgreSQL).
    fleet_samples: int
    #: ``release_rss_mib``: fresh processes per kind, and extra releases loaded in each.
    memory_runs: int = 1
    memory_releases: int = 10
    #: Rounds of ``stage_full_ratio`` and ``stage_incr_s`` (5,000 files each).
    staging_rounds: int = 5


QUICK = Plan(
    mode="quick", overhead_rounds=20, overhead_per_round=200, scale_plugins=100, scale_rounds=15,
    scale_per_round=200, swap_samples=40, rss_warmup=50, rss_cycles=200, rss_window=25,
    leak_timer_cycles=0,
    # 10 HUP rounds (about 0.5 s each): enough for a 95 % interval of the median.
    live=LivePlan(hup_samples=10, webhook_samples=3, load_pairs=4),
    fleet_samples=5, memory_runs=1, memory_releases=10, staging_rounds=3,
)
FULL = Plan(
    mode="full", overhead_rounds=60, overhead_per_round=500, scale_plugins=100, scale_rounds=40,
    scale_per_round=500, swap_samples=300, rss_warmup=100, rss_cycles=1000, rss_window=100,
    leak_timer_cycles=200,
    live=LivePlan(hup_samples=20, webhook_samples=10, load_pairs=20),
    fleet_samples=20, memory_runs=3, memory_releases=20, staging_rounds=9,
)

#: Every figure, in the order of the table: ``(key, title, unit, target)``.
FIGURES = (
    inprocess.OVERHEAD, inprocess.SWAP_P50, inprocess.SWAP_P99, live.RESTART, live.WEBHOOK,
    underload.THROUGHPUT, underload.CONVERGENCE, fleet.FLEET, inprocess.RSS, inprocess.SCALE,
    memory.RELEASE_RSS, canary.CANARY,
    staging.STAGE_FULL, staging.STAGE_INCR, staging.PUSH_LIVE,
)
KEYS = tuple(spec[0] for spec in FIGURES)


def _say(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _step(specs: Sequence[FigureSpec], run: Callable[[], list[Figure]], only: set[str]) -> list[Figure]:
    keys = [s[0] for s in specs]
    if not only & set(keys):
        return []
    _say(f"measuring {', '.join(keys)}")
    started = time.perf_counter()
    figures = guarded(specs, run)
    _say(f"  done in {time.perf_counter() - started:.1f} s: " + ", ".join(
        f"{f.key}={'n/a' if f.value is None else f'{f.value:.4g}'}" for f in figures))
    return figures


def run(plan: Plan, *, only: set[str], workdir: Path) -> tuple[dict[str, Figure], dict[str, t.Any]]:
    """Measure the figures in ``only``; return them by key, and the run's metadata."""
    started = time.perf_counter()
    meta = _machine(plan)
    figures: dict[str, Figure] = {}

    def add(found: list[Figure]) -> None:
        figures.update((f.key, f) for f in found)

    add(_step([inprocess.OVERHEAD], lambda: inprocess.measure_overhead(
        rounds=plan.overhead_rounds, per_round=plan.overhead_per_round), only))
    add(_step([canary.CANARY], lambda: canary.measure_canary(
        rounds=plan.overhead_rounds, per_round=plan.overhead_per_round), only))
    add(_step([inprocess.SCALE], lambda: inprocess.measure_scale(
        plugins=plan.scale_plugins, rounds=plan.scale_rounds, per_round=plan.scale_per_round), only))
    add(_step([inprocess.SWAP_P50, inprocess.SWAP_P99], lambda: inprocess.measure_swap(
        samples=plan.swap_samples), only))
    add(_step([inprocess.RSS], lambda: inprocess.measure_rss(
        warmup=plan.rss_warmup, cycles=plan.rss_cycles, window=plan.rss_window), only))
    add(_step([memory.RELEASE_RSS], lambda: memory.measure_release_rss(
        runs=plan.memory_runs, releases=plan.memory_releases, plugins=plan.scale_plugins), only))
    add(_step([live.RESTART], lambda: [live.measure_restart(plan.live, workdir)], only))
    add(_step([live.WEBHOOK, underload.THROUGHPUT, underload.CONVERGENCE],
              lambda: live.measure_served(plan.live, workdir), only))
    add(_step([fleet.FLEET], lambda: [fleet.measure_fleet(workdir, samples=plan.fleet_samples)], only))
    add(_step([staging.STAGE_FULL, staging.STAGE_INCR], lambda: staging.measure_staging(
        workdir, rounds=plan.staging_rounds), only))
    add(_step([staging.PUSH_LIVE], lambda: [staging.measure_push_to_live(plan.live, workdir)], only))
    if plan.leak_timer_cycles and "rss_growth_mib_1000" in figures and figures["rss_growth_mib_1000"].error is None:
        # Last: the timers it starts fire 30 s later, in this process.
        _say(f"measuring the shipped leak-report timer over {plan.leak_timer_cycles} reloads")
        try:
            extra = inprocess.measure_default_leak_timers(cycles=plan.leak_timer_cycles)
        except Exception as exc:  # noqa: BLE001 - a side measurement, never fatal
            extra = {"error": f"{type(exc).__name__}: {exc}"}
        rss = figures["rss_growth_mib_1000"]
        figures[rss.key] = dataclasses.replace(rss, detail={**rss.detail, "shipped_leak_timer": extra})
    meta["duration_s"] = round(time.perf_counter() - started, 1)
    meta["loadavg_end"] = _loadavg()
    return {k: figures[k] for k in KEYS if k in figures and k in only}, meta


# --------------------------------------------------------------------------- metadata


def _loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def _cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _commit() -> str | None:
    try:
        from dulwich.repo import Repo

        with Repo(str(REPO_ROOT)) as repo:
            return repo.head().decode()[:12]
    except Exception:  # noqa: BLE001 - not a git checkout: no commit to report
        return None


def _machine(plan: Plan) -> dict[str, t.Any]:
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "mode": plan.mode,
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "nproc": affinity,
        "cpu": _cpu_model(),
        "platform": platform.platform(),
        "loadavg_start": _loadavg(),
        "gitplug_commit": _commit(),
        "versions": {d: _version(d) for d in ("gitplug", "flask", "werkzeug", "gunicorn", "dulwich", "psutil")},
    }


# --------------------------------------------------------------------------- entry point


def _raise_interrupt(signum: int, frame: t.Any) -> None:
    raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="gitplug's figures against their baselines (see bench/README.md).",
    )
    parser.add_argument("--quick", action="store_true", help="fewer rounds, shorter runs (about 70 s on 2 cores)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    parser.add_argument("--only", default="", help=f"comma-separated keys to measure (default all): {', '.join(KEYS)}")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (servers' logs, repositories)")
    parser.add_argument("-v", "--verbose", action="store_true", help="log gitplug's INFO messages to stderr")
    args = parser.parse_args(argv)
    only = {k.strip() for k in args.only.split(",") if k.strip()} or set(KEYS)
    unknown = only - set(KEYS)
    if unknown:
        parser.error(f"unknown figure(s) {', '.join(sorted(unknown))}; choose from {', '.join(KEYS)}")
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    plan = QUICK if args.quick else FULL
    # SIGTERM and SIGHUP unwind like Ctrl+C, so every server the bench started is
    # stopped by its context manager on that path out too.
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _raise_interrupt)
    workdir = Path(tempfile.mkdtemp(prefix="gitplug-bench-"))
    try:
        figures, meta = run(plan, only=only, workdir=workdir)
    finally:
        if args.keep:
            _say(f"work directory kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    table = render_table(list(figures.values()), meta)
    if args.json:
        print(table, file=sys.stderr)  # for the human watching; stdout stays pure JSON
        print(json.dumps({"meta": meta, **{k: f.to_json() for k, f in figures.items()}}, indent=2))
    else:
        print(table)
    return 0
