"""The restart baseline and the webhook figure, against real gunicorn servers.

``restart_ratio`` (baseline): ``bench.apps:restart_host()`` under
``gunicorn -w 2``; the plugin directory is edited, the master gets ``SIGHUP``
and the clock runs until a response carries the new ``__version__``. Right
before each ``SIGHUP``, seven in-process swaps of the example plugin are
timed (:func:`bench.inprocess.swap_probe`); a sample is HUP time / their median.

``webhook_to_live_s_p50``: against the gitplug server of
:class:`bench.site.Site`, a commit, then ``POST /_gitplug/webhook`` signed as
GitHub would; the clock runs from sending the webhook to the first response
served by the new commit (``/hello/api/release``, fresh connections).
:func:`measure_served` then hands the same server, with its two newest
commits, to :mod:`bench.underload` for the throughput and convergence figures.
"""

from __future__ import annotations

import logging
import shutil
import time
import typing as t
from pathlib import Path

from .figures import Figure, FigureSpec, Target, figure, spread
from .fixtures import EXAMPLE_DIR, commit_version, set_version
from .server import Gunicorn, read_events, wait_for
from .site import LivePlan, Site, served
from .underload import measure_under_load

__all__ = ["RESTART", "WEBHOOK", "measure_hup_seconds", "measure_served"]

logger = logging.getLogger(__name__)

RESTART: FigureSpec = ("restart_ratio", "gunicorn HUP until new code serves / gitplug swap", "ratio", Target(">=", 20))
WEBHOOK: FigureSpec = ("webhook_to_live_s_p50", "signed webhook -> first response from the new commit", "s", Target("<", 1))


# --------------------------------------------------------------------------- gunicorn HUP


def measure_hup_seconds(
    plan: LivePlan, workdir: Path, swap_ms: t.Callable[[], float]
) -> tuple[list[float], list[float], dict[str, t.Any]]:
    """Per sample: seconds from ``kill -HUP`` to the first response with the new code,
    and the in-process swap time (ms) ``swap_ms()`` measured just before; and details.
    """
    checkout = workdir / "hup" / "hello"
    shutil.copytree(EXAMPLE_DIR, checkout, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", ".pytest_cache"))
    set_version(checkout, "2.0.0")
    events = workdir / "hup" / "events.jsonl"
    (workdir / "hup" / "tmp").mkdir()
    env = {
        "GITPLUG_BENCH_PLUGIN_DIR": str(checkout),
        "GITPLUG_BENCH_EVENTS": str(events),
        "TMPDIR": str(workdir / "hup" / "tmp"),  # load_directory's snapshots go here
    }
    first: list[float] = []
    all_up: list[float] = []
    swaps: list[float] = []
    with Gunicorn("bench.apps:restart_host()", env=env, log_path=workdir / "hup" / "gunicorn.log",
                  workers=plan.workers, gitplug_hooks=False) as server:

        def ready_since(since: float) -> dict[int, float]:
            return {e["pid"]: e["t"] for e in read_events(events) if e["event"] == "ready" and e["t"] >= since}

        def settled() -> bool:
            # Every worker has loaded the app (a worker booting late would load
            # the next version before the HUP and fake an instant restart).
            server.check_alive()
            pids = server.worker_pids()
            return len(pids) == plan.workers and pids <= set(ready_since(0.0))

        version = "2.0.0"
        for k in range(plan.hup_samples):
            wait_for(settled, timeout=60, what=f"{server!r} to have {plan.workers} workers up")
            wait_for(lambda: served(server, "version") == version, timeout=60,
                     what=f"{server!r} to serve version {version}")
            version = f"2.0.{k + 1}"
            set_version(checkout, version)
            swaps.append(swap_ms())
            old = server.worker_pids()
            wall0, t0 = time.time(), time.perf_counter()
            server.hup()
            wait_for(lambda: server.check_alive() or served(server, "version") == version,
                     timeout=60, what=f"the new code ({version}) after SIGHUP")
            first.append(time.perf_counter() - t0)

            def new_workers_ready() -> list[float] | None:
                server.check_alive()
                ready = ready_since(wall0)
                gone = not (old & server.worker_pids())
                return list(ready.values()) if len(ready) >= plan.workers and gone else None

            ready = wait_for(new_workers_ready, timeout=60, what="every new worker after SIGHUP")
            all_up.append(max(ready) - wall0)
    return first, swaps, {"hup_first_response_s": first, "hup_all_workers_ready_s": all_up, "swap_ms": swaps}


# --------------------------------------------------------------------------- webhook, then the load


def measure_served(plan: LivePlan, workdir: Path) -> list[Figure]:
    """``webhook_to_live_s_p50``, then (same server) throughput and convergence."""
    site = Site(workdir, plan.workers)
    with site.server as server:
        wait_for(lambda: server.check_alive() or served(server, "commit") == site.first_commit,
                 timeout=90, what="the first poll to deploy the example plugin")
        site.wait_all_workers(site.first_commit, 0.0, "every worker to serve the first commit")
        webhook = _webhook_figure(plan, site)
        commits = [c for c in (site.last_commit, site.previous_commit) if c]
        throughput, convergence = measure_under_load(plan, site, commits)
    return [webhook, throughput, convergence]


def _webhook_figure(plan: LivePlan, site: Site) -> Figure:
    server = site.server
    samples, answers = [], []
    for k in range(plan.webhook_samples):
        commit = commit_version(site.repo, f"1.1.{k}")
        wall0, t0 = time.time(), time.perf_counter()
        site.webhook(commit)
        answers.append(time.perf_counter() - t0)
        wait_for(lambda: server.check_alive() or served(server, "commit") == commit,
                 timeout=60, what=f"commit {commit[:12]} to go live after its webhook")
        samples.append(time.perf_counter() - t0)
        site.wait_all_workers(commit, wall0, f"every worker to serve {commit[:12]}")
        site.previous_commit, site.last_commit = site.last_commit, commit
    s = spread(samples)
    return figure(
        WEBHOOK, value=s.p50, n=s.n, p10=s.p10, p90=s.p90,
        note=f"gunicorn -w {plan.workers} gthread, local repo, test gate off, one new commit per webhook",
        detail={"samples_s": samples, "webhook_answer_s_p50": spread(answers).p50, "max_s": s.max},
    )
