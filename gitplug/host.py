"""The bare host application of ``gitplug serve`` and ``gitplug.wsgi``.

A plain Flask app with a small index page that links every mounted plugin;
gitplug serves the plugins inside it exactly as it would inside your own
application. The session secret comes from ``$GITPLUG_SECRET_KEY``, else a
random key kept in ``<data_dir>/secret_key`` so every worker shares it.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from flask import Flask, render_template_string

from .config import GitplugConfig
from .extension import GitPlug

__all__ = ["create_host_app"]

_INDEX = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>gitplug host</title>
<style>body{font:16px/1.5 system-ui,sans-serif;max-width:40rem;margin:2rem auto;padding:0 1rem;color:#1d2330}
a{color:#0b5cad}li{margin:.3rem 0}code{background:#f1f3f7;padding:.1rem .3rem;border-radius:4px}</style>
</head><body>
<h1>gitplug host</h1>
<p>Plugins mounted in this server:</p>
<ul>
{% for name, prefix, commit in plugins %}
  <li><a href="{{ prefix }}/">{{ name }}</a> at <code>{{ prefix }}</code>{% if commit %} &middot; <code>{{ commit[:12] }}</code>{% endif %}</li>
{% else %}
  <li>none yet</li>
{% endfor %}
</ul>
<p><a href="{{ api_prefix }}/">Status page</a></p>
</body></html>"""


def _secret_key(data_dir: Path) -> str:
    from_env = os.environ.get("GITPLUG_SECRET_KEY")
    if from_env:
        return from_env
    path = data_dir / "secret_key"
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        data_dir.mkdir(parents=True, exist_ok=True)
        key = secrets.token_hex(32)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(key)
        os.chmod(tmp, 0o600)
        try:
            os.link(tmp, path)  # first writer wins; others read its key
        except FileExistsError:
            pass
        finally:
            tmp.unlink(missing_ok=True)
        return path.read_text().strip()


def create_host_app(config: GitplugConfig | None, *, dev_root: Path | None = None) -> tuple[Flask, GitPlug]:
    """A bare host app serving the plugins of ``config`` (or none, for --dev)."""
    app = Flask("gitplug_host")
    data_dir = config.data_dir if config is not None else (dev_root or Path(".gitplug")).resolve()
    app.config["SECRET_KEY"] = _secret_key(data_dir)
    api_prefix = config.api_prefix if config is not None else "/_gitplug"

    @app.get("/")
    def index() -> str:
        gp_state = app.extensions["gitplug"]
        plugins = [
            (name, release.prefix, release.commit or release.release_id)
            for name, release in sorted(gp_state.runtime.snapshot.releases.items())
        ]
        return render_template_string(_INDEX, plugins=plugins, api_prefix=api_prefix)

    gp = GitPlug(app, config=config)
    return app, gp
