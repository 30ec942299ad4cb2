"""The state part: durable, shared data and no code of its own beyond storing it.

Owns what must survive a restart and be shared by every process of a server
(gunicorn workers, the CLI): plugins' live releases, pins, deploy history,
workers' heartbeats, webhook delivery ids.

- :mod:`.store`: the :class:`StateStore` protocol and its value types
  (:class:`PluginState`, :class:`DeployRecord`, ...).
- :mod:`.sqlbase`: the SQL both stores share (the contract, once).
- :mod:`.sqlite`: :class:`SQLiteStateStore`, the embedded default.
- :mod:`.postgres`: ``PostgresStateStore``, one database shared by a fleet of
  hosts (imported only when a ``postgresql://`` URL asks for it).
- :func:`open_state_store` picks an implementation by the URL's scheme; the
  protocol module never imports an implementation.

May import: :mod:`gitplug.errors` only.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import StateError
from .sqlite import SQLiteStateStore
from .store import (
    HOST_LOST_AFTER_S,
    INTERRUPTED_ERROR,
    CanaryState,
    ChangeFeed,
    DeployRecord,
    DeployRequest,
    DeployResult,
    HostInfo,
    HostPlugin,
    Lease,
    PluginState,
    PluginStateValue,
    Stage,
    StateStore,
    WorkerInfo,
    canary_figures,
    default_host,
    host_status,
    iso_at,
    now_iso,
    parse_iso,
    redact_url,
)

__all__ = [
    "ChangeFeed",
    "Lease",
    "HOST_LOST_AFTER_S",
    "INTERRUPTED_ERROR",
    "DeployRecord",
    "DeployRequest",
    "CanaryState",
    "canary_figures",
    "DeployResult",
    "HostInfo",
    "HostPlugin",
    "PluginState",
    "PluginStateValue",
    "SQLiteStateStore",
    "Stage",
    "StateStore",
    "WorkerInfo",
    "default_host",
    "host_status",
    "iso_at",
    "now_iso",
    "open_state_store",
    "parse_iso",
    "redact_url",
]


def open_state_store(url: str, *, base_dir: Path | None = None) -> StateStore:
    """Open the store named by the ``state:`` setting.

    ``sqlite:///<path>`` follows SQLAlchemy's convention: a relative path
    (``sqlite:///.gitplug/state.db``) is resolved against ``base_dir``
    (the configuration file's directory; default: the working directory) and
    an absolute one takes four slashes (``sqlite:////srv/state.db``, which is
    also what ``"sqlite:///" + str(absolute_path)`` gives).
    ``postgresql://`` (or ``postgres://``) is a libpq URL naming the database
    a fleet shares (README, "Running a fleet"); it connects on first use, so
    a host whose database is down still starts.
    """
    scheme, sep, rest = url.partition("://")
    scheme = scheme.lower()
    if sep and scheme in ("postgresql", "postgres"):
        try:
            from .postgres import PostgresStateStore  # psycopg is only needed by fleets
        except ImportError as exc:
            raise StateError(
                f"state {redact_url(url)!r} needs psycopg ({exc}); install it with "
                "pip install 'gitplug[fleet]' (README, \"Running a fleet\")"
            ) from exc
        return PostgresStateStore(url)
    if sep and scheme in ("redis", "rediss", "redis+sentinel", "unix"):
        raise StateError(
            f"state {redact_url(url)!r}: gitplug shares state through PostgreSQL, not redis; "
            "use postgresql://USER@HOST/DATABASE (README, \"Running a fleet\")"
        )
    if not sep or scheme != "sqlite" or not rest.startswith("/"):
        raise StateError(
            f"state {redact_url(url)!r} is not a store URL gitplug knows; expected "
            "sqlite:///relative/state.db, sqlite:////absolute/state.db or "
            "postgresql://USER@HOST/DATABASE"
        )
    raw = rest[1:]
    if not raw or raw == ":memory:":
        raise StateError(
            f"state {url!r} names no file; every process of a server must share the "
            "database, so give a path: sqlite:///.gitplug/state.db"
        )
    path = Path(raw)
    if not path.is_absolute():
        path = (base_dir if base_dir is not None else Path.cwd()) / path
    return SQLiteStateStore(path)

