"""Dispatch and atomic swap of plugin releases inside one host Flask app.

:class:`Runtime` is installed once on a host application. From then on:

* every request is pinned, on arrival, to the current :class:`Snapshot`
  (WSGI middleware, no lock on the common path: :mod:`gitplug.runtime.pinning`);
* Flask's URL adapter, view lookup, hook registries, error handlers and
  template lookups answer from that snapshot (:mod:`gitplug.runtime.routing`,
  :mod:`gitplug.runtime.hooks`, :mod:`gitplug.runtime.templating`);
* :meth:`Runtime.swap` builds and verifies a new release completely, then
  publishes a new snapshot with one reference assignment;
* a host route under a plugin's prefix answers instead of the plugin,
  whenever it was added (before or after the plugin was mounted): the
  overlap is logged on every publish and when the host adds the route;
* a retired release is unloaded (``on_unload``, module purge) by a reaper
  thread once the last snapshot holding it has no request in flight,
  streaming responses included.
"""

from __future__ import annotations

import gc
import itertools
import logging
import queue
import threading
import time
import typing as t
import weakref
from collections import defaultdict
from collections.abc import Iterable

from flask import Flask
from werkzeug.routing import Map, MapAdapter, Rule

from .. import signals
from ..errors import HealthCheckFailed, MountError, OnLoadFailed, PluginLoadError
from ..prefixes import PrefixPattern, invalid_prefix_message
from .canary import CanarySplit
from .codecache import CodeCache
from .environ import ENVIRON_RELEASE, ENVIRON_SNAPSHOT
from .hooks import LayeredErrorHandlers, LayeredHooks, LayeredViews
from .loaded import HOOK_REGISTRIES, LoadedRelease, ReleaseSpec, build_release, prefix_pattern
from .loader import fault_location
from .pinning import PinRequests
from .routing import (
    claims_map,
    host_claims,
    host_rules_under,
    install_plugin_url_builds,
    install_snapshot_map,
    share_host_endpoints,
)
from .snapshot import Snapshot
from .templating import (
    TEMPLATE_KINDS,
    TemplateRegistry,
    install_routing_environment,
    install_template_layers,
)

__all__ = ["Runtime"]

logger = logging.getLogger(__name__)

_StartResponse = t.Callable[..., t.Any]


class Runtime:
    """Serves plugin releases in ``app`` and swaps them atomically.

    One per host application, created by :class:`gitplug.GitPlug`.
    """

    def __init__(self, app: Flask, *, leak_grace_s: float = 30.0, code_cache: CodeCache | None = None) -> None:
        self.app = app
        #: Compiled code shared with other processes loading the same releases.
        self.code_cache = code_cache
        #: The live snapshot. Replaced (never mutated) under ``_lock``.
        self.snapshot = Snapshot({}, 0)
        self._lock = threading.Lock()
        self._generations = itertools.count(1)
        self._swap_locks: dict[str, threading.Lock] = {}
        self._stopped: dict[str, ReleaseSpec] = {}
        self._reaper_queue: queue.Queue[LoadedRelease | None] = queue.Queue()
        self._reaper: threading.Thread | None = None
        self._leak_grace_s = leak_grace_s
        #: ``(deadline, label, weakref to the release's sentinel)`` of unloaded releases,
        #: oldest first; checked for leaks by the reaper once the deadline passes.
        self._retired_refs: list[tuple[float, str, weakref.ref[t.Any]]] = []
        #: Rules the host added since gitplug was installed: a release's map
        #: builds host endpoints from an index of this version (see
        #: :func:`~gitplug.runtime.routing.share_host_endpoints`).
        self.host_rules_version = 0
        #: Live prefixes that have host rules under them (read per request, no lock).
        self.host_shadowed: frozenset[str] = frozenset()
        #: ``{live prefix: host rules under it}``, kept current by publish and
        #: by the host map's ``add``; ``_claims`` holds their private maps.
        self._host_under: dict[str, list[Rule]] = {}
        self._claims: dict[str, tuple[list[Rule], Map]] = {}
        #: ``{live prefix: its pattern}``, for rules the host adds later.
        self._patterns: dict[str, PrefixPattern] = {}
        #: Prefixes no plugin may share (gitplug's own ``api_prefix``): see :meth:`reserve`.
        self.reserved_prefixes: tuple[str, ...] = ()
        #: ``{plugin: (canary release, percent)}`` of the running canaries; under ``_lock``.
        self._canaries: dict[str, tuple[LoadedRelease, float]] = {}
        self._install()

    # -- installation ------------------------------------------------------

    def _install(self) -> None:
        app = self.app
        # Hook registries start plain; _sync_registries layers one only while
        # an open snapshot has plugin hooks in it (see there).
        self._open_snapshots: set[Snapshot] = {self.snapshot}
        #: True while an open snapshot has app-wide template registrations
        #: (read without the lock by gitplug.runtime.templating: a bool is atomic).
        self.template_layers_needed = False
        app.error_handler_spec = LayeredErrorHandlers(app.error_handler_spec, self)
        app.view_functions = LayeredViews(app.view_functions, self)
        url_map = app.url_map
        host_bind_to_environ = url_map.bind_to_environ

        def bind_to_environ(environ: t.Any, server_name: str | None = None, subdomain: str | None = None) -> MapAdapter:
            # Flask's create_url_adapter calls this for each request (an app
            # context's adapter is made by bind(), and left alone).
            adapter = host_bind_to_environ(environ, server_name, subdomain)
            if type(environ) is not dict:
                environ = environ.environ  # a Request, which werkzeug also takes
            release = environ.get(ENVIRON_RELEASE)
            if release is None:
                if ENVIRON_SNAPSHOT in environ:
                    # A host request keeps the plain adapter: matching and
                    # host URLs cost what they cost without gitplug; plugin
                    # URLs come from build_plugin_url.
                    return adapter
                # A request that did not come through the WSGI entry point
                # (app.test_request_context()): pin it, without counting.
                snapshot = environ[ENVIRON_SNAPSHOT] = self.snapshot
                release = self.route(snapshot, environ) if snapshot.releases else None
                if release is None:
                    return adapter
                environ[ENVIRON_RELEASE] = release
            # A plugin request: the host's own adapter, already bound to this
            # request, matching on (and building from) the release's map.
            if release.host_rules_version != self.host_rules_version:
                share_host_endpoints(release, url_map, self.host_rules_version)
            adapter.map = release.url_map
            return adapter

        # An instance attribute, not a subclass (see install_snapshot_map).
        url_map.bind_to_environ = bind_to_environ  # type: ignore[method-assign]
        install_template_layers(install_routing_environment(app), self)
        install_snapshot_map(app.url_map, self)
        install_plugin_url_builds(app, self)
        app.wsgi_app = PinRequests(app.wsgi_app, self)  # type: ignore[method-assign]

    # -- request accounting ------------------------------------------------

    def route(self, snapshot: Snapshot, environ: dict[str, t.Any]) -> LoadedRelease | None:
        """The release of ``snapshot`` that serves this request, or None for the host.

        The one place a request picks its release (pinning asks it once per
        request, again only if its snapshot was closed under it): the release
        owning the path's prefix, unless a host route under that prefix
        answers (host routes win). Needs no lock: it reads the immutable
        ``snapshot`` and :attr:`host_shadowed`, one reference.
        """
        path = environ.get("PATH_INFO") or "/"
        if snapshot.one_segment:
            # Snapshot.release_for_path's common case, inline: every request asks.
            end = path.find("/", 1)
            release = snapshot.by_prefix.get(path if end < 0 else path[:end])
        else:
            release = snapshot.release_for_path(path)
        if release is not None and release.prefix in self.host_shadowed and self.host_claims(release, environ):
            # One set lookup; the host's rules are matched only under a prefix
            # the host has routes under (rare, and then small).
            return None
        return release

    def _leave_superseded(self, snapshot: Snapshot) -> None:
        """A request left a superseded snapshot: close it if that was the last one."""
        with self._lock:
            done = self._close_if_idle(snapshot)
        self._schedule_unload(done)

    def _count_error(self, release: LoadedRelease) -> None:
        with self._lock:
            release.errors += 1

    def _sync_registries(self) -> None:
        """Layer exactly the hook registries that some open snapshot needs. Lock held.

        Also the view lookups: while one snapshot is open, its views are plain
        entries of the host's ``view_functions`` (see ``LayeredViews``).

        A registry no open snapshot has plugin hooks for stays the host's
        plain dict, so requests pay nothing for it. Swapping the attribute is
        one assignment, and both objects hold the same host entries, so a
        request that reads it before and after sees the same answers.
        """
        app = self.app
        views = app.view_functions
        if isinstance(views, LayeredViews):
            only = next(iter(self._open_snapshots)) if len(self._open_snapshots) == 1 else None
            views.serve_directly(only.view_functions if only is not None else {})
        self.template_layers_needed = any(snapshot.templates for snapshot in self._open_snapshots)
        for kind in TEMPLATE_KINDS:
            registry = getattr(app.jinja_env, kind)
            if isinstance(registry, TemplateRegistry):
                registry.settle(True)
                registry.yield_builtins(
                    {name for snapshot in self._open_snapshots for name in snapshot.templates.get(kind, ())}
                )
                registry.settle(self.template_layers_needed)
        for registry in HOOK_REGISTRIES:
            needed = any(snapshot.hooks.get(registry) for snapshot in self._open_snapshots)
            current = getattr(app, registry)
            layered = isinstance(current, LayeredHooks)
            if needed and not layered:
                setattr(app, registry, LayeredHooks(current, self, registry))
            elif layered and not needed:
                plain: defaultdict[t.Any, t.Any] = defaultdict(current.default_factory)
                dict.update(plain, dict.items(current))
                setattr(app, registry, plain)

    def _close_if_idle(self, snapshot: Snapshot) -> list[LoadedRelease]:
        """Close a superseded, idle snapshot; return releases now unused. Lock held."""
        if snapshot.inflight or snapshot.closed or not snapshot.superseded:
            return []
        snapshot.closed = True
        self._open_snapshots.discard(snapshot)
        self._sync_registries()
        unused = []
        for release in snapshot.releases.values():
            release.snapshot_refs -= 1
            if release.snapshot_refs == 0 and release.retired:
                unused.append(release)
        return unused

    # -- loading and swapping ----------------------------------------------

    def reserve(self, prefix: str) -> None:
        """Keep every plugin out of ``prefix`` (gitplug's ``api_prefix``).

        A literal prefix overlapping it is refused; the root plugin and
        prefixes with converters never own a path under it. gitplug's status
        page cookie is scoped to that path, and no plugin may receive it.
        """
        if prefix not in self.reserved_prefixes:
            self.reserved_prefixes = (*self.reserved_prefixes, prefix)

    def check_mount(self, name: str, url_prefix: str) -> None:
        """Refuse an invalid prefix, a name the host's blueprints use, or a prefix another plugin has.

        A host route under ``url_prefix`` does not refuse the mount: the
        host's route keeps answering its URLs (host routes win, whenever they
        were added), and :meth:`publish` logs the overlap.
        """
        invalid = invalid_prefix_message(name, url_prefix)
        if invalid is not None:
            raise MountError(invalid)
        pattern = prefix_pattern(self.app, name, url_prefix)
        if name in self.app.blueprints:
            raise MountError(
                f"plugin {name!r}: the host application already has a blueprint named"
                f" {name!r}. Rename the plugin in the configuration."
            )
        clash = _prefix_clash(name, pattern, self.snapshot.releases.values(), self.reserved_prefixes)
        if clash is not None:
            raise MountError(clash)

    # -- host routes under plugin prefixes -------------------------------------

    def host_claims(self, release: LoadedRelease, environ: dict[str, t.Any]) -> bool:
        """Whether a host route under ``release``'s prefix answers this request.

        Only asked for prefixes in :attr:`host_shadowed`, so plugin requests
        under a prefix the host has no route under pay one set lookup.
        """
        claims = self._claims_for(release.prefix)
        if claims is None:
            return False
        try:
            # Marked as a host request of the live snapshot, so that the URL
            # adapter made for it is the host's plain one and routes nothing.
            probe = {**environ, ENVIRON_SNAPSHOT: self.snapshot}
            request = self.app.request_class(probe, populate_request=False, shallow=True)
            host_adapter = self.app.create_url_adapter(request)
        except Exception:  # noqa: BLE001 - e.g. a Host header TRUSTED_HOSTS refuses
            # Called while a request is routed, before Flask handles it: never
            # raise here. The request's own URL matching answers the error.
            return False
        return host_adapter is not None and host_claims(claims, host_adapter)

    def _claims_for(self, prefix: str) -> Map | None:
        """The private map of the host rules under ``prefix``, built on first use.

        Built lazily, not on every rule the host adds: a host that adds its
        routes after gitplug restored a root plugin (every rule is under the
        root) would otherwise rebuild a map of all its rules per rule added.
        No lock: two requests may both build it; the map is kept only while
        it is of the current rule list (the list is replaced, never mutated).
        """
        rules = self._host_under.get(prefix)
        if not rules:
            return None
        cached = self._claims.get(prefix)
        if cached is not None and cached[0] is rules:
            return cached[1]
        claims = claims_map(self.app.url_map, rules)
        self._claims[prefix] = (rules, claims)
        return claims

    def _set_host_under(self, prefix: str, rules: list[Rule]) -> None:
        """Record the host rules under a live prefix (its private map is rebuilt on use). Lock held."""
        self._host_under[prefix] = rules
        self._claims.pop(prefix, None)
        self.host_shadowed = frozenset(p for p, under in self._host_under.items() if under)

    def _track_prefixes(self, snapshot: Snapshot) -> None:
        """Follow the live prefixes of ``snapshot``: scan the host's rules for new ones. Lock held."""
        live = {release.prefix: release.pattern for release in snapshot.releases.values()}
        for prefix in set(self._host_under) - set(live):
            self._set_host_under(prefix, [])
            del self._host_under[prefix]
            del self._patterns[prefix]
        for prefix in set(live) - set(self._host_under):
            self._patterns[prefix] = live[prefix]
            self._set_host_under(prefix, host_rules_under(self.app.url_map.iter_rules(), live[prefix]))

    def host_rules_added(self, rules: list[Rule]) -> None:
        """Called by the host's map for rules added after gitplug was installed.

        A rule under a live prefix answers from the next request on; the log
        says which plugin's prefix it now overlaps.
        """
        # Release maps copy the host's endpoint index on their next request.
        self.host_rules_version += 1
        views = self.app.view_functions
        if isinstance(views, LayeredViews):
            # Flask checks for a view of the endpoint right after adding its
            # rule: a plugin's held entry must not pass for the host's own.
            with self._lock:
                views.yield_to_host({rule.endpoint for rule in rules})
        if not self._host_under:
            return
        found: list[tuple[str, Rule]] = []
        with self._lock:
            for prefix, current in list(self._host_under.items()):
                new = host_rules_under(rules, self._patterns[prefix])
                if new:
                    self._set_host_under(prefix, current + new)
                    found.extend((prefix, rule) for rule in new)
            owners = {release.prefix: release.name for release in self.snapshot.releases.values()}
        for prefix, rule in found:
            if self._patterns[prefix].root:
                continue
            logger.warning(
                "plugin %s: the host added route %r (endpoint %r) under url_prefix %r; the host's"
                " route answers it from now on (host routes win)",
                owners.get(prefix, "?"),
                rule.rule,
                rule.endpoint,
                prefix,
            )

    def swap_lock(self, name: str) -> threading.Lock:
        """The lock that serialises loads and swaps of one plugin."""
        with self._lock:
            return self._swap_locks.setdefault(name, threading.Lock())

    def load(self, spec: ReleaseSpec) -> LoadedRelease:
        """Import, register and verify a release without publishing it.

        Raises :class:`PluginLoadError`; nothing served changes on failure.
        """
        if spec.url_prefix is not None:
            self.check_mount(spec.name, spec.url_prefix)
        try:
            release = build_release(self.app, spec, code_cache=self.code_cache)
            if spec.url_prefix is None:
                # The prefix the plugin's constructor declares is known only now.
                try:
                    self.check_mount(spec.name, release.url_prefix)
                except MountError:
                    release.purge()
                    raise
            self._verify(release)
        except PluginLoadError as exc:
            logger.warning("plugin %s: release %s failed to load: %s", spec.name, spec.release_id, exc)
            signals.plugin_load_failed.send(self.app, plugin=spec.name, release=spec.release_id, error=exc)
            raise
        return release

    def _verify(self, release: LoadedRelease) -> None:
        plugin = release.plugin
        assert plugin is not None
        loaded = False
        try:
            with self.app.app_context():
                for func in plugin.on_load_funcs:
                    try:
                        release.run_in_context(func)
                    except Exception as exc:
                        raise OnLoadFailed(
                            f"plugin {release.name!r}: on_load callback {func.__qualname__}"
                            f" raised {type(exc).__name__}: {exc}{_where(exc, release)}."
                            " The live release is unchanged.",
                            plugin=release.name,
                            release=release.release_id,
                            **_location(exc, release),
                        ) from exc
                loaded = True
                for func in plugin.health_check_funcs:
                    try:
                        healthy = release.run_in_context(func)
                    except Exception as exc:
                        raise HealthCheckFailed(
                            f"plugin {release.name!r}: health check {func.__qualname__} raised"
                            f" {type(exc).__name__}: {exc}{_where(exc, release)}."
                            " The live release is unchanged.",
                            plugin=release.name,
                            release=release.release_id,
                            **_location(exc, release),
                        ) from exc
                    if not healthy:
                        raise HealthCheckFailed(
                            f"plugin {release.name!r}: health check {func.__qualname__} returned"
                            f" {healthy!r}. The live release is unchanged.",
                            plugin=release.name,
                            release=release.release_id,
                        )
        except PluginLoadError:
            # What on_load opened is closed again when the health check fails.
            self._unload_now(release, run_callbacks=loaded, was_live=False)
            raise

    def _clash(self, release: LoadedRelease, others: t.Iterable[LoadedRelease]) -> str | None:
        """Why ``release`` cannot be live beside ``others``, or None."""
        others = list(others)
        clash = _prefix_clash(release.name, release.pattern, others, self.reserved_prefixes)
        if clash is not None:
            return clash
        for other in others:
            if other.name == release.name:
                continue
            for kind in TEMPLATE_KINDS:
                shared = set(release.template_registrations.get(kind, ())) & set(
                    other.template_registrations.get(kind, ())
                )
                if shared:
                    return (
                        f"plugin {release.name!r}: app-wide template {kind[:-1]}"
                        f" {', '.join(sorted(shared))!r} is already registered by plugin"
                        f" {other.name!r}. Rename it in one of the plugins."
                    )
            shared = set(release.app_endpoints()) & set(other.app_endpoints())
            if shared:
                return (
                    f"plugin {release.name!r}: the view of endpoint(s)"
                    f" {', '.join(repr(e) for e in sorted(shared))} (Blueprint.endpoint) is already"
                    f" given by plugin {other.name!r}."
                    " Keep it in one of the plugins."
                )
        return None

    def publish(self, name: str, release: LoadedRelease | None) -> LoadedRelease | None:
        """Make ``release`` the live release of ``name`` (``None`` stops it).

        One reference assignment; returns the release it replaced. Raises
        :class:`MountError` (and unloads ``release``) when it clashes with
        another live plugin: checked here, under the lock, so two plugins
        loaded at once can never both take one prefix. A canary of ``name``
        ends with it: its release retires unless it is ``release`` (a promotion).
        """
        with self._lock:
            old_snapshot = self.snapshot
            clash = self._clash(release, old_snapshot.releases.values()) if release is not None else None
            error = MountError(clash) if clash is not None else None
            overlapped: list[Rule] = []
            if error is None:
                releases = dict(old_snapshot.releases)
                old = releases.pop(name, None)
                if release is not None:
                    releases[name] = release
                canaries = dict(self._canaries)
                canaries.pop(name, None)
                unused = self._publish_locked(releases, canaries)
                if release is not None and not release.pattern.root:
                    # The root serves only what the host does not: no overlap to report.
                    overlapped = list(self._host_under.get(release.prefix, ()))
        if error is not None:
            assert release is not None
            self._unload_now(release, run_callbacks=True, was_live=False)
            signals.plugin_load_failed.send(self.app, plugin=name, release=release.release_id, error=error)
            raise error
        if overlapped:
            assert release is not None
            logger.warning(
                "plugin %s: the host's routes %s lie under url_prefix %r; the host answers them,"
                " not the plugin (host routes win). Choose another url_prefix to serve them from the plugin.",
                name,
                ", ".join(f"{rule.rule!r} (endpoint {rule.endpoint!r})" for rule in overlapped),
                release.prefix,
            )
        shadowed = self._shadowed_template_names(release)
        if shadowed:
            logger.warning(
                "plugin %s: app-wide names the host already uses are ignored (the host's win): %s",
                name,
                ", ".join(shadowed),
            )
        if release is not None and release is not old and not release.announced:
            logger.info("plugin %s: release %s is live", name, release.release_id)
            release.announced = True
            signals.plugin_loaded.send(self.app, plugin=name, release=release.release_id, commit=release.commit)
        self._schedule_unload(unused)
        return old

    def _publish_locked(
        self, releases: dict[str, LoadedRelease], canaries: dict[str, tuple[LoadedRelease, float]]
    ) -> list[LoadedRelease]:
        """Publish ``releases`` (and a snapshot per canary) as live; return releases now unused. Lock held.

        A release served before (live or canary) that serves no more retires:
        it is unloaded once the last snapshot holding it has no request in flight.
        """
        old_snapshot = self.snapshot
        generation = next(self._generations)
        new_snapshot = Snapshot(releases, generation, self.reserved_prefixes)
        snapshots = [new_snapshot]
        # A canary of a plugin that is no longer live has nothing to split from.
        canaries = {n: c for n, c in canaries.items() if n in releases and releases[n] is not c[0]}
        for name, (canary, percent) in canaries.items():
            side = Snapshot({**releases, name: canary}, generation, self.reserved_prefixes)
            new_snapshot.canaries[name] = CanarySplit(releases[name], canary, percent, side)
            snapshots.append(side)
        self._canaries = canaries
        before = {id(r): r for snap in _with_sides(old_snapshot) for r in snap.releases.values()}
        serving = {id(r): r for snap in snapshots for r in snap.releases.values()}
        for snapshot in snapshots:
            for live in snapshot.releases.values():
                live.snapshot_refs += 1
            self._open_snapshots.add(snapshot)
        self._sync_registries()
        self._track_prefixes(new_snapshot)
        for key, gone in before.items():
            if key not in serving:
                gone.retired = True
        for live in serving.values():
            live.retired = False
        self.snapshot = new_snapshot
        unused = []
        for snapshot in _with_sides(old_snapshot):
            snapshot.superseded = True
            unused.extend(self._close_if_idle(snapshot))
        return unused

    # -- canaries ----------------------------------------------------------------

    def start_canary(self, name: str, release: LoadedRelease, percent: float) -> None:
        """Let ``release`` (loaded and verified) serve ``percent`` of ``name``'s clients.

        The live release serves the others (README, "Canary releases"). A
        canary already running for ``name`` is replaced (its release
        retires). Raises :class:`MountError` (and unloads ``release``) when
        ``name`` has no live release or ``release`` clashes with another plugin.
        """
        with self._lock:
            snapshot = self.snapshot
            clash = self._clash(release, snapshot.releases.values())
            if clash is None and name not in snapshot.releases:
                clash = f"plugin {name!r}: no release is live, so a canary has nothing to share traffic with"
            if clash is None:
                canaries = dict(self._canaries)
                canaries[name] = (release, float(percent))
                unused = self._publish_locked(dict(snapshot.releases), canaries)
        if clash is not None:
            self._unload_now(release, run_callbacks=True, was_live=False)
            error = MountError(clash)
            signals.plugin_load_failed.send(self.app, plugin=name, release=release.release_id, error=error)
            raise error
        release.announced = True
        logger.info("plugin %s: release %s serves %g%% of the clients (canary)", name, release.release_id, percent)
        signals.plugin_loaded.send(self.app, plugin=name, release=release.release_id, commit=release.commit)
        self._schedule_unload(unused)

    def canary(self, name: str) -> LoadedRelease | None:
        """The release serving ``name``'s canary share, or None."""
        split = self.snapshot.canaries.get(name)
        return split.canary if split is not None else None

    def promote_canary(self, name: str) -> LoadedRelease | None:
        """Make ``name``'s canary its live release for every request; the old one retires.

        Returns the promoted release (None when no canary runs).
        """
        with self.swap_lock(name):
            canary = self.canary(name)
            if canary is None:
                return None
            self.publish(name, canary)
            return canary

    def end_canary(self, name: str) -> LoadedRelease | None:
        """Send every client of ``name`` back to its live release; the canary's retires.

        Returns the release that was the canary (None when no canary ran).
        """
        with self.swap_lock(name), self._lock:
            canary = self.canary(name)
            if canary is None:
                return None
            canaries = dict(self._canaries)
            canaries.pop(name, None)
            unused = self._publish_locked(dict(self.snapshot.releases), canaries)
        self._schedule_unload(unused)
        return canary

    def _shadowed_template_names(self, release: LoadedRelease | None) -> list[str]:
        if release is None:
            return []
        env = self.app.jinja_env
        return [
            f"{kind[:-1]} {name!r}"
            for kind in TEMPLATE_KINDS
            for name in release.template_registrations.get(kind, ())
            if dict.__contains__(getattr(env, kind), name)
        ] + [
            # Blueprint.endpoint("x") for an endpoint the host has a view of.
            f"view of endpoint {endpoint!r}"
            for endpoint in release.app_endpoints()
            if _host_has_view(self.app, endpoint)
        ]

    def swap(self, spec: ReleaseSpec) -> LoadedRelease:
        """Load, verify and publish a release; the old one retires."""
        with self.swap_lock(spec.name):
            release = self.load(spec)
            self.publish(spec.name, release)
            self._stopped.pop(spec.name, None)
            return release

    def stop(self, name: str) -> bool:
        """Unmount ``name``: its URLs 404 and all its hooks are gone."""
        with self.swap_lock(name):
            live = self.snapshot.releases.get(name)
            if live is None:
                return False
            self._stopped[name] = live.spec
            self.publish(name, None)
            return True

    def start(self, name: str) -> LoadedRelease | None:
        """Bring back the release a :meth:`stop` took down (reloaded from disk)."""
        spec = self._stopped.get(name)
        if spec is None:
            return None
        return self.swap(spec)

    def live(self, name: str) -> LoadedRelease | None:
        return self.snapshot.releases.get(name)

    # -- unloading -----------------------------------------------------------

    def _schedule_unload(self, releases: Iterable[LoadedRelease]) -> None:
        for release in releases:
            self._ensure_reaper()
            self._reaper_queue.put(release)

    def _ensure_reaper(self) -> None:
        if self._reaper is None or not self._reaper.is_alive():
            with self._lock:
                if self._reaper is None or not self._reaper.is_alive():
                    self._reaper = threading.Thread(
                        target=self._reap, name="gitplug-reaper", daemon=True
                    )
                    self._reaper.start()

    def _reap(self) -> None:
        """Unload drained releases; check for leaks once their grace period is over.

        One thread does both: leak checks are deadlines it waits for, not a
        timer thread per unload.
        """
        while True:
            timeout = None
            if self._retired_refs:
                timeout = max(0.0, self._retired_refs[0][0] - time.monotonic())
            try:
                release = self._reaper_queue.get(timeout=timeout)
            except queue.Empty:
                self.report_leaks()
                continue
            try:
                if release is None:
                    return
                self._unload_now(release, run_callbacks=True)
            except Exception:  # noqa: BLE001 - the reaper must survive any plugin
                logger.exception("plugin %s: unloading %r failed", getattr(release, "name", "?"), release)
            finally:
                self._reaper_queue.task_done()

    def _unload_now(self, release: LoadedRelease, *, run_callbacks: bool, was_live: bool = True) -> None:
        """Run ``on_unload`` (when asked) and purge the release's modules.

        ``was_live`` is False for a release that failed verification: its
        ``on_unload`` still closes what ``on_load`` opened, but no
        ``plugin_unloaded`` is sent for a release that never served.
        """
        if release.unloaded:
            return
        plugin = release.plugin
        if run_callbacks and plugin is not None:
            with self.app.app_context():
                for func in plugin.on_unload_funcs:
                    try:
                        release.run_in_context(func)
                    except Exception:  # noqa: BLE001 - report and go on unloading
                        logger.exception(
                            "plugin %s: on_unload callback %s of release %s raised",
                            release.name,
                            getattr(func, "__qualname__", func),
                            release.release_id,
                        )
        sentinel_ref = release.namespace.sentinel_ref
        if sentinel_ref is not None and self._leak_grace_s > 0:
            deadline = time.monotonic() + self._leak_grace_s
            self._retired_refs.append((deadline, repr(release), sentinel_ref))
        release.purge()
        if run_callbacks and was_live:
            logger.info("plugin %s: release %s unloaded", release.name, release.release_id)
            signals.plugin_unloaded.send(
                self.app, plugin=release.name, release=release.release_id, commit=release.commit
            )

    def wait_idle(self, timeout: float = 10.0) -> bool:
        """Wait until every retired, drained release has been unloaded."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._reaper_queue.unfinished_tasks == 0:
                return True
            time.sleep(0.005)
        return False

    def report_leaks(self, *, all_now: bool = False) -> list[str]:
        """Log what still holds retired releases whose grace period is over.

        Returns the findings. ``all_now`` checks every retired release at
        once, whatever its deadline (tests, diagnostics).
        """
        now = time.monotonic()
        due = [entry for entry in self._retired_refs if all_now or entry[0] <= now]
        if not due:
            return []
        self._retired_refs = [entry for entry in self._retired_refs if entry not in due]
        gc.collect()
        findings = []
        for _deadline, label, ref in due:
            sentinel = ref()
            if sentinel is None:
                continue
            # The sentinel is held by module globals; say what holds those.
            holders: set[str] = set()
            for module_globals in gc.get_referrers(sentinel):
                if isinstance(module_globals, dict):
                    holders.update(type(r).__name__ for r in gc.get_referrers(module_globals))
            holders -= {"frame", "list", "dict", "module"}
            finding = f"{label}: code still reachable after unload, held by {', '.join(sorted(holders)) or 'unknown'}"
            findings.append(finding)
            logger.warning("leak: %s (see README: what plugin code must not do)", finding)
            del sentinel
        return findings

    def shutdown(self) -> None:
        """Stop the reaper thread (tests, process exit)."""
        if self._reaper is not None and self._reaper.is_alive():
            self._reaper_queue.put(None)
            self._reaper.join(timeout=5)


def _with_sides(snapshot: Snapshot) -> list[Snapshot]:
    """``snapshot`` and the snapshot of each of its canaries."""
    return [snapshot, *(split.snapshot for split in snapshot.canaries.values())]


def _prefix_clash(
    name: str, pattern: PrefixPattern, others: t.Iterable[LoadedRelease], reserved: t.Iterable[str] = ()
) -> str | None:
    """Why plugin ``name`` cannot take ``pattern`` beside ``others``, or None.

    Two prefixes clash when some path could lie under both (equal, nested, or
    converters that could match the same segment); the root clashes only
    with another root. A literal prefix must not overlap a reserved prefix
    (gitplug's ``api_prefix``); the root and prefixes with converters never
    own a path under one (see :class:`~gitplug.runtime.snapshot.Snapshot`).
    """
    prefix = pattern.key
    for other in others:
        if other.name != name and other.pattern.could_overlap(pattern):
            if pattern.root:
                return (
                    f"plugin {name!r}: url_prefix '/' (the site root) is already taken by plugin"
                    f" {other.name!r}; one plugin per host may serve the site root. Give one of"
                    " them another prefix."
                )
            return (
                f"plugin {name!r}: url_prefix {prefix!r} overlaps plugin {other.name!r} at"
                f" {other.prefix!r} (some URL could lie under both). Give each plugin its own prefix."
            )
    for taken in reserved:
        if not pattern.kept_out_of(taken):
            return (
                f"plugin {name!r}: url_prefix {prefix!r} overlaps {taken!r}, gitplug's own"
                " api_prefix. Give the plugin another prefix, or set api_prefix elsewhere."
            )
    return None


def _location(exc: BaseException, release: LoadedRelease) -> dict[str, t.Any]:
    file, line = fault_location(exc, release.namespace.release_dir)
    return {"file": file, "line": line}


def _where(exc: BaseException, release: LoadedRelease) -> str:
    loc = _location(exc, release)
    return f" in {loc['file']} line {loc['line']}" if loc["file"] else ""


def _host_has_view(app: Flask, endpoint: str) -> bool:
    views = app.view_functions
    return views.host_has(endpoint) if isinstance(views, LayeredViews) else endpoint in views
