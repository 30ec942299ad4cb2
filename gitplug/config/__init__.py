"""The config part: load and validate gitplug's configuration (README, "Configuration").

Owns the schema of ``deploy.yaml`` and its value types. Modules:
:mod:`.yamlfile` reads YAML keeping every key's line, :mod:`.schema` checks
the values, :mod:`.values` holds the frozen result types
(:class:`GitplugConfig`, :class:`PluginConfig`), re-exported here as their
public home. Public names: :func:`load_config`, :func:`config_from_mapping`,
:func:`resolve_config_path`, :func:`diff_plugins` and the value types.

May import: the base (:mod:`gitplug.errors`, :mod:`gitplug.prefixes`) only.

One schema, from ``deploy.yaml`` (:func:`load_config`) or from a Python
mapping such as ``app.config["GITPLUG"]`` (:func:`config_from_mapping`)::

    cfg = load_config(resolve_config_path(None))     # -c FILE, $GITPLUG_CONFIG, ./deploy.yaml
    cfg.plugins["hello"].url_prefix                  # "/hello"

The configuration is validated whole before anything uses it. Every problem
found is collected; one :class:`~gitplug.errors.ConfigError` lists them all,
and its ``file``, ``line`` and ``key`` attributes are those of the first (in
file order)::

    deploy.yaml:7: plugins.hello.poll_interval: expected a positive number of seconds, got 'soon'

Line numbers come from PyYAML's composed node tree:
:class:`~gitplug.config.yamlfile._Walker` turns nodes into plain values itself,
so that it can remember where every key was written, refuse duplicate keys
(PyYAML silently keeps the last) and expand ``${NAME}`` from the environment
in every string value before types are checked (``poll_interval: ${POLL}``
works; ``$${`` is a literal ``${``). Text from ``${NAME}`` is converted for
numeric fields, and "true"/"false" for ``test`` and ``auto_rollback``; a
number quoted in the file is refused. Mapping keys are always the text
written (``no:`` is a name, not False). Top-level keys starting with ``x-``
are ignored, to hold YAML anchors for
``<<: *defaults`` merges (as in docker-compose).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final

import yaml

from ..errors import ConfigError

# Reading (.yamlfile) and validating (.schema) live in their own modules; the
# value types live in .values, re-exported here as their public home, so that
# .schema, which builds them, never imports this module: no cycle.
from .schema import _finish
from .values import (
    DEFAULT_PUSH_MAX_SIZE,
    DEFAULT_TEST_COMMAND,
    NOTIFY_EVENTS,
    NOTIFY_FORMATS,
    VERIFY_MODES,
    AutoRollback,
    Canary,
    ConfigDiff,
    Credential,
    DiscoverConfig,
    GitplugConfig,
    NotifyTarget,
    PluginConfig,
    VerifyConfig,
    hosted_repo_path,
)
from .yamlfile import _Report, _walk_python, _Walker

__all__ = [
    "CONFIG_ENV_VAR",
    "DEFAULT_CONFIG_FILE",
    "DEFAULT_PUSH_MAX_SIZE",
    "DEFAULT_TEST_COMMAND",
    "MAPPING_SOURCE",
    "NOTIFY_EVENTS",
    "NOTIFY_FORMATS",
    "SECRET_KEYS",
    "VERIFY_MODES",
    "AutoRollback",
    "Canary",
    "ConfigDiff",
    "Credential",
    "DiscoverConfig",
    "GitplugConfig",
    "NotifyTarget",
    "PluginConfig",
    "VerifyConfig",
    "config_from_mapping",
    "diff_plugins",
    "hosted_repo_path",
    "load_config",
    "resolve_config_path",
]

#: The file read when neither ``-c FILE`` nor ``$GITPLUG_CONFIG`` names one.
DEFAULT_CONFIG_FILE: Final = "deploy.yaml"
#: The environment variable that names the configuration file.
CONFIG_ENV_VAR: Final = "GITPLUG_CONFIG"
#: ``source`` of a configuration read from the Flask config.
MAPPING_SOURCE: Final = "app.config['GITPLUG']"


def resolve_config_path(path: str | os.PathLike[str] | None, *,
                        environ: Mapping[str, str] | None = None) -> Path:
    """The file to read: ``path`` if given, else ``$GITPLUG_CONFIG``, else ``./deploy.yaml``."""
    if path is not None and os.fspath(path):
        return Path(path)
    env = os.environ if environ is None else environ
    return Path(env.get(CONFIG_ENV_VAR) or DEFAULT_CONFIG_FILE)


#: The settings that hold secrets (``*``: any plugin): only the server (and
#: commands that run a deploy, whose test gate scrubs them) need them.
SECRET_KEYS: Final = frozenset({
    ("admin_token",), ("webhook", "secret"), ("plugins", "*", "push_token"),
    ("notify", "*", "secret"), ("notify", "*", "token"),
    ("credentials", "*", "password"), ("credentials", "*", "passphrase"),
})


def load_config(path: str | os.PathLike[str], *,
                environ: Mapping[str, str] | None = None,
                need_secrets: bool = True) -> GitplugConfig:
    """Read, interpolate and validate a YAML configuration file.

    Relative paths in it are resolved against the file's directory. Raises
    :class:`ConfigError` (naming file, line and key) for any problem; never
    returns a partly valid configuration. With ``need_secrets=False`` (the
    read-only commands), an unset ``${NAME}`` in a secret
    (:data:`SECRET_KEYS`: ``admin_token``, ``webhook.secret``, a
    ``push_token``, a notification's ``secret`` or ``token``) reads as not
    configured instead of an error.
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
                          "'plugins:' (see the README, \"Configuration\").", file=source, line=1)
    report = _Report(source)
    report.lines[()] = node.start_mark.line + 1
    optional = frozenset() if need_secrets else SECRET_KEYS
    data = _Walker(report, os.environ if environ is None else environ, optional).node(node, ())
    return _finish(data, report, file_path.parent)


def config_from_mapping(data: Mapping[str, Any], *, base_dir: str | os.PathLike[str],
                        source: str = MAPPING_SOURCE,
                        environ: Mapping[str, str] | None = None,
                        need_secrets: bool = True) -> GitplugConfig:
    """Validate a configuration given as a Python mapping (e.g. ``app.config["GITPLUG"]``).

    Same schema and rules as :func:`load_config` (``need_secrets`` too);
    relative paths resolve against ``base_dir``; errors carry ``file=source``
    and no line.
    """
    report = _Report(source)
    optional = frozenset() if need_secrets else SECRET_KEYS
    tree = _walk_python(data, (), report, os.environ if environ is None else environ, optional)
    return _finish(tree, report, Path(os.path.abspath(base_dir)))


def diff_plugins(old: GitplugConfig, new: GitplugConfig) -> ConfigDiff:
    """Plugins added, removed and changed (any :class:`PluginConfig` field) from old to new."""
    return ConfigDiff(
        added=tuple(n for n in new.plugins if n not in old.plugins),
        removed=tuple(n for n in old.plugins if n not in new.plugins),
        changed=tuple(n for n, plugin in new.plugins.items()
                      if n in old.plugins and old.plugins[n] != plugin),
    )

