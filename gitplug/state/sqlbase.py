"""The SQL both stores share: plugins, deploys, deliveries, logins, requests, workers, hosts.

:class:`SQLStateStore` is every :class:`~gitplug.state.store.StateStore`
method that is plain SQL, written once with ``?`` placeholders and the
SQL both databases speak (``ON CONFLICT`` upserts, ``RETURNING``: SQLite
3.35 or newer). :class:`~gitplug.state.sqlite.SQLiteStateStore` and
``PostgresStateStore`` give it what differs: connections and transactions
(:meth:`SQLStateStore._write`, :meth:`SQLStateStore._read`), the driver's
placeholder (:meth:`SQLStateStore._sql`), schema migrations, and what only
a server can do (notifications in :meth:`SQLStateStore._bump`, leases,
the change feed).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Collection, Mapping, Sequence
from contextlib import AbstractContextManager
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

__all__ = ["SQLStateStore", "PLUGIN_COLUMNS", "DEPLOY_COLUMNS"]

logger = logging.getLogger(__name__)

PLUGIN_COLUMNS = (
    "name, ref, pin, live_commit, previous_commit, state, desired_commit, last_error, updated_at, "
    "live_tree, url_prefix, canary"
)
DEPLOY_COLUMNS = (
    "id, plugin, trigger, ref, commit_sha, result, stage, error, started_at, duration_s, "
    "log_path, host, repeats, last_seen_at, signer, canary"
)
_WORKER_COLUMNS = "worker_id, host, pid, plugin_commits, heartbeat_at"
_REQUEST_COLUMNS = "id, plugin, trigger, ref, requested_at"

#: Revoked status-page logins share the deliveries table (an id with an
#: expiry) under a prefix no delivery id has.
LOGIN_PREFIX = "gitplug-logout:"


def plugin_from_row(row: Mapping[str, Any]) -> PluginState:
    """A :class:`PluginState` from a row of :data:`PLUGIN_COLUMNS`."""
    values = {key: row[key] for key in row.keys()}  # noqa: SIM118 - sqlite3.Row has keys(), no items()
    values["state"] = PluginStateValue(values["state"])
    return PluginState(**values)


def deploy_from_row(row: Mapping[str, Any]) -> DeployRecord:
    """A :class:`DeployRecord` from a row of :data:`DEPLOY_COLUMNS`."""
    values = {key: row[key] for key in row.keys()}  # noqa: SIM118
    values["commit"] = values.pop("commit_sha")
    values["id"] = int(values["id"])
    values["result"] = DeployResult(values["result"])
    values["stage"] = None if values["stage"] is None else Stage(values["stage"])
    return DeployRecord(**values)


def host_from_row(row: Mapping[str, Any]) -> HostInfo:
    """A :class:`HostInfo` from its row (``plugins``: JSON ``{name: [commit, error, leads]}``)."""
    return HostInfo(
        host_id=row["host_id"],
        heartbeat_at=float(row["heartbeat_at"]),
        plugins={name: HostPlugin(*entry) for name, entry in json.loads(row["plugins"]).items()},
        leader=bool(row["leader"]),
        url=row["url"],
    )


class SQLStateStore:
    """The shared SQL of the stores; a subclass supplies the database (see the module)."""

    #: What the state database is called in messages (a path, or a URL without its password).
    where: str
    #: ``LIMIT`` meaning "no limit": SQLite takes -1, PostgreSQL NULL.
    _NO_LIMIT: Any = -1

    # -- what a subclass supplies ------------------------------------------------

    def _write(self, action: str) -> AbstractContextManager[Any]:
        """One write transaction yielding a connection; a driver error becomes StateError."""
        raise NotImplementedError

    def _read(self, action: str, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        """The rows of one query (``?`` placeholders); a driver error becomes StateError."""
        raise NotImplementedError

    def _sql(self, sql: str) -> str:
        """``sql`` in the driver's placeholder style (``?`` is sqlite3's)."""
        return sql

    def _bump(self, conn: Any) -> None:
        """Count a plugin-state change (and announce it, where the database can)."""
        self._exec(conn, "UPDATE counters SET value = value + 1 WHERE name = 'plugins'")

    def _requested(self, conn: Any) -> None:
        """A deploy request was queued in ``conn``'s transaction (announce it, where possible)."""

    # -- helpers --------------------------------------------------------------------

    def _exec(self, conn: Any, sql: str, params: Sequence[Any] = ()) -> Any:
        return conn.execute(self._sql(sql), params)

    def _exec_many(self, conn: Any, sql: str, rows: list[Sequence[Any]]) -> None:
        for params in rows:
            self._exec(conn, sql, params)

    def _one(self, conn: Any, sql: str, params: Sequence[Any] = ()) -> Any:
        """The first row of a statement (``RETURNING``), read to its end so it is finished."""
        rows = self._exec(conn, sql, params).fetchall()
        return rows[0] if rows else None

    def _deploy_row(self, conn: Any, deploy_id: int) -> Any:
        row = self._one(conn, f"SELECT {DEPLOY_COLUMNS} FROM deploys WHERE id = ?", (deploy_id,))
        if row is None:
            raise StateError(f"state database {self.where}: no deploy with id {deploy_id}")
        return row

    # -- plugins ---------------------------------------------------------------

    def get_plugin(self, name: str) -> PluginState | None:
        rows = self._read(f"read plugin {name!r}", f"SELECT {PLUGIN_COLUMNS} FROM plugins WHERE name = ?", (name,))
        return plugin_from_row(rows[0]) if rows else None

    def list_plugins(self) -> list[PluginState]:
        rows = self._read("list plugins", f"SELECT {PLUGIN_COLUMNS} FROM plugins ORDER BY name")
        return [plugin_from_row(row) for row in rows]

    def update_plugin(self, name: str, **fields: Any) -> PluginState:
        unknown = sorted(set(fields) - PLUGIN_FIELDS)
        if unknown:
            raise TypeError(
                f"update_plugin() got unknown fields {unknown}; expected some of {sorted(PLUGIN_FIELDS)}"
            )
        with self._write(f"update plugin {name!r}") as conn:
            row = self._update_plugin_in(conn, name, fields)
        return plugin_from_row(row)

    def _update_plugin_in(self, conn: Any, name: str, fields: dict[str, Any]) -> Any:
        """The upsert of :meth:`update_plugin`, inside the caller's transaction."""
        if "state" in fields:
            fields["state"] = PluginStateValue(fields["state"]).value
        now = now_iso()
        # Column names come from PLUGIN_FIELDS only, never from the caller.
        assignments = "".join(f"{column} = ?, " for column in fields)
        self._exec(
            conn,
            "INSERT INTO plugins (name, state, updated_at) VALUES (?, ?, ?) ON CONFLICT (name) DO NOTHING",
            (name, PluginStateValue.PENDING.value, now),
        )
        row = self._one(
            conn,
            f"UPDATE plugins SET {assignments}updated_at = ? WHERE name = ? RETURNING {PLUGIN_COLUMNS}",
            (*fields.values(), now, name),
        )
        self._bump(conn)
        return row

    def delete_plugin(self, name: str) -> None:
        with self._write(f"delete plugin {name!r}") as conn:
            if self._exec(conn, "DELETE FROM plugins WHERE name = ?", (name,)).rowcount:
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
            row = self._one(
                conn,
                "INSERT INTO deploys (plugin, trigger, ref, commit_sha, result, started_at, host) "
                f"VALUES (?, ?, ?, ?, ?, ?, ?) RETURNING {DEPLOY_COLUMNS}",
                (plugin, trigger, ref, commit, DeployResult.RUNNING.value, now_iso(), host or default_host()),
            )
        return deploy_from_row(row)

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
            row = self._one(
                conn,
                "UPDATE deploys SET result = ?, stage = ?, error = ?, duration_s = ?, "
                "commit_sha = COALESCE(?, commit_sha), log_path = COALESCE(?, log_path) "
                f"WHERE id = ? RETURNING {DEPLOY_COLUMNS}",
                (result.value, None if stage is None else Stage(stage).value, error,
                 duration_s, commit, log_path, deploy_id),
            )
        return deploy_from_row(row)

    def update_deploy(self, deploy_id: int, **fields: Any) -> DeployRecord:
        unknown = sorted(set(fields) - DEPLOY_FIELDS)
        if unknown:
            raise TypeError(
                f"update_deploy() got unknown fields {unknown}; expected some of {sorted(DEPLOY_FIELDS)}"
            )
        if fields.get("result") is not None:
            fields["result"] = DeployResult(fields["result"]).value
        if fields.get("stage") is not None:
            fields["stage"] = Stage(fields["stage"]).value
        columns = {"commit_sha" if key == "commit" else key: value for key, value in fields.items()}
        with self._write(f"update deploy {deploy_id}") as conn:
            self._deploy_row(conn, deploy_id)
            if columns:
                # Column names come from DEPLOY_FIELDS only, never from the caller.
                assignments = ", ".join(f"{column} = ?" for column in columns)
                self._exec(conn, f"UPDATE deploys SET {assignments} WHERE id = ?", (*columns.values(), deploy_id))
            row = self._deploy_row(conn, deploy_id)
        return deploy_from_row(row)

    def get_deploy(self, deploy_id: int) -> DeployRecord | None:
        rows = self._read(
            f"read deploy {deploy_id}", f"SELECT {DEPLOY_COLUMNS} FROM deploys WHERE id = ?", (deploy_id,)
        )
        return deploy_from_row(rows[0]) if rows else None

    def history(self, plugin: str, *, limit: int | None = 50) -> list[DeployRecord]:
        rows = self._read(
            f"read the history of {plugin!r}",
            f"SELECT {DEPLOY_COLUMNS} FROM deploys WHERE plugin = ? ORDER BY id DESC LIMIT ?",
            (plugin, self._NO_LIMIT if limit is None else max(limit, 0)),
        )
        return [deploy_from_row(row) for row in rows]

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
            rows = self._exec(
                conn,
                "UPDATE deploys SET result = ?, error = ? WHERE result = 'running' AND host = ? "
                f"RETURNING {DEPLOY_COLUMNS}",
                (DeployResult.INTERRUPTED.value, INTERRUPTED_ERROR, host or default_host()),
            ).fetchall()
        records = sorted((deploy_from_row(row) for row in rows), key=lambda record: record.id)
        for record in records:
            logger.warning(
                "deploy %d of plugin %s (commit %s) was interrupted: %s",
                record.id, record.plugin, record.commit, INTERRUPTED_ERROR,
            )
        return records

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
        return {row["commit_sha"] for row in rows}

    # -- webhook deliveries and logins ------------------------------------------

    def remember_delivery(self, delivery_id: str, *, ttl_s: float = 7 * 86400) -> bool:
        now = time.time()
        with self._write(f"remember webhook delivery {delivery_id!r}") as conn:
            self._exec(conn, "DELETE FROM deliveries WHERE expires_at <= ?", (now,))
            # A concurrent insert of the same id waits for the first one's
            # commit and then does nothing: exactly one caller gets True.
            cursor = self._exec(
                conn,
                "INSERT INTO deliveries (id, expires_at) VALUES (?, ?) ON CONFLICT (id) DO NOTHING",
                (delivery_id, now + ttl_s),
            )
            return bool(cursor.rowcount == 1)

    def revoke_login(self, login_id: str, *, until: float) -> None:
        with self._write("revoke a status page login") as conn:
            self._exec(conn, "DELETE FROM deliveries WHERE expires_at <= ?", (time.time(),))
            self._exec(
                conn,
                "INSERT INTO deliveries (id, expires_at) VALUES (?, ?) "
                "ON CONFLICT (id) DO UPDATE SET expires_at = excluded.expires_at",
                (LOGIN_PREFIX + login_id, until),
            )

    def login_revoked(self, login_id: str) -> bool:
        return bool(
            self._read(
                "read revoked logins",
                "SELECT 1 AS revoked FROM deliveries WHERE id = ? AND expires_at > ?",
                (LOGIN_PREFIX + login_id, time.time()),
            )
        )

    # -- deploy requests ---------------------------------------------------------------

    def request_deploy(self, plugin: str, *, trigger: str, ref: str | None = None) -> int:
        with self._write(f"queue a deploy request for {plugin!r}") as conn:
            row = self._one(
                conn,
                "INSERT INTO deploy_requests (plugin, trigger, ref, requested_at) VALUES (?, ?, ?, ?) RETURNING id",
                (plugin, trigger, ref, now_iso()),
            )
            self._requested(conn)
        return int(row["id"])

    def take_deploy_requests(self, plugins: Collection[str] | None = None) -> list[DeployRequest]:
        names = None if plugins is None else sorted(plugins)
        if names == []:
            return []
        where = "" if names is None else f" WHERE plugin IN ({', '.join('?' * len(names))})"
        params = () if names is None else tuple(names)
        # A cheap read first: the controller calls this several times a second.
        if not self._read("read deploy requests", f"SELECT 1 AS waiting FROM deploy_requests{where} LIMIT 1",
                          params):
            return []
        with self._write("take deploy requests") as conn:
            rows = self._exec(conn, f"DELETE FROM deploy_requests{where} RETURNING {_REQUEST_COLUMNS}",
                              params).fetchall()
        requests = [
            DeployRequest(int(row["id"]), row["plugin"], row["trigger"], row["ref"], row["requested_at"])
            for row in rows
        ]
        return sorted(requests, key=lambda request: request.id)

    # -- workers and hosts ---------------------------------------------------------------

    def heartbeat(self, worker: WorkerInfo) -> None:
        with self._write(f"record the heartbeat of worker {worker.worker_id!r}") as conn:
            self._exec(
                conn,
                f"INSERT INTO workers ({_WORKER_COLUMNS}) VALUES (?, ?, ?, ?, ?) ON CONFLICT (worker_id) "
                "DO UPDATE SET host = excluded.host, pid = excluded.pid, "
                "plugin_commits = excluded.plugin_commits, heartbeat_at = excluded.heartbeat_at",
                (worker.worker_id, worker.host, worker.pid,
                 json.dumps(worker.plugin_commits, sort_keys=True), worker.heartbeat_at),
            )

    def workers(self, *, max_age_s: float = 10.0) -> list[WorkerInfo]:
        with self._write("list workers") as conn:
            self._exec(conn, "DELETE FROM workers WHERE heartbeat_at < ?", (time.time() - max_age_s,))
            rows = self._exec(conn, f"SELECT {_WORKER_COLUMNS} FROM workers ORDER BY worker_id").fetchall()
        return [
            WorkerInfo(row["worker_id"], row["host"], int(row["pid"]), json.loads(row["plugin_commits"]),
                       float(row["heartbeat_at"]))
            for row in rows
        ]

    def remove_worker(self, worker_id: str) -> None:
        with self._write(f"remove worker {worker_id!r}") as conn:
            self._exec(conn, "DELETE FROM workers WHERE worker_id = ?", (worker_id,))

    def record_release_stats(self, worker_id: str, stats: Mapping[tuple[str, str], tuple[int, int]]) -> None:
        if not stats:
            return
        now = time.time()
        with self._write(f"record request counts of worker {worker_id!r}") as conn:
            self._exec_many(
                conn,
                "INSERT INTO release_stats (worker_id, plugin, commit_sha, requests, errors, updated_at) "
                "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (worker_id, plugin, commit_sha) DO UPDATE "
                "SET requests = excluded.requests, errors = excluded.errors, updated_at = excluded.updated_at",
                [(worker_id, p, c, r, e, now) for (p, c), (r, e) in stats.items()],
            )

    def release_stats(self, plugin: str, commit: str) -> tuple[int, int]:
        rows = self._read(
            f"read request counts of {plugin!r} {commit}",
            "SELECT COALESCE(SUM(requests), 0) AS r, COALESCE(SUM(errors), 0) AS e FROM release_stats "
            "WHERE plugin = ? AND commit_sha = ?",
            (plugin, commit),
        )
        return int(rows[0]["r"]), int(rows[0]["e"])

    def host_heartbeat(self, host: HostInfo) -> None:
        plugins = {name: [p.live_commit, p.error, p.leads] for name, p in host.plugins.items()}
        with self._write(f"record the heartbeat of host {host.host_id!r}") as conn:
            self._exec(
                conn,
                "INSERT INTO hosts (host_id, heartbeat_at, plugins, leader, url) VALUES (?, ?, ?, ?, ?) "
                "ON CONFLICT (host_id) DO UPDATE SET heartbeat_at = excluded.heartbeat_at, "
                "plugins = excluded.plugins, leader = excluded.leader, url = excluded.url",
                (host.host_id, host.heartbeat_at, json.dumps(plugins, sort_keys=True), bool(host.leader),
                 host.url),
            )

    def hosts(self) -> list[HostInfo]:
        rows = self._read("list hosts", "SELECT host_id, heartbeat_at, plugins, leader, url FROM hosts "
                          "ORDER BY host_id")
        return [host_from_row(row) for row in rows]

