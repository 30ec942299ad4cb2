"""Load and validate gitplug's configuration (SPEC section 3).

One schema, from ``deploy.yaml`` (:func:`load_config`) or from a Python
mapping such as ``app.config["GITPLUG"]`` (:func:`config_from_mapping`)::

    cfg = load_config(resolve_config_path(None))     # -c FILE, $GITPLUG_CONFIG, ./deploy.yaml
    cfg.plugins["hello"].url_prefix                  # "/hello"

The configuration is validated whole before anything uses it. Every problem
found is collected; one :class:`~gitplug.errors.ConfigError` lists them all,
and its ``file``, ``line`` and ``key`` attributes are those of the first (in
file order)::

    deploy.yaml:7: plugins.hello.poll_interval: expected a positive number of seconds, got 'soon'

Line numbers come from PyYAML's composed node tree: :class:`_Walker` turns
nodes into plain values itself, so that it can remember where every key was
written, refuse duplicate keys (PyYAML silently keeps the last) and expand
``${NAME}`` from the environment in every string value before types are
checked (``poll_interval: ${POLL}`` works; ``$${`` is a literal ``${``).
Text from ``${NAME}`` is converted for numeric fields, and "true"/"false"
for ``test`` and ``auto_rollback``; a number quoted in the file is refused.
Mapping keys are always the text written (``no:`` is a name, not False).
Top-level keys starting with ``x-`` are ignored, to hold YAML anchors for
``<<: *defaults`` merges (as in docker-compose).
"""

from __future__ import annotations

import copy
import difflib
import logging
import math
import os
import re
import shlex
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Final
from urllib.parse import urlsplit

import yaml

from gitplug.errors import ConfigError, UnknownPlugin

logger = logging.getLogger(__name__)

#: The test gate's command when a plugin gives no ``test``.
DEFAULT_TEST_COMMAND: Final[tuple[str, ...]] = ("python", "-m", "pytest", "-q", "-p", "no:cacheprovider")
#: The file read when neither ``-c FILE`` nor ``$GITPLUG_CONFIG`` names one.
DEFAULT_CONFIG_FILE: Final = "deploy.yaml"
#: The environment variable that names the configuration file.
CONFIG_ENV_VAR: Final = "GITPLUG_CONFIG"
#: ``source`` of a configuration read from the Flask config.
MAPPING_SOURCE: Final = "app.config['GITPLUG']"


@dataclass(frozen=True, kw_only=True)
class AutoRollback:
    """When a newly live release is swapped back (SPEC section 6)."""

    max_error_rate: float = 0.2  #: 0 < rate <= 1, over the first ``min_requests`` requests
    min_requests: int = 20  #: >= 1
    window: float = 60.0  #: seconds > 0


@dataclass(frozen=True, kw_only=True)
class PluginConfig:
    """One validated entry of ``plugins:``. ``repo`` is a URL or an absolute path."""

    name: str
    repo: str
    ref: str = "main"
    url_prefix: str = ""  #: "" means "/<name>" (filled in by ``__post_init__``)
    entry: str | None = None  #: "module.path:attr"; None means the package's ``plugin``
    poll_interval: float = 60.0
    test: tuple[str, ...] | None = DEFAULT_TEST_COMMAND  #: None: the gate is off
    #: True when ``test`` was not given: the gate then runs only if the release has tests/.
    test_is_default: bool = True
    test_timeout: float = 120.0
    auto_rollback: AutoRollback | None = None
    #: Read-only; the plugin sees it as ``current_plugin.config``.
    config: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}), hash=False)

    def __post_init__(self) -> None:
        # Frozen: object.__setattr__ is the sanctioned way to normalise in __post_init__.
        if not self.url_prefix:
            object.__setattr__(self, "url_prefix", f"/{self.name}")
        if not isinstance(self.config, MappingProxyType):
            object.__setattr__(self, "config", MappingProxyType(copy.deepcopy(dict(self.config))))


@dataclass(frozen=True, kw_only=True)
class GitplugConfig:
    """The whole validated configuration. Paths are absolute."""

    data_dir: Path
    poll_interval: float = 60.0
    keep_releases: int = 5
    state: str = ""  #: "" means f"sqlite:///{data_dir}/state.db"
    admin_token: str | None = None
    webhook_secret: str | None = None
    api_prefix: str = "/_gitplug"
    #: Insertion order is the order of the file.
    plugins: Mapping[str, PluginConfig] = field(
        default_factory=lambda: MappingProxyType({}), hash=False
    )
    source: str | None = None  #: the file it came from, or MAPPING_SOURCE
    base_dir: Path = field(default_factory=Path.cwd)

    def __post_init__(self) -> None:
        if not self.state:
            object.__setattr__(self, "state", f"sqlite:///{self.data_dir}/state.db")
        if not isinstance(self.plugins, MappingProxyType):
            object.__setattr__(self, "plugins", MappingProxyType(dict(self.plugins)))

    def plugin(self, name: str) -> PluginConfig:
        """The plugin called ``name``; raises :class:`UnknownPlugin` if there is none."""
        try:
            return self.plugins[name]
        except KeyError:
            raise UnknownPlugin(name, list(self.plugins)) from None


@dataclass(frozen=True)
class ConfigDiff:
    """What a reload changes: plugin names added, removed, and changed in any field."""

    added: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()
    changed: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.added or self.removed or self.changed)


def resolve_config_path(path: str | os.PathLike[str] | None, *,
                        environ: Mapping[str, str] | None = None) -> Path:
    """The file to read: ``path`` if given, else ``$GITPLUG_CONFIG``, else ``./deploy.yaml``."""
    if path is not None and os.fspath(path):
        return Path(path)
    env = os.environ if environ is None else environ
    return Path(env.get(CONFIG_ENV_VAR) or DEFAULT_CONFIG_FILE)


def load_config(path: str | os.PathLike[str], *,
                environ: Mapping[str, str] | None = None) -> GitplugConfig:
    """Read, interpolate and validate a YAML configuration file.

    Relative paths in it are resolved against the file's directory. Raises
    :class:`ConfigError` (naming file, line and key) for any problem; never
    returns a partly valid configuration.
    """
    source = os.fspath(path)
    file_path = Path(os.path.abspath(source))
    try:
        text = file_path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(
            f"no configuration file at {file_path}. Pass -c FILE or set {CONFIG_ENV_VAR} "
            "to choose another file.", file=source) from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"the file is not UTF-8 text ({exc.reason} at byte {exc.start}); "
                          "save it as UTF-8.", file=source) from exc
    except OSError as exc:
        raise ConfigError(f"cannot read {file_path}: {exc.strerror or exc}. Pass -c FILE or "
                          f"set {CONFIG_ENV_VAR} to choose another file.", file=source) from exc
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        reason = str(exc.problem or exc.context)
        if exc.context and exc.problem and exc.context_mark:
            reason += f" ({exc.context} that starts on line {exc.context_mark.line + 1})"
        raise ConfigError(f"invalid YAML: {reason}; check the indentation and quoting here",
                          file=source, line=mark.line + 1 if mark else None) from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"invalid YAML: {exc}", file=source) from exc
    if node is None:
        raise ConfigError("the file is empty; expected a mapping of settings with at least "
                          "'plugins:' (see SPEC section 3).", file=source, line=1)
    report = _Report(source)
    report.lines[()] = node.start_mark.line + 1
    data = _Walker(report, os.environ if environ is None else environ).node(node, ())
    return _finish(data, report, file_path.parent)


def config_from_mapping(data: Mapping[str, Any], *, base_dir: str | os.PathLike[str],
                        source: str = MAPPING_SOURCE,
                        environ: Mapping[str, str] | None = None) -> GitplugConfig:
    """Validate a configuration given as a Python mapping (e.g. ``app.config["GITPLUG"]``).

    Same schema and rules as :func:`load_config`; relative paths resolve
    against ``base_dir``; errors carry ``file=source`` and no line.
    """
    report = _Report(source)
    tree = _walk_python(data, (), report, os.environ if environ is None else environ)
    return _finish(tree, report, Path(os.path.abspath(base_dir)))


def diff_plugins(old: GitplugConfig, new: GitplugConfig) -> ConfigDiff:
    """Plugins added, removed and changed (any :class:`PluginConfig` field) from old to new."""
    return ConfigDiff(
        added=tuple(n for n in new.plugins if n not in old.plugins),
        removed=tuple(n for n in old.plugins if n not in new.plugins),
        changed=tuple(n for n, plugin in new.plugins.items()
                      if n in old.plugins and old.plugins[n] != plugin),
    )


# --------------------------------------------------------------------------- reading

_KeyPath = tuple[str, ...]
_MAP_TAG, _SEQ_TAG = "tag:yaml.org,2002:map", "tag:yaml.org,2002:seq"
_MERGE_TAG = "tag:yaml.org,2002:merge"
_VAR = re.compile(r"\$\$\{|\$\{([^}]*)\}|\$\{")
_VAR_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


class _Interpolated(str):
    """A string that took (part of) its value from the environment.

    Only such strings are converted for numeric and boolean fields: a number
    can only reach the YAML as text through ``${NAME}``.
    """

    template: str


@dataclass(frozen=True)
class _Problem:
    message: str
    key: str | None
    line: int | None


class _Report:
    """Collects every problem, and knows on which line each key path was written."""

    def __init__(self, file: str) -> None:
        self.file = file
        self.lines: dict[_KeyPath, int] = {}
        self.problems: list[_Problem] = []

    def line(self, path: _KeyPath) -> int | None:
        # A missing key is reported on the line of its nearest written parent.
        while path and path not in self.lines:
            path = path[:-1]
        return self.lines.get(path)

    def add(self, path: _KeyPath, message: str) -> None:
        self.problems.append(_Problem(message, ".".join(path) or None, self.line(path)))

    def expected(self, path: _KeyPath, what: str, value: Any) -> None:
        self.add(path, f"expected {what}, got {_show(value)}")

    def raise_if_any(self) -> None:
        if not self.problems:
            return
        # Stable sort: file order where lines are known, checks across keys last.
        first, *others = sorted(self.problems, key=lambda p: (p.line is None, p.line or 0))
        message = first.message
        if others:
            listed = "".join(f"\n  {ConfigError(p.message, file=self.file, line=p.line, key=p.key)}"
                             for p in others)
            message += f"\nand {len(others)} more problem(s):{listed}"
        raise ConfigError(message, file=self.file, line=first.line, key=first.key)


def _show(value: Any) -> str:
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    if isinstance(value, _Interpolated):
        text += f" (from {value.template!r})"
    return text


def _interpolate(text: str, environ: Mapping[str, str]) -> tuple[str, str | None]:
    """``text`` with ``${NAME}`` expanded and ``$${`` unescaped, or an error message."""
    if "${" not in text:
        return text, None
    out: list[str] = []
    pos, used_env = 0, False
    for match in _VAR.finditer(text):
        out.append(text[pos:match.start()])
        pos = match.end()
        if match.group(0) == "$${":
            out.append("${")
            continue
        name = match.group(1)
        if name is None:
            return text, (f"unterminated '${{' in {text!r}; write ${{NAME}}, "
                          "or '$${' for a literal '${'")
        if not _VAR_NAME.match(name):
            return text, (f"invalid variable name {name!r} in {text!r}; expected ${{NAME}} with "
                          "letters, digits and '_', or '$${' for a literal '${'")
        if name not in environ:
            return text, (f"environment variable {name} is not set (used as ${{{name}}}); "
                          f"export {name}=... before starting gitplug, "
                          "or write '$${' for a literal '${'")
        out.append(environ[name])
        used_env = True
    out.append(text[pos:])
    if not used_env:
        return "".join(out), None
    result = _Interpolated("".join(out))
    result.template = text
    return result, None


class _Walker:
    """Turns a composed YAML node tree into plain values, recording each key's line."""

    def __init__(self, report: _Report, environ: Mapping[str, str]) -> None:
        self.report = report
        self.environ = environ
        self.constructor = yaml.constructor.SafeConstructor()
        self.active: set[int] = set()  # nodes being walked: guards recursive aliases

    def node(self, node: yaml.Node, path: _KeyPath) -> Any:
        if id(node) in self.active:
            self.report.add(path, "a YAML alias refers to itself; remove the recursion")
            return None
        self.active.add(id(node))
        try:
            if isinstance(node, yaml.MappingNode):
                return self.mapping(node, path)
            if isinstance(node, yaml.SequenceNode):
                self.check_tag(node, _SEQ_TAG, path)
                return [self.child(item, path + (str(i),), item.start_mark.line + 1)
                        for i, item in enumerate(node.value)]
            return self.scalar(node, path)
        finally:
            self.active.discard(id(node))

    def child(self, node: yaml.Node, path: _KeyPath, key_line: int) -> Any:
        # Scalars point at their value; collections at the key that holds them.
        scalar = isinstance(node, yaml.ScalarNode)
        self.report.lines[path] = node.start_mark.line + 1 if scalar else key_line
        return self.node(node, path)

    def check_tag(self, node: yaml.Node, tag: str, path: _KeyPath) -> None:
        if node.tag != tag:
            self.report.add(path, f"unsupported YAML tag {node.tag!r}; remove the tag")

    def scalar(self, node: yaml.Node, path: _KeyPath) -> Any:
        try:
            value = self.constructor.construct_object(node, deep=True)
        except yaml.YAMLError as exc:
            self.report.add(path, f"cannot read this value: {getattr(exc, 'problem', exc)}")
            return None
        if isinstance(value, str):
            value, error = _interpolate(value, self.environ)
            if error:
                self.report.add(path, error)
        return value

    def mapping(self, node: yaml.MappingNode, path: _KeyPath) -> dict[Any, Any]:
        self.check_tag(node, _MAP_TAG, path)
        merged: dict[Any, Any] = {}
        # `<<: *defaults` first, so that the mapping's own keys (and lines) win.
        for key_node, value_node in node.value:
            if key_node.tag != _MERGE_TAG:
                continue
            many = isinstance(value_node, yaml.SequenceNode)
            for src in value_node.value if many else [value_node]:
                if not isinstance(src, yaml.MappingNode):
                    self.report.add(path, "'<<' must merge a mapping (or a list of mappings)")
                    continue
                for key, value in self.node(src, path).items():
                    merged.setdefault(key, value)  # earlier sources win, as in YAML
        result: dict[str, Any] = {}
        seen: dict[str, int] = {}
        for key_node, value_node in node.value:
            if key_node.tag == _MERGE_TAG:
                continue
            key_line = key_node.start_mark.line + 1
            if not isinstance(key_node, yaml.ScalarNode):
                self.report.lines[path + ("?",)] = key_line
                self.report.add(path + ("?",), "a key must be a plain scalar, not a collection")
                continue
            # Keys stay the text written: `on:` or `no:` are names here, not YAML 1.1 booleans,
            # and `${...}` in a key is not expanded.
            key = key_node.value
            key_path = path + (key,)
            if key in seen:
                self.report.lines[key_path] = key_line
                self.report.add(key_path, f"duplicate key {key!r} (first on line {seen[key]}); "
                                          "YAML would silently keep only the last. Remove one.")
                continue
            seen[key] = key_line
            result[key] = self.child(value_node, key_path, key_line)
        return {**{k: v for k, v in merged.items() if k not in result}, **result}


def _walk_python(value: Any, path: _KeyPath, report: _Report, environ: Mapping[str, str]) -> Any:
    """Copy a Python configuration value, expanding ``${NAME}`` in its strings."""
    if isinstance(value, Mapping):
        return {k: _walk_python(v, path + (str(k),), report, environ) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_walk_python(v, path + (str(i),), report, environ) for i, v in enumerate(value)]
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, str):
        value, error = _interpolate(value, environ)
        if error:
            report.add(path, error)
    return value


def _plain(value: Any) -> Any:
    """Deep copy with :class:`_Interpolated` turned back into ``str``."""
    if isinstance(value, dict):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, str):
        return str(value)
    return copy.deepcopy(value)


# --------------------------------------------------------------------------- validating

_TOP_KEYS = ("data_dir", "poll_interval", "keep_releases", "state", "admin_token", "webhook",
             "api_prefix", "plugins")
_PLUGIN_KEYS = ("repo", "ref", "url_prefix", "entry", "poll_interval", "test", "test_timeout",
                "auto_rollback", "config")
_ROLLBACK_KEYS = ("max_error_rate", "min_requests", "window")
_PLUGIN_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*\Z")
_URL_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://")
_REPO_SCHEMES = ("http", "https", "ssh", "git", "file")
_BAD_REF = re.compile(r"[\s\x00-\x1f\x7f~^:?*\[\\]|\.\.|@\{|^-")
_BAD_PREFIX_CHAR = re.compile(r"[\s<>?#]")
_SECONDS = "a positive number of seconds"


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


def _prefix_problem(prefix: str) -> str | None:
    if not prefix.startswith("/"):
        return "it must start with '/'"
    if prefix == "/":
        return "'/' is the site root, which stays the host application's"
    if prefix.endswith("/"):
        return "remove the trailing '/'"
    if "//" in prefix:
        return "it must not contain '//'"
    if _BAD_PREFIX_CHAR.search(prefix):
        return "no spaces, '<', '>' (converters), '?' or '#'"
    return None


def _nests(outer: str, inner: str) -> bool:
    return inner == outer or inner.startswith(outer + "/")


class _Checker:
    """Validates the plain tree against the schema, reporting every problem it finds."""

    def __init__(self, report: _Report, base_dir: Path) -> None:
        self.report = report
        self.base_dir = base_dir

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

    def prefix(self, path: _KeyPath, value: Any) -> str | None:
        prefix = self.string(path, value, "a URL path prefix such as '/hello'")
        problem = _prefix_problem(prefix) if prefix else None
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
        admin_token = self.secret(("admin_token",), get("admin_token"))
        webhook_secret = None
        webhook = get("webhook")
        if isinstance(webhook, Mapping):
            self.keys(("webhook",), webhook, ("secret",))
            webhook_secret = self.secret(("webhook", "secret"), webhook.get("secret"))
        elif webhook is not None:
            self.fail(("webhook",), "a mapping such as {secret: ${GITPLUG_WEBHOOK_SECRET}}",
                      webhook)
        api_prefix = "/_gitplug"
        if "api_prefix" in data:
            api_prefix = self.prefix(("api_prefix",), data["api_prefix"]) or api_prefix
        plugins: dict[str, PluginConfig] = {}
        raw_plugins = get("plugins")
        if isinstance(raw_plugins, Mapping):
            for name, raw in raw_plugins.items():
                plugin = self.plugin(name, raw, poll)
                if plugin is not None:
                    plugins[plugin.name] = plugin
        elif raw_plugins is not None:
            self.fail(("plugins",), "a mapping of plugin name to settings "
                                    "(plugins: {hello: {repo: ...}})", raw_plugins)
        self.clashes(api_prefix, plugins)
        return GitplugConfig(data_dir=data_dir, poll_interval=poll, keep_releases=keep,
                             state=state, admin_token=admin_token, webhook_secret=webhook_secret,
                             api_prefix=api_prefix, plugins=plugins, source=self.report.file,
                             base_dir=self.base_dir)

    def state(self, value: Any, data_dir: Path) -> str:
        path: _KeyPath = ("state",)
        what = ("sqlite:///PATH (relative to the configuration), sqlite:////ABSOLUTE/PATH "
                "or redis://HOST[:PORT][/DB]")
        if value is None:
            return f"sqlite:///{data_dir}/state.db"
        text = self.string(path, value, what)
        if text is None:
            return ""
        if text.startswith("sqlite:///") and len(text) > len("sqlite:///"):
            file = text[len("sqlite:///"):]
            # sqlite:////abs is absolute already; sqlite:///rel resolves like every path here.
            return "sqlite:///" + os.path.normpath(os.path.join(self.base_dir, file))
        if text.startswith(("redis://", "rediss://")):
            try:
                split = urlsplit(text)
                if split.hostname and (split.port or 0) >= 0:  # .port raises on a bad port
                    return text
            except ValueError:
                pass
        self.fail(path, what, value)
        return ""

    def plugin(self, name: Any, raw: Any, default_poll: float) -> PluginConfig | None:
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
        repo = self.repo(path + ("repo",), raw["repo"]) if "repo" in raw else None
        ref = opt("ref", self.ref, default="main")
        url_prefix = opt("url_prefix", self.prefix, default=f"/{name}")
        entry = opt("entry", self.entry, default=None)
        poll = opt("poll_interval", self.number, default=default_poll)
        test, test_is_default = opt("test", self.test, default=(DEFAULT_TEST_COMMAND, True))
        timeout = opt("test_timeout", self.number, default=120.0)
        rollback = opt("auto_rollback", self.auto_rollback, default=None)
        config = opt("config", self.free_form, default={})
        if len(self.report.problems) > problems_before or repo is None:
            return None
        return PluginConfig(name=name, repo=repo, ref=ref, url_prefix=url_prefix, entry=entry,
                            poll_interval=poll, test=test, test_is_default=test_is_default,
                            test_timeout=timeout, auto_rollback=rollback,
                            config=MappingProxyType(config))

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
        if colon >= 0 and (slash < 0 or colon < slash):
            # Like git: a ':' before any '/' makes it scp-like ssh ([user@]host:path).
            if repo[:colon].rpartition("@")[2] and repo[colon + 1:]:
                return repo
            self.fail(path, what, value)
            return None
        return self.local_path(path, repo, what)

    def ref(self, path: _KeyPath, value: Any) -> str | None:
        what = "a branch, tag or commit sha"
        ref = self.string(path, value, what)
        if ref is not None and _BAD_REF.search(ref):
            self.fail(path, what + " (no spaces, '..', '@{', ~^:?*[\\, nor a leading '-')", value)
            return None
        return ref

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

    def free_form(self, path: _KeyPath, value: Any) -> dict[Any, Any]:
        if value is None:
            return {}
        if not isinstance(value, Mapping):
            self.fail(path, "a mapping (the plugin's current_plugin.config)", value)
            return {}
        return dict(_plain(dict(value)))

    def clashes(self, api_prefix: str, plugins: Mapping[str, PluginConfig]) -> None:
        """Refuse prefixes that are equal or nest, between plugins and with the API."""
        seen: list[PluginConfig] = []
        for plugin in plugins.values():
            path = ("plugins", plugin.name, "url_prefix")
            if _nests(api_prefix, plugin.url_prefix) or _nests(plugin.url_prefix, api_prefix):
                self.report.add(path, f"url_prefix {plugin.url_prefix!r} of plugin "
                                      f"{plugin.name!r} clashes with api_prefix {api_prefix!r} "
                                      "(gitplug's own API); choose another url_prefix or "
                                      "set api_prefix")
            for other in seen:
                a, b = other.url_prefix, plugin.url_prefix
                if _nests(a, b) or _nests(b, a):
                    how = "is the same as" if a == b else ("is inside" if _nests(a, b)
                                                           else "contains")
                    self.report.add(path, f"url_prefix {b!r} of plugin {plugin.name!r} {how} "
                                          f"url_prefix {a!r} of plugin {other.name!r}; give "
                                          "each plugin a prefix that does not nest in another")
            seen.append(plugin)
