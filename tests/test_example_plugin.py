"""The example plugin repository (SPEC 8): its own tests pass, and it runs in a host."""

from __future__ import annotations

import http.cookiejar
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from flask import Flask, render_template, render_template_string
from werkzeug.serving import make_server

from gitplug import GitPlug
from gitplug.testing import GitplugTestClient, unmount

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "plugins_repo_example"

_COPY_IGNORE = shutil.ignore_patterns("__pycache__", "*.pyc", ".pytest_cache", ".benchmarks")


def copy_example(dest: Path) -> Path:
    """A copy of the example repository, as the demo and a release would hold it."""
    shutil.copytree(EXAMPLE, dest, ignore=_COPY_IGNORE)
    return dest


def test_example_repository_layout() -> None:
    package = EXAMPLE / "hello"
    modules = {p.name for p in package.glob("*.py")}
    assert {"__init__.py", "views.py", "api.py", "greetings.py", "filters.py", "report.py"} <= modules
    for path in ["templates/base.html", "templates/index.html", "static/hello.css", "static/hello.js"]:
        assert (package / path).is_file(), path
    for path in ["README.md", ".gitignore", "tests/conftest.py", "tests/test_hello.py"]:
        assert (EXAMPLE / path).is_file(), path


def test_example_plugins_own_tests_pass(tmp_path: Path) -> None:
    # Run in a copy so the source tree gets no caches; the command and the
    # working directory are the test gate's.
    repo = copy_example(tmp_path / "hello")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    env.pop("GITPLUG_PLUGIN_DIR", None)
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q"],
        cwd=repo,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    summary = proc.stdout.strip().splitlines()[-1]
    assert re.fullmatch(r"\d{2,} passed in [\d.]+s", summary), proc.stdout


# -- the example mounted in a host application ------------------------------------


@pytest.fixture
def host(tmp_path: Path) -> Iterator[tuple[Flask, GitPlug]]:
    """A host app with its own index.html, route and template, and hello mounted."""
    templates = tmp_path / "host_templates"
    templates.mkdir()
    (templates / "index.html").write_text(
        "HOST INDEX{% for m in get_flashed_messages() %} <p>{{ m }}</p>{% endfor %}"
    )
    app = Flask("example_host", root_path=str(tmp_path), template_folder="host_templates")
    app.secret_key = "test"
    app.test_client_class = GitplugTestClient

    @app.get("/")
    def home() -> str:
        return render_template("index.html")

    @app.get("/uses-plugin-filter")
    def uses_filter() -> str:
        return render_template_string("{{ 90 | hello_duration }}")

    gitplug = GitPlug(app)
    gitplug.load_directory("hello", EXAMPLE, config={"GREETING": "Howdy"})
    yield app, gitplug
    unmount(gitplug)


def test_pages_render_next_to_the_hosts(host: tuple[Flask, GitPlug]) -> None:
    app, gitplug = host
    client = app.test_client()
    assert client.get("/").get_data(as_text=True) == "HOST INDEX"
    response = client.get("/hello/")
    assert response.status_code == 200
    html = response.get_data(as_text=True)
    assert "<h1>Howdy, world!</h1>" in html  # the plugin's own index.html, its config
    release = gitplug.live_release("hello")
    assert release is not None
    assert response.headers["X-Hello-Release"] == release.release_id
    assert f'title="{release.release_id}">{release.release_id[:12]}</code>' in html
    report = client.get("/hello/report")
    assert report.status_code == 200
    assert "<dt>Greetings</dt><dd>0</dd>" in report.get_data(as_text=True)
    assert client.get("/hello/api/release").get_json()["version"] == "1.0.0"


def test_static_files_are_served_under_a_versioned_url(host: tuple[Flask, GitPlug]) -> None:
    app, gitplug = host
    client = app.test_client()
    release = gitplug.live_release("hello")
    assert release is not None
    html = client.get("/hello/").get_data(as_text=True)
    css_url = re.search(r'<link rel="stylesheet" href="([^"]+)">', html).group(1)
    assert css_url == f"/hello/static/{release.release_id[:12]}/hello.css"
    css = client.get(css_url)
    assert css.status_code == 200
    assert css.mimetype == "text/css"
    assert css.get_data() == (EXAMPLE / "hello" / "static" / "hello.css").read_bytes()
    assert css.cache_control.max_age == 365 * 24 * 3600
    assert client.get("/hello/static/000000000000/hello.css").status_code == 404


def test_flash_and_session_are_the_hosts(host: tuple[Flask, GitPlug]) -> None:
    app, _ = host
    client = app.test_client()
    response = client.post("/hello/greet", data={"name": "Ada"})
    assert response.status_code == 302
    # The plugin's flash is shown by the host's own page: one session, one flash queue.
    assert client.get("/").get_data(as_text=True) == "HOST INDEX <p>Howdy, Ada!</p>"
    html = client.post("/hello/greet", data={"name": "Grace"}, follow_redirects=True).get_data(
        as_text=True
    )
    assert 'class="flash flash-success">Howdy, Grace!</li>' in html
    assert "<strong>2</strong> greetings" in html
    assert "flash-success" not in client.get("/hello/").get_data(as_text=True)


def test_session_survives_a_swap_and_release_state_does_not(
    host: tuple[Flask, GitPlug], tmp_path: Path
) -> None:
    app, gitplug = host
    client = app.test_client()
    old = gitplug.live_release("hello")
    assert old is not None
    client.post("/hello/greet", data={"name": "Ada"})
    repo = copy_example(tmp_path / "edited")
    init = repo / "hello" / "__init__.py"
    init.write_text(init.read_text().replace('__version__ = "1.0.0"', '__version__ = "1.1.0"'))
    new = gitplug.load_directory("hello", repo, config={"GREETING": "Howdy"})
    assert new.release_id != old.release_id
    html = client.get("/hello/").get_data(as_text=True)
    assert "hello 1.1.0" in html
    assert "<strong>1</strong> greeting</dd>" in html  # this browser's count, from the session
    assert "<strong>0</strong> greetings" in html  # the new release's own count
    assert client.get(f"/hello/static/{old.release_id[:12]}/hello.css").status_code == 404
    css = client.get(f"/hello/static/{new.release_id[:12]}/hello.css")
    assert css.status_code == 200
    assert css.get_data() == (repo / "hello" / "static" / "hello.css").read_bytes()


def test_app_wide_filter_lives_with_the_release(host: tuple[Flask, GitPlug]) -> None:
    app, gitplug = host
    client = app.test_client()
    assert client.get("/uses-plugin-filter").get_data(as_text=True) == "1 min 30 s"
    gitplug.stop("hello")
    assert "hello_duration" not in app.jinja_env.filters
    assert client.get("/hello/").status_code == 404
    assert client.get("/").get_data(as_text=True) == "HOST INDEX"


def test_served_over_real_http(host: tuple[Flask, GitPlug]) -> None:
    app, gitplug = host
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{server.server_port}"
    opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar()))
    try:
        with opener.open(f"{base}/hello/greet", data=b"name=Ada", timeout=5) as response:
            html = response.read().decode()  # the redirect was followed, with the cookie
        assert 'class="flash flash-success">Howdy, Ada!</li>' in html
        css_url = re.search(r'<link rel="stylesheet" href="([^"]+)">', html).group(1)
        with opener.open(base + css_url, timeout=5) as response:
            # Read the whole body: when a client resets the connection, Werkzeug's
            # dev server skips the response's close() and the request stays in flight.
            assert b"--accent" in response.read()
            assert response.headers["Content-Type"].startswith("text/css")
            assert "max-age=31536000" in response.headers["Cache-Control"]
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
    # The server closed every response: nothing keeps the release pinned. A
    # handler thread may still be closing the last one after the client read it.
    deadline = time.monotonic() + 5
    while gitplug.runtime.snapshot.inflight and time.monotonic() < deadline:
        time.sleep(0.01)
    assert gitplug.runtime.snapshot.inflight == 0
