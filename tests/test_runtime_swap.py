"""The promises of SPEC 4.1, 4.2 and 4.4 under real concurrency.

A real multi-threaded WSGI server on 127.0.0.1, client threads hammering a
plugin of many modules while the main thread swaps releases, one in five
broken: every response must come from exactly one complete, good release.
"""

from __future__ import annotations

import http.client
import itertools
import sys
import threading
import time
import typing as t
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from flask import Flask

from conftest import serve_wsgi
from gitplug import GitPlug, PluginImportError, PluginLoadError
from pluginfactory import BROKEN_KINDS, HOLD_SOURCE, Hold, parse_stamps, stamped_plugin, write_files


def _get(base: str, path: str, timeout: float = 10.0) -> tuple[int, str]:
    parts = urlsplit(base)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read().decode()
    finally:
        conn.close()


def _assert_one_release(body: str, good: set[str]) -> str:
    stamps = parse_stamps(body)
    labels = set(stamps["modules"].split(",")) | {stamps["template"]}
    assert len(labels) == 1, f"response mixes releases: {body}"
    (label,) = labels
    assert label in good, f"response from a release that must never be live: {body}"
    static_release = stamps["static"].split("/")[3]
    assert stamps["release"].startswith(static_release), body
    return label


def test_hammer_while_swapping_100_times_one_in_five_broken(
    tmp_path: Path, host_app: Flask, make_gp: t.Callable[[Flask], GitPlug]
) -> None:
    gp = make_gp(host_app)
    # Prepare releases up front: 100 swaps, every fifth broken in turn.
    plans = []
    broken_kinds = itertools.cycle(BROKEN_KINDS)
    for i in range(100):
        broken = next(broken_kinds) if i % 5 == 4 else None
        label = f"R{i}" if broken is None else f"BROKEN{i}"
        plans.append((stamped_plugin(tmp_path / f"r{i}", label, broken=broken), label, broken))
    good = {"R0"}
    gp.load_directory("stampy", plans[0][0])

    stop = threading.Event()
    results: list[tuple[int, str]] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    with serve_wsgi(host_app) as base:

        def client() -> None:
            while not stop.is_set():
                try:
                    status, body = _get(base, "/stampy/")
                except BaseException as exc:  # noqa: BLE001 - recorded and asserted below
                    with lock:
                        errors.append(exc)
                    return
                with lock:
                    results.append((status, body))

        threads = [threading.Thread(target=client) for _ in range(8)]
        for thread in threads:
            thread.start()
        failures = 0
        deadline = time.monotonic() + 120
        for path, label, broken in plans[1:]:
            if time.monotonic() > deadline:
                break
            try:
                gp.load_directory("stampy", path)
            except PluginLoadError:
                assert broken is not None, f"good release {label} failed to load"
                failures += 1
            else:
                assert broken is None, f"broken release {label} ({broken}) went live"
                good.add(label)
            time.sleep(0.01)
        stop.set()
        for thread in threads:
            thread.join(timeout=30)

    assert not errors, errors[:3]
    assert failures == sum(1 for _, _, broken in plans if broken)
    assert len(results) > 200, len(results)
    bad_status = [r for r in results if r[0] != 200]
    assert not bad_status, bad_status[:3]
    seen = {_assert_one_release(body, good) for _, body in results}
    assert len(seen) > 10, f"swaps were not observed by clients: {sorted(seen)}"
    # The last good release is what is served now.
    last_good = [label for _, label, broken in plans if broken is None][-1]
    with host_app.test_client() as c:
        assert parse_stamps(c.get("/stampy/", buffered=True).get_data(as_text=True))["template"] == last_good


def test_request_in_flight_finishes_on_its_release(
    tmp_path: Path, host_app: Flask, make_gp: t.Callable[[Flask], GitPlug]
) -> None:
    gp = make_gp(host_app)
    gp.load_directory("stampy", stamped_plugin(tmp_path / "a", "OLD"))
    unloaded = threading.Event()
    from gitplug import signals

    def on_unloaded(sender: object, **kw: object) -> None:
        unloaded.set()

    signals.plugin_unloaded.connect(on_unloaded)
    try:
        with serve_wsgi(host_app) as base:
            box: dict[str, tuple[int, str]] = {}
            held = Hold(tmp_path, "slow")
            slow = threading.Thread(target=lambda: box.setdefault("r", _get(base, f"/stampy/?hold={held.arg}")))
            slow.start()
            held.wait_inside()  # the slow request is inside OLD's view
            try:
                gp.load_directory("stampy", stamped_plugin(tmp_path / "b", "NEW"))
                status, body = _get(base, "/stampy/")
                assert parse_stamps(body)["template"] == "NEW"
                assert gp.runtime.wait_idle()  # anything the swap could unload now, it has
                assert not unloaded.is_set(), "old release unloaded while a request was in flight"
            finally:
                held.release()
            slow.join(timeout=30)
        status, body = box["r"]
        assert status == 200
        assert _assert_one_release(body, {"OLD"}) == "OLD"
        assert unloaded.wait(5), "old release was never unloaded after its last request"
    finally:
        signals.plugin_unloaded.disconnect(on_unloaded)


@pytest.mark.parametrize("kind", BROKEN_KINDS)
def test_broken_release_leaves_old_one_and_nothing_behind(
    tmp_path: Path, host_app: Flask, make_gp: t.Callable[[Flask], GitPlug], kind: str
) -> None:
    gp = make_gp(host_app)
    gp.load_directory("stampy", stamped_plugin(tmp_path / "good", "GOOD"))
    before = set(sys.modules)
    with pytest.raises(PluginLoadError) as info:
        gp.load_directory("stampy", stamped_plugin(tmp_path / "bad", "BAD", broken=kind))
    error = info.value
    assert error.plugin == "stampy"
    assert "stampy" in str(error) and "live release is unchanged" in str(error)
    if kind != "health":
        assert error.file and error.file.startswith("stampy/"), str(error)
        assert error.line, str(error)
        assert f"{error.file} line {error.line}" in str(error)
    if kind == "lazy_syntax":
        assert isinstance(error, PluginImportError)
        assert error.file == "stampy/lazy.py" and error.line == 2
    assert set(sys.modules) - before == set(), "a failed load left modules behind"
    with host_app.test_client() as c:
        body = c.get("/stampy/", buffered=True).get_data(as_text=True)
    assert _assert_one_release(body, {"GOOD"}) == "GOOD"


def test_static_file_bodies_match_their_page_under_a_hammer_of_swaps(
    tmp_path: Path, host_app: Flask, make_gp: t.Callable[[Flask], GitPlug]
) -> None:
    """A page's versioned static URL serves that release's file, never another's."""
    gp = make_gp(host_app)
    releases = [stamped_plugin(tmp_path / f"s{i}", f"S{i}") for i in range(30)]
    gp.load_directory("stampy", releases[0])
    stop = threading.Event()
    pairs: list[tuple[str, str, int, str]] = []
    errors: list[BaseException] = []
    lock = threading.Lock()
    with serve_wsgi(host_app) as base:

        def client() -> None:
            while not stop.is_set():
                try:
                    status, page = _get(base, "/stampy/")
                    assert status == 200, page
                    stamps = parse_stamps(page)
                    s_status, s_body = _get(base, stamps["static"])
                except BaseException as exc:  # noqa: BLE001 - recorded and asserted below
                    with lock:
                        errors.append(exc)
                    return
                with lock:
                    pairs.append((stamps["template"], stamps["static"], s_status, s_body))

        threads = [threading.Thread(target=client) for _ in range(6)]
        for thread in threads:
            thread.start()
        try:
            for path in releases[1:]:
                gp.load_directory("stampy", path)
                time.sleep(0.005)  # let the clients see each release
        finally:
            stop.set()
            for thread in threads:
                thread.join(timeout=30)
    assert not errors, errors[:3]
    served = [(label, body) for label, _, status, body in pairs if status == 200]
    wrong = [(label, body) for label, body in served if body != label]
    assert not wrong, f"{len(wrong)} static files differ from their page's release: {wrong[:5]}"
    # A retired release's versioned URL may 404 once it is unloaded, never serve another file.
    assert {status for _, _, status, _ in pairs} <= {200, 404}
    assert len({label for label, _ in served}) > 5, "the swaps were not observed"


def test_a_release_cannot_import_a_module_only_the_other_release_has(
    tmp_path: Path, host_app: Flask, make_gp: t.Callable[[Flask], GitPlug]
) -> None:
    """Two releases of one package loaded side by side: neither sees the other's modules."""
    gp = make_gp(host_app)
    probe = """
        from flask import request
        from gitplug import Plugin
        from iso.holding import hold

        plugin = Plugin("iso", __name__)

        @plugin.route("/probe/<name>")
        def probe(name):
            hold(request.args.get("hold"))
            try:
                module = __import__(f"iso.{name}", fromlist=["X"])
            except ImportError:
                return "isolated"
            return f"imported {module.X}"
    """
    v1 = write_files(tmp_path / "v1", {
        "iso/__init__.py": probe, "iso/holding.py": HOLD_SOURCE, "iso/only_v1.py": 'X = "v1"\n'})
    v2 = write_files(tmp_path / "v2", {
        "iso/__init__.py": probe, "iso/holding.py": HOLD_SOURCE, "iso/only_v2.py": 'X = "v2"\n'})
    first = gp.load_directory("iso", v1)
    with serve_wsgi(host_app) as base:
        assert _get(base, "/iso/probe/only_v1") == (200, "imported v1")
        held = Hold(tmp_path, "iso")
        box: dict[str, tuple[int, str]] = {}
        in_v1 = threading.Thread(target=lambda: box.setdefault("v1", _get(base, f"/iso/probe/only_v2?hold={held.arg}")))
        in_v1.start()
        try:
            held.wait_inside()  # v1 stays loaded: a request of its own is in flight
            gp.load_directory("iso", v2)
            assert not first.unloaded
            assert _get(base, "/iso/probe/only_v2") == (200, "imported v2")
            assert _get(base, "/iso/probe/only_v1") == (200, "isolated")  # v1 is loaded, but not v2's
        finally:
            held.release()
        in_v1.join(timeout=30)
    assert box["v1"] == (200, "isolated"), box  # nor does v1 see v2's module
    assert gp.runtime.wait_idle()
