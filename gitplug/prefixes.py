"""URL prefix rules shared by the configuration and the runtime.

A plugin is mounted at a URL prefix; the configuration refuses two plugins
whose prefixes overlap, and the runtime checks the same before it publishes
a release. Both ask this module, so the two checks can never disagree.
Imports nothing of gitplug.
"""

from __future__ import annotations

import re

__all__ = ["prefix_problem", "invalid_prefix_message", "mount_key", "prefixes_overlap", "under_prefix"]

_BAD_PREFIX_CHAR = re.compile(r"[\s<>?#]")


def prefix_problem(prefix: str) -> str | None:
    """Why ``prefix`` cannot be a plugin's ``url_prefix``, or None if it can.

    The one rule for every way a prefix comes in (the configuration,
    ``load_directory``, ``--dev``, a ``Plugin(url_prefix=...)``). One trailing
    ``/`` is allowed: as in Flask, ``/foo/`` with the rule ``""`` is the URL
    ``/foo/``, and ``/foo/`` joined with ``/bar`` (or ``//bar``) is ``/foo/bar``.
    """
    if not prefix.startswith("/"):
        return "it must start with '/'"
    if prefix == "/":
        return "'/' is the site root, which stays the host application's"
    if "//" in prefix:
        return "it must not contain '//'"
    if _BAD_PREFIX_CHAR.search(prefix):
        return "no spaces, '<', '>' (converters), '?' or '#'"
    return None


def invalid_prefix_message(plugin: str, prefix: str) -> str | None:
    """The one-line error for plugin ``plugin`` mounted at an invalid ``prefix``, or None."""
    problem = prefix_problem(prefix)
    if problem is None:
        return None
    return (
        f"plugin {plugin!r}: url_prefix {prefix!r} is not a valid URL prefix ({problem})."
        " Give a prefix such as '/hello' (README, \"Writing a plugin\": mounting)."
    )


def mount_key(prefix: str) -> str:
    """The form of a valid prefix that routing and clash checks compare: no trailing ``/``."""
    return prefix[:-1] if len(prefix) > 1 and prefix.endswith("/") else prefix


def under_prefix(path: str, prefix: str) -> bool:
    """True if URL ``path`` is ``prefix`` itself or lies below it (by whole segments)."""
    return path == prefix or path.startswith(prefix + "/")


def prefixes_overlap(a: str, b: str) -> bool:
    """True if one URL prefix is, or lies inside, the other."""
    return under_prefix(a, b) or under_prefix(b, a)
