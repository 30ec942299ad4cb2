"""Shared fixtures: host apps, real WSGI servers on 127.0.0.1."""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from flask import Flask
from werkzeug.serving import make_server

from gitplug import GitPlug

TESTS_DIR = Path(__file__).resolve().parent
if str(TESTS_DIR) not in sys.path:
    sys.path.insert(0, str(TESTS_DIR))


@contextmanager
def serve_wsgi(app: object, *, threaded: bool = True) -> Iterator[str]:
    """Serve ``app`` with Werkzeug's threaded server on 127.0.0.1; yield its base URL."""
    server = make_server("127.0.0.1", 0, app, threaded=threaded)  # type: ignore[arg-type]
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@pytest.fixture
def host_app() -> Flask:
    """A host application with a route, a template, a 404 handler and a hook."""
    app = Flask("host_app", root_path=str(TESTS_DIR / "host_app"))
    app.config.update(TESTING=True, SECRET_KEY="test-secret")

    @app.route("/")
    def home() -> str:
        return "host home"

    return app


@pytest.fixture
def make_gp() -> Iterator[Callable[[Flask], GitPlug]]:
    """``make_gp(app)`` installs gitplug; every instance is shut down after the test.

    Shutting down stops the runtime's reaper thread and removes the
    directory snapshots ``load_directory`` made.
    """
    made: list[GitPlug] = []

    def make(app: Flask) -> GitPlug:
        gp = GitPlug(app)
        made.append(gp)
        return gp

    yield make
    for gp in made:
        gp.shutdown()


@pytest.fixture
def pg_url() -> Iterator[str]:
    """The URL of a fresh, empty PostgreSQL database, dropped after the test.

    Skips (fails under ``CI=true``) when no server answers: see ``tests/pgserver.py``.
    """
    from pgserver import fresh_database

    with fresh_database() as url:
        yield url
