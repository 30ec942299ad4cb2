"""JSON endpoints, under ``<url_prefix>/api/``."""

from __future__ import annotations

import typing as t

from flask import jsonify, request
from werkzeug.wrappers import Response

from gitplug import current_plugin

from . import greetings, plugin, stats
from .views import release_info


@plugin.errorhandler(greetings.InvalidName)
def invalid_name(exc: greetings.InvalidName) -> tuple[Response, int]:
    # A blueprint error handler: only this plugin's requests reach it.
    return jsonify(error=str(exc)), 400


@plugin.get("/api/greeting")
def api_greeting() -> dict[str, t.Any]:
    """``?name=Ada`` -> ``{"name": "Ada", "greeting": "Hello, Ada!"}``.

    A preview: it does not count as a greeting (the form does).
    """
    raw = request.args.get("name")
    name = greetings.ANONYMOUS if raw is None or not raw.strip() else greetings.clean_name(raw)
    greeting = greetings.greeting_from_config(current_plugin.config)
    return {"name": name, "greeting": greetings.make_greeting(name, greeting)}


@plugin.get("/api/release")
def api_release() -> dict[str, t.Any]:
    """Which release is serving, and what it has done so far."""
    summary = stats.summary()
    return {
        **release_info(),
        "url_prefix": current_plugin.url_prefix,
        "greetings": summary.greetings,
        "uptime_s": round(summary.uptime_s, 3),
    }
