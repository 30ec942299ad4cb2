"""WSGI applications the bench runs under gunicorn (imported in the workers).

``bench.apps:gitplug_host()``
    gitplug's own standalone host (:func:`gitplug.host.create_host_app`) for
    ``$GITPLUG_CONFIG``, exactly what ``gitplug.wsgi:app`` serves, plus two
    probes: every response carries ``X-Bench-Worker: <pid>``, and every
    ``plugin_loaded`` signal (a release going live in this worker) appends
    ``{"t": <unix time>, "pid": ..., "event": "loaded", "commit": ...}`` to
    ``$GITPLUG_BENCH_EVENTS``. The convergence figure reads those lines.

``bench.apps:plain_restart_host()``
    The "just restart gunicorn" baseline of ``restart_ratio``: a plain Flask
    app, no gitplug, whose ``/hello/api/release`` answers the version written
    in ``$GITPLUG_BENCH_VERSION_FILE`` when the worker imported the app; it
    appends ``{"event": "ready", "version": ...}`` at import. New code is
    served only by new workers, after ``kill -HUP``. Deliberately minimal: a
    real app imports more, so its restart is slower and the ratio larger.
"""

from __future__ import annotations

import json
import os
import threading
import time
import typing as t

from flask import Flask
from werkzeug.wrappers import Response

__all__ = ["gitplug_host", "plain_restart_host", "record_event"]

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


def plain_restart_host() -> Flask:
    """A plain Flask app serving the version it read at import (the HUP baseline)."""
    from flask import jsonify

    with open(os.environ["GITPLUG_BENCH_VERSION_FILE"]) as f:
        version = f.read().strip()
    app = Flask("bench_plain_restart_host")

    @app.get("/hello/api/release")
    def release() -> t.Any:
        return jsonify(version=version, pid=os.getpid())

    app.after_request(_stamp_worker)
    record_event("ready", version=version)
    return app
