"""Prefixes with converters and the root plugin (README, "Writing a plugin": mounting).

A plugin's ``url_prefix`` may hold converters (``/<lang_code>/shop``, the
URL-processor pattern of Flask's docs) and one plugin per host may take the
site root. Each case runs a real plugin loaded into a real host, through
``load_directory`` or a deploy from a real git repository.
"""

from __future__ import annotations

import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from flask import Flask
from werkzeug.routing import BaseConverter

from gitplug import ConfigError, GitPlug, MountError
from gitplug.config import config_from_mapping
from gitrepo import GitRepo
from pluginfactory import write_files

MakeGP = Callable[[Flask], GitPlug]

HEAD = (
    "from flask import abort, g, render_template_string, request, url_for\n"
    "from gitplug import Plugin, current_plugin\n"
)


def _host() -> Flask:
    app = Flask("prefix_host")
    app.config.update(TESTING=True, SECRET_KEY="prefixes")

    @app.route("/about")
    def about() -> str:
        return "host about"

    return app


def _plugin(root: Path, package: str, source: str) -> Path:
    return write_files(root / package, {f"{package}/__init__.py": HEAD + textwrap.dedent(source).lstrip("\n")})


LANG_SHOP = textwrap.dedent("""
    plugin = Plugin("shop", __name__, url_prefix="/<lang_code>/shop")

    @plugin.url_defaults
    def add_language(endpoint, values):
        if "lang_code" not in values:
            values["lang_code"] = g.lang_code

    @plugin.url_value_preprocessor
    def pull_language(endpoint, values):
        g.lang_code = values.pop("lang_code")

    @plugin.route("/")
    def index():
        return f"shop in {g.lang_code}: " + url_for(".item", item=3)

    @plugin.route("/item/<int:item>")
    def item(item):
        return f"item {item} in {g.lang_code}"
""")


# -- converters in the prefix ------------------------------------------------------


def test_the_url_processor_pattern_of_flasks_docs_works_with_a_converter_prefix(
    tmp_path: Path, make_gp: MakeGP
) -> None:
    app = _host()
    gp = make_gp(app)
    release = gp.load_directory("shop", _plugin(tmp_path, "langshop", LANG_SHOP))
    assert release.prefix == "/<lang_code>/shop"
    client = app.test_client()
    assert client.get("/de/shop/").text == "shop in de: /de/shop/item/3"
    assert client.get("/fr/shop/item/7").text == "item 7 in fr"
    assert client.get("/de/shop").status_code == 308  # the rule is "/": Flask's redirect
    # Paths the prefix does not own stay the host's.
    assert client.get("/about").text == "host about"
    assert client.get("/de/shopping").status_code == 404
    assert client.get("/de").status_code == 404
    # A host view builds the plugin's URLs with the value given.
    with app.test_request_context("/about"):
        from flask import url_for

        assert url_for("shop.item", lang_code="en", item=1) == "/en/shop/item/1"


@pytest.mark.parametrize("where", ["constructor", "load_directory"])
def test_a_typed_converter_owns_only_the_segments_it_matches(
    tmp_path: Path, make_gp: MakeGP, where: str
) -> None:
    app = _host()
    gp = make_gp(app)
    declared = ', url_prefix="/<int:year>/archive"' if where == "constructor" else ""
    src = _plugin(tmp_path, "archive", f"""
        plugin = Plugin("archive", __name__{declared})

        @plugin.url_value_preprocessor
        def pull_year(endpoint, values):
            g.year = values.pop("year")

        @plugin.route("/")
        def index():
            return f"archive {{g.year + 1}}"
    """)
    gp.load_directory("archive", src, url_prefix=None if where == "constructor" else "/<int:year>/archive")
    client = app.test_client()
    assert client.get("/2024/archive/").text == "archive 2025"
    assert client.get("/next/archive/").status_code == 404


def test_a_converter_the_host_registers_can_be_used_and_an_unknown_one_is_refused(
    tmp_path: Path, make_gp: MakeGP
) -> None:
    class LanguageConverter(BaseConverter):
        regex = "[a-z]{2}"

    app = _host()
    app.url_map.converters["lang"] = LanguageConverter
    gp = make_gp(app)
    src = _plugin(tmp_path, "manual", """
        plugin = Plugin("docs", __name__)

        @plugin.route("/")
        def index(code):
            return "docs " + code
    """)
    gp.load_directory("docs", src, url_prefix="/<lang:code>/docs")
    client = app.test_client()
    assert client.get("/pt/docs/").text == "docs pt"
    assert client.get("/por/docs/").status_code == 404
    with pytest.raises(MountError) as info:
        gp.load_directory("other", _plugin(tmp_path / "o", "other", 'plugin = Plugin("other", __name__)\n'),
                          url_prefix="/<region:r>/other")
    message = str(info.value)
    assert message.startswith("plugin 'other': url_prefix '/<region:r>/other' is not a valid URL prefix (")
    assert "'region'" in message and "lang" in message and "README" in message


def test_prefixes_that_could_match_the_same_path_clash_and_the_others_coexist(
    tmp_path: Path, make_gp: MakeGP
) -> None:
    app = _host()
    gp = make_gp(app)
    gp.load_directory("shop", _plugin(tmp_path, "langshop", LANG_SHOP))
    blog = _plugin(tmp_path, "blog", """
        plugin = Plugin("blog", __name__)

        @plugin.route("/")
        def index(**values):
            return "blog " + request.path
    """)
    # /de/shop/... lies under both: refused, the live plugin unchanged.
    for prefix in ("/de", "/de/shop", "/<country>/<x>"):
        with pytest.raises(MountError) as info:
            gp.load_directory("blog", blog, url_prefix=prefix)
        assert "overlaps plugin 'shop' at '/<lang_code>/shop'" in str(info.value)
        assert gp.runtime.live("blog") is None
    # Another last segment, or a converter that cannot match 'de', 'fr', ...: no clash.
    gp.load_directory("blog", blog, url_prefix="/<lang_code>/blog")
    gp.load_directory("news", _plugin(tmp_path, "news", """
        plugin = Plugin("news", __name__)

        @plugin.route("/")
        def index(n):
            return f"news {n}"
    """), url_prefix="/news/<int:n>")
    client = app.test_client()
    assert client.get("/de/shop/").text.startswith("shop in de")
    assert client.get("/it/blog/").text == "blog /it/blog/"
    assert client.get("/news/42/").text == "news 42"


def test_a_host_route_under_a_converter_prefix_keeps_answering(tmp_path: Path, make_gp: MakeGP) -> None:
    app = _host()

    @app.route("/de/shop/sale")
    def sale() -> str:
        return "host sale"

    gp = make_gp(app)
    gp.load_directory("shop", _plugin(tmp_path, "langshop", LANG_SHOP))
    # Added after the plugin was mounted (an extension registering a route at startup).
    app.add_url_rule("/fr/shop/item/1", endpoint="added_later", view_func=lambda: "host item")
    client = app.test_client()
    assert client.get("/de/shop/sale").text == "host sale"
    assert client.get("/en/shop/sale").status_code == 404  # the plugin's (it has no such rule)
    assert client.get("/fr/shop/item/1").text == "host item"
    assert client.get("/fr/shop/item/2").text == "item 2 in fr"


def test_a_converter_prefix_never_receives_gitplugs_own_urls(tmp_path: Path) -> None:
    app = _host()
    app.config["GITPLUG"] = {"data_dir": str(tmp_path / "data"), "plugins": {}}
    gp = GitPlug(app)
    try:
        src = _plugin(tmp_path, "langshop", LANG_SHOP)
        gp.load_directory("shop", src, url_prefix="/<lang_code>")
        client = app.test_client()
        assert client.get("/de/").text == "shop in de: /de/item/3"
        # The status page cookie's path: even a URL no route of gitplug has is not the plugin's.
        for path in ("/_gitplug/", "/_gitplug/item/3"):
            assert "item" not in client.get(path).text, path
        assert client.get("/_gitplugs/item/3").text == "item 3 in _gitplugs"
        # A literal prefix inside api_prefix is refused outright.
        with pytest.raises(MountError) as info:
            gp.load_directory("shop", src, url_prefix="/_gitplug/shop")
        assert "overlaps '/_gitplug', gitplug's own api_prefix" in str(info.value)
        assert gp.runtime.live("shop").prefix == "/<lang_code>"  # type: ignore[union-attr]
        with pytest.raises(MountError) as info:
            gp.load_directory("shop", src, url_prefix="/_gitplug/<lang_code>")  # could own nothing
        assert "overlaps '/_gitplug', gitplug's own api_prefix" in str(info.value)
        gp.load_directory("shop", src, url_prefix="/<any(de,fr):lang_code>")
        assert client.get("/it/").status_code == 404
    finally:
        gp.shutdown()


def test_the_configuration_takes_converter_prefixes_and_refuses_their_clashes(tmp_path: Path) -> None:
    def config(plugins: dict[str, object], **top: object) -> object:
        return config_from_mapping({"data_dir": str(tmp_path / "d"), "plugins": plugins, **top}, base_dir=tmp_path)

    ok = config({"shop": {"repo": "/r", "url_prefix": "/<lang_code>/shop"},
                 "blog": {"repo": "/r", "url_prefix": "/<lang_code>/blog"},
                 "news": {"repo": "/r", "url_prefix": "/news/<int:n>"},
                 "home": {"repo": "/r", "url_prefix": "/"}})
    assert ok.plugins["shop"].url_prefix == "/<lang_code>/shop"  # type: ignore[attr-defined]
    with pytest.raises(ConfigError) as info:
        config({"shop": {"repo": "/r", "url_prefix": "/<lang_code>/shop"},
                "de": {"repo": "/r", "url_prefix": "/de"}})
    assert "url_prefix '/de' of plugin 'de' could match the same URLs as url_prefix '/<lang_code>/shop'" in str(info.value)
    with pytest.raises(ConfigError) as info:
        config({"shop": {"repo": "/r", "url_prefix": "/<lang_code>"},
                "news": {"repo": "/r", "url_prefix": "/news/<int:n>"}})
    assert "could match the same URLs as" in str(info.value)
    with pytest.raises(ConfigError) as info:
        config({"shop": {"repo": "/r", "url_prefix": "/_gitplug/<lang_code>"}})
    assert "clashes with api_prefix '/_gitplug'" in str(info.value)
    with pytest.raises(ConfigError) as info:
        config({"a": {"repo": "/r", "url_prefix": "/"}, "b": {"repo": "/r", "url_prefix": "/"}})
    assert "url_prefix '/' of plugin 'b' is the same as url_prefix '/' of plugin 'a'" in str(info.value)


# -- the root plugin ------------------------------------------------------------


BLOG_AT_ROOT = textwrap.dedent("""
    plugin = Plugin("blog", __name__)

    @plugin.route("/")
    def index():
        return "blog index " + url_for("blog.create")

    @plugin.route("/create", methods=["GET", "POST"])
    def create():
        return "create " + request.method

    @plugin.route("/<int:post>/update")
    def update(post):
        return f"update {post}"
""")


@pytest.mark.parametrize("where", ["constructor", "load_directory"])
def test_a_root_plugin_serves_what_the_host_and_the_other_plugins_do_not(
    tmp_path: Path, make_gp: MakeGP, where: str
) -> None:
    app = _host()
    gp = make_gp(app)
    source = BLOG_AT_ROOT.replace('__name__)', '__name__, url_prefix="/")') if where == "constructor" else BLOG_AT_ROOT
    release = gp.load_directory("blog", _plugin(tmp_path, "blog", source),
                                url_prefix="/" if where == "load_directory" else None)
    assert release.prefix == "/"
    gp.load_directory("shop", _plugin(tmp_path, "langshop", LANG_SHOP), url_prefix="/shop")
    client = app.test_client()
    assert client.get("/").text == "blog index /create"
    assert client.post("/create").text == "create POST"
    assert client.get("/7/update").text == "update 7"
    assert client.get("/about").text == "host about"  # host routes win
    assert client.post("/about").status_code == 405  # the host's answer
    assert client.get("/static/x.css").status_code == 404  # the host's static rule
    # /shop is another plugin's: its answers, never the root's.
    gp.runtime.stop("shop")
    assert client.get("/shop/").status_code == 404


def test_a_host_route_added_later_wins_over_the_root_plugin(tmp_path: Path, make_gp: MakeGP) -> None:
    app = _host()
    gp = make_gp(app)
    gp.load_directory("blog", _plugin(tmp_path, "blog", BLOG_AT_ROOT), url_prefix="/")
    with app.test_request_context("/create"):
        assert gp.runtime.snapshot.release_for_path("/create") is gp.live_release("blog")
    app.add_url_rule("/create", endpoint="host_create", view_func=lambda: "host create")
    for i in range(50):  # a host adding its routes after gitplug restored a root plugin
        app.add_url_rule(f"/later/{i}", endpoint=f"later{i}", view_func=lambda: "host later")
    # Every rule is under the root: its private map is built once, on first use,
    # not once per rule added (which made startup quadratic in the host's routes).
    assert "/" not in gp.runtime._claims
    client = app.test_client()
    assert client.get("/create").text == "host create"
    assert client.get("/later/49").text == "host later"
    rules, claims = gp.runtime._claims["/"]
    assert client.get("/later/3").text == "host later"
    assert gp.runtime._claims["/"][1] is claims  # reused while the host adds nothing
    assert client.get("/").text == "blog index /create"


def test_one_root_plugin_per_host(tmp_path: Path, make_gp: MakeGP) -> None:
    app = _host()
    gp = make_gp(app)
    gp.load_directory("blog", _plugin(tmp_path, "blog", BLOG_AT_ROOT), url_prefix="/")
    wiki = _plugin(tmp_path, "wiki", 'plugin = Plugin("wiki", __name__)\n')
    with pytest.raises(MountError) as info:
        gp.load_directory("wiki", wiki, url_prefix="/")
    assert str(info.value).startswith(
        "plugin 'wiki': url_prefix '/' (the site root) is already taken by plugin 'blog'"
    )
    assert gp.runtime.live("wiki") is None
    # A swap of the root plugin itself is no clash.
    gp.load_directory("blog", _plugin(tmp_path / "v2", "blog", BLOG_AT_ROOT.replace("blog index", "blog v2")),
                      url_prefix="/")
    assert app.test_client().get("/").text == "blog v2 /create"


def test_the_root_plugin_never_receives_gitplugs_own_urls(tmp_path: Path) -> None:
    app = _host()
    app.config["GITPLUG"] = {"data_dir": str(tmp_path / "data"), "plugins": {}}
    gp = GitPlug(app)
    try:
        source = BLOG_AT_ROOT + textwrap.dedent("""
            @plugin.route("/<path:anything>")
            def catch_all(anything):
                return "blog caught " + anything
        """)
        gp.load_directory("blog", _plugin(tmp_path, "blog", source), url_prefix="/")
        client = app.test_client()
        assert client.get("/elsewhere/x").text == "blog caught elsewhere/x"
        # The status page cookie's path: a URL no route of gitplug has is still not the plugin's.
        for path in ("/_gitplug/nothing-here", "/_gitplug"):
            response = client.get(path)
            assert "blog" not in response.text, path
        assert client.get("/_gitplugs").text == "blog caught _gitplugs"
    finally:
        gp.shutdown()


@pytest.fixture
def deployed_host(tmp_path: Path) -> Iterator[tuple[Flask, GitPlug]]:
    repos = {}
    for name, package, source in (("blog", "blog", BLOG_AT_ROOT), ("shop", "langshop", LANG_SHOP)):
        repo = repos[name] = GitRepo(tmp_path / f"{name}repo")
        repo.write(f"{package}/__init__.py", HEAD + textwrap.dedent(source))
        repo.commit(name)
    app = _host()
    app.config["GITPLUG"] = {
        "data_dir": str(tmp_path / "data"),
        "plugins": {
            "blog": {"repo": repos["blog"].url, "test": False, "url_prefix": "/"},
            "shop": {"repo": repos["shop"].url, "test": False, "url_prefix": "/<lang_code>/shop"},
        },
    }
    gp = GitPlug(app)
    try:
        yield app, gp
    finally:
        gp.shutdown()


def test_a_root_plugin_and_a_converter_prefix_deploy_from_git(deployed_host: tuple[Flask, GitPlug]) -> None:
    app, gp = deployed_host
    for name in ("blog", "shop"):
        record = gp.deploy(name)
        assert record is not None and record.result == "live", record
    client = app.test_client()
    assert client.get("/").text == "blog index /create"
    assert client.get("/7/update").text == "update 7"
    # The converter prefix's paths are never the root's.
    assert client.get("/de/shop/").text == "shop in de: /de/shop/item/3"
    assert client.get("/de/shop/create").status_code == 404
    assert client.get("/about").text == "host about"
    prefixes = {entry["name"]: entry["url_prefix"] for entry in gp.status()["plugins"]}
    assert prefixes == {"blog": "/", "shop": "/<lang_code>/shop"}


def test_a_flaskr_like_app_keeps_its_blog_at_the_root_across_a_swap(tmp_path: Path, make_gp: MakeGP) -> None:
    """Flask's tutorial app as a user would port it: ``auth`` at ``/auth``, the blog at
    ``/``; the session and flashed messages survive a swap of the root plugin."""
    app = Flask("flaskr_host")
    app.config.update(TESTING=True, SECRET_KEY="flaskr")
    gp = make_gp(app)
    gp.load_directory("auth", _plugin(tmp_path, "auth", """
        from flask import flash, redirect, session

        plugin = Plugin("auth", __name__, url_prefix="/auth")

        @plugin.route("/login", methods=["POST"])
        def login():
            session["user"] = request.form["username"]
            flash("welcome " + session["user"])
            return redirect(url_for("blog.index"))
    """))
    blog = """
        from flask import get_flashed_messages, session

        plugin = Plugin("blog", __name__, url_prefix="/")

        @plugin.route("/")
        def index():
            flashed = "; ".join(get_flashed_messages())
            return f"{VERSION} {session.get('user', 'anonymous')} [{flashed}]"
    """
    gp.load_directory("blog", _plugin(tmp_path / "v1", "blog", 'VERSION = "v1"\n' + textwrap.dedent(blog)))
    client = app.test_client()
    response = client.post("/auth/login", data={"username": "ada"})
    assert response.status_code == 302 and response.headers["Location"] == "/"
    gp.load_directory("blog", _plugin(tmp_path / "v2", "blog", 'VERSION = "v2"\n' + textwrap.dedent(blog)))
    assert client.get("/").text == "v2 ada [welcome ada]"
    assert client.get("/").text == "v2 ada []"
    assert client.get("/auth/nothing").status_code == 404  # the auth plugin's, not the root's
