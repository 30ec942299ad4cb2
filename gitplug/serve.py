"""``gitplug serve``: the standalone server (Werkzeug's threaded server).

For production run the same host app under gunicorn (see the README):
``gunicorn -w 4 -k gthread 'gitplug.wsgi:app'``.
"""

from __future__ import annotations

import logging
import signal
import sys
from pathlib import Path

import click
from werkzeug.serving import run_simple

from .config import GitplugConfig
from .errors import GitplugError
from .host import create_host_app

__all__ = ["run_server"]


def configure_logging() -> None:
    """Readable logs for the CLI's own server (library code adds no handlers)."""
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)-7s %(name)s: %(message)s")
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    logging.getLogger("apscheduler").setLevel(logging.WARNING)


def run_server(
    config: GitplugConfig | None,
    *,
    host: str,
    port: int,
    dev: list[tuple[str, Path]],
    banner: str | None = None,
) -> None:
    """Serve until interrupted; ``dev`` plugins are watched and swapped on save."""
    configure_logging()
    app, gp = create_host_app(config)

    def report(exc: GitplugError) -> None:
        click.secho(f"not loaded, the previous release keeps serving:\n  {exc}", fg="red", err=True)

    for name, path in dev:
        if not name:  # a directory of plugins
            names = gp.watch_plugins_directory(path, on_error=report)
            click.echo(f"watching {path}: plugins {', '.join(names) or '(none yet)'}; new ones load"
                       " when they appear", err=True)
            continue
        gp.watch_directory(name, path, on_error=report)
        click.echo(f"watching {path} as plugin {name!r} at /{name}/", err=True)
    if config is not None:
        gp.start_background()
        services = app.extensions["gitplug"].services
        signal.signal(signal.SIGHUP, lambda *_: services.reload_config())
    # SIGTERM (systemd, docker, kill) ends the server like Ctrl+C: the finally
    # below stops the services and removes this worker's heartbeat.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    click.echo(banner or f"gitplug serving on http://{host}:{port}/  (Ctrl+C to stop)", err=True)
    try:
        run_simple(host, port, app, threaded=True, use_reloader=False, use_debugger=False)
    finally:
        gp.shutdown()
        sys.stderr.flush()
