"""The fault catalogue (issue 5): disk, concurrency and webhooks.

Each test breaks one thing on purpose and asserts that (a) the error names what
was wrong, where and what to do, and (b) the last good release still serves;
the harness and the catalogue's conventions are in :mod:`faults_site`.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import re
import shutil
import threading
import time
import typing as t
from pathlib import Path

import pytest

from faults_site import (
    DEFAULT_GATE,
    PASSING_TEST,
    SECRET,
    Host,
    MiB,
    host_fixture,  # noqa: F401
    make_host_fixture,  # noqa: F401
    plugin_files,
)
from gitplug import signals
from gitplug.state import DeployRecord, DeployResult, parse_iso

# =========================================================================== disk


def test_release_path_squatted_by_a_regular_file(host: Host) -> None:
    """The release directory cannot be written.

    Tests run as root, for whom permission bits do not apply, so an unwritable
    directory is made another way: a regular file already sits where the new
    release directory must be renamed to (what a full or read-only disk, a
    mistaken ``touch`` or a botched restore look like to the stager).
    """
    bad = host.commit(plugin_files("v2"), "v2")
    squatter = host.tmp / "data" / "releases" / "hello" / bad
    squatter.write_text("not a release")
    host.deploy_fails(
        "stage",
        rf"plugin 'hello': could not write the release of {bad} under .*/releases/hello: Not a"
        r" directory.*Check that .*/releases/hello is a directory writable by this user \(fix its"
        r" permissions, or point data_dir elsewhere\)\.",
    )
    assert squatter.read_text() == "not a release"
    assert not [p for p in squatter.parent.iterdir() if p.name.startswith(".tmp-")]


def test_log_directory_not_writable(make_host: t.Callable[..., Host]) -> None:
    """The test gate cannot open its log: ``logs/`` is a regular file (see above for why)."""
    gated_host = make_host(plugin={"test": DEFAULT_GATE, "test_timeout": 60})
    logs = gated_host.tmp / "data" / "logs"
    shutil.rmtree(logs, ignore_errors=True)
    logs.write_text("not a directory")
    bad = gated_host.commit(plugin_files("v2", **{"tests/test_hello.py": PASSING_TEST}), "v2")
    gated_host.deploy_fails(
        "test",
        rf"tests of {bad[:12]} failed.*could not open the test log .*/logs/hello/\d+\.log: .*; check"
        r" that the data_dir is writable",
    )


# =========================================================================== concurrency


def test_deploy_and_rollback_at_once_are_serialised(make_host: t.Callable[..., Host]) -> None:
    slow_test = """
        import time
        def test_slow():
            time.sleep(1.0)
        """
    host = make_host(plugin={"test": DEFAULT_GATE, "test_timeout": 60})
    host.repo.tag("v1", commit=host.good)
    host.commit(plugin_files("v2"), "v2")
    assert host.gp.deploy("hello").result == DeployResult.LIVE
    v3 = host.commit(plugin_files("v3", **{"tests/test_slow.py": slow_test}), "v3 with a slow test")

    results: dict[str, DeployRecord | None] = {}
    errors: list[BaseException] = []
    barrier = threading.Barrier(2)

    def run(kind: str) -> None:
        try:
            barrier.wait(timeout=5)
            results[kind] = (
                host.gp.deploy("hello") if kind == "deploy" else host.gp.rollback("hello", "v1")
            )
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(kind,)) for kind in ("deploy", "rollback")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not errors and not any(thread.is_alive() for thread in threads), errors
    deploy, rollback = results["deploy"], results["rollback"]
    assert deploy is not None and rollback is not None
    assert rollback.result == DeployResult.LIVE and rollback.commit == host.good, rollback

    # Serialised: one ran entirely before the other (deploy lock), in id order.
    first, second = sorted((deploy, rollback), key=lambda r: r.id)
    first_end = parse_iso(first.started_at).timestamp() + (first.duration_s or 0)
    assert parse_iso(second.started_at).timestamp() >= first_end - 0.005, (first, second)
    if first is deploy:
        assert (deploy.result, deploy.commit) == (DeployResult.LIVE, v3), deploy
    else:  # the rollback pinned v1 first: the deploy then targets the pin, already live
        assert deploy.result == DeployResult.SKIPPED and deploy.commit == host.good, deploy

    # Final state consistent: served == live == pinned, and the history has both.
    state = host.gp._state.store.get_plugin("hello")
    assert (state.live_commit, state.pin) == (host.good, "v1"), state
    assert host.served() == f"200 {host.good_stamp}"
    ids = {r.id: r.trigger for r in host.gp.history("hello", limit=5)}
    assert ids[deploy.id] == "api" and ids[rollback.id] == "rollback"


def _rollback_during_deploy(
    host: Host,
) -> tuple[DeployRecord, DeployRecord, str, list[dict[str, t.Any]]]:
    """Start a slow deploy of v3, roll back to v1 while its tests run; return both records."""
    host.repo.tag("v1", commit=host.good)
    host.commit(plugin_files("v2"), "v2")
    assert host.gp.deploy("hello").result == DeployResult.LIVE
    v3 = host.commit(
        plugin_files(
            "v3",
            **{
                "tests/test_slow.py": """
        import time
        def test_slow():
            time.sleep(1.5)
        """
            },
        ),
        "v3 with a slow test",
    )
    fired: list[dict[str, t.Any]] = []

    def on_rolled_back(sender: object, **kwargs: t.Any) -> None:
        fired.append(kwargs)

    results: list[DeployRecord | None] = []
    deployer = threading.Thread(target=lambda: results.append(host.gp.deploy("hello")))
    deployer.start()
    store = host.gp._state.store

    def in_test_gate() -> bool:
        running = [r for r in store.history("hello", limit=3) if r.result == DeployResult.RUNNING]
        return bool(running and running[0].log_path and Path(running[0].log_path).exists())

    deadline = time.monotonic() + 60
    while not in_test_gate():
        assert deployer.is_alive() and time.monotonic() < deadline, results
        time.sleep(0.01)
    signals.rolled_back.connect(on_rolled_back, weak=False)
    try:
        rollback = host.gp.rollback("hello", "v1")  # blocks on the deploy lock
    finally:
        signals.rolled_back.disconnect(on_rolled_back)
    deployer.join(timeout=60)
    assert results and results[0] is not None and rollback is not None
    return results[0], rollback, v3, fired


def test_rollback_during_a_deploy_waits_for_it(make_host: t.Callable[..., Host]) -> None:
    host = make_host(plugin={"test": DEFAULT_GATE, "test_timeout": 60})
    deploy, rollback, v3, _fired = _rollback_during_deploy(host)
    assert (deploy.result, deploy.commit) == (DeployResult.LIVE, v3), deploy
    assert (rollback.result, rollback.commit, rollback.trigger) == (
        DeployResult.LIVE,
        host.good,
        "rollback",
    )
    assert rollback.id > deploy.id
    deploy_end = parse_iso(deploy.started_at).timestamp() + (deploy.duration_s or 0)
    assert parse_iso(rollback.started_at).timestamp() >= deploy_end - 0.005, (deploy, rollback)
    state = host.gp._state.store.get_plugin("hello")
    assert (state.live_commit, state.previous_commit, state.pin) == (host.good, v3, "v1"), state
    assert [r.id for r in host.gp.history("hello", limit=2)] == [rollback.id, deploy.id]
    assert host.served() == f"200 {host.good_stamp}"


def test_rolled_back_signal_names_the_commit_it_replaced(make_host: t.Callable[..., Host]) -> None:
    host = make_host(plugin={"test": DEFAULT_GATE, "test_timeout": 60})
    _deploy, rollback, v3, fired = _rollback_during_deploy(host)
    assert len(fired) == 1
    assert (fired[0]["from_commit"], fired[0]["to_commit"]) == (v3, rollback.commit)


# =========================================================================== webhooks


def _signed(body: bytes, *, delivery: str, secret: str = SECRET) -> dict[str, str]:
    digest = hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    return {
        "X-GitHub-Event": "push",
        "X-GitHub-Delivery": delivery,
        "X-Hub-Signature-256": f"sha256={digest}",
        "Content-Type": "application/json",
    }


def _push(host: Host, after: str) -> bytes:
    return json.dumps(
        {"ref": "refs/heads/main", "after": after, "repository": {"clone_url": host.repo.url}}
    ).encode()


@pytest.fixture
def hook_host(make_host: t.Callable[..., Host]) -> Host:
    return make_host(top={"webhook": {"secret": SECRET, "max_body": "1MiB"}})


def _post(
    host: Host, body: bytes, headers: dict[str, str], path: str = "/_gitplug/webhook"
) -> tuple[int, dict[str, t.Any]]:
    with host.app.test_client() as client:
        response = client.post(path, data=body, headers=headers)
        return response.status_code, response.get_json()


def _wait_idle(host: Host, timeout: float = 60.0) -> None:
    services = host.gp._state.services
    deadline = time.monotonic() + timeout
    while services.queue.busy("hello"):
        assert time.monotonic() < deadline, "the webhook's deploy did not finish"
        time.sleep(0.02)


WEBHOOK_FAULTS = [
    pytest.param(
        lambda body: {
            **_signed(body, delivery="d1", secret="forged"),
        },
        None,
        401,
        r"X-Hub-Signature-256 does not match the body signed with webhook\.secret; give the"
        r" forge's webhook the same secret",
        id="forged-signature",
    ),
    pytest.param(
        lambda body: {
            k: v for k, v in _signed(body, delivery="d1").items() if k != "X-Hub-Signature-256"
        },
        None,
        401,
        r"missing signature: expected X-Hub-Signature-256",
        id="unsigned",
    ),
    pytest.param(
        lambda body: {
            **_signed(body, delivery="d1"),
            "X-Hub-Signature-256": "sha1=" + hmac.new(SECRET.encode(), body, "sha1").hexdigest(),
        },
        None,
        401,
        r"carries a SHA-1 signature, which gitplug refuses; configure the webhook to"
        r" sign with SHA-256",
        id="sha1-downgrade",
    ),
    pytest.param(
        lambda body: _signed(body, delivery="d1"),
        b"\0" * (MiB + 1),
        413,
        rf"the body of {MiB + 1} bytes is over the webhook's limit of {MiB} bytes"
        r" \(webhook\.max_body\)",
        id="oversized",
    ),
    pytest.param(
        lambda body: _signed(body, delivery="d1"),
        b"{not json",
        400,
        r"the body is not valid JSON: .* at line 1 column 2",
        id="malformed-json",
    ),
    pytest.param(
        lambda body: _signed(body, delivery="d1"),
        b'{"ref": "main", "repository": {}}',
        400,
        r"the payload's 'ref' must be a full ref such as 'refs/heads/main'",
        id="bad-ref",
    ),
]


@pytest.mark.parametrize(("headers", "body", "status", "match"), WEBHOOK_FAULTS)
def test_webhook_refuses_and_deploys_nothing(
    hook_host: Host,
    headers: t.Callable[[bytes], dict[str, str]],
    body: bytes | None,
    status: int,
    match: str,
) -> None:
    v2 = hook_host.commit(plugin_files("v2"), "v2")
    payload = body if body is not None else _push(hook_host, v2)
    code, answer = _post(hook_host, payload, headers(payload))
    assert code == status, answer
    assert re.search(match, answer["message"]), answer
    _wait_idle(hook_host)
    assert not hook_host.gp._state.services.queue.busy("hello")
    assert [r.commit for r in hook_host.gp.history("hello")] == [hook_host.good]
    hook_host.assert_good_serves()


def test_webhook_unknown_plugin(hook_host: Host) -> None:
    body = _push(hook_host, hook_host.good)
    code, answer = _post(hook_host, body, _signed(body, delivery="u1"), "/_gitplug/webhook/nope")
    assert code == 404
    assert "no plugin named 'nope' in the configuration; check the webhook URL" in answer["message"]
    hook_host.assert_good_serves()


def test_trigger_of_a_plugin_removed_while_queued_is_dropped_quietly(
    host: Host, caplog: pytest.LogCaptureFixture
) -> None:
    """A push that deletes a discovered plugin's directory queues that plugin's deploy,
    then its scan removes the plugin: the queued trigger finds no plugin. It is dropped
    with one INFO line, not a traceback in the server's log."""
    from gitplug.deploy.triggers import Trigger

    queue = host.gp._state.services.queue
    caplog.set_level(logging.INFO, logger="gitplug")
    # The same path with a configured plugin runs a deploy: the trigger is really executed.
    done = queue.submit(Trigger("hello", "webhook")).result(timeout=60)
    assert done is None or done.plugin == "hello"
    assert queue.submit(Trigger("gone", "webhook")).result(timeout=60) is None
    lines = [(r.levelno, r.getMessage()) for r in caplog.records if "gone" in r.getMessage()]
    assert lines == [(logging.INFO, "plugin gone: webhook trigger dropped: the plugin is no longer configured")]
    assert not any(r.exc_info for r in caplog.records), [r.getMessage() for r in caplog.records if r.exc_info]
    host.assert_good_serves()


def test_webhook_without_a_secret_refuses_everything(host: Host) -> None:
    body = _push(host, host.good)
    code, answer = _post(host, body, _signed(body, delivery="n1"))
    assert code == 403
    assert re.search(
        r"the webhook is disabled because no secret is configured\. Set 'webhook:"
        r" \{secret: \$\{GITPLUG_WEBHOOK_SECRET\}\}' in deploy\.yaml",
        answer["message"],
    )
    host.assert_good_serves()


def test_replayed_webhook_deploys_nothing(hook_host: Host) -> None:
    first = _push(hook_host, hook_host.good)
    code, answer = _post(hook_host, first, _signed(first, delivery="delivery-1"))
    assert (code, answer["status"]) == (202, "queued"), answer
    _wait_idle(hook_host)  # v1 is already live: nothing to do

    # A new commit lands; an attacker (or a retrying proxy) replays the old delivery.
    v2 = hook_host.commit(plugin_files("v2"), "v2")
    code, answer = _post(hook_host, first, _signed(first, delivery="delivery-1"))
    assert (code, answer["status"]) == (200, "duplicate"), answer
    assert answer["message"] == "delivery delivery-1 was already handled; nothing queued"
    assert answer["queued"] == []
    _wait_idle(hook_host)
    hook_host.assert_good_serves()

    # Not vacuous: a fresh delivery does deploy the new commit.
    fresh = _push(hook_host, v2)
    code, answer = _post(hook_host, fresh, _signed(fresh, delivery="delivery-2"))
    assert (code, answer["status"]) == (202, "queued"), answer
    _wait_idle(hook_host)
    assert hook_host.served() == f"200 stamp=v2@{v2[:7]}"
    assert hook_host.gp.history("hello")[0].trigger == "webhook"
