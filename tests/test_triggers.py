"""Triggers (SPEC 4.6, 5): a burst makes one deploy; polls are jobs per plugin.

Real git repositories, a real host app, the real deploy queue and the real
APScheduler scheduler; jobs are called directly instead of waiting for them.
"""

from __future__ import annotations

import textwrap
import threading
from pathlib import Path

from flask import Flask

from gitplug import GitPlug
from gitplug.deploy.triggers import Trigger
from gitplug.state import DeployResult
from gitrepo import GitRepo, serve_http

PLUGIN = '''
from gitplug import Plugin, current_plugin

plugin = Plugin("hello", __name__)

@plugin.route("/")
def index():
    return current_plugin.commit[:7]
'''


def commit_plugin(repo: GitRepo, note: str) -> str:
    repo.write("hello/__init__.py", textwrap.dedent(PLUGIN) + f"# {note}\n")
    return repo.commit(note)


def host(tmp_path: Path, url: str, **plugin: object) -> tuple[Flask, GitPlug]:
    app = Flask("trigger_host")
    app.config["GITPLUG"] = {
        "data_dir": str(tmp_path / "data"),
        "poll_interval": 3600,
        "plugins": {"hello": {"repo": url, "test": False, **plugin}},
    }
    return app, GitPlug(app)


def served(app: Flask) -> str:
    with app.test_client() as client:
        return client.get("/hello/", buffered=True).get_data(as_text=True)


def test_a_burst_of_triggers_for_one_commit_makes_one_deploy(tmp_path: Path) -> None:
    repo = GitRepo(tmp_path / "repo")
    v1 = commit_plugin(repo, "v1")
    app, gp = host(tmp_path, repo.url)
    try:
        services = app.extensions["gitplug"].services
        futures = []
        barrier = threading.Barrier(20)

        def fire() -> None:
            barrier.wait()
            futures.append(services.queue.submit(Trigger("hello", "webhook")))

        threads = [threading.Thread(target=fire) for _ in range(20)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        for future in futures:
            future.result(timeout=60)
        history = gp.history("hello")
        assert [(r.trigger, r.result, r.commit) for r in history] == [("webhook", DeployResult.LIVE, v1)]
        assert served(app) == v1[:7]
    finally:
        gp.shutdown()


def test_poll_job_deploys_only_when_the_ref_moved(tmp_path: Path) -> None:
    repo = GitRepo(tmp_path / "repo")
    v1 = commit_plugin(repo, "v1")
    app, gp = host(tmp_path, repo.url)
    try:
        services = app.extensions["gitplug"].services
        services.scheduler.set_plugins({"hello": 3600})
        (job,) = services.scheduler.jobs
        assert (job.id, job.coalesce, job.max_instances) == ("poll:hello", True, 1)

        def poll() -> None:
            job.func(*job.args)  # the job body, called now instead of in an hour
            while services.queue.busy("hello"):
                threading.Event().wait(0.02)

        poll()
        assert served(app) == v1[:7]
        poll()  # nothing moved: no new history line
        assert len(gp.history("hello")) == 1
        v2 = commit_plugin(repo, "v2")
        poll()
        assert served(app) == v2[:7]
        # Newest first: the first poll of a server is its startup deploy.
        assert [r.trigger for r in gp.history("hello")] == ["poll", "startup"]
    finally:
        gp.shutdown()


def test_the_pipeline_over_http(tmp_path: Path) -> None:
    """Deploy, update and roll back from a git server on 127.0.0.1 (smart HTTP)."""
    repo = GitRepo(tmp_path / "repos" / "hello")
    v1 = commit_plugin(repo, "v1")
    repo.tag("v1")
    with serve_http(tmp_path / "repos") as base:
        app, gp = host(tmp_path, f"{base}/hello")
        try:
            assert gp.deploy("hello").result == DeployResult.LIVE
            assert served(app) == v1[:7]
            v2 = commit_plugin(repo, "v2")
            assert gp.deploy("hello").result == DeployResult.LIVE
            assert served(app) == v2[:7]
            record = gp.rollback("hello", "v1")
            assert (record.result, record.commit) == (DeployResult.LIVE, v1)
            assert served(app) == v1[:7]
        finally:
            gp.shutdown()


def test_background_starts_on_the_first_request_and_only_once(tmp_path: Path) -> None:
    """Importing the app (Flask's reloader parent, gunicorn's master) starts nothing."""
    repo = GitRepo(tmp_path / "repo")
    commit_plugin(repo, "v1")

    def gitplug_threads() -> list[str]:
        return sorted(t.name for t in threading.enumerate() if t.name.startswith("gitplug-"))

    before = gitplug_threads()
    app, gp = host(tmp_path, repo.url)
    try:
        assert gitplug_threads() == before
        services = app.extensions["gitplug"].services
        assert not services.scheduler._started
        for _ in range(3):
            with app.test_client() as client:
                client.get("/", buffered=True)
        services_threads = [n for n in gitplug_threads() if n in ("gitplug-control", "gitplug-converge")]
        assert services_threads == ["gitplug-control", "gitplug-converge"]  # once each
        pause = threading.Event()
        for _ in range(100):  # the control thread elects itself, then starts the scheduler
            if services.scheduler._started:
                break
            pause.wait(0.05)
        assert services.scheduler._started
        assert [job.id for job in services.scheduler.jobs] == ["poll:hello"]
    finally:
        gp.shutdown()
    assert [name for name in gitplug_threads() if name in ("gitplug-control", "gitplug-converge")] == []


def test_queue_serves_waiting_plugins_in_order_behind_a_stuck_one() -> None:
    from gitplug.deploy.triggers import TriggerQueue

    release = threading.Event()
    entered = threading.Event()
    started: list[str] = []

    def run(trigger: Trigger) -> None:
        started.append(trigger.plugin)  # one worker: appends happen in run order
        if trigger.plugin == "stuck" and not entered.is_set():
            entered.set()
            release.wait(timeout=60)

    queue = TriggerQueue(run, max_workers=1)
    try:
        first = queue.submit(Trigger("stuck", "webhook"))
        assert entered.wait(timeout=30)
        waiting = [queue.submit(Trigger(name, "webhook")) for name in ("a", "b", "c")]
        again = queue.submit(Trigger("stuck", "poll"))  # its next run goes behind a, b and c
        release.set()
        for future in (first, *waiting, again):
            assert future.result(timeout=30) is None
        assert started == ["stuck", "a", "b", "c", "stuck"]
    finally:
        release.set()
        queue.shutdown(wait=False)


def test_queue_runs_up_to_max_workers_at_once_in_daemon_threads() -> None:
    from gitplug.deploy.triggers import TriggerQueue

    release = threading.Event()
    together = threading.Barrier(3)

    def run(trigger: Trigger) -> None:
        together.wait(timeout=30)  # returns only when two deploys run at once
        release.wait(timeout=60)

    queue = TriggerQueue(run, max_workers=2)
    try:
        futures = [queue.submit(Trigger(name, "webhook")) for name in ("p0", "p1")]
        together.wait(timeout=30)
        # Daemon threads: a deploy that never returns cannot keep the process alive.
        assert len(queue._workers) == 2 and all(worker.daemon for worker in queue._workers)
        release.set()
        assert [future.result(timeout=30) for future in futures] == [None, None]
    finally:
        release.set()
        queue.shutdown(wait=False)


def test_queue_shutdown_never_waits_for_a_stuck_deploy() -> None:
    from gitplug.deploy.triggers import TriggerQueue

    entered = threading.Event()
    never = threading.Event()

    def run(trigger: Trigger) -> None:
        entered.set()
        never.wait(timeout=120)

    queue = TriggerQueue(run, max_workers=1)
    queue.submit(Trigger("stuck", "webhook"))
    assert entered.wait(timeout=30)
    pending = queue.submit(Trigger("stuck", "poll"))
    other = queue.submit(Trigger("other", "webhook"))
    queue.shutdown(wait=False)
    # What had not started is answered at once, as "nothing done".
    assert pending.result(timeout=5) is None and other.result(timeout=5) is None
    never.set()
