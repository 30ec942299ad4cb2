"""WSGI entry point for production servers.

    GITPLUG_CONFIG=deploy.yaml gunicorn -w 4 -k gthread --threads 8 \\
        -c python:gitplug.gunicorn_conf 'gitplug.wsgi:app'

serves the plugins of ``$GITPLUG_CONFIG`` (else ``./deploy.yaml``) from the
bare host application of :mod:`gitplug.host`. To serve plugins inside your
own application, call ``GitPlug(app)`` there and point gunicorn at it.
"""

from __future__ import annotations

from .config import load_config, resolve_config_path
from .host import create_host_app

__all__ = ["app", "gitplug"]

app, gitplug = create_host_app(load_config(resolve_config_path(None)))
