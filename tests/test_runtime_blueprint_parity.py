"""Everything a blueprint does, a plugin does (README, "Writing a plugin").

Flask's own ``tests/test_blueprints.py`` (Flask 3.1) is the yardstick: each
test here checks one of its behaviours against a plugin loaded through
gitplug into a real host (``load_directory``, the test client or a real
server). Behaviours whose subject cannot exist in gitplug are listed in the
README with the reason, not forced here.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from flask import Flask

from gitplug import GitPlug, PluginImportError
from pluginfactory import write_files

MakeGP = Callable[[Flask], GitPlug]


def _host() -> Flask:
    app = Flask("parity_host")
    app.config.update(TESTING=True, SECRET_KEY="parity")

    @app.route("/")
    def home() -> str:
        return "host home"

    return app


def _plugin(root: Path, source: str, *, package: str = "parity", extra: dict[str, str] | None = None) -> Path:
    """A plugin package whose ``__init__`` is ``source`` (after the common imports)."""
    head = (
        "from flask import abort, g, render_template, request, url_for\n"
        "from gitplug import Plugin, current_plugin\n"
    )
    import textwrap

    files = {f"{package}/__init__.py": head + textwrap.dedent(source).lstrip("\n")}
    files.update(extra or {})
    return write_files(root / package, files)


# -- mounting: where a plugin answers ------------------------------------------


def test_constructor_url_prefix_is_used_when_none_is_configured(tmp_path: Path, make_gp: MakeGP) -> None:
    app = _host()
    gp = make_gp(app)
    src = _plugin(tmp_path, """
        plugin = Plugin("shop", __name__, url_prefix="/store")

        @plugin.route("/")
        def index():
            return "shop at " + current_plugin.url_prefix
    """)
    release = gp.load_directory("shop", src)
    client = app.test_client()
    assert release.prefix == "/store"
    assert client.get("/store/").text == "shop at /store"
    assert client.get("/shop/").status_code == 404
    # The configuration's (here: load_directory's) prefix wins over the constructor's.
    release = gp.load_directory("shop", src, url_prefix="/boutique")
    assert release.prefix == "/boutique"
    assert client.get("/boutique/").text == "shop at /boutique"
    assert client.get("/store/").status_code == 404


def test_no_prefix_anywhere_mounts_at_the_name(tmp_path: Path, make_gp: MakeGP) -> None:
    app = _host()
    gp = make_gp(app)
    src = _plugin(tmp_path, """
        plugin = Plugin("shop", __name__)

        @plugin.route("/")
        def index():
            return "shop"
    """)
    assert gp.load_directory("shop", src).prefix == "/shop"
    assert app.test_client().get("/shop/").text == "shop"


def test_constructor_prefix_over_a_host_route_leaves_the_host_route_answering(
    tmp_path: Path, make_gp: MakeGP
) -> None:
    """The constructor's prefix gets the same checks as a configured one (host routes win)."""
    app = _host()

    @app.route("/store/open")
    def store_open() -> str:
        return "host store"

    gp = make_gp(app)
    src = _plugin(tmp_path, """
        plugin = Plugin("shop", __name__, url_prefix="/store")

        @plugin.route("/")
        def index():
            return "shop"
    """)
    assert gp.load_directory("shop", src).prefix == "/store"
    client = app.test_client()
    assert client.get("/store/open").text == "host store"
    assert client.get("/store/").text == "shop"


# -- names ----------------------------------------------------------------------


@pytest.mark.parametrize("name", ["app.ui", ""])
def test_invalid_plugin_name_reads_cleanly_and_keeps_the_value_error(
    tmp_path: Path, make_gp: MakeGP, name: str
) -> None:
    """Flask: a dotted or empty blueprint name is a ValueError."""
    app = _host()
    gp = make_gp(app)
    src = _plugin(tmp_path, f"""
        plugin = Plugin({name!r}, __name__)
    """)
    with pytest.raises(PluginImportError) as info:
        gp.load_directory("parity", src)
    message = str(info.value)
    assert ".." not in message, message
    assert "parity/__init__.py line 3" in message
    assert "ValueError: 'name' may not" in message
    assert isinstance(info.value.__cause__, ValueError)



# Flask's test_blueprint_prefix_slash, every case but "/foo//" (a prefix with
# "//" is refused on every path in: README, "Mounting"). An empty prefix is the
# site root, as in Flask, when the constructor declares it (an empty prefix
# in the configuration or load_directory means "none given").
_SLASH_CASES = [
    ("", "/", "/"),
    ("/", "", "/"),
    ("/", "/", "/"),
    ("", "/bar", "/bar"),
    ("/", "/bar", "/bar"),
    ("/foo", "", "/foo"),
    ("/foo/", "", "/foo/"),
    ("/foo/", "/bar", "/foo/bar"),
    ("/foo/", "bar", "/foo/bar"),
    ("/foo", "/bar", "/foo/bar"),
    ("/foo/", "//bar", "/foo/bar"),
]


@pytest.mark.parametrize(
    ("prefix", "rule", "url", "where"),
    [
        (*case, where)
        for case in _SLASH_CASES
        for where in ("constructor", "load_directory")
        if case[0] or where == "constructor"
    ],
)
def test_prefix_and_rule_slashes_join_as_in_flask(
    tmp_path: Path, make_gp: MakeGP, prefix: str, rule: str, url: str, where: str
) -> None:
    # A host with no route at "/": host routes win over a root plugin.
    app = _host() if url != "/" else Flask("parity_bare_host")
    gp = make_gp(app)
    declared = f", url_prefix={prefix!r}" if where == "constructor" else ""
    src = _plugin(tmp_path, f"""
        plugin = Plugin("slashy", __name__{declared})

        @plugin.route({rule!r})
        def index():
            return "", 204
    """)
    gp.load_directory("slashy", src, url_prefix=prefix if where == "load_directory" else None)
    assert app.test_client().get(url).status_code == 204


@pytest.mark.parametrize(
    ("prefix", "problem"),
    [
        ("/foo//", "must not contain '//'"),
        ("/a//b", "must not contain '//'"),
        ("foo", "must start with '/'"),
        ("/a b", "no spaces"),
        ("/<path:rest>", "spans segments"),
        ("/<lang>/<lang>", "appears twice"),
        ("/shop<", "not a converter"),
        ("/<nosuch:x>", "not one of the host's"),
    ],
)
@pytest.mark.parametrize("where", ["constructor", "load_directory"])
def test_an_invalid_prefix_is_refused_the_same_way_on_every_path_in(
    tmp_path: Path, make_gp: MakeGP, prefix: str, problem: str, where: str
) -> None:
    from gitplug import MountError

    app = _host()
    gp = make_gp(app)
    declared = f", url_prefix={prefix!r}" if where == "constructor" else ""
    src = _plugin(tmp_path, f"""
        plugin = Plugin("bad", __name__{declared})

        @plugin.route("/x")
        def x():
            return "x"
    """)
    with pytest.raises(MountError) as info:
        gp.load_directory("bad", src, url_prefix=prefix if where == "load_directory" else None)
    message = str(info.value)
    assert message.startswith(f"plugin 'bad': url_prefix {prefix!r} is not a valid URL prefix (")
    assert problem in message and "README" in message and "\n" not in message
    assert gp.runtime.live("bad") is None


# -- static files (Flask: test_templates_and_static, test_default_static_max_age) --


def test_plain_static_url_serves_the_live_release_with_the_host_max_age(tmp_path: Path, make_gp: MakeGP) -> None:
    from werkzeug.http import parse_cache_control_header

    from gitplug.runtime.plugin import STATIC_MAX_AGE

    app = _host()
    app.config["SEND_FILE_MAX_AGE_DEFAULT"] = 7200
    gp = make_gp(app)
    files = {"parity/static/test.txt": "Admin File v1\n", "parity/static/css/test.css": "/* nested file */\n"}
    source = """
        plugin = Plugin("admin", __name__)

        @plugin.route("/")
        def index():
            return url_for("admin.static", filename="test.txt")
    """
    src = _plugin(tmp_path / "v1", source, extra=files)
    release = gp.load_directory("admin", src)
    client = app.test_client()
    with client.get("/admin/static/test.txt") as rv:
        assert rv.status_code == 200 and rv.text.strip() == "Admin File v1"
        assert parse_cache_control_header(rv.headers["Cache-Control"]).max_age == 7200
    with client.get("/admin/static/css/test.css") as rv:
        assert rv.text.strip() == "/* nested file */"
    # url_for still builds the versioned URL, cached for a year.
    versioned = client.get("/admin/").text
    assert versioned == f"/admin/static/{release.release_id[:12]}/test.txt"
    with client.get(versioned) as rv:
        assert rv.text.strip() == "Admin File v1"
        assert parse_cache_control_header(rv.headers["Cache-Control"]).max_age == STATIC_MAX_AGE
    # The plain URL follows the swap.
    files["parity/static/test.txt"] = "Admin File v2\n"
    gp.load_directory("admin", _plugin(tmp_path / "v2", source, extra=files))
    with client.get("/admin/static/test.txt") as rv:
        assert rv.text.strip() == "Admin File v2"
    with client.get("/admin/static/missing.txt") as rv:
        assert rv.status_code == 404


def test_a_plugin_overriding_get_send_file_max_age_wins(tmp_path: Path, make_gp: MakeGP) -> None:
    from werkzeug.http import parse_cache_control_header

    app = _host()
    gp = make_gp(app)
    src = _plugin(tmp_path, """
        class MyPlugin(Plugin):
            def get_send_file_max_age(self, filename):
                return 100

        plugin = MyPlugin("bp", __name__)
    """, extra={"parity/static/index.html": "hi\n"})
    gp.load_directory("bp", src)
    with app.test_client().get("/bp/static/index.html") as rv:
        assert parse_cache_control_header(rv.headers["Cache-Control"]).max_age == 100


# -- templates (Flask: test_templates_list, test_templates_and_static) -------------


def test_host_list_templates_lists_live_plugins_templates(tmp_path: Path, make_gp: MakeGP) -> None:
    from flask import render_template
    from jinja2 import TemplateNotFound

    app = _host()
    gp = make_gp(app)
    source = """
        plugin = Plugin("{name}", __name__)

        @plugin.route("/")
        def index():
            return render_template("{name}/index.html")
    """
    for name in ("admin", "frontend"):
        src = _plugin(tmp_path / name, source.format(name=name), package=name, extra={
            f"{name}/templates/{name}/index.html": f"Hello from the {name}",
            f"{name}/templates/{name}/nested/nested.txt": "I'm nested",
        })
        gp.load_directory(name, src)
    assert sorted(app.jinja_env.list_templates()) == [
        "admin/index.html", "admin/nested/nested.txt", "frontend/index.html", "frontend/nested/nested.txt",
    ]
    assert sorted(app.jinja_env.list_templates(extensions=["html"])) == ["admin/index.html", "frontend/index.html"]
    client = app.test_client()
    assert client.get("/admin/").text == "Hello from the admin"
    assert client.get("/frontend/").text == "Hello from the frontend"
    with app.test_request_context(), pytest.raises(TemplateNotFound) as info:
        render_template("missing.html")
    assert info.value.name == "missing.html"
    gp.stop("frontend")
    assert sorted(app.jinja_env.list_templates()) == ["admin/index.html", "admin/nested/nested.txt"]


# -- app-wide template registrations (Flask: test_template_filter ... test_template_global) --

REGISTRATIONS = """
    plugin = Plugin("bp", __name__)

    @plugin.app_template_filter()
    def my_reverse(s):
        return s[::-1]

    @plugin.app_template_filter("my_reverse_custom_name_3")
    def my_reverse_3(s):
        return s[::-1]

    def added(s):
        return s[::-1] + "|" + current_plugin.name

    plugin.add_app_template_filter(added, "strrev")

    @plugin.app_template_test()
    def is_boolean(value):
        return isinstance(value, bool)

    @plugin.app_template_test(name="my_boolean_custom_name")
    def boolean_3(value):
        return isinstance(value, bool)

    @plugin.app_template_global()
    def get_stuff():
        return 42

    def added_global():
        return "g:" + current_plugin.name

    plugin.add_app_template_global(added_global, "plugin_name")
"""


def test_app_wide_template_registrations_are_the_plugins_own_objects(tmp_path: Path, make_gp: MakeGP) -> None:
    app = _host()
    gp = make_gp(app)
    release = gp.load_directory("bp", _plugin(tmp_path, REGISTRATIONS), url_prefix="/py")
    module = release.plugin.import_name
    import sys

    mod = sys.modules[module]
    env = app.jinja_env
    for kind, name, func in [
        ("filters", "my_reverse", mod.my_reverse),
        ("filters", "my_reverse_custom_name_3", mod.my_reverse_3),
        ("filters", "strrev", mod.added),
        ("tests", "is_boolean", mod.is_boolean),
        ("tests", "my_boolean_custom_name", mod.boolean_3),
        ("globals", "get_stuff", mod.get_stuff),
        ("globals", "plugin_name", mod.added_global),
    ]:
        registry = getattr(env, kind)
        assert name in registry.keys() and name in registry
        assert registry[name] is func, (kind, name)
    assert env.filters["my_reverse"]("abcd") == "dcba"
    assert env.tests["is_boolean"](False)
    del mod, func
    # In a host template, on a host request, and with current_plugin set.
    @app.route("/tpl")
    def tpl() -> str:
        from flask import render_template_string

        return render_template_string(
            "{{ value|my_reverse }} {{ value|strrev }} {{ get_stuff() }} {{ plugin_name() }}"
            " {{ False is is_boolean }} {{ 1 is my_boolean_custom_name }}",
            value="abcd",
        )

    assert app.test_client().get("/tpl").text == "dcba dcba|bp 42 g:bp True False"
    gp.stop("bp")
    assert "my_reverse" not in env.filters and "get_stuff" not in env.globals


def test_a_plugin_may_replace_jinjas_built_ins_but_not_the_hosts_own(tmp_path: Path, make_gp: MakeGP) -> None:
    import jinja2.defaults
    from flask import render_template_string

    app = _host()

    @app.template_filter("title")
    def host_title(s: str) -> str:
        return "HOST:" + s

    gp = make_gp(app)
    src = _plugin(tmp_path, """
        plugin = Plugin("yesno", __name__)

        @plugin.app_template_test("boolean")
        def yes_or_no(value):
            return value in ("yes", "no")

        @plugin.app_template_filter("upper")
        def shout(s):
            return s.upper() + "!"

        @plugin.app_template_filter("title")
        def plugin_title(s):
            return "PLUGIN:" + s

        @plugin.route("/")
        def index():
            return render_template("page.html")
    """, extra={"parity/templates/page.html": "{{ 'yes' is boolean }} {{ 'a'|upper }} {{ 'a'|title }}"})

    @app.route("/tpl")
    def tpl() -> str:
        return render_template_string("{{ 'yes' is boolean }} {{ True is boolean }} {{ 'a'|upper }} {{ 'a'|title }}")

    client = app.test_client()
    assert client.get("/tpl").text == "False True A HOST:a"
    gp.load_directory("yesno", src)
    assert client.get("/tpl").text == "True False A! HOST:a"
    assert client.get("/yesno/").text == "True A! HOST:a"
    assert app.jinja_env.tests["boolean"].__name__ == "yes_or_no"
    assert app.jinja_env.filters["title"] is host_title
    gp.stop("yesno")
    assert client.get("/tpl").text == "False True A HOST:a"
    assert app.jinja_env.tests["boolean"] is jinja2.defaults.DEFAULT_TESTS["boolean"]
    assert app.jinja_env.filters["upper"] is jinja2.defaults.DEFAULT_FILTERS["upper"]


# -- error handlers (Flask: test_blueprint_specific_error_handling, ..._user_error_handling,
#    test_blueprint_app_error_handling) ---------------------------------------------


def _load_many(tmp_path: Path, gp: GitPlug, sources: dict[str, str]) -> None:
    for name, source in sources.items():
        gp.load_directory(name, _plugin(tmp_path / name, source, package=name), url_prefix="/" + name)


def test_plugin_specific_error_handlers(tmp_path: Path, make_gp: MakeGP) -> None:
    app = _host()
    gp = make_gp(app)
    _load_many(tmp_path, gp, {
        "frontend": """
            plugin = Plugin("frontend", __name__)

            @plugin.errorhandler(403)
            def forbidden(e):
                return "frontend says no", 403

            @plugin.route("/no")
            def no():
                abort(403)
        """,
        "backend": """
            plugin = Plugin("backend", __name__)

            @plugin.errorhandler(403)
            def forbidden(e):
                return "backend says no", 403

            @plugin.route("/no")
            def no():
                abort(403)
        """,
        "sideend": """
            plugin = Plugin("sideend", __name__)

            @plugin.route("/no")
            def no():
                abort(403)
        """,
    })

    @app.errorhandler(403)
    def app_forbidden(e: Exception) -> tuple[str, int]:
        return "application itself says no", 403

    client = app.test_client()
    assert client.get("/frontend/no").text == "frontend says no"
    assert client.get("/backend/no").text == "backend says no"
    assert client.get("/sideend/no").text == "application itself says no"


def test_plugin_specific_user_exception_handlers(tmp_path: Path, make_gp: MakeGP) -> None:
    app = _host()
    gp = make_gp(app)
    _load_many(tmp_path, gp, {"blue": """
        class MyDecoratorException(Exception):
            pass

        class MyFunctionException(Exception):
            pass

        plugin = Plugin("blue", __name__)

        @plugin.errorhandler(MyDecoratorException)
        def on_decorator(e):
            assert isinstance(e, MyDecoratorException)
            return "boom"

        def on_function(e):
            assert isinstance(e, MyFunctionException)
            return "bam"

        plugin.register_error_handler(MyFunctionException, on_function)

        @plugin.route("/decorator")
        def decorator():
            raise MyDecoratorException()

        @plugin.route("/function")
        def function():
            raise MyFunctionException()
    """})
    client = app.test_client()
    assert client.get("/blue/decorator").text == "boom"
    assert client.get("/blue/function").text == "bam"


def test_app_errorhandler_of_a_plugin_covers_host_and_other_plugins(tmp_path: Path, make_gp: MakeGP) -> None:
    app = _host()

    @app.route("/forbidden")
    def forbidden() -> str:
        from flask import abort

        abort(403)

    gp = make_gp(app)
    _load_many(tmp_path, gp, {
        "errors": """
            plugin = Plugin("errors", __name__)

            @plugin.app_errorhandler(403)
            def forbidden_handler(e):
                return "you shall not pass", 403
        """,
        "forbidden_bp": """
            plugin = Plugin("forbidden_bp", __name__)

            @plugin.route("/nope")
            def nope():
                abort(403)
        """,
    })
    client = app.test_client()
    assert client.get("/forbidden").text == "you shall not pass"
    assert client.get("/forbidden_bp/nope").text == "you shall not pass"


# -- rules and endpoints ------------------------------------------------------------


def test_route_defaults_and_empty_url_defaults(tmp_path: Path, make_gp: MakeGP) -> None:
    """Flask: test_blueprint_url_defaults (route defaults), test_empty_url_defaults."""
    app = _host()
    gp = make_gp(app)
    _load_many(tmp_path, gp, {"bp": """
        plugin = Plugin("bp", __name__)

        @plugin.route("/", defaults={"page": 1})
        @plugin.route("/page/<int:page>")
        def something(page):
            return str(page)

        @plugin.route("/foo", defaults={"baz": 42})
        def foo(baz):
            return f"foo/{baz:d}"
    """})
    client = app.test_client()
    assert client.get("/bp/").text == "1"
    assert client.get("/bp/page/2").text == "2"
    assert client.get("/bp/foo").text == "foo/42"


def test_custom_endpoints_and_dotted_names_from_the_host(tmp_path: Path, make_gp: MakeGP) -> None:
    """Flask: test_route_decorator_custom_endpoint, test_dotted_names_from_app."""
    app = _host()

    @app.route("/app")
    def app_index() -> str:
        from flask import url_for

        return url_for("bp.index")

    gp = make_gp(app)
    _load_many(tmp_path, gp, {"bp": """
        plugin = Plugin("bp", __name__)

        @plugin.route("/foo")
        def foo():
            return request.endpoint

        @plugin.route("/bar", endpoint="bar")
        def foo_bar():
            return request.endpoint

        @plugin.route("/bar/123", endpoint="123")
        def foo_bar_foo():
            return request.endpoint

        @plugin.route("/bar/foo")
        def bar_foo():
            return request.endpoint

        @plugin.route("/test/")
        def index():
            return url_for("app_index")
    """})
    client = app.test_client()
    assert client.get("/bp/foo").text == "bp.foo"
    assert client.get("/bp/bar").text == "bp.bar"
    assert client.get("/bp/bar/123").text == "bp.123"
    assert client.get("/bp/bar/foo").text == "bp.bar_foo"
    assert client.get("/app").text == "/bp/test/"
    assert client.get("/bp/test/").text == "/app"


@pytest.mark.parametrize("how", [
    'plugin.route("/", endpoint="a.b")(lambda: "")',
    'plugin.add_url_rule("/", endpoint="a.b")',
    'view = lambda: ""\nview.__name__ = "a.b"\nplugin.add_url_rule("/", view_func=view)',
])
def test_dotted_endpoint_is_refused_with_its_value_error(tmp_path: Path, make_gp: MakeGP, how: str) -> None:
    """Flask: test_route_decorator_custom_endpoint_with_dots."""
    app = _host()
    gp = make_gp(app)
    src = _plugin(tmp_path, 'plugin = Plugin("bp", __name__)\n' + how + "\n")
    with pytest.raises(PluginImportError) as info:
        gp.load_directory("bp", src)
    assert isinstance(info.value.__cause__, ValueError)
    assert ".." not in str(info.value)


# -- hooks and context processors ---------------------------------------------------


def test_request_hooks_context_processors_and_app_wide_hooks(tmp_path: Path, make_gp: MakeGP) -> None:
    """Flask: test_request_processing, test_app_request_processing, test_context_processing."""
    app = _host()
    app.config["EVTS"] = []

    @app.route("/page")
    def app_page() -> str:
        from flask import render_template_string

        return render_template_string(
            "{% if notanswer %}{{ notanswer }} is not the answer. {% endif %}"
            "{% if answer %}{{ answer }} is the answer.{% endif %}"
        )

    gp = make_gp(app)
    _load_many(tmp_path, gp, {"answer": """
        from flask import current_app, render_template_string

        plugin = Plugin("answer", __name__)

        def evt(what):
            current_app.config["EVTS"].append(what)

        @plugin.before_request
        def before_bp():
            evt("before")

        @plugin.after_request
        def after_bp(response):
            response.data += b"|after"
            evt("after")
            return response

        @plugin.teardown_request
        def teardown_bp(exc):
            evt("teardown")

        @plugin.before_app_request
        def before_app():
            evt("app-before")

        @plugin.after_app_request
        def after_app(response):
            evt("app-after")
            return response

        @plugin.teardown_app_request
        def teardown_app(exc):
            evt("app-teardown")

        @plugin.app_context_processor
        def not_answer():
            return {"notanswer": 43}

        @plugin.context_processor
        def answer():
            return {"answer": 42}

        @plugin.route("/bp")
        def bp_page():
            return render_template_string(
                "{% if notanswer %}{{ notanswer }} is not the answer. {% endif %}"
                "{% if answer %}{{ answer }} is the answer.{% endif %}"
            )
    """})
    client = app.test_client()
    evts = app.config["EVTS"]
    assert client.get("/answer/bp").text == "43 is not the answer. 42 is the answer.|after"
    assert evts == ["app-before", "before", "after", "app-after", "teardown", "app-teardown"]
    evts.clear()
    assert client.get("/page").text == "43 is not the answer. "
    assert evts == ["app-before", "app-after", "app-teardown"]


def test_app_url_processors_of_a_plugin_serve_host_routes(tmp_path: Path, make_gp: MakeGP) -> None:
    """Flask: test_app_url_processors."""
    from flask import url_for

    app = _host()

    @app.route("/<lang_code>/")
    def index() -> str:
        return url_for("about")

    @app.route("/<lang_code>/about")
    def about() -> str:
        return url_for("index")

    gp = make_gp(app)
    _load_many(tmp_path, gp, {"bp": """
        plugin = Plugin("bp", __name__)

        @plugin.app_url_defaults
        def add_language_code(endpoint, values):
            values.setdefault("lang_code", g.lang_code)

        @plugin.app_url_value_preprocessor
        def pull_lang_code(endpoint, values):
            g.lang_code = values.pop("lang_code")
    """})
    client = app.test_client()
    assert client.get("/de/").text == "/de/about"
    assert client.get("/de/about").text == "/de/"


# -- nesting (Flask: test_nested_blueprint, test_nested_callback_order, test_nesting_url_prefixes) --

NESTED = """
    from flask import Blueprint, render_template_string

    plugin = Plugin("parent", __name__{parent_init})
    child = Blueprint("child", __name__{child_init})
    grandchild = Blueprint("grandchild", __name__)

    @plugin.errorhandler(403)
    def forbidden(e):
        return "Parent no", 403

    @plugin.route("/")
    def parent_index():
        return "Parent yes"

    @plugin.route("/no")
    def parent_no():
        abort(403)

    @child.route("/")
    def child_index():
        return "Child yes"

    @child.route("/no")
    def child_no():
        abort(403)

    @grandchild.errorhandler(403)
    def grandchild_forbidden(e):
        return "Grandchild no", 403

    @grandchild.route("/")
    def grandchild_index():
        return "Grandchild yes"

    @grandchild.route("/no")
    def grandchild_no():
        abort(403)

    for scope, bp in (("parent", plugin), ("child", child)):
        def before(scope=scope):
            g.setdefault("seen", []).append(scope)
        bp.before_request(before)

    @child.context_processor
    def child_ctx():
        return {{"key": "child"}}

    @plugin.context_processor
    def parent_ctx():
        return {{"key": "parent"}}

    @child.route("/a")
    def a():
        return ", ".join(g.seen)

    @child.route("/b")
    def b():
        return render_template_string("{{{{ key }}}}")

    child.register_blueprint(grandchild, url_prefix="/grandchild")
    plugin.register_blueprint(child{child_registration})
"""


def test_nested_blueprints_inside_a_plugin(tmp_path: Path, make_gp: MakeGP) -> None:
    app = _host()

    @app.before_request
    def app_before() -> None:
        from flask import g

        g.setdefault("seen", []).append("app")

    gp = make_gp(app)
    src = _plugin(tmp_path, NESTED.format(parent_init="", child_init="", child_registration=', url_prefix="/child"'))
    gp.load_directory("parent", src)
    client = app.test_client()
    assert client.get("/parent/").text == "Parent yes"
    assert client.get("/parent/child/").text == "Child yes"
    assert client.get("/parent/child/grandchild/").text == "Grandchild yes"
    assert client.get("/parent/no").text == "Parent no"
    assert client.get("/parent/child/no").text == "Parent no"
    assert client.get("/parent/child/grandchild/no").text == "Grandchild no"
    assert client.get("/parent/child/a").text == "app, parent, child"
    assert client.get("/parent/child/b").text == "child"


def test_nested_callback_order_with_two_hooks_per_scope_and_teardowns_in_reverse(
    tmp_path: Path, make_gp: MakeGP
) -> None:
    """Flask: the rest of test_nested_callback_order. Before-request hooks run app,
    parent, child, each scope's in registration order; teardowns run child,
    parent, app, each scope's in reverse (so each pops what its twin pushed);
    the innermost context processor wins."""
    from flask import g

    app = _host()
    torn: list[tuple[str, str]] = []
    for n in (1, 2):
        def app_before(tag: str = f"app_{n}") -> None:
            g.setdefault("seen", []).append(tag)

        def app_teardown(error: BaseException | None = None, tag: str = f"app_{n}") -> None:
            torn.append((tag, g.seen.pop()))

        app.before_request(app_before)
        app.teardown_request(app_teardown)

    @app.context_processor
    def app_ctx() -> dict[str, str]:
        return {"key": "app"}

    gp = make_gp(app)
    src = _plugin(tmp_path, """
        from flask import Blueprint, render_template_string

        plugin = Plugin("parent", __name__)
        child = Blueprint("child", __name__)
        TORN = []

        for scope, bp in (("parent", plugin), ("child", child)):
            for n in (1, 2):
                def before(tag=f"{scope}_{n}"):
                    g.setdefault("seen", []).append(tag)

                def teardown(error=None, tag=f"{scope}_{n}"):
                    TORN.append((tag, g.seen.pop()))

                bp.before_request(before)
                bp.teardown_request(teardown)

        @plugin.context_processor
        def parent_ctx():
            return {"key": "parent"}

        @child.context_processor
        def child_ctx():
            return {"key": "child"}

        @child.route("/a")
        def a():
            return ", ".join(g.seen)

        @child.route("/b")
        def b():
            return render_template_string("{{ key }}")

        @child.route("/torn")
        def torn():
            seen, TORN[:] = repr(TORN), []
            return seen

        plugin.register_blueprint(child)
    """)
    gp.load_directory("parent", src)
    client = app.test_client()
    assert client.get("/parent/a").text == "app_1, app_2, parent_1, parent_2, child_1, child_2"
    assert client.get("/parent/b").text == "child"
    torn.clear()
    client.get("/parent/torn")  # empties the plugin's record; its own teardowns are next
    assert client.get("/parent/torn").text == repr(
        [("child_2", "child_2"), ("child_1", "child_1"), ("parent_2", "parent_2"), ("parent_1", "parent_1")]
    )
    # The host's teardowns ran last on every request, each popping its own tag.
    assert torn == [("app_2", "app_2"), ("app_1", "app_1")] * 2


def test_endpoint_decorator_gives_a_host_rule_its_view(
    tmp_path: Path, make_gp: MakeGP, caplog: pytest.LogCaptureFixture
) -> None:
    """Flask: test_endpoint_decorator. ``Blueprint.endpoint("bar")`` gives the view of
    the app-level endpoint ``bar`` (a host rule without a view), not a URL under
    the prefix; it goes with the plugin. A host endpoint that has a view keeps
    it (the host wins on names, README "Differences from a blueprint"), and two
    plugins giving one endpoint's view are refused."""
    from werkzeug.routing import Rule

    from gitplug import MountError

    app = _host()
    app.url_map.add(Rule("/foo", endpoint="bar"))
    app.add_url_rule("/mine", endpoint="mine", view_func=lambda: "host mine")
    gp = make_gp(app)
    source = """
        plugin = Plugin("{name}", __name__)

        @plugin.endpoint("bar")
        def foobar():
            return request.endpoint + " from " + current_plugin.name

        @plugin.endpoint("mine")
        def take_over():
            return "plugin mine"
    """
    caplog.set_level("WARNING", logger="gitplug")
    gp.load_directory("bp", _plugin(tmp_path, source.format(name="bp"), package="bp"), url_prefix="/bp_prefix")
    assert "app-wide names the host already uses are ignored (the host's win): view of endpoint 'mine'" in caplog.text
    with pytest.raises(MountError) as info:
        gp.load_directory("other", _plugin(tmp_path / "o", source.format(name="other"), package="other"))
    assert "the view of endpoint(s) 'bar', 'mine' (Blueprint.endpoint) is already given by plugin 'bp'" in str(info.value)
    client = app.test_client()
    assert client.get("/foo").text == "bar from bp"
    assert client.get("/bp_prefix/bar").status_code == 404
    assert client.get("/mine").text == "host mine"
    gp.stop("bp")
    assert gp.runtime.wait_idle()
    assert "bar" not in app.view_functions  # the host's rule has no view again


def test_a_host_rule_served_by_a_plugin_view_is_pinned_to_its_release(tmp_path: Path, make_gp: MakeGP) -> None:
    """The view a plugin gives a host endpoint is plugin code: its host requests are pinned, like a plugin's."""
    from werkzeug.routing import Rule

    app = _host()
    app.url_map.add(Rule("/foo", endpoint="bar"))
    gp = make_gp(app)
    source = """
        plugin = Plugin("bp", __name__)

        @plugin.endpoint("bar")
        def foobar():
            return str(request.environ["gitplug.snapshot"].inflight)
    """
    gp.load_directory("bp", _plugin(tmp_path, source, package="bp"), url_prefix="/bp_prefix")
    assert app.test_client().get("/foo").text == "1"
    assert gp.runtime.snapshot.inflight == 0


@pytest.mark.parametrize(
    ("parent_init", "child_init", "parent_registration", "child_registration"),
    [
        ("/parent", "/child", None, None),
        ("/parent", None, None, "/child"),
        (None, None, "/parent", "/child"),
        ("/other", "/something", "/parent", "/child"),
    ],
)
def test_nesting_url_prefixes(
    tmp_path: Path, make_gp: MakeGP, parent_init: str | None, child_init: str | None,
    parent_registration: str | None, child_registration: str | None,
) -> None:
    """The plugin's constructor prefix plays the parent's own; the configuration's its registration."""
    app = _host()
    gp = make_gp(app)
    src = _plugin(tmp_path, NESTED.format(
        parent_init=f", url_prefix={parent_init!r}" if parent_init else "",
        child_init=f", url_prefix={child_init!r}" if child_init else "",
        child_registration=f", url_prefix={child_registration!r}" if child_registration else "",
    ))
    gp.load_directory("parent", src, url_prefix=parent_registration)
    assert app.test_client().get("/parent/child/").text == "Child yes"


# -- subdomains (Flask: test_nesting_subdomains, test_child_and_parent_subdomain) ----

SUBDOMAINS = """
    from flask import Blueprint

    plugin = Plugin("parent", __name__)
    child = Blueprint("child", __name__{child_subdomain})

    @child.route("/child/")
    def index():
        return "child"

    plugin.register_blueprint(child)
"""


def _subdomain_host() -> Flask:
    app = _host()
    app.subdomain_matching = True
    app.config["SERVER_NAME"] = "example.test"
    return app


def test_configured_subdomain_applies_to_the_plugin_and_its_children(tmp_path: Path, make_gp: MakeGP) -> None:
    from gitplug.runtime.loaded import ReleaseSpec

    app = _subdomain_host()
    gp = make_gp(app)
    src = _plugin(tmp_path, SUBDOMAINS.format(child_subdomain=""))
    gp.runtime.swap(ReleaseSpec(name="parent", path=src, release_id="sub-1", url_prefix="/p", subdomain="api"))
    client = app.test_client()
    assert client.get("/p/child/", base_url="http://api.example.test").text == "child"
    assert client.get("/p/child/", base_url="http://example.test").status_code == 404


def test_child_subdomain_nests_under_the_configured_one(tmp_path: Path, make_gp: MakeGP) -> None:
    from gitplug.runtime.loaded import ReleaseSpec

    app = _subdomain_host()
    gp = make_gp(app)
    src = _plugin(tmp_path, SUBDOMAINS.format(child_subdomain=', subdomain="api"'))
    gp.runtime.swap(ReleaseSpec(name="parent", path=src, release_id="sub-2", url_prefix="/p", subdomain="parent"))
    client = app.test_client()
    assert client.get("/p/child/", base_url="http://api.parent.example.test").text == "child"
    assert client.get("/p/child/", base_url="http://parent.example.test").status_code == 404
