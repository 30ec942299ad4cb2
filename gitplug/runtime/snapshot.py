"""The immutable view of which release of every plugin is live.

A :class:`Snapshot` maps plugin names to :class:`~gitplug.runtime.loaded.LoadedRelease`
objects. The runtime publishes a new snapshot with one reference assignment
on every swap; each request takes the snapshot that was current when it
arrived and reads *everything* (routing, views, hooks, templates, static
files, ``url_for``) from it. That is the whole atomicity argument: a request
can only ever see one complete snapshot.
"""

from __future__ import annotations

import typing as t
from collections import deque
from collections.abc import Mapping

if t.TYPE_CHECKING:
    from .canary import CanarySplit
    from .loaded import LoadedRelease

__all__ = ["Snapshot"]

_ONE_SEGMENT = [1]


class Snapshot:
    """An immutable set of live releases, plus in-flight bookkeeping."""

    __slots__ = (
        "releases",
        "generation",
        "by_prefix",
        "_prefix_depths",
        "one_segment",
        "_fallback",
        "_variable",
        "_root",
        "_reserved",
        "app_wide",
        "app_error_handlers",
        "hooks",
        "error_handlers",
        "view_functions",
        "templates",
        "host_visible",
        "pins",
        "canaries",
        "superseded",
        "closed",
    )

    def __init__(
        self, releases: Mapping[str, LoadedRelease], generation: int, reserved: tuple[str, ...] = ()
    ) -> None:
        #: ``{plugin name: release}``; never mutated after construction.
        self.releases: dict[str, LoadedRelease] = dict(releases)
        self.generation = generation
        # Literal prefixes are found by dict lookups; prefixes with converters
        # and the root plugin are asked only when no literal prefix owns a
        # path (the runtime refuses prefixes that could own the same path, so
        # the order cannot change the answer, only the cost).
        #: ``{literal prefix: release}``, e.g. ``{"/hello": ...}``.
        self.by_prefix = {
            r.prefix: r for r in self.releases.values() if not (r.pattern.variable or r.pattern.root)
        }
        #: Segment counts of the literal prefixes, deepest first ("/a/b" -> 2).
        self._prefix_depths = sorted({p.count("/") for p in self.by_prefix}, reverse=True)
        #: ``(match, release)`` of prefixes with converters (``/<lang_code>/shop``).
        self._variable = tuple(
            (r.pattern.regex.match, r) for r in self.releases.values() if r.pattern.regex is not None
        )
        #: The root plugin (``url_prefix: /``), if one is live.
        self._root = next((r for r in self.releases.values() if r.pattern.root), None)
        #: Prefixes no root or converter prefix may own (gitplug's ``api_prefix``).
        self._reserved = reserved
        self._fallback = bool(self._variable) or self._root is not None
        #: True when every prefix is literal and one segment ("/hello"): then
        #: the first segment of a path is the only key to look up.
        self.one_segment = self._prefix_depths == _ONE_SEGMENT and not self._fallback
        #: App-wide hooks of all live releases, per registry, in mount order.
        self.app_wide: dict[str, list[t.Any]] = {}
        for release in self.releases.values():
            for registry, funcs in release.app_wide.items():
                self.app_wide.setdefault(registry, []).extend(funcs)
        #: App-wide error handlers of all live releases: ``{code: {cls: f}}``.
        self.app_error_handlers: dict[int | None, dict[type, t.Any]] = {}
        for release in self.releases.values():
            for code, handlers in release.app_error_handlers.items():
                self.app_error_handlers.setdefault(code, {}).update(handlers)
        # Flattened for the per-request lookups of gitplug.runtime.hooks: one dict
        # lookup answers "does this scope have hooks in this snapshot".
        #: ``{registry: {scope: funcs}}``; scope ``None`` holds the app-wide hooks.
        self.hooks: dict[str, dict[str | None, list[t.Any]]] = {}
        #: ``{scope: {code: {exception class: handler}}}`` of plugin scopes.
        self.error_handlers: dict[str, t.Any] = {}
        #: ``{endpoint: view}`` of every live release.
        self.view_functions: dict[str, t.Callable[..., t.Any]] = {}
        for release in self.releases.values():
            for registry, scoped in release.scoped.items():
                self.hooks.setdefault(registry, {}).update(scoped)
            self.error_handlers.update(release.error_handlers)
            self.view_functions.update(release.view_functions)
        for registry, funcs in self.app_wide.items():
            self.hooks.setdefault(registry, {})[None] = funcs
        #: App-wide template filters/globals/tests: ``{kind: {name: value}}``.
        #: Names are unique across live plugins (the runtime refuses clashes).
        self.templates: dict[str, dict[str, t.Any]] = {}
        for release in self.releases.values():
            for kind, entries in release.template_registrations.items():
                if entries:
                    self.templates.setdefault(kind, {}).update(entries)
        #: True when plugin code can run in a host request of this snapshot
        #: (app-wide hooks, error handlers, template filters/globals/tests, or
        #: the view of a host endpoint, ``@plugin.endpoint("x")``).
        self.host_visible = bool(self.app_wide or self.app_error_handlers or self.templates) or any(
            release.app_endpoints() for release in self.releases.values()
        )
        #: ``{plugin name: split}`` of the plugins running a canary (README,
        #: "Canary releases"); set by the runtime before it publishes the snapshot.
        self.canaries: dict[str, CanarySplit] = {}
        #: One entry per request in flight on this snapshot. A request pins
        #: with ``append`` and unpins with ``pop``, without the runtime's lock:
        #: both are single atomic operations (a deque's appends and pops are
        #: thread-safe), and only the length is ever read
        #: (:mod:`gitplug.runtime.pinning` says why that is enough).
        self.pins: deque[None] = deque()
        # Set under the runtime's lock; read without it by pinning:
        self.superseded = False
        self.closed = False

    @property
    def inflight(self) -> int:
        """Requests in flight on this snapshot (host requests with no plugin code not counted)."""
        return len(self.pins)

    def release_for_path(self, path: str) -> LoadedRelease | None:
        """The release whose ``url_prefix`` owns ``path``.

        Literal prefixes first: one dict lookup per distinct prefix depth,
        independent of the number of plugins, and nothing more on a hit.
        Only a path no literal prefix owns is matched against prefixes with
        converters, then given to the root plugin.
        """
        by_prefix = self.by_prefix
        if not by_prefix:
            return self._fallback_for_path(path) if self._fallback else None
        if self.one_segment:
            # The common case: every prefix is one segment ("/hello").
            end = path.find("/", 1)
            return by_prefix.get(path if end < 0 else path[:end])
        for depth in self._prefix_depths:
            # The first `depth` segments of the path: "/a/b/c" -> "/a/b" for 2.
            end = -1
            for _ in range(depth + 1):
                end = path.find("/", end + 1)
                if end < 0:
                    break
            candidate = path if end < 0 else path[:end]
            release = by_prefix.get(candidate)
            if release is not None and (end >= 0 or candidate.count("/") == depth):
                return release
        return self._fallback_for_path(path) if self._fallback else None

    def _fallback_for_path(self, path: str) -> LoadedRelease | None:
        """The owner of a path no literal prefix owns: a prefix with converters, else the root.

        Never under a reserved prefix (gitplug's ``api_prefix``: its URLs, and
        the status page cookie scoped to them, are never a plugin's).
        """
        for reserved in self._reserved:
            if path == reserved or path.startswith(reserved + "/"):
                return None
        for match, release in self._variable:
            if match(path) is not None:
                return release
        return self._root

    def release_for_scope(self, scope: str) -> LoadedRelease | None:
        """The release owning a blueprint scope or endpoint (``hello.x``)."""
        return self.releases.get(scope.partition(".")[0])

    def __repr__(self) -> str:
        names = ", ".join(f"{n}@{r.release_id[:8]}" for n, r in self.releases.items())
        return f"<Snapshot #{self.generation} [{names}] inflight={self.inflight}>"
