"""What this release has done since it was loaded: a long-lived resource.

The counters are created in ``on_load`` and closed in ``on_unload``, never at
import time. They live in this release's own module, so each release starts
from zero: state that must survive a deploy belongs in the host's session or
a database, not in plugin memory.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from dataclasses import dataclass
from datetime import datetime, timezone

__all__ = ["Summary", "start", "stop", "is_running", "record_greeting", "summary"]


@dataclass(frozen=True)
class Summary:
    """A consistent copy of the counters."""

    started_at: datetime
    uptime_s: float
    greetings: int
    top_names: tuple[tuple[str, int], ...]


class _Stats:
    """Thread-safe counters; requests are served from many threads at once."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.started_at = datetime.now(timezone.utc)
        self._started = time.monotonic()
        self._greetings = 0
        self._names: Counter[str] = Counter()
        #: Names are counted case-insensitively and shown as first written.
        self._display: dict[str, str] = {}

    def record(self, name: str) -> None:
        with self._lock:
            self._greetings += 1
            key = name.casefold()
            self._names[key] += 1
            self._display.setdefault(key, name)

    def summary(self, top: int = 5) -> Summary:
        with self._lock:
            return Summary(
                started_at=self.started_at,
                uptime_s=time.monotonic() - self._started,
                greetings=self._greetings,
                top_names=tuple((self._display[k], n) for k, n in self._names.most_common(top)),
            )


_stats: _Stats | None = None


def start() -> None:
    """Create the counters (``on_load``)."""
    global _stats
    _stats = _Stats()


def stop() -> Summary:
    """Close the counters and return their final values (``on_unload``)."""
    global _stats
    final = _current().summary()
    _stats = None
    return final


def is_running() -> bool:
    return _stats is not None


def _current() -> _Stats:
    if _stats is None:
        raise RuntimeError(
            "hello's stats are not started: they are created by the plugin's on_load,"
            " which gitplug runs before the release goes live."
        )
    return _stats


def record_greeting(name: str) -> None:
    """Count one greeting of ``name``."""
    _current().record(name)


def summary(top: int = 5) -> Summary:
    """The counters now, with the ``top`` most greeted names."""
    return _current().summary(top)
