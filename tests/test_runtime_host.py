"""The host is left as it was (SPEC 4.9), and mounts never clash.

Two identical host applications are served by real threaded servers, one
plain and one with gitplug and two plugins loaded; every request outside the
plugins' prefixes must get the same answer from both (status, headers, body):
routes, 404 page, 405 + ``Allow``, ``HEAD``, ``OPTIONS``, redirects, static
files, hooks and templates.
"""

from __future__ import annotations

import http.client
import threading
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from flask import Blueprint, Flask, g, render_template, request

from conftest import serve_wsgi
from gitplug import GitPlug, MountError
from pluginfactory import write_files

HELLO = {
    "hello/__init__.py": """
        from flask import g, render_template
        from gitplug import Plugin

        plugin = Plugin("hello", __name__)

        @plugin.route("/")
        def index():
            return render_template("index.html", seen=g.get("seen"))

        @plugin.route("/boom")
        def boom():
            raise RuntimeError("plugin view failed")
    """,
    # Same names as the host's templates: they must not shadow the host's.
    "hello/templates/index.html": "PLUGIN-INDEX seen={{ seen }}\n",
    "hello/templates/layout.html": "PLUGIN-LAYOUT\n",
}


def _get(base: str, method: str, path: str, body: str | None = None) -> tuple[int, list[tuple[str, str]], bytes]:
    parts = urlsplit(base)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=15)
    try:
        conn.request(method, path, body=body, headers={"Content-Type": "application/x-www-form-urlencoded"} if body else {})
        response = conn.getresponse()
        # Normalise what differs between two servers: the port, the date.
        # and the order of methods in Allow, which is a set's iteration order.
        headers = [
            (k, ", ".join(sorted(v.split(", "))) if k == "Allow" else v.replace(base, "<base>"))
            for k, v in response.getheaders()
            if k not in ("Date", "Server")
        ]
        return response.status, headers, response.read().replace(base.encode(), b"<base>")
    finally:
        conn.close()


def _make_host(root: Path) -> Flask:
    write_files(
        root,
        {
            "templates/index.html": "HOST-INDEX seen={{ g.seen }}\n",
            "templates/layout.html": "HOST-LAYOUT({% block body %}{% endblock %})\n",
            "templates/page.html": '{% extends "layout.html" %}{% block body %}page{% endblock %}\n',
            "templates/404.html": "HOST-404 {{ request.path }}\n",
            "templates/500.html": "HOST-500\n",
            "static/host.txt": "host static file\n",
        },
    )
    app = Flask("host_under_test", root_path=str(root))
    app.config.update(SECRET_KEY="s", HOOK_PATHS=[])

    @app.before_request
    def host_hook() -> None:
        g.seen = "host-hook"
        app.config["HOOK_PATHS"].append(request.path)

    @app.after_request
    def host_after(response):  # type: ignore[no-untyped-def]
        response.headers["X-Host-After"] = "1"
        return response

    @app.errorhandler(404)
    def not_found(error: Exception) -> tuple[str, int]:
        return render_template("404.html"), 404

    @app.errorhandler(500)
    def server_error(error: Exception) -> tuple[str, int]:
        return render_template("500.html"), 500

    @app.route("/")
    def home() -> str:
        return render_template("index.html")

    @app.route("/page")
    def page() -> str:
        return render_template("page.html")

    @app.route("/only-get")
    def only_get() -> str:
        return "only get"

    @app.route("/form", methods=["GET", "POST"])
    def form() -> str:
        return f"form {request.method} {request.form.get('x', '')}"

    @app.route("/hellox")
    def hellox() -> str:
        return "host hellox"

    @app.route("/items/<int:item>")
    def item(item: int) -> str:
        return f"item {item}"

    @app.route("/slash/")
    def slash() -> str:
        return "slash"

    @app.route("/fail")
    def fail() -> str:
        raise RuntimeError("host view failed")

    admin = Blueprint("admin", __name__, url_prefix="/admin")

    @admin.route("/")
    def admin_index() -> str:
        return "admin"

    app.register_blueprint(admin)
    return app


def _plugins(root: Path) -> dict[str, Path]:
    return {
        "hello": write_files(root / "hello", HELLO),
        "world": write_files(
            root / "world",
            {
                "world/__init__.py": """
                    from gitplug import Plugin
                    plugin = Plugin("world", __name__)

                    @plugin.get("/")
                    def index():
                        return "world"
                """
            },
        ),
    }


HOST_REQUESTS: list[tuple[str, str, str | None]] = [
    ("GET", "/", None),
    ("HEAD", "/", None),
    ("OPTIONS", "/", None),
    ("POST", "/", None),
    ("GET", "/page", None),
    ("GET", "/only-get", None),
    ("POST", "/only-get", "x=1"),
    ("DELETE", "/only-get", None),
    ("HEAD", "/only-get", None),
    ("OPTIONS", "/only-get", None),
    ("GET", "/form", None),
    ("POST", "/form", "x=42"),
    ("PUT", "/form", None),
    ("GET", "/hellox", None),
    ("POST", "/hellox", None),
    ("GET", "/hellox/deeper", None),
    ("GET", "/helloworld", None),
    ("GET", "/items/7", None),
    ("GET", "/items/x", None),
    ("GET", "/slash", None),
    ("GET", "/slash/", None),
    ("GET", "/nowhere", None),
    ("GET", "/nowhere/deeper/still", None),
    ("GET", "/static/host.txt", None),
    ("HEAD", "/static/host.txt", None),
    ("GET", "/static/missing.txt", None),
    ("GET", "/admin/", None),
    ("GET", "/admin", None),
    ("OPTIONS", "/admin/", None),
    ("GET", "/fail", None),
    ("GET", "/w", None),  # the bare prefix of "/world" is not a plugin URL
]



#: A live plugin with app-wide registrations that the host's pages do not use:
#: host requests then take the pinned path (they may run plugin code), and must
#: still answer byte for byte as without gitplug.
TOOLS = {
    "tools/__init__.py": """
        from gitplug import Plugin

        plugin = Plugin("tools", __name__)

        @plugin.app_template_filter("shout")
        def shout(value):
            return str(value).upper()

        @plugin.app_template_global("tools_version")
        def tools_version():
            return "1"

        @plugin.route("/")
        def index():
            return "tools"
    """
}


@pytest.mark.parametrize("app_wide", [False, True], ids=["plugins", "plugins-with-app-wide-code"])
def test_host_answers_exactly_as_without_gitplug(
    tmp_path: Path, make_gp: Callable[[Flask], GitPlug], app_wide: bool
) -> None:
    plain = _make_host(tmp_path / "host")
    hosted = _make_host(tmp_path / "host")
    rules_before = sorted((r.rule, r.endpoint, tuple(sorted(r.methods or ()))) for r in hosted.url_map.iter_rules())
    views_before = set(hosted.view_functions)
    gp = make_gp(hosted)
    plugins = _plugins(tmp_path / "plugins")
    gp.load_directory("hello", plugins["hello"])
    gp.load_directory("world", plugins["world"], url_prefix="/world")
    if app_wide:
        gp.load_directory("tools", write_files(tmp_path / "plugins" / "tools", TOOLS), url_prefix="/tools")
        assert gp.runtime.snapshot.host_visible, "the app-wide plugin should put host requests on the pinned path"

    with serve_wsgi(plain) as plain_base, serve_wsgi(hosted) as hosted_base:
        for method, path, body in HOST_REQUESTS:
            expected = _get(plain_base, method, path, body)
            actual = _get(hosted_base, method, path, body)
            assert actual == expected, f"{method} {path}: gitplug host answered differently"
        # Spot checks that the comparison covers what it claims to.
        status, headers, content = _get(hosted_base, "POST", "/only-get")
        assert status == 405 and ("Allow", "GET, HEAD, OPTIONS") in headers
        assert _get(hosted_base, "GET", "/nowhere")[::2] == (404, b"HOST-404 /nowhere")
        assert _get(hosted_base, "GET", "/")[::2] == (200, b"HOST-INDEX seen=host-hook")
        assert _get(hosted_base, "GET", "/page")[::2] == (200, b"HOST-LAYOUT(page)")
        status, headers, content = _get(hosted_base, "HEAD", "/")
        assert status == 200 and content == b"" and ("Content-Length", "25") in headers
        assert _get(hosted_base, "GET", "/hellox")[::2] == (200, b"host hellox")
        assert _get(hosted_base, "GET", "/fail")[::2] == (500, b"HOST-500")
        # And the plugins really are mounted next to those host routes.
        assert _get(hosted_base, "GET", "/hello/")[::2] == (200, b"PLUGIN-INDEX seen=host-hook")
        assert _get(hosted_base, "GET", "/world/")[::2] == (200, b"world")
        if app_wide:
            assert _get(hosted_base, "GET", "/tools/")[::2] == (200, b"tools")

    # No catch-all rule (nor any rule) was added to the host.
    assert sorted((r.rule, r.endpoint, tuple(sorted(r.methods or ()))) for r in hosted.url_map.iter_rules()) == rules_before
    # The host's own views are as they were; the live plugins' views sit beside
    # them (as a blueprint's would) while one snapshot is open, and go with it.
    views = hosted.view_functions
    assert {endpoint for endpoint in dict.keys(views) if views.host_has(endpoint)} == views_before
    assert set(dict.keys(views)) - views_before == set(gp.runtime.snapshot.view_functions)
    for name in list(gp.runtime.snapshot.releases):
        gp.runtime.stop(name)
    assert gp.runtime.wait_idle()
    assert set(dict.keys(views)) == views_before


def test_plugin_requests_get_host_hooks_and_host_error_answers(
    tmp_path: Path, make_gp: Callable[[Flask], GitPlug]
) -> None:
    app = _make_host(tmp_path / "host")
    gp = make_gp(app)
    gp.load_directory("hello", _plugins(tmp_path / "plugins")["hello"])
    with serve_wsgi(app) as base:
        app.config["HOOK_PATHS"].clear()
        status, headers, body = _get(base, "GET", "/hello/")
        assert (status, body) == (200, b"PLUGIN-INDEX seen=host-hook")
        assert ("X-Host-After", "1") in headers
        _get(base, "GET", "/")
        assert app.config["HOOK_PATHS"] == ["/hello/", "/"]
        # Unknown URL under the prefix: the host's 404 page, as for a blueprint.
        status, headers, body = _get(base, "GET", "/hello/nope")
        assert (status, body) == (404, b"HOST-404 /hello/nope")
        status, headers, body = _get(base, "POST", "/hello/")
        assert status == 405 and ("Allow", "GET, HEAD, OPTIONS") in headers
        status, headers, body = _get(base, "OPTIONS", "/hello/")
        assert status == 200 and ("Allow", "GET, HEAD, OPTIONS") in headers
        status, headers, body = _get(base, "HEAD", "/hello/")
        assert status == 200 and body == b""
        assert ("Content-Length", str(len(b"PLUGIN-INDEX seen=host-hook"))) in headers
        status, headers, body = _get(base, "GET", "/hello")
        assert status == 308 and ("Location", "<base>/hello/") in headers
        assert _get(base, "GET", "/hello/boom")[::2] == (500, b"HOST-500")
        assert gp.live_release("hello") is not None
        assert gp.live_release("hello").errors == 1  # type: ignore[union-attr]


def test_mount_errors(tmp_path: Path, make_gp: Callable[[Flask], GitPlug]) -> None:
    app = _make_host(tmp_path / "host")

    @app.route("/shop/cart")
    def cart() -> str:
        return "cart"

    @app.route("/exact")
    def exact() -> str:
        return "exact"

    gp = make_gp(app)
    plugins = _plugins(tmp_path / "plugins")
    world = gp.load_directory("world", plugins["world"], url_prefix="/world/v1")
    for prefix in ("/world", "/world/v1", "/world/v1/deeper"):
        with pytest.raises(MountError, match=rf"url_prefix '{prefix}' overlaps plugin 'world' at '/world/v1'"):
            gp.load_directory("hello", plugins["hello"], url_prefix=prefix)
    with pytest.raises(MountError, match=r"already has a blueprint named 'admin'. Rename the plugin"):
        gp.load_directory("admin", plugins["hello"], url_prefix="/somewhere")
    # None of that changed what is served.
    assert gp.live_release("hello") is None and gp.live_release("admin") is None
    assert gp.live_release("world") is world
    client = app.test_client()
    assert client.get("/shop/cart", buffered=True).get_data(as_text=True) == "cart"
    assert client.get("/world/v1/", buffered=True).get_data(as_text=True) == "world"
    # Not overlapping: a sibling prefix that merely shares characters.
    gp.load_directory("hello", plugins["hello"], url_prefix="/worldwide")
    worldwide = client.get("/worldwide/", buffered=True)
    assert worldwide.status_code == 200
    assert worldwide.get_data(as_text=True).startswith("PLUGIN-INDEX"), worldwide.get_data(as_text=True)


def test_concurrent_loads_onto_one_prefix_mount_only_one(tmp_path: Path, make_gp: Callable[[Flask], GitPlug]) -> None:
    app = _make_host(tmp_path / "host")
    gp = make_gp(app)
    dirs = {
        name: write_files(
            tmp_path / name,
            {
                f"{name}/__init__.py": f"""
                    import time
                    from gitplug import Plugin
                    time.sleep(0.2)  # a plugin that takes a moment to import
                    plugin = Plugin("{name}", __name__)

                    @plugin.route("/")
                    def index():
                        return "{name}"
                """
            },
        )
        for name in ("first", "second")
    }
    barrier = threading.Barrier(2)
    outcome: dict[str, str] = {}

    def load(name: str) -> None:
        barrier.wait()
        try:
            gp.load_directory(name, dirs[name], url_prefix="/shared")
            outcome[name] = "live"
        except MountError as exc:
            outcome[name] = f"refused: {exc}"

    threads = [threading.Thread(target=load, args=(n,)) for n in dirs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(v == "live" for v in outcome.values()) == [False, True], outcome


def test_host_url_defaults_from_the_flask_docs_work_with_plugin_endpoints(
    tmp_path: Path, make_gp: Callable[[Flask], GitPlug]
) -> None:
    """https://flask.palletsprojects.com/patterns/urlprocessors/, verbatim but for names."""
    app = Flask("i18n_host")

    @app.url_defaults
    def add_language_code(endpoint: str, values: dict[str, object]) -> None:
        if "lang_code" in values or not g.get("lang_code"):
            return
        if app.url_map.is_endpoint_expecting(endpoint, "lang_code"):
            values["lang_code"] = g.lang_code

    @app.url_value_preprocessor
    def pull_lang_code(endpoint: str | None, values: dict[str, object] | None) -> None:
        g.lang_code = (values or {}).pop("lang_code", None)

    @app.route("/<lang_code>/about")
    def about() -> str:
        from flask import url_for

        return f"{url_for('about')} {url_for('hello.index')}"

    gp = make_gp(app)
    gp.load_directory("hello", _plugins(tmp_path / "plugins")["hello"])
    response = app.test_client().get("/de/about", buffered=True)
    assert (response.status_code, response.get_data(as_text=True)) == (200, "/de/about /hello/")


PANEL = {
    "shop/__init__.py": """
        from gitplug import Plugin
        plugin = Plugin("shop", __name__)

        @plugin.route("/")
        def index():
            return "plugin index"

        @plugin.route("/panel", methods=["GET", "POST"])
        def panel():
            return "plugin panel"

        @plugin.route("/cart")
        def cart():
            return "plugin cart"

        @plugin.route("/x")
        def x():
            return "plugin x"
    """,
}


def test_host_routes_under_a_prefix_answer_whenever_they_were_added(
    tmp_path: Path, make_gp: Callable[[Flask], GitPlug], caplog: pytest.LogCaptureFixture
) -> None:
    """README "Guarantees": the host's routes win, added before or after the plugin was mounted."""
    app = _make_host(tmp_path / "host")

    @app.route("/shop/cart")
    def cart() -> str:
        return "host cart"

    gp = make_gp(app)
    plugin_dir = write_files(tmp_path / "shop", PANEL)
    caplog.set_level("WARNING", logger="gitplug")
    first = gp.load_directory("shop", plugin_dir, url_prefix="/shop")  # no MountError for /shop/cart
    assert "the host's routes '/shop/cart' (endpoint 'cart') lie under url_prefix '/shop'" in caplog.text
    # Added after the plugin was mounted, the way an extension registers a
    # probe at startup (before the first request).
    app.add_url_rule("/shop/panel", endpoint="panel", view_func=lambda: "host panel", methods=["GET"])
    app.add_url_rule("/shop/dir/", endpoint="dir", view_func=lambda: "host dir")
    assert (
        "plugin shop: the host added route '/shop/panel' (endpoint 'panel') under url_prefix '/shop';"
        " the host's route answers it from now on"
    ) in caplog.text
    with serve_wsgi(app) as base:
        assert _get(base, "GET", "/shop/panel")[::2] == (200, b"host panel")
        assert _get(base, "GET", "/shop/cart")[::2] == (200, b"host cart")
        # The host's 405 and its redirect to the canonical URL are the host's answers too.
        status, headers, _ = _get(base, "POST", "/shop/panel")
        assert status == 405 and ("Allow", "GET, HEAD, OPTIONS") in headers
        status, headers, _ = _get(base, "GET", "/shop/dir")
        assert status == 308 and ("Location", "<base>/shop/dir/") in headers
        # Everything else under the prefix is still the plugin's.
        assert _get(base, "GET", "/shop/")[::2] == (200, b"plugin index")
        assert _get(base, "GET", "/shop/x")[::2] == (200, b"plugin x")
        assert gp.live_release("shop") is first and first.requests == 2
        # The plugin's next deploy is not refused for the route added later,
        # and the log says again which host routes the prefix overlaps.
        caplog.clear()
        second = gp.load_directory("shop", write_files(tmp_path / "shop2", PANEL), url_prefix="/shop")
        assert gp.live_release("shop") is second is not first
        assert "'/shop/panel' (endpoint 'panel')" in caplog.text and "'/shop/cart'" in caplog.text
        assert _get(base, "GET", "/shop/panel")[::2] == (200, b"host panel")
        assert _get(base, "GET", "/shop/x")[::2] == (200, b"plugin x")
        # url_for of the host endpoint and of the plugin endpoint agree with who answers.
        with app.test_request_context("/shop/panel"):
            from flask import url_for

            assert (url_for("panel"), url_for("shop.panel")) == ("/shop/panel", "/shop/panel")
            assert request.url_rule is not None and request.url_rule.endpoint == "panel"
    # A Host header TRUSTED_HOSTS refuses: Flask's 400, and the request is not left counted
    # (it was counted under the runtime's lock before the host's rules were asked).
    app.config["TRUSTED_HOSTS"] = ["127.0.0.1"]
    assert app.test_client().get("/shop/panel", headers={"Host": "evil.example"}, buffered=True).status_code == 400
    assert gp.runtime.snapshot.inflight == 0


def test_a_build_only_host_rule_does_not_block_a_mount(
    tmp_path: Path, make_gp: Callable[[Flask], GitPlug], caplog: pytest.LogCaptureFixture
) -> None:
    """A build-only rule never matches a request, so it takes no URL from a plugin."""
    app = _make_host(tmp_path / "host")
    app.add_url_rule("/blog/x", endpoint="x", build_only=True)
    gp = make_gp(app)
    caplog.set_level("WARNING", logger="gitplug")
    gp.load_directory("blog", write_files(tmp_path / "blog", {
        "blog/__init__.py": PANEL["shop/__init__.py"].replace('"shop"', '"blog"')
    }), url_prefix="/blog")
    app.add_url_rule("/blog/panel", endpoint="later", build_only=True)  # added later: the same
    assert "/blog/x" not in caplog.text and "/blog/panel" not in caplog.text
    with serve_wsgi(app) as base:
        assert _get(base, "GET", "/blog/x")[::2] == (200, b"plugin x")
        assert _get(base, "GET", "/blog/panel")[::2] == (200, b"plugin panel")
    with app.test_request_context("/"):
        from flask import url_for

        assert url_for("x") == "/blog/x"


LINKS = {
    "{name}/__init__.py": """
        from flask import url_for
        from gitplug import Plugin

        plugin = Plugin("{name}", __name__)

        @plugin.route("/")
        def index():
            return "index"

        @plugin.route("/item/<int:n>")
        def item(n):
            return str(n)

        @plugin.route("/links")
        def links():
            return " ".join([
                url_for(".item", n=3, _anchor="a b"),
                url_for("{other}.item", n=4),
                url_for("late", _external=True),
                url_for("index", q="x"),
            ])
    """,
}


def _links_plugin(root: Path, name: str, other: str) -> Path:
    return write_files(root / name, {
        path.format(name=name): source.replace("{name}", name).replace("{other}", other)
        for path, source in LINKS.items()
    })


def test_url_for_builds_every_map_from_host_and_plugin_requests_as_blueprints_do(
    tmp_path: Path, make_gp: Callable[[Flask], GitPlug]
) -> None:
    """Plugin URLs from host requests, host and other plugins' URLs from a plugin request.

    The same calls in a plain app where the plugins are native blueprints
    give the expected strings. The host adds a route after the plugins are
    live: a plugin request builds it at once.
    """
    from flask import url_for
    from werkzeug.routing import BuildError, Rule

    def host_app(name: str) -> Flask:
        app = Flask(name)
        app.config["SERVER_NAME"] = "example.test"

        @app.route("/")
        def index() -> str:
            return "host"

        @app.route("/host-links")
        def host_links() -> str:
            try:
                url_for("nowhere.at_all")
            except BuildError:
                missing = "missing"
            return " ".join([
                url_for("alpha.item", n=1, _anchor="top", _external=True),
                url_for("beta.index", _method="GET"),
                url_for("alpha.item", n=2, _scheme="https", _external=True),
                missing,
            ])

        return app

    plain = host_app("plain_links")
    for name, other in (("alpha", "beta"), ("beta", "alpha")):
        namespace: dict[str, object] = {"__name__": __name__}
        source = LINKS["{name}/__init__.py"].replace("{name}", name).replace("{other}", other)
        source = "\n".join(line[8:] for line in source.splitlines())
        source = source.replace("from gitplug import Plugin", "from flask import Blueprint").replace(
            f'plugin = Plugin("{name}", __name__)', f'plugin = Blueprint("{name}", __name__)'
        )
        exec(compile(source, f"<{name}>", "exec"), namespace)  # noqa: S102 - the test's own source
        plain.register_blueprint(namespace["plugin"], url_prefix=f"/{name}")  # type: ignore[arg-type]

    hosted = host_app("hosted_links")
    gp = make_gp(hosted)
    gp.load_directory("alpha", _links_plugin(tmp_path, "alpha", "beta"))
    gp.load_directory("beta", _links_plugin(tmp_path, "beta", "alpha"))
    for app in (plain, hosted):
        # Each release's map has served (and copied the host's endpoints) before the host adds one.
        assert [app.test_client().get(f"/{name}/").status_code for name in ("alpha", "beta")] == [200, 200]
        # Flask's setup methods refuse once a request was served; the map takes it.
        app.url_map.add(Rule("/late", endpoint="late"))
        app.view_functions["late"] = lambda: "late"

    def answers(app: Flask) -> list[str]:
        client = app.test_client()
        pages = [client.get(path, base_url="http://example.test") for path in ("/alpha/links", "/beta/links", "/host-links")]
        assert [page.status_code for page in pages] == [200, 200, 200], [page.get_data(as_text=True) for page in pages]
        with app.app_context():
            outside = url_for("beta.item", n=5)
        return [page.get_data(as_text=True) for page in pages] + [outside]

    expected = answers(plain)
    assert expected == [
        "/alpha/item/3#a%20b /beta/item/4 http://example.test/late /?q=x",
        "/beta/item/3#a%20b /alpha/item/4 http://example.test/late /?q=x",
        "http://example.test/alpha/item/1#top /beta/ https://example.test/alpha/item/2 missing",
        "http://example.test/beta/item/5",
    ]
    assert answers(hosted) == expected


def test_a_host_blueprint_registered_after_a_plugin_of_its_name_keeps_flasks_rules(
    tmp_path: Path, make_gp: Callable[[Flask], GitPlug]
) -> None:
    """gitplug restores plugins in ``GitPlug(app)``, before the host registers its blueprints.

    A host blueprint of a live plugin's name registers as in Flask (the
    plugin's views held in ``app.view_functions`` give way), and the host's
    view wins on that name, as for any name the host uses.
    """
    app = Flask("late_blueprint")
    gp = make_gp(app)
    gp.load_directory("hello", _plugins(tmp_path / "plugins")["hello"])
    late = Blueprint("hello", __name__)
    late.add_url_rule("/", "index", lambda: "host hello")
    app.register_blueprint(late, url_prefix="/host-hello")
    client = app.test_client()
    assert client.get("/host-hello/").text == "host hello"
    assert app.view_functions.host_has("hello.index")
    # The next deploy of the plugin is refused by name; the live release keeps serving.
    with pytest.raises(MountError, match="already has a blueprint named 'hello'. Rename the plugin"):
        gp.load_directory("hello", _plugins(tmp_path / "again")["hello"])
    assert client.get("/hello/boom").status_code == 500  # the plugin's own route, still live
    assert client.get("/hello/").text == "host hello"  # a name both use: the host's view (host wins)
