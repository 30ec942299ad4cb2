"""The WSGI side of request pinning.

:class:`PinRequests` wraps the host's ``wsgi_app``: on arrival a request
takes the runtime's live snapshot (one locked counter increment) and keeps
it until the server closes the response, streaming included. Plugin
requests also count their 5xx answers per release, for metrics and
automatic rollback. A request under a plugin's prefix that a host route
answers is a host request (host routes win).
"""

from __future__ import annotations

import typing as t
from collections.abc import Iterable, Iterator

from .environ import ENVIRON_RELEASE, ENVIRON_SNAPSHOT

if t.TYPE_CHECKING:
    import threading

    from .loaded import LoadedRelease
    from .snapshot import Snapshot

__all__ = ["PinRequests"]

_StartResponse = t.Callable[..., t.Any]


class Runtime(t.Protocol):
    """What pinning needs of :class:`~gitplug.runtime.swap.Runtime` (which wraps the app with it)."""

    snapshot: Snapshot
    _lock: threading.Lock
    host_shadowed: frozenset[str]

    def host_claims(self, release: LoadedRelease, environ: dict[str, t.Any]) -> bool: ...

    def _leave(self, snapshot: Snapshot) -> None: ...

    def _count_error(self, release: LoadedRelease) -> None: ...


class PinRequests:
    """WSGI middleware: pin each request to the live snapshot until it ends."""

    def __init__(self, wsgi_app: t.Callable[..., Iterable[bytes]], runtime: Runtime) -> None:
        self.wsgi_app = wsgi_app
        self.runtime = runtime

    def __call__(self, environ: dict[str, t.Any], start_response: _StartResponse) -> Iterable[bytes]:
        runtime = self.runtime
        # This runs on every request of the host: keep it inline and short.
        snapshot = runtime.snapshot
        if not snapshot.host_visible and (
            not snapshot.releases or snapshot.release_for_path(environ.get("PATH_INFO") or "/") is None
        ):
            # A host request while no plugin has app-wide code: no plugin code
            # can run in it, so it needs no in-flight count, only the snapshot
            # (host templates may build plugin URLs; a release's URL map stays
            # usable after it is unloaded).
            environ[ENVIRON_SNAPSHOT] = snapshot
            return self.wsgi_app(environ, start_response)
        with runtime._lock:
            snapshot = runtime.snapshot
            snapshot.inflight += 1
            release = snapshot.release_for_path(environ.get("PATH_INFO") or "/") if snapshot.releases else None
            if release is not None:
                # One set lookup; the host's rules are matched only under a
                # prefix the host has routes under (rare, and then small).
                if release.prefix in runtime.host_shadowed and runtime.host_claims(release, environ):
                    release = None
                else:
                    release.requests += 1
        environ[ENVIRON_SNAPSHOT] = snapshot
        if release is not None:
            environ[ENVIRON_RELEASE] = release
            start_response = _ErrorCounting(start_response, runtime, release)
        try:
            result = self.wsgi_app(environ, start_response)
        except BaseException:
            runtime._leave(snapshot)
            raise
        return _Finish(result, runtime, snapshot)


class _ErrorCounting:
    """A ``start_response`` that counts 5xx answers (and so unhandled errors) per release."""

    __slots__ = ("start_response", "runtime", "release")

    def __init__(self, start_response: _StartResponse, runtime: Runtime, release: LoadedRelease) -> None:
        self.start_response = start_response
        self.runtime = runtime
        self.release = release

    def __call__(self, status: str, headers: t.Any, exc_info: t.Any = None) -> t.Any:
        if status[:1] == "5":
            self.runtime._count_error(self.release)
        return self.start_response(status, headers, exc_info)


class _Finish:
    """Wraps a WSGI response; the request ends when the server closes it.

    Iteration goes straight to the wrapped iterable (no per-chunk cost). A
    server that drops the response without calling ``close()`` (Werkzeug's
    dev server on a client reset) still ends the request: ``__del__`` runs
    when the wrapper is collected.
    """

    __slots__ = ("_result", "_runtime", "_snapshot", "_done")

    def __init__(self, result: Iterable[bytes], runtime: Runtime, snapshot: Snapshot) -> None:
        self._result = result
        self._runtime = runtime
        self._snapshot = snapshot
        self._done = False

    def __iter__(self) -> Iterator[bytes]:
        return iter(self._result)

    def close(self) -> None:
        if self._done:
            return
        self._done = True
        try:
            close = getattr(self._result, "close", None)
            if close is not None:
                close()
        finally:
            self._runtime._leave(self._snapshot)

    def __del__(self) -> None:
        if not self._done:
            self.close()
