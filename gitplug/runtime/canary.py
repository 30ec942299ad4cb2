"""Which side of a canary serves a request (README, "Canary releases").

During a canary a plugin has two releases loaded: the live (*stable*) one
and the new (*canary*) one. The runtime publishes, beside its live
:class:`~gitplug.runtime.snapshot.Snapshot`, one more snapshot per canary in
which that plugin's release is the canary; :class:`CanarySplit` sends each
request under the plugin's prefix to one of the two snapshots as a whole, so
routing, views, hooks, templates, static files and ``url_for`` of a request
all come from one release.

A client stays on its side for the whole canary:

* a cookie named ``gitplug_canary_<plugin>``, scoped to the plugin's prefix,
  says which side it was sent to (its value names the canary release, so a
  new canary assigns clients afresh);
* without the cookie (the first request, or a client that keeps none), a
  stable hash of the client address (``REMOTE_ADDR``, as the host's proxy
  middleware leaves it) picks the side, the same in every worker and host;
* a versioned static URL (``<prefix>/static/<release>/...``) is served by
  the release it names, whichever side the client is on: a page rendered by
  one side never loads the other side's files.
"""

from __future__ import annotations

import typing as t
import zlib

if t.TYPE_CHECKING:
    from .loaded import LoadedRelease

#: A :class:`~gitplug.runtime.snapshot.Snapshot` (which holds the splits, so
#: this module does not import it: no import cycle).
Snapshot = t.Any

__all__ = ["CanarySplit", "COOKIE_PREFIX", "BUCKETS", "WithCookie", "bucket", "pick_side"]

#: The canary cookie of plugin ``hello`` is ``gitplug_canary_hello``.
COOKIE_PREFIX = "gitplug_canary_"
#: Clients are hashed into this many buckets; ``percent`` of them go to the canary.
BUCKETS = 10_000
#: How long a browser keeps its side (seconds); longer than any sensible canary.
COOKIE_MAX_AGE = 7 * 86400


def bucket(token: str, address: str) -> int:
    """The bucket of a client address for one canary, in ``[0, BUCKETS)``.

    CRC-32 rather than :func:`hash`: it is the same in every process (no hash
    randomisation), so all workers and hosts put a client on the same side.
    """
    return zlib.crc32(f"{token}|{address}".encode("utf-8", "surrogateescape")) % BUCKETS


def _static_marks(release: LoadedRelease) -> tuple[str, ...]:
    """The path beginnings of ``release``'s versioned static URLs (``/hello/static/<id>/``)."""
    version = f"/{release.release_id[:12]}/"
    marks = []
    for endpoint, rules in release.own_rules_by_endpoint.items():
        if not endpoint.endswith(".static"):
            continue
        for rule in rules:
            head = rule.rule.split("<", 1)[0]
            if version in head:
                marks.append(head)
    return tuple(marks)


class CanarySplit:
    """One plugin's canary within a live snapshot. Immutable once built.

    ``snapshot`` is the live snapshot with the plugin's release replaced by
    ``canary``; requests sent to the canary are pinned to it.
    """

    __slots__ = (
        "name", "stable", "canary", "percent", "snapshot", "threshold", "token", "cookie", "_cookie_eq",
        "_canary_value", "_stable_value", "_canary_marks", "_stable_marks", "_set_canary", "_set_stable",
    )

    def __init__(self, stable: LoadedRelease, canary: LoadedRelease, percent: float, snapshot: Snapshot) -> None:
        self.name = stable.name
        self.stable = stable
        self.canary = canary
        self.percent = percent
        self.snapshot = snapshot
        self.threshold = round(percent * BUCKETS / 100)
        #: Names the canary release: a cookie of an earlier canary is ignored.
        self.token = canary.release_id[:12]
        self.cookie = f"{COOKIE_PREFIX}{self.name}"
        self._cookie_eq = f"{self.cookie}="
        self._canary_value = f"{self.token}.c"
        self._stable_value = f"{self.token}.s"
        self._canary_marks = _static_marks(canary)
        self._stable_marks = _static_marks(stable)
        path = canary.url_prefix.rstrip("/") or "/"
        attributes = f"; Path={path}; Max-Age={COOKIE_MAX_AGE}; HttpOnly; SameSite=Lax"
        self._set_canary = ("Set-Cookie", f"{self.cookie}={self._canary_value}{attributes}")
        self._set_stable = ("Set-Cookie", f"{self.cookie}={self._stable_value}{attributes}")

    def _from_cookie(self, environ: dict[str, t.Any]) -> bool | None:
        header = environ.get("HTTP_COOKIE")
        if not header:
            return None
        # One find, no split: this runs on every request of a plugin in its canary.
        at = header.find(self._cookie_eq)
        while at > 0 and header[at - 1] not in "; ":
            at = header.find(self._cookie_eq, at + 1)  # the name ends another cookie's name
        if at < 0:
            return None
        start = at + len(self._cookie_eq)
        end = header.find(";", start)
        value = (header[start:] if end < 0 else header[start:end]).strip().strip('"')
        if value == self._canary_value:
            return True
        if value == self._stable_value:
            return False
        return None

    def pick(self, environ: dict[str, t.Any]) -> tuple[Snapshot | None, tuple[str, str] | None]:
        """Which side serves this request: the canary's snapshot (None: the live one), and
        the ``Set-Cookie`` header to add to the response (None: the client has it).

        Never raises: it runs under the runtime's lock.
        """
        path = environ.get("PATH_INFO") or "/"
        for mark in self._canary_marks:
            if path.startswith(mark):
                return self.snapshot, None
        for mark in self._stable_marks:
            if path.startswith(mark):
                return None, None
        side = self._from_cookie(environ)
        if side is not None:
            return (self.snapshot if side else None), None
        if bucket(self.token, str(environ.get("REMOTE_ADDR") or "")) < self.threshold:
            return self.snapshot, self._set_canary
        return None, self._set_stable

    def __repr__(self) -> str:
        return f"<CanarySplit {self.name} {self.stable.release_id[:8]}->{self.token[:8]} {self.percent:g}%>"


def pick_side(
    snapshot: Snapshot, release: LoadedRelease, environ: dict[str, t.Any]
) -> tuple[Snapshot, LoadedRelease, tuple[str, str] | None]:
    """The snapshot and release that serve a request of ``release``'s plugin during its canary,
    and the ``Set-Cookie`` header for the response (None: the client has its side already).

    Reads only immutable objects: needs no lock.
    """
    split = snapshot.canaries[release.name]
    side, cookie = split.pick(environ)
    if side is None:
        return snapshot, release, cookie
    return side, split.canary, cookie


class WithCookie:
    """A ``start_response`` that adds the canary cookie to a plugin's response."""

    __slots__ = ("start_response", "header")

    def __init__(self, start_response: t.Callable[..., t.Any], header: tuple[str, str]) -> None:
        self.start_response = start_response
        self.header = header

    def __call__(self, status: str, headers: t.Any, exc_info: t.Any = None) -> t.Any:
        return self.start_response(status, [*headers, self.header], exc_info)
