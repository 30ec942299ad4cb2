"""The state part: durable, shared data and no code of its own beyond storing it.

Owns what must survive a restart and be shared by every process of a server
(gunicorn workers, the CLI): plugins' live releases, pins, deploy history,
workers' heartbeats, webhook delivery ids.

- :mod:`.store`: the :class:`StateStore` protocol and its value types
  (:class:`PluginState`, :class:`DeployRecord`, ...).
- :mod:`.sqlite`: :class:`SQLiteStateStore`, the embedded default.
- :func:`open_state_store` picks an implementation by the URL's scheme; the
  protocol module never imports an implementation.

May import: :mod:`gitplug.errors` only.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import StateError
from .sqlite import SQLiteStateStore
from .store import (
    INTERRUPTED_ERROR,
    DeployRecord,
    DeployRequest,
    DeployResult,
    PluginState,
    PluginStateValue,
    Stage,
    StateStore,
    WorkerInfo,
    default_host,
    now_iso,
    parse_iso,
)

__all__ = [
    "INTERRUPTED_ERROR",
    "DeployRecord",
    "DeployRequest",
    "DeployResult",
    "PluginState",
    "PluginStateValue",
    "SQLiteStateStore",
    "Stage",
    "StateStore",
    "WorkerInfo",
    "default_host",
    "now_iso",
    "open_state_store",
    "parse_iso",
]


def open_state_store(url: str, *, base_dir: Path | None = None) -> StateStore:
    """Open the store named by the ``state:`` setting.

    ``sqlite:///<path>`` follows SQLAlchemy's convention: a relative path
    (``sqlite:///.gitplug/state.db``) is resolved against ``base_dir``
    (the configuration file's directory; default: the working directory) and
    an absolute one takes four slashes (``sqlite:////srv/state.db``, which is
    also what ``"sqlite:///" + str(absolute_path)`` gives).
    """
    scheme, sep, rest = url.partition("://")
    scheme = scheme.lower()
    if sep and scheme in ("redis", "rediss", "redis+sentinel", "unix"):
        raise StateError(
            f"state {url!r}: the redis store is not built yet; "
            "use sqlite:///path/to/state.db"
        )
    if not sep or scheme != "sqlite" or not rest.startswith("/"):
        raise StateError(
            f"state {url!r} is not a store URL gitplug knows; expected "
            "sqlite:///relative/state.db or sqlite:////absolute/state.db"
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

