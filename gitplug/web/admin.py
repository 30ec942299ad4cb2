"""gitplug's own HTTP surface on the host, under ``api_prefix`` (``/_gitplug``).

    POST /webhook, /webhook/<plugin>     signed push events (see gitplug.web.webhook)
    GET  /api/plugins                    status of every plugin (README, "HTTP API")
    GET  /api/plugins/<p>                one plugin
    GET  /api/plugins/<p>/history        its deploys, newest first
    POST /api/plugins/<p>/<action>       deploy | rollback | resume | stop | start | promote | abort
    GET  /metrics                        Prometheus text format
    GET  /                               the status page (gitplug.web.statuspage)
    /git/<p>.git/...                     the push remote (gitplug.web.gitremote; its own auth)

Everything but the webhook needs ``Authorization: Bearer <admin_token>``
(or the status page's login cookie). With no admin token configured those
endpoints answer 403 and say how to set one; a wrong token is 401.
"""

from __future__ import annotations

import hmac
import socket
import time
import typing as t

from flask import Blueprint, Flask, Response, jsonify, request

from ..config import GitplugConfig
from ..errors import GitplugError, StateError, UnknownPlugin
from ..state import DeployRecord
from .metrics import render_metrics  # importing it subscribes the stage and poll metrics to the signals

if t.TYPE_CHECKING:
    from .facade import GitplugFacade

__all__ = ["register_admin", "ADMIN_BLUEPRINT"]

ADMIN_BLUEPRINT = "gitplug_admin"

#: Answered when no admin token is configured.
NO_TOKEN_MESSAGE = (
    "the gitplug admin API is disabled because no admin token is configured. Set"
    " `admin_token: ${GITPLUG_ADMIN_TOKEN}` in deploy.yaml and export"
    " GITPLUG_ADMIN_TOKEN=<a long random string> before starting the server."
)


def _error(status: int, message: str, **extra: t.Any) -> tuple[Response, int]:
    return jsonify({"error": message, **extra}), status


def bearer_ok(config: GitplugConfig, store: t.Any = None) -> tuple[Response, int] | None:
    """None when the request carries the admin token; else the error answer."""
    token = config.admin_token
    if not token:
        return _error(403, NO_TOKEN_MESSAGE)
    header = request.headers.get("Authorization", "")
    scheme, _, given = header.partition(" ")
    if scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), token.encode()):
        return None
    from .statuspage import cookie_allows

    # The status page's login cookie: reads with the cookie alone, writes
    # only with its CSRF token from a same-site page.
    if cookie_allows(config, store):
        return None
    if not header:
        return _error(401, "missing Authorization header; send `Authorization: Bearer <admin_token>`")
    return _error(401, "wrong admin token")


def _json(body: dict[str, t.Any], status: int) -> Response:
    response = jsonify(body)
    response.status_code = status
    return response


def _client_socket() -> socket.socket | None:
    """The client connection's socket, where the WSGI server exposes it (Werkzeug, gunicorn)."""
    for key in ("werkzeug.socket", "gunicorn.socket"):
        sock = request.environ.get(key)
        if isinstance(sock, socket.socket):
            return sock
    return None


def register_admin(app: Flask, gp: GitplugFacade, config: GitplugConfig) -> None:
    """Register the admin blueprint on ``app`` at ``config.api_prefix``."""
    bp = Blueprint(ADMIN_BLUEPRINT, __name__)

    def current_config() -> GitplugConfig:
        return gp.config or config

    @bp.before_request
    def require_token() -> t.Any:
        if request.endpoint in (f"{ADMIN_BLUEPRINT}.webhook", f"{ADMIN_BLUEPRINT}.webhook_for"):
            return None
        if request.endpoint and request.endpoint.startswith(f"{ADMIN_BLUEPRINT}.page"):
            return None  # the status page handles its own login
        return bearer_ok(current_config(), gp.store)

    @bp.errorhandler(GitplugError)
    def domain_error(exc: GitplugError) -> tuple[Response, int]:
        # The state store being down is the server's trouble, not the caller's: retry later.
        status = 400
        if isinstance(exc, UnknownPlugin):
            status = 404
        elif isinstance(exc, StateError):
            status = 503
        return _error(status, str(exc))

    # -- webhook ----------------------------------------------------------------

    def _webhook(plugin: str | None) -> Response:
        from ..errors import WebhookRejected
        from .webhook import handle_webhook, read_body, refuse_from_headers

        cfg = current_config()
        store = gp.store
        received = time.monotonic()  # one push, one fetch for every plugin of its repository
        headers = dict(request.headers)
        # What the headers alone refuse (no secret, a body over the limit) is
        # answered before a byte of the body is read; the body then has a deadline.
        early = refuse_from_headers(headers, secret=cfg.webhook_secret, max_body=cfg.webhook_max_body)
        if early is not None:
            return _json(early.body, early.status)
        try:
            body = read_body(request.stream, max_body=cfg.webhook_max_body, sock=_client_socket())
        except WebhookRejected as exc:
            state = {413: "too_large", 408: "too_slow"}.get(exc.status, "bad_request")
            return _json({"status": state, "message": str(exc)}, exc.status)

        def queue_deploy(name: str, event: t.Any) -> None:
            gp.queue_deploy(name, "webhook", at=received)

        def is_pinned(name: str) -> bool:
            plugin_state = store.get_plugin(name)
            return bool(plugin_state and plugin_state.pin)

        answer = handle_webhook(
            headers=headers,
            body=body,
            secret=cfg.webhook_secret,
            plugins=cfg.plugins,
            plugin=plugin,
            remember_delivery=store.remember_delivery,
            queue_deploy=queue_deploy,
            is_pinned=is_pinned,
            max_body=cfg.webhook_max_body,
        )
        return _json(answer.body, answer.status)

    @bp.post("/webhook")
    def webhook() -> Response:
        return _webhook(None)

    @bp.post("/webhook/<plugin>")
    def webhook_for(plugin: str) -> Response:
        return _webhook(plugin)

    # -- JSON API -------------------------------------------------------------------

    @bp.get("/api/plugins")
    def plugins() -> Response:
        return jsonify(gp.status())

    @bp.get("/api/plugins/<name>")
    def plugin_detail(name: str) -> Response:
        return jsonify(gp.status(only=name)["plugins"][0])

    @bp.get("/api/plugins/<name>/history")
    def history(name: str) -> Response:
        limit = request.args.get("limit", default=50, type=int)
        return jsonify([r.to_json() for r in gp.history(name, limit=max(1, min(limit, 1000)))])

    def _answer(record: DeployRecord | None, *, queued: str | None = None) -> tuple[Response, int]:
        if record is None:
            return jsonify({"status": queued or "nothing to do"}), 202 if queued else 200
        status = 200 if record.result.value in ("live", "skipped") else 409
        if record.result.value == "running" and record.stage is not None and record.stage.value == "canary":
            status = 202  # a canary started: promoted or rolled back later (README, "Canary releases")
        return jsonify(record.to_json()), status

    def _body() -> dict[str, t.Any]:
        data = request.get_json(silent=True)
        if data is None and request.form:
            data = request.form.to_dict()
        return data if isinstance(data, dict) else {}

    @bp.post("/api/plugins/<name>/deploy")
    def deploy(name: str) -> tuple[Response, int]:
        data = _body()
        current_config().plugin(name)
        wait = str(data.get("wait", request.args.get("wait", "true"))).lower() not in ("0", "false", "no")
        if wait:
            return _answer(gp.deploy(name, ref=data.get("ref"), wait=True, trigger="api"))
        gp.deploy(name, ref=data.get("ref"), wait=False, trigger="api")
        return _answer(None, queued="queued")

    @bp.post("/api/plugins/<name>/rollback")
    def rollback(name: str) -> tuple[Response, int]:
        current_config().plugin(name)  # an unknown plugin is 404 whatever the body
        ref = _body().get("ref")
        if not ref:
            return _error(400, "rollback needs a ref: {\"ref\": \"v1.2.0\"} (a tag, sha, branch or \"previous\")")
        return _answer(gp.rollback(name, str(ref)))

    @bp.post("/api/plugins/<name>/resume")
    def resume(name: str) -> tuple[Response, int]:
        return _answer(gp.resume(name, trigger="api"))

    @bp.post("/api/plugins/<name>/promote")
    def promote(name: str) -> tuple[Response, int]:
        current_config().plugin(name)
        return _answer(gp.promote(name, trigger="api"))

    @bp.post("/api/plugins/<name>/abort")
    def abort(name: str) -> tuple[Response, int]:
        current_config().plugin(name)
        record = gp.abort(name, trigger="api")
        # The canary is rolled back as asked: the request succeeded.
        return jsonify(record.to_json()), 200

    @bp.post("/api/plugins/<name>/stop")
    def stop(name: str) -> tuple[Response, int]:
        current_config().plugin(name)
        gp.stop(name)
        return jsonify({"status": "stopped", "plugin": name}), 200

    @bp.post("/api/plugins/<name>/start")
    def start(name: str) -> tuple[Response, int]:
        current_config().plugin(name)
        gp.start(name)
        return jsonify({"status": "started", "plugin": name}), 200

    # -- metrics ------------------------------------------------------------------------

    @bp.get("/metrics")
    def metrics() -> Response:

        body, content_type = render_metrics(gp)
        return Response(body, content_type=content_type)

    from .statuspage import register_pages

    register_pages(bp, gp, current_config)
    app.register_blueprint(bp, url_prefix=config.api_prefix)

    from .gitremote import register_git_remote

    register_git_remote(app, gp, current_config)
