"""gitplug under gunicorn: every worker converges and none regresses (issue 5).

Status per worker, --preload and recycled workers, controller takeover, sync
workers. Harness in :mod:`gunicorn_site`, response checks in
:mod:`gunicorn_served`. SPEC sections covered: 4.2 (failure keeps the last good
release), 4.8 (every worker converges), 7 (status per worker).

The tests at the end pin down two product bugs this file found (a worker held
back from converging by another process's deploy lock; preloaded workers
sharing one id), both fixed.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from typing import Any

import pytest

from gunicorn_fixtures import gated_site_fixture, site_fixture  # noqa: F401
from gunicorn_served import Served, decode, first_serving, killed_in_flight, mixed, regressions, wait_served
from gunicorn_site import (
    CONVERGENCE_S,
    Site,
    finished_at,
    gunicorn,
    label,
    lock_holder,
    status_is,
    status_workers,
    wait_for,
)
from loadgen import LoadGenerator
from serverproc import promptly

# -- 2. status lists every worker ------------------------------------------------------


#: Heartbeats older than this are dropped by ``gitplug status`` (StateStore.workers).
HEARTBEAT_MAX_AGE_S = 10.0


def test_status_lists_every_worker_and_drops_a_killed_one(site: Site) -> None:
    with gunicorn(site, "-k", "gthread", "--threads", "4", workers=3) as server:
        d = site.deploy(1, via="cli")
        assert d.result == "live", d
        v1 = d.commit

        pids = set(server.worker_pids())
        workers = wait_for(
            "gitplug status to list the 3 workers on r001",
            lambda: status_is(site, {pid: v1 for pid in pids}),
            timeout=8,
            interval=0.3,
        )
        plugin = site.cli_json("status")["plugins"][0]
        assert plugin["live_commit"] == v1 and plugin["state"] == "live", plugin
        controller = lock_holder(site.controller_lock)
        victim = max(pid for pid in workers if pid != controller)

        load = LoadGenerator(
            server.port,
            "/hello/",
            clients=4,
            rate=60,
            reconnect_every=1,
            retry_stale=True,
            max_requests=5_000,
            max_seconds=40.0,
        )
        with load:
            wait_served(load, "20 answers before the kill", lambda served: len(served) >= 20)
            os.kill(victim, signal.SIGKILL)
            killed_at = time.monotonic()
            respawned = wait_for(
                "gunicorn to replace the killed worker",
                lambda: set(server.worker_pids()) - pids - {victim},
                timeout=10,
            )
            (newcomer,) = respawned

            def victim_gone() -> float | None:
                asked = time.monotonic()
                return asked - killed_at if victim not in status_workers(site) else None

            gone_after = wait_for(
                "the killed worker to leave gitplug status",
                victim_gone,
                timeout=HEARTBEAT_MAX_AGE_S + 5,
                interval=0.3,
            )
            print(f"\nkilled worker {victim} left gitplug status after {gone_after:.1f} s")
            final = wait_for(
                "gitplug status to list the new worker on r001",
                lambda: status_is(site, {pid: v1 for pid in (pids - {victim}) | {newcomer}}),
                timeout=6,
                interval=0.3,
            )
            wait_for(
                "the new worker to answer",
                lambda: any(
                    json.loads(s.body)["pid"] == newcomer
                    for s in load.samples_so_far()
                    if s.status == 200
                ),
                timeout=10,
            )
        result = load.result()
    print(f"load: {result.summary()}")
    assert set(final) == (pids - {victim}) | {newcomer}
    # The last beat was at most one heartbeat before the kill: gone within the max age,
    # plus the time one `gitplug status` takes. The wait above fails if it never leaves;
    # how long it took is printed when over (the age rule itself: tests/test_state.py).
    promptly(gone_after, HEARTBEAT_MAX_AGE_S + 1.0, what="a killed worker leaving gitplug status")
    lost = killed_in_flight(result.samples, killed_at, load.clients)
    assert not result.non_2xx and len(result.connection_errors) == len(lost), result.summary()
    served = decode(result.ok)
    from_newcomer = sorted((s for s in served if s.pid == newcomer), key=lambda s: s.t)
    assert from_newcomer, "the new worker served nothing"
    assert {s.seq for s in from_newcomer} == {1}, [label(s.seq) for s in from_newcomer[:10]]


# -- 3. --preload and --max-requests ----------------------------------------------------


def test_preload_and_recycled_workers_never_serve_a_stale_release(site: Site) -> None:
    """The master imports the app (and r000) once; every fork converges before serving."""
    args = (
        "-k",
        "gthread",
        "--threads",
        "2",
        "--preload",
        "--max-requests",
        "50",
        "--max-requests-jitter",
        "10",
    )
    with gunicorn(site, *args, workers=2) as server:
        load = LoadGenerator(
            server.port,
            "/hello/",
            clients=4,
            rate=50,
            reconnect_every=5,
            retry_stale=True,
            max_requests=5_000,
            max_seconds=90.0,
        )
        with load:
            # A worker recycled before the deploy (--max-requests 50 +- 10 each).
            wait_served(
                load, "a worker recycled before the deploy",
                lambda served: len({s.pid for s in served}) > 2 and len(served) >= 120,
            )
            d = site.deploy(1, via="cli")
            assert d.result == "live", d
            v1, done_at = d.commit, d.done_at
            done_mono = time.monotonic() - (time.time() - done_at)

            def seen_enough(served: list[Served]) -> bool:
                # Two workers born after the deploy served, and every worker alive
                # answered a request sent after the convergence window.
                after = {pid for pid, born in server.births.items() if born > done_at}
                late = {s.pid for s in served if s.sample.sent > done_mono + CONVERGENCE_S + 0.5}
                return len(after & {s.pid for s in served}) >= 2 and set(server.worker_pids()) <= late

            wait_served(load, "recycled workers serving after the convergence window", seen_enough)
        result = load.result()
    print(f"\nload: {result.summary()}")
    assert not result.non_2xx and not result.connection_errors, result.summary()
    served = decode(result.samples)
    before = {pid for pid, born in server.births.items() if born < done_at - 0.1}
    after = {pid for pid, born in server.births.items() if born > done_at}
    print(f"workers born before the deploy returned: {len(before)}, after: {len(after)}")
    assert len({s.pid for s in served if s.pid in after}) >= 2, (
        "expected workers recycled after the deploy"
    )
    assert {s.seq for s in served if s.pid in before} >= {0}
    # A worker forked after the deploy returned serves r001 from its first request.
    stale_newborn = [s for s in served if s.pid in after and s.seq != 1]
    assert not stale_newborn, stale_newborn[:5]
    # Every worker serves r001 once the convergence window has passed.
    stale = [s for s in served if s.sample.sent > done_mono + CONVERGENCE_S and s.commit != v1]
    assert not stale, stale[:5]
    assert not mixed(served) and not regressions(served)[0]


# -- 4. controller takeover -----------------------------------------------------------------


def test_controller_takeover_after_sigkill(site: Site) -> None:
    with gunicorn(site, "-k", "gthread", "--threads", "4", workers=3) as server:
        controller = wait_for(
            "a worker to hold locks/controller.lock",
            lambda: (
                holder
                if (holder := lock_holder(site.controller_lock)) in server.worker_pids()
                else None
            ),
            timeout=5,
        )
        os.kill(controller, signal.SIGKILL)
        killed_at = time.monotonic()
        v1 = site.release(1)
        # Sent at once: whichever worker takes it, the deploy must happen, queued via the
        # store while no worker is the controller yet.
        code, answer = server.api("POST", "/plugins/hello/deploy", {"wait": False})
        assert (code, answer) == (202, {"status": "queued"})
        successor = wait_for(
            "another worker to become the controller",
            lambda: (pid := lock_holder(site.controller_lock)) not in (None, controller) and pid,
            timeout=5,
            interval=0.05,
        )
        took_over = time.monotonic() - killed_at
        assert successor in server.worker_pids(), (successor, server.worker_pids())
        # The successor also polls its tracked ref once on election and may deploy r001
        # first; the queued request then still runs and is recorded as skipped.
        deployed = wait_for(
            "the queued API deploy to run",
            lambda: next(
                (r for r in site.cli_json("history", "hello") if r["trigger"] == "api" and r["result"] != "running"), None
            ),
            timeout=15,
            interval=0.3,
        )
        assert deployed["commit"] == v1 and deployed["result"] in ("live", "skipped"), deployed
        live_after = time.monotonic() - killed_at
        # The killed worker's last heartbeat stays listed until it is 10 s old:
        # judge the workers gunicorn runs now (each must be listed, on r001).
        wait_for(
            "every worker to serve r001",
            lambda: (live := server.worker_pids())
            and {pid: status_workers(site).get(pid) for pid in live} == dict.fromkeys(live, v1),
            timeout=6,
            interval=0.3,
        )
        assert json.loads(server.get("/hello/")[1])["commit"] == v1
    print(
        f"\ncontroller {controller} killed; {successor} took over after {took_over:.1f} s;"
        f" the API deploy was live {live_after:.1f} s after the kill"
    )


# -- 5. sync workers -------------------------------------------------------------------------


def test_sync_workers_converge_after_a_cli_deploy(site: Site) -> None:
    with gunicorn(site, "-k", "sync", workers=2) as server:
        load = LoadGenerator(
            server.port, "/hello/", clients=3, rate=60, max_requests=5_000, max_seconds=30.0
        )
        with load:
            wait_served(load, "both workers answering", lambda served: len({s.pid for s in served}) == 2)
            d = site.deploy(1, via="cli")
            assert d.result == "live", d
            v1, done_at = d.commit, d.done_at
            wait_served(
                load, "both workers answering after the convergence window",
                lambda served: len({s.pid for s in served if s.t > done_at + CONVERGENCE_S + 0.5}) == 2,
            )
        result = load.result()
    print(f"\nload: {result.summary()}")
    assert not result.non_2xx and not result.connection_errors, result.summary()
    served = decode(result.samples)
    pids = {s.pid for s in served}
    assert len(pids) == 2, pids
    first = first_serving(served, 1, pids)
    print(
        "sync workers serving r001 after the CLI returned (s):",
        {pid: None if t is None else round(t - done_at, 3) for pid, t in first.items()},
    )
    assert all(t is not None and t - done_at <= CONVERGENCE_S for t in first.values()), first
    assert not [s for s in served if s.t > done_at + CONVERGENCE_S and s.commit != v1]
    assert not mixed(served) and not regressions(served)[0]


# -- regressions of product bugs found here ---------------------------------------------------


def wait_first_poll(server: Any) -> None:
    """The controller polls its tracked ref once after its election: tests that hold a
    deploy in its gate wait for that poll first, so that it does not deploy it instead."""
    wait_for("the controller's first poll", server.controller_polled, timeout=20, interval=0.1)


@pytest.mark.parametrize(
    "preload",
    [
        pytest.param(True, id="preload"),
        pytest.param(False, id="no-preload"),
    ],
)
def test_worker_started_during_a_deploy_serves_the_live_release(
    gated_site: Site, preload: bool
) -> None:
    """SPEC 4.2 and 4.8: a deploy in progress changes nothing served, in any worker.

    r001 is live everywhere; the CLI deploys r002, whose test gate takes 5 s. A worker
    killed meanwhile is replaced by gunicorn; the replacement must serve r001.
    """
    site = gated_site
    args = ("-k", "gthread", "--threads", "4", *(("--preload",) if preload else ()))
    with gunicorn(site, *args, workers=2) as server:
        pids = set(server.worker_pids())
        wait_first_poll(server)
        load = LoadGenerator(
            server.port,
            "/hello/",
            clients=3,
            rate=60,
            reconnect_every=1,
            retry_stale=True,
            max_requests=5_000,
            max_seconds=40.0,
        )
        with load:
            d1 = site.deploy(1, via="cli")
            assert d1.result == "live", d1
            wait_for(
                "both workers to serve r001",
                lambda: (
                    pids
                    <= {
                        json.loads(s.body)["pid"]
                        for s in load.samples_so_far()
                        if s.status == 200
                        and s.received > time.monotonic() - 0.5
                        and json.loads(s.body)["seq"] == 1
                    }
                ),
                timeout=6,
            )
            converged = time.monotonic()
            site.release(2, gate_s=5.0)
            deploy = subprocess.Popen(
                [
                    sys.executable,
                    "-c",
                    "from gitplug.cli import main; main()",
                    "deploy",
                    "hello",
                    "--json",
                ],
                env=site.env,
                cwd=site.root,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            try:
                wait_for(
                    "the CLI deploy to hold the plugin's deploy lock",
                    lambda: lock_holder(site.deploy_lock) == deploy.pid,
                    timeout=10,
                    interval=0.05,
                )
                victim = min(pids)
                os.kill(victim, signal.SIGKILL)
                killed_at = time.monotonic()
                newcomer = wait_for(
                    "gunicorn to replace the killed worker",
                    lambda: set(server.worker_pids()) - pids,
                    timeout=10,
                )
                # The newcomer must serve while r002 is still in its test gate.
                wait_for(
                    "the replacement worker to answer",
                    lambda: any(
                        s.status == 200 and json.loads(s.body)["pid"] in newcomer
                        for s in load.samples_so_far()
                    ),
                    timeout=10,
                )
                assert lock_holder(site.deploy_lock) == deploy.pid, (
                    "the deploy ended before the replacement worker answered: nothing was tested"
                )
                still_deploying = time.monotonic()
                out, err = deploy.communicate(timeout=30)
            finally:
                if deploy.poll() is None:
                    deploy.kill()
            assert json.loads(out)["result"] == "live", (out, err)
            gate_ended = time.monotonic()
        result = load.result()
    print(f"\nload: {result.summary()}; new worker {newcomer}")
    lost = killed_in_flight(result.samples, killed_at, load.clients)
    during = [
        s
        for s in result.samples
        if converged < s.sent and s.received < gate_ended and s not in lost
    ]
    bad = [s for s in during if s.status != 200 or json.loads(s.body)["seq"] < 1]
    example = bad[0].error or bad[0].body[:160] if bad else None
    # Answered while r002 was certainly still in its gate (the lock was held after them).
    from_newcomer = [
        s
        for s in during
        if s.status == 200 and json.loads(s.body)["pid"] in newcomer and s.received <= still_deploying
    ]
    assert from_newcomer, f"the replacement worker {newcomer} answered nothing during r002's deploy"
    assert {json.loads(s.body)["seq"] for s in from_newcomer} == {1}, (
        f"the replacement worker did not serve r001: {sorted({json.loads(s.body)['seq'] for s in from_newcomer})}"
    )
    assert not bad, (
        f"{len(bad)} of {len(during)} responses during r002's deploy were not r001:"
        f" statuses {sorted({str(s.status) for s in bad})}, e.g. {example!r}"
    )


def test_convergence_is_not_held_back_by_the_next_deploy(gated_site: Site) -> None:
    """SPEC 4.8: every worker serves a release within 2 s of its swap, even when the
    controller goes straight on to the next deploy (two pushes in a row)."""
    site = gated_site
    with gunicorn(site, "-k", "gthread", "--threads", "4", workers=3) as server:
        wait_first_poll(server)
        load = LoadGenerator(
            server.port,
            "/hello/",
            clients=3,
            rate=90,
            reconnect_every=1,
            retry_stale=True,
            max_requests=5_000,
            max_seconds=60.0,
        )
        with load:
            v1 = site.release(1, gate_s=4.0)
            assert server.api("POST", "/plugins/hello/deploy", {"wait": False})[0] == 202
            wait_for(
                "r001 to be in its test gate",
                lambda: any(r["commit"] == v1 and r["result"] == "running" for r in site.history()),
                timeout=10,
                interval=0.2,
            )
            v2 = site.release(2, gate_s=5.0)
            assert server.api("POST", "/plugins/hello/deploy", {"wait": False})[0] == 202
            queued_while_running = any(
                r["commit"] == v1 and r["result"] == "running" for r in site.history()
            )
            first = wait_for(
                "r001 to go live",
                lambda: next(
                    (r for r in site.history() if r["commit"] == v1 and r["result"] != "running"),
                    None,
                ),
                timeout=15,
            )
            assert first["result"] == "live", first
            second = wait_for(
                "r002 to go live",
                lambda: next(
                    (r for r in site.history() if r["commit"] == v2 and r["result"] != "running"),
                    None,
                ),
                timeout=20,
            )
            assert second["result"] == "live", second
            r1_done = finished_at(first)
            wait_served(
                load, "every worker answering after r001's convergence window",
                lambda served: set(server.worker_pids())
                <= {s.pid for s in served if s.t > r1_done + CONVERGENCE_S},
            )
        result = load.result()
    print(f"\nload: {result.summary()}")
    assert not result.non_2xx and not result.connection_errors, result.summary()
    served = decode(result.samples)
    done_at = finished_at(first)
    first_r1 = first_serving(served, 1, {s.pid for s in served})
    lag = {pid: None if t is None else round(t - done_at, 2) for pid, t in first_r1.items()}
    print(f"workers serving r001 or newer, seconds after r001 went live: {lag}")
    assert queued_while_running, (
        "r002 was queued after r001 had finished: the scenario did not happen"
    )
    assert all(x is not None and x <= CONVERGENCE_S for x in lag.values()), lag


def test_status_lists_every_preloaded_worker(site: Site) -> None:
    """SPEC 7: `gitplug status` shows the live commit per worker, --preload or not."""
    with gunicorn(site, "-k", "gthread", "--threads", "2", "--preload", workers=3) as server:
        pids = set(server.worker_pids())
        expected = {pid: site.commits[0] for pid in pids}
        try:
            wait_for(
                "gitplug status to list the 3 preloaded workers",
                lambda: status_is(site, expected),
                timeout=5,
                interval=0.3,
            )
        except AssertionError as exc:
            got = status_workers(site)
            raise AssertionError(
                f"{exc}: got {got}, master {server.proc.pid}, workers {sorted(pids)}"
            ) from None


def test_one_test_gate_run_per_deploy_whichever_workers_are_asked(gated_site: Site) -> None:
    """SPEC 4.8: one process per host tests. Deploy requests reach all three workers
    (fresh connections, while the gate runs); the commit is tested once."""
    site = gated_site
    with gunicorn(site, "-k", "gthread", "--threads", "4", workers=3) as server:
        wait_first_poll(server)
        before = {r["id"] for r in site.history()}
        v1 = site.release(1, gate_s=2.0)
        answers = [server.api("POST", "/plugins/hello/deploy", {"wait": False})[0] for _ in range(9)]
        assert set(answers) == {202}, answers
        live = wait_for(
            "r001 to go live",
            lambda: next(
                (r for r in site.history() if r["commit"] == v1 and r["result"] == "live"), None
            ),
            timeout=60,
            interval=0.2,
        )
        # Every request reached some worker; let the queue drain before counting.
        wait_for(
            "no deploy left running",
            lambda: all(r["result"] != "running" for r in site.history()),
            timeout=30,
            interval=0.2,
        )
        new = [r for r in site.history() if r["id"] not in before]
    tested = [r for r in new if r["log_path"]]
    assert [r["id"] for r in tested] == [live["id"]], (
        f"the commit was tested {len(tested)} times: {[(r['id'], r['result']) for r in new]}"
    )
    logs = sorted((site.data_dir / "logs" / "hello").glob("*.log"))
    assert [p.name for p in logs if int(p.stem) not in before] == [f"{live['id']}.log"], logs


def test_the_serving_controller_killed_mid_deploy(gated_site: Site) -> None:
    """SPEC 4.7 under gunicorn: SIGKILL of the worker that is the controller while it
    tests a release. Every worker keeps serving r000, the deploy is recorded
    interrupted, another worker takes over and the next deploy goes live."""
    site = gated_site
    with gunicorn(site, "-k", "gthread", "--threads", "4", workers=2) as server:
        wait_first_poll(server)
        load = LoadGenerator(
            server.port, "/hello/", clients=2, rate=40, reconnect_every=1, retry_stale=True,
            max_requests=5_000, max_seconds=60.0,
        )
        with load:
            v1 = site.release(1, gate_s=20.0)  # held in its gate until the kill
            assert server.api("POST", "/plugins/hello/deploy", {"wait": False})[0] == 202
            running = wait_for(
                "r001 to be in its test gate",
                lambda: next((r for r in site.history() if r["commit"] == v1 and r["result"] == "running"), None),
                timeout=20,
                interval=0.1,
            )
            controller = lock_holder(site.controller_lock)
            assert controller in server.worker_pids(), (controller, server.worker_pids())
            os.kill(controller, signal.SIGKILL)
            killed_at = time.monotonic()
            successor = wait_for(
                "another worker to become the controller",
                lambda: (lambda pid: pid if pid and pid != controller else None)(lock_holder(site.controller_lock)),
                timeout=20,
                interval=0.1,
            )
            record = wait_for(
                "the killed deploy to be recorded",
                lambda: next((r for r in site.history() if r["id"] == running["id"] and r["result"] != "running"), None),
                timeout=20,
                interval=0.2,
            )
            assert record["result"] == "interrupted", record
            served_before_next = time.monotonic()
            v2 = site.release(2)
            # The successor may pick r002 up by its own poll first; the API then
            # answers "skipped" (already live), which the last assert checks.
            answer = server.api("POST", "/plugins/hello/deploy", {"wait": True})[1]
            assert answer["result"] in {"live", "skipped"}, answer
        result = load.result()
    assert successor != controller
    lost = killed_in_flight(result.samples, killed_at, load.clients)
    meanwhile = [s for s in result.samples if s.sent < served_before_next and s not in lost]
    bad = [s for s in meanwhile if s.status != 200 or json.loads(s.body)["seq"] != 0]
    assert not bad, f"{len(bad)} of {len(meanwhile)} answers were not r000: {bad[:3]}"
    assert v2 in {r["commit"] for r in site.history() if r["result"] == "live"}
