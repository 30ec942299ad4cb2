"""The push remote over HTTP: ``<api_prefix>/git/<plugin>.git`` (git's smart HTTP protocol).

    GET  /git/<plugin>.git/info/refs?service=git-upload-pack|git-receive-pack
    POST /git/<plugin>.git/git-upload-pack      fetch, clone
    POST /git/<plugin>.git/git-receive-pack     push: deploys the tracked branch first

Served for plugins with ``repo: push`` (README, "Deploy with git push"). HTTP
basic authentication, the user name is ignored: fetching takes the
plugin's ``push_token`` or the ``admin_token`` as the password, pushing
takes the ``push_token``. A missing or wrong password answers 401 with
``WWW-Authenticate: Basic realm="gitplug"``; a password good for fetching
only answers a push with 403. Error bodies are ``text/plain``, which git
shows to the user as ``remote:`` lines.

The body is refused from the headers when ``Content-Length`` is over
``push_max_size``, and otherwise read (and gunzipped, as git sends large
fetch requests) into a spooled temporary file with a deadline and the
same limit before dulwich sees it, so a slow or endless upload ties up
nothing but its own request. The answer is streamed: a push's deploy stages
reach the terminal while they run. The protocol and the push rules
themselves live in :mod:`gitplug.deploy.hosted`.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import logging
import queue
import tempfile
import threading
import time
import typing as t
import zlib
from collections.abc import Callable, Iterator

from flask import Blueprint, Flask, Response, request

from ..config import GitplugConfig, PluginConfig
from ..deploy.hosted import SERVICES, HostedRepos

if t.TYPE_CHECKING:
    from .facade import GitplugFacade

__all__ = ["register_git_remote", "BODY_DEADLINE_S"]

logger = logging.getLogger(__name__)

GIT_BLUEPRINT = "gitplug_git"
#: Seconds to read a request body in (a 100 MiB push at about 350 KiB/s).
BODY_DEADLINE_S: t.Final = 300.0
_CHUNK = 64 << 10
_REALM = 'Basic realm="gitplug"'
#: Chunks of an answer waiting for a slow client before the producer stops.
_QUEUE_CHUNKS = 64
_PUT_TIMEOUT_S = 60.0


class _Refused(Exception):
    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


def _text(status: int, message: str, headers: dict[str, str] | None = None) -> Response:
    return Response(message.rstrip("\n") + "\n", status=status, content_type="text/plain; charset=utf-8",
                    headers=headers or {})


def _password() -> str | None:
    """The password of the request's HTTP basic credentials (the user name is not checked)."""
    scheme, _, value = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "basic" or not value:
        return None
    try:
        decoded = base64.b64decode(value.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None
    return decoded.partition(":")[2]


def _matches(given: str | None, token: str | None) -> bool:
    return bool(given and token) and hmac.compare_digest(given.encode(), token.encode())  # type: ignore[union-attr]


def _authorise(config: GitplugConfig, plugin: PluginConfig | None, name: str, push: bool) -> PluginConfig:
    """The hosted plugin, when the credentials may fetch (or push) it; else :class:`_Refused`."""
    given = _password()
    admin = _matches(given, config.admin_token)
    pusher = plugin is not None and _matches(given, plugin.push_token)
    if plugin is None:
        if admin or any(_matches(given, p.push_token) for p in config.plugins.values()):
            raise _Refused(404, f"gitplug hosts no repository {name}.git: the plugin does not exist or"
                                " is not configured with 'repo: push'.")
        raise _Refused(401, "authentication required: the password is a push token of this plugin"
                            " (or the admin token, to fetch)", {"WWW-Authenticate": _REALM})
    if pusher or (admin and not push):
        return plugin
    if admin and push:
        raise _Refused(403, f"the admin token may fetch but not push; push with the push_token of {name}.")
    if push and not plugin.push_token:
        raise _Refused(403, f"pushing to {name} is disabled: it has no push_token. Set"
                            f" `push_token: ${{{name.upper().replace('-', '_')}_PUSH_TOKEN}}` under"
                            f" plugins.{name} in deploy.yaml.")
    raise _Refused(401, "wrong or missing password: use the plugin's push_token (or the admin token, to"
                        " fetch) as the HTTP password", {"WWW-Authenticate": _REALM})


def _read_body(limit: int) -> t.IO[bytes]:
    """The request body, gunzipped, in a spooled temporary file; :class:`_Refused` over ``limit``."""
    length = request.content_length
    if length is not None and length > limit:
        raise _Refused(413, f"the push is {length} bytes, over push_max_size ({limit} bytes); raise"
                            " push_max_size in deploy.yaml, or push less at once.")
    gzipped = request.headers.get("Content-Encoding", "").strip().lower() in ("gzip", "x-gzip")
    inflate = zlib.decompressobj(16 + zlib.MAX_WBITS) if gzipped else None
    out = tempfile.SpooledTemporaryFile(max_size=8 << 20)  # noqa: SIM115 - handed to the caller
    deadline = time.monotonic() + BODY_DEADLINE_S
    sock = request.environ.get("werkzeug.socket")
    before = sock.gettimeout() if sock is not None else None
    total = 0
    try:
        stream = request.stream
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise _Refused(408, f"the request body took over {BODY_DEADLINE_S:g} s to arrive.")
            if sock is not None:
                sock.settimeout(remaining)  # a stalled client cannot hold the read past the deadline
            try:
                chunk = stream.read(_CHUNK)
            except TimeoutError:
                raise _Refused(408, f"the request body took over {BODY_DEADLINE_S:g} s to arrive.") from None
            if not chunk:
                break
            if inflate is not None:
                try:
                    chunk = inflate.decompress(chunk, limit + 1 - total)
                except zlib.error:
                    raise _Refused(400, "the gzip-encoded request body is corrupt.") from None
            total += len(chunk)
            if total > limit:
                raise _Refused(413, f"the push is over push_max_size ({limit} bytes); raise push_max_size"
                                    " in deploy.yaml, or push less at once.")
            out.write(chunk)
    except BaseException:
        out.close()
        raise
    finally:
        if sock is not None:
            sock.settimeout(before)
    out.seek(0)
    return out


def _stream(work: Callable[[Callable[[bytes], None]], None], content_type: str, what: str) -> Response:
    """Run ``work(write)`` in a thread and stream what it writes as the answer.

    A client that goes away ends the streaming; ``work`` then gets OSError
    from ``write`` (a push's deploy goes on regardless and is recorded).
    """
    chunks: queue.Queue[bytes | None] = queue.Queue(maxsize=_QUEUE_CHUNKS)
    gone = threading.Event()

    def write(data: bytes) -> None:
        if gone.is_set():
            raise OSError("the client went away")
        try:
            chunks.put(bytes(data), timeout=_PUT_TIMEOUT_S)
        except queue.Full:
            gone.set()
            raise OSError("the client stopped reading") from None

    def run() -> None:
        try:
            work(write)
        except OSError as exc:
            logger.info("%s: %s", what, exc)
        except Exception:  # noqa: BLE001 - logged; the client sees the answer end
            logger.exception("%s failed", what)
        finally:
            while True:
                try:
                    chunks.put(None, timeout=1.0)
                    break
                except queue.Full:
                    if gone.is_set():
                        break

    thread = threading.Thread(target=run, name="gitplug-git", daemon=True)
    thread.start()

    def body() -> Iterator[bytes]:
        try:
            while (chunk := chunks.get()) is not None:
                yield chunk
        finally:
            gone.set()

    return Response(body(), content_type=content_type,
                    headers={"Cache-Control": "no-cache, max-age=0, must-revalidate", "Pragma": "no-cache"})


def register_git_remote(app: Flask, gp: GitplugFacade, current_config: Callable[[], GitplugConfig]) -> None:
    """Register the push remote's routes under ``<api_prefix>/git``."""
    bp = Blueprint(GIT_BLUEPRINT, __name__)
    hosted: list[HostedRepos] = []

    def repos() -> HostedRepos:
        if not hosted:
            hosted.append(HostedRepos(gp.deployer))
        return hosted[0]

    def plugin_for(name: str, push: bool) -> PluginConfig:
        config = current_config()
        return _authorise(config, repos().plugin(name), name, push)

    @bp.errorhandler(_Refused)
    def refused(exc: _Refused) -> Response:
        return _text(exc.status, exc.message, exc.headers)

    @bp.get("/<name>.git/info/refs")
    def info_refs(name: str) -> Response:
        service = request.args.get("service", "")
        if service not in SERVICES:
            return _text(403, "only git's smart HTTP protocol is served here (git 1.6.6 or later);"
                              " dumb HTTP is not.")
        plugin = plugin_for(name, push=service == "git-receive-pack")
        return _stream(lambda write: repos().advertise(plugin, service, write),
                       f"application/x-{service}-advertisement", f"plugin {name}: {service} refs")

    @bp.post("/<name>.git/<any('git-upload-pack', 'git-receive-pack'):service>")
    def service(name: str, service: str) -> Response:
        plugin = plugin_for(name, push=service == "git-receive-pack")
        if request.mimetype != f"application/x-{service}-request":
            return _text(415, f"expected Content-Type application/x-{service}-request.")
        body = _read_body(current_config().push_max_size)
        run = repos().receive_pack if service == "git-receive-pack" else repos().upload_pack

        def work(write: Callable[[bytes], None]) -> None:
            with body:
                run(plugin, body.read, write)

        return _stream(work, f"application/x-{service}-result", f"plugin {name}: {service}")

    app.register_blueprint(bp, url_prefix=current_config().api_prefix.rstrip("/") + "/git")
