"""The WSGI side of request pinning.

:class:`PinRequests` wraps the host's ``wsgi_app``. On arrival a request
reads the runtime's live snapshot once and asks :meth:`Runtime.route
<gitplug.runtime.swap.Runtime.route>` (the one place a request picks its
release) which release serves it. A request that can run plugin code (a
plugin request, or any request while a live plugin has app-wide code) is
*pinned*: the snapshot keeps its releases loaded until the request ends.
Plugin requests also count, per release, the requests served and the 5xx
answers, for metrics and automatic rollback. A request under a plugin's
prefix that a host route answers is a host request (host routes win).

Pinning without a lock
----------------------

A pin is one ``append`` to the snapshot's ``pins`` deque, an unpin one
``pop``: each is a single atomic operation, so the common path takes no lock.
What needs care is a swap racing a new request. The swap (under the
runtime's lock) first marks the old snapshot ``superseded``, then closes it
if ``len(pins) == 0``. A request first appends its pin, then reads
``superseded``. Operations of Python threads are serialised by the
interpreter (the GIL), so one of the two orders holds:

* the request read ``superseded`` as False: the swap set it later, so it
  also read ``len(pins)`` later, saw the pin and did not close the snapshot;
* the request read True: it takes the lock (the slow path) and either finds
  the snapshot still open (its pin counts: whoever closes the snapshot later
  sees it) or closed, and then drops that pin and pins the live snapshot,
  under the lock, which no swap can supersede meanwhile.

Unpinning is the mirror image: ``pop``, then, only if the snapshot is
superseded, the lock and a check whether it is now idle.

When a request ends
-------------------

Flask hands the server its response as a :class:`werkzeug.wsgi.ClosingIterator`
over the response's body, closed by the response's ``close``. When that
response is of the host's response class, its body is a list (what Flask
builds from str, bytes and JSON) and it has no ``call_on_close`` callbacks,
no plugin code runs after the application returns: the pin is dropped right
then and the server gets that iterable. Anything else (streamed bodies,
files, close callbacks, responses of other classes, an iterable of another
shape) is wrapped, and the request ends when the server closes the response,
or when the wrapper is collected. The same response gives the status that
counts a plugin request as failed (5xx); so does an exception out of the
application. No Flask method is wrapped for this, so host requests pay for
none of it.
"""

from __future__ import annotations

import threading
import typing as t
from collections.abc import Iterable, Iterator

from flask import Flask
from werkzeug.wsgi import ClosingIterator

from .canary import WithCookie, pick_side
from .environ import ENVIRON_RELEASE, ENVIRON_SNAPSHOT

if t.TYPE_CHECKING:
    from .loaded import LoadedRelease
    from .snapshot import Snapshot

__all__ = ["PinRequests"]

_StartResponse = t.Callable[..., t.Any]


class Runtime(t.Protocol):
    """What pinning needs of :class:`~gitplug.runtime.swap.Runtime` (which wraps the app with it)."""

    app: Flask
    snapshot: Snapshot
    _lock: threading.Lock

    def route(self, snapshot: Snapshot, environ: dict[str, t.Any]) -> LoadedRelease | None: ...

    def _leave_superseded(self, snapshot: Snapshot) -> None: ...

    def _count_error(self, release: LoadedRelease) -> None: ...


class PinRequests:
    """WSGI middleware: pin each request that can run plugin code to the live snapshot."""

    def __init__(self, wsgi_app: t.Callable[..., Iterable[bytes]], runtime: Runtime) -> None:
        self.wsgi_app = wsgi_app
        self.runtime = runtime
        self.app = runtime.app

    def __call__(self, environ: dict[str, t.Any], start_response: _StartResponse) -> Iterable[bytes]:
        # This runs on every request of the host: keep it inline and short.
        runtime = self.runtime
        snapshot = runtime.snapshot
        release = runtime.route(snapshot, environ) if snapshot.releases else None
        if release is None and not snapshot.host_visible:
            # A host request while no plugin has app-wide code: no plugin code
            # can run in it, so it needs no pin, only the snapshot (host
            # templates may build plugin URLs; a release's URL map stays
            # usable after it is unloaded).
            environ[ENVIRON_SNAPSHOT] = snapshot
            return self.wsgi_app(environ, start_response)
        cookie = None
        if release is not None and snapshot.canaries and release.name in snapshot.canaries:
            # A plugin running a canary: the side picked serves the whole
            # request, from a snapshot of its own (README, "Canary releases").
            snapshot, release, cookie = pick_side(snapshot, release, environ)
        snapshot.pins.append(None)
        if snapshot.superseded:
            snapshot, release, cookie = self._pin_slow(snapshot, release, environ, cookie)
        environ[ENVIRON_SNAPSHOT] = snapshot
        if release is not None:
            environ[ENVIRON_RELEASE] = release
            next(release.served)
            if cookie is not None:
                start_response = WithCookie(start_response, cookie)
        try:
            result = self.wsgi_app(environ, start_response)
        except BaseException:
            if release is not None:
                runtime._count_error(release)
            self.leave(snapshot)
            raise
        # The response Flask sends: the ClosingIterator's last callback is its close().
        response = None
        if type(result) is ClosingIterator:
            callbacks = result._callbacks
            if callbacks and len(callbacks) <= 2:
                response = getattr(callbacks[-1], "__self__", None)
        if response is None or type(response) is not self.app.response_class:
            return _Finish(result, self, snapshot)
        # The status as werkzeug's Response keeps it (its status_code property reads this).
        if release is not None and response._status_code >= 500:
            runtime._count_error(release)
        if type(response.response) is not list or response._on_close:
            return _Finish(result, self, snapshot)
        # Plain bytes: nothing of the release runs after this point.
        # (leave(), inline: the common path.)
        snapshot.pins.pop()
        if snapshot.superseded:
            runtime._leave_superseded(snapshot)
        return result

    def _pin_slow(
        self, snapshot: Snapshot, release: LoadedRelease | None, environ: dict[str, t.Any],
        cookie: tuple[str, str] | None,
    ) -> tuple[Snapshot, LoadedRelease | None, tuple[str, str] | None]:
        """The pin landed on a superseded snapshot: keep it if still open, else pin the live one."""
        runtime = self.runtime
        with runtime._lock:
            if not snapshot.closed:
                return snapshot, release, cookie
            snapshot.pins.pop()
            live = runtime.snapshot
            release = runtime.route(live, environ) if live.releases else None
            cookie = None
            snapshot = live
            if release is not None and live.canaries and release.name in live.canaries:
                snapshot, release, cookie = pick_side(live, release, environ)
            # Under the lock: no swap supersedes the live snapshot or its sides meanwhile.
            snapshot.pins.append(None)
        return snapshot, release, cookie

    def leave(self, snapshot: Snapshot) -> None:
        """Unpin one request; a superseded snapshot is closed once idle."""
        snapshot.pins.pop()
        if snapshot.superseded:
            self.runtime._leave_superseded(snapshot)


class _Finish:
    """Wraps a WSGI response that may run plugin code; the request ends when the server closes it.

    Iteration goes straight to the wrapped iterable (no per-chunk cost). A
    server that drops the response without calling ``close()`` still ends
    the request: ``__del__`` ends it (on a thread of its own) when the
    wrapper is collected.
    """

    __slots__ = ("_result", "_pins", "_snapshot", "_done")

    def __init__(self, result: Iterable[bytes], pins: PinRequests, snapshot: Snapshot) -> None:
        self._result = result
        self._pins = pins
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
            self._pins.leave(self._snapshot)

    def __del__(self) -> None:
        if not self._done:
            # The collector runs this wherever it strikes, also on a thread
            # that holds the runtime's (non-reentrant) lock, as in a publish,
            # and unpinning a superseded snapshot takes that lock: end the
            # request from a thread of its own, which waits for it.
            threading.Thread(target=self.close, name="gitplug-leave", daemon=True).start()
