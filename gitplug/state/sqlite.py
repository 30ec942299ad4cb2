"""The SQLite implementation of :class:`~gitplug.state.store.StateStore`.

One database file under the data directory, shared by every process of a
server (gunicorn workers, the CLI): WAL mode, a busy timeout, one connection
per thread, every write one ``BEGIN IMMEDIATE`` transaction, and an
append-only list of schema migrations.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

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
    seconds_since,
)

__all__ = ["SQLiteStateStore", "BUSY_TIMEOUT_S", "SCHEMA_VERSION"]

logger = logging.getLogger(__name__)

#: How long a writer waits for another process's transaction before failing.
BUSY_TIMEOUT_S = 10.0

#: Schema migrations: entry ``i`` brings the schema from version ``i`` to
#: ``i + 1``. Append only; never edit an entry that has shipped.
_MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        """CREATE TABLE plugins (
            name TEXT PRIMARY KEY, ref TEXT, pin TEXT, live_commit TEXT,
            previous_commit TEXT, state TEXT NOT NULL, desired_commit TEXT,
            last_error TEXT, updated_at TEXT NOT NULL)""",
        """CREATE TABLE deploys (
            id INTEGER PRIMARY KEY AUTOINCREMENT, plugin TEXT NOT NULL,
            trigger TEXT NOT NULL, ref TEXT, commit_sha TEXT, result TEXT NOT NULL,
            stage TEXT, error TEXT, started_at TEXT NOT NULL, duration_s REAL,
            log_path TEXT, host TEXT NOT NULL)""",
        "CREATE INDEX deploys_by_plugin ON deploys (plugin, id)",
        "CREATE INDEX deploys_by_commit ON deploys (plugin, commit_sha, id)",
        "CREATE INDEX deploys_running ON deploys (result) WHERE result = 'running'",
        "CREATE TABLE deliveries (id TEXT PRIMARY KEY, expires_at REAL NOT NULL)",
        "CREATE INDEX deliveries_by_expiry ON deliveries (expires_at)",
        """CREATE TABLE workers (
            worker_id TEXT PRIMARY KEY, host TEXT NOT NULL, pid INTEGER NOT NULL,
            plugin_commits TEXT NOT NULL, heartbeat_at REAL NOT NULL)""",
        "CREATE TABLE counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL)",
        "INSERT INTO counters (name, value) VALUES ('plugins', 0)",
    ),
    (
        # Deploys asked for by a process that is not the controller (a
        # webhook or API call that reached another worker).
        """CREATE TABLE deploy_requests (
            id INTEGER PRIMARY KEY AUTOINCREMENT, plugin TEXT NOT NULL,
            trigger TEXT NOT NULL, ref TEXT, requested_at TEXT NOT NULL)""",
    ),
    (
        # Requests and errors each worker served per release (auto-rollback
        # and status sum them over the workers of a host).
        """CREATE TABLE release_stats (
            worker_id TEXT NOT NULL, plugin TEXT NOT NULL, commit_sha TEXT NOT NULL,
            requests INTEGER NOT NULL, errors INTEGER NOT NULL, updated_at REAL NOT NULL,
            PRIMARY KEY (worker_id, plugin, commit_sha))""",
    ),
    (
        # Fleets: the tree id the deciding host tested, and each host's beat.
        "ALTER TABLE plugins ADD COLUMN live_tree TEXT",
        """CREATE TABLE hosts (
            host_id TEXT PRIMARY KEY, heartbeat_at REAL NOT NULL, plugins TEXT NOT NULL,
            leader INTEGER NOT NULL DEFAULT 0)""",
    ),
    (
        # The URL prefix the live release is mounted at (it may come from the
        # plugin's own constructor, which only a loaded release knows).
        "ALTER TABLE plugins ADD COLUMN url_prefix TEXT",
    ),
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

#: Connections a forked child inherited; see :meth:`SQLiteStateStore._conn`.
_FORK_ORPHANS: list[sqlite3.Connection] = []

_PLUGIN_COLUMNS = (
    "name, ref, pin, live_commit, previous_commit, state, desired_commit, last_error, updated_at, "
    "live_tree, url_prefix"
)
_DEPLOY_COLUMNS = (
    "id, plugin, trigger, ref, commit_sha, result, stage, error, started_at, duration_s, "
    "log_path, host, repeats, last_seen_at, signer"
)


def _plugin_from_row(row: sqlite3.Row) -> PluginState:
    values = dict(row)
    values["state"] = PluginStateValue(values["state"])
    return PluginState(**values)


def _deploy_from_row(row: sqlite3.Row) -> DeployRecord:
    values = dict(row)
    values["commit"] = values.pop("commit_sha")
    values["result"] = DeployResult(values["result"])
    values["stage"] = None if values["stage"] is None else Stage(values["stage"])
    return DeployRecord(**values)


def _hint(exc: sqlite3.Error) -> str:
    text = str(exc).lower()
    if "locked" in text or "busy" in text:
        return (
            f"; another process held the database for more than {BUSY_TIMEOUT_S:g} s: look "
            "for a stuck gitplug process, and keep the database on a local disk (not NFS)"
        )
    if "unable to open" in text or "readonly" in text or "i/o" in text:
        return "; check that its directory exists and is writable by this user"
    if "not a database" in text or "malformed" in text:
        return "; it is not a gitplug state database or is damaged: move it aside to start afresh"
    return ""


def _host_from_row(host_id: str, heartbeat_at: float, plugins: str, leader: Any) -> HostInfo:
    """A :class:`HostInfo` from its stored columns (``plugins``: JSON ``{name: [commit, error, leads]}``)."""
    return HostInfo(
        host_id=host_id,
        heartbeat_at=float(heartbeat_at),
        plugins={name: HostPlugin(*pair) for name, pair in json.loads(plugins).items()},
        leader=bool(leader),
    )


class _HostLease:
    """The lease of a one-machine store: held by whoever holds the host's controller lock."""

    def alive(self) -> bool:
        return True

    def release(self) -> None:
        return None


class SQLiteStateStore:
    """:class:`StateStore` in one SQLite file, shared by every process of a host.

    WAL mode lets readers run during a write; ``BEGIN IMMEDIATE`` makes each
    write take the lock up front so concurrent writers queue (for up to
    :data:`BUSY_TIMEOUT_S`) instead of failing on lock upgrade. Each thread
    gets its own connection; a forked child (gunicorn with ``--preload``)
    opens new ones rather than reusing its parent's.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StateError(
                f"state database {self.path}: cannot create its directory "
                f"{self.path.parent}: {exc}; choose a writable path for `state:`"
            ) from exc
        self._lock = threading.Lock()
        self._local = threading.local()
        #: (owning thread, its connection); this process's connections only.
        self._connections: list[tuple[threading.Thread, sqlite3.Connection]] = []
        self._pid = os.getpid()
        self._closed = False
        self._migrate()

    def __repr__(self) -> str:
        return f"<SQLiteStateStore {str(self.path)!r}>"

    # -- plumbing ------------------------------------------------------------

    def _error(self, action: str, exc: sqlite3.Error) -> StateError:
        return StateError(f"state database {self.path}: could not {action}: {exc}{_hint(exc)}")

    def _conn(self) -> sqlite3.Connection:
        if self._closed:
            raise StateError(f"state database {self.path}: the store is closed")
        if os.getpid() != self._pid:
            # A connection must not cross fork(). The parent's are kept
            # referenced, never closed here: closing the last connection may
            # checkpoint and delete the WAL the parent is still using.
            _FORK_ORPHANS.extend(conn for _, conn in self._connections)
            self._pid = os.getpid()
            self._lock = threading.Lock()
            self._local = threading.local()
            self._connections = []
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            try:
                conn = sqlite3.connect(
                    self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None,
                    check_same_thread=False,
                )
            except sqlite3.Error as exc:
                raise self._error("open it", exc) from exc
            try:
                conn.row_factory = sqlite3.Row
                conn.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
                conn.execute("PRAGMA journal_mode = WAL")
            except sqlite3.Error as exc:
                self._close_quietly(conn)
                raise self._error("open it", exc) from exc
            self._local.conn = conn
            with self._lock:
                # Close the connections of threads that have ended, so a
                # thread per deploy does not leak one connection each.
                dead = [c for t, c in self._connections if not t.is_alive()]
                self._connections = [(t, c) for t, c in self._connections if t.is_alive()]
                self._connections.append((threading.current_thread(), conn))
            for old in dead:
                self._close_quietly(old)
        return conn

    def _close_quietly(self, conn: sqlite3.Connection) -> None:
        try:
            conn.close()
        except sqlite3.Error as exc:  # closing is best effort; report, don't raise
            logger.warning("state database %s: closing a connection failed: %s", self.path, exc)

    @contextmanager
    def _write(self, action: str) -> Iterator[sqlite3.Connection]:
        """One write transaction: BEGIN IMMEDIATE ... COMMIT, rolled back on error."""
        conn = self._conn()
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                self._rollback(conn)
                raise
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            self._rollback(conn)
            raise self._error(action, exc) from exc

    @staticmethod
    def _rollback(conn: sqlite3.Connection) -> None:
        # The error being raised matters more than a failed rollback; SQLite
        # rolls back by itself when the connection is next used or closed.
        if conn.in_transaction:
            with suppress(sqlite3.Error):
                conn.execute("ROLLBACK")

    def _read(self, action: str, sql: str, params: Sequence[Any] = ()) -> list[sqlite3.Row]:
        try:
            return self._conn().execute(sql, params).fetchall()
        except sqlite3.Error as exc:
            raise self._error(action, exc) from exc

    def _migrate(self) -> None:
        with self._write("create or upgrade its schema") as conn:
            conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            row = conn.execute("SELECT version FROM schema_version").fetchone()
            current = 0 if row is None else int(row[0])
            if current > SCHEMA_VERSION:
                raise StateError(
                    f"state database {self.path} has schema version {current}, newer than "
                    f"this gitplug knows ({SCHEMA_VERSION}); upgrade gitplug"
                )
            for statements in _MIGRATIONS[current:]:
                for statement in statements:
                    conn.execute(statement)
            if row is None:
                conn.execute("INSERT INTO schema_version (version) VALUES (?)", (SCHEMA_VERSION,))
            elif current != SCHEMA_VERSION:
                conn.execute("UPDATE schema_version SET version = ?", (SCHEMA_VERSION,))
            if current != SCHEMA_VERSION:
                logger.info(
                    "state database %s: schema %d -> %d", self.path, current, SCHEMA_VERSION
                )

    def _deploy_row(self, conn: sqlite3.Connection, deploy_id: int) -> sqlite3.Row:
        row = conn.execute(
            f"SELECT {_DEPLOY_COLUMNS} FROM deploys WHERE id = ?", (deploy_id,)
        ).fetchone()
        if row is None:
            raise StateError(f"state database {self.path}: no deploy with id {deploy_id}")
        return row

    # -- plugins ---------------------------------------------------------------

    def get_plugin(self, name: str) -> PluginState | None:
        rows = self._read(
            f"read plugin {name!r}",
            f"SELECT {_PLUGIN_COLUMNS} FROM plugins WHERE name = ?", (name,),
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
        with self._write(f"update plugin {name!r}") as conn:
            row = self._update_plugin_in(conn, name, fields)
        return _plugin_from_row(row)

    @staticmethod
    def _update_plugin_in(conn: sqlite3.Connection, name: str, fields: dict[str, Any]) -> sqlite3.Row:
        """The upsert of :meth:`update_plugin`, inside the caller's transaction."""
        if "state" in fields:
            fields["state"] = PluginStateValue(fields["state"]).value
        now = now_iso()
        # Column names come from PLUGIN_FIELDS only, never from the caller.
        assignments = "".join(f"{column} = ?, " for column in fields)
        conn.execute(
            "INSERT INTO plugins (name, state, updated_at) VALUES (?, ?, ?) "
            "ON CONFLICT (name) DO NOTHING",
            (name, PluginStateValue.PENDING.value, now),
        )
        conn.execute(
            f"UPDATE plugins SET {assignments}updated_at = ? WHERE name = ?",
            (*fields.values(), now, name),
        )
        conn.execute("UPDATE counters SET value = value + 1 WHERE name = 'plugins'")
        return conn.execute(f"SELECT {_PLUGIN_COLUMNS} FROM plugins WHERE name = ?", (name,)).fetchone()

    def delete_plugin(self, name: str) -> None:
        with self._write(f"delete plugin {name!r}") as conn:
            if conn.execute("DELETE FROM plugins WHERE name = ?", (name,)).rowcount:
                conn.execute("UPDATE counters SET value = value + 1 WHERE name = 'plugins'")

    def change_counter(self) -> int:
        rows = self._read(
            "read the change counter", "SELECT value FROM counters WHERE name = 'plugins'"
        )
        return int(rows[0][0])

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
            cursor = conn.execute(
                "INSERT INTO deploys (plugin, trigger, ref, commit_sha, result, started_at, host) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (plugin, trigger, ref, commit, DeployResult.RUNNING.value, now_iso(),
                 host or default_host()),
            )
            row = self._deploy_row(conn, int(cursor.lastrowid or 0))
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
                # The plugin's new state and the deploy's result: one transaction,
                # so no crash can leave one written without the other.
                self._update_plugin_in(conn, row["plugin"], dict(plugin_update))
            if duration_s is None:
                duration_s = seconds_since(row["started_at"])
            conn.execute(
                "UPDATE deploys SET result = ?, stage = ?, error = ?, duration_s = ?, "
                "commit_sha = COALESCE(?, commit_sha), log_path = COALESCE(?, log_path) "
                "WHERE id = ?",
                (result.value, None if stage is None else Stage(stage).value, error,
                 duration_s, commit, log_path, deploy_id),
            )
            row = self._deploy_row(conn, deploy_id)
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
                assignments = ", ".join(f"{column} = ?" for column in columns)
                conn.execute(
                    f"UPDATE deploys SET {assignments} WHERE id = ?", (*columns.values(), deploy_id)
                )
            row = self._deploy_row(conn, deploy_id)
        return _deploy_from_row(row)

    def get_deploy(self, deploy_id: int) -> DeployRecord | None:
        rows = self._read(
            f"read deploy {deploy_id}",
            f"SELECT {_DEPLOY_COLUMNS} FROM deploys WHERE id = ?", (deploy_id,),
        )
        return _deploy_from_row(rows[0]) if rows else None

    def history(self, plugin: str, *, limit: int | None = 50) -> list[DeployRecord]:
        rows = self._read(
            f"read the history of {plugin!r}",
            f"SELECT {_DEPLOY_COLUMNS} FROM deploys WHERE plugin = ? ORDER BY id DESC LIMIT ?",
            (plugin, -1 if limit is None else max(limit, 0)),
        )
        return [_deploy_from_row(row) for row in rows]

    def deploy_counts(self) -> dict[tuple[str, str], int]:
        rows = self._read(
            "count deploys",
            "SELECT plugin, result, COUNT(*) FROM deploys GROUP BY plugin, result",
        )
        return {(row[0], row[1]): int(row[2]) for row in rows}

    def last_deploy(self, plugin: str) -> DeployRecord | None:
        records = self.history(plugin, limit=1)
        return records[0] if records else None

    def mark_running_interrupted(self, host: str | None = None) -> list[DeployRecord]:
        where = "result = 'running' AND host = ?"
        params = (host or default_host(),)
        with self._write("mark interrupted deploys") as conn:
            ids = [row[0] for row in conn.execute(f"SELECT id FROM deploys WHERE {where}", params)]
            conn.execute(
                f"UPDATE deploys SET result = ?, error = ? WHERE {where}",
                (DeployResult.INTERRUPTED.value, INTERRUPTED_ERROR, *params),
            )
            rows = [self._deploy_row(conn, deploy_id) for deploy_id in ids]
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
               WHERE d.plugin = ? AND d.result = 'failed' AND d.commit_sha IS NOT NULL
                 AND NOT EXISTS (
                     SELECT 1 FROM deploys AS later
                     WHERE later.plugin = d.plugin AND later.commit_sha = d.commit_sha
                       AND later.id > d.id AND later.result IN ('live', 'failed'))""",
            (plugin,),
        )
        return {row[0] for row in rows}

    # -- webhooks and workers -----------------------------------------------

    def remember_delivery(self, delivery_id: str, *, ttl_s: float = 7 * 86400) -> bool:
        now = time.time()
        with self._write(f"remember webhook delivery {delivery_id!r}") as conn:
            conn.execute("DELETE FROM deliveries WHERE expires_at <= ?", (now,))
            cursor = conn.execute(
                "INSERT OR IGNORE INTO deliveries (id, expires_at) VALUES (?, ?)",
                (delivery_id, now + ttl_s),
            )
            return cursor.rowcount == 1

    # Revoked logins share the deliveries table (an id with an expiry), under
    # a prefix no delivery id has: no schema change.
    _LOGIN_PREFIX = "gitplug-logout:"

    def revoke_login(self, login_id: str, *, until: float) -> None:
        with self._write("revoke a status page login") as conn:
            conn.execute("DELETE FROM deliveries WHERE expires_at <= ?", (time.time(),))
            conn.execute(
                "INSERT OR REPLACE INTO deliveries (id, expires_at) VALUES (?, ?)",
                (self._LOGIN_PREFIX + login_id, until),
            )

    def login_revoked(self, login_id: str) -> bool:
        return bool(
            self._read(
                "read revoked logins",
                "SELECT 1 FROM deliveries WHERE id = ? AND expires_at > ?",
                (self._LOGIN_PREFIX + login_id, time.time()),
            )
        )

    def request_deploy(self, plugin: str, *, trigger: str, ref: str | None = None) -> int:
        with self._write(f"queue a deploy request for {plugin!r}") as conn:
            cursor = conn.execute(
                "INSERT INTO deploy_requests (plugin, trigger, ref, requested_at) VALUES (?, ?, ?, ?)",
                (plugin, trigger, ref, now_iso()),
            )
            return int(cursor.lastrowid or 0)

    def take_deploy_requests(self, plugins: Collection[str] | None = None) -> list[DeployRequest]:
        names = None if plugins is None else sorted(plugins)
        if names == []:
            return []
        where = "" if names is None else f" WHERE plugin IN ({', '.join('?' * len(names))})"
        params = () if names is None else tuple(names)
        # A cheap read first: the controller calls this several times a second.
        if not self._read("read deploy requests", f"SELECT 1 FROM deploy_requests{where} LIMIT 1", params):
            return []
        with self._write("take deploy requests") as conn:
            rows = conn.execute(
                f"SELECT id, plugin, trigger, ref, requested_at FROM deploy_requests{where} ORDER BY id", params
            ).fetchall()
            conn.executemany("DELETE FROM deploy_requests WHERE id = ?", [(row["id"],) for row in rows])
        return [DeployRequest(**dict(row)) for row in rows]

    def heartbeat(self, worker: WorkerInfo) -> None:
        with self._write(f"record the heartbeat of worker {worker.worker_id!r}") as conn:
            conn.execute(
                "INSERT OR REPLACE INTO workers "
                "(worker_id, host, pid, plugin_commits, heartbeat_at) VALUES (?, ?, ?, ?, ?)",
                (worker.worker_id, worker.host, worker.pid,
                 json.dumps(worker.plugin_commits, sort_keys=True), worker.heartbeat_at),
            )

    def workers(self, *, max_age_s: float = 10.0) -> list[WorkerInfo]:
        with self._write("list workers") as conn:
            conn.execute("DELETE FROM workers WHERE heartbeat_at < ?", (time.time() - max_age_s,))
            rows = conn.execute(
                "SELECT worker_id, host, pid, plugin_commits, heartbeat_at FROM workers "
                "ORDER BY worker_id"
            ).fetchall()
        return [
            WorkerInfo(row[0], row[1], int(row[2]), json.loads(row[3]), float(row[4]))
            for row in rows
        ]

    def remove_worker(self, worker_id: str) -> None:
        with self._write(f"remove worker {worker_id!r}") as conn:
            conn.execute("DELETE FROM workers WHERE worker_id = ?", (worker_id,))

    def record_release_stats(self, worker_id: str, stats: Mapping[tuple[str, str], tuple[int, int]]) -> None:
        if not stats:
            return
        now = time.time()
        with self._write(f"record request counts of worker {worker_id!r}") as conn:
            conn.executemany(
                "INSERT OR REPLACE INTO release_stats "
                "(worker_id, plugin, commit_sha, requests, errors, updated_at) VALUES (?, ?, ?, ?, ?, ?)",
                [(worker_id, p, c, r, e, now) for (p, c), (r, e) in stats.items()],
            )

    def release_stats(self, plugin: str, commit: str) -> tuple[int, int]:
        rows = self._read(
            f"read request counts of {plugin!r} {commit}",
            "SELECT COALESCE(SUM(requests), 0), COALESCE(SUM(errors), 0) FROM release_stats "
            "WHERE plugin = ? AND commit_sha = ?",
            (plugin, commit),
        )
        return int(rows[0][0]), int(rows[0][1])

    def host_heartbeat(self, host: HostInfo) -> None:
        plugins = {name: [p.live_commit, p.error, p.leads] for name, p in host.plugins.items()}
        with self._write(f"record the heartbeat of host {host.host_id!r}") as conn:
            conn.execute(
                "INSERT OR REPLACE INTO hosts (host_id, heartbeat_at, plugins, leader) VALUES (?, ?, ?, ?)",
                (host.host_id, host.heartbeat_at, json.dumps(plugins, sort_keys=True), int(host.leader)),
            )

    def hosts(self) -> list[HostInfo]:
        rows = self._read(
            "list hosts", "SELECT host_id, heartbeat_at, plugins, leader FROM hosts ORDER BY host_id"
        )
        return [_host_from_row(row[0], row[1], row[2], row[3]) for row in rows]

    def acquire_lease(self, name: str, *, wait_s: float | None = 0.0) -> _HostLease:
        # One file is one machine's: the caller's host-wide lock is the lease.
        return _HostLease()

    def change_feed(self) -> None:
        return None  # SQLite cannot announce; callers poll change_counter()

    def close(self) -> None:
        with self._lock:
            connections, self._connections = self._connections, []
            self._closed = True
        self._local = threading.local()
        for _, conn in connections:
            self._close_quietly(conn)

    def __enter__(self) -> SQLiteStateStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
