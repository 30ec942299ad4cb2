"""HTML pages: the greeting form and the release report.

The form shows how a plugin lives inside the host application: ``flash`` and
``session`` are the host's (the session cookie survives a deploy, the
plugin's memory does not), and the redirect after POST uses ``url_for``.
"""

from __future__ import annotations

import typing as t

from flask import flash, redirect, render_template, request, session, url_for
from werkzeug.wrappers import Response

from gitplug import current_plugin

from . import __version__, greetings, plugin, stats

#: Keys this plugin owns in the host's session; prefixed to stay out of the host's way.
SESSION_COUNT = "hello.greeted"
SESSION_LAST = "hello.last_name"


def release_info() -> dict[str, t.Any]:
    """Which code is serving: shown in every page's footer and by the API."""
    commit = current_plugin.commit
    return {
        "plugin": current_plugin.name,
        "version": __version__,
        "release": current_plugin.release_id,
        "release_short": current_plugin.release_id[:12],
        "commit": commit,
        "commit_short": commit[:8] if commit else None,
    }


@plugin.context_processor
def inject_release() -> dict[str, t.Any]:
    # Scoped to this plugin's templates: the host's pages never see it.
    return {"release": release_info()}


@plugin.after_request
def stamp_release(response: Response) -> Response:
    # `curl -I` shows which release answered: handy while watching a deploy.
    response.headers["X-Hello-Release"] = current_plugin.release_id
    return response


@plugin.get("/")
def index() -> str:
    greeting = greetings.greeting_from_config(current_plugin.config)
    return render_template(
        "index.html",
        headline=greetings.make_greeting(greetings.ANONYMOUS, greeting),
        count=session.get(SESSION_COUNT, 0),
        last_name=session.get(SESSION_LAST),
        max_length=greetings.MAX_NAME_LENGTH,
        served=stats.summary().greetings,
    )


@plugin.post("/greet")
def greet() -> Response:
    try:
        name = greetings.clean_name(request.form.get("name"))
    except greetings.InvalidName as exc:
        flash(str(exc), "error")
        return redirect(url_for("hello.index"))
    greeting = greetings.greeting_from_config(current_plugin.config)
    stats.record_greeting(name)
    session[SESSION_COUNT] = session.get(SESSION_COUNT, 0) + 1
    session[SESSION_LAST] = name
    flash(greetings.make_greeting(name, greeting), "success")
    # Post/redirect/get: reloading the page does not greet twice.
    return redirect(url_for("hello.index"))


@plugin.get("/report")
def report_page() -> str:
    # Imported where it is used; gitplug resolves the import inside this
    # release (and still imported and checked the module before going live).
    from . import report

    return render_template("report.html", report=report.build(stats.summary()))
