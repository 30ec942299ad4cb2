"""Notifications: deploy events POSTed to the endpoints of ``notify:``, in the background.

A :class:`Notifier` subscribes to the pipeline's signals (``deploy_started``,
``deploy_succeeded``, ``deploy_failed``, ``rolled_back``, the canary events)
for one :class:`~gitplug.deploy.pipeline.Deployer`. Only the process that runs a
deploy sends its signals, so each event is sent once, by the process that
decided it (the controller, the worker that received a push, or the CLI).
It also hears ``host_lost``, which a fleet's host controller sends with its
deployer as sender, once per fleet per loss (:mod:`.hostwatch`); its body is
:func:`host_lost_payload`, and an entry with ``plugins`` gets it when the
lost host served or led one of them.

For every ``notify`` entry whose ``events`` (and ``plugins``, when given)
match, the message is built on the deploy's thread (no I/O) and put on a
bounded queue; one sender thread per process, started with the first
message, delivers it: a deadline per request (the entry's ``timeout``),
three tries with backoff (0.5 s, then 1.5 s), then the loss is logged and
counted (:func:`failures`, shown as ``gitplug_notifications_failed_total``
by the metrics). A full queue drops the message (logged and counted too).
Nothing here ever blocks or fails a deploy.

Formats (README, "Notifications"):

* ``json``: the documented payload (:func:`payload`), signed with
  ``X-Gitplug-Signature: sha256=<hex HMAC-SHA256 of the body>`` when the
  entry has a ``secret``;
* ``slack``: ``{"text": ...}``, Slack's and Mattermost's incoming webhooks;
* ``github``, ``gitlab``, ``gitea``: a commit status named
  ``gitplug/<plugin>`` on the deployed commit, ``url`` being the
  repository's API URL (``.../statuses/<sha>`` is appended):

  - GitHub: ``POST {url}/statuses/{sha}``, ``Authorization: Bearer``,
    ``{"state": pending|success|failure, "target_url", "description", "context"}``;
  - GitLab: ``POST {url}/statuses/{sha}``, ``PRIVATE-TOKEN``,
    ``{"state": running|success|failed, "name", "target_url", "description", "ref"}``;
  - Gitea/Forgejo: ``POST {url}/statuses/{sha}``, ``Authorization: token``,
    ``{"state": pending|success|failure, "context", "target_url", "description"}``.

  A status needs the commit: a ``deploy_started`` whose commit is not
  resolved yet (a CLI or API deploy of a branch) posts none, and the forge
  formats take the ``deploy_*`` events only: the others (the canary events,
  ``host_lost``) are accepted in their ``events`` and post nothing.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import queue
import socket
import threading
import time
import typing as t
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone

import urllib3

from .. import signals
from ..config import GitplugConfig, NotifyTarget
from ..state import DeployRecord, HostInfo, iso_at

__all__ = ["Notifier", "Message", "failures", "payload", "host_lost_payload", "EVENTS", "FORGE_FORMATS"]

logger = logging.getLogger(__name__)

#: Every event a ``notify`` entry may list. The canary events add ``percent``
#: and ``figures`` (both sides', README "Canary releases") to the body;
#: ``host_lost`` (a fleet's host went silent) has a body of its own
#: (:func:`host_lost_payload`), sent once per fleet per loss.
EVENTS: t.Final = ("deploy_started", "deploy_succeeded", "deploy_failed", "rolled_back",
                   "canary_started", "canary_promoted", "canary_aborted", "host_lost")
FORGE_FORMATS: t.Final = ("github", "gitlab", "gitea")
#: Tries per message, and the pause before each retry (seconds).
TRIES: t.Final = 3
BACKOFF_S: t.Final = (0.5, 1.5)
QUEUE_SIZE: t.Final = 1000
USER_AGENT: t.Final = "gitplug-notify/1"

_FORGE_STATE = {
    "github": {"deploy_started": "pending", "deploy_succeeded": "success", "deploy_failed": "failure"},
    "gitea": {"deploy_started": "pending", "deploy_succeeded": "success", "deploy_failed": "failure"},
    "gitlab": {"deploy_started": "running", "deploy_succeeded": "success", "deploy_failed": "failed"},
}

_counts_lock = threading.Lock()
_failed = 0


def failures() -> int:
    """Messages this process gave up on (after every try, or dropped on a full queue)."""
    with _counts_lock:
        return _failed


def _count_failure() -> None:
    global _failed
    with _counts_lock:
        _failed += 1


@dataclass(frozen=True)
class Message:
    """One HTTP request to send: built when the event happens, sent later."""

    url: str
    body: bytes = field(repr=False)
    headers: dict[str, str] = field(repr=False, hash=False)
    timeout: float
    what: str  #: "deploy_failed of hello to https://hooks.example.com" (for logs; no secrets)


def payload(event: str, plugin: str, record: DeployRecord | None, *, status_url: str | None,
            host: str, **extra: t.Any) -> dict[str, t.Any]:
    """The ``json`` format's body (documented in the README, "Notifications")."""
    body: dict[str, t.Any] = {
        "event": event,
        "plugin": plugin,
        "commit": record.commit if record else extra.get("to_commit"),
        "ref": record.ref if record else None,
        "result": record.result.value if record else None,
        "stage": record.stage.value if record and record.stage else None,
        "error": record.error if record else None,
        "trigger": record.trigger if record else None,
        "deploy_id": record.id if record else None,
        "host": (record.host if record and record.host else host),
        "status_url": status_url,
        "at": datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z"),
    }
    body.update({k: v for k, v in extra.items()
                 if k in ("from_commit", "to_commit", "reason", "percent", "figures")})
    return body


def host_lost_payload(info: HostInfo, *, reported_by: str, status_url: str | None) -> dict[str, t.Any]:
    """The ``json`` body of ``host_lost`` (README, "Notifications").

    The fields every event has, ``plugin`` and the deploy's (``commit`` ...
    ``deploy_id``) null; ``host`` is the lost host, ``plugins`` what it
    served and led as its last heartbeat said, ``last_heartbeat_at`` that
    beat's time, ``reported_by`` the host that noticed.
    """
    body: dict[str, t.Any] = {
        "event": "host_lost",
        "plugin": None,
        **dict.fromkeys(("commit", "ref", "result", "stage", "error", "trigger", "deploy_id")),
        "host": info.host_id,
        "plugins": {
            name: {"live_commit": entry.live_commit, "leader": entry.leads, "error": entry.error}
            for name, entry in sorted(info.plugins.items())
        },
        "last_heartbeat_at": iso_at(info.heartbeat_at),
        "reported_by": reported_by,
        "status_url": status_url,
        "at": datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z"),
    }
    return body


def _served(info: HostInfo) -> set[str]:
    """The plugins a host served (a commit) or led, as its last heartbeat said."""
    return {name for name, entry in info.plugins.items() if entry.live_commit or entry.leads}


def _summary(body: dict[str, t.Any]) -> str:
    """One line for people (Slack, Mattermost; the forge status description)."""
    plugin, commit = body["plugin"], (body["commit"] or "")[:12]
    at = f" on {body['host']}" if body.get("host") else ""
    event = body["event"]
    if event == "host_lost":
        plugins = body.get("plugins") or {}
        served = [f"{name} {(entry.get('live_commit') or '-')[:12]}" + (" (leader)" if entry.get("leader") else "")
                  for name, entry in plugins.items() if entry.get("live_commit") or entry.get("leader")]
        return (f"host {body['host']} is lost: no heartbeat since {body['last_heartbeat_at']}"
                + (f"; it served {', '.join(served)}" if served else "; it served nothing")
                + f" (reported by {body['reported_by']})")
    if event == "deploy_started":
        text = f"deploying {plugin} {commit or body.get('ref') or ''}".rstrip() + f" ({body['trigger']}){at}"
    elif event == "deploy_succeeded":
        text = f"{plugin} {commit} is live ({body['trigger']}){at}"
    elif event == "deploy_failed":
        error = (body.get("error") or "").strip().splitlines()
        text = f"deploy of {plugin} {commit} failed at {body.get('stage') or '?'}{at}" + (
            f": {error[0]}" if error else "")
    elif event == "rolled_back":
        text = (f"{plugin} rolled back from {(body.get('from_commit') or '?')[:12]} to "
                f"{(body.get('to_commit') or '?')[:12]}{at}: {body.get('reason') or ''}").rstrip(": ")
    else:
        text = f"{event.replace('_', ' ')}: {plugin} {commit}{at}"
    return text


def _message(target: NotifyTarget, event: str, body: dict[str, t.Any]) -> Message | None:
    """The request ``target`` wants for this event, or None (a forge status needs a commit)."""
    headers = {"User-Agent": USER_AGENT, "Content-Type": "application/json"}
    subject = body["plugin"] if body["plugin"] is not None else f"host {body['host']}"
    what = f"{event} of {subject} to {target.display_url}"
    if target.format == "json":
        data = json.dumps(body, sort_keys=True).encode()
        headers.update({"X-Gitplug-Event": event, "X-Gitplug-Delivery": str(uuid.uuid4())})
        if target.secret:
            digest = hmac.new(target.secret.encode(), data, hashlib.sha256).hexdigest()
            headers["X-Gitplug-Signature"] = f"sha256={digest}"
        return Message(target.url, data, headers, target.timeout, what)
    if target.format == "slack":
        text = "gitplug: " + _summary(body)
        if body.get("status_url"):
            text += f" <{body['status_url']}|status>"
        return Message(target.url, json.dumps({"text": text}).encode(), headers, target.timeout, what)
    # A commit status is per commit: the forges take the deploy_* events only.
    state = _FORGE_STATE[target.format].get(event)
    commit = body.get("commit")
    if state is None or not commit:
        return None
    description = _summary(body)[:140]  # GitHub keeps 140 characters
    context = f"gitplug/{body['plugin']}"
    status: dict[str, t.Any] = {"state": state, "description": description}
    if body.get("status_url"):
        status["target_url"] = body["status_url"]
    if target.format == "github":
        status["context"] = context
        headers.update({"Authorization": f"Bearer {target.token}", "Accept": "application/vnd.github+json",
                        "X-GitHub-Api-Version": "2022-11-28"})
    elif target.format == "gitea":
        status["context"] = context
        headers["Authorization"] = f"token {target.token}"
    else:  # gitlab
        status["name"] = context
        if body.get("ref") and not str(body["ref"]).startswith("refs/"):
            status["ref"] = body["ref"]
        headers["PRIVATE-TOKEN"] = str(target.token)
    url = f"{target.url.rstrip('/')}/statuses/{commit}"
    return Message(url, json.dumps(status).encode(), headers, target.timeout, what)


class Notifier:
    """Sends the ``notify`` messages of one deployer's events; see the module docstring."""

    def __init__(self, config: t.Callable[[], GitplugConfig], *, sender: object,
                 queue_size: int = QUEUE_SIZE) -> None:
        self._config = config
        self._sender = sender
        self._queue: queue.Queue[Message | None] = queue.Queue(maxsize=queue_size)
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._pending = 0
        self._idle = threading.Condition(self._lock)
        self._closed = False
        self._pool = urllib3.PoolManager(num_pools=8, retries=False)
        self._host = socket.gethostname()
        self._connected = False

    def __repr__(self) -> str:
        return f"<Notifier pending={self._pending}>"

    def connect(self) -> Notifier:
        """Subscribe to the deployer's signals (idempotent)."""
        if not self._connected:
            signals.deploy_started.connect(self._on_started, sender=self._sender, weak=False)
            signals.deploy_succeeded.connect(self._on_succeeded, sender=self._sender, weak=False)
            signals.deploy_failed.connect(self._on_failed, sender=self._sender, weak=False)
            signals.rolled_back.connect(self._on_rolled_back, sender=self._sender, weak=False)
            for signal, receiver in self._canary_receivers():
                signal.connect(receiver, sender=self._sender, weak=False)
            signals.host_lost.connect(self._on_host_lost, sender=self._sender, weak=False)
            self._connected = True
        return self

    def close(self, timeout: float = 0.0) -> bool:
        """Unsubscribe; wait up to ``timeout`` s for queued messages. True when none is left."""
        if self._connected:
            for signal, receiver in ((signals.deploy_started, self._on_started),
                                     (signals.deploy_succeeded, self._on_succeeded),
                                     (signals.deploy_failed, self._on_failed),
                                     (signals.rolled_back, self._on_rolled_back)):
                signal.disconnect(receiver, sender=self._sender)
            for signal, receiver in self._canary_receivers():
                signal.disconnect(receiver, sender=self._sender)
            signals.host_lost.disconnect(self._on_host_lost, sender=self._sender)
            self._connected = False
        done = self.flush(timeout)
        with self._lock:
            self._closed = True
            thread = self._thread
        if thread is not None:
            try:
                self._queue.put_nowait(None)
            except queue.Full:
                pass  # the thread is daemonic: it ends with the process
        if not done:
            logger.warning("gitplug: %d notification(s) not sent before exit", self._pending)
        return done

    def flush(self, timeout: float) -> bool:
        """Wait until every queued message was sent or given up on; False on timeout."""
        deadline = time.monotonic() + timeout
        with self._idle:
            while self._pending:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._idle.wait(remaining)
        return True

    # -- signals (on the deploy's thread: build, queue, never raise) ----------------

    def _on_started(self, sender: object, *, plugin: str, deploy: DeployRecord, **_: t.Any) -> None:
        self.publish("deploy_started", plugin, deploy)

    def _on_succeeded(self, sender: object, *, plugin: str, deploy: DeployRecord, **_: t.Any) -> None:
        self.publish("deploy_succeeded", plugin, deploy)

    def _on_failed(self, sender: object, *, plugin: str, deploy: DeployRecord, **_: t.Any) -> None:
        self.publish("deploy_failed", plugin, deploy)

    def _on_rolled_back(self, sender: object, *, plugin: str, deploy: DeployRecord, from_commit: str | None = None,
                        to_commit: str | None = None, reason: str | None = None, **_: t.Any) -> None:
        self.publish("rolled_back", plugin, deploy, from_commit=from_commit, to_commit=to_commit, reason=reason)

    def _canary_receivers(self) -> tuple[tuple[t.Any, t.Any], ...]:
        return ((signals.canary_started, self._on_canary_started),
                (signals.canary_promoted, self._on_canary_promoted),
                (signals.canary_aborted, self._on_canary_aborted))

    def _on_canary(self, event: str, plugin: str, deploy: DeployRecord, *, commit: str | None = None,
                   stable_commit: str | None = None, percent: float | None = None,
                   figures: dict[str, t.Any] | None = None, reason: str | None = None) -> None:
        self.publish(event, plugin, deploy, to_commit=commit, from_commit=stable_commit, reason=reason,
                     percent=percent if percent is not None else (figures or {}).get("percent"), figures=figures)

    def _on_canary_started(self, sender: object, *, plugin: str, deploy: DeployRecord, **kwargs: t.Any) -> None:
        self._on_canary("canary_started", plugin, deploy, **kwargs)

    def _on_canary_promoted(self, sender: object, *, plugin: str, deploy: DeployRecord, **kwargs: t.Any) -> None:
        self._on_canary("canary_promoted", plugin, deploy, **kwargs)

    def _on_canary_aborted(self, sender: object, *, plugin: str, deploy: DeployRecord, **kwargs: t.Any) -> None:
        self._on_canary("canary_aborted", plugin, deploy, **kwargs)

    def _on_host_lost(self, sender: object, *, info: HostInfo, reported_by: str, **_: t.Any) -> None:
        self.publish_host_lost(info, reported_by=reported_by)

    def publish(self, event: str, plugin: str, record: DeployRecord | None, **extra: t.Any) -> int:
        """Queue ``event`` for every matching entry; returns how many messages were queued."""
        return self._publish(
            event, plugin, {plugin},
            lambda status_url: payload(event, plugin, record, status_url=status_url, host=self._host, **extra))

    def publish_host_lost(self, info: HostInfo, *, reported_by: str) -> int:
        """Queue ``host_lost`` of ``info``'s host for every matching entry (an entry with
        ``plugins`` when the host served or led one of them); returns how many were queued."""
        return self._publish(
            "host_lost", f"host {info.host_id}", _served(info),
            lambda status_url: host_lost_payload(info, reported_by=reported_by, status_url=status_url))

    def _publish(self, event: str, what: str, plugins: set[str],
                 build: t.Callable[[str | None], dict[str, t.Any]]) -> int:
        try:
            config = self._config()
            targets = [n for n in config.notify if event in n.events
                       and (n.plugins is None or not n.plugins.isdisjoint(plugins))]
            if not targets:
                return 0
            status_url = (config.public_url.rstrip("/") + config.api_prefix + "/") if config.public_url else None
            body = build(status_url)
            queued = 0
            for target in targets:
                message = _message(target, event, body)
                if message is not None and self._put(message):
                    queued += 1
            return queued
        except Exception:  # noqa: BLE001 - a notification must never break a deploy
            logger.exception("gitplug: could not queue the %s notification of %s", event, what)
            return 0

    def _put(self, message: Message) -> bool:
        with self._lock:
            if self._closed:
                return False
            self._pending += 1
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="gitplug-notify", daemon=True)
                self._thread.start()
        try:
            self._queue.put_nowait(message)
        except queue.Full:
            self._done()
            _count_failure()
            logger.warning("gitplug: notification queue full (%d); dropped %s", self._queue.maxsize, message.what)
            return False
        return True

    def _done(self) -> None:
        with self._idle:
            self._pending -= 1
            if not self._pending:
                self._idle.notify_all()

    # -- the sender thread ----------------------------------------------------------------

    def _run(self) -> None:
        while True:
            message = self._queue.get()
            if message is None:
                return
            try:
                self._deliver(message)
            except Exception:  # noqa: BLE001 - the sender must keep sending
                logger.exception("gitplug: sending %s failed", message.what)
                _count_failure()
            finally:
                self._done()

    def _deliver(self, message: Message) -> None:
        problem = ""
        for attempt in range(TRIES):
            if attempt:
                time.sleep(BACKOFF_S[min(attempt - 1, len(BACKOFF_S) - 1)])
            try:
                response = self._pool.request(
                    "POST", message.url, body=message.body, headers=message.headers,
                    timeout=urllib3.Timeout(total=message.timeout), redirect=False, preload_content=False)
                try:
                    status = response.status
                    response.read(64 << 10, decode_content=False)  # enough to reuse the connection
                finally:
                    response.release_conn()
            except urllib3.exceptions.HTTPError as exc:
                problem = type(exc).__name__ + (": timed out" if "timed out" in str(exc).lower() else "")
                continue
            if 200 <= status < 300:
                logger.debug("gitplug: sent %s (HTTP %d)", message.what, status)
                return
            problem = f"HTTP {status}"
            if status < 500 and status not in (408, 429):
                break  # the endpoint refuses this request: trying again will not help
        _count_failure()
        logger.warning("gitplug: gave up sending %s after %d tr%s: %s", message.what, attempt + 1,
                       "y" if attempt == 0 else "ies", problem)
