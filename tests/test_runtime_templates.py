"""Templates, ``url_for`` and static files per release (SPEC 2, 4.1, 4.4).

Two plugins ship the same template names (``index.html``, ``base.html``,
``_part.html``) as each other *and* as the host; a real threaded server is
hammered from 8 threads while one plugin is swapped back and forth, and every
body must come from exactly the right files of exactly one release.
"""

from __future__ import annotations

import http.client
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from flask import Flask, render_template

from conftest import serve_wsgi
from gitplug import GitPlug, GitplugError, PluginLoadError
from gitplug.runtime.loaded import LoadedRelease
from gitplug.runtime.plugin import STATIC_MAX_AGE
from pluginfactory import write_files

THREADS = 8
REQUESTS_PER_THREAD = 400


def _get(base: str, path: str, method: str = "GET") -> tuple[int, str, dict[str, str]]:
    parts = urlsplit(base)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=15)
    try:
        conn.request(method, path)
        response = conn.getresponse()
        return response.status, response.read().decode(), dict(response.getheaders())
    finally:
        conn.close()


def _host(root: Path) -> Flask:
    """A host whose template names collide with the plugins' on purpose."""
    write_files(
        root,
        {
            "templates/index.html": "HOST-INDEX\n",
            "templates/layout.html": "HOST-LAYOUT({% block body %}{% endblock %})\n",
            "templates/base.html": "HOST-BASE[{% block body %}{% endblock %}]\n",
            "templates/_part.html": "HOST-PART\n",
            "templates/hostonly.html": "HOST-ONLY\n",
            "templates/hostpage.html": (
                '{% extends "base.html" %}{% block body %}hostpage {% include "_part.html" %}'
                "{% endblock %}\n"
            ),
            "templates/links.html": (
                "{{ url_for('alpha.index') }} {{ url_for('beta.page') }}"
                " {{ url_for('alpha.static', filename='s.css') }}\n"
            ),
            "templates/404.html": "HOST-404\n",
        },
    )
    app = Flask("templates_host", root_path=str(root))
    app.config.update(SECRET_KEY="s")

    @app.route("/")
    def home() -> str:
        return render_template("index.html")

    @app.route("/hostpage")
    def hostpage() -> str:
        return render_template("hostpage.html")

    @app.route("/links")
    def links() -> str:
        return render_template("links.html")

    @app.errorhandler(404)
    def not_found(error: Exception) -> tuple[str, int]:
        return render_template("404.html"), 404

    return app


def _plugin(root: Path, name: str, label: str, *, extra: dict[str, str] | None = None) -> Path:
    """Plugin ``name`` (package ``front`` for both plugins) stamped with ``label``."""
    other = "beta" if name == "alpha" else "alpha"
    files = {
        "front/__init__.py": f"""
            from flask import render_template
            from gitplug import Plugin, current_plugin

            plugin = Plugin("{name}", __name__)

            @plugin.route("/")
            def index():
                return render_template("index.html", who=current_plugin.name)

            @plugin.route("/page")
            def page():
                return render_template("page.html")

            @plugin.route("/fallback")
            def fallback():
                return render_template("hostonly.html")
        """,
        "front/templates/index.html": (
            '{% extends "base.html" %}{% block body %}' + label + ':index:{{ who }} {% include "_part.html" %}'
            " {{ url_for('" + other + ".index') }} {{ url_for('home') }}"
            " {{ url_for('" + name + ".static', filename='s.css') }}{% endblock %}\n"
        ),
        "front/templates/base.html": label + ":base[{% block body %}{% endblock %}]\n",
        "front/templates/_part.html": label + ":part\n",
        "front/templates/page.html": '{% extends "layout.html" %}{% block body %}' + label + ":page{% endblock %}\n",
        "front/static/s.css": label + "-css\n",
    }
    files.update(extra or {})
    return write_files(root, files)


def _expected_index(name: str, label: str, release: LoadedRelease) -> str:
    other = "beta" if name == "alpha" else "alpha"
    static = f"/{name}/static/{release.release_id[:12]}/s.css"
    return f"{label}:base[{label}:index:{name} {label}:part /{other}/ / {static}]"



def test_concurrent_requests_render_the_right_files_across_swaps(
    tmp_path: Path, make_gp: Callable[[Flask], GitPlug]
) -> None:
    app = _host(tmp_path / "host")
    gp = make_gp(app)
    a1 = _plugin(tmp_path / "a1", "alpha", "A1")
    a2 = _plugin(tmp_path / "a2", "alpha", "A2")
    rel_b = gp.load_directory("beta", _plugin(tmp_path / "b", "beta", "B"), url_prefix="/beta")
    rel_a1 = gp.load_directory("alpha", a1, url_prefix="/alpha")
    rel_a2 = gp.load_directory("alpha", a2, url_prefix="/alpha")
    rel_a1 = gp.load_directory("alpha", a1, url_prefix="/alpha")
    assert rel_a1.release_id != rel_a2.release_id

    alpha_index = {_expected_index("alpha", "A1", rel_a1): "A1", _expected_index("alpha", "A2", rel_a2): "A2"}
    alpha_page = {"HOST-LAYOUT(A1:page)": "A1", "HOST-LAYOUT(A2:page)": "A2"}
    links = {
        f"/alpha/ /beta/page /alpha/static/{rel_a1.release_id[:12]}/s.css": "A1",
        f"/alpha/ /beta/page /alpha/static/{rel_a2.release_id[:12]}/s.css": "A2",
    }
    fixed = {
        "/": "HOST-INDEX",
        "/hostpage": "HOST-BASE[hostpage HOST-PART]",
        "/beta/": _expected_index("beta", "B", rel_b),
        "/beta/page": "HOST-LAYOUT(B:page)",
        "/beta/fallback": "HOST-ONLY",
        "/alpha/fallback": "HOST-ONLY",
        "/nowhere": "HOST-404",
    }
    varying = {"/alpha/": alpha_index, "/alpha/page": alpha_page, "/links": links}
    paths = [*fixed, *varying]

    bad: list[str] = []
    seen: dict[str, set[str]] = {p: set() for p in varying}
    count = [0]
    lock = threading.Lock()

    with serve_wsgi(app) as base:

        def client(offset: int) -> None:
            for i in range(REQUESTS_PER_THREAD):
                path = paths[(i + offset) % len(paths)]
                try:
                    status, body, _ = _get(base, path)
                except OSError as exc:
                    with lock:
                        bad.append(f"{path}: {exc!r}")
                    continue
                expected_status = 404 if path == "/nowhere" else 200
                with lock:
                    count[0] += 1
                    if status != expected_status:
                        bad.append(f"{path}: status {status}: {body}")
                    elif path in fixed:
                        if body != fixed[path]:
                            bad.append(f"{path}: {body!r} != {fixed[path]!r}")
                    elif body not in varying[path]:
                        bad.append(f"{path}: {body!r} is from no single release")
                    else:
                        seen[path].add(varying[path][body])

        started = time.monotonic()
        threads = [threading.Thread(target=client, args=(n,)) for n in range(THREADS)]
        for thread in threads:
            thread.start()
        swaps = 0
        while any(thread.is_alive() for thread in threads):
            gp.load_directory("alpha", a2 if swaps % 2 == 0 else a1, url_prefix="/alpha")
            swaps += 1
            time.sleep(0.03)
        for thread in threads:
            thread.join()
        elapsed = time.monotonic() - started

        # After the last swap, only the last release answers.
        last_label = "A2" if swaps % 2 == 1 else "A1"
        for _ in range(20):
            status, body, _ = _get(base, "/alpha/")
            assert status == 200 and alpha_index.get(body) == last_label, body

    assert not bad, f"{len(bad)} bad responses, first: {bad[:5]}"
    assert count[0] == THREADS * REQUESTS_PER_THREAD
    assert swaps >= 10, f"only {swaps} swaps happened during {elapsed:.1f}s of traffic"
    # Both releases were really observed by the clients, in every varying URL.
    assert all(labels == {"A1", "A2"} for labels in seen.values()), seen


def test_new_release_template_replaces_old_and_host_fallback(
    tmp_path: Path, make_gp: Callable[[Flask], GitPlug]
) -> None:
    app = _host(tmp_path / "host")
    gp = make_gp(app)
    gp.load_directory("beta", _plugin(tmp_path / "b", "beta", "B"), url_prefix="/beta")
    source = _plugin(tmp_path / "src", "alpha", "V1")
    gp.load_directory("alpha", source, url_prefix="/alpha")
    client = app.test_client()

    def body(path: str) -> str:
        return client.get(path, buffered=True).get_data(as_text=True)

    assert body("/alpha/").startswith("V1:base[V1:index")
    assert body("/alpha/fallback") == "HOST-ONLY"
    # Edit in place: a new index.html, and the plugin now ships its own hostonly.html.
    write_files(source, {"front/templates/index.html": "V2-INDEX\n", "front/templates/hostonly.html": "V2-OWN\n"})
    gp.load_directory("alpha", source, url_prefix="/alpha")
    assert body("/alpha/") == "V2-INDEX"
    assert body("/alpha/fallback") == "V2-OWN"
    assert body("/") == "HOST-INDEX", "the host's own index.html must not be shadowed"
    assert body("/hostpage") == "HOST-BASE[hostpage HOST-PART]"
    # Remove the plugin's copy again: the host's template is found once more.
    (source / "front/templates/hostonly.html").unlink()
    write_files(source, {"front/templates/index.html": "V3-INDEX\n"})
    gp.load_directory("alpha", source, url_prefix="/alpha")
    assert body("/alpha/") == "V3-INDEX"
    assert body("/alpha/fallback") == "HOST-ONLY"
    # Back to exactly the V1 content: same release id, V1's templates again.
    shutil.rmtree(source)
    _plugin(source, "alpha", "V1")
    gp.load_directory("alpha", source, url_prefix="/alpha")
    assert body("/alpha/").startswith("V1:base[V1:index")
    assert body("/alpha/fallback") == "HOST-ONLY"


def test_template_syntax_error_fails_load_and_old_release_serves(
    tmp_path: Path, make_gp: Callable[[Flask], GitPlug]
) -> None:
    app = _host(tmp_path / "host")
    gp = make_gp(app)
    gp.load_directory("beta", _plugin(tmp_path / "b", "beta", "B"), url_prefix="/beta")
    good = gp.load_directory("alpha", _plugin(tmp_path / "good", "alpha", "GOOD"), url_prefix="/alpha")
    broken = _plugin(
        tmp_path / "bad",
        "alpha",
        "BAD",
        extra={"front/templates/sub/broken.html": "line one\nline two\n{{ 1 + }}\nline four\n"},
    )
    with pytest.raises(PluginLoadError, match=r"template syntax error in front/templates/sub/broken.html line 3") as info:
        gp.load_directory("alpha", broken, url_prefix="/alpha")
    assert info.value.file == "front/templates/sub/broken.html"
    assert info.value.line == 3
    assert info.value.plugin == "alpha"
    assert "live release is unchanged" in str(info.value)
    assert gp.live_release("alpha") is good
    with app.test_client() as client:
        response = client.get("/alpha/", buffered=True)
        assert response.status_code == 200
        assert response.get_data(as_text=True) == _expected_index("alpha", "GOOD", good)


def test_url_for_between_plugins_and_host(tmp_path: Path, make_gp: Callable[[Flask], GitPlug]) -> None:
    app = _host(tmp_path / "host")
    gp = make_gp(app)
    rel_b = gp.load_directory("beta", _plugin(tmp_path / "b", "beta", "B"), url_prefix="/beta")
    rel_a = gp.load_directory("alpha", _plugin(tmp_path / "a", "alpha", "A"), url_prefix="/alpha")
    client = app.test_client()
    # plugin -> plugin and plugin -> host, rendered in alpha's and beta's requests.
    assert client.get("/alpha/", buffered=True).get_data(as_text=True) == _expected_index("alpha", "A", rel_a)
    assert client.get("/beta/", buffered=True).get_data(as_text=True) == _expected_index("beta", "B", rel_b)
    # host template -> plugins.
    assert client.get("/links", buffered=True).get_data(as_text=True) == (
        f"/alpha/ /beta/page /alpha/static/{rel_a.release_id[:12]}/s.css"
    )
    # Outside any request, with SERVER_NAME, like a background job would.
    app.config["SERVER_NAME"] = "example.test"
    with app.app_context():
        from flask import url_for

        assert url_for("beta.page") == "http://example.test/beta/page"
        assert url_for("home") == "http://example.test/"


def test_static_urls_are_versioned_and_old_ones_stop_being_served(
    tmp_path: Path, make_gp: Callable[[Flask], GitPlug]
) -> None:
    app = _host(tmp_path / "host")
    gp = make_gp(app)
    v1 = gp.load_directory("alpha", _plugin(tmp_path / "v1", "alpha", "V1"), url_prefix="/alpha")
    gp.load_directory("beta", _plugin(tmp_path / "b", "beta", "B"), url_prefix="/beta")
    url_v1 = f"/alpha/static/{v1.release_id[:12]}/s.css"
    with serve_wsgi(app) as base:
        status, body, headers = _get(base, url_v1)
        assert (status, body) == (200, "V1-css\n")
        assert f"max-age={STATIC_MAX_AGE}" in headers.get("Cache-Control", "")
        status, page, _ = _get(base, "/alpha/")
        assert page.endswith(url_v1 + "]")
        v2 = gp.load_directory("alpha", _plugin(tmp_path / "v2", "alpha", "V2"), url_prefix="/alpha")
        url_v2 = f"/alpha/static/{v2.release_id[:12]}/s.css"
        assert url_v2 != url_v1
        assert gp.runtime.wait_idle()
        assert v1.unloaded
        assert _get(base, url_v2)[:2] == (200, "V2-css\n")
        assert _get(base, url_v1)[:2] == (404, "HOST-404")
        # The plain URL (hand-written links) serves the live release, and is
        # cached as the host says, not for a year.
        status, body, headers = _get(base, "/alpha/static/s.css")
        assert (status, body) == (200, "V2-css\n")
        assert f"max-age={STATIC_MAX_AGE}" not in headers.get("Cache-Control", "")
        # The new page links to the new file only.
        assert _get(base, "/alpha/")[1].endswith(url_v2 + "]")


def _filter_plugin(root: Path, package: str, label: str, filter_name: str = "stamp") -> Path:
    return write_files(
        root,
        {
            f"{package}/__init__.py": f"""
                from gitplug import Plugin

                plugin = Plugin("{package}", __name__)

                @plugin.app_template_filter("{filter_name}")
                def stamp(value):
                    return f"{{value}}-{label}"

                @plugin.app_context_processor
                def label():
                    return {{"cp_label": "{label}"}}
            """
        },
    )


def test_app_template_filters_swap_atomically_with_the_release(
    tmp_path: Path, make_gp: Callable[[Flask], GitPlug]
) -> None:
    app = Flask("filters_host")

    @app.route("/")
    def home() -> str:
        from flask import render_template_string

        time.sleep(0.005)  # a view does some work before it renders
        return render_template_string("{{ cp_label|default('none') }} {{ 'x'|stamp }}")

    gp = make_gp(app)
    dirs = [_filter_plugin(tmp_path / "a", "stamper", "A"), _filter_plugin(tmp_path / "b", "stamper", "B")]
    gp.load_directory("stamper", dirs[0])
    bodies: list[str] = []
    with serve_wsgi(app) as base:

        def client() -> None:
            for _ in range(60):
                status, body, _ = _get(base, "/")
                bodies.append(f"{status} {body}")

        threads = [threading.Thread(target=client) for _ in range(THREADS)]
        for thread in threads:
            thread.start()
        swaps = 0
        while any(thread.is_alive() for thread in threads):
            swaps += 1
            gp.load_directory("stamper", dirs[swaps % 2])
            time.sleep(0.004)
        for thread in threads:
            thread.join()
    mixed = [b for b in bodies if b not in ("200 A x-A", "200 B x-B")]
    assert not mixed, f"{len(mixed)} of {len(bodies)} host responses mixed two releases: {mixed[:5]}"


def test_stopping_a_plugin_keeps_another_live_plugins_filter(
    tmp_path: Path, make_gp: Callable[[Flask], GitPlug]
) -> None:
    app = Flask("filters_host2")

    @app.route("/")
    def home() -> str:
        from flask import render_template_string

        return render_template_string(
            "{% if 'stamp' is filter %}{{ 'x'|stamp }}{% else %}no filter{% endif %}"
            "/{% if 'other' is filter %}{{ 'y'|other }}{% else %}no other{% endif %}"
        )

    gp = make_gp(app)
    gp.load_directory("first", _filter_plugin(tmp_path / "a", "first", "A"))
    gp.load_directory("second", _filter_plugin(tmp_path / "b", "second", "B", filter_name="other"))
    assert gp.runtime.wait_idle()
    client = app.test_client()
    assert client.get("/", buffered=True).get_data(as_text=True) == "x-A/y-B"
    gp.stop("second")
    assert gp.runtime.wait_idle()
    assert client.get("/", buffered=True).get_data(as_text=True) == "x-A/no other"


def test_a_second_plugin_registering_the_same_app_wide_filter_is_refused(
    tmp_path: Path, make_gp: Callable[[Flask], GitPlug]
) -> None:
    app = Flask("filters_host3")

    @app.route("/")
    def home() -> str:
        from flask import render_template_string

        return render_template_string("{{ 'x'|stamp }}")

    gp = make_gp(app)
    gp.load_directory("first", _filter_plugin(tmp_path / "a", "first", "A"))
    with pytest.raises(GitplugError) as refused:
        gp.load_directory("second", _filter_plugin(tmp_path / "b", "second", "B"))
    message = str(refused.value)
    assert "'stamp'" in message and "already registered" in message and "first" in message, message
    # The refusal changed nothing that is served.
    assert app.test_client().get("/", buffered=True).get_data(as_text=True) == "x-A"


def test_host_view_builds_a_plugin_url_after_the_plugin_was_swapped_and_unloaded(
    tmp_path: Path, make_gp: Callable[[Flask], GitPlug]
) -> None:
    """A host request that began before a swap builds the plugin's URLs after the old release is gone.

    The view waits until the swap has happened and the old release has been
    unloaded (purged), then builds URLs: every time, not by chance.
    """
    app = _host(tmp_path / "host")
    entered = threading.Event()
    release_view = threading.Event()

    @app.route("/slow-links")
    def slow_links() -> str:
        from flask import url_for

        entered.set()
        assert release_view.wait(10)
        return " ".join(
            [url_for("alpha.index"), url_for("alpha.static", filename="s.css"), render_template("links.html")]
        )

    gp = make_gp(app)
    gp.load_directory("beta", _plugin(tmp_path / "b", "beta", "B"), url_prefix="/beta")
    old = gp.load_directory("alpha", _plugin(tmp_path / "a1", "alpha", "A1"), url_prefix="/alpha")
    with serve_wsgi(app) as base:
        result: list[tuple[int, str, dict[str, str]]] = []
        request = threading.Thread(target=lambda: result.append(_get(base, "/slow-links")))
        request.start()
        try:
            assert entered.wait(10)
            new = gp.load_directory("alpha", _plugin(tmp_path / "a2", "alpha", "A2"), url_prefix="/alpha")
            assert gp.runtime.wait_idle()
            assert old.unloaded, "the old release must be unloaded while the host request is still running"
        finally:
            release_view.set()
            request.join(15)
        status, body, _ = result[0]
        assert status == 200, body
        # The request is pinned to the snapshot it started on: the old release's static URL.
        old_static = f"/alpha/static/{old.release_id[:12]}/s.css"
        assert body == f"/alpha/ {old_static} /alpha/ /beta/page {old_static}"
        # A new request gets the new release's.
        assert _get(base, "/links")[1] == f"/alpha/ /beta/page /alpha/static/{new.release_id[:12]}/s.css"


def test_a_release_configured_under_another_name_is_refused(
    tmp_path: Path, make_gp: Callable[[Flask], GitPlug]
) -> None:
    """Plugin("greeter") configured as greet2 would link greeter's files: refused at load."""
    from gitplug.errors import PluginNameMismatch

    app = _host(tmp_path / "host")
    gp = make_gp(app)
    greeter = _plugin(tmp_path / "g", "alpha", "G")  # its code says Plugin("alpha")
    live = gp.load_directory("alpha", greeter, url_prefix="/alpha")
    with pytest.raises(PluginNameMismatch) as info:
        gp.load_directory("beta", greeter, url_prefix="/beta")
    message = str(info.value)
    assert message == (
        "plugin 'beta': the release creates Plugin('alpha', ...) but is configured as 'beta'."
        " Name the plugin 'alpha' in the configuration, or create it with"
        " `Plugin('beta', __name__)`; the live release is unchanged."
    )
    assert (info.value.plugin, info.value.declared) == ("beta", "alpha")
    assert gp.live_release("beta") is None and gp.live_release("alpha") is live
    assert app.test_client().get("/beta/", buffered=True).status_code == 404


def test_an_app_wide_filter_renders_its_own_templates_on_a_host_request(
    tmp_path: Path, make_gp: Callable[[Flask], GitPlug]
) -> None:
    """A blueprint's filter finds the app's templates and every blueprint's; a plugin's
    filter (the plugin's own object) finds the host's, then its own release's."""
    host_root = write_files(tmp_path / "host", {"templates/shared.html": "HOST-SHARED\n"})
    app = Flask("badge_host", root_path=str(host_root))

    @app.route("/")
    def home() -> str:
        from flask import render_template_string

        return render_template_string("{{ 'x'|badge }} {{ 'y'|badge('shared.html') }}")

    @app.route("/missing")
    def missing() -> str:
        return render_template("badge.html")  # the plugin's: not the host's to find

    gp = make_gp(app)
    gp.load_directory("badges", write_files(tmp_path / "plugin", {
        "badges/__init__.py": """
            from flask import render_template
            from gitplug import Plugin

            plugin = Plugin("badges", __name__)

            @plugin.app_template_filter("badge")
            def badge(value, template="badge.html"):
                return render_template(template, value=value).strip()

            @plugin.route("/")
            def index():
                return render_template("shared.html").strip() + " " + badge("z")
        """,
        "badges/templates/badge.html": "[badge {{ value }}]\n",
        "badges/templates/shared.html": "PLUGIN-SHARED\n",
    }))
    client = app.test_client()
    assert client.get("/").get_data(as_text=True) == "[badge x] HOST-SHARED"
    # In the plugin's own request its release's templates come first, as before.
    assert client.get("/badges/").get_data(as_text=True) == "PLUGIN-SHARED [badge z]"
    # Host code alone still finds only the host's templates.
    app.testing = False
    assert client.get("/missing").status_code == 500
    gp.stop("badges")
    assert gp.runtime.wait_idle()
    assert client.get("/").status_code == 500  # the filter went with the plugin
