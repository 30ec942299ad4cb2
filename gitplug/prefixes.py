"""URL prefix rules shared by the configuration and the runtime.

A plugin is mounted at a URL prefix; the configuration refuses two plugins
whose prefixes overlap, and the runtime checks the same before it publishes
a release. Both ask this module, so the two checks can never disagree.
Imports nothing of gitplug.
"""

from __future__ import annotations

__all__ = ["prefixes_overlap", "under_prefix"]


def under_prefix(path: str, prefix: str) -> bool:
    """True if URL ``path`` is ``prefix`` itself or lies below it (by whole segments)."""
    return path == prefix or path.startswith(prefix + "/")


def prefixes_overlap(a: str, b: str) -> bool:
    """True if one URL prefix is, or lies inside, the other."""
    return under_prefix(a, b) or under_prefix(b, a)
