"""Discovery: plugins found in a repository's directories (README, "Discovery").

A ``discover:`` entry names a repository, a ref and a glob of directories
(``plugins/*``). Every matching directory that holds a plugin package (a
subdirectory with an ``__init__.py``) is a plugin named after the directory,
configured by the entry's other keys (``{name}`` replaced).

The controller scans (:func:`scan`) on each fetch of the repository and on
the entry's poll interval, and records what it found in
``<data_dir>/discovered.json`` (:func:`record_scan`): one file that every
process of the host, and the CLI, merges into the configuration it read
(:func:`with_discovered`). An explicit ``plugins:`` entry of the same name
wins; a discovered name or prefix that clashes is refused with a clear
error while the rest deploy; a directory that is gone is *removed* (stopped,
shown as removed) until it comes back. A ``discovered.json`` that cannot be
read (corrupt, or not what this module writes) is ignored with a warning and
the next scan of each entry writes it anew; a running server keeps what it
serves meanwhile (:func:`try_discovered` tells it the file is unreadable).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import logging
import os
import re
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..config import DiscoverConfig, GitplugConfig, PluginConfig
from ..prefixes import prefixes_overlap
from .gitsource import MODE_TREE, GitSource

__all__ = ["DISCOVERED_FILE", "discovered_path", "record_scan", "scan", "try_discovered", "with_discovered"]

logger = logging.getLogger(__name__)

DISCOVERED_FILE = "discovered.json"
_FORMAT = 1
_PLUGIN_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*\Z")


def discovered_path(config: GitplugConfig) -> Path:
    """``<data_dir>/discovered.json``."""
    return Path(config.data_dir) / DISCOVERED_FILE


def scan(git: GitSource, entry: DiscoverConfig, commit: str) -> tuple[dict[str, str], dict[str, str]]:
    """``({name: directory}, {name or directory: problem})``: the plugins ``entry`` finds in ``commit``.

    Reads the local mirror only. A matching directory without a plugin
    package is not a plugin (no problem); one whose name cannot be a plugin
    name is refused with a problem; two directories of one name (``a/x``,
    ``b/x``) are both refused. A duplicate's problem is keyed by the name it
    refuses, so an explicit ``plugins:`` entry of that name silences it.
    """
    level: list[str] = [""]
    for part in entry.path.split("/"):
        level = [
            f"{parent}/{name}" if parent else name
            for parent in level
            for name in sorted(git.directories(entry.repo, commit, parent))
            if fnmatch.fnmatchcase(name, part) and not name.startswith(".")
        ]
    found: dict[str, str] = {}
    problems: dict[str, str] = {}
    seen: dict[str, list[str]] = {}
    for directory in level:
        if not _holds_package(git, entry.repo, commit, directory):
            continue
        name = directory.rsplit("/", 1)[-1]
        if not _PLUGIN_NAME.match(name):
            problems[directory] = (  # no plugin has this name: keyed by the directory, unique
                f"discover {entry.path!r} in {entry.repo}: directory {directory!r} is not a valid plugin"
                " name (letters, digits, '_' and '-', starting with a letter or '_'); rename it to deploy it"
            )
            continue
        seen.setdefault(name, []).append(directory)
    for name, directories in seen.items():
        if len(directories) > 1:
            problems[name] = (
                f"discover {entry.path!r} in {entry.repo}: {len(directories)} directories are called"
                f" {name!r} ({', '.join(directories)}); none of them is deployed. Rename all but one."
            )
            continue
        found[name] = directories[0]
    return found, problems


def _holds_package(git: GitSource, url: str, commit: str, directory: str) -> bool:
    for sub in git.directories(url, commit, directory):
        entries = git.entries(url, commit, f"{directory}/{sub}")
        init = entries.get("__init__.py")
        if init is not None and init[0] != MODE_TREE:
            return True
    return False


def _key(entry: DiscoverConfig) -> str:
    return f"{entry.repo} {entry.path}"


def _load(path: Path) -> tuple[dict[str, Any], str | None]:
    """``(the scans recorded at path, why they could not be read)``; a missing file is no scan yet."""
    empty: dict[str, Any] = {"format": _FORMAT, "entries": {}, "removed": {}}
    try:
        data = json.loads(path.read_text("utf-8"))
    except FileNotFoundError:
        return empty, None
    except (OSError, ValueError) as exc:
        return empty, str(exc)
    data = data if isinstance(data, dict) else {}
    data.setdefault("removed", {})
    entries, removed = data.get("entries"), data["removed"]
    if not (isinstance(entries, dict) and isinstance(removed, dict)
            and all(isinstance(e, dict) and isinstance(e.get("found", {}), dict)
                    and isinstance(e.get("problems", []), (list, dict)) for e in entries.values())
            and all(isinstance(r, dict) for r in removed.values())):
        return empty, "not a record of discover scans"
    return data, None


def _read(path: Path) -> dict[str, Any]:
    data, problem = _load(path)
    if problem is not None:
        logger.warning("ignoring an unreadable %s (%s): discovery runs again", path, problem)
    return data


def record_scan(
    config: GitplugConfig, entry: DiscoverConfig, commit: str, found: Mapping[str, str],
    problems: Mapping[str, str],
) -> list[str]:
    """Write what a scan of ``entry`` found; return the names it no longer finds.

    The file is replaced atomically, so a reader sees the old or the new
    scan. A name found before and not now is recorded as removed. An
    unreadable file is replaced by one holding this scan.
    """
    path = discovered_path(config)
    data, unreadable_because = _load(path)
    if unreadable_because is not None:
        logger.warning("replacing an unreadable %s (%s) with what discover %r in %s finds", path,
                       unreadable_because, entry.path, entry.repo)
    before = data["entries"].get(_key(entry), {}).get("found", {})
    gone = sorted(set(before) - set(found))
    previous = json.dumps(data, sort_keys=True)
    data["entries"][_key(entry)] = {"commit": commit, "found": dict(found), "problems": dict(problems)}
    for name in gone:
        data["removed"][name] = {"key": _key(entry), "directory": before[name], "commit": commit}
    for name in found:
        data["removed"].pop(name, None)
    if json.dumps(data, sort_keys=True) == previous:
        return gone  # nothing new: every process's configuration stays as it is
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".discovered-", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(data, handle, indent=2, sort_keys=True)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return gone


def with_discovered(config: GitplugConfig) -> tuple[GitplugConfig, list[str]]:
    """``(config with the discovered plugins added, problems)``.

    Explicit ``plugins:`` entries win over discovered ones of the same name,
    silently (a scan's problem about that name included). A discovered
    plugin whose name another entry also found, or whose prefix clashes
    with ``api_prefix`` or another plugin's, is left out with a problem
    naming both. Discovered plugins of entries no longer in the
    configuration are dropped.
    """
    if not config.discover:
        return config, []
    return _merge(config, _read(discovered_path(config)))


def try_discovered(config: GitplugConfig) -> tuple[GitplugConfig, list[str]] | str:
    """:func:`with_discovered`, or why ``discovered.json`` cannot be read (corrupt, unreadable).

    One read of the file, so a writer replacing it in between cannot slip
    an unreadable file past the check.
    """
    if not config.discover:
        return config, []
    data, why = _load(discovered_path(config))
    return why if why is not None else _merge(config, data)


def _merge(config: GitplugConfig, data: dict[str, Any]) -> tuple[GitplugConfig, list[str]]:
    plugins = dict(config.plugins)
    problems: list[str] = []
    candidates: dict[str, list[PluginConfig]] = {}
    entries = {_key(entry): entry for entry in config.discover}
    for entry in config.discover:
        recorded = data["entries"].get(_key(entry), {})
        refused = recorded.get("problems", {})
        # A list: written by a gitplug that did not say which name each problem refuses.
        named = [("", p) for p in refused] if isinstance(refused, list) else list(refused.items())
        problems.extend(str(p) for name, p in named if name not in config.plugins)
        for name, directory in sorted(recorded.get("found", {}).items()):
            if name in config.plugins:
                continue  # the explicit entry wins, silently: that is what it is for
            candidates.setdefault(name, []).append(entry.plugin(name, str(directory)))
    for name, found in candidates.items():
        if len(found) > 1:
            where = " and ".join(f"{p.repo} {p.path}" for p in found)
            problems.append(f"discovered plugin {name!r} is found twice ({where}); neither is deployed."
                            " Rename one directory, or list the one you want under plugins:")
            continue
        plugin = found[0]
        clash = _prefix_clash(plugin, config.api_prefix, plugins)
        if clash:
            problems.append(clash)
            continue
        plugins[name] = plugin
    removed = {}
    for name, info in data["removed"].items():
        entry = entries.get(str(info.get("key")))
        if entry is not None and name not in plugins:
            removed[name] = entry.plugin(name, str(info.get("directory", "")))
    return dataclasses.replace(config, plugins=plugins, removed=removed), problems


def _prefix_clash(plugin: PluginConfig, api_prefix: str, plugins: Mapping[str, PluginConfig]) -> str | None:
    assert plugin.discovered_from is not None
    what = f"discovered plugin {plugin.name!r} ({plugin.repo} {plugin.path})"
    if prefixes_overlap(api_prefix, plugin.url_prefix or f"/{plugin.name}"):
        return (f"{what}: url_prefix {plugin.url_prefix!r} clashes with api_prefix {api_prefix!r};"
                " it is not deployed. Set url_prefix in the discover entry, or rename the directory")
    for other in plugins.values():
        theirs = other.url_prefix or f"/{other.name}"  # None: the constructor's, else /<name>
        if prefixes_overlap(theirs, plugin.url_prefix or f"/{plugin.name}"):
            return (f"{what}: url_prefix {plugin.url_prefix!r} clashes with url_prefix"
                    f" {theirs!r} of plugin {other.name!r}; it is not deployed. Rename the"
                    " directory, or list it under plugins: with another url_prefix")
    return None
