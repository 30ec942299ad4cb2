"""The PostgreSQL implementation of :class:`~gitplug.state.store.StateStore`: a fleet.

Several hosts behind one load balancer share one database (README, "Running
a fleet"). Through psycopg 3:

* a few connections per process, borrowed for one operation each
  (autocommit; every write one explicit transaction), opened on first use,
  so a host that starts while the server is down still starts and serves
  from its own data directory; a connection that breaks is closed and the
  next operation opens a new one;
* the schema is created and migrated once, inside a transaction holding a
  transaction-level advisory lock, whichever host comes first;
* every bump of the change counter and every deploy request sends
  ``NOTIFY gitplug`` in its transaction: :meth:`PostgresStateStore.change_feed`
  is one listening connection per process that wakes its waiters;
* :meth:`PostgresStateStore.acquire_lease` is a session advisory lock on a
  dedicated connection: the server frees it the moment its holder's
  connection ends (process death), or after TCP keepalives give up on a
  host cut off from it (about 10 s).

Every failure is a :class:`~gitplug.errors.StateError` naming the server with
its password redacted.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
import zlib
from collections.abc import Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from typing import Any

import psycopg
import psycopg.errors
from psycopg.rows import dict_row

from ..errors import StateError
from .store import (
    DEPLOY_FIELDS,
    INTERRUPTED_ERROR,
    PLUGIN_FIELDS,
    DeployRecord,
    DeployRequest,
    DeployResult,
    HostInfo,
    HostPlugin,
    PluginState,
    PluginStateValue,
    Stage,
    WorkerInfo,
    default_host,
    final_result,
    now_iso,
    redact_url,
    seconds_since,
)

__all__ = ["PostgresStateStore", "SCHEMA_VERSION", "redact_url"]

logger = logging.getLogger(__name__)

#: Seconds to wait for the server to accept a connection.
CONNECT_TIMEOUT_S = 3
#: Idle connections a process keeps between operations (beyond them, the
#: listening connection and a lease holder's own).
MAX_IDLE = 4
#: The NOTIFY channel: payload ``plugins`` (a plugin-state write) or ``requests``.
CHANNEL = "gitplug"
#: First key of gitplug's advisory locks (``'gplg'``); the second names the lock.
_LOCK_SPACE = 0x67706C67
_MIGRATION_LOCK = 0
#: TCP keepalives and a user timeout: a peer that vanished is noticed in about
#: 10 s by both sides (the server frees a lost host's lease; a host stops
#: waiting on a dead server), instead of the operating system's two hours.
_CONNECT_OPTIONS: dict[str, Any] = {
    "connect_timeout": CONNECT_TIMEOUT_S,
    "keepalives": 1,
    "keepalives_idle": 5,
    "keepalives_interval": 2,
    "keepalives_count": 3,
    "tcp_user_timeout": 10000,
    "application_name": "gitplug",
}
_SESSION_SETUP = (
    "SET tcp_keepalives_idle = 5; SET tcp_keepalives_interval = 2; "
    "SET tcp_keepalives_count = 3; SET tcp_user_timeout = 10000"
)

#: Schema migrations, as in the SQLite store: entry ``i`` brings version ``i``
#: to ``i + 1``. Append only.
_MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        """CREATE TABLE plugins (
            name TEXT PRIMARY KEY, ref TEXT, pin TEXT, live_commit TEXT,
            previous_commit TEXT, state TEXT NOT NULL, desired_commit TEXT,
            last_error TEXT, updated_at TEXT NOT NULL, live_tree TEXT)""",
        """CREATE TABLE deploys (
            id BIGSERIAL PRIMARY KEY, plugin TEXT NOT NULL,
            trigger TEXT NOT NULL, ref TEXT, commit_sha TEXT, result TEXT NOT NULL,
            stage TEXT, error TEXT, started_at TEXT NOT NULL, duration_s DOUBLE PRECISION,
            log_path TEXT, host TEXT NOT NULL)""",
        "CREATE INDEX deploys_by_plugin ON deploys (plugin, id)",
        "CREATE INDEX deploys_by_commit ON deploys (plugin, commit_sha, id)",
        "CREATE INDEX deploys_running ON deploys (result) WHERE result = 'running'",
        "CREATE TABLE deliveries (id TEXT PRIMARY KEY, expires_at DOUBLE PRECISION NOT NULL)",
        "CREATE INDEX deliveries_by_expiry ON deliveries (expires_at)",
        """CREATE TABLE workers (
            worker_id TEXT PRIMARY KEY, host TEXT NOT NULL, pid INTEGER NOT NULL,
            plugin_commits TEXT NOT NULL, heartbeat_at DOUBLE PRECISION NOT NULL)""",
        "CREATE TABLE counters (name TEXT PRIMARY KEY, value BIGINT NOT NULL)",
        "INSERT INTO counters (name, value) VALUES ('plugins', 0)",
        """CREATE TABLE deploy_requests (
            id BIGSERIAL PRIMARY KEY, plugin TEXT NOT NULL,
            trigger TEXT NOT NULL, ref TEXT, requested_at TEXT NOT NULL)""",
        """CREATE TABLE release_stats (
            worker_id TEXT NOT NULL, plugin TEXT NOT NULL, commit_sha TEXT NOT NULL,
            requests BIGINT NOT NULL, errors BIGINT NOT NULL, updated_at DOUBLE PRECISION NOT NULL,
            PRIMARY KEY (worker_id, plugin, commit_sha))""",
        """CREATE TABLE hosts (
            host_id TEXT PRIMARY KEY, heartbeat_at DOUBLE PRECISION NOT NULL,
            plugins TEXT NOT NULL, leader BOOLEAN NOT NULL DEFAULT FALSE)""",
    ),
    ("ALTER TABLE plugins ADD COLUMN url_prefix TEXT",),
    (
        # A background trigger that fails the same way again counts on the
        # record it already has (DeployRecord.repeats) instead of adding one.
        "ALTER TABLE deploys ADD COLUMN repeats INTEGER NOT NULL DEFAULT 1",
        "ALTER TABLE deploys ADD COLUMN last_seen_at TEXT",
    ),
    (
        # Who signed each deployed commit (README, "Signed commits").
        "ALTER TABLE deploys ADD COLUMN signer TEXT",
    ),
)
SCHEMA_VERSION = len(_MIGRATIONS)

#: Connections a forked child inherited: kept referenced, never closed by the
#: child (closing would end the parent's session on the shared socket).
_FORK_ORPHANS: list[psycopg.Connection[Any]] = []

_PLUGIN_COLUMNS = (
    "name, ref, pin, live_commit, previous_commit, state, desired_commit, last_error, updated_at, "
    "live_tree, url_prefix"
)
_DEPLOY_COLUMNS = (
    "id, plugin, trigger, ref, commit_sha, result, stage, error, started_at, duration_s, "
    "log_path, host, repeats, last_seen_at, signer"
)
def _plugin_from_row(row: Mapping[str, Any]) -> PluginState:
    values = dict(row)
    values["state"] = PluginStateValue(values["state"])
    return PluginState(**values)


def _deploy_from_row(row: Mapping[str, Any]) -> DeployRecord:
    values = dict(row)
    values["commit"] = values.pop("commit_sha")
    values["id"] = int(values["id"])
    values["result"] = DeployResult(values["result"])
    values["stage"] = None if values["stage"] is None else Stage(values["stage"])
    return DeployRecord(**values)


def _lock_key(name: str) -> int:
    """The second advisory-lock key of lease ``name`` (a signed 32-bit int)."""
    value = zlib.crc32(name.encode())
    return value - (1 << 32) if value >= 1 << 31 else value


def _hint(exc: BaseException) -> str:
    text = str(exc).lower()
    if "connection refused" in text or "timeout" in text or "could not connect" in text or (
        "server closed" in text or "connection" in text and "lost" in text
    ):
        return (
            "; is the PostgreSQL server running and reachable? This host keeps serving its "
            "live releases and retries (README, \"Running a fleet\")"
        )
    if "does not exist" in text and "database" in text:
        return "; create it first: createdb NAME (README, \"Running a fleet\")"
    if "password" in text or "authentication" in text:
        return "; check the user and password of the URL in `state:`"
    return ""


class PostgresStateStore:
    """:class:`StateStore` in a PostgreSQL database shared by the hosts of a fleet.

    Safe across threads (each operation borrows a connection), processes (a forked
    child opens its own connections) and hosts (every write is one
    transaction; the counter is a row updated in the writer's transaction).
    """

    fleet = True

    def __init__(self, url: str) -> None:
        self.url = url
        self.where = redact_url(url)
        self._lock = threading.Lock()
        #: Connections between operations (see :meth:`_borrow`).
        self._idle: list[psycopg.Connection[Any]] = []
        self._pid = os.getpid()
        self._closed = False
        self._migrated = False
        self._feed: _ListenFeed | None = None

    def __repr__(self) -> str:
        return f"<PostgresStateStore {self.where!r}>"

    # -- plumbing ------------------------------------------------------------

    def _error(self, action: str, exc: BaseException) -> StateError:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return StateError(f"state database {self.where}: could not {action}: {first}{_hint(exc)}")

    def connect(self, *, autocommit: bool = True) -> psycopg.Connection[Any]:
        """A new connection to the server (raises psycopg.Error)."""
        conn = psycopg.connect(self.url, autocommit=autocommit, row_factory=dict_row, **_CONNECT_OPTIONS)
        try:
            conn.execute(_SESSION_SETUP)
        except psycopg.Error:
            with suppress(Exception):
                conn.close()
            raise
        return conn

    def _check_usable(self) -> None:
        if self._closed:
            raise StateError(f"state database {self.where}: the store is closed")
        if os.getpid() != self._pid:
            # A connection must not cross fork(): the child opens its own and
            # leaves its parent's untouched (closing one would end the
            # parent's session on the shared socket).
            _FORK_ORPHANS.extend(self._idle)
            self._pid = os.getpid()
            self._lock = threading.Lock()
            self._idle = []
            self._feed = None

    @contextmanager
    def _borrow(self, action: str) -> Iterator[psycopg.Connection[Any]]:
        """A connection for one operation: an idle one, else a new one.

        Connections go back to the idle list after the operation (at most
        :data:`MAX_IDLE` are kept), so a process holds as many as it runs
        operations at once, not one per thread that ever used the store. A
        broken connection is closed; the next operation opens a new one.
        """
        self._check_usable()
        conn: psycopg.Connection[Any] | None = None
        with self._lock:
            while self._idle and conn is None:
                candidate = self._idle.pop()
                if candidate.closed or candidate.broken:
                    self._close_quietly(candidate)
                else:
                    conn = candidate
        if conn is None:
            try:
                conn = self.connect()
            except psycopg.Error as exc:
                raise self._error(action, exc) from exc
        pid = os.getpid()
        try:
            if not self._migrated:
                self._migrate(conn)
            yield conn
        finally:
            healthy = (
                not conn.closed and not conn.broken
                and conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
            )
            with self._lock:
                keep = healthy and not self._closed and pid == self._pid and len(self._idle) < MAX_IDLE
                if keep:
                    self._idle.append(conn)
            if not keep and pid == os.getpid():
                self._close_quietly(conn)

    @staticmethod
    def _close_quietly(conn: psycopg.Connection[Any]) -> None:
        with suppress(Exception):  # closing is best effort
            conn.close()

    @contextmanager
    def _write(self, action: str) -> Iterator[psycopg.Connection[Any]]:
        """One write transaction; rolled back on error."""
        with self._borrow(action) as conn:
            try:
                with conn.transaction():
                    yield conn
            except psycopg.Error as exc:
                raise self._error(action, exc) from exc

    def _read(self, action: str, sql: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]:
        with self._borrow(action) as conn:
            try:
                return conn.execute(sql, params).fetchall()
            except psycopg.Error as exc:
                raise self._error(action, exc) from exc

    def _migrate(self, conn: psycopg.Connection[Any]) -> None:
        action = "create or upgrade its schema"
        try:
            with conn.transaction():
                # Held until this transaction ends: hosts starting together
                # migrate one after the other, and all but the first find
                # nothing to do.
                conn.execute("SELECT pg_advisory_xact_lock(%s, %s)", (_LOCK_SPACE, _MIGRATION_LOCK))
                conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
                row = conn.execute("SELECT version FROM schema_version").fetchone()
                current = 0 if row is None else int(row["version"])
                if current > SCHEMA_VERSION:
                    raise StateError(
                        f"state database {self.where} has schema version {current}, newer than "
                        f"this gitplug knows ({SCHEMA_VERSION}); upgrade gitplug"
                    )
                for statements in _MIGRATIONS[current:]:
                    for statement in statements:
                        conn.execute(statement)
                if row is None:
                    conn.execute("INSERT INTO schema_version (version) VALUES (%s)", (SCHEMA_VERSION,))
                elif current != SCHEMA_VERSION:
                    conn.execute("UPDATE schema_version SET version = %s", (SCHEMA_VERSION,))
                if current != SCHEMA_VERSION:
                    logger.info("state database %s: schema %d -> %d", self.where, current, SCHEMA_VERSION)
        except psycopg.Error as exc:
            raise self._error(action, exc) from exc
        self._migrated = True

    @staticmethod
    def _bump(conn: psycopg.Connection[Any]) -> None:
        conn.execute("UPDATE counters SET value = value + 1 WHERE name = 'plugins'")
        conn.execute("SELECT pg_notify(%s, 'plugins')", (CHANNEL,))

    def _deploy_row(self, conn: psycopg.Connection[Any], deploy_id: int) -> dict[str, Any]:
        row = conn.execute(f"SELECT {_DEPLOY_COLUMNS} FROM deploys WHERE id = %s", (deploy_id,)).fetchone()
        if row is None:
            raise StateError(f"state database {self.where}: no deploy with id {deploy_id}")
        return row

    # -- plugins ---------------------------------------------------------------

    def get_plugin(self, name: str) -> PluginState | None:
        rows = self._read(
            f"read plugin {name!r}", f"SELECT {_PLUGIN_COLUMNS} FROM plugins WHERE name = %s", (name,)
        )
        return _plugin_from_row(rows[0]) if rows else None

    def list_plugins(self) -> list[PluginState]:
        rows = self._read("list plugins", f"SELECT {_PLUGIN_COLUMNS} FROM plugins ORDER BY name")
        return [_plugin_from_row(row) for row in rows]

    def update_plugin(self, name: str, **fields: Any) -> PluginState:
        unknown = sorted(set(fields) - PLUGIN_FIELDS)
        if unknown:
            raise TypeError(
                f"update_plugin() got unknown fields {unknown}; "
                f"expected some of {sorted(PLUGIN_FIELDS)}"
            )
        if "state" in fields:
            fields["state"] = PluginStateValue(fields["state"]).value
        with self._write(f"update plugin {name!r}") as conn:
            row = self._update_plugin_in(conn, name, fields)
        return _plugin_from_row(row)

    def _update_plugin_in(self, conn: psycopg.Connection[Any], name: str, fields: dict[str, Any]) -> dict[str, Any]:
        if "state" in fields:
            fields["state"] = PluginStateValue(fields["state"]).value
        now = now_iso()
        # Column names come from PLUGIN_FIELDS only, never from the caller.
        assignments = "".join(f"{column} = %s, " for column in fields)
        conn.execute(
            "INSERT INTO plugins (name, state, updated_at) VALUES (%s, %s, %s) ON CONFLICT (name) DO NOTHING",
            (name, PluginStateValue.PENDING.value, now),
        )
        row = conn.execute(
            f"UPDATE plugins SET {assignments}updated_at = %s WHERE name = %s RETURNING {_PLUGIN_COLUMNS}",
            (*fields.values(), now, name),
        ).fetchone()
        self._bump(conn)
        assert row is not None
        return row

    def delete_plugin(self, name: str) -> None:
        with self._write(f"delete plugin {name!r}") as conn:
            if conn.execute("DELETE FROM plugins WHERE name = %s", (name,)).rowcount:
                self._bump(conn)

    def change_counter(self) -> int:
        rows = self._read("read the change counter", "SELECT value FROM counters WHERE name = 'plugins'")
        return int(rows[0]["value"])

    # -- deploys -----------------------------------------------------------------

    def start_deploy(
        self,
        plugin: str,
        *,
        trigger: str,
        ref: str | None,
        commit: str | None = None,
        host: str | None = None,
    ) -> DeployRecord:
        with self._write(f"record a deploy of {plugin!r}") as conn:
            row = conn.execute(
                "INSERT INTO deploys (plugin, trigger, ref, commit_sha, result, started_at, host) "
                f"VALUES (%s, %s, %s, %s, %s, %s, %s) RETURNING {_DEPLOY_COLUMNS}",
                (plugin, trigger, ref, commit, DeployResult.RUNNING.value, now_iso(), host or default_host()),
            ).fetchone()
        assert row is not None
        return _deploy_from_row(row)

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
        result = final_result(deploy_id, result, plugin_update)
        with self._write(f"finish deploy {deploy_id}") as conn:
            row = self._deploy_row(conn, deploy_id)
            if plugin_update:
                self._update_plugin_in(conn, row["plugin"], dict(plugin_update))
            if duration_s is None:
                duration_s = seconds_since(row["started_at"])
            row = conn.execute(
                "UPDATE deploys SET result = %s, stage = %s, error = %s, duration_s = %s, "
                "commit_sha = COALESCE(%s, commit_sha), log_path = COALESCE(%s, log_path) "
                f"WHERE id = %s RETURNING {_DEPLOY_COLUMNS}",
                (result.value, None if stage is None else Stage(stage).value, error,
                 duration_s, commit, log_path, deploy_id),
            ).fetchone()
        assert row is not None
        return _deploy_from_row(row)

    def update_deploy(self, deploy_id: int, **fields: Any) -> DeployRecord:
        unknown = sorted(set(fields) - DEPLOY_FIELDS)
        if unknown:
            raise TypeError(
                f"update_deploy() got unknown fields {unknown}; "
                f"expected some of {sorted(DEPLOY_FIELDS)}"
            )
        if fields.get("result") is not None:
            fields["result"] = DeployResult(fields["result"]).value
        if fields.get("stage") is not None:
            fields["stage"] = Stage(fields["stage"]).value
        columns = {"commit_sha" if key == "commit" else key: value for key, value in fields.items()}
        with self._write(f"update deploy {deploy_id}") as conn:
            self._deploy_row(conn, deploy_id)
            if columns:
                assignments = ", ".join(f"{column} = %s" for column in columns)
                conn.execute(f"UPDATE deploys SET {assignments} WHERE id = %s", (*columns.values(), deploy_id))
            row = self._deploy_row(conn, deploy_id)
        return _deploy_from_row(row)

    def get_deploy(self, deploy_id: int) -> DeployRecord | None:
        rows = self._read(
            f"read deploy {deploy_id}", f"SELECT {_DEPLOY_COLUMNS} FROM deploys WHERE id = %s", (deploy_id,)
        )
        return _deploy_from_row(rows[0]) if rows else None

    def history(self, plugin: str, *, limit: int | None = 50) -> list[DeployRecord]:
        rows = self._read(
            f"read the history of {plugin!r}",
            f"SELECT {_DEPLOY_COLUMNS} FROM deploys WHERE plugin = %s ORDER BY id DESC LIMIT %s",
            (plugin, None if limit is None else max(limit, 0)),
        )
        return [_deploy_from_row(row) for row in rows]

    def deploy_counts(self) -> dict[tuple[str, str], int]:
        rows = self._read(
            "count deploys", "SELECT plugin, result, COUNT(*) AS n FROM deploys GROUP BY plugin, result"
        )
        return {(row["plugin"], row["result"]): int(row["n"]) for row in rows}

    def last_deploy(self, plugin: str) -> DeployRecord | None:
        records = self.history(plugin, limit=1)
        return records[0] if records else None

    def mark_running_interrupted(self, host: str | None = None) -> list[DeployRecord]:
        with self._write("mark interrupted deploys") as conn:
            rows = conn.execute(
                "UPDATE deploys SET result = %s, error = %s WHERE result = 'running' AND host = %s "
                f"RETURNING {_DEPLOY_COLUMNS}",
                (DeployResult.INTERRUPTED.value, INTERRUPTED_ERROR, host or default_host()),
            ).fetchall()
        rows.sort(key=lambda row: row["id"])
        for row in rows:
            logger.warning(
                "deploy %d of plugin %s (commit %s) was interrupted: %s",
                row["id"], row["plugin"], row["commit_sha"], INTERRUPTED_ERROR,
            )
        return [_deploy_from_row(row) for row in rows]

    def failed_commits(self, plugin: str) -> set[str]:
        rows = self._read(
            f"read the failed commits of {plugin!r}",
            """SELECT d.commit_sha FROM deploys AS d
               WHERE d.plugin = %s AND d.result = 'failed' AND d.commit_sha IS NOT NULL
                 AND NOT EXISTS (
                     SELECT 1 FROM deploys AS later
                     WHERE later.plugin = d.plugin AND later.commit_sha = d.commit_sha
                       AND later.id > d.id AND later.result IN ('live', 'failed'))""",
            (plugin,),
        )
        return {row["commit_sha"] for row in rows}

    # -- webhooks, requests, workers, hosts -------------------------------------

    def remember_delivery(self, delivery_id: str, *, ttl_s: float = 7 * 86400) -> bool:
        now = time.time()
        with self._write(f"remember webhook delivery {delivery_id!r}") as conn:
            conn.execute("DELETE FROM deliveries WHERE expires_at <= %s", (now,))
            # A concurrent insert of the same id waits for the first one's
            # commit and then does nothing: exactly one caller gets True.
            cursor = conn.execute(
                "INSERT INTO deliveries (id, expires_at) VALUES (%s, %s) ON CONFLICT (id) DO NOTHING",
                (delivery_id, now + ttl_s),
            )
            return cursor.rowcount == 1

    # Revoked logins share the deliveries table (an id with an expiry), under
    # a prefix no delivery id has, as in the SQLite store.
    _LOGIN_PREFIX = "gitplug-logout:"

    def revoke_login(self, login_id: str, *, until: float) -> None:
        with self._write("revoke a status page login") as conn:
            conn.execute("DELETE FROM deliveries WHERE expires_at <= %s", (time.time(),))
            conn.execute(
                "INSERT INTO deliveries (id, expires_at) VALUES (%s, %s) "
                "ON CONFLICT (id) DO UPDATE SET expires_at = EXCLUDED.expires_at",
                (self._LOGIN_PREFIX + login_id, until),
            )

    def login_revoked(self, login_id: str) -> bool:
        return bool(
            self._read(
                "read revoked logins",
                "SELECT 1 FROM deliveries WHERE id = %s AND expires_at > %s",
                (self._LOGIN_PREFIX + login_id, time.time()),
            )
        )

    def request_deploy(self, plugin: str, *, trigger: str, ref: str | None = None) -> int:
        with self._write(f"queue a deploy request for {plugin!r}") as conn:
            row = conn.execute(
                "INSERT INTO deploy_requests (plugin, trigger, ref, requested_at) "
                "VALUES (%s, %s, %s, %s) RETURNING id",
                (plugin, trigger, ref, now_iso()),
            ).fetchone()
            conn.execute("SELECT pg_notify(%s, 'requests')", (CHANNEL,))
        assert row is not None
        return int(row["id"])

    def take_deploy_requests(self, plugins: Collection[str] | None = None) -> list[DeployRequest]:
        names = None if plugins is None else sorted(plugins)
        if names == []:
            return []
        where = "" if names is None else " WHERE plugin = ANY(%s)"
        params: tuple[Any, ...] = () if names is None else (names,)
        if not self._read("read deploy requests", f"SELECT 1 FROM deploy_requests{where} LIMIT 1", params):
            return []
        with self._write("take deploy requests") as conn:
            rows = conn.execute(
                f"DELETE FROM deploy_requests{where} RETURNING id, plugin, trigger, ref, requested_at", params
            ).fetchall()
        rows.sort(key=lambda row: row["id"])
        return [DeployRequest(**{**row, "id": int(row["id"])}) for row in rows]

    def heartbeat(self, worker: WorkerInfo) -> None:
        with self._write(f"record the heartbeat of worker {worker.worker_id!r}") as conn:
            conn.execute(
                "INSERT INTO workers (worker_id, host, pid, plugin_commits, heartbeat_at) "
                "VALUES (%s, %s, %s, %s, %s) ON CONFLICT (worker_id) DO UPDATE SET host = EXCLUDED.host, "
                "pid = EXCLUDED.pid, plugin_commits = EXCLUDED.plugin_commits, "
                "heartbeat_at = EXCLUDED.heartbeat_at",
                (worker.worker_id, worker.host, worker.pid,
                 json.dumps(worker.plugin_commits, sort_keys=True), worker.heartbeat_at),
            )

    def workers(self, *, max_age_s: float = 10.0) -> list[WorkerInfo]:
        with self._write("list workers") as conn:
            conn.execute("DELETE FROM workers WHERE heartbeat_at < %s", (time.time() - max_age_s,))
            rows = conn.execute(
                "SELECT worker_id, host, pid, plugin_commits, heartbeat_at FROM workers ORDER BY worker_id"
            ).fetchall()
        return [
            WorkerInfo(row["worker_id"], row["host"], int(row["pid"]), json.loads(row["plugin_commits"]),
                       float(row["heartbeat_at"]))
            for row in rows
        ]

    def remove_worker(self, worker_id: str) -> None:
        with self._write(f"remove worker {worker_id!r}") as conn:
            conn.execute("DELETE FROM workers WHERE worker_id = %s", (worker_id,))

    def record_release_stats(self, worker_id: str, stats: Mapping[tuple[str, str], tuple[int, int]]) -> None:
        if not stats:
            return
        now = time.time()
        with self._write(f"record request counts of worker {worker_id!r}") as conn, conn.cursor() as cursor:
            cursor.executemany(
                "INSERT INTO release_stats (worker_id, plugin, commit_sha, requests, errors, updated_at) "
                "VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT (worker_id, plugin, commit_sha) DO UPDATE "
                "SET requests = EXCLUDED.requests, errors = EXCLUDED.errors, updated_at = EXCLUDED.updated_at",
                [(worker_id, p, c, r, e, now) for (p, c), (r, e) in stats.items()],
            )

    def release_stats(self, plugin: str, commit: str) -> tuple[int, int]:
        rows = self._read(
            f"read request counts of {plugin!r} {commit}",
            "SELECT COALESCE(SUM(requests), 0) AS r, COALESCE(SUM(errors), 0) AS e FROM release_stats "
            "WHERE plugin = %s AND commit_sha = %s",
            (plugin, commit),
        )
        return int(rows[0]["r"]), int(rows[0]["e"])

    def host_heartbeat(self, host: HostInfo) -> None:
        plugins = {name: [p.live_commit, p.error, p.leads] for name, p in host.plugins.items()}
        with self._write(f"record the heartbeat of host {host.host_id!r}") as conn:
            conn.execute(
                "INSERT INTO hosts (host_id, heartbeat_at, plugins, leader) VALUES (%s, %s, %s, %s) "
                "ON CONFLICT (host_id) DO UPDATE SET heartbeat_at = EXCLUDED.heartbeat_at, "
                "plugins = EXCLUDED.plugins, leader = EXCLUDED.leader",
                (host.host_id, host.heartbeat_at, json.dumps(plugins, sort_keys=True), host.leader),
            )

    def hosts(self) -> list[HostInfo]:
        rows = self._read(
            "list hosts", "SELECT host_id, heartbeat_at, plugins, leader FROM hosts ORDER BY host_id"
        )
        return [
            HostInfo(
                host_id=row["host_id"],
                heartbeat_at=float(row["heartbeat_at"]),
                plugins={name: HostPlugin(*pair) for name, pair in json.loads(row["plugins"]).items()},
                leader=bool(row["leader"]),
            )
            for row in rows
        ]

    # -- leases and notifications -------------------------------------------------

    def acquire_lease(self, name: str, *, wait_s: float | None = 0.0) -> _AdvisoryLease | None:
        """Take lease ``name``: a session advisory lock on a connection of its own.

        Waiting uses the server's ``lock_timeout``: the holder's release (or
        death) hands the lock over at once, in the order the waiters asked.
        """
        if self._closed:
            raise StateError(f"state database {self.where}: the store is closed")
        action = f"take the lease {name!r}"
        try:
            conn = self.connect()
        except psycopg.Error as exc:
            raise self._error(action, exc) from exc
        key = (_LOCK_SPACE, _lock_key(name))
        try:
            if wait_s is not None and wait_s <= 0:
                row = conn.execute("SELECT pg_try_advisory_lock(%s, %s) AS held", key).fetchone()
                held = bool(row and row["held"])
            else:
                # lock_timeout 0 means "no timeout" to PostgreSQL: that is None here.
                timeout_ms = 0 if wait_s is None else max(int(wait_s * 1000), 1)
                conn.execute(f"SET lock_timeout = {timeout_ms}")
                try:
                    conn.execute("SELECT pg_advisory_lock(%s, %s)", key)
                    held = True
                except psycopg.errors.LockNotAvailable:
                    held = False
                conn.execute("SET lock_timeout = 0")
        except psycopg.Error as exc:
            self._close_quietly(conn)
            raise self._error(action, exc) from exc
        if not held:
            self._close_quietly(conn)
            return None
        return _AdvisoryLease(conn, name)

    def change_feed(self) -> _ListenFeed:
        """This process's listening connection (one per process, started on first call)."""
        if self._closed:
            raise StateError(f"state database {self.where}: the store is closed")
        with self._lock:
            if self._feed is None or self._feed.pid != os.getpid():
                self._feed = _ListenFeed(self)
            return self._feed

    def close(self) -> None:
        with self._lock:
            connections, self._idle = self._idle, []
            self._closed = True
            feed, self._feed = self._feed, None
        if feed is not None and feed.pid == os.getpid():
            feed.close()
        if os.getpid() != self._pid:
            _FORK_ORPHANS.extend(connections)
            return
        for conn in connections:
            self._close_quietly(conn)

    def __enter__(self) -> PostgresStateStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class _AdvisoryLease:
    """A held session advisory lock; lost when its connection ends."""

    def __init__(self, conn: psycopg.Connection[Any], name: str) -> None:
        self._conn: psycopg.Connection[Any] | None = conn
        self._guard = threading.Lock()
        self.name = name

    def alive(self) -> bool:
        with self._guard:
            conn = self._conn
            if conn is None:
                return False
            try:
                conn.execute("SELECT 1")
                return True
            except psycopg.Error:
                # The session is gone and the server freed the lock with it.
                self._conn = None
                PostgresStateStore._close_quietly(conn)
                return False

    def release(self) -> None:
        with self._guard:
            conn, self._conn = self._conn, None
        if conn is not None:
            # Ending the session frees the lock.
            PostgresStateStore._close_quietly(conn)


class _ListenFeed:
    """``LISTEN gitplug`` on a connection of its own, in one daemon thread.

    Every notification (and every reconnect, after which a change may have
    been missed) bumps a generation number and wakes the waiters.
    """

    #: Seconds between reconnect attempts while the server is unreachable.
    retry_s = 1.0

    def __init__(self, store: PostgresStateStore) -> None:
        self.store = store
        self.pid = os.getpid()
        self._cond = threading.Condition()
        self._generation = 0
        self._seen = threading.local()
        self._stop = threading.Event()
        self._conn: psycopg.Connection[Any] | None = None
        self._thread = threading.Thread(target=self._run, name="gitplug-listen", daemon=True)
        self._thread.start()

    def _announce(self) -> None:
        with self._cond:
            self._generation += 1
            self._cond.notify_all()

    def _run(self) -> None:
        failing = False
        while not self._stop.is_set():
            try:
                conn = self.store.connect()
                self._conn = conn
                conn.execute(f"LISTEN {CHANNEL}")
                if failing:
                    logger.info("state database %s: listening for changes again", self.store.where)
                    failing = False
                self._announce()  # changes may have happened while not listening
                while not self._stop.is_set():
                    for _ in conn.notifies(timeout=1.0, stop_after=1):
                        self._announce()
            except psycopg.Error as exc:
                if not failing and not self._stop.is_set():
                    logger.warning(
                        "state database %s: not hearing changes (%s); retrying every %g s",
                        self.store.where, str(exc).strip().splitlines()[0] if str(exc).strip() else exc,
                        self.retry_s,
                    )
                failing = True
            finally:
                conn_, self._conn = self._conn, None
                if conn_ is not None:
                    PostgresStateStore._close_quietly(conn_)
            self._stop.wait(self.retry_s)

    def wait(self, timeout: float) -> bool:
        seen = getattr(self._seen, "generation", None)
        with self._cond:
            if seen is None:
                seen = self._generation
            woke = self._cond.wait_for(lambda: self._generation != seen, timeout=timeout)
            self._seen.generation = self._generation
        return bool(woke)

    def close(self) -> None:
        self._stop.set()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout=3)
