"""Throughput while swapping, and convergence of the workers, under one steady load.

One :mod:`bench.loadgen` process (4 keep-alive connections, ``GET
/hello/api/greeting?name=Ada``) runs for the whole measurement and counts
its 2xx answers in 50 ms bins. The time is cut into windows of
``window_s`` (2.25 s); pairs of windows alternate in ABBA order between
*still* (no swap) and *swapping* (a rollback API call, ``POST
/_gitplug/api/plugins/hello/rollback``, every 0.5 s, alternating between the
two newest commits: a swap from disk, no fetch, no test). The first
``guard_s`` (0.25 s) of every window is not counted, so the tail of a swap
that spills over never lands on a still window. Short, adjacent windows
cancel the slow drift of a shared machine far better than long rounds.

* ``throughput_ratio_during_swaps``: per pair, req/s of the swapping window /
  req/s of the still window; the median over pairs.
* ``convergence_s_p99``: for every swap, the time between the first worker
  publishing it (the one that ran the deploy) and the last worker publishing
  it, or a newer release if it skipped this one; from the workers'
  ``plugin_loaded`` events (:mod:`bench.apps`). A swap whose API call did not
  answer 200, or that no worker was seen publishing, or that some worker never
  published, is a failure: an infinite sample (so a p99 over >= 1 % failures is
  ``inf``), counted in ``detail.failed_swaps``.

The workers' CPU time is sampled at every window boundary:
``detail.workers_cpu_ms_per_swap_p50`` is, per pair, the swapping window's
worker CPU minus what its requests cost at the still window's CPU per
request, divided by its swaps.
"""

from __future__ import annotations

import json
import logging
import math
import subprocess
import sys
import time
import typing as t
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from .figures import Figure, FigureSpec, Target, Unmeasurable, figure, spread
from .fixtures import REPO_ROOT
from .site import LivePlan, Site

__all__ = ["THROUGHPUT", "CONVERGENCE", "LOAD_PATH", "measure_under_load"]

logger = logging.getLogger(__name__)

THROUGHPUT: FigureSpec = (
    "throughput_ratio_during_swaps", "req/s while swapping every 0.5 s / req/s without", "ratio", Target(">=", 0.95))
CONVERGENCE: FigureSpec = (
    "convergence_s_p99", "first -> last worker serving a new release, p99", "s", Target("<", 0.5))

LOAD_PATH = "/hello/api/greeting?name=Ada"
BIN_S = 0.05
WARMUP_S = 1.0


@dataclass(frozen=True)
class Swap:
    """One rollback API call: when it was sent (Unix time), to what, and how it went."""

    sent: float
    commit: str
    status: int
    took_s: float


@dataclass(frozen=True)
class Window:
    """One window of the load: its kind, its span (Unix time) and the workers' CPU in it."""

    kind: str
    start: float
    end: float
    workers_cpu_s: float
    swaps: int


def _cpu_s(pids: Iterable[int]) -> float:
    """User + system CPU seconds used so far by ``pids`` (a process gone counts 0)."""
    import psutil

    total = 0.0
    for pid in pids:
        try:
            times = psutil.Process(pid).cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += times.user + times.system
    return total


def _kinds(pairs: int) -> list[str]:
    """ABBA: still, swapping, swapping, still, still, swapping, ..."""
    out: list[str] = []
    for pair in range(pairs):
        out += ["still", "swapping"] if pair % 2 == 0 else ["swapping", "still"]
    return out


def measure_under_load(plan: LivePlan, site: Site, commits: Sequence[str]) -> tuple[Figure, Figure]:
    """``throughput_ratio_during_swaps`` and ``convergence_s_p99`` on ``site``."""
    if len(commits) < 2:
        raise Unmeasurable("throughput and convergence need two deployed commits (the webhook figure makes them)")
    kinds = _kinds(plan.load_pairs)
    duration = WARMUP_S + len(kinds) * plan.window_s + 1.0
    argv = [sys.executable, "-m", "bench.loadgen", "--port", str(site.server.port), "--path", LOAD_PATH,
            "--duration", str(duration), "--connections", str(plan.connections), "--bin", str(BIN_S),
            "--announce"]
    workers = site.server.worker_pids()
    proc = subprocess.Popen(argv, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        started = json.loads(proc.stdout.readline() or "null")
        if not isinstance(started, dict):
            raise Unmeasurable(f"the load generator did not start: {proc.stderr.read()[-500:] if proc.stderr else ''}")
        windows, swaps = _run_windows(plan, site, kinds, list(commits), workers)
        out, err = proc.communicate(timeout=duration + 60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if proc.returncode != 0:
        raise Unmeasurable(f"the load generator failed ({proc.returncode}): {err.strip()[-500:]}")
    load = json.loads(out.strip().splitlines()[-1])
    return _throughput_figure(plan, windows, swaps, load), _convergence_figure(plan, site, swaps, workers)


def _run_windows(
    plan: LivePlan, site: Site, kinds: list[str], commits: list[str], workers: set[int]
) -> tuple[list[Window], list[Swap]]:
    # Let the connections and the workers' threads warm up before the first window.
    time.sleep(WARMUP_S)
    wall0, base = time.time(), time.perf_counter()
    windows: list[Window] = []
    swaps: list[Swap] = []
    index = 1  # commits[0] is live: the first swap goes to commits[1]
    cpu = _cpu_s(workers)
    for w, kind in enumerate(kinds):
        start = base + w * plan.window_s
        end = start + plan.window_s
        done = 0
        if kind == "swapping":
            at = start + plan.guard_s
            while at < end - 1e-9:
                time.sleep(max(0.0, at - time.perf_counter()))
                commit = commits[index % len(commits)]
                index += 1
                sent, t0 = time.time(), time.perf_counter()
                status = site.rollback(commit)
                swaps.append(Swap(sent, commit, status, time.perf_counter() - t0))
                done += 1
                at += plan.swap_every_s
        time.sleep(max(0.0, end - time.perf_counter()))
        now_cpu = _cpu_s(workers)
        windows.append(Window(kind, wall0 + w * plan.window_s, wall0 + (w + 1) * plan.window_s,
                              now_cpu - cpu, done))
        cpu = now_cpu
    return windows, swaps


def _count(load: dict[str, t.Any], start: float, end: float) -> tuple[int, float]:
    """2xx answers in the bins entirely inside ``[start, end]``, and the seconds they span."""
    t0, bin_s, bins = float(load["t0"]), float(load["bin_s"]), load["bins"]
    first = max(0, math.ceil((start - t0) / bin_s - 1e-9))
    last = min(len(bins), math.floor((end - t0) / bin_s + 1e-9))
    if last <= first:
        return 0, 0.0
    return sum(bins[first:last]), (last - first) * bin_s


def _throughput_figure(plan: LivePlan, windows: list[Window], swaps: list[Swap], load: dict[str, t.Any]) -> Figure:
    if float(load["t0"]) > windows[0].start:
        raise Unmeasurable("the load generator started after the first window; rerun on a less loaded machine")
    rps: list[float] = []
    full: list[int] = []
    for window in windows:
        ok, seconds = _count(load, window.start + plan.guard_s, window.end)
        rps.append(ok / seconds if seconds else float("nan"))
        full.append(_count(load, window.start, window.end)[0])
    ratios: list[float] = []
    cpu_per_swap: list[float] = []
    for i in range(0, len(windows) - 1, 2):
        by_kind = {windows[j].kind: j for j in (i, i + 1)}
        still, swapping = by_kind["still"], by_kind["swapping"]
        ratios.append(rps[swapping] / rps[still])
        if full[still] and windows[swapping].swaps:
            per_request = windows[still].workers_cpu_s / full[still]
            extra = windows[swapping].workers_cpu_s - per_request * full[swapping]
            cpu_per_swap.append(extra / windows[swapping].swaps * 1000.0)
    failed = sum(1 for s in swaps if s.status != 200)
    non_2xx = int(load["errors"])
    s = spread(ratios)
    return figure(
        THROUGHPUT, value=s.p50, n=s.n, p10=s.p10, p90=s.p90,
        baseline="the same load, windows without swaps (ABBA, adjacent)",
        note=(f"{plan.load_pairs} pairs of {plan.window_s:g} s windows (first {plan.guard_s:g} s not counted),"
              f" {plan.connections} keep-alive connections to {LOAD_PATH}; {len(swaps)} swaps by rollback API,"
              f" {failed} failed; {non_2xx} non-2xx answers"),
        detail={
            "still_rps_p50": spread([r for w, r in zip(windows, rps) if w.kind == "still"]).p50,
            "swapping_rps_p50": spread([r for w, r in zip(windows, rps) if w.kind == "swapping"]).p50,
            "window_rps": [round(r, 1) for r in rps],
            "window_kinds": [w.kind for w in windows],
            "api_swap_s_p50": spread([s.took_s for s in swaps]).p50 if swaps else None,
            "failed_swaps": failed,
            "non_2xx": non_2xx,
            "loadgen": {k: load[k] for k in ("requests", "ok", "errors", "elapsed_s", "rps", "statuses")},
            "workers_cpu_ms_per_swap_p50": spread(cpu_per_swap).p50 if cpu_per_swap else None,
        },
    )


def _convergence_figure(plan: LivePlan, site: Site, swaps: list[Swap], workers: set[int]) -> Figure:
    events = site.loaded_events()
    samples: list[float] = []
    skipped = 0
    failed: list[str] = []
    for i, swap in enumerate(swaps):
        if swap.status != 200:
            failed.append(f"swap {i} to {swap.commit[:12]}: the rollback API answered {swap.status}")
            samples.append(math.inf)
            continue
        mine = [e["t"] for e in events if e.get("commit") == swap.commit and e["t"] >= swap.sent]
        if not mine:
            failed.append(f"swap {i} to {swap.commit[:12]}: no worker published it")
            samples.append(math.inf)
            continue
        first = min(mine)
        next_sent = swaps[i + 1].sent if i + 1 < len(swaps) else math.inf
        last = first
        for pid in workers:
            # The first release this worker published after the swap: this one,
            # or (if it skipped it) a newer one, when it stopped serving the old.
            after = [e for e in events if e["pid"] == pid and e["t"] >= first]
            if not after:
                failed.append(f"swap {i} to {swap.commit[:12]}: worker {pid} never published it")
                last = math.inf
                break
            published = min(after, key=lambda e: e["t"])
            if published.get("commit") != swap.commit and published["t"] >= next_sent:
                skipped += 1
            last = max(last, published["t"])
        samples.append(last - first)
    if not samples:
        raise Unmeasurable("no swap was made; see the gunicorn log (--keep)")
    s = spread(samples)
    return figure(
        CONVERGENCE, value=s.p99, n=s.n, p10=s.p10, p90=s.p90,
        note=(f"gunicorn -w {plan.workers}, the swaps of the throughput windows (under load); first worker's"
              f" publish -> last worker's, from plugin_loaded events; {len(failed)} of {len(swaps)} swaps"
              " failed (counted as infinite)"),
        detail={"p50_s": s.p50, "max_s": s.max, "workers": len(workers), "skipped_releases": skipped,
                "failed_swaps": len(failed), "failures": failed[:10]},
    )
