"""Request pinning without a lock (README, "Guarantees": a request finishes on its release).

Direct WSGI calls, so each test controls exactly when a response is closed:

* a plain response drops its pin when the application returns, and the
  server gets Flask's own iterable;
* a streamed body, a ``call_on_close`` callback and a static file keep the
  release loaded until the server closes the response;
* a swap landing between a request reading the live snapshot and pinning it
  (forced through :meth:`Runtime.route`, the one place a request picks its
  release): the request moves to the live snapshot if the old one closed, and
  keeps the old one (which then waits for it) if it is still open;
* request and 5xx counts stay exact under threads, once per request.
"""

from __future__ import annotations

import threading
import typing as t
from collections.abc import Callable, Iterable
from pathlib import Path

import pytest
from flask import Flask

from gitplug import GitPlug, signals
from gitplug.runtime.loaded import LoadedRelease
from gitplug.runtime.snapshot import Snapshot
from pluginfactory import write_files
from serverproc import wait_for

PLUGIN = """
    from flask import Response, stream_with_context
    from gitplug import Plugin, current_plugin

    plugin = Plugin("pinny", __name__)
    LABEL = "{label}"

    @plugin.route("/")
    def index():
        return LABEL

    @plugin.route("/stream")
    def stream():
        def chunks():
            for i in range(3):
                # Module globals: purged once the release is unloaded.
                yield f"{{LABEL}}-{{i}};"
        return Response(chunks())

    @plugin.route("/stream-context")
    def stream_context():
        def chunks():
            yield current_plugin.release_id
        return stream_with_context(chunks())

    @plugin.route("/on-close")
    def on_close():
        response = Response(LABEL)
        response.call_on_close(lambda: CLOSED.append(LABEL))
        return response

    @plugin.route("/fail")
    def fail():
        return "failed", 503

    CLOSED = []
"""

FAILING_HOOK = """
    from gitplug import Plugin

    plugin = Plugin("pinny", __name__)

    @plugin.route("/")
    def index():
        return "{label}"

    @plugin.after_request
    def broken(response):
        raise RuntimeError("after_request of the plugin failed")
"""


def _plugin(root: Path, label: str, source: str = PLUGIN) -> Path:
    return write_files(root, {"pinny/__init__.py": source.format(label=label), "pinny/static/s.txt": label * 1000})


def _environ(path: str) -> dict[str, t.Any]:
    from werkzeug.test import EnvironBuilder

    return EnvironBuilder(path=path).get_environ()


def _call(app: Flask, path: str) -> tuple[str, Iterable[bytes]]:
    """Call the app as a server does, without consuming or closing the body."""
    box: dict[str, str] = {}

    def start_response(status: str, headers: t.Any, exc_info: t.Any = None) -> Callable[[bytes], None]:
        box["status"] = status
        return lambda data: None

    result = app.wsgi_app(_environ(path), start_response)
    return box["status"], result


def _finish(result: Iterable[bytes]) -> bytes:
    try:
        return b"".join(result)
    finally:
        close = getattr(result, "close", None)
        if close is not None:
            close()


@pytest.fixture
def app() -> Flask:
    app = Flask("pin_host")
    app.config["SECRET_KEY"] = "test"
    return app


@pytest.fixture
def unloads() -> t.Iterator[list[str]]:
    """Release ids in the order they were unloaded."""
    seen: list[str] = []

    def on_unloaded(sender: object, **kw: t.Any) -> None:
        seen.append(kw["release"])

    signals.plugin_unloaded.connect(on_unloaded)
    yield seen
    signals.plugin_unloaded.disconnect(on_unloaded)


def _unloaded_soon(gp: GitPlug, release: LoadedRelease) -> bool:
    assert gp.runtime.wait_idle()
    return release.unloaded


def test_plain_response_unpins_when_the_app_returns(
    tmp_path: Path, app: Flask, make_gp: Callable[[Flask], GitPlug]
) -> None:
    gp = make_gp(app)
    gp.load_directory("pinny", _plugin(tmp_path / "a", "A"))
    status, result = _call(app, "/pinny/")
    assert status.startswith("200")
    # Nothing of the release runs while the server sends a list of bytes: no pin, no wrapper.
    assert gp.runtime.snapshot.inflight == 0
    assert type(result).__module__.startswith("werkzeug"), type(result)
    assert _finish(result) == b"A"
    assert gp.live_release("pinny").requests == 1  # type: ignore[union-attr]


@pytest.mark.parametrize("path", ["/pinny/stream", "/pinny/stream-context", "/pinny/on-close", "/pinny/static/s.txt"])
def test_a_response_that_runs_release_code_keeps_its_release_until_closed(
    tmp_path: Path, app: Flask, make_gp: Callable[[Flask], GitPlug], unloads: list[str], path: str
) -> None:
    gp = make_gp(app)
    old = gp.load_directory("pinny", _plugin(tmp_path / "a", "A"))
    status, result = _call(app, path)
    assert status.startswith("200")
    assert gp.runtime.snapshot.inflight == 1
    new = gp.load_directory("pinny", _plugin(tmp_path / "b", "B"))
    assert gp.runtime.live("pinny") is new
    assert not _unloaded_soon(gp, old), "the old release was unloaded while its response was open"
    body = _finish(result)
    expected = {
        "/pinny/stream": b"A-0;A-1;A-2;",
        "/pinny/stream-context": old.release_id.encode(),
        "/pinny/on-close": b"A",
        "/pinny/static/s.txt": b"A" * 1000,
    }[path]
    assert body == expected
    assert _unloaded_soon(gp, old), "the old release was not unloaded once its last response closed"
    assert unloads == [old.release_id]
    assert gp.runtime.snapshot.inflight == 0


def test_on_close_callback_runs_before_the_unload(
    tmp_path: Path, app: Flask, make_gp: Callable[[Flask], GitPlug]
) -> None:
    gp = make_gp(app)
    old = gp.load_directory("pinny", _plugin(tmp_path / "a", "A"))
    closed = old.view_functions["pinny.on_close"].__globals__["CLOSED"]
    _, result = _call(app, "/pinny/on-close")
    gp.load_directory("pinny", _plugin(tmp_path / "b", "B"))
    _finish(result)
    assert closed == ["A"]


def _swap_during_route(gp: GitPlug, swap: Callable[[], None]) -> list[Snapshot]:
    """Run ``swap`` once, inside the next request, after it read the live snapshot and before it pins.

    Returns the snapshots ``route`` was asked about, in order.
    """
    runtime = gp.runtime
    original = runtime.route
    asked: list[Snapshot] = []

    def route(snapshot: Snapshot, environ: dict[str, t.Any]) -> LoadedRelease | None:
        asked.append(snapshot)
        if len(asked) == 1:
            swap()
        return original(snapshot, environ)

    runtime.route = route  # type: ignore[method-assign]
    return asked


def test_a_pin_on_a_snapshot_closed_meanwhile_moves_to_the_live_one(
    tmp_path: Path, app: Flask, make_gp: Callable[[Flask], GitPlug], unloads: list[str]
) -> None:
    gp = make_gp(app)
    old = gp.load_directory("pinny", _plugin(tmp_path / "a", "A"))
    first = gp.runtime.snapshot
    new_dir = _plugin(tmp_path / "b", "B")
    asked = _swap_during_route(gp, lambda: gp.load_directory("pinny", new_dir))
    status, result = _call(app, "/pinny/stream")
    # The swap closed the old snapshot (no request was pinned to it yet): the
    # request saw that, left it, and pinned and routed on the live one.
    assert first.closed and asked[0] is first and asked[1] is gp.runtime.snapshot
    assert status.startswith("200") and _finish(result) == b"B-0;B-1;B-2;"
    assert _unloaded_soon(gp, old) and unloads == [old.release_id]
    assert first.inflight == 0 and gp.runtime.snapshot.inflight == 0


def test_a_pin_on_a_superseded_open_snapshot_holds_it(
    tmp_path: Path, app: Flask, make_gp: Callable[[Flask], GitPlug], unloads: list[str]
) -> None:
    gp = make_gp(app)
    old = gp.load_directory("pinny", _plugin(tmp_path / "a", "A"))
    first = gp.runtime.snapshot
    _, open_response = _call(app, "/pinny/stream")  # keeps the first snapshot open
    new_dir = _plugin(tmp_path / "b", "B")
    asked = _swap_during_route(gp, lambda: gp.load_directory("pinny", new_dir))
    status, result = _call(app, "/pinny/stream")
    assert first.superseded and not first.closed and asked == [first]
    assert first.inflight == 2
    _finish(open_response)
    assert not _unloaded_soon(gp, old), "unloaded while the second request still held it"
    assert _finish(result) == b"A-0;A-1;A-2;"
    assert _unloaded_soon(gp, old) and unloads == [old.release_id]


def test_requests_and_failures_are_counted_exactly_under_threads(
    tmp_path: Path, app: Flask, make_gp: Callable[[Flask], GitPlug]
) -> None:
    gp = make_gp(app)
    release = gp.load_directory("pinny", _plugin(tmp_path / "a", "A"))
    threads, per_thread = 8, 150
    failures: list[str] = []

    def client() -> None:
        for i in range(per_thread):
            path = "/pinny/fail" if i % 3 == 0 else "/pinny/"
            status, result = _call(app, path)
            _finish(result)
            if not status.startswith(("200", "503")):
                failures.append(status)

    workers = [threading.Thread(target=client) for _ in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=60)
    assert not failures
    assert release.requests == threads * per_thread
    assert release.requests == threads * per_thread  # reading does not count
    assert release.errors == threads * len(range(0, per_thread, 3))
    assert gp.runtime.snapshot.inflight == 0


def test_a_failing_after_request_hook_counts_one_error_per_request(
    tmp_path: Path, app: Flask, make_gp: Callable[[Flask], GitPlug]
) -> None:
    gp = make_gp(app)
    release = gp.load_directory("pinny", _plugin(tmp_path / "a", "A", FAILING_HOOK))
    for _ in range(3):
        status, result = _call(app, "/pinny/")
        _finish(result)
        # The hook fails on the view's response and again on Flask's 500 page.
        assert status.startswith("500")
    assert (release.requests, release.errors) == (3, 3)
    assert gp.runtime.snapshot.inflight == 0


def test_pins_under_threads_while_swapping_leave_nothing_held(
    tmp_path: Path, app: Flask, make_gp: Callable[[Flask], GitPlug], unloads: list[str]
) -> None:
    """Lock-free pins racing 40 swaps: no request sees an unloaded release, none stays pinned."""
    gp = make_gp(app)
    dirs = [_plugin(tmp_path / f"r{i}", f"R{i}") for i in range(41)]
    first = gp.load_directory("pinny", dirs[0])
    stop = threading.Event()
    problems: list[str] = []
    served: list[bytes] = []

    def client(path: str) -> None:
        while not stop.is_set():
            try:
                status, result = _call(app, path)
                body = _finish(result)
            except Exception as exc:  # noqa: BLE001 - recorded and asserted below
                problems.append(f"{path}: {type(exc).__name__}: {exc}")
                return
            if not status.startswith("200"):
                problems.append(f"{path}: {status}")
                return
            served.append(body)

    clients = [threading.Thread(target=client, args=(path,)) for path in ["/pinny/", "/pinny/stream"] * 3]
    for thread in clients:
        thread.start()
    try:
        released = [first]
        for path in dirs[1:]:
            before = len(served)
            released.append(gp.load_directory("pinny", path))
            # Requests reach each release before the next swap.
            wait_for(lambda n=before + 5: problems or len(served) >= n, timeout=30, what="requests after a swap")
    finally:
        stop.set()
        for thread in clients:
            thread.join(timeout=30)
    assert not problems, problems[:3]
    assert gp.runtime.wait_idle()
    # Every release but the live one was unloaded, exactly once, and nothing is pinned.
    assert sorted(unloads) == sorted(r.release_id for r in released[:-1])
    assert all(r.unloaded for r in released[:-1]) and not released[-1].unloaded
    assert gp.runtime.snapshot.inflight == 0
    labels = {body.split(b"-")[0] for body in served if b"-" in body}
    assert len(labels) > 5, f"the streaming clients saw too few releases: {sorted(labels)}"
