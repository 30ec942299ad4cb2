"""Validating the plain configuration tree into :class:`~gitplug.config.GitplugConfig`.

The second half of :func:`gitplug.config.load_config` and
:func:`~gitplug.config.config_from_mapping`: :func:`_finish` runs
:class:`_Checker` over the values :mod:`gitplug.config.yamlfile` read, checks
every key of the README's "Configuration" (types, ranges, URLs, refs, prefixes that clash),
reports each problem to the :class:`~gitplug.config.yamlfile._Report`, and returns
the frozen configuration only when no problem was reported.

Separate from the reading because it is about the schema and knows nothing
of YAML nodes; adding a setting touches this module (and
:mod:`gitplug.config.values`) only.
"""

from __future__ import annotations

import difflib
import logging
import math
import os
import re
import shlex
import shutil
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any
from urllib.parse import urlsplit

from ..errors import ConfigError, redact_url
from ..prefixes import PrefixPattern, mount_key, prefix_problem, prefixes_overlap, under_prefix
from .values import (
    DEFAULT_PUSH_MAX_SIZE,
    DEFAULT_TEST_COMMAND,
    DEFAULT_WEBHOOK_MAX_BODY,
    NOTIFY_EVENTS,
    NOTIFY_FORMATS,
    VERIFY_MODES,
    AutoRollback,
    Canary,
    Credential,
    DiscoverConfig,
    GitplugConfig,
    NotifyTarget,
    PluginConfig,
    VerifyConfig,
    hosted_repo_path,
)
from .yamlfile import _Interpolated, _KeyPath, _plain, _Report, _show

logger = logging.getLogger(__name__)

# --------------------------------------------------------------------------- validating

_TOP_KEYS = ("data_dir", "poll_interval", "keep_releases", "state", "host_id", "admin_token",
             "webhook", "api_prefix", "push_max_size", "public_url", "host_url", "notify", "limits",
             "test_sandbox", "test_user", "canary", "discover", "credentials", "verify", "plugins")
_HOST_ID = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.:@-]{0,127}\Z")
_NOTIFY_KEYS = ("url", "events", "format", "plugins", "secret", "token", "timeout")
#: The path a forge status entry's ``url`` must end with (the repository's API URL).
_FORGE_PATHS = {
    "github": (re.compile(r"(/api/v3)?/repos/[^/]+/[^/]+\Z"),
               "https://api.github.com/repos/OWNER/REPO (GitHub Enterprise: https://HOST/api/v3/repos/OWNER/REPO)"),
    "gitlab": (re.compile(r"/api/v4/projects/[^/]+\Z"),
               "https://gitlab.example.com/api/v4/projects/ID (the numeric id, or the URL-encoded path group%2Fproject)"),
    "gitea": (re.compile(r"/api/v1/repos/[^/]+/[^/]+\Z"),
              "https://gitea.example.com/api/v1/repos/OWNER/REPO"),
}
_VERIFY_KEYS = ("mode", "allowed_signers", "gpg_keys")
_CREDENTIAL_KEYS = ("url", "username", "password", "ssh_key", "passphrase", "known_hosts")
#: The Debian package that installs each tool ``verify`` needs.
_TOOL_PACKAGES = {"git": "git", "ssh-keygen": "openssh-client", "gpg": "gnupg"}
_LIMIT_KEYS = ("max_file_size", "max_release_size", "max_files")
_SANDBOXES = ("none", "bwrap")
#: A ``discover:`` entry: where to look, and the defaults of the plugins found.
_DISCOVER_KEYS = ("repo", "ref", "path", "url_prefix", "entry", "poll_interval", "test", "test_timeout",
                  "auto_rollback", "canary", "config", "verify")
_PLUGIN_KEYS = ("repo", "ref", "path", "url_prefix", "subdomain", "entry", "poll_interval", "test", "test_timeout",
                "auto_rollback", "canary", "config", "push_token", "allow_force_push", "verify")
#: ``repo: push``: gitplug hosts the repository itself.
_PUSH_REPO = "push"
#: Tokens shorter than this are refused (``admin_token``, ``webhook.secret``,
#: ``push_token``): they guard code execution on the server.
_MIN_TOKEN = 16
_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*(B|KB|KiB|MB|MiB|GB|GiB)?\s*\Z", re.IGNORECASE)
_SIZE_UNITS = {"b": 1, "kb": 1000, "kib": 1 << 10, "mb": 1000 ** 2, "mib": 1 << 20,
               "gb": 1000 ** 3, "gib": 1 << 30}
_ROLLBACK_KEYS = ("max_error_rate", "min_requests", "window")
_CANARY_KEYS = ("percent", "min_requests", "duration", "max_error_rate")
_PLUGIN_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*\Z")
_URL_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://")
_REPO_SCHEMES = ("http", "https", "ssh", "git", "file")
_BAD_REF = re.compile(r"[\s\x00-\x1f\x7f~^:?*\[\\]|\.\.|@\{|^-")
_SECONDS = "a positive number of seconds"
#: Far above what any forge sends (GitHub caps a delivery at 25 MB).
_MAX_WEBHOOK_BODY = 1 << 30
#: Dot-separated labels; a label may be a converter (``<user>``), as in Flask.
_SUBDOMAIN = re.compile(r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?|<[A-Za-z_][A-Za-z0-9_:]*>)"
                        r"(?:\.(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?|<[A-Za-z_][A-Za-z0-9_:]*>))*")


def _finish(data: Any, report: _Report, base_dir: Path) -> GitplugConfig:
    config = _Checker(report, base_dir).top(data)
    report.raise_if_any()
    if config is None:  # unreachable: no config means a problem was reported
        raise ConfigError("invalid configuration", file=report.file)
    logger.debug("configuration from %s: %d plugin(s): %s", report.file, len(config.plugins),
                 ", ".join(config.plugins))
    return config


def _bool_value(value: Any) -> bool | None:
    """``value`` as a YAML boolean (also "true"/"false" from ``${NAME}``), else None."""
    if isinstance(value, bool):
        return value
    if isinstance(value, _Interpolated) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    return None


def _api_prefix_problem(prefix: str) -> str | None:
    if prefix == "/":
        return "'/' is the site root, which stays the host application's"
    if "<" in prefix or ">" in prefix:
        return "no '<' or '>': gitplug's API prefix is a literal path"
    problem = prefix_problem(prefix)
    if problem is None and prefix.endswith("/"):
        return "remove the trailing '/'"
    return problem


class _Checker:
    """Validates the plain tree against the schema, reporting every problem it finds."""

    def __init__(self, report: _Report, base_dir: Path) -> None:
        self.report = report
        self.base_dir = base_dir
        #: The top-level ``verify``: what a plugin without its own gets.
        self.default_verify: VerifyConfig | None = None
        #: ``{plugin name: url_prefix}`` of every plugin whose prefix is valid,
        #: even if another of its settings is not: clashes are reported too.
        self.prefixes: dict[str, str] = {}
        #: The top-level ``canary``: the default of plugins that set none.
        self.default_canary: Canary | None = None

    def fail(self, path: _KeyPath, what: str, value: Any) -> None:
        self.report.expected(path, what, value)

    def keys(self, path: _KeyPath, mapping: Mapping[Any, Any], allowed: tuple[str, ...]) -> None:
        for key in mapping:
            if key in allowed or (not path and str(key).startswith("x-")):
                continue  # top-level x-... keys hold YAML anchors, as in docker-compose
            close = difflib.get_close_matches(str(key), allowed, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else "."
            self.report.add(path + (str(key),),
                            f"unknown key {key!r}{hint} Allowed here: {', '.join(allowed)}")

    def number(self, path: _KeyPath, value: Any, what: str = _SECONDS, *,
               at_most: float | None = None) -> float | None:
        """A finite number > 0 (and <= ``at_most``); bools are refused."""
        number: float | None = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, _Interpolated):
            try:
                number = float(value.strip())
            except ValueError:
                number = None
        if number is None or not math.isfinite(number) or number <= 0 or (
                at_most is not None and number > at_most):
            self.fail(path, what, value)
            return None
        return number

    def integer(self, path: _KeyPath, value: Any, what: str) -> int | None:
        """An integer >= 1 (also from ``${NAME}``); bools are refused."""
        number: int | None = None
        if isinstance(value, int) and not isinstance(value, bool):
            number = value
        elif isinstance(value, _Interpolated) and re.fullmatch(r"\s*\+?\d+\s*", value):
            number = int(value)
        if number is None or number < 1:
            self.fail(path, what, value)
            return None
        return number

    def size(self, path: _KeyPath, value: Any) -> int | None:
        """A size in bytes: an integer, or text such as ``100MiB`` / ``25 MB``."""
        what = "a size such as 100MiB, 25MB or a number of bytes"
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
        match = _SIZE.match(value) if isinstance(value, str) else None
        if match is None:
            self.fail(path, what, value)
            return None
        number = int(float(match.group(1)) * _SIZE_UNITS[(match.group(2) or "b").lower()])
        if number < 1:
            self.fail(path, what, value)
            return None
        return number

    def webhook_max_body(self, value: Any) -> int | None:
        path: _KeyPath = ("webhook", "max_body")
        size = self.size(path, value)
        if size is not None and size > _MAX_WEBHOOK_BODY:
            self.fail(path, f"a size of at most {_MAX_WEBHOOK_BODY >> 20}MiB (GitHub sends 25MB "
                            "at most)", value)
            return None
        return size

    def string(self, path: _KeyPath, value: Any, what: str) -> str | None:
        if isinstance(value, str) and value:
            return str(value)
        hint = ""
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            hint = f" (quote it: '{value}')"
        self.fail(path, what + hint, value)
        return None

    def secret(self, path: _KeyPath, value: Any) -> str | None:
        if value is None or value == "":
            # An empty ${TOKEN} means "not configured": the endpoints then refuse.
            if value == "":
                logger.warning("%s: %s is empty; treating it as not set", self.report.file,
                               ".".join(path))
            return None
        if isinstance(value, str):
            return str(value)
        # Never echo a secret's value.
        self.report.add(path, f"expected a string, got a value of type {type(value).__name__} "
                              "(quote it, or better use ${NAME} from the environment)")
        return None

    def long_secret(self, path: _KeyPath, value: Any) -> str | None:
        """A secret of at least :data:`_MIN_TOKEN` characters (it guards the server)."""
        secret = self.secret(path, value)
        if secret is not None and len(secret) < _MIN_TOKEN:
            # Never echo a secret's value, not even its start.
            self.report.add(path, f"too short ({len(secret)} characters); use at least "
                                  f"{_MIN_TOKEN}, for example the output of `python -c "
                                  "'import secrets; print(secrets.token_urlsafe(24))'`")
            return None
        return secret

    def limits(self, value: Any) -> dict[str, int]:
        path: _KeyPath = ("limits",)
        if not isinstance(value, Mapping):
            self.fail(path, "a mapping such as {max_file_size: 100MiB, max_release_size: 1GiB, "
                            "max_files: 50000}", value)
            return {}
        self.keys(path, value, _LIMIT_KEYS)
        found: dict[str, int] = {}
        for key in ("max_file_size", "max_release_size"):
            if key in value and (size := self.size(path + (key,), value[key])) is not None:
                found[key] = size
        if "max_files" in value:
            count = self.integer(path + ("max_files",), value["max_files"],
                                 "an integer >= 1 (files per release)")
            if count is not None:
                found["max_files"] = count
        return found

    def test_user(self, value: Any) -> str | None:
        path: _KeyPath = ("test_user",)
        if value is None:
            return None
        user = self.string(path, value, "a user name or a numeric uid to run tests as")
        if user is None:
            return None
        import pwd  # Unix only, like the test gate that uses it

        try:
            entry = pwd.getpwuid(int(user)) if user.isdigit() else pwd.getpwnam(user)
        except (KeyError, OverflowError):
            self.report.add(path, f"no user {user!r} on this host: create it (useradd) or name "
                                  "an existing one (README \"Security model\")")
            return None
        return entry.pw_name

    def prefix(self, path: _KeyPath, value: Any, *, api: bool = False) -> str | None:
        prefix = self.string(path, value, "a URL path prefix such as '/hello'")
        problem = (_api_prefix_problem if api else prefix_problem)(prefix) if prefix else None
        if problem:
            self.fail(path, f"a URL path prefix such as '/hello' ({problem})", value)
            return None
        return prefix

    def local_path(self, path: _KeyPath, value: Any, what: str) -> str | None:
        text = self.string(path, value, what)
        if text is None:
            return None
        return os.path.normpath(os.path.join(self.base_dir, os.path.expanduser(text)))

    def top(self, data: Any) -> GitplugConfig | None:
        root: _KeyPath = ()
        if not isinstance(data, Mapping):
            self.report.add(root, "the top level must be a mapping of settings "
                                  f"(data_dir:, plugins:, ...), got {_show(data)}")
            return None
        self.keys(root, data, _TOP_KEYS)
        get = data.get
        data_dir = Path(self.local_path(("data_dir",), get("data_dir", ".gitplug"),
                                        "a directory path") or self.base_dir / ".gitplug")
        poll = 60.0
        if "poll_interval" in data:
            poll = self.number(("poll_interval",), data["poll_interval"]) or poll
        keep = 5
        if "keep_releases" in data:
            keep = self.integer(("keep_releases",), data["keep_releases"],
                                "an integer >= 1 (releases kept per plugin)") or keep
        state = self.state(get("state"), data_dir)
        host_id = ""
        if get("host_id") is not None:
            text = self.string(("host_id",), get("host_id"), "a host name such as 'web-1'")
            if text is not None and not _HOST_ID.match(text):
                self.fail(("host_id",), "a host name such as 'web-1' (letters, digits, . _ : @ -; "
                                        "at most 128 characters)", text)
            elif text is not None:
                host_id = text
        admin_token = self.long_secret(("admin_token",), get("admin_token"))
        webhook_secret = None
        webhook_max_body = DEFAULT_WEBHOOK_MAX_BODY
        webhook = get("webhook")
        if isinstance(webhook, Mapping):
            self.keys(("webhook",), webhook, ("secret", "max_body"))
            webhook_secret = self.long_secret(("webhook", "secret"), webhook.get("secret"))
            if "max_body" in webhook:
                webhook_max_body = self.webhook_max_body(webhook["max_body"]) or webhook_max_body
        elif webhook is not None:
            self.fail(("webhook",), "a mapping such as {secret: ${GITPLUG_WEBHOOK_SECRET}}",
                      webhook)
        api_prefix = "/_gitplug"
        if "api_prefix" in data:
            api_prefix = self.prefix(("api_prefix",), data["api_prefix"], api=True) or api_prefix
        push_max_size = DEFAULT_PUSH_MAX_SIZE
        if "push_max_size" in data:
            push_max_size = self.size(("push_max_size",), data["push_max_size"]) or push_max_size
        limits = self.limits(data["limits"]) if "limits" in data else {}
        sandbox = "none"
        if "test_sandbox" in data:
            raw_sandbox = data["test_sandbox"]
            if raw_sandbox in _SANDBOXES:
                sandbox = raw_sandbox
            else:
                self.fail(("test_sandbox",), "none or bwrap", raw_sandbox)
        test_user = self.test_user(get("test_user"))
        credentials = self.credentials(get("credentials"))
        self.default_verify = self.verify(("verify",), get("verify")) if "verify" in data else None
        #: The default every plugin (and discover entry) without its own ``canary`` takes.
        self.default_canary = self.canary(("canary",), get("canary"))
        plugins: dict[str, PluginConfig] = {}
        raw_plugins = get("plugins")
        if isinstance(raw_plugins, Mapping):
            for name, raw in raw_plugins.items():
                plugin = self.plugin(name, raw, poll, data_dir)
                if plugin is not None:
                    plugins[plugin.name] = plugin
        elif raw_plugins is not None:
            self.fail(("plugins",), "a mapping of plugin name to settings "
                                    "(plugins: {hello: {repo: ...}})", raw_plugins)
        self.clashes(api_prefix)
        public_url = None
        if get("public_url") is not None:
            public_url = self.http_url(("public_url",), data["public_url"],
                                       "the URL people reach this server at, e.g. https://deploy.example.com")
        host_url = None
        if get("host_url") is not None:
            host_url = self.http_url(("host_url",), data["host_url"],
                                     "the URL the other hosts of the fleet reach this one at, "
                                     "e.g. http://web-1.internal:5000")
        notify = self.notify(get("notify"), plugins)
        discover: list[DiscoverConfig] = []
        raw_discover = get("discover")
        if isinstance(raw_discover, list):
            for index, raw in enumerate(raw_discover):
                entry = self.discover_entry(("discover", str(index)), raw, poll)
                if entry is not None:
                    discover.append(entry)
        elif raw_discover is not None:
            self.fail(("discover",), "a list of {repo: ..., path: 'plugins/*', ...} entries",
                      raw_discover)
        return GitplugConfig(data_dir=data_dir, poll_interval=poll, keep_releases=keep,
                             state=state, host_id=host_id, admin_token=admin_token,
                             webhook_secret=webhook_secret, api_prefix=api_prefix,
                             webhook_max_body=webhook_max_body, push_max_size=push_max_size,
                             public_url=public_url.rstrip("/") if public_url else None,
                             host_url=host_url.rstrip("/") if host_url else None, notify=notify,
                             plugins=plugins, discover=tuple(discover), source=self.report.file,
                             base_dir=self.base_dir, test_sandbox=sandbox, test_user=test_user,
                             credentials=credentials, canary=self.default_canary, verify=self.default_verify, **limits)

    def http_url(self, path: _KeyPath, value: Any, what: str) -> str | None:
        """An ``http://`` or ``https://`` URL with a host."""
        text = self.string(path, value, what)
        if text is None:
            return None
        try:
            split = urlsplit(text)
            ok = split.scheme in ("http", "https") and bool(split.hostname) and split.port != -1
        except ValueError:
            ok = False
        if not ok or any(c.isspace() for c in text):
            self.fail(path, what, value)
            return None
        return text

    def notify(self, value: Any, plugins: Mapping[str, PluginConfig]) -> tuple[NotifyTarget, ...]:
        path: _KeyPath = ("notify",)
        if value is None:
            return ()
        if not isinstance(value, list):
            self.fail(path, "a list of endpoints such as - {url: https://..., events: [deploy_failed]}",
                      value)
            return ()
        targets = []
        for index, raw in enumerate(value):
            target = self.notify_target(path + (str(index),), raw, plugins)
            if target is not None:
                targets.append(target)
        return tuple(targets)

    def notify_target(self, path: _KeyPath, raw: Any,
                      plugins: Mapping[str, PluginConfig]) -> NotifyTarget | None:
        if not isinstance(raw, Mapping):
            self.fail(path, "a mapping {url, events, format, ...}", raw)
            return None
        self.keys(path, raw, _NOTIFY_KEYS)
        before = len(self.report.problems)
        fmt = "json"
        if "format" in raw:
            fmt = self.string(path + ("format",), raw["format"], "one of " + ", ".join(NOTIFY_FORMATS)) or fmt
            if fmt not in NOTIFY_FORMATS:
                self.fail(path + ("format",), "one of " + ", ".join(NOTIFY_FORMATS), raw["format"])
        if "url" not in raw:
            self.report.add(path + ("url",), "missing; expected the endpoint's http(s) URL")
            url = None
        else:
            url = self.http_url(path + ("url",), raw["url"], "an http(s) URL with a host")
        if url is not None and fmt in _FORGE_PATHS:
            shape, example = _FORGE_PATHS[fmt]
            if not shape.search(urlsplit(url).path.rstrip("/")):
                self.fail(path + ("url",), f"the repository's API URL for format {fmt}: {example}", url)
        events: frozenset[str] = frozenset()
        raw_events = raw.get("events")
        if not isinstance(raw_events, list) or not raw_events or \
                not all(isinstance(e, str) for e in raw_events):
            self.fail(path + ("events",), "a non-empty list of events: " + ", ".join(NOTIFY_EVENTS), raw_events)
        else:
            for event in raw_events:
                if event not in NOTIFY_EVENTS:
                    close = difflib.get_close_matches(event, NOTIFY_EVENTS, n=1)
                    hint = f"; did you mean {close[0]!r}?" if close else "."
                    self.report.add(path + ("events",), f"unknown event {event!r}{hint} Events: "
                                                        + ", ".join(NOTIFY_EVENTS))
            events = frozenset(raw_events)
        only: frozenset[str] | None = None
        if "plugins" in raw:
            names = raw["plugins"]
            if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
                self.fail(path + ("plugins",), "a non-empty list of plugin names", names)
            else:
                for name in names:
                    if name not in plugins:
                        self.report.add(path + ("plugins",), f"no plugin named {name!r} under plugins:")
                only = frozenset(names)
        secret = self.secret(path + ("secret",), raw.get("secret"))
        token = self.secret(path + ("token",), raw.get("token"))
        if secret is not None and fmt != "json":
            self.report.add(path + ("secret",), f"a secret signs format json only; format {fmt} "
                                                "takes none (a forge format takes a token)")
        if fmt in _FORGE_PATHS and token is None and "token" not in raw:
            self.report.add(path + ("token",), f"missing; format {fmt} needs the forge's API token, "
                                               "e.g. token: ${FORGE_TOKEN}")
        if token is not None and fmt not in _FORGE_PATHS:
            self.report.add(path + ("token",), f"a token is for the forge formats "
                                               f"(github, gitlab, gitea); format {fmt} takes none")
        timeout = 10.0
        if "timeout" in raw:
            timeout = self.number(path + ("timeout",), raw["timeout"], at_most=300.0) or timeout
        if len(self.report.problems) > before or url is None:
            return None
        return NotifyTarget(url=url, events=events, format=fmt, plugins=only, secret=secret,
                            token=token, timeout=timeout)

    def state(self, value: Any, data_dir: Path) -> str:
        path: _KeyPath = ("state",)
        what = ("sqlite:///PATH (relative to the configuration), sqlite:////ABSOLUTE/PATH "
                "or postgresql://USER@HOST[:PORT]/DATABASE")
        if value is None:
            return f"sqlite:///{data_dir}/state.db"
        text = self.string(path, value, what)
        if text is None:
            return ""
        if text.startswith("sqlite:///") and len(text) > len("sqlite:///"):
            file = text[len("sqlite:///"):]
            # sqlite:////abs is absolute already; sqlite:///rel resolves like every path here.
            return "sqlite:///" + os.path.normpath(os.path.join(self.base_dir, file))
        if text.startswith(("postgresql://", "postgres://")):
            try:
                split = urlsplit(text)
                if (split.port or 0) >= 0 and split.path.strip("/"):  # .port raises on a bad port
                    return text
            except ValueError:
                pass
        # The value may hold a password: show the redacted form only.
        self.fail(path, what, redact_url(text))
        return ""

    def plugin(self, name: Any, raw: Any, default_poll: float, data_dir: Path) -> PluginConfig | None:
        path: _KeyPath = ("plugins", str(name))
        if not isinstance(name, str) or not _PLUGIN_NAME.match(name):
            self.report.add(path, f"invalid plugin name {_show(name)}: expected letters, digits, "
                                  "'_' and '-', starting with a letter or '_' (it becomes a "
                                  "Flask blueprint name, so no dots or spaces)")
            return None
        if not isinstance(raw, Mapping):
            self.fail(path, "a mapping of plugin settings with at least 'repo:'", raw)
            return None
        self.keys(path, raw, _PLUGIN_KEYS)
        problems_before = len(self.report.problems)

        def opt(key: str, check: Any, *args: Any, default: Any) -> Any:
            return check(path + (key,), raw[key], *args) if key in raw else default

        if "repo" not in raw:
            self.report.add(path + ("repo",), "missing; expected the plugin's git repository "
                                              "(a URL or a local path)")
        hosted = raw.get("repo") == _PUSH_REPO
        if hosted:
            repo: str | None = str(hosted_repo_path(data_dir, name))
        else:
            repo = self.repo(path + ("repo",), raw["repo"]) if "repo" in raw else None
        ref = opt("ref", self.ref, default="main")
        push_token, allow_force = self.push_settings(path, raw, hosted, ref)
        subdir = opt("path", self.repo_path, default=None)
        url_prefix = opt("url_prefix", self.prefix, default=None)
        # A plugin without one is checked for clashes at /<name>; the prefix its
        # constructor declares is checked by the runtime when it loads.
        if url_prefix is not None or "url_prefix" not in raw:
            self.prefixes[name] = mount_key(url_prefix or f"/{name}")
        subdomain = opt("subdomain", self.subdomain, default=None)
        entry = opt("entry", self.entry, default=None)
        poll = opt("poll_interval", self.number, default=default_poll)
        test, test_is_default = opt("test", self.test, default=(DEFAULT_TEST_COMMAND, True))
        timeout = opt("test_timeout", self.number, default=120.0)
        rollback = opt("auto_rollback", self.auto_rollback, default=None)
        canary = opt("canary", self.canary, default=self.default_canary)
        config = opt("config", self.free_form, default={})
        verify = opt("verify", self.verify, default=self.default_verify)
        if len(self.report.problems) > problems_before or repo is None:
            return None
        return PluginConfig(name=name, repo=repo, ref=ref, path=subdir, url_prefix=url_prefix,
                            subdomain=subdomain, entry=entry,
                            poll_interval=poll, test=test, test_is_default=test_is_default,
                            test_timeout=timeout, auto_rollback=rollback, canary=canary, hosted=hosted,
                            push_token=push_token, allow_force_push=allow_force,
                            config=MappingProxyType(config), verify=verify)

    def push_settings(self, path: _KeyPath, raw: Mapping[str, Any], hosted: bool,
                      ref: str | None) -> tuple[str | None, bool]:
        """``push_token`` and ``allow_force_push``, which only ``repo: push`` takes."""
        if not hosted:
            for key in ("push_token", "allow_force_push"):
                if key in raw:
                    self.report.add(path + (key,), f"{key} applies only to a plugin with "
                                                   "'repo: push' (hosted by gitplug); remove it "
                                                   "or set repo: push")
            return None, False
        if ref is not None and (ref.startswith("refs/") or ref == "HEAD"
                                or re.fullmatch(r"[0-9a-fA-F]{40}", ref)):
            self.fail(path + ("ref",), "with 'repo: push', the branch whose pushes deploy, "
                                       "e.g. main", ref)
        token = self.secret(path + ("push_token",), raw.get("push_token"))
        if token is not None and len(token) < _MIN_TOKEN:
            self.report.add(path + ("push_token",), f"the push token is {len(token)} characters "
                                                    f"long; use at least {_MIN_TOKEN} (e.g. the "
                                                    "output of `openssl rand -hex 24`)")
            token = None
        allow = False
        if "allow_force_push" in raw:
            flag = _bool_value(raw["allow_force_push"])
            if flag is None:
                self.fail(path + ("allow_force_push",), "true or false", raw["allow_force_push"])
            allow = bool(flag)
        return token, allow

    def repo(self, path: _KeyPath, value: Any) -> str | None:
        what = ("a git URL (https://, http://, ssh://, git://, file://, user@host:path) "
                "or a local path")
        repo = self.string(path, value, what)
        if repo is None:
            return None
        if repo.startswith("-"):  # would be read by git as an option
            self.fail(path, what + " not starting with '-'", value)
            return None
        scheme = _URL_SCHEME.match(repo)
        if scheme:
            split = urlsplit(repo)
            if scheme.group(1).lower() not in _REPO_SCHEMES:
                self.fail(path, what, value)
            elif scheme.group(1).lower() == "file" and split.path:
                return repo
            elif scheme.group(1).lower() != "file" and split.hostname:
                return repo
            else:
                self.fail(path, what + " with a host and a path", value)
            return None
        colon, slash = repo.find(":"), repo.find("/")
        # A path that exists here, or is spelled as one, is local whatever it holds.
        looks_local = repo.startswith(("/", "./", "../", "~")) or os.path.exists(
            os.path.join(self.base_dir, os.path.expanduser(repo)))
        if colon >= 0 and (slash < 0 or colon < slash) and not looks_local:
            # Like git: a ':' before any '/' makes it scp-like ssh ([user@]host:path).
            if repo[:colon].rpartition("@")[2] and repo[colon + 1:]:
                return repo
            self.fail(path, what, value)
            return None
        return self.local_path(path, repo, what)

    def discover_entry(self, path: _KeyPath, raw: Any, default_poll: float) -> DiscoverConfig | None:
        """One ``discover:`` entry; string values may hold ``{name}`` (checked with a sample name)."""
        if not isinstance(raw, Mapping):
            self.fail(path, "a mapping {repo: ..., path: 'plugins/*', ...}", raw)
            return None
        self.keys(path, raw, _DISCOVER_KEYS)
        problems_before = len(self.report.problems)
        for key, what in (("repo", "the repository to look in (a URL or a local path)"),
                          ("path", "a glob of directories such as 'plugins/*'")):
            if key not in raw:
                self.report.add(path + (key,), f"missing; expected {what}")
        repo = None
        if raw.get("repo") == _PUSH_REPO:
            self.fail(path + ("repo",), "a git repository to look in (repo: push is for one plugin)",
                      raw["repo"])
        elif "repo" in raw:
            repo = self.repo(path + ("repo",), raw["repo"])
        pattern = self.repo_path(path + ("path",), raw["path"], glob=True) if "path" in raw else None

        def opt(key: str, check: Any, *, default: Any) -> Any:
            return check(path + (key,), raw[key]) if key in raw else default

        def template(key: str, check: Any) -> Any:
            # Checked as the plugin called "name" would see it; kept with {name} in it.
            value = raw[key]
            sample = value.replace("{name}", "name") if isinstance(value, str) else value
            return value if check(path + (key,), sample) is not None else None

        ref = template("ref", self.ref) if "ref" in raw else "main"
        url_prefix = "/{name}"
        if "url_prefix" in raw:
            url_prefix = template("url_prefix", self.prefix)
            if url_prefix is not None and "{name}" not in url_prefix:
                self.fail(path + ("url_prefix",), "a prefix holding {name}, such as '/{name}' "
                          "(else every plugin found would have the same prefix)", raw["url_prefix"])
        entry = template("entry", self.entry) if "entry" in raw else None
        poll = opt("poll_interval", self.number, default=default_poll)
        test, test_is_default = opt("test", self.test, default=(DEFAULT_TEST_COMMAND, True))
        timeout = opt("test_timeout", self.number, default=120.0)
        rollback = opt("auto_rollback", self.auto_rollback, default=None)
        canary = opt("canary", self.canary, default=self.default_canary)
        config = opt("config", self.free_form, default={})
        verify = opt("verify", self.verify, default=self.default_verify)
        if len(self.report.problems) > problems_before or repo is None or pattern is None:
            return None
        return DiscoverConfig(repo=repo, path=pattern, ref=ref, url_prefix=url_prefix, entry=entry,
                              poll_interval=poll, test=test, test_is_default=test_is_default,
                              test_timeout=timeout, auto_rollback=rollback, canary=canary,
                              config=MappingProxyType(config), verify=verify)

    def repo_path(self, path: _KeyPath, value: Any, *, glob: bool = False) -> str | None:
        """A directory inside the repository: relative, '/'-separated, no '.', '..' or '.git'.

        Returned without a trailing '/'. ``glob`` allows ``*``, ``?`` and ``[...]``.
        """
        example = "'plugins/*'" if glob else "'plugins/shop'"
        what = f"a directory inside the repository such as {example}"
        text = self.string(path, value, what)
        if text is None:
            return None
        parts = text.removesuffix("/").split("/")
        problem = None
        if text.startswith("/") or "\\" in text:
            problem = "relative to the repository's root, with '/' between directories"
        elif any(part in ("", ".", "..") for part in parts):
            problem = "no empty, '.' or '..' components: it must stay inside the repository"
        elif any(part.lower() == ".git" for part in parts):
            problem = "not inside .git"
        elif not glob and re.search(r"[*?\[]", text):
            problem = "no wildcards here; discover: takes a glob"
        elif re.search(r"[\x00-\x1f\x7f]", text):
            problem = "no control characters"
        if problem:
            self.fail(path, f"{what} ({problem})", value)
            return None
        return "/".join(parts)

    def ref(self, path: _KeyPath, value: Any) -> str | None:
        what = "a branch, tag or commit sha"
        ref = self.string(path, value, what)
        if ref is not None and _BAD_REF.search(ref):
            self.fail(path, what + " (no spaces, '..', '@{', ~^:?*[\\, nor a leading '-')", value)
            return None
        return ref

    def subdomain(self, path: _KeyPath, value: Any) -> str | None:
        what = "a subdomain such as 'api' (the host needs SERVER_NAME and subdomain_matching)"
        subdomain = self.string(path, value, what)
        if subdomain is None:
            return None
        if not _SUBDOMAIN.fullmatch(subdomain):
            self.fail(path, what, value)
            return None
        return subdomain

    def entry(self, path: _KeyPath, value: Any) -> str | None:
        what = "'module.path:attribute', e.g. 'hello:plugin'"
        entry = self.string(path, value, what)
        if entry is None:
            return None
        module, colon, attr = entry.partition(":")
        if not colon or not all(part.isidentifier()
                                for part in module.split(".") + attr.split(".")):
            self.fail(path, what, value)
            return None
        return entry

    def test(self, path: _KeyPath, value: Any) -> tuple[tuple[str, ...] | None, bool]:
        what = ("a command (test: python -m pytest -q), a list of arguments, "
                "or false to skip the gate")
        flag = _bool_value(value)
        if flag is False:
            return None, False
        if isinstance(value, str) and flag is None:
            try:
                argv = tuple(shlex.split(value))
            except ValueError as exc:
                self.fail(path, f"{what} ({exc})", value)
                return None, False
        elif isinstance(value, list) and all(isinstance(a, str) and a for a in value):
            argv = tuple(str(a) for a in value)
        else:
            argv = ()
        if not argv:
            self.fail(path, what, value)
        return argv or None, False

    def auto_rollback(self, path: _KeyPath, value: Any) -> AutoRollback | None:
        flag = _bool_value(value)
        if value is None or flag is not None:
            return AutoRollback() if flag else None
        if not isinstance(value, Mapping):
            self.fail(path, "a mapping {max_error_rate, min_requests, window}, true or false",
                      value)
            return None
        self.keys(path, value, _ROLLBACK_KEYS)
        defaults = AutoRollback()
        rate = defaults.max_error_rate
        if "max_error_rate" in value:
            rate = self.number(path + ("max_error_rate",), value["max_error_rate"],
                               "an error rate in (0, 1], e.g. 0.2", at_most=1.0) or rate
        count = defaults.min_requests
        if "min_requests" in value:
            count = self.integer(path + ("min_requests",), value["min_requests"],
                                 "an integer >= 1 (requests)") or count
        window = defaults.window
        if "window" in value:
            window = self.number(path + ("window",), value["window"]) or window
        return AutoRollback(max_error_rate=rate, min_requests=count, window=window)

    def readable_file(self, path: _KeyPath, value: Any, what: str) -> str | None:
        """An existing, readable regular file (relative to the configuration's directory)."""
        file = self.local_path(path, value, what)
        if file is None:
            return None
        if not os.path.isfile(file):
            self.report.add(path, f"no file at {file}: expected {what}")
            return None
        if not os.access(file, os.R_OK):
            self.report.add(path, f"{file} is not readable by this user (uid {os.getuid()}); "
                                  "fix its permissions")
            return None
        return file

    def verify(self, path: _KeyPath, value: Any) -> VerifyConfig | None:
        """``verify``: ``{mode, allowed_signers, gpg_keys}``; ``false``/null: none (README, "Signed commits")."""
        example = ("a mapping such as {mode: head, allowed_signers: allowed_signers, "
                   "gpg_keys: [release-key.asc]}, or false")
        if value is None or _bool_value(value) is False:
            return None
        if not isinstance(value, Mapping):
            self.fail(path, example, value)
            return None
        self.keys(path, value, _VERIFY_KEYS)
        before = len(self.report.problems)
        mode = value.get("mode", "head")
        if mode not in VERIFY_MODES:
            self.fail(path + ("mode",), "head (the commit must be signed) or tag (an annotated "
                                        "tag naming it must be signed)", mode)
        signers = None
        if value.get("allowed_signers") is not None:
            signers = self.readable_file(path + ("allowed_signers",), value["allowed_signers"],
                                         "an allowed_signers file (git's format: `EMAIL "
                                         "ssh-ed25519 AAAA...` per line)")
            if signers is not None:
                self.allowed_signers_file(path + ("allowed_signers",), signers)
        keys: list[str] = []
        raw_keys = value.get("gpg_keys")
        if raw_keys is not None:
            if isinstance(raw_keys, str):
                raw_keys = [raw_keys]
            if not isinstance(raw_keys, list) or not raw_keys:
                self.fail(path + ("gpg_keys",), "a list of OpenPGP public key files "
                                                "(gpg --armor --export KEYID > key.asc)", raw_keys)
                raw_keys = []
            for index, raw_key in enumerate(raw_keys):
                key_path = path + ("gpg_keys", str(index))
                key = self.readable_file(key_path, raw_key, "an OpenPGP public key file "
                                                            "(gpg --armor --export KEYID > key.asc)")
                if key is not None and self.gpg_key_file(key_path, key):
                    keys.append(key)
        if "allowed_signers" not in value and "gpg_keys" not in value:
            self.report.add(path, "give allowed_signers (SSH keys) or gpg_keys (OpenPGP keys) "
                                  "or both: the keys whose signatures deploy")
        # Each missing tool is reported at the key that needs it.
        tools = [("git", path)] + ([("ssh-keygen", path + ("allowed_signers",))]
                                   if "allowed_signers" in value else []) + (
            [("gpg", path + ("gpg_keys",))] if "gpg_keys" in value else [])
        for tool, where in tools:
            if shutil.which(tool) is None:
                self.report.add(where, f"verifying signatures needs the `{tool}` command, which "
                                      f"is not on PATH: install it (Debian: apt-get install "
                                      f"{_TOOL_PACKAGES[tool]})")
        if len(self.report.problems) > before:
            return None
        return VerifyConfig(mode=str(mode), allowed_signers=signers, gpg_keys=tuple(keys))

    def allowed_signers_file(self, path: _KeyPath, file: str) -> None:
        """At least one key line (``PRINCIPALS [OPTIONS] KEYTYPE KEY``), as ssh-keygen reads it."""
        try:
            lines = Path(file).read_text("utf-8", "replace").splitlines()
        except OSError as exc:
            self.report.add(path, f"cannot read {file}: {exc.strerror or exc}")
            return
        keys = [line for line in lines if line.strip() and not line.lstrip().startswith("#")]
        bad = [n for n, line in enumerate(lines, 1) if line.strip() and not
               line.lstrip().startswith("#") and len(line.split()) < 3]
        if bad:
            self.report.add(path, f"{file}:{bad[0]}: expected `PRINCIPALS [OPTIONS] KEYTYPE KEY`, "
                                  "e.g. `alice@example.com ssh-ed25519 AAAA...` (git's "
                                  "allowed_signers format)")
        elif not keys:
            self.report.add(path, f"{file} holds no key: add a line `alice@example.com "
                                  "ssh-ed25519 AAAA...` per allowed signer")

    def gpg_key_file(self, path: _KeyPath, file: str) -> bool:
        """An OpenPGP public key: armored (``BEGIN PGP PUBLIC KEY BLOCK``) or binary; never a secret key."""
        try:
            with open(file, "rb") as handle:
                head = handle.read(1 << 16)
        except OSError as exc:
            self.report.add(path, f"cannot read {file}: {exc.strerror or exc}")
            return False
        if b"PRIVATE KEY BLOCK" in head:
            self.report.add(path, f"{file} holds a secret key; give the public key only "
                                  "(gpg --armor --export KEYID > key.asc) and keep the secret "
                                  "one off the server")
            return False
        if b"BEGIN PGP PUBLIC KEY BLOCK" not in head and not (head and head[0] & 0x80):
            self.report.add(path, f"{file} is not an OpenPGP public key (expected the output "
                                  "of gpg --armor --export KEYID)")
            return False
        return True

    def credentials(self, value: Any) -> tuple[Credential, ...]:
        """``credentials:``: a list of ``{url, ...}`` entries (README, "Private repositories")."""
        path: _KeyPath = ("credentials",)
        if value is None:
            return ()
        if not isinstance(value, list):
            self.fail(path, "a list of entries such as - {url: https://git.example.com/team/, "
                            "username: deploy, password: ${GIT_TOKEN}}", value)
            return ()
        found: list[Credential] = []
        seen: dict[str, str] = {}
        for index, raw in enumerate(value):
            entry = self.credential(path + (str(index),), raw)
            if entry is None:
                continue
            key = entry.url.lower()
            if key in seen:
                self.report.add(path + (str(index), "url"), f"the prefix {entry.url!r} is given "
                                                            f"twice (also entry {seen[key]}); "
                                                            "keep one")
                continue
            seen[key] = str(index)
            found.append(entry)
        return tuple(found)

    def credential(self, path: _KeyPath, raw: Any) -> Credential | None:
        example = ("{url: https://git.example.com/team/, username: deploy, password: ${GIT_TOKEN}} "
                   "or {url: ssh://git@git.example.com/, ssh_key: /run/secrets/deploy_key, "
                   "known_hosts: /etc/gitplug/known_hosts}")
        if not isinstance(raw, Mapping):
            self.fail(path, "a mapping " + example, raw)
            return None
        self.keys(path, raw, _CREDENTIAL_KEYS)
        before = len(self.report.problems)
        url = None
        if "url" not in raw:
            self.report.add(path + ("url",), "missing; expected the URL prefix this entry is "
                                             "for, e.g. https://git.example.com/team/")
        else:
            url = self.string(path + ("url",), raw["url"], "a URL prefix such as "
                                                           "https://git.example.com/team/")
        scheme = ""
        if url is not None:
            match = _URL_SCHEME.match(url)
            scheme = match.group(1).lower() if match else ""
            if match is None and "@" in url.split(":", 1)[0] and ":" in url:
                scheme = "ssh"  # scp-like git@host:team/
            if scheme not in ("http", "https", "ssh", "git+ssh"):
                self.fail(path + ("url",), "an https://, http://, ssh:// or user@host: URL "
                                           "prefix", redact_url(url))
            elif "://" in url and urlsplit(url).password is not None:
                self.report.add(path + ("url",), "holds a password: move it to password: "
                                                 "${VAR} and keep the URL without it")
        http_keys = [k for k in ("username", "password") if k in raw]
        ssh_keys = [k for k in ("ssh_key", "passphrase", "known_hosts") if k in raw]
        if scheme in ("http", "https") and ssh_keys:
            self.report.add(path + (ssh_keys[0],), f"{ssh_keys[0]} is for ssh:// URLs; an "
                                                   f"{scheme}:// entry takes username and password")
        if scheme in ("ssh", "git+ssh") and http_keys:
            self.report.add(path + (http_keys[0],), f"{http_keys[0]} is for https:// URLs; an "
                                                    "ssh entry takes ssh_key, passphrase and "
                                                    "known_hosts")
        username = password = ssh_key = passphrase = known_hosts = None
        if scheme in ("http", "https"):
            if "username" in raw:
                username = self.string(path + ("username",), raw["username"], "a user name")
            password = self.secret(path + ("password",), raw.get("password"))
            if password is None and "password" not in raw:
                self.report.add(path + ("password",), "missing; expected the password or token, "
                                                      "from the environment: password: ${GIT_TOKEN}")
            if username is None and "username" not in raw:
                username = "git"  # forges take any user name with a token
        elif scheme in ("ssh", "git+ssh"):
            if "ssh_key" in raw:
                ssh_key = self.readable_file(path + ("ssh_key",), raw["ssh_key"],
                                             "the deploy key's private key file")
            passphrase = self.secret(path + ("passphrase",), raw.get("passphrase"))
            if "known_hosts" in raw:
                known_hosts = self.readable_file(path + ("known_hosts",), raw["known_hosts"],
                                                 "a known_hosts file holding the server's host key "
                                                 "(ssh-keyscan -p PORT HOST, checked against the "
                                                 "fingerprint your forge publishes)")
            else:
                self.report.add(path + ("known_hosts",), "missing; expected a known_hosts file "
                                                         "with the server's host key: host keys "
                                                         "are always checked")
            if "ssh_key" not in raw:
                self.report.add(path + ("ssh_key",), "missing; expected the deploy key's private "
                                                     "key file")
            for tool in ("ssh",):
                if shutil.which(tool) is None:
                    self.report.add(path, "ssh credentials need the `ssh` command: install it "
                                          "(Debian: apt-get install openssh-client)")
        if len(self.report.problems) > before or url is None:
            return None
        return Credential(url=url, username=username, password=password, ssh_key=ssh_key,
                          passphrase=passphrase, known_hosts=known_hosts)

    def canary(self, path: _KeyPath, value: Any) -> Canary | None:
        """``canary``: a mapping, ``true`` (the defaults), or ``false``/``null`` (none)."""
        what = ("a mapping {percent, min_requests, duration, max_error_rate}, true or false "
                "(README \"Canary releases\")")
        flag = _bool_value(value)
        if value is None or flag is not None:
            return Canary() if flag else None
        if not isinstance(value, Mapping):
            self.fail(path, what, value)
            return None
        self.keys(path, value, _CANARY_KEYS)
        defaults = Canary()
        percent = defaults.percent
        if "percent" in value:
            number = self.number(path + ("percent",), value["percent"],
                                 "a share of the clients in (0, 100), e.g. 10")
            if number is not None and number >= 100:
                self.fail(path + ("percent",), "a share of the clients in (0, 100), e.g. 10 (100 would "
                                               "skip the comparison: leave canary out instead)", value["percent"])
            elif number is not None:
                percent = number
        count = defaults.min_requests
        if "min_requests" in value:
            count = self.integer(path + ("min_requests",), value["min_requests"],
                                 "an integer >= 1 (requests the canary serves before it is judged)") or count
        duration = defaults.duration
        if "duration" in value:
            duration = self.number(path + ("duration",), value["duration"],
                                   "a positive number of seconds the canary runs at least") or duration
        rate = defaults.max_error_rate
        if "max_error_rate" in value:
            rate = self.number(path + ("max_error_rate",), value["max_error_rate"],
                               "an error rate in (0, 1], e.g. 0.05", at_most=1.0) or rate
        return Canary(percent=percent, min_requests=count, duration=duration, max_error_rate=rate)

    def free_form(self, path: _KeyPath, value: Any) -> dict[Any, Any]:
        if value is None:
            return {}
        if not isinstance(value, Mapping):
            self.fail(path, "a mapping (the plugin's current_plugin.config)", value)
            return {}
        return dict(_plain(dict(value)))

    def clashes(self, api_prefix: str) -> None:
        """Refuse prefixes that are equal or nest, between plugins and with the API.

        Checks every valid prefix, also of plugins with other problems, so
        that one run lists all problems.
        """
        seen: list[tuple[str, str]] = []
        for name, prefix in self.prefixes.items():
            path = ("plugins", name, "url_prefix")
            # A prefix with converters (or the root) never owns a path under
            # api_prefix at run time; a literal one would lose all of them.
            if not PrefixPattern(prefix).kept_out_of(api_prefix):
                self.report.add(path, f"url_prefix {prefix!r} of plugin "
                                      f"{name!r} clashes with api_prefix {api_prefix!r} "
                                      "(gitplug's own API); choose another url_prefix or "
                                      "set api_prefix")
            for other_name, a in seen:
                b = prefix
                if prefixes_overlap(a, b):
                    if "<" in a + b and a != b:
                        how = "could match the same URLs as"
                    else:
                        how = "is the same as" if a == b else ("is inside" if under_prefix(b, a)
                                                               else "contains")
                    self.report.add(path, f"url_prefix {b!r} of plugin {name!r} {how} "
                                          f"url_prefix {a!r} of plugin {other_name!r}; give "
                                          "each plugin a prefix that does not nest in another")
            seen.append((name, prefix))
