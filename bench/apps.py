"""WSGI applications the bench runs under gunicorn (imported in the workers).

``bench.apps:gitplug_host()``
    gitplug's own standalone host (:func:`gitplug.host.create_host_app`) for
    ``$GITPLUG_CONFIG``, exactly what ``gitplug.wsgi:app`` serves, plus two
    probes: every response carries ``X-Bench-Worker: <pid>``, and every
    ``plugin_loaded`` signal (a release going live in this worker) appends
    ``{"t": <unix time>, "pid": ..., "event": "loaded", "commit": ...}`` to
    ``$GITPLUG_BENCH_EVENTS``. The convergence figure reads those lines.

``bench.apps:restart_host()``
    The "just restart gunicorn" baseline: a Flask app that loads the plugin
    in ``$GITPLUG_BENCH_PLUGIN_DIR`` once, when the worker imports it
    (``GitPlug.load_directory``), and appends an ``"event": "ready"`` line.
    New code is served only by new workers, after ``kill -HUP``.
"""

from __future__ import annotations

import json
import os
import threading
import time
import typing as t

from flask import Flask
from werkzeug.wrappers import Response

__all__ = ["gitplug_host", "restart_host", "record_event"]

#: The pid header every bench app adds.
WORKER_HEADER = "X-Bench-Worker"

_write_lock = threading.Lock()


def record_event(event: str, **fields: t.Any) -> None:
    """Append one JSON line to ``$GITPLUG_BENCH_EVENTS`` (no-op without it).

    One ``write`` of a short line on an ``O_APPEND`` file: lines from several
    workers never interleave.
    """
    path = os.environ.get("GITPLUG_BENCH_EVENTS")
    if not path:
        return
    line = json.dumps({"t": time.time(), "pid": os.getpid(), "event": event, **fields}) + "\n"
    with _write_lock:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, line.encode())
        finally:
            os.close(fd)


def _stamp_worker(response: Response) -> Response:
    response.headers[WORKER_HEADER] = str(os.getpid())
    return response


def _on_loaded(sender: t.Any, **kwargs: t.Any) -> None:
    record_event("loaded", plugin=kwargs.get("plugin"), commit=kwargs.get("commit"), release=kwargs.get("release"))


def gitplug_host() -> Flask:
    """gitplug's standalone host for ``$GITPLUG_CONFIG``, with the bench probes."""
    from gitplug import signals
    from gitplug.config import load_config, resolve_config_path
    from gitplug.host import create_host_app

    # Connected before the app exists: the restore at init_app is recorded too.
    signals.plugin_loaded.connect(_on_loaded, weak=False)
    app, _ = create_host_app(load_config(resolve_config_path(None)))
    app.after_request(_stamp_worker)
    return app


def restart_host() -> Flask:
    """A host that loads ``$GITPLUG_BENCH_PLUGIN_DIR`` once, at import."""
    from gitplug import GitPlug

    plugin_dir = os.environ["GITPLUG_BENCH_PLUGIN_DIR"]
    app = Flask("bench_restart_host")
    app.config["SECRET_KEY"] = os.environ.get("GITPLUG_SECRET_KEY", "bench")
    gp = GitPlug(app)
    gp.load_directory("hello", plugin_dir, config={"GREETING": "Hello from the bench"})
    app.after_request(_stamp_worker)
    record_event("ready")
    return app
