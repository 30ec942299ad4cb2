"""The restart comparison and the webhook figure, against real gunicorn servers.

``restart_ratio``: :func:`measure_restart`, a plain Flask app's ``SIGHUP``
against a gitplug rollback from disk, both until every worker serves the new
code, interleaved round by round.

``webhook_to_live_s_p50``: against the gitplug server of
:class:`bench.site.Site`, a commit, then ``POST /_gitplug/webhook`` signed as
GitHub would; the clock runs from sending the webhook until every worker
serves the new commit (the last worker's publish of it; the first response of
the new commit is kept as ``detail.first_response_s_p50``).
:func:`measure_served` then hands the same server, with its two newest
commits, to :mod:`bench.underload` for the throughput and convergence figures.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from .figures import Figure, FigureSpec, Target, Unmeasurable, figure, median_ci, spread
from .fixtures import commit_version
from .server import Gunicorn, read_events, wait_for
from .site import LivePlan, Site, served
from .underload import measure_under_load

__all__ = ["RESTART", "WEBHOOK", "measure_restart", "measure_served"]

logger = logging.getLogger(__name__)

RESTART: FigureSpec = ("restart_ratio", "gunicorn HUP / gitplug rollback, until every worker serves", "ratio",
                       Target(">=", 20))
WEBHOOK: FigureSpec = ("webhook_to_live_s_p50", "signed webhook -> every worker serving the new commit", "s", Target("<", 1))


# --------------------------------------------------------------------------- restart vs rollback


def measure_restart(plan: LivePlan, workdir: Path) -> Figure:
    """``restart_ratio``: both sides end to end, on gunicorn servers running side by side.

    Per round, interleaved: (a) a plain Flask app under ``gunicorn -w N`` gets
    ``SIGHUP`` with a new version on disk; the clock runs until every new worker
    has imported the new code and every old one is gone. (b) gitplug's host
    under ``gunicorn -w N``: ``POST /_gitplug/api/plugins/hello/rollback`` to
    the other of two commits on disk; the clock runs until every worker has
    published it. The round's sample is (a) / (b); the figure is their median.
    """
    hup_dir = workdir / "hup"
    (hup_dir / "tmp").mkdir(parents=True)
    version_file = hup_dir / "version"
    version_file.write_text("2.0.0")
    events = hup_dir / "events.jsonl"
    env = {
        "GITPLUG_BENCH_VERSION_FILE": str(version_file),
        "GITPLUG_BENCH_EVENTS": str(events),
        "TMPDIR": str(hup_dir / "tmp"),
    }
    site = Site(workdir, plan.workers, name="restart-site")
    hups: list[float] = []
    rollbacks: list[float] = []
    with Gunicorn("bench.apps:plain_restart_host()", env=env, log_path=hup_dir / "gunicorn.log",
                  workers=plan.workers, gitplug_hooks=False) as plain, site.server as server:

        def ready_since(since: float, version: str) -> dict[int, float]:
            return {e["pid"]: e["t"] for e in read_events(events)
                    if e["event"] == "ready" and e["t"] >= since and e.get("version") == version}

        # Two commits on the gitplug side, both deployed (a rollback is then from disk).
        wait_for(lambda: server.check_alive() or served(server, "commit") == site.first_commit,
                 timeout=90, what="the first poll to deploy the example plugin")
        second = commit_version(site.repo, "1.0.1")
        wall0 = time.time()
        site.webhook(second)
        site.wait_all_workers(second, wall0, "every worker to serve the second commit")
        commits = [site.first_commit, second]

        version = "2.0.0"
        for k in range(plan.hup_samples):
            # (a) HUP of the plain app.
            wait_for(lambda: (plain.check_alive() or len(plain.worker_pids()) == plan.workers
                              and plain.worker_pids() <= set(ready_since(0.0, version))),
                     timeout=60, what=f"{plain!r} to have {plan.workers} workers on {version}")
            version = f"2.0.{k + 1}"
            version_file.write_text(version)
            old = plain.worker_pids()
            wall0 = time.time()
            plain.hup()

            def new_workers_ready() -> list[float] | None:
                plain.check_alive()
                ready = ready_since(wall0, version)
                gone = not (old & plain.worker_pids())
                return list(ready.values()) if len(ready) >= plan.workers and gone else None

            hups.append(max(wait_for(new_workers_ready, timeout=60, what="every new worker after SIGHUP")) - wall0)

            # (b) gitplug rollback from disk.
            target = commits[k % 2]
            wall0 = time.time()
            status = site.rollback(target)
            if status != 200:
                raise Unmeasurable(f"the rollback API answered {status}; see the gunicorn log (--keep)")
            site.wait_all_workers(target, wall0, f"every worker to serve {target[:12]} after the rollback")
            loads = site.loads(target, wall0)
            rollbacks.append(max(loads[pid] for pid in server.worker_pids() if pid in loads) - wall0)
    ratios = [h / r for h, r in zip(hups, rollbacks)]
    s = spread(ratios)
    # The spread of the estimate, not only of the samples: with the 95 %
    # interval of the median on one side of the target, noise cannot flip
    # the verdict (Figure.settled; the table marks it "~" otherwise).
    ci95 = median_ci(ratios)
    return figure(
        RESTART, value=s.p50, n=s.n, p10=s.p10, p90=s.p90, ci95=ci95,
        baseline=f"a plain Flask app's gunicorn -w {plan.workers} SIGHUP until every worker serves the new code",
        note=(f"per round: HUP until every new worker is up / gitplug rollback from disk (API, gunicorn -w "
              f"{plan.workers}) until every worker serves it"),
        detail={"hup_all_workers_s": hups, "rollback_all_workers_s": rollbacks,
                "hup_s_p50": spread(hups).p50, "rollback_s_p50": spread(rollbacks).p50,
                "ratio_of_medians": spread(hups).p50 / spread(rollbacks).p50,
                "ratio_min": s.min, "ratio_max": s.max},
    )


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
    samples, firsts, answers = [], [], []
    for k in range(plan.webhook_samples):
        commit = commit_version(site.repo, f"1.1.{k}")
        wall0, t0 = time.time(), time.perf_counter()
        site.webhook(commit)
        answers.append(time.perf_counter() - t0)
        wait_for(lambda: server.check_alive() or served(server, "commit") == commit,
                 timeout=60, what=f"commit {commit[:12]} to go live after its webhook")
        firsts.append(time.perf_counter() - t0)
        site.wait_all_workers(commit, wall0, f"every worker to serve {commit[:12]}")
        # The last worker to publish it, from the workers' own event times.
        loads = site.loads(commit, wall0)
        samples.append(max(loads[pid] for pid in server.worker_pids() if pid in loads) - wall0)
        site.previous_commit, site.last_commit = site.last_commit, commit
    s = spread(samples)
    return figure(
        WEBHOOK, value=s.p50, n=s.n, p10=s.p10, p90=s.p90,
        note=(f"gunicorn -w {plan.workers} gthread, local repo, test gate off, one new commit per webhook;"
              " until the last worker publishes it"),
        detail={"samples_s": samples, "first_response_s_p50": spread(firsts).p50,
                "webhook_answer_s_p50": spread(answers).p50, "max_s": s.max},
    )
