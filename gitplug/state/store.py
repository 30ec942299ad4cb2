"""Durable state: plugins' live releases, pins, deploy history, workers.

What must survive a restart (README, "Guarantees") and be shared by every process of a
server (gunicorn workers, the CLI) lives behind :class:`StateStore`. The
embedded implementation is :class:`~gitplug.state.sqlite.SQLiteStateStore`;
:func:`gitplug.state.open_state_store` picks one by URL scheme::

    store = open_state_store("sqlite:////srv/app/.gitplug/state.db")
    record = store.start_deploy("hello", trigger="webhook", ref="main")
    ...
    store.finish_deploy(record.id, result=DeployResult.FAILED, stage=Stage.TEST,
                        error="2 tests failed")
    store.update_plugin("hello", last_error="2 tests failed")

Every write is one transaction. Timestamps are ISO 8601 UTC with
milliseconds (``2026-11-28T01:02:03.456Z``). Every failure of the store
is a :class:`~gitplug.errors.StateError` naming the database and the cause.
"""

from __future__ import annotations

import enum
import json
import logging
import socket
import time
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Protocol

from ..errors import redact_url

logger = logging.getLogger(__name__)

__all__ = [
    "CanaryState",
    "ChangeFeed",
    "DeployRecord",
    "DeployResult",
    "HostInfo",
    "HostPlugin",
    "Lease",
    "PluginState",
    "PluginStateValue",
    "Stage",
    "StateStore",
    "WorkerInfo",
    "HOST_LOST_AFTER_S",
    "canary_figures",
    "default_host",
    "host_status",
    "iso_at",
    "now_iso",
    "redact_url",
]


class PluginStateValue(enum.StrEnum):
    """What a plugin is doing, as ``gitplug status`` shows it."""

    LIVE = "live"
    STOPPED = "stopped"
    FAILED = "failed"  # no release is live: the first deploy failed
    PENDING = "pending"  # configured, never deployed yet
    REMOVED = "removed"  # discovered, and its directory is gone: stopped


class DeployResult(enum.StrEnum):
    """The outcome of one deploy (``result`` in the README's "HTTP API")."""

    RUNNING = "running"
    LIVE = "live"
    FAILED = "failed"
    SKIPPED = "skipped"  # nothing to do
    SUPERSEDED = "superseded"  # a newer trigger took over
    INTERRUPTED = "interrupted"  # the process died mid-deploy


class Stage(enum.StrEnum):
    """The pipeline step where a deploy stopped (``stage`` in the README's "HTTP API")."""

    FETCH = "fetch"
    SIGNATURE = "signature"  # the commit or tag lacks a valid signature by an allowed key
    STAGE = "stage"
    REQUIREMENTS = "requirements"  # the host's installed distributions vs the release's needs
    TEST = "test"
    LOAD = "load"
    VERIFY = "verify"
    CANARY = "canary"  # the release served its share and was rolled back
    SWAP = "swap"


#: The error recorded on deploys found RUNNING when their host starts again.
INTERRUPTED_ERROR = "the process died during the deploy"


def now_iso() -> str:
    """The current UTC time as ``2026-11-28T01:02:03.456Z``."""
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def iso_at(timestamp: float) -> str:
    """``time.time()`` value ``timestamp`` as ``2026-11-28T01:02:03.456Z`` (a heartbeat's time)."""
    return datetime.fromtimestamp(timestamp, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def parse_iso(text: str) -> datetime:
    """Parse a timestamp written by :func:`now_iso` into an aware datetime."""
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def default_host() -> str:
    """The name this machine records on its deploys and heartbeats."""
    return socket.gethostname()


@dataclass(frozen=True)
class PluginState:
    """The durable state of one plugin.

    ``ref`` is the tracked ref as last applied, ``pin`` the ref a rollback
    pinned (None when following ``ref``), ``desired_commit`` the commit every
    worker should serve (workers converge on it), ``live_commit`` the commit
    the deploying host last swapped in, ``previous_commit`` the one before it
    (``rollback previous``).
    """

    name: str
    ref: str | None
    pin: str | None
    live_commit: str | None
    previous_commit: str | None
    state: PluginStateValue
    desired_commit: str | None
    last_error: str | None
    updated_at: str
    #: The git tree id of ``live_commit`` as the deciding host staged and
    #: tested it; the other hosts of a fleet check theirs against it.
    live_tree: str | None = None
    #: The URL prefix ``live_commit`` is mounted at (configured, else the
    #: plugin constructor's, else ``/<name>``).
    url_prefix: str | None = None
    #: The running canary as JSON text (:meth:`CanaryState.to_text`), else None.
    canary: str | None = None

    @property
    def canary_state(self) -> CanaryState | None:
        """The running canary: the new release serving a share beside ``live_commit``."""
        return CanaryState.from_text(self.canary) if self.canary else None


@dataclass(frozen=True)
class CanaryState:
    """A canary in progress (README, "Canary releases"), shared by every worker and host.

    ``commit`` serves ``percent`` of the plugin's clients beside the live
    release ``stable_commit``. ``base`` holds both releases' request and
    error counts when the canary started (:meth:`StateStore.release_stats`
    totals): the judgement compares what each side served *since*, over
    the same time.
    """

    commit: str
    stable_commit: str
    percent: float
    deploy_id: int
    started_at: float  #: ``time.time()`` when it started serving
    tree: str | None = None
    base_stable: tuple[int, int] = (0, 0)
    base_canary: tuple[int, int] = (0, 0)

    def to_text(self) -> str:
        """The JSON text stored in the plugin's ``canary`` field."""
        return json.dumps({
            "commit": self.commit, "stable_commit": self.stable_commit, "percent": self.percent,
            "deploy_id": self.deploy_id, "started_at": self.started_at, "tree": self.tree,
            "base_stable": list(self.base_stable), "base_canary": list(self.base_canary),
        }, sort_keys=True)

    @classmethod
    def from_text(cls, text: str) -> CanaryState | None:
        """Parse :meth:`to_text`; None for text it did not write (never raises)."""
        try:
            data = json.loads(text)
            return cls(
                commit=str(data["commit"]), stable_commit=str(data["stable_commit"]),
                percent=float(data["percent"]), deploy_id=int(data["deploy_id"]),
                started_at=float(data["started_at"]), tree=data.get("tree"),
                base_stable=(int(data["base_stable"][0]), int(data["base_stable"][1])),
                base_canary=(int(data["base_canary"][0]), int(data["base_canary"][1])),
            )
        except (ValueError, TypeError, KeyError, IndexError):
            logger.warning("state: unreadable canary %r; ignoring it", text[:200])
            return None


@dataclass(frozen=True)
class DeployRecord:
    """One deploy, from trigger to result (``last_deploy`` in the README's "HTTP API").

    ``repeats`` counts how many times a background trigger (poll, webhook)
    failed the same way, at the same stage with the same error, one after
    another: such failures share one record rather than one per poll.
    ``last_seen_at`` is when the latest of them happened (None while
    ``repeats`` is 1).
    """

    id: int
    plugin: str
    trigger: str
    ref: str | None
    commit: str | None
    result: DeployResult
    stage: Stage | None
    error: str | None
    started_at: str
    duration_s: float | None
    log_path: str | None
    host: str
    repeats: int = 1
    last_seen_at: str | None = None
    #: Who signed the deployed commit (or tag), as verified at its first
    #: deploy: ``alice@example.com (ssh ED25519 SHA256:...)``; None when the
    #: plugin has no ``verify`` or the deploy stopped before the check.
    signer: str | None = None
    #: A canary's figures as JSON text: ``{"percent", "stable": {"commit",
    #: "requests", "errors"}, "canary": {...}, "decision"}`` (see :attr:`canary_figures`).
    canary: str | None = None

    @property
    def canary_figures(self) -> dict[str, Any] | None:
        """Both sides' figures of the canary this deploy ran, else None."""
        if not self.canary:
            return None
        try:
            figures = json.loads(self.canary)
        except ValueError:
            return None
        return figures if isinstance(figures, dict) else None

    def to_json(self) -> dict[str, Any]:
        """The record as ``gitplug history --json`` prints it."""
        return {
            "id": self.id,
            "trigger": self.trigger,
            "ref": self.ref,
            "commit": self.commit,
            "result": self.result.value,
            "stage": None if self.stage is None else self.stage.value,
            "error": self.error,
            "started_at": self.started_at,
            "duration_s": self.duration_s,
            "plugin": self.plugin,
            "log_path": self.log_path,
            "host": self.host,
            "repeats": self.repeats,
            "last_seen_at": self.last_seen_at,
            "signer": self.signer,
            "canary": self.canary_figures,
        }


@dataclass(frozen=True)
class WorkerInfo:
    """A serving process's heartbeat: who it is and which commit each plugin serves.

    ``heartbeat_at`` is ``time.time()`` of the beat.
    """

    worker_id: str
    host: str
    pid: int
    plugin_commits: dict[str, str]
    heartbeat_at: float


@dataclass(frozen=True)
class DeployRequest:
    """A deploy asked for by one process, to be run by the controller."""

    id: int
    plugin: str
    trigger: str
    ref: str | None
    requested_at: str


@dataclass(frozen=True)
class HostPlugin:
    """What one host serves of one plugin, as that host reported it."""

    live_commit: str | None
    error: str | None = None  #: why the host does not serve the fleet's release, if so
    #: The host holds the plugin's lease: it polls the plugin and runs its pipeline.
    leads: bool = False


@dataclass(frozen=True)
class HostInfo:
    """A host's heartbeat: its id, when it last beat and what it serves.

    ``heartbeat_at`` is ``time.time()`` of the beat. Hosts are never
    forgotten by the store: one that stops beating is shown ``lost``.
    """

    host_id: str
    heartbeat_at: float
    plugins: dict[str, HostPlugin]
    leader: bool = False  #: it held a lease (of some plugin) when it beat
    #: How the other hosts reach this one (its ``host_url``), or None: they
    #: fetch the repositories of ``repo: push`` plugins from it.
    url: str | None = None


class Lease(Protocol):
    """An exclusive, fleet-wide right held by one process (see :meth:`StateStore.acquire_lease`)."""

    def alive(self) -> bool:
        """True while the lease is still held; False once it is lost (never raises)."""

    def release(self) -> None:
        """Give the lease up (idempotent, never raises)."""


class ChangeFeed(Protocol):
    """Wakes a process when another process changed the store (see :meth:`StateStore.change_feed`)."""

    def wait(self, timeout: float) -> bool:
        """Block until a change is announced (True) or ``timeout`` passes (False).

        A change announced since the caller's previous ``wait`` returns at once.
        """

    def close(self) -> None:
        """Stop listening (idempotent)."""


#: A host whose last heartbeat is older than this (five beats) is shown ``lost``.
HOST_LOST_AFTER_S = 10.0


def host_status(
    name: str, state: PluginState | None, hosts: list[HostInfo], *, now: float | None = None
) -> dict[str, dict[str, Any]]:
    """``{host_id: {live_commit, state, heartbeat_at, error}}`` for one plugin.

    ``state`` is ``lost`` when the host stopped beating, ``diverged`` when it
    serves something other than the fleet's live release (or could not load
    it: ``error`` says why), else ``live``.
    """
    now = time.time() if now is None else now
    stopped = state is not None and state.state == PluginStateValue.STOPPED
    expected = None if state is None or stopped else state.live_commit
    out: dict[str, dict[str, Any]] = {}
    for host in hosts:
        entry = host.plugins.get(name)
        commit = entry.live_commit if entry is not None else None
        error = entry.error if entry is not None else None
        if now - host.heartbeat_at > HOST_LOST_AFTER_S:
            value = "lost"
        elif error or (commit != expected and not (expected is None and commit is None)):
            value = "diverged"
        else:
            value = "live"
        out[host.host_id] = {
            "live_commit": commit,
            "state": value,
            "heartbeat_at": iso_at(host.heartbeat_at),
            "error": error,
            "leader": bool(entry is not None and entry.leads),
        }
    return out


def canary_figures(store: StateStore, name: str, canary: CanaryState) -> dict[str, Any]:
    """Both sides' requests and errors since ``canary`` started, summed over every worker and host.

    ``{"percent", "started_at", "stable": {"commit", "requests", "errors"}, "canary": {...}}``.
    """
    figures: dict[str, Any] = {"percent": canary.percent, "started_at": canary.started_at}
    for side, commit, base in (("stable", canary.stable_commit, canary.base_stable),
                               ("canary", canary.commit, canary.base_canary)):
        requests, errors = store.release_stats(name, commit)
        # Never below zero: a worker that reloaded a release counts it from 0 again.
        figures[side] = {"commit": commit, "requests": max(requests - base[0], 0),
                         "errors": max(errors - base[1], 0)}
    return figures


#: Fields :meth:`StateStore.update_plugin` accepts.
PLUGIN_FIELDS = frozenset(
    {"ref", "pin", "live_commit", "previous_commit", "state", "desired_commit", "last_error",
     "live_tree", "url_prefix", "canary"}
)
#: Fields :meth:`StateStore.update_deploy` accepts.
DEPLOY_FIELDS = frozenset(
    {"trigger", "ref", "commit", "result", "stage", "error", "duration_s", "log_path", "repeats", "last_seen_at",
     "signer",
     "canary"}
)


def final_result(deploy_id: int, result: DeployResult | str,
                 plugin_update: Mapping[str, Any] | None) -> DeployResult:
    """Check ``finish_deploy``'s arguments the same way in every store; the result as an enum."""
    final = DeployResult(result)
    if final is DeployResult.RUNNING:
        raise ValueError(f"finish_deploy({deploy_id}) needs a final result, not 'running'")
    if plugin_update:
        unknown = sorted(set(plugin_update) - PLUGIN_FIELDS)
        if unknown:
            raise TypeError(f"finish_deploy() got unknown plugin fields {unknown}")
    return final


def seconds_since(started_at: str) -> float:
    """Seconds from an ISO ``started_at`` until now, rounded to ms, never negative."""
    elapsed = datetime.now(timezone.utc) - parse_iso(started_at)
    return round(max(elapsed.total_seconds(), 0.0), 3)


class StateStore(Protocol):
    """The durable state shared by all processes of a server (or a fleet).

    Implementations are safe to use from several threads and several
    processes at once, and raise :class:`~gitplug.errors.StateError` (never a
    backend's own exception) when the store cannot be read or written.
    """

    def get_plugin(self, name: str) -> PluginState | None:
        """The plugin's state, or None if it was never written."""

    def list_plugins(self) -> list[PluginState]:
        """Every plugin with a state, sorted by name."""

    def update_plugin(self, name: str, **fields: Any) -> PluginState:
        """Set ``fields`` (among :data:`PLUGIN_FIELDS`) on the plugin, creating it.

        A new plugin starts PENDING with every other field None. Bumps
        :meth:`change_counter` in the same transaction. Unknown field names
        raise TypeError. Returns the state as written.
        """

    def delete_plugin(self, name: str) -> None:
        """Forget the plugin's state (its history stays). Bumps the counter if it existed."""

    def start_deploy(
        self,
        plugin: str,
        *,
        trigger: str,
        ref: str | None,
        commit: str | None = None,
        host: str | None = None,
    ) -> DeployRecord:
        """Record a new RUNNING deploy started now by ``host`` (default: this machine)."""

    def finish_deploy(
        self,
        deploy_id: int,
        *,
        result: DeployResult,
        stage: Stage | None = None,
        error: str | None = None,
        commit: str | None = None,
        duration_s: float | None = None,
        log_path: str | None = None,
        plugin_update: Mapping[str, Any] | None = None,
    ) -> DeployRecord:
        """Record the deploy's outcome; ``result`` must not be RUNNING.

        ``stage`` and ``error`` are set as given (None clears them);
        ``commit`` and ``log_path`` only when given. ``duration_s`` defaults
        to the time since ``started_at``. ``plugin_update`` (fields of
        :meth:`update_plugin`) is applied to the deploy's plugin in the same
        transaction. An unknown id raises StateError.
        """

    def update_deploy(self, deploy_id: int, **fields: Any) -> DeployRecord:
        """Set ``fields`` (among :data:`DEPLOY_FIELDS`) on a deploy, e.g. the resolved commit."""

    def get_deploy(self, deploy_id: int) -> DeployRecord | None:
        """The deploy with that id, or None."""

    def history(self, plugin: str, *, limit: int | None = 50) -> list[DeployRecord]:
        """The plugin's deploys, newest first, at most ``limit`` (None: all)."""

    def last_deploy(self, plugin: str) -> DeployRecord | None:
        """The plugin's newest deploy, running or finished, or None."""

    def deploy_counts(self) -> dict[tuple[str, str], int]:
        """How many deploys each plugin has per result: ``{(plugin, result): n}``."""

    def mark_running_interrupted(self, host: str | None = None) -> list[DeployRecord]:
        """Turn RUNNING deploys of ``host`` (default: this machine) into INTERRUPTED.

        Called once at startup by the process that deploys for its host: a
        deploy still RUNNING then belongs to a process that died. The error
        is :data:`INTERRUPTED_ERROR`. Returns the records as updated.
        """

    def failed_commits(self, plugin: str) -> set[str]:
        """Commits whose latest decisive deploy (LIVE or FAILED) failed.

        Polls skip these so a broken commit is not retried every interval.
        A later LIVE deploy of the commit clears it; SKIPPED, SUPERSEDED,
        INTERRUPTED and RUNNING deploys neither set nor clear it.
        """

    def remember_delivery(self, delivery_id: str, *, ttl_s: float = 7 * 86400) -> bool:
        """True the first time ``delivery_id`` is seen within ``ttl_s``, else False.

        Atomic across threads and processes: of concurrent callers with one
        id, exactly one gets True. Expired ids are forgotten.
        """

    def revoke_login(self, login_id: str, *, until: float) -> None:
        """Remember that the status page login ``login_id`` was logged out.

        Kept until ``until`` (epoch seconds: when the login would expire
        anyway), then forgotten. Every process and host sees it at once.
        """

    def login_revoked(self, login_id: str) -> bool:
        """True when :meth:`revoke_login` revoked ``login_id`` and it has not expired."""

    def request_deploy(self, plugin: str, *, trigger: str, ref: str | None = None) -> int:
        """Queue a deploy for the controller process; returns the request id."""

    def take_deploy_requests(self, plugins: Collection[str] | None = None) -> list[DeployRequest]:
        """Remove and return the queued requests, oldest first (controller only).

        ``plugins``: only the requests of these (the ones whose lease the
        caller holds); None: every request.
        """

    def heartbeat(self, worker: WorkerInfo) -> None:
        """Record (replace) the worker's latest heartbeat."""

    def record_release_stats(self, worker_id: str, stats: Mapping[tuple[str, str], tuple[int, int]]) -> None:
        """Store ``{(plugin, commit): (requests, errors)}`` counted by one worker (totals)."""

    def release_stats(self, plugin: str, commit: str) -> tuple[int, int]:
        """``(requests, errors)`` of a release summed over every worker that served it."""

    def workers(self, *, max_age_s: float = 10.0) -> list[WorkerInfo]:
        """Workers that beat within ``max_age_s``, by id; older ones are deleted."""

    def remove_worker(self, worker_id: str) -> None:
        """Forget a worker (it is shutting down)."""

    def host_heartbeat(self, host: HostInfo) -> None:
        """Record (replace) the host's latest heartbeat and what it serves."""

    def hosts(self) -> list[HostInfo]:
        """Every host that ever beat, by id; silent ones are kept (status shows them lost)."""

    def acquire_lease(self, name: str, *, wait_s: float | None = 0.0) -> Lease | None:
        """Take the fleet-wide lease ``name`` if no live process holds it, else None.

        ``wait_s``: how long to wait for its holder to give it up (0: not at
        all; None: as long as it takes). The lease is lost when its holder
        dies (a SQLite store is one machine's, whose callers already hold a
        host-wide lock: its lease is always granted).
        """

    def change_feed(self) -> ChangeFeed | None:
        """A feed announcing every change of :meth:`change_counter` and every
        deploy request, or None when the store cannot announce (callers poll)."""

    def change_counter(self) -> int:
        """A number that grows with every plugin-state write; cheap to poll.

        Workers compare it with the value they last saw to know when to
        re-read plugin states and converge.
        """

    def close(self) -> None:
        """Release the store's connections; the store must not be used afterwards."""
