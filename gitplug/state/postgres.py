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

import functools
import logging
import os
import threading
import zlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from typing import Any

import psycopg
import psycopg.errors
from psycopg.rows import dict_row

from ..errors import StateError
from .sqlbase import SQLStateStore
from .store import redact_url

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

#: Connections a forked child inherited: kept referenced, never closed by the
#: child (closing would end the parent's session on the shared socket).
_FORK_ORPHANS: list[psycopg.Connection[Any]] = []

@functools.lru_cache(maxsize=256)
def _placeholders(sql: str) -> str:
    """The shared SQL's ``?`` as psycopg's ``%s`` (that SQL has no literal ``?`` or ``%``)."""
    return sql.replace("?", "%s")


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


class PostgresStateStore(SQLStateStore):
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
                return conn.execute(self._sql(sql), params).fetchall()
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

    # -- the shared SQL's hooks (see SQLStateStore) ----------------------------------

    _NO_LIMIT = None  # LIMIT NULL: no limit

    def _sql(self, sql: str) -> str:
        return _placeholders(sql)

    def _exec_many(self, conn: psycopg.Connection[Any], sql: str, rows: list[Sequence[Any]]) -> None:
        with conn.cursor() as cursor:
            cursor.executemany(self._sql(sql), rows)

    def _bump(self, conn: psycopg.Connection[Any]) -> None:
        conn.execute("UPDATE counters SET value = value + 1 WHERE name = 'plugins'")
        conn.execute("SELECT pg_notify(%s, 'plugins')", (CHANNEL,))

    def _requested(self, conn: psycopg.Connection[Any]) -> None:
        conn.execute("SELECT pg_notify(%s, 'requests')", (CHANNEL,))

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
