"""An ordinary Flask blueprint ports to a gitplug Plugin by changing a few lines (SPEC 2).

One blueprint package is written to disk; a copy differs only where a
blueprint becomes a plugin. The *same* assertions then run against a host
that registers the blueprint natively and against a host that loads the copy
through gitplug: routes, templates, static files, error handlers, ``g``,
``url_for``, ``flash``, the session, URL processors and a nested blueprint.
"""

from __future__ import annotations

import difflib
import re
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from flask import Flask
from flask.testing import FlaskClient
from werkzeug.test import TestResponse

from gitplug import GitPlug
from pluginfactory import write_files

PACKAGE = "portshop"

BLUEPRINT = {
    f"{PACKAGE}/__init__.py": '''
        """A small shop, written as an ordinary Flask blueprint."""
        from flask import abort, flash, g, redirect, render_template, request, session, url_for
        from flask import Blueprint

        from portshop.intl import intl
        from .errors import OutOfStock

        bp = Blueprint("shop", __name__, static_folder="static", template_folder="templates")
        bp.register_blueprint(intl)


        @bp.before_request
        def load_user():
            g.user = request.args.get("user", session.get("user", "anonymous"))
            session["user"] = g.user


        @bp.route("/")
        def index():
            session["visits"] = session.get("visits", 0) + 1
            return render_template("shop/index.html", visits=session["visits"])


        @bp.route("/buy/<int:item>", methods=["POST"])
        def buy(item):
            if item == 13:
                raise OutOfStock(item)
            flash(f"bought {item}")
            return redirect(url_for(".index"))


        @bp.route("/missing")
        def missing():
            abort(404)


        @bp.errorhandler(404)
        def shop_not_found(error):
            return render_template("shop/404.html"), 404


        @bp.errorhandler(OutOfStock)
        def out_of_stock(error):
            return f"out of stock: {error.item}", 409
    ''',
    f"{PACKAGE}/errors.py": """
        class OutOfStock(Exception):
            def __init__(self, item):
                super().__init__(item)
                self.item = item
    """,
    f"{PACKAGE}/intl.py": """
        from flask import Blueprint, g, render_template

        intl = Blueprint("intl", __name__, url_prefix="/<lang>")


        @intl.url_defaults
        def add_lang(endpoint, values):
            if "lang" not in values:
                values["lang"] = g.get("lang", "en")


        @intl.url_value_preprocessor
        def pull_lang(endpoint, values):
            g.lang = values.pop("lang")


        @intl.route("/page")
        def page():
            return render_template("shop/page.html")
    """,
    f"{PACKAGE}/templates/shop/base.html": """
        <title>{% block title %}{% endblock %}</title>
        <link rel="stylesheet" href="{{ url_for('shop.static', filename='shop.css') }}">
        {% for message in get_flashed_messages() %}<p class="flash">{{ message }}</p>
        {% endfor %}{% block body %}{% endblock %}
    """,
    f"{PACKAGE}/templates/shop/index.html": """
        {% extends "shop/base.html" %}{% block title %}Shop{% endblock %}
        {% block body %}user={{ g.user }} visits={{ visits }}
        lang-link={{ url_for('shop.intl.page', lang='de') }} buy={{ url_for('.buy', item=1) }}
        home={{ url_for('home') }}{% endblock %}
    """,
    f"{PACKAGE}/templates/shop/page.html": """
        {% extends "shop/base.html" %}{% block body %}lang={{ g.lang }} user={{ g.user }}
        self={{ url_for('.page') }} other={{ url_for('.page', lang='fr') }} index={{ url_for('shop.index') }}
        {% endblock %}
    """,
    f"{PACKAGE}/templates/shop/404.html": "shop 404 for {{ request.path }}\n",
    f"{PACKAGE}/static/shop.css": "body { color: teal }\n",
}

#: What porting changes: the import and the constructor. Nothing else.
PORT = [
    ("from flask import Blueprint\n", "from gitplug import Plugin\n"),
    ('bp = Blueprint("shop", ', 'bp = Plugin("shop", '),
]


def _write_blueprint(root: Path) -> Path:
    return write_files(root, BLUEPRINT)


def _write_plugin(root: Path) -> Path:
    files = dict(BLUEPRINT)
    init = files[f"{PACKAGE}/__init__.py"]
    for old, new in PORT:
        assert old in init
        init = init.replace(old, new)
    files[f"{PACKAGE}/__init__.py"] = init
    return write_files(root, files)


def _diff_lines(a: Path, b: Path) -> list[str]:
    """Lines added or removed between two trees, over every file."""
    changed: list[str] = []
    names = sorted({p.relative_to(a) for p in a.rglob("*") if p.is_file()} | {p.relative_to(b) for p in b.rglob("*") if p.is_file()})
    for name in names:
        left = (a / name).read_text().splitlines() if (a / name).is_file() else []
        right = (b / name).read_text().splitlines() if (b / name).is_file() else []
        for line in difflib.unified_diff(left, right, lineterm="", n=0):
            if line[:1] in "+-" and not line.startswith(("+++", "---")):
                changed.append(f"{name}: {line}")
    return changed


def _host() -> Flask:
    app = Flask("port_host")
    app.config.update(SECRET_KEY="port-secret")

    @app.route("/")
    def home() -> str:
        return "home"

    return app


def check_shop(client: FlaskClient) -> str:
    """The blueprint's behaviour, as a user sees it. Returns the stylesheet URL."""

    def call(method: str, path: str) -> TestResponse:
        return client.open(path, method=method, buffered=True)

    def text(response: TestResponse) -> str:
        return " ".join(response.get_data(as_text=True).split())

    response = call("GET", "/shop/?user=ann")
    assert response.status_code == 200
    body = text(response)
    assert "<title>Shop</title>" in body
    assert "user=ann visits=1" in body
    assert "lang-link=/shop/de/page buy=/shop/buy/1 home=/" in body
    assert "flash" not in body
    match = re.search(r'href="([^"]+)"', body)
    assert match, body
    css_url = match.group(1)
    css = call("GET", css_url)
    assert (css.status_code, css.get_data(as_text=True)) == (200, "body { color: teal }\n")
    assert css.mimetype == "text/css"

    # The session carries the user and counts visits.
    assert "user=ann visits=2" in text(call("GET", "/shop/"))

    # flash + redirect + get_flashed_messages, shown exactly once.
    response = call("POST", "/shop/buy/5")
    assert response.status_code == 302 and response.headers["Location"] == "/shop/"
    assert '<p class="flash">bought 5</p>' in text(call("GET", "/shop/"))
    assert "flash" not in text(call("GET", "/shop/"))

    # Blueprint error handlers: a custom exception and abort(404) in a view.
    response = call("POST", "/shop/buy/13")
    assert (response.status_code, text(response)) == (409, "out of stock: 13")
    response = call("GET", "/shop/missing")
    assert (response.status_code, text(response)) == (404, "shop 404 for /shop/missing")
    # A URL that matches no rule is the application's 404, as for any blueprint.
    response = call("GET", "/shop/nope")
    assert response.status_code == 404 and "Not Found" in text(response)
    response = call("GET", "/shop/buy/5")
    assert response.status_code == 405

    # Nested blueprint with url_value_preprocessor / url_defaults for <lang>;
    # the parent's before_request ran for it too.
    response = call("GET", "/shop/de/page")
    assert response.status_code == 200
    assert text(response).endswith("lang=de user=ann self=/shop/de/page other=/shop/fr/page index=/shop/")
    response = call("GET", "/shop/fr/page")
    assert "lang=fr user=ann self=/shop/fr/page" in text(response)
    assert call("GET", "/").get_data(as_text=True) == "home"
    return css_url


@pytest.fixture
def clean_imports() -> Iterator[None]:
    saved = list(sys.path)
    yield
    sys.path[:] = saved
    for name in [n for n in sys.modules if n == PACKAGE or n.startswith(PACKAGE + ".")]:
        del sys.modules[name]


def test_same_assertions_pass_for_blueprint_and_plugin(tmp_path: Path, clean_imports: None) -> None:
    native_dir = _write_blueprint(tmp_path / "native")
    plugin_dir = _write_plugin(tmp_path / "plugin")

    changed = _diff_lines(native_dir, plugin_dir)
    assert len(changed) <= 4, "porting took more than two changed lines:\n" + "\n".join(changed)
    assert len(changed) == 4, changed

    # 1. The blueprint, registered natively.
    sys.path.insert(0, str(native_dir))
    import portshop  # type: ignore[import-not-found]

    native = _host()
    native.register_blueprint(portshop.bp, url_prefix="/shop")
    native_css = check_shop(native.test_client())
    assert native_css == "/shop/static/shop.css"

    # 2. The plugin, loaded by gitplug next to nothing else.
    hosted = _host()
    gp = GitPlug(hosted)
    try:
        release = gp.load_directory("shop", plugin_dir, url_prefix="/shop", entry=f"{PACKAGE}:bp")
        plugin_css = check_shop(hosted.test_client())
        # The one visible difference: the static URL carries the release id.
        assert plugin_css == f"/shop/static/{release.release_id[:12]}/shop.css"
        # The plugin never imported the native package, nor the other way round.
        assert sys.modules[PACKAGE] is portshop
        assert release.namespace.mangled != PACKAGE
    finally:
        gp.shutdown()
