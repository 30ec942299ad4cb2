"""gitplug's HTTP surface over real HTTP (SPEC 5, 7, 10).

One ``gitplug serve`` subprocess serves the whole module, configured with
``admin_token: ${GITPLUG_ADMIN_TOKEN}`` and ``webhook.secret:
${GITPLUG_WEBHOOK_SECRET}`` from its environment. Tests run in file order
and each leaves the plugin live, unpinned and started. Polling is hourly, so
what deploys after a push is the webhook.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
import typing as t
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from flask import Flask
from prometheus_client.parser import text_string_to_metric_families

from gitplug import GitPlug
from gitrepo import GitRepo
from serverproc import (
    RECORD_KEYS,
    STATUS_KEYS,
    Server,
    clean_env,
    expected,
    promptly,
    request,
    run_cli,
    wait_for,
    within,
    write_version,
)

TOKEN = "admin-" + uuid.uuid4().hex
SECRET = "hook-" + uuid.uuid4().hex

CONFIG = """\
data_dir: data
poll_interval: 3600
admin_token: ${{GITPLUG_ADMIN_TOKEN}}
webhook:
  secret: ${{GITPLUG_WEBHOOK_SECRET}}
  max_body: 1MiB
plugins:
  hello:
    repo: {repo}
    ref: main
    test: false
"""


@dataclass
class Site:
    server: Server
    repo: GitRepo
    config: Path
    v1: str

    def api(
        self, method: str, path: str, payload: t.Any = None, *, token: str | None = TOKEN
    ) -> tuple[int, t.Any]:
        """A JSON request to ``/_gitplug<path>``; ``(status, decoded body)``."""
        headers = {"Content-Type": "application/json"}
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        body = None if payload is None else json.dumps(payload).encode()
        status, text = request(
            method, f"{self.server.base}/_gitplug{path}", body=body, headers=headers
        )
        return status, json.loads(text)

    def served(self) -> str:
        return self.server.get("/hello/")

    def history(self) -> list[dict[str, t.Any]]:
        status, records = self.api("GET", "/api/plugins/hello/history")
        assert status == 200
        return t.cast(list[dict[str, t.Any]], records)

    def hook(
        self,
        payload: dict[str, t.Any],
        *,
        delivery: str | None = None,
        secret: str = SECRET,
        path: str = "/webhook",
        body: bytes | None = None,
    ) -> tuple[int, dict[str, t.Any], float]:
        """Send a GitHub push; ``(status, body, seconds it took to answer)``."""
        raw = body if body is not None else json.dumps(payload).encode()
        signature = hmac.new(secret.encode(), raw, hashlib.sha256).hexdigest()
        headers = {
            "Content-Type": "application/json",
            "X-GitHub-Event": "push",
            "X-GitHub-Delivery": delivery or str(uuid.uuid4()),
            "X-Hub-Signature-256": f"sha256={signature}",
        }
        start = time.monotonic()
        status, text = request(
            "POST", f"{self.server.base}/_gitplug{path}", body=raw, headers=headers
        )
        return status, json.loads(text), time.monotonic() - start

    def push(self, ref: str = "refs/heads/main") -> dict[str, t.Any]:
        return {
            "ref": ref,
            "after": self.repo.head,
            "repository": {"clone_url": self.repo.url, "default_branch": "main"},
        }


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    root = tmp_path_factory.mktemp("api")
    repo = GitRepo(root / "hello-repo")
    v1 = write_version(repo, "hello", "v1")
    repo.tag("v1")
    config = root / "deploy.yaml"
    config.write_text(CONFIG.format(repo=repo.url))
    env = clean_env(GITPLUG_ADMIN_TOKEN=TOKEN, GITPLUG_WEBHOOK_SECRET=SECRET)
    deployed = run_cli("deploy", "hello", "-c", config, env=env)
    assert deployed.returncode == 0, deployed.stderr
    with Server(config, env=env) as server:
        site = Site(server, repo, config, v1)
        # The controller polls once, a second after it starts; wait for that poll
        # so that only the requests of the tests below deploy anything.
        wait_for(
            lambda: (
                'gitplug_last_successful_poll_timestamp_seconds{plugin="hello"}'
                in site_metrics(site)
            ),
            timeout=30,
            interval=0.1,
            what="the startup poll",
        )
        yield site
    assert "Traceback" not in server.log(), server.log()


def site_metrics(site: Site) -> str:
    status, text = request(
        "GET", f"{site.server.base}/_gitplug/metrics", headers={"Authorization": f"Bearer {TOKEN}"}
    )
    assert status == 200, text
    return text


# --------------------------------------------------------------------------- authentication


def test_no_admin_token_configured_refuses_with_how_to(tmp_path: Path) -> None:
    repo = GitRepo(tmp_path / "repo")
    write_version(repo, "hello", "v1")
    app = Flask("host")
    app.config["GITPLUG"] = {
        "data_dir": str(tmp_path / "data"),
        "poll_interval": 3600,
        "plugins": {"hello": {"repo": repo.url, "test": False}},
    }
    gp = GitPlug(app)
    try:
        client = app.test_client()
        for method, path in (
            ("GET", "/api/plugins"),
            ("GET", "/api/plugins/hello"),
            ("POST", "/api/plugins/hello/deploy"),
            ("GET", "/metrics"),
        ):
            response = client.open(
                f"/_gitplug{path}", method=method, headers={"Authorization": "Bearer anything"}
            )
            assert response.status_code == 403, path
            message = response.get_json()["error"]
            assert "no admin token is configured" in message
            assert (
                "admin_token: ${GITPLUG_ADMIN_TOKEN}" in message
                and "export GITPLUG_ADMIN_TOKEN=" in message
            )
        # No webhook secret either: the webhook refuses everything.
        response = client.post("/_gitplug/webhook", data=b"{}", headers={"X-GitHub-Event": "push"})
        assert response.status_code == 403
        assert "GITPLUG_WEBHOOK_SECRET" in response.get_json()["message"]
    finally:
        gp.shutdown()


def test_admin_token_is_required(site: Site) -> None:
    assert "${GITPLUG_ADMIN_TOKEN}" in site.config.read_text()  # from the environment, not the file
    status, body = site.api("GET", "/api/plugins", token=None)
    assert status == 401 and "Authorization: Bearer <admin_token>" in body["error"]
    status, body = site.api("GET", "/api/plugins", token="wrong")
    assert (status, body) == (401, {"error": "wrong admin token"})
    status, body = site.api("POST", "/api/plugins/hello/stop", token="wrong")
    assert status == 401
    assert site.served() == expected("hello", "v1", site.v1)
    assert site.api("GET", "/api/plugins")[0] == 200


# --------------------------------------------------------------------------- the JSON API


def test_status_and_history_shapes(site: Site) -> None:
    status, body = site.api("GET", "/api/plugins")
    assert status == 200 and list(body) == ["plugins"]
    (plugin,) = body["plugins"]
    assert STATUS_KEYS <= set(plugin), plugin
    assert (plugin["name"], plugin["repo"], plugin["ref"], plugin["pin"]) == (
        "hello",
        site.repo.url,
        "main",
        None,
    )
    assert (plugin["state"], plugin["live_commit"]) == ("live", site.v1)
    assert f":{site.server.pid}:" in "".join(plugin["workers"])
    assert set(plugin["workers"].values()) == {site.v1}
    assert RECORD_KEYS <= set(plugin["last_deploy"])

    status, one = site.api("GET", "/api/plugins/hello")
    assert status == 200
    assert {k: one[k] for k in STATUS_KEYS - {"workers"}} == {
        k: plugin[k] for k in STATUS_KEYS - {"workers"}
    }

    history = site.history()
    assert history[0] == plugin["last_deploy"]
    assert (history[0]["trigger"], history[0]["result"], history[0]["commit"]) == (
        "cli",
        "live",
        site.v1,
    )
    assert all(RECORD_KEYS <= set(r) for r in history)


def test_deploy_rollback_resume_stop_start(site: Site) -> None:
    v2 = write_version(site.repo, "hello", "v2")
    status, record = site.api("POST", "/api/plugins/hello/deploy", {"wait": True})
    assert status == 200, record
    assert RECORD_KEYS <= set(record)
    assert (record["trigger"], record["result"], record["commit"]) == ("api", "live", v2)
    assert site.served() == expected("hello", "v2", v2)  # this process swapped it

    status, body = site.api("POST", "/api/plugins/hello/deploy", {"wait": False})
    assert (status, body) == (202, {"status": "queued"})

    def queued_done() -> dict[str, t.Any] | None:
        last = site.history()[0]
        return last if last["id"] > record["id"] and last["result"] != "running" else None

    wait_for(queued_done, timeout=20, what="the queued deploy")
    queued = site.history()[0]
    assert (queued["trigger"], queued["result"], queued["commit"]) == ("api", "skipped", v2)

    status, record = site.api("POST", "/api/plugins/hello/rollback", {"ref": "v1"})
    assert status == 200, record
    assert (record["trigger"], record["result"], record["commit"], record["ref"]) == (
        "rollback",
        "live",
        site.v1,
        "v1",
    )
    assert site.served() == expected("hello", "v1", site.v1)
    status, plugin = site.api("GET", "/api/plugins/hello")
    assert (plugin["pin"], plugin["live_commit"]) == ("v1", site.v1)

    status, record = site.api("POST", "/api/plugins/hello/resume")
    assert status == 200 and (record["result"], record["commit"]) == ("live", v2), record
    assert site.served() == expected("hello", "v2", v2)
    assert site.api("GET", "/api/plugins/hello")[1]["pin"] is None

    assert site.api("POST", "/api/plugins/hello/stop") == (
        200,
        {"status": "stopped", "plugin": "hello"},
    )
    assert site.served().startswith("404 ")
    assert site.api("GET", "/api/plugins/hello")[1]["state"] == "stopped"
    assert site.api("POST", "/api/plugins/hello/start") == (
        200,
        {"status": "started", "plugin": "hello"},
    )
    assert site.served() == expected("hello", "v2", v2)


def test_unknown_plugin_and_bad_requests(site: Site) -> None:
    for method, path, payload in (
        ("GET", "/api/plugins/nope", None),
        ("GET", "/api/plugins/nope/history", None),
        ("POST", "/api/plugins/nope/deploy", {}),
        ("POST", "/api/plugins/nope/rollback", {"ref": "v1"}),
        ("POST", "/api/plugins/nope/resume", None),
        ("POST", "/api/plugins/nope/stop", None),
        ("POST", "/api/plugins/nope/start", None),
    ):
        status, body = site.api(method, path, payload)
        assert status == 404, (path, body)
        assert body["error"].startswith(
            "no plugin named 'nope' in the configuration. Known plugins: hello."
        )

    assert site.api("POST", "/api/plugins/nope/rollback", {})[0] == 404
    status, body = site.api("POST", "/api/plugins/hello/rollback", {})
    assert status == 400 and "rollback needs a ref" in body["error"]
    status, body = site.api("POST", "/api/plugins/hello/rollback", {"ref": "no-such-tag"})
    assert status == 409 and (body["result"], body["stage"]) == ("failed", "fetch"), body
    assert "no-such-tag" in body["error"]
    # A failed rollback changes nothing: no pin, the same release.
    plugin = site.api("GET", "/api/plugins/hello")[1]
    assert (plugin["pin"], plugin["state"]) == (None, "live")
    assert site.served().startswith("200 hello v2 ")


# --------------------------------------------------------------------------- the webhook


def test_webhook_push_deploys_once_per_delivery(site: Site) -> None:
    v3 = write_version(site.repo, "hello", "v3")
    delivery = str(uuid.uuid4())
    pushed = time.monotonic()
    status, body, took = site.hook(site.push(), delivery=delivery)
    assert (status, body["status"], body["queued"]) == (202, "queued", ["hello"]), body
    promptly(took, 1, what="the webhook's answer (it queues, never waits for the deploy)")
    within(5, lambda: site.served() == expected("hello", "v3", v3), what="v3 after the push")
    # The positive control: how long a delivery that deploys takes to be served here.
    live_after = time.monotonic() - pushed
    # The swap serves v3 a few milliseconds before the deploy's record is written.
    wait_for(lambda: site.history()[0]["result"] != "running", timeout=10,
             what="the deploy's record to be written")
    last = site.history()[0]
    assert (last["trigger"], last["result"], last["commit"]) == ("webhook", "live", v3)
    count = len(site.history())

    # v4 is pushed, but neither a repeated delivery nor a forged one deploys it.
    v4 = write_version(site.repo, "hello", "v4")
    status, body, _ = site.hook(site.push(), delivery=delivery)
    assert (status, body["status"]) == (200, "duplicate"), body
    status, body, _ = site.hook(site.push(), secret="not-the-secret")
    assert (status, body["status"]) == (401, "unauthorized"), body
    assert "X-Hub-Signature-256 does not match" in body["message"]
    # Three times what the real delivery above took to go live: a deploy queued
    # by either refused delivery would show by now.
    time.sleep(max(1.0, 3 * live_after))
    assert len(site.history()) == count
    assert site.served() == expected("hello", "v3", v3)

    # A fresh delivery to /webhook/hello does.
    status, body, took = site.hook(site.push(), path="/webhook/hello")
    assert (status, body["queued"]) == (202, ["hello"]), body
    promptly(took, 1, what="the webhook's answer (it queues, never waits for the deploy)")
    within(5, lambda: site.served() == expected("hello", "v4", v4), what="v4 after the push")


def test_webhook_refusals(site: Site) -> None:
    before = len(site.history())
    # Over webhook.max_body (1MiB here): refused from its Content-Length.
    status, body, _ = site.hook({}, body=b"{" + b" " * (1 << 20) + b"}")
    assert (status, body["status"]) == (413, "too_large"), body
    assert "limit of 1048576 bytes (webhook.max_body)" in body["message"]

    status, body, _ = site.hook(site.push(), path="/webhook/nope")
    assert (status, body["status"]) == (404, "unknown_plugin"), body

    status, body, _ = site.hook(site.push("refs/heads/feature"))
    assert (status, body["status"]) == (200, "unmatched"), body
    assert "plugin 'hello' tracks 'main', not refs/heads/feature" in body["message"]

    status, body, _ = site.hook(site.push(), body=b"not json")
    assert (status, body["status"]) == (400, "bad_request"), body
    assert len(site.history()) == before


# --------------------------------------------------------------------------- metrics


def _metric_samples(site: Site) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(site_metrics(site))
        for s in family.samples
    }


def test_metrics(site: Site) -> None:
    """Each figure moves by exactly what this test did (whatever ran before it)."""
    live_key = ("gitplug_deploys_total", (("plugin", "hello"), ("result", "live")))
    failed_key = ("gitplug_deploys_total", (("plugin", "hello"), ("result", "failed")))
    before = _metric_samples(site)

    good = write_version(site.repo, "hello", "metrics-good")
    status, record = site.api("POST", "/api/plugins/hello/deploy", {"wait": True})
    assert status == 200 and (record["result"], record["commit"]) == ("live", good), record
    write_version(site.repo, "hello", "metrics-broken", broken=True)
    status, record = site.api("POST", "/api/plugins/hello/deploy", {"wait": True})
    assert status == 409 and record["result"] == "failed", record  # a failed deploy is a conflict
    for _ in range(3):
        assert site.served() == expected("hello", "metrics-good", good)

    after = _metric_samples(site)
    assert after[live_key] - before.get(live_key, 0) == 1
    assert after[failed_key] - before.get(failed_key, 0) == 1
    info = [labels for name, labels in after if name == "gitplug_live_release_info"]
    assert (("commit", good), ("plugin", "hello"), ("release", good)) in info
    # A new commit: only this test's three requests can have reached it.
    assert after[("gitplug_plugin_requests_total", (("commit", good), ("plugin", "hello")))] == 3
