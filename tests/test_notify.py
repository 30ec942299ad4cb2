"""Notifications (``notify:``): what each endpoint receives, and that none delays a deploy.

A small threaded HTTP server on 127.0.0.1 records every request; its paths
answer 201 (``/ok/...`` and the forge API paths), 500 (``/fail/...``), or hang
until the test releases them (``/hang/...``). The host is the fault
catalogue's (:mod:`faults_site`): a real repository, real deploys, the
notifier subscribed as the extension subscribes it. Tests wait for the
notifier to have sent everything (:meth:`Notifier.flush`), never sleep.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
import typing as t
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from faults_site import Host, _new_host, make_host_fixture, plugin_files  # noqa: F401
from gitplug.deploy import notify
from gitplug.deploy.notify import Notifier
from gitplug.state import DeployResult
from gitplug.web.metrics import render_metrics
from gitrepo import GitRepo
from serverproc import clean_env, run_cli, wait_for, write_config, write_version

SECRET = "notify-secret-0123456789"
TOKEN = "forge-token-0123456789"
PUBLIC = "https://deploy.example.com"
STATUS_URL = PUBLIC + "/_gitplug/"


@dataclass
class Hit:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes

    @property
    def json(self) -> t.Any:
        return json.loads(self.body)


@dataclass
class Endpoint:
    base: str
    hits: list[Hit] = field(default_factory=list)
    hanging: threading.Event = field(default_factory=threading.Event)
    release: threading.Event = field(default_factory=threading.Event)
    hang_ended: threading.Event = field(default_factory=threading.Event)

    def under(self, prefix: str) -> list[Hit]:
        return [hit for hit in list(self.hits) if hit.path.startswith(prefix)]


@pytest.fixture
def endpoint() -> Iterator[Endpoint]:
    state = Endpoint(base="")

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - http.server's name
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length)
            state.hits.append(Hit("POST", self.path, {k.lower(): v for k, v in self.headers.items()}, body))
            if self.path.startswith("/hang/"):
                state.hanging.set()
                state.release.wait(120)
                state.hang_ended.set()
            status = 500 if self.path.startswith("/fail/") else 201
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"{}")

        def log_message(self, *args: t.Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    state.base = f"http://127.0.0.1:{server.server_port}"
    try:
        yield state
    finally:
        state.release.set()
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def flush(host: Host, timeout: float = 60) -> None:
    notifier = host.gp._state.notifier
    assert notifier is not None and notifier.flush(timeout), "notifications still queued"


def test_each_event_arrives_once_signed(make_host: t.Callable[..., Host], endpoint: Endpoint) -> None:
    host = make_host(top={
        "public_url": PUBLIC + "/",
        "notify": [
            {"url": endpoint.base + "/ok/json", "secret": SECRET,
             "events": ["deploy_started", "deploy_succeeded", "deploy_failed", "rolled_back"]},
            {"url": endpoint.base + "/ok/slack", "format": "slack", "events": ["deploy_failed"],
             "plugins": ["hello"]},
            {"url": endpoint.base + "/ok/other", "events": ["deploy_failed"], "plugins": ["other"]},
        ]},
        others={"other": {"repo": "{repo}", "url_prefix": "/other", "test": False}})
    v2 = host.commit(plugin_files("v2"), "v2")
    good = host.gp.deploy("hello")
    assert good is not None and good.result == DeployResult.LIVE
    host.commit(plugin_files("v3", **{"hello/broken.py": "def broken(:\n"}), "v3 broken")
    bad = host.gp.deploy("hello")
    assert bad is not None and bad.result == DeployResult.FAILED
    back = host.gp.rollback("hello", "previous")
    assert back is not None and back.result == DeployResult.LIVE and back.commit == host.good
    flush(host)

    # "other" may deploy in the background too (its first deploy): its events go to this
    # unfiltered entry as well; here only hello's are counted.
    hits = [hit for hit in endpoint.under("/ok/json") if hit.json["plugin"] == "hello"]
    seen = [(hit.json["event"], hit.json["deploy_id"]) for hit in hits]
    assert len(seen) == len(set(seen)), seen  # each event once
    for hit in hits:  # each one signed over the exact body
        expected = "sha256=" + hmac.new(SECRET.encode(), hit.body, hashlib.sha256).hexdigest()
        assert hmac.compare_digest(hit.headers["x-gitplug-signature"], expected)
        assert hit.headers["x-gitplug-event"] == hit.json["event"]
        assert hit.headers["content-type"] == "application/json"
    by_key = {(hit.json["event"], hit.json["deploy_id"]): hit.json for hit in hits}
    first = host.gp.history("hello", limit=10)[-1]  # the host's own first deploy of v1
    assert set(seen) == {
        ("deploy_started", first.id), ("deploy_succeeded", first.id),
        ("deploy_started", good.id), ("deploy_succeeded", good.id),
        ("deploy_started", bad.id), ("deploy_failed", bad.id),
        ("deploy_started", back.id), ("deploy_succeeded", back.id), ("rolled_back", back.id),
    }
    done = by_key[("deploy_succeeded", good.id)]
    assert {k: done[k] for k in ("plugin", "commit", "ref", "result", "stage", "error", "trigger")} == {
        "plugin": "hello", "commit": v2, "ref": "main", "result": "live", "stage": None, "error": None,
        "trigger": "api"}
    assert done["status_url"] == STATUS_URL and done["host"]
    failed = by_key[("deploy_failed", bad.id)]
    assert (failed["result"], failed["stage"]) == ("failed", "load")
    assert "broken.py" in failed["error"]
    rolled = by_key[("rolled_back", back.id)]
    assert (rolled["from_commit"], rolled["to_commit"]) == (v2, host.good)

    slack = endpoint.under("/ok/slack")
    assert len(slack) == 1 and set(slack[0].json) == {"text"}
    assert "deploy of hello" in slack[0].json["text"] and "failed at load" in slack[0].json["text"]
    assert "x-gitplug-signature" not in slack[0].headers
    # Filtered to another plugin: nothing, although the same flush delivered the others.
    assert endpoint.under("/ok/other") == []


def test_forge_statuses_match_the_documented_api(make_host: t.Callable[..., Host], endpoint: Endpoint) -> None:
    events = ["deploy_started", "deploy_succeeded", "deploy_failed"]
    host = make_host(top={
        "public_url": PUBLIC,
        "notify": [
            {"url": endpoint.base + "/api/v3/repos/team/hello", "format": "github", "token": TOKEN,
             "events": events},
            {"url": endpoint.base + "/api/v4/projects/team%2Fhello", "format": "gitlab", "token": TOKEN,
             "events": events},
            {"url": endpoint.base + "/api/v1/repos/team/hello", "format": "gitea", "token": TOKEN,
             "events": events},
        ]})
    flush(host)
    endpoint.hits.clear()
    services = host.gp._state.services
    good = host.commit(plugin_files("v2"), "v2")
    # A webhook-triggered deploy knows its commit from the start: pending, then success.
    record = services.trigger("hello", "webhook").result(timeout=120)
    assert record is not None and record.result == DeployResult.LIVE
    bad = host.commit(plugin_files("v3", **{"hello/broken.py": "def broken(:\n"}), "v3 broken")
    record = services.trigger("hello", "webhook").result(timeout=120)
    assert record is not None and record.result == DeployResult.FAILED
    flush(host)

    def statuses(prefix: str) -> list[tuple[str, dict[str, t.Any]]]:
        return [(hit.path, hit.json) for hit in endpoint.under(prefix)]

    for hit in endpoint.hits:
        assert hit.method == "POST" and hit.headers["content-type"] == "application/json"
    github = statuses("/api/v3/repos/team/hello/statuses/")
    assert [(p.rsplit("/", 1)[1], s["state"]) for p, s in github] == [
        (good, "pending"), (good, "success"), (bad, "pending"), (bad, "failure")]
    for _, status in github:
        assert set(status) == {"state", "target_url", "description", "context"}
        assert status["context"] == "gitplug/hello" and status["target_url"] == STATUS_URL
        assert 0 < len(status["description"]) <= 140
    for hit in endpoint.under("/api/v3/"):
        assert hit.headers["authorization"] == f"Bearer {TOKEN}"
        assert hit.headers["accept"] == "application/vnd.github+json"
    gitlab = statuses("/api/v4/projects/team%2Fhello/statuses/")
    assert [(p.rsplit("/", 1)[1], s["state"]) for p, s in gitlab] == [
        (good, "running"), (good, "success"), (bad, "running"), (bad, "failed")]
    for _, status in gitlab:
        assert set(status) == {"state", "name", "target_url", "description", "ref"}
        assert (status["name"], status["ref"]) == ("gitplug/hello", "main")
    for hit in endpoint.under("/api/v4/"):
        assert hit.headers["private-token"] == TOKEN and "authorization" not in hit.headers
    gitea = statuses("/api/v1/repos/team/hello/statuses/")
    assert [(p.rsplit("/", 1)[1], s["state"]) for p, s in gitea] == [
        (good, "pending"), (good, "success"), (bad, "pending"), (bad, "failure")]
    for _, status in gitea:
        assert set(status) == {"state", "context", "target_url", "description"}
        assert status["context"] == "gitplug/hello"
    for hit in endpoint.under("/api/v1/"):
        assert hit.headers["authorization"] == f"token {TOKEN}"
    # An API deploy resolves its commit after it started: no pending, the result only.
    endpoint.hits.clear()
    host.commit(plugin_files("v4"), "v4")
    record = host.gp.deploy("hello")
    assert record is not None and record.result == DeployResult.LIVE
    flush(host)
    assert [s["state"] for _, s in statuses("/api/v3/")] == ["success"]


def test_a_hanging_or_failing_endpoint_delays_no_deploy(make_host: t.Callable[..., Host],
                                                        endpoint: Endpoint, tmp_path: Path) -> None:
    # The same deploy without notify first: the baseline it is compared with.
    plain = _new_host(tmp_path / "baseline")
    try:
        plain.commit(plugin_files("v2"), "v2")
        baseline = plain.gp.deploy("hello")
        assert baseline is not None and baseline.result == DeployResult.LIVE
    finally:
        plain.gp.shutdown()

    failed_before = notify.failures()
    host = make_host(top={"notify": [
        {"url": endpoint.base + "/hang/x", "events": ["deploy_started"], "timeout": 120},
        {"url": endpoint.base + "/fail/x", "events": ["deploy_succeeded"], "timeout": 5},
    ]})
    # The first deploy's deploy_started is stuck in the endpoint, and with it the sender thread.
    assert endpoint.hanging.wait(60), "the sender never reached the hanging endpoint"
    v2 = host.commit(plugin_files("v2"), "v2")
    record = host.gp.deploy("hello")
    assert record is not None and record.result == baseline.result == DeployResult.LIVE
    assert record.commit == v2 and host.served() == f"200 stamp=v2@{v2[:7]}"
    # The deploy finished while the endpoint still held the sender.
    assert not endpoint.hang_ended.is_set()
    endpoint.release.set()
    flush(host, timeout=120)
    # 500: three tries per message, then given up, logged and counted.
    fails = endpoint.under("/fail/x")
    assert len(fails) == 2 * notify.TRIES, [h.json["deploy_id"] for h in fails]
    assert notify.failures() - failed_before == 2
    said = [r.getMessage() for r in host.logged]
    assert sum("gave up sending deploy_succeeded of hello" in line and "HTTP 500" in line
               for line in said) == 2, said
    body, _ = render_metrics(host.gp)
    assert f"gitplug_notifications_failed_total {float(notify.failures())}" in body.decode()
    assert len(endpoint.under("/hang/x")) == 2  # both deploy_started, once each


def test_a_full_queue_drops_and_counts(make_host: t.Callable[..., Host], endpoint: Endpoint) -> None:
    host = make_host(top={"notify": [
        {"url": endpoint.base + "/hang/q", "events": ["deploy_started", "deploy_succeeded"], "timeout": 120}]})
    assert endpoint.hanging.wait(60)
    config = host.gp.deployer.config
    small = Notifier(lambda: config, sender=object(), queue_size=1)
    before = notify.failures()
    # The first message holds the sender (hanging), the second fills the queue, the third is dropped.
    assert small.publish("deploy_started", "hello", None) == 1
    wait_for(lambda: len(endpoint.under("/hang/q")) >= 2, timeout=60, what="the second sender in the endpoint")
    assert small.publish("deploy_started", "hello", None) == 1
    assert small.publish("deploy_started", "hello", None) == 0
    assert notify.failures() - before == 1
    endpoint.release.set()
    assert small.close(timeout=60)


def test_the_cli_sends_what_it_deploys_before_it_exits(tmp_path: Path, endpoint: Endpoint) -> None:
    """`gitplug deploy` decides the deploy, so it sends its events; they arrive before it exits."""
    repo = GitRepo(tmp_path / "hello")
    sha = write_version(repo, "hello", "v1")
    config = write_config(tmp_path / "deploy.yaml", {"hello": {"repo": str(repo.path)}}, notify=[
        {"url": endpoint.base + "/ok/cli", "events": ["deploy_started", "deploy_succeeded"],
         "secret": "${NOTIFY_SECRET}"}])
    proc = run_cli("deploy", "hello", "-c", config, cwd=tmp_path, env=clean_env(NOTIFY_SECRET=SECRET))
    assert proc.returncode == 0, proc.stderr
    hits = endpoint.under("/ok/cli")
    assert [(h.json["event"], h.json["commit"], h.json["trigger"]) for h in hits] == [
        ("deploy_started", None, "cli"), ("deploy_succeeded", sha, "cli")]
    assert SECRET not in proc.stdout + proc.stderr


def test_canary_events_arrive_with_both_sides_figures(make_host: t.Callable[..., Host], endpoint: Endpoint) -> None:
    host = make_host(top={
        "canary": {"percent": 20, "min_requests": 100000, "duration": 3600},
        "notify": [{"url": endpoint.base + "/ok/json",
                    "events": ["canary_started", "canary_promoted", "canary_aborted"]}],
    })
    v2 = host.commit(plugin_files("v2"), "v2")
    first = host.gp.deploy("hello")
    assert first is not None and first.stage is not None and first.stage.value == "canary"
    aborted = host.gp.abort("hello")
    v3 = host.commit(plugin_files("v3"), "v3")
    second = host.gp.deploy("hello")
    assert second is not None and second.commit == v3
    promoted = host.gp.promote("hello")
    flush(host)
    hits = [hit.json for hit in endpoint.under("/ok/json") if hit.json["plugin"] == "hello"]
    assert [(h["event"], h["deploy_id"]) for h in hits] == [
        ("canary_started", first.id), ("canary_aborted", aborted.id),
        ("canary_started", second.id), ("canary_promoted", promoted.id)]
    started, gone, _, done = hits
    assert (started["to_commit"], started["from_commit"], started["percent"]) == (v2, host.good, 20)
    assert (gone["result"], gone["stage"]) == ("failed", "canary") and gone["reason"] == "aborted by hand (api)"
    assert set(gone["figures"]) >= {"stable", "canary", "percent"}
    assert (done["result"], done["to_commit"], done["reason"]) == ("live", v3, "promoted by hand (api)")
