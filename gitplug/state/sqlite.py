"""The SQLite implementation of :class:`~gitplug.state.store.StateStore`.

One database file under the data directory, shared by every process of a
server (gunicorn workers, the CLI): WAL mode, a busy timeout, one connection
per thread, every write one ``BEGIN IMMEDIATE`` transaction, and an
append-only list of schema migrations. The SQL of the store's methods is
:class:`~gitplug.state.sqlbase.SQLStateStore`'s, shared with PostgreSQL.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

from ..errors import StateError
from .sqlbase import SQLStateStore

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
    (
        # Canary releases: the running canary of a plugin, and both sides'
        # figures on the deploy that ran it (JSON text).
        "ALTER TABLE plugins ADD COLUMN canary TEXT",
        "ALTER TABLE deploys ADD COLUMN canary TEXT",
    ),
    (
        # How the other hosts of a fleet reach each host (host_url): they fetch
        # the repositories of `repo: push` plugins from the host that has them.
        "ALTER TABLE hosts ADD COLUMN url TEXT",
    ),
)
SCHEMA_VERSION = len(_MIGRATIONS)

#: Connections a forked child inherited; see :meth:`SQLiteStateStore._conn`.
_FORK_ORPHANS: list[sqlite3.Connection] = []

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


class _HostLease:
    """The lease of a one-machine store: held by whoever holds the host's controller lock."""

    def alive(self) -> bool:
        return True

    def release(self) -> None:
        return None


class SQLiteStateStore(SQLStateStore):
    """:class:`StateStore` in one SQLite file, shared by every process of a host.

    WAL mode lets readers run during a write; ``BEGIN IMMEDIATE`` makes each
    write take the lock up front so concurrent writers queue (for up to
    :data:`BUSY_TIMEOUT_S`) instead of failing on lock upgrade. Each thread
    gets its own connection; a forked child (gunicorn with ``--preload``)
    opens new ones rather than reusing its parent's.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.where = str(self.path)
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

    # -- what only this database does ------------------------------------------------

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
