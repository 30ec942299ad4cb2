"""Plugin hooks, life-cycle callbacks, ``current_plugin`` and signals (SPEC 2, 4.1, 4.5).

App-wide registrations of a plugin apply to the whole host while its release
is live and vanish when it stops; blueprint-scoped ones never touch host
requests; ``on_unload`` runs once, after the last in-flight request of the
release, which is checked against a real threaded server.
"""

from __future__ import annotations

import http.client
import threading
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from flask import Flask, abort, render_template_string

from conftest import serve_wsgi
from gitplug import GitPlug, HealthCheckFailed, OnLoadFailed, PluginImportError, current_plugin, signals
from pluginfactory import HOLD_SOURCE, Hold, write_files

HOOKY = '''
from flask import current_app, g, render_template, request, stream_with_context
import time
from gitplug import Plugin, current_plugin
from hooky.holding import hold

plugin = Plugin("hooky", __name__)
LABEL = "{label}"


def record(*event):
    current_app.config["EVENTS"].append(event)


@plugin.route("/")
def index():
    record("view", current_plugin.name, current_plugin.release_id)
    return "|".join([
        "view", current_plugin.name, current_plugin.release_id, current_plugin.url_prefix,
        str(current_plugin.commit), current_plugin.config.get("COLOR", "-"),
        current_plugin.logger.name, str(current_plugin.path.is_dir()),
        "scoped=" + str(g.get("scoped")), "app_hook=" + str(g.get("app_hook")),
    ])


@plugin.route("/slow")
def slow():
    hold(request.args.get("hold"))
    record("view-end", current_plugin.release_id, time.monotonic())
    return LABEL


@plugin.route("/stream")
def stream():
    release = current_plugin.release_id

    held = request.args.get("hold")

    def chunks():
        try:
            for i in range(5):
                if i == 1:
                    hold(held)  # the response has started streaming
                yield f"{{LABEL}}-{{i}};"
        finally:
            record("stream-end", release, time.monotonic())

    return stream_with_context(chunks())


@plugin.before_request
def scoped_before():
    g.scoped = current_plugin.name
    record("scoped-before", request.path)


@plugin.before_app_request
def app_before():
    g.app_hook = current_plugin.name
    record("app-before", current_plugin.name, request.path)


@plugin.app_context_processor
def app_cp():
    return {{"plugin_cp": "cp-" + current_plugin.name + "-" + LABEL}}


@plugin.app_template_filter("shout")
def shout(value):
    return str(value).upper() + "!"


@plugin.app_errorhandler(418)
def teapot(error):
    record("app-errorhandler", current_plugin.name)
    return "plugin teapot " + LABEL, 418


@plugin.on_load
def loaded():
    record("on_load", current_plugin.name, current_plugin.release_id)


@plugin.health_check
def healthy():
    record("health_check", current_plugin.name, current_plugin.release_id)
    return True


@plugin.on_unload
def unloaded():
    record("on_unload", current_plugin.name, current_plugin.release_id, time.monotonic())
'''

HOST_PAGE = (
    "{{ plugin_cp|default('no-cp') }} "
    "{% if 'shout' is filter %}{{ 'hi'|shout }}{% else %}no-shout{% endif %} "
    "{{ g.app_hook|default('no-hook') }} {{ g.scoped|default('no-scoped') }}"
)


def _hooky(root: Path, label: str, **extra: str) -> Path:
    return write_files(
        root, {"hooky/__init__.py": HOOKY.format(label=label), "hooky/holding.py": HOLD_SOURCE, **extra}
    )


def _host() -> Flask:
    app = Flask("hooks_host")
    app.config.update(SECRET_KEY="s", EVENTS=[])

    @app.route("/")
    def home() -> str:
        return render_template_string(HOST_PAGE)

    @app.route("/tea")
    def tea() -> str:
        abort(418)

    return app


def _get(base: str, path: str) -> tuple[int, str]:
    parts = urlsplit(base)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=15)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read().decode()
    finally:
        conn.close()



def _events(app: Flask, kind: str) -> list[tuple[object, ...]]:
    return [e for e in list(app.config["EVENTS"]) if e[0] == kind]


def test_stop_removes_urls_and_every_hook_and_start_brings_them_back(
    tmp_path: Path, make_gp: Callable[[Flask], GitPlug]
) -> None:
    app = _host()
    gp = make_gp(app)
    gp.load_directory("hooky", _hooky(tmp_path / "p", "L1"))
    client = app.test_client()

    def get(path: str) -> tuple[int, str]:
        response = client.get(path, buffered=True)
        return response.status_code, response.get_data(as_text=True)

    live_home = (200, "cp-hooky-L1 HI! hooky no-scoped")
    assert get("/") == live_home
    assert get("/tea") == (418, "plugin teapot L1")
    status, body = get("/hooky/")
    assert status == 200 and "scoped=hooky" in body and "app_hook=hooky" in body
    # The blueprint-scoped before_request ran for the plugin request only.
    assert [e[1] for e in _events(app, "scoped-before")] == ["/hooky/"]

    assert gp.stop("hooky") is True
    assert gp.runtime.wait_idle()
    assert get("/hooky/")[0] == 404
    assert get("/") == (200, "no-cp no-shout no-hook no-scoped")
    status, body = get("/tea")
    assert status == 418 and "plugin teapot" not in body
    app.config["EVENTS"].clear()
    get("/")
    assert _events(app, "app-before") == [], "a stopped plugin's before_app_request still runs"
    assert gp.stop("hooky") is False

    assert gp.start("hooky") is True
    assert get("/") == live_home
    assert get("/tea") == (418, "plugin teapot L1")
    assert get("/hooky/")[0] == 200
    assert [e[1] for e in _events(app, "scoped-before")] == ["/hooky/"]


def test_current_plugin_in_views_callbacks_and_app_wide_hooks(
    tmp_path: Path, make_gp: Callable[[Flask], GitPlug]
) -> None:
    app = _host()
    gp = make_gp(app)
    v1 = gp.load_directory("hooky", _hooky(tmp_path / "v1", "L1"), url_prefix="/hk", config={"COLOR": "red"})
    rid = v1.release_id
    assert _events(app, "on_load") == [("on_load", "hooky", rid)]
    assert _events(app, "health_check") == [("health_check", "hooky", rid)]
    client = app.test_client()
    body = client.get("/hk/", buffered=True).get_data(as_text=True)
    assert body.split("|") == [
        "view", "hooky", rid, "/hk", "None", "red", "gitplug.plugin.hooky", "True",
        "scoped=hooky", "app_hook=hooky",
    ]
    # An app-wide hook sees its own plugin even during a host request.
    app.config["EVENTS"].clear()
    client.get("/tea", buffered=True)
    assert _events(app, "app-before") == [("app-before", "hooky", "/tea")]
    assert _events(app, "app-errorhandler") == [("app-errorhandler", "hooky")]
    # Outside any plugin code it is an error that says where it works.
    with app.test_request_context("/"):
        with pytest.raises(RuntimeError, match="only available while gitplug runs plugin code"):
            current_plugin.name  # noqa: B018 - the attribute access is what raises
    v2 = gp.load_directory("hooky", _hooky(tmp_path / "v2", "L2"), url_prefix="/hk")
    assert gp.runtime.wait_idle()
    assert [e[:3] for e in _events(app, "on_unload")] == [("on_unload", "hooky", rid)]
    assert _events(app, "on_load")[-1] == ("on_load", "hooky", v2.release_id)


def test_app_wide_hook_of_one_plugin_runs_as_that_plugin_in_another_plugins_request(
    tmp_path: Path, make_gp: Callable[[Flask], GitPlug]
) -> None:
    app = _host()
    gp = make_gp(app)
    gp.load_directory("hooky", _hooky(tmp_path / "h", "L1"))
    write_files(
        tmp_path / "o",
        {
            "other/__init__.py": """
                from flask import g
                from gitplug import Plugin, current_plugin

                plugin = Plugin("other", __name__)

                @plugin.route("/")
                def index():
                    return f"{current_plugin.name} app_hook={g.get('app_hook')} scoped={g.get('scoped')}"
            """
        },
    )
    gp.load_directory("other", tmp_path / "o")
    body = app.test_client().get("/other/", buffered=True).get_data(as_text=True)
    assert body == "other app_hook=hooky scoped=None"
    assert _events(app, "app-before")[-1] == ("app-before", "hooky", "/other/")
    assert not _events(app, "scoped-before")


def test_app_wide_hooks_render_their_own_plugins_templates_on_host_requests(
    tmp_path: Path, make_gp: Callable[[Flask], GitPlug]
) -> None:
    app = _host()
    gp = make_gp(app)
    write_files(
        tmp_path / "m",
        {
            "maint/__init__.py": """
                from flask import render_template, request
                from gitplug import Plugin

                plugin = Plugin("maint", __name__)

                @plugin.before_app_request
                def banner():
                    if request.path == "/down":
                        return render_template("maint_down.html"), 503

                @plugin.app_errorhandler(418)
                def teapot(error):
                    return render_template("maint_teapot.html"), 418
            """,
            "maint/templates/maint_down.html": "maintenance page\n",
            "maint/templates/maint_teapot.html": "plugin teapot page\n",
        },
    )
    gp.load_directory("maint", tmp_path / "m")
    app.config["PROPAGATE_EXCEPTIONS"] = False
    client = app.test_client()
    tea = client.get("/tea", buffered=True)
    down = client.get("/down", buffered=True)
    assert (tea.status_code, tea.get_data(as_text=True)) == (418, "plugin teapot page")
    assert (down.status_code, down.get_data(as_text=True)) == (503, "maintenance page")


def test_app_template_filter_and_global_see_current_plugin_in_host_templates(
    tmp_path: Path, make_gp: Callable[[Flask], GitPlug]
) -> None:
    app = _host()
    gp = make_gp(app)
    write_files(
        tmp_path / "p",
        {
            "money/__init__.py": """
                from gitplug import Plugin, current_plugin

                plugin = Plugin("money", __name__)

                @plugin.app_template_filter("price")
                def price(value):
                    return f"{value} {current_plugin.config['CURRENCY']}"

                @plugin.app_template_global("shop_name")
                def shop_name():
                    return current_plugin.name
            """
        },
    )
    gp.load_directory("money", tmp_path / "p", config={"CURRENCY": "EUR"})
    with app.test_request_context("/"):
        assert render_template_string("{{ 3|price }} at {{ shop_name() }}") == "3 EUR at money"


def test_on_unload_runs_once_after_the_last_in_flight_request(
    tmp_path: Path, make_gp: Callable[[Flask], GitPlug]
) -> None:
    app = _host()
    gp = make_gp(app)
    v1 = gp.load_directory("hooky", _hooky(tmp_path / "v1", "L1"))
    results: dict[str, tuple[int, str]] = {}
    with serve_wsgi(app) as base:
        held_view, held_stream = Hold(tmp_path, "view"), Hold(tmp_path, "stream")
        slow = threading.Thread(
            target=lambda: results.setdefault("slow", _get(base, f"/hooky/slow?hold={held_view.arg}"))
        )
        streaming = threading.Thread(
            target=lambda: results.setdefault("stream", _get(base, f"/hooky/stream?hold={held_stream.arg}"))
        )
        slow.start()
        streaming.start()
        try:
            held_view.wait_inside()  # one request inside v1's view,
            held_stream.wait_inside()  # the other streaming v1's response
            v2 = gp.load_directory("hooky", _hooky(tmp_path / "v2", "L2"))
            v3 = gp.load_directory("hooky", _hooky(tmp_path / "v3", "L3"))
            assert _get(base, "/hooky/slow") == (200, "L3")
            # v2 never had a request: it is unloaded at once, while v1 still serves.
            assert gp.runtime.wait_idle()
            deadline = time.monotonic() + 5
            while not v2.unloaded and time.monotonic() < deadline:
                time.sleep(0.01)
            assert v2.unloaded
            assert not v1.unloaded, "v1 unloaded while its requests were in flight"
            assert not [e for e in _events(app, "on_unload") if e[2] == v1.release_id]
        finally:
            held_view.release()
            held_stream.release()
        slow.join(timeout=30)
        streaming.join(timeout=30)
        assert gp.runtime.wait_idle()
        deadline = time.monotonic() + 5
        while not v1.unloaded and time.monotonic() < deadline:
            time.sleep(0.01)
    assert results["slow"] == (200, "L1")
    assert results["stream"] == (200, "".join(f"L1-{i};" for i in range(5)))
    unloads = _events(app, "on_unload")
    assert [e[2] for e in unloads] == [v2.release_id, v1.release_id]
    v1_unload_at = unloads[1][3]
    ends = [e for e in _events(app, "view-end") + _events(app, "stream-end") if e[1] == v1.release_id]
    assert len(ends) == 2
    assert all(v1_unload_at > e[2] for e in ends), "on_unload ran before the last request ended"
    # Nothing else runs it a second time.
    gp.stop("hooky")
    assert gp.runtime.wait_idle()
    assert [e[2] for e in _events(app, "on_unload")] == [v2.release_id, v1.release_id, v3.release_id]


def test_signals_loaded_unloaded_and_load_failed(tmp_path: Path, make_gp: Callable[[Flask], GitPlug]) -> None:
    app = _host()
    gp = make_gp(app)
    got: list[tuple[str, object, dict[str, object]]] = []

    def receiver(name: str) -> Callable[..., None]:
        def receive(sender: object, **kwargs: object) -> None:
            got.append((name, sender, kwargs))

        return receive

    receivers = {
        signals.plugin_loaded: receiver("loaded"),
        signals.plugin_unloaded: receiver("unloaded"),
        signals.plugin_load_failed: receiver("failed"),
    }
    for signal, func in receivers.items():
        signal.connect(func, sender=app)
    try:
        v1 = gp.load_directory("hooky", _hooky(tmp_path / "v1", "L1"))
        assert got == [("loaded", app, {"plugin": "hooky", "release": v1.release_id, "commit": None})]
        v2 = gp.load_directory("hooky", _hooky(tmp_path / "v2", "L2"))
        assert gp.runtime.wait_idle()
        assert got[1:] == [
            ("loaded", app, {"plugin": "hooky", "release": v2.release_id, "commit": None}),
            ("unloaded", app, {"plugin": "hooky", "release": v1.release_id, "commit": None}),
        ]
        del got[:]
        with pytest.raises(PluginImportError, match=r"syntax error in hooky/extra.py line 1"):
            gp.load_directory("hooky", _hooky(tmp_path / "bad", "BAD", **{"hooky/extra.py": "def (:\n"}))
        failing_on_load = _hooky(tmp_path / "onload", "OL")
        with open(failing_on_load / "hooky/__init__.py", "a") as f:
            f.write("\n@plugin.on_load\ndef boom():\n    raise ValueError('no database')\n")
        with pytest.raises(OnLoadFailed, match="no database"):
            gp.load_directory("hooky", failing_on_load)
        assert gp.runtime.wait_idle()
        assert [(n, s) for n, s, _ in got] == [("failed", app), ("failed", app)]
        for _, _, kwargs in got:
            assert set(kwargs) == {"plugin", "release", "error"}
            assert kwargs["plugin"] == "hooky"
            assert str(kwargs["release"]).startswith("dir-")
        assert isinstance(got[0][2]["error"], PluginImportError)
        assert isinstance(got[1][2]["error"], OnLoadFailed)
        # A release that failed on_load never ran on_unload; the live one is untouched.
        assert gp.live_release("hooky") is v2
        assert [e[2] for e in _events(app, "on_unload")] == [v1.release_id]
        del got[:]
        gp.stop("hooky")
        assert gp.runtime.wait_idle()
        assert got == [("unloaded", app, {"plugin": "hooky", "release": v2.release_id, "commit": None})]
    finally:
        for signal, func in receivers.items():
            signal.disconnect(func, sender=app)


def test_failed_health_check_runs_on_unload_but_signals_only_load_failed(
    tmp_path: Path, make_gp: Callable[[Flask], GitPlug]
) -> None:
    app = _host()
    gp = make_gp(app)
    live = gp.load_directory("hooky", _hooky(tmp_path / "v1", "L1"))
    sick = _hooky(tmp_path / "sick", "SICK")
    with open(sick / "hooky/__init__.py", "a") as f:
        f.write("\n@plugin.health_check\ndef sick():\n    return False\n")
    got: list[tuple[str, object]] = []

    def on_signal(name: str) -> Callable[..., None]:
        return lambda sender, **kwargs: got.append((name, kwargs["release"]))

    receivers = {
        signals.plugin_loaded: on_signal("loaded"),
        signals.plugin_unloaded: on_signal("unloaded"),
        signals.plugin_load_failed: on_signal("failed"),
    }
    for signal, func in receivers.items():
        signal.connect(func, sender=app)
    try:
        with pytest.raises(HealthCheckFailed, match=r"health check sick returned False"):
            gp.load_directory("hooky", sick)
        assert gp.runtime.wait_idle()
    finally:
        for signal, func in receivers.items():
            signal.disconnect(func, sender=app)
    assert gp.live_release("hooky") is live
    # What on_load opened was closed again, exactly once...
    sick_id = [e[2] for e in _events(app, "on_load")][-1]
    assert [e[2] for e in _events(app, "on_unload")] == [sick_id]
    # ...but the release never went live, so it was never "unloaded" either.
    assert got == [("failed", sick_id)]
