"""Per-request views of the host application's hook registries.

Flask keeps hooks in dicts keyed by scope (``None`` for the whole app, a
blueprint name otherwise) and reads them with ``scope in registry`` and
``registry[scope]`` while it handles a request. gitplug replaces those dicts
on the host with subclasses that answer, for the scopes of a plugin and for
the app-wide scope, from the snapshot the current request is pinned to.
The host's own entries stay in the dict itself, so the host keeps
registering hooks exactly as before and behaves exactly as before.

Nothing here is mutated per request or per swap: a swap only publishes a new
snapshot, and every lookup reads the request's own snapshot. These methods
run several times per request, so they are written for speed: one context
variable read, one environ lookup, one dict lookup.
"""

from __future__ import annotations

import typing as t
from collections import defaultdict

from flask.globals import _cv_request

from .environ import ENVIRON_SNAPSHOT
from .snapshot import Snapshot

__all__ = ["LayeredHooks", "LayeredErrorHandlers", "LayeredViews", "request_snapshot"]

_EMPTY: dict[t.Any, t.Any] = {}


class _SnapshotSource(t.Protocol):
    snapshot: Snapshot


def request_snapshot(runtime: _SnapshotSource) -> Snapshot:
    """The snapshot of the current request, else the live one."""
    ctx = _cv_request.get(None)
    if ctx is not None:
        snapshot = ctx.request.environ.get(ENVIRON_SNAPSHOT)
        if snapshot is not None:
            return snapshot  # type: ignore[no-any-return]
    return runtime.snapshot


class LayeredHooks(defaultdict):  # type: ignore[type-arg]
    """A ``{scope: [funcs]}`` registry of the host with plugins layered in.

    * scope ``None``: the host's app-wide hooks, then the live plugins'
      app-wide hooks;
    * a plugin's scope (``hello``, ``hello.child``): that plugin's hooks from
      the request's snapshot;
    * any other scope: the host's own entry, unchanged.
    """

    def __init__(self, original: defaultdict, runtime: _SnapshotSource, registry: str) -> None:  # type: ignore[type-arg]
        super().__init__(original.default_factory, original)
        self._runtime = runtime
        self._registry = registry

    def _layer(self) -> dict[t.Any, list[t.Any]]:
        ctx = _cv_request.get(None)
        snapshot = ctx.request.environ.get(ENVIRON_SNAPSHOT) if ctx is not None else None
        if snapshot is None:
            snapshot = self._runtime.snapshot
        return snapshot.hooks.get(self._registry, _EMPTY)  # type: ignore[no-any-return]

    def __contains__(self, scope: object) -> bool:
        return dict.__contains__(self, scope) or scope in self._layer()

    def __getitem__(self, scope: t.Any) -> t.Any:
        if dict.__contains__(self, scope):
            own = dict.__getitem__(self, scope)
            if scope is None:
                extra = self._layer().get(None)
                if extra:
                    return [*own, *extra]
            return own
        found = self._layer().get(scope)
        if found is not None:
            return found
        return super().__getitem__(scope)  # defaultdict: creates the host's entry

    def get(self, scope: t.Any, default: t.Any = None) -> t.Any:
        return self[scope] if scope in self else default

    def __reduce__(self) -> t.Any:  # pragma: no cover - never pickled in practice
        return (dict, (dict(self),))


class LayeredErrorHandlers(defaultdict):  # type: ignore[type-arg]
    """``error_handler_spec`` with plugins layered in.

    On conflicts in the app-wide scope the host's own handler wins: a plugin
    cannot replace the host's error pages (README, "Guarantees").
    """

    def __init__(self, original: defaultdict, runtime: _SnapshotSource) -> None:  # type: ignore[type-arg]
        super().__init__(original.default_factory, original)
        self._runtime = runtime

    def __getitem__(self, scope: t.Any) -> t.Any:
        if scope is None:
            own = super().__getitem__(None)
            extra = request_snapshot(self._runtime).app_error_handlers
            if not extra:
                return own
            merged: defaultdict[int | None, dict[type, t.Any]] = defaultdict(dict)
            for code, handlers in extra.items():
                merged[code].update(handlers)
            for code, handlers in own.items():
                merged[code].update(handlers)
            return merged
        if not dict.__contains__(self, scope):
            found = request_snapshot(self._runtime).error_handlers.get(scope)
            if found is not None:
                return found
            if isinstance(scope, str) and request_snapshot(self._runtime).release_for_scope(scope):
                return defaultdict(dict)  # a plugin scope without handlers: don't touch the host dict
        return super().__getitem__(scope)


class LayeredViews(dict):  # type: ignore[type-arg]
    """``view_functions`` of the host; plugin endpoints come from the snapshot.

    Host lookups hit the dict itself. A plugin endpoint is answered by
    :meth:`__missing__` from the request's snapshot, except while only one
    snapshot is open: then every request that can dispatch to a plugin view
    is pinned to that snapshot, so its views are held as plain entries
    (:meth:`serve_directly`) and the lookup is dict's own, as for a
    blueprint's view.
    """

    def __init__(self, original: dict, runtime: _SnapshotSource) -> None:  # type: ignore[type-arg]
        super().__init__(original)
        self._runtime = runtime
        #: The entries :meth:`serve_directly` put in (never a host's own).
        self._direct: dict[str, t.Any] = {}

    def serve_directly(self, views: t.Mapping[str, t.Any]) -> None:
        """Hold exactly ``views`` (the one open snapshot's, or none) as plain entries. Runtime lock held.

        Called before a second snapshot can serve a request (a publish adds
        it to the open ones first), so no request of another snapshot ever
        finds these. A name the host has a view for keeps the host's.
        """
        for endpoint, view in self._direct.items():
            if views.get(endpoint) is not view and dict.get(self, endpoint) is view:
                dict.pop(self, endpoint)
        direct = {}
        for endpoint, view in views.items():
            current = dict.get(self, endpoint)
            if current is None:
                dict.__setitem__(self, endpoint, view)
                current = view
            if current is view:
                direct[endpoint] = view
        self._direct = direct

    def yield_to_host(self, endpoints: t.Iterable[t.Any]) -> None:
        """Drop the held entries of ``endpoints``: the host is adding rules for them. Runtime lock held.

        The host's view of such an endpoint then wins, as for any name the
        host uses (README, "Differences from a blueprint").
        """
        for endpoint in endpoints:
            view = self._direct.pop(endpoint, None)
            if view is not None and dict.get(self, endpoint) is view:
                dict.pop(self, endpoint)

    def host_has(self, endpoint: str) -> bool:
        """Whether the host itself has a view for ``endpoint`` (not a plugin's held entry)."""
        return dict.__contains__(self, endpoint) and endpoint not in self._direct

    def __missing__(self, endpoint: str) -> t.Any:
        # request_snapshot(), inline: every plugin request dispatches through here.
        ctx = _cv_request.get(None)
        snapshot = ctx.request.environ.get(ENVIRON_SNAPSHOT) if ctx is not None else None
        if snapshot is None:
            snapshot = self._runtime.snapshot
        view = snapshot.view_functions.get(endpoint)
        if view is not None:
            return view
        raise KeyError(endpoint)
