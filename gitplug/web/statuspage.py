"""The status page under ``api_prefix`` (``/_gitplug/``): see and steer every plugin.

Routes (endpoints named ``page*`` on the admin blueprint; :mod:`gitplug.web.admin`
leaves their authentication to this module)::

    GET  /                              every plugin, its buttons and history (or the login form)
    POST /login                         admin token in, login cookie out
    POST /logout                        forget the login cookie
    POST /plugins/<p>/<action>          deploy | rollback | resume | stop | start | promote | abort
    GET  /plugins/<p>/deploys/<id>/log  a deploy's test log (last 1 MiB; ?download=1: all)
    GET  /assets/status.css             the stylesheet (a file, so the CSP needs no inline style)

Authentication needs no server-side session, nor the host's session or
``SECRET_KEY`` (a host may have none). Everything is keyed on the admin
token, so changing the token logs every browser out:

- login cookie :data:`COOKIE` = ``<expires>.<nonce>.<mac>``, ``mac =
  HMAC-SHA256(admin_token, "gitplug-status-page-login|<expires>|<nonce>")``;
  HttpOnly, SameSite=Strict, ``Path=<api_prefix>`` (plugins never see it),
  Secure over https, valid for :data:`LOGIN_TTL_S`;
- CSRF: every form carries ``csrf = HMAC-SHA256(admin_token,
  "gitplug-status-page-csrf|<cookie>")``, so it is per login. Missing: 400;
  wrong: 403 (compared in constant time); a cross-site ``Origin``: 403;
- the message after an action rides a signed, read-once cookie
  (:data:`FLASH_COOKIE`); a deploy's outcome is read back from the store by id.

What the page shows of each plugin is built in :mod:`gitplug.web.statusview`.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import importlib.resources
import json
import logging
import math
import secrets
import threading
import time
import typing as t
from pathlib import Path
from urllib.parse import urlsplit

import jinja2
from flask import Blueprint, Response, redirect, request, send_file, url_for

from ..config import GitplugConfig
from ..deploy.releases import MiB
from ..errors import GitplugError, UnknownPlugin
from ..state import DeployRecord
from .statusview import _ago, _duration, _flash_view, _plugin_view, _short_ref

if t.TYPE_CHECKING:
    from werkzeug.wrappers import Response as BaseResponse

    from .facade import GitplugFacade

__all__ = [
    "COOKIE",
    "FLASH_COOKIE",
    "LoginThrottle",
    "Revocations",
    "cookie_allows",
    "csrf_token",
    "logged_in",
    "register_pages",
]

logger = logging.getLogger(__name__)

#: The login cookie.
COOKIE = "gitplug_admin"
#: The read-once message shown after an action.
FLASH_COOKIE = "gitplug_flash"
#: How long a login lasts.
LOGIN_TTL_S = 12 * 3600
#: How much of the end of a test log the log page shows.
LOG_TAIL_BYTES = MiB
ACTIONS = ("deploy", "rollback", "resume", "stop", "start", "promote", "abort")

#: Sent with every page (not with the JSON API). The stylesheet is a file,
#: so no 'unsafe-inline' is needed; there is no script at all.
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; img-src 'self' data:; script-src 'none'; object-src 'none';"
        " base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
    ),
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}

NO_TOKEN_HELP = (
    "Set `admin_token: ${GITPLUG_ADMIN_TOKEN}` in deploy.yaml, export"
    " GITPLUG_ADMIN_TOKEN=<a long random string> (e.g. from `python -c 'import secrets;"
    " print(secrets.token_urlsafe(32))'`) and restart the server."
)

_LOGIN = "gitplug-status-page-login"
_CSRF = "gitplug-status-page-csrf"
_FLASH = "gitplug-status-page-flash"
_RELOAD = "reload the status page and try again"


# -- login, CSRF, messages -----------------------------------------------------------


def _mac(token: str, *parts: str) -> str:
    return hmac.new(token.encode(), "|".join(parts).encode(), hashlib.sha256).hexdigest()


def _same(given: str, expected: str) -> bool:
    # As bytes, so a non-ASCII value from a client is a mismatch, not a TypeError.
    return hmac.compare_digest(given.encode("utf-8", "replace"), expected.encode())


def _session_value(
    config: GitplugConfig, *, expires: int | None = None, nonce: str | None = None
) -> str:
    """A fresh login cookie value for ``config``'s admin token (see the module docstring)."""
    if not config.admin_token:
        raise ValueError("no admin token is configured: nobody can log in")
    expires = int(time.time()) + LOGIN_TTL_S if expires is None else expires
    nonce = nonce or secrets.token_urlsafe(16)
    return f"{expires}.{nonce}.{_mac(config.admin_token, _LOGIN, str(expires), nonce)}"


class Revocations(t.Protocol):
    """What login checks need of the state store (logout is server-side)."""

    def login_revoked(self, login_id: str) -> bool: ...


def _login_id(value: str) -> tuple[str, int] | None:
    """``(nonce, expires)`` of a login cookie value, None when malformed."""
    expires, _, rest = value.partition(".")
    nonce, _, mac = rest.partition(".")
    if not (expires.isascii() and expires.isdigit()) or not nonce or not mac:
        return None
    return nonce, int(expires)


def _valid_session(config: GitplugConfig, value: str, store: Revocations | None = None) -> bool:
    token = config.admin_token
    expires, _, rest = value.partition(".")
    nonce, _, mac = rest.partition(".")
    if not token or not (expires.isascii() and expires.isdigit()) or not nonce or not mac:
        return False
    if not (_same(mac, _mac(token, _LOGIN, expires, nonce)) and int(expires) > time.time()):
        return False
    # A logged-out cookie stays revoked even if a copy of it is replayed.
    return store is None or not store.login_revoked(nonce)


def logged_in(config: GitplugConfig, store: Revocations | None = None) -> bool:
    """True when the request carries a valid, unexpired, not logged-out login cookie."""
    return _valid_session(config, request.cookies.get(COOKIE, ""), store)


def csrf_token(config: GitplugConfig, store: Revocations | None = None) -> str:
    """The CSRF token of the current login ("" when not logged in)."""
    cookie = request.cookies.get(COOKIE, "")
    if not config.admin_token or not _valid_session(config, cookie, store):
        return ""
    return _mac(config.admin_token, _CSRF, cookie)


class LoginThrottle:
    """At most ``limit`` failed logins per client address per ``window_s``.

    Kept in the process (each worker counts its own): it slows a guesser to
    a few tries a minute, and a 16+ character token does the rest. Bounded:
    at most ``max_clients`` addresses are remembered, oldest dropped first.
    """

    def __init__(self, limit: int = 5, window_s: float = 60.0, max_clients: int = 10_000) -> None:
        self.limit = limit
        self.window_s = window_s
        self.max_clients = max_clients
        self._failures: dict[str, list[float]] = {}
        self._lock = threading.Lock()

    def retry_after(self, client: str) -> int:
        """Seconds until ``client`` may try again; 0 when it may now."""
        now = time.monotonic()
        with self._lock:
            recent = [at for at in self._failures.get(client, ()) if at > now - self.window_s]
            if recent:
                self._failures[client] = recent
            else:
                self._failures.pop(client, None)
            if len(recent) < self.limit:
                return 0
            return max(1, math.ceil(recent[0] + self.window_s - now))

    def failed(self, client: str) -> None:
        now = time.monotonic()
        with self._lock:
            self._failures.setdefault(client, []).append(now)
            while len(self._failures) > self.max_clients:
                self._failures.pop(next(iter(self._failures)))


def cookie_allows(config: GitplugConfig, store: Revocations | None = None) -> bool:
    """True when the login cookie may authenticate this request to the JSON API.

    Reads (GET, HEAD) need only the cookie; a write also needs this login's
    CSRF token (``X-CSRF-Token`` header or ``csrf`` form field) and no
    cross-site ``Origin``, so a form on another site can never drive the API.
    """
    if not logged_in(config, store):
        return False
    if request.method in ("GET", "HEAD", "OPTIONS"):
        return True
    origin = request.headers.get("Origin")
    if origin is not None and urlsplit(origin).netloc != request.host:
        return False
    given = request.headers.get("X-CSRF-Token") or request.form.get("csrf", "")
    return bool(given) and _same(given, csrf_token(config, store))


def _csrf_refusal(config: GitplugConfig, store: Revocations | None = None) -> tuple[int, str] | None:
    """None when the form's CSRF token and Origin are right; else (status, reason)."""
    origin = request.headers.get("Origin")
    if origin is not None and urlsplit(origin).netloc != request.host:
        return 403, f"this form was sent from another site ({origin}); {_RELOAD}"
    given = request.form.get("csrf", "")
    if not given:
        return 400, f"the form has no CSRF token; {_RELOAD}"
    if not _same(given, csrf_token(config, store)):
        return 403, f"the form's CSRF token is wrong or from an older login; {_RELOAD}"
    return None


def _flash_value(token: str, data: dict[str, t.Any]) -> str:
    text = str(data.get("text", "")).encode()[:1500].decode("utf-8", "ignore")  # cookies: ~4 KB
    raw = json.dumps({**data, "text": text}, separators=(",", ":")).encode()
    payload = base64.urlsafe_b64encode(raw).decode().rstrip("=")
    return f"{payload}.{_mac(token, _FLASH, payload)}"


def _read_flash(config: GitplugConfig) -> dict[str, t.Any] | None:
    payload, _, mac = request.cookies.get(FLASH_COOKIE, "").partition(".")
    token = config.admin_token
    if not payload or not token or not _same(mac, _mac(token, _FLASH, payload)):
        return None
    try:
        data = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    except ValueError:
        return None
    return data if isinstance(data, dict) else None


# -- rendering ---------------------------------------------------------------------


@functools.cache
def _env() -> jinja2.Environment:
    # gitplug's own environment: the host's Jinja settings, context processors
    # and plugins' template globals never reach these pages.
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("gitplug", "templates/gitplug"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.globals["url_for"] = url_for
    env.filters.update(
        ago=_ago, duration=_duration, ref=_short_ref, short=lambda sha: sha[:7] if sha else "-"
    )
    return env


@functools.cache
def _stylesheet() -> tuple[str, str]:
    """The CSS and a hash of it (in its URL, so it can be cached for good)."""
    css = importlib.resources.files("gitplug").joinpath("static/gitplug/status.css")
    text = css.read_text("utf-8")
    return text, hashlib.sha256(text.encode()).hexdigest()[:12]


def _page(template: str, config: GitplugConfig, *, status: int = 200,
          store: Revocations | None = None, **context: t.Any) -> Response:
    html = _env().get_template(template).render(
        host=config.host,
        css_url=url_for("gitplug_admin.page_css", v=_stylesheet()[1]),
        csrf=csrf_token(config, store),
        logged_in=logged_in(config, store),
        **context,
    )
    return Response(html, status=status, content_type="text/html; charset=utf-8")


def _login_page(config: GitplugConfig, *, status: int = 200, error: str | None = None,
                store: Revocations | None = None) -> Response:
    if not config.admin_token:
        return _page("login.html", config, status=403, no_token=True, help=NO_TOKEN_HELP,
                     error=None, next="", store=store)
    return _page("login.html", config, status=status, no_token=False, help="", error=error,
                 next=_safe_next(), store=store)


def _refused(config: GitplugConfig, status: int, message: str,
             store: Revocations | None = None) -> Response:
    return _page("error.html", config, status=status, message=message, store=store)


def _cookie_path() -> str:
    # The blueprint's real mount point: api_prefix under the host's script root.
    return url_for("gitplug_admin.page").rstrip("/") or "/"


def _set_cookie(response: BaseResponse, name: str, value: str, max_age: int) -> None:
    response.set_cookie(name, value, max_age=max_age, path=_cookie_path(), httponly=True,
                        samesite="Strict", secure=request.is_secure)


def _safe_next() -> str:
    """The page to return to after login, if it is one of ours (never an open redirect)."""
    target = request.values.get("next", "")
    if not target and request.method == "GET":
        target = request.full_path
    home = url_for("gitplug_admin.page")
    # No control characters: a CR or LF cannot go into a Location header
    # (Werkzeug refuses it, which was a 500); such a target is just not ours.
    if target.startswith(home) and "\\" not in target and target.isprintable():
        return target.rstrip("?")
    return ""


def _tail(path: Path, limit: int) -> tuple[str, int]:
    """The last ``limit`` bytes of ``path`` (from a line start when cut) and its size."""
    with path.open("rb") as handle:
        size = handle.seek(0, 2)
        handle.seek(max(0, size - limit))
        data = handle.read(limit)
    if size > limit and b"\n" in data:
        data = data.split(b"\n", 1)[1]
    return data.decode("utf-8", "replace"), size


# -- routes ----------------------------------------------------------------------------


def register_pages(
    bp: Blueprint, gp: GitplugFacade, current_config: t.Callable[[], GitplugConfig]
) -> None:
    """Add the status page routes (endpoints named ``page*``) and their headers to ``bp``."""
    store = _StoreOf(gp)
    throttle = LoginThrottle()

    @bp.after_request
    def security_headers(response: Response) -> Response:
        if request.endpoint and request.endpoint.startswith(f"{bp.name}.page"):
            for name, value in SECURITY_HEADERS.items():
                response.headers.setdefault(name, value)
        return response

    @bp.get("/assets/status.css")
    def page_css() -> Response:
        css, version = _stylesheet()
        response = Response(css, content_type="text/css; charset=utf-8")
        fresh = request.args.get("v") == version  # a new version is a new URL
        response.headers["Cache-Control"] = (
            "public, max-age=31536000, immutable" if fresh else "no-cache"
        )
        return response

    @bp.get("/")
    def page() -> Response:
        config = current_config()
        if not logged_in(config, store):
            return _login_page(config, store=store)
        plugins = [
            _plugin_view(gp.deployer, gp.store, config.plugins[p["name"]], p)
            for p in gp.status()["plugins"]
            if p["name"] in config.plugins
        ]
        flash = _read_flash(config)
        response = _page(
            "overview.html",
            config,
            store=store,
            plugins=plugins,
            flash=_flash_view(gp.store, flash) if flash else None,
            # Reload while a deploy runs so its result appears by itself; never
            # otherwise, so a half-typed ref is not wiped.
            refresh=10 if any(v.running for v in plugins) else None,
            now=time.strftime("%H:%M:%S"),
            root=request.script_root,
        )
        if flash is not None:
            response.delete_cookie(FLASH_COOKIE, path=_cookie_path(), httponly=True,
                                   samesite="Strict")
        return response

    @bp.post("/login")
    def page_login() -> Response | BaseResponse:
        config = current_config()
        if not config.admin_token:
            return _login_page(config, store=store)
        client = request.remote_addr or "?"
        wait = throttle.retry_after(client)
        if wait:
            logger.warning("status page: login from %s refused: too many failed logins", client)
            response = _login_page(config, status=429, store=store, error=(
                f"Too many wrong tokens from your address; try again in {wait} s."))
            response.headers["Retry-After"] = str(wait)
            return response
        if not _same(request.form.get("token", "").strip(), config.admin_token):
            throttle.failed(client)
            logger.warning("status page: failed login from %s", client)
            return _login_page(config, status=401, store=store, error=(
                "That is not the admin token. Check GITPLUG_ADMIN_TOKEN (or admin_token in"
                " deploy.yaml) on the server."))
        response = redirect(_safe_next() or url_for("gitplug_admin.page"), code=303)
        _set_cookie(response, COOKIE, _session_value(config), LOGIN_TTL_S)
        logger.info("status page: login from %s", request.remote_addr)
        return response

    @bp.post("/logout")
    def page_logout() -> Response | BaseResponse:
        config = current_config()
        if logged_in(config, store) and (refusal := _csrf_refusal(config, store)) is not None:
            return _refused(config, *refusal, store=store)
        login = _login_id(request.cookies.get(COOKIE, ""))
        if login is not None and logged_in(config, store):
            # Server-side: a copy of the cookie kept elsewhere is refused too.
            store.revoke_login(login[0], until=login[1])
        response = redirect(url_for("gitplug_admin.page"), code=303)
        response.delete_cookie(COOKIE, path=_cookie_path(), httponly=True, samesite="Strict")
        return response

    @bp.post(f"/plugins/<name>/<any({', '.join(ACTIONS)}):action>")
    def page_action(name: str, action: str) -> Response | BaseResponse:
        config = current_config()
        if not logged_in(config, store):
            return _login_page(config, status=401, store=store, error=(
                "You are not logged in (or the login expired). Log in, then repeat the action."))
        refusal = _csrf_refusal(config, store)
        if refusal is not None:
            return _refused(config, *refusal, store=store)
        try:
            config.plugin(name)
            flash = _run_action(gp, name, action)
        except UnknownPlugin as exc:
            return _refused(config, 404, str(exc), store=store)
        except GitplugError as exc:
            logger.info("status page: %s of %s refused: %s", action, name, exc)
            flash = {"kind": "error", "plugin": name, "action": action, "text": str(exc)}
        response = redirect(f"{url_for('gitplug_admin.page')}#plugin-{name}", code=303)
        _set_cookie(response, FLASH_COOKIE, _flash_value(t.cast(str, config.admin_token), flash),
                    60)
        return response

    @bp.get("/plugins/<name>/deploys/<int:deploy_id>/log")
    def page_log(name: str, deploy_id: int) -> Response:
        config = current_config()
        if not logged_in(config, store):
            return _login_page(config, status=401, store=store)
        record: DeployRecord | None = gp.store.get_deploy(deploy_id)
        if name not in config.plugins or record is None or record.plugin != name:
            return _refused(config, 404, f"no deploy {deploy_id} of plugin {name!r}; see its"
                            " history on the status page.", store=store)
        text, size, note = "", 0, None
        path = Path(record.log_path).resolve() if record.log_path else None
        if path is None:
            note = ("The test gate did not run in this deploy: the gate is off, the release had"
                    " passed its tests before, or the deploy stopped before the test stage.")
        elif not path.is_relative_to(config.data_dir.resolve()) or not path.is_file():
            note = f"The log {record.log_path} is gone (or outside the data directory)."
        elif request.args.get("download"):
            download = send_file(path, mimetype="text/plain", as_attachment=True,
                                 download_name=f"{name}-deploy-{deploy_id}.log")
            download.headers["Cache-Control"] = "no-store"
            return download
        else:
            text, size = _tail(path, LOG_TAIL_BYTES)
        return _page("log.html", config, store=store, plugin=name, record=record, text=text, size=size,
                     truncated=size > LOG_TAIL_BYTES, note=note, mib=MiB)


class _StoreOf:
    """The facade's state store at the time of each call (a reload may replace it)."""

    def __init__(self, gp: GitplugFacade) -> None:
        self._gp = gp

    def login_revoked(self, login_id: str) -> bool:
        return self._gp.store.login_revoked(login_id)

    def revoke_login(self, login_id: str, *, until: float) -> None:
        self._gp.store.revoke_login(login_id, until=until)


def _run_action(gp: GitplugFacade, name: str, action: str) -> dict[str, t.Any]:
    """Do ``action`` on ``name``; return the flash data reporting it. Domain errors propagate."""
    base = {"plugin": name, "action": action}
    if action in ("stop", "start"):
        getattr(gp, action)(name)
        text = (f"{name} is stopped: its URLs answer 404 until you start it." if action == "stop"
                else f"{name} is serving again.")
        return {**base, "kind": "ok", "text": text}
    if action == "rollback":
        ref = (request.form.get("ref_text") or "").strip() or (request.form.get("ref") or "")
        if not ref.strip():
            return {**base, "kind": "error",
                    "text": "Choose a release from the list, or type a ref, to roll back to."}
        if len(ref) > 200 or not ref.isprintable():
            return {**base, "kind": "error",
                    "text": f"{ref[:60]!r} is not a ref: use a tag, a branch or a commit sha."}
        logger.info("status page: rollback of %s to %s", name, ref)
        record = gp.rollback(name, ref.strip())
    elif action == "resume":
        record = gp.resume(name, trigger="api")
    elif action in ("promote", "abort"):
        logger.info("status page: %s of the canary of %s", action, name)
        record = getattr(gp, action)(name, trigger="api")
    else:
        record = gp.deploy(name, wait=True, trigger="api")
    if record is None:
        return {**base, "kind": "info", "text": "Nothing to do: the wanted commit is already live."}
    return {**base, "deploy": record.id}
