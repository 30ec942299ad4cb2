"""Webhook trigger (README, "Webhooks"): verify, parse and match a push, then queue deploys.

Framework-free on purpose: the Flask view at ``POST <api_prefix>/webhook[/<plugin>]``
passes the raw request to :func:`handle_webhook` and sends back what it returns::

    answer = handle_webhook(headers=request.headers, body=body, secret=cfg.webhook_secret,
                            plugins=cfg.plugins, plugin=name, remember_delivery=..., ...)
    return jsonify(answer.body), answer.status

Checks run in this order; the first that fails answers (body "status" in brackets):
403 no ``webhook.secret``: refuse everything (refused); 413 ``Content-Length`` or
body over ``max_body`` (too_large); the first two from the headers alone, before a
byte of the body is read (:func:`refuse_from_headers`), which :func:`read_body` then
reads with a deadline (408, too_slow); 401 missing, wrong or SHA-1 signature
(unauthorized); 404 unknown plugin in the URL (unknown_plugin); 400 malformed body
(bad_request); 200 ping (pong), non-push event (ignored), repeated delivery id
(duplicate), nothing tracks the pushed ref (unmatched), all matches pinned
(pinned); 202 deploys queued (queued); 503 a callback raised a GitplugError (error).

The signature is checked before the plugin name, so a caller without the secret
learns nothing about the configuration. The payload is a hint: a deploy resolves
the tracked ref from the repository, so matching errs towards queueing.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import re
import socket
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Literal, cast
from urllib.parse import parse_qs, unquote, urlsplit

from gitplug.config import PluginConfig
from gitplug.config.values import DEFAULT_WEBHOOK_MAX_BODY

from ..errors import GitplugError, UnknownPlugin, WebhookRejected

logger = logging.getLogger(__name__)

Forge = Literal["github", "gitea", "gitlab", "bitbucket", "generic"]

#: Largest body accepted unless ``webhook.max_body`` says otherwise: GitHub's own
#: cap on a delivery (25 MB); a push of thousands of paths is over a megabyte.
MAX_BODY: Final = DEFAULT_WEBHOOK_MAX_BODY
#: Seconds to receive a whole body. The forges give up sooner (GitHub after 10 s,
#: Gitea after 5 s by default), so a slower sender is no forge, and a client
#: trickling bytes must not hold a server thread for longer.
BODY_DEADLINE_S: Final = 10.0

NO_SECRET_MESSAGE: Final = (
    "the webhook is disabled because no secret is configured. Set "
    "'webhook: {secret: ${GITPLUG_WEBHOOK_SECRET}}' in deploy.yaml, export "
    "GITPLUG_WEBHOOK_SECRET on the server, and give the forge's webhook the same secret.")
_DEFAULT_PORTS: Final = {"http": 80, "https": 443, "ssh": 22, "git+ssh": 22, "ssh+git": 22,
                         "git": 9418}
#: HMAC-SHA256 signature headers, strongest first: (header, value starts "sha256=").
_HMAC_HEADERS: Final = (("X-Gitplug-Signature", True), ("X-Hub-Signature-256", True),
                        ("X-Gitea-Signature", False), ("X-Forgejo-Signature", False),
                        ("X-Hub-Signature", True))
#: forge -> (headers naming the event, headers carrying the delivery id), preferred first.
_EVENT_HEADERS: Final[dict[str, tuple[tuple[str, ...], tuple[str, ...]]]] = {
    "github": (("x-github-event",), ("x-github-delivery",)),
    # Gitea and Forgejo also send GitHub's headers, for compatibility.
    "gitea": (("x-gitea-event", "x-forgejo-event", "x-gogs-event", "x-github-event"),
              ("x-gitea-delivery", "x-forgejo-delivery", "x-gogs-delivery", "x-github-delivery")),
    "gitlab": (("x-gitlab-event",), ("idempotency-key", "x-gitlab-event-uuid")),
    "bitbucket": (("x-event-key",), ("x-request-uuid", "x-request-id")),
    "generic": (("x-gitplug-event",), ("x-gitplug-delivery",)),
}
_PUSH_EVENTS: Final = frozenset({"push", "Push Hook", "Tag Push Hook", "System Hook",
                                 "repo:push", "repo:refs_changed"})
#: Where each payload gives its repository's URLs (GitLab: "project" and "repository").
_URL_KEYS: Final = ("clone_url", "ssh_url", "git_url", "html_url", "url", "svn_url",
                    "git_http_url", "git_ssh_url", "web_url", "http_url")
_URL_FIELDS: Final = {"gitlab": "project.git_http_url", "generic": "repository.url",
                      "bitbucket": "repository.links.html.href"}  # else repository.clone_url
_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://")
_FULL_SHA = re.compile(r"[0-9a-fA-F]{40}|[0-9a-fA-F]{64}")


@dataclass(frozen=True)
class PushEvent:
    """What a forge told us, normalised across forges. A hint, never what is deployed."""

    forge: Forge
    delivery_id: str | None  #: None when the forge sent none: no de-duplication then
    repo_urls: tuple[str, ...]  #: every URL form of the repository the payload gives
    ref: str | None  #: first ref the push moved, e.g. "refs/heads/main"; None for non-pushes
    after: str | None  #: the commit ``ref`` now points at, when the payload says
    is_ping: bool
    event: str  #: the forge's own event name ("push", "Tag Push Hook", "repo:push", ...)
    refs: tuple[str, ...] = ()  #: every ref the push created or moved (Bitbucket: several)
    deleted_refs: tuple[str, ...] = ()  #: refs the push deleted: nothing to deploy for those
    default_branch: str | None = None  #: lets a plugin tracking "HEAD" match
    is_push: bool = True  #: False for pings and for events gitplug ignores

    def __post_init__(self) -> None:
        if self.is_ping:  # frozen: object.__setattr__ is how __post_init__ may normalise
            object.__setattr__(self, "is_push", False)
        if self.is_push and not self.refs and self.ref and self.ref not in self.deleted_refs:
            object.__setattr__(self, "refs", (self.ref,))


@dataclass(frozen=True)
class WebhookResponse:
    """The HTTP answer: ``status`` and a JSON ``body`` with at least "status" and "message"."""

    status: int
    body: dict[str, Any] = field(hash=False)


# --------------------------------------------------------------------------- URLs


def normalise_repo_url(url: str) -> str:
    """One spelling per repository, for matching a payload's URLs against ``repo:``.

    Network URLs (``https://``, ``ssh://``, ``git://``, scp-like ``user@host:path``)
    become ``host[:port]/path``: scheme, user, password and default port dropped, host
    lowercased, trailing ``/`` and ``.git`` removed; path case is kept. ``file://`` URLs
    and local paths become the resolved absolute path (``.git`` kept: it names a
    different directory). Never raises for a string.
    """
    text = url.strip()
    scheme = _SCHEME.match(text)
    if scheme:
        name = scheme.group(1).lower()
        if name == "file":
            return os.path.realpath(unquote(urlsplit(text).path) or "/")
        try:
            split = urlsplit(text)
            host, port, path = (split.hostname or "").lower(), split.port, unquote(split.path)
        except ValueError:  # a bad port or IPv6 literal: compare the text as written
            netloc, _, path = text[scheme.end():].partition("/")
            return netloc.rpartition("@")[2].lower() + _clean_path(path)
        host = f"[{host}]" if ":" in host else host  # IPv6
        if port is not None and port != _DEFAULT_PORTS.get(name):
            host = f"{host}:{port}"
        return host + _clean_path(path)
    colon, slash = text.find(":"), text.find("/")
    if colon > 0 and (slash < 0 or colon < slash):
        # Like git: a ':' before any '/' makes it scp-like ssh, [user@]host:path.
        host = text[:colon].rpartition("@")[2].lower()
        return host + _clean_path(text[colon + 1:])
    return os.path.realpath(os.path.expanduser(text)) if text else ""


def _clean_path(path: str) -> str:
    path = path.rstrip("/")
    if path.endswith(".git"):
        path = path[:-4].rstrip("/")
    # scp paths are relative to the login's home, forges treat both alike.
    return "/" + path.lstrip("/") if path else ""


def _match_key(url: str) -> str:
    """``normalise_repo_url``, case-folded for network URLs (forges ignore owner/name case)."""
    normal = normalise_repo_url(url)
    return normal if normal.startswith("/") else normal.casefold()


# --------------------------------------------------------------------------- signatures


def verify_signature(headers: Mapping[str, str], body: bytes, secret: str) -> Forge:
    """Check the request's signature against ``secret``; return the sending forge.

    Accepted, strongest first: ``X-Gitplug-Signature: sha256=<hex>`` (generic),
    ``X-Hub-Signature-256: sha256=<hex>`` (GitHub, Gitea, Forgejo),
    ``X-Gitea-Signature`` / ``X-Forgejo-Signature: <hex>``, ``X-Hub-Signature:
    sha256=<hex>`` (Bitbucket), ``X-Gitlab-Token: <secret>``; all compared in
    constant time; the forge is told by its event headers. Each HMAC is checked
    over what its forge signs (:func:`signed_bytes`). Raises
    :class:`WebhookRejected` (401) for a missing or wrong signature, or SHA-1 only.
    """
    h = _lower(headers)
    if not secret:
        raise WebhookRejected(403, NO_SECRET_MESSAGE)
    key, forge = secret.encode("utf-8"), _event_forge(h)
    for header, prefixed in _HMAC_HEADERS:
        if header.lower() in h:
            _check_hmac(h[header.lower()], signed_bytes(h, body, forge), key, header,
                        prefixed=prefixed)
            if header == "X-Gitplug-Signature":
                return "generic"
            return forge if forge in ("gitea", "bitbucket") else "github"
    if "x-gitlab-token" in h:
        if not hmac.compare_digest(h["x-gitlab-token"].encode("utf-8", "replace"), key):
            raise WebhookRejected(401, "X-Gitlab-Token does not match webhook.secret; set the "
                                       "GitLab webhook's 'Secret token' to the same value.")
        return "gitlab"
    if forge == "gitlab":
        raise WebhookRejected(401, "missing X-Gitlab-Token: set the GitLab webhook's 'Secret "
                                   "token' to the value of webhook.secret.")
    raise WebhookRejected(401, "missing signature: expected X-Hub-Signature-256 (GitHub, Gitea, "
                               "Forgejo), X-Hub-Signature: sha256=... (Bitbucket), X-Gitlab-Token "
                               "(GitLab) or X-Gitplug-Signature: sha256=<hex HMAC-SHA256 of the "
                               "body>; set the webhook's secret to the value of webhook.secret.")


def signed_bytes(headers: Mapping[str, str], body: bytes, forge: str | None) -> bytes:
    """What ``forge`` computed its HMAC over, for a request with ``headers`` and ``body``.

    GitHub, Bitbucket and gitplug's generic form sign the raw body, whatever its
    content type: with GitHub's ``application/x-www-form-urlencoded`` the form
    body itself. Gitea, Forgejo and Gogs sign the JSON payload: sent as a form
    (``payload=<url-encoded JSON>``), the signature is over the decoded JSON, not
    over the body on the wire (Gitea's ``services/webhook/deliver.go``). A form
    without one ``payload`` field signs nothing: the check fails with 401.
    """
    h = _lower(headers)
    if forge != "gitea" or not _is_form(h):
        return body
    payloads = parse_qs(body, keep_blank_values=True).get(b"payload", [])
    return payloads[0] if len(payloads) == 1 else b""


def _is_form(h: Mapping[str, str]) -> bool:
    return "application/x-www-form-urlencoded" in h.get("content-type", "").lower()


def _check_hmac(value: str, body: bytes, key: bytes, header: str, *, prefixed: bool) -> None:
    given = value.strip()
    if prefixed:
        algo, eq, given = given.partition("=")
        algo = algo.strip().lower()
        if algo == "sha1":
            raise WebhookRejected(401, f"{header} carries a SHA-1 signature, which gitplug "
                                       "refuses; configure the webhook to sign with SHA-256.")
        if not eq or algo != "sha256":
            raise WebhookRejected(401, f"{header} must be 'sha256=<hex HMAC-SHA256 of the "
                                       "body>'; check the webhook's signing settings.")
    expected = hmac.new(key, body, hashlib.sha256).hexdigest().encode("ascii")
    if not hmac.compare_digest(expected, given.strip().lower().encode("utf-8", "replace")):
        raise WebhookRejected(401, f"{header} does not match the body signed with "
                                   "webhook.secret; give the forge's webhook the same secret "
                                   "as GITPLUG_WEBHOOK_SECRET, and make sure no proxy rewrites "
                                   "the body.")


def _event_forge(h: Mapping[str, str]) -> Forge | None:
    """The forge its event headers name; Gitea's own headers win over its X-GitHub-Event."""
    if any(n in h for n in ("x-gitea-signature", "x-forgejo-signature",
                            *_EVENT_HEADERS["gitea"][0][:3])):
        return "gitea"
    forges: tuple[Forge, ...] = ("gitlab", "github", "bitbucket")
    return next((forge for forge in forges if _EVENT_HEADERS[forge][0][0] in h), None)


# --------------------------------------------------------------------------- payloads


def parse_push(headers: Mapping[str, str], body: bytes, forge: str) -> PushEvent:
    """Read the event in ``body`` as ``forge`` sent it (see :func:`verify_signature`).

    Pings and other events come back with ``is_push`` False and their body unread.
    Raises :class:`WebhookRejected` (400) naming what is malformed or missing.
    """
    h = _lower(headers)
    if forge not in _EVENT_HEADERS:
        raise WebhookRejected(400, f"unknown forge {forge!r}; expected one of "
                                   f"{', '.join(_EVENT_HEADERS)}")
    name = cast(Forge, forge)
    event_headers, delivery_headers = _EVENT_HEADERS[name]
    event = _first(h, event_headers) or ("push" if forge == "generic" else None)
    delivery = _first(h, delivery_headers)
    if event is None:
        header = "-".join(part.capitalize() for part in event_headers[0].split("-"))
        raise WebhookRejected(400, f"missing the {header} header, which names the event")
    if event in ("ping", "diagnostics:ping"):
        return PushEvent(name, delivery, (), None, None, True, event)
    if event not in _PUSH_EVENTS:
        return PushEvent(name, delivery, (), None, None, False, event, is_push=False)
    data = _load_json(h, body)
    if event == "System Hook" and data.get("event_name") not in ("push", "tag_push"):
        return PushEvent("gitlab", delivery, (), None, None, False,
                         f"{event}: {data.get('event_name')}", is_push=False)
    repo, project = data.get("repository"), data.get("project")
    if forge == "bitbucket":
        urls = _dedupe(_values(_dig(repo, "links", key), ("href",)) for key in ("html", "clone"))
        refs, deleted, after = _bitbucket_changes(data, event)
    else:
        # A generic payload may give the URL as a plain string.
        urls = _dedupe(_values(project, _URL_KEYS) + (
            _values(repo, _URL_KEYS) if isinstance(repo, dict) else [repo]))
        ref, after = _ref(data.get("ref")), _text(data.get("after"))
        gone = data.get("deleted") is True or (after or "x").strip("0") == ""  # 000...: deleted
        refs, deleted = ([], [ref]) if gone else ([ref], [])
    # Bitbucket Server's documented example and older servers send no repository.links:
    # such a delivery can still deploy the plugin its URL names (handle_webhook).
    if not urls and not (forge == "bitbucket" and event == "repo:refs_changed"):
        raise WebhookRejected(400, f"the {forge} payload names no repository URL (expected "
                                   f"{_URL_FIELDS.get(forge, 'repository.clone_url')})")
    default = _text(_dig(repo, "default_branch")) or _text(_dig(project, "default_branch"))
    return PushEvent(name, delivery, urls, (refs + deleted)[0], after, False, event,
                     refs=tuple(refs), deleted_refs=tuple(deleted), default_branch=default)


def _bitbucket_changes(data: dict[str, Any], event: str) -> tuple[list[str], list[str], str | None]:
    """(refs moved, refs deleted, first new commit) of Bitbucket Cloud's or Server's changes."""
    cloud = event == "repo:push"
    changes = _dig(data, "push", "changes") if cloud else data.get("changes")
    where = "push.changes" if cloud else "changes"
    if not isinstance(changes, list):
        raise WebhookRejected(400, f"the Bitbucket payload has no list {where!r}")
    refs: list[str] = []
    deleted: list[str] = []
    after: str | None = None
    for change in changes:
        if cloud:  # Cloud: {"new": {"type": "branch", "name": ..}, "old": ..}; null new: deleted
            new = _dig(change, "new")
            ref = _bitbucket_ref(new) or _bitbucket_ref(_dig(change, "old"))
            gone, sha = not isinstance(new, dict), _text(_dig(new, "target", "hash"))
        else:  # Server / Data Center: {"ref": {"id": "refs/heads/main"}, "toHash": .., "type": ..}
            ref = _text(_dig(change, "ref", "id")) or _text(_dig(change, "refId"))
            gone, sha = _dig(change, "type") == "DELETE", _text(_dig(change, "toHash"))
        if ref:
            (deleted if gone else refs).append(ref)
            after = after or (None if gone else sha)
    if not refs and not deleted:
        raise WebhookRejected(400, f"the Bitbucket payload's {where!r} names no branch or tag")
    return refs, deleted, after


def _bitbucket_ref(side: Any) -> str | None:
    name = _text(_dig(side, "name"))
    kind = {"branch": "heads", "named_branch": "heads", "tag": "tags"}.get(_dig(side, "type"))
    return f"refs/{kind}/{name}" if kind and name else None


def _load_json(h: Mapping[str, str], body: bytes) -> dict[str, Any]:
    """The payload as a dict; GitHub's and Gitea's form encoding (payload=...) too."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise WebhookRejected(400, f"the body is not UTF-8 (byte {exc.start}); send JSON") from exc
    if _is_form(h):
        form = parse_qs(text)  # at most max_body bytes: cheap
        if "payload" not in form:
            raise WebhookRejected(400, "the form body has no 'payload' field; set the webhook's "
                                       "content type to application/json")
        text = form["payload"][0]
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise WebhookRejected(400, f"the body is not valid JSON: {exc.msg} at line {exc.lineno} "
                                   f"column {exc.colno}") from exc
    except RecursionError as exc:
        raise WebhookRejected(400, "the body is not valid JSON: nested too deeply") from exc
    if not isinstance(data, dict):
        raise WebhookRejected(400, f"the body must be a JSON object, got {type(data).__name__}")
    return data


def _dig(value: Any, *keys: str) -> Any:
    for key in keys:
        value = value.get(key) if isinstance(value, dict) else None
    return value


def _values(mapping: Any, keys: Iterable[str]) -> list[Any]:
    """The values at ``keys`` of a dict, or of each dict in a list; [] for anything else."""
    items = mapping if isinstance(mapping, list) else [mapping]
    return [item.get(key) for item in items if isinstance(item, dict) for key in keys]


def _dedupe(values: Iterable[Any]) -> tuple[str, ...]:
    flat = (v for value in values for v in (value if isinstance(value, list) else [value]))
    return tuple(dict.fromkeys(v.strip() for v in flat if isinstance(v, str) and v.strip()))


def _ref(value: Any) -> str:
    if isinstance(value, str) and value.startswith("refs/") and len(value) > len("refs/"):
        return value
    shown = repr(value) if value is not None else "nothing"
    raise WebhookRejected(400, "the payload's 'ref' must be a full ref such as "
                               f"'refs/heads/main' or 'refs/tags/v1', got {shown[:80]}")


def _lower(headers: Mapping[str, str]) -> dict[str, str]:
    return {str(k).lower(): str(v) for k, v in headers.items()}


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def _first(h: Mapping[str, str], names: Iterable[str]) -> str | None:
    return next((h[n].strip() for n in names if h.get(n, "").strip()), None)


# --------------------------------------------------------------------------- matching


def plugins_for_push(event: PushEvent, plugins: Mapping[str, PluginConfig], *,
                     only: str | None = None) -> tuple[list[str], str]:
    """The plugins (in configuration order) that ``event`` should deploy, and why none.

    A plugin matches when its normalised ``repo`` equals one of the event's URLs
    and its tracked ``ref`` names a pushed ref by git's rules for short names:
    ``main`` matches ``refs/heads/main`` and ``refs/tags/main``, ``refs/heads/x``
    only itself, ``HEAD`` the default branch, and a full commit sha nothing.
    ``only`` restricts the search to that plugin (raises :class:`UnknownPlugin`);
    an event that names no repository URL (Bitbucket Server without
    ``repository.links``) then matches on the ref alone, and matches nothing
    without ``only``. Returns ``(names, "")`` or ``([], reason)``.
    """
    if only is not None and only not in plugins:
        raise UnknownPlugin(only)
    candidates = [plugins[only]] if only is not None else list(plugins.values())
    pushed = {_match_key(url) for url in event.repo_urls}
    same_repo = [p for p in candidates if _match_key(p.repo) in pushed]
    if not event.repo_urls and only is not None:
        same_repo = candidates  # the URL names the plugin; the payload names no repository
    shown = ", ".join(sorted({normalise_repo_url(url) for url in event.repo_urls}))
    if not same_repo:
        if only is not None:
            mine = normalise_repo_url(plugins[only].repo)
            return [], f"plugin {only!r} tracks repository {mine}, not the one pushed ({shown})"
        return [], (f"no plugin's repo: matches the repository pushed ({shown}); check the "
                    "plugins' repo: in the configuration")
    problems = {plugin.name: _ref_problem(plugin.ref, event) for plugin in same_repo}
    matched = [name for name, problem in problems.items() if problem is None]
    return matched, "" if matched else "; ".join(f"plugin {name!r} {problem}"
                                                 for name, problem in problems.items())


def _ref_problem(tracked: str, event: PushEvent) -> str | None:
    """None when a push of ``event`` moves ``tracked``, else why it does not."""
    if _FULL_SHA.fullmatch(tracked):
        return (f"tracks commit {tracked[:12]}, which no push moves; use `gitplug deploy` or "
                "`gitplug rollback` to change it")
    if tracked == "HEAD":
        branches = {r for r in event.refs if r.startswith("refs/heads/")}
        wanted = {f"refs/heads/{event.default_branch}"} if event.default_branch else branches
    elif tracked.startswith("refs/"):
        wanted = {tracked}
    else:  # gitrevisions(7): <name> is tried as refs/<name>, refs/tags/<name>, refs/heads/<name>
        wanted = {f"refs/{tracked}", f"refs/tags/{tracked}", f"refs/heads/{tracked}"}
    if wanted & set(event.refs):
        return None
    if wanted & set(event.deleted_refs):
        return (f"tracks {tracked!r}, which this push deleted; nothing to deploy (the live "
                "release stays)")
    return f"tracks {tracked!r}, not {', '.join(event.refs + event.deleted_refs) or 'any ref'}"


# --------------------------------------------------------------------------- the handler


def handle_webhook(*, headers: Mapping[str, str], body: bytes, secret: str | None,
                   plugins: Mapping[str, PluginConfig], plugin: str | None,
                   remember_delivery: Callable[[str], bool],
                   queue_deploy: Callable[[str, PushEvent], None],
                   is_pinned: Callable[[str], bool] = lambda name: False,
                   max_body: int = MAX_BODY) -> WebhookResponse:
    """Answer one webhook request (see the module docstring for the order of checks).

    Never raises for bad input: every client error is a :class:`WebhookResponse`.
    ``remember_delivery(id)`` returns False for an id seen before; it is called only for
    a verified, parsed push. ``queue_deploy`` must return at once: no git or deploy work
    happens here. A :class:`GitplugError` from a callback (the state store is down)
    answers 503; anything else is a bug and propagates.
    """
    h = _lower(headers)
    early = refuse_from_headers(h, secret=secret, max_body=max_body)
    if early is not None:
        return early
    if len(body) > max_body:
        return _too_large(len(body), max_body)
    assert secret  # refuse_from_headers answered otherwise
    try:
        forge = verify_signature(h, body, secret)
    except WebhookRejected as exc:
        logger.warning("webhook refused (%d): %s", exc.status, exc)
        return _answer(exc.status, "unauthorized", str(exc))
    if plugin is not None and plugin not in plugins:
        return _answer(404, "unknown_plugin", f"no plugin named {plugin!r} in the configuration; "
                                              "check the webhook URL or add it under 'plugins:'")
    try:
        event = parse_push(h, body, forge)
    except WebhookRejected as exc:
        logger.warning("webhook from %s refused (%d): %s", forge, exc.status, exc)
        return _answer(exc.status, "bad_request", str(exc), forge=forge)
    info: dict[str, Any] = {"forge": forge, "event": event.event, "delivery": event.delivery_id}
    if event.is_push and not event.repo_urls and plugin is None:
        return _answer(400, "bad_request", "the delivery names no repository URL (Bitbucket "
                                           "Server without repository.links), so gitplug cannot "
                                           "tell which plugins it is for; point the webhook at "
                                           "<api_prefix>/webhook/<plugin>", **info)
    if not event.is_push:  # a ping, or an event the webhook should not be subscribed to
        if event.is_ping:
            return _answer(200, "pong", f"gitplug received the {forge} ping; push events will "
                                        "deploy matching plugins", **info)
        return _answer(200, "ignored", f"{event.event!r} is not a push event; gitplug acts on "
                                       "pushes only (unsubscribe the webhook from it)", **info)
    queued: list[str] = []  # shared with ``info``: a 503 still lists what was queued
    pinned: dict[str, str] = {}
    info.update(ref=event.ref, after=event.after, queued=queued)
    pushed = ", ".join(event.refs + event.deleted_refs)
    try:
        if event.delivery_id is not None and not remember_delivery(event.delivery_id):
            return _answer(200, "duplicate", f"delivery {event.delivery_id} was already handled;"
                                             " nothing queued", **info)
        names, reason = plugins_for_push(event, plugins, only=plugin)
        for name in names:
            if is_pinned(name):
                pinned[name] = (f"{name} is pinned and ignores webhooks for its tracked ref; "
                                f"run `gitplug resume {name}` to follow it again")
            else:
                queue_deploy(name, event)
                queued.append(name)
    except GitplugError as exc:
        logger.error("webhook %s delivery %s: queueing failed: %s", forge, event.delivery_id, exc)
        return _answer(503, "error", f"could not queue deploys: {exc}", **info)
    logger.info("webhook %s delivery %s for %s: queued %s, pinned %s%s", forge, event.delivery_id,
                pushed, queued, list(pinned), f" ({reason})" if reason else "")
    if not names:
        return _answer(200, "unmatched", reason, **info)
    if not queued:
        return _answer(200, "pinned", f"every plugin tracking {pushed} is pinned; nothing "
                                      "queued", pinned=pinned, **info)
    return _answer(202, "queued", f"queued deploys of {', '.join(queued)} for {pushed}",
                   pinned=pinned, **info)


def refuse_from_headers(headers: Mapping[str, str], *, secret: str | None,
                        max_body: int = MAX_BODY) -> WebhookResponse | None:
    """The answer that needs no body, or None: read the body, then :func:`handle_webhook`.

    403 without a configured secret (nothing would be accepted), 400 for a
    ``Content-Length`` that is not a number, 413 for one over ``max_body``. Call it
    before reading a byte of the body, so that what no forge would send costs
    nothing to refuse.
    """
    h = _lower(headers)
    if not secret:
        return _answer(403, "refused", NO_SECRET_MESSAGE)
    declared = h.get("content-length", "").strip()
    if declared and not re.fullmatch(r"[0-9]+", declared):
        return _answer(400, "bad_request", f"Content-Length {declared[:40]!r} is not a number")
    if declared and int(declared) > max_body:
        return _too_large(int(declared), max_body)
    return None


def read_body(stream: Any, *, max_body: int = MAX_BODY, deadline_s: float = BODY_DEADLINE_S,
              sock: socket.socket | None = None) -> bytes:
    """Read a request body of at most ``max_body`` bytes within ``deadline_s`` seconds.

    ``stream`` is the WSGI input (a chunked body arrives decoded, and counts as
    read); ``sock`` the client's socket when the server exposes it (Werkzeug's
    ``werkzeug.socket``, gunicorn's ``gunicorn.socket``): when the deadline passes,
    its read side is shut, which ends a read blocked on a client that trickles or
    sends nothing. Raises :class:`WebhookRejected`: 413 past ``max_body`` (one byte
    over is enough to know), 408 past the deadline, 400 when the client hung up early.
    """
    started = time.monotonic()
    expired = threading.Event()

    def expire() -> None:
        expired.set()
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RD)
            except OSError:  # already closed by the client: nothing left to wake
                pass

    timer = threading.Timer(deadline_s, expire)
    timer.daemon = True
    timer.start()
    chunks: list[bytes] = []
    size = 0
    try:
        while size <= max_body:
            try:
                chunk = stream.read(min(1 << 16, max_body + 1 - size))
            except Exception as exc:  # noqa: BLE001 - servers say "short body" differently
                # OSError, Werkzeug's ClientDisconnected, gunicorn's NoMoreData ...
                if expired.is_set():
                    break
                raise WebhookRejected(400, f"the client sent less than it announced "
                                           f"({type(exc).__name__}); retry the delivery") from exc
            if expired.is_set() or time.monotonic() - started > deadline_s:
                expired.set()
                break
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    finally:
        timer.cancel()
    if expired.is_set():
        raise WebhookRejected(408, f"the body did not arrive within {deadline_s:g} s (a forge "
                                   "sends it at once); refusing the slow request")
    if size > max_body:
        raise WebhookRejected(413, _too_large(None, max_body).body["message"])
    return b"".join(chunks)


def _too_large(size: int | None, max_body: int) -> WebhookResponse:
    """413; ``size`` None when the body was cut off one byte past the limit."""
    what = f"the body of {size} bytes" if size is not None else "the body"
    return _answer(413, "too_large", f"{what} is over the webhook's limit of {max_body} bytes "
                                     "(webhook.max_body); send push events only, or raise "
                                     "webhook.max_body")


def _answer(status: int, state: str, message: str, **extra: Any) -> WebhookResponse:
    return WebhookResponse(status, {"status": state, "message": message, **extra})
