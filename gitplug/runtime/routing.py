"""URL matching and building against a request's snapshot.

The host keeps its own :class:`~werkzeug.routing.Map`; each release has a
``Map`` of its own. :class:`SnapshotAdapter` is the URL adapter Flask gets
for every request: it *matches* against the release that owns the request's
path (or the host's map), and *builds* each endpoint from the map that owns
it, all from the request's snapshot. Maps are never mutated after they are
built, which sidesteps ``Map.add`` not being thread-safe and ``Map`` having
no rule removal.

A host rule under a plugin's prefix wins over the plugin (README, "Guarantees":
the host is left as it was), whenever it was added: :func:`host_rules_under`
finds such rules and :func:`claims_map` copies them into a small private map
that decides, only for requests under such a prefix, whether the host answers.
"""

from __future__ import annotations

import typing as t

from werkzeug.exceptions import HTTPException, NotFound
from werkzeug.routing import Map, MapAdapter, Rule

from ..prefixes import PrefixPattern
from .snapshot import Snapshot

if t.TYPE_CHECKING:
    from .loaded import LoadedRelease

__all__ = ["SnapshotAdapter", "claims_map", "host_claims", "host_rules_under", "install_snapshot_map"]


def _binding(base: MapAdapter) -> tuple[t.Any, ...]:
    """How ``base`` is bound to its request: MapAdapter's arguments after the map."""
    return (
        base.server_name,
        base.script_name,
        base.subdomain,
        base.url_scheme,
        base.path_info,
        base.default_method,
        base.query_args,
    )


def _adapter_like(map: Map, base: MapAdapter) -> MapAdapter:
    """A plain adapter for ``map`` bound exactly like ``base``."""
    return MapAdapter(map, *_binding(base))


def host_rules_under(rules: t.Iterable[Rule], prefix: PrefixPattern) -> list[Rule]:
    """The rules among ``rules`` that can answer a URL under ``prefix``.

    A rule is under a prefix by its literal path (``/de/shop/x`` under
    ``/<lang_code>/shop``); under the root every rule is. A build-only rule
    never matches a request (it only builds URLs that something else
    serves), so it never takes a URL from a plugin.
    """
    return [rule for rule in rules if not rule.build_only and prefix.holds_rule(rule.rule)]


def claims_map(host_map: Map, rules: t.Iterable[Rule]) -> Map:
    """A private map holding unbound copies of ``rules``, configured like ``host_map``."""
    return Map(
        [rule.empty() for rule in rules],
        default_subdomain=host_map.default_subdomain,
        strict_slashes=host_map.strict_slashes,
        merge_slashes=host_map.merge_slashes,
        redirect_defaults=host_map.redirect_defaults,
        converters=host_map.converters,
        sort_parameters=host_map.sort_parameters,
        sort_key=host_map.sort_key,
        host_matching=host_map.host_matching,
    )


def host_claims(claims: Map, host_adapter: MapAdapter) -> bool:
    """Whether a host rule of ``claims`` answers the request ``host_adapter`` is bound to.

    A 405 or a redirect to the canonical URL is the host's answer too: the
    URL is the host's, whatever the method or trailing slash.
    """
    try:
        _adapter_like(claims, host_adapter).match()
    except NotFound:
        return False
    except HTTPException:  # MethodNotAllowed, RequestRedirect
        return True
    return True


class SnapshotAdapter(MapAdapter):
    """Matches on one map (the host's or a release's), builds URLs for host and every plugin.

    Made per request by :meth:`adopt` from the host's adapter, which Flask
    already bound to the request: no second adapter is built unless the
    request builds a URL of another map (a host URL from a plugin request,
    a plugin URL from the host or another plugin), and then one per map.
    """

    _snapshot: Snapshot
    # Class-level defaults, so adopting a host request's adapter stores one
    # attribute besides the class: every instance attribute is paid per request.
    #: The host's map when this adapter matches on a release's; None: ``self.map`` is the host's.
    _host_map: Map | None = None
    #: ``{map id: adapter}`` for the other maps this request built URLs from; None until one is needed.
    _others: dict[int, MapAdapter] | None = None

    @classmethod
    def adopt(cls, adapter: MapAdapter, snapshot: Snapshot, release: LoadedRelease | None = None) -> SnapshotAdapter:
        """Turn the host's own adapter into one that also builds plugin URLs.

        With ``release``, it matches on that release's map instead of the
        host's. Cheaper than a new adapter: it is already bound to this request.
        """
        adapter.__class__ = cls
        adapter._snapshot = snapshot  # type: ignore[attr-defined]
        if release is not None:
            adapter._host_map = adapter.map  # type: ignore[attr-defined]
            adapter.map = release.url_map
        return adapter  # type: ignore[return-value]

    def _adapter_for(self, map: Map) -> MapAdapter:
        """A plain adapter for ``map``, bound like this one (made once per request and map)."""
        others = self._others
        if others is None:
            others = self._others = {}
        adapter = others.get(id(map))
        if adapter is None:
            adapter = others[id(map)] = _adapter_like(map, self)
        return adapter

    def build(
        self,
        endpoint: t.Any,
        values: t.Mapping[str, t.Any] | None = None,
        method: str | None = None,
        force_external: bool = False,
        append_unknown: bool = True,
        url_scheme: str | None = None,
    ) -> str:
        target = self.map if self._host_map is None else self._host_map
        if isinstance(endpoint, str):
            release = self._snapshot.release_for_scope(endpoint)
            if release is not None and endpoint in release.endpoints:
                target = release.url_map
        if target is self.map:
            return MapAdapter.build(
                self, endpoint, values, method, force_external, append_unknown, url_scheme
            )
        return self._adapter_for(target).build(endpoint, values, method, force_external, append_unknown, url_scheme)


def install_snapshot_map(url_map: Map, runtime: t.Any) -> None:
    """Make the host's map answer endpoint queries for plugin endpoints too.

    Flask's documented URL-defaults pattern asks
    ``app.url_map.is_endpoint_expecting(endpoint, "lang_code")``; for a
    plugin endpoint the answer comes from the request's snapshot. Rules the
    host adds after gitplug is installed are reported to the runtime, so a
    host route added under a live plugin's prefix answers at once.

    Both are instance attributes, not a subclass: on CPython, assigning an
    object's ``__class__`` moves its attributes into a plain dict, and every
    request matches against this map (it reads them on each match).
    """
    if getattr(url_map, "_gitplug_runtime", None) is not None:
        return
    host_add = url_map.add
    host_expecting = url_map.is_endpoint_expecting

    def add(rulefactory: t.Any) -> None:
        # A factory makes its rules anew on every get_rules(): take them once,
        # add each (a Rule's own get_rules yields itself), report exactly those.
        rules = list(rulefactory.get_rules(url_map))
        for rule in rules:
            host_add(rule)
        runtime.host_rules_added(rules)

    def is_endpoint_expecting(endpoint: t.Any, *arguments: str) -> bool:
        url_map.update()
        if endpoint not in url_map._rules_by_endpoint:
            from .hooks import request_snapshot

            release = request_snapshot(runtime).release_for_scope(str(endpoint))
            if release is not None and endpoint in release.endpoints:
                return release.url_map.is_endpoint_expecting(endpoint, *arguments)
        return host_expecting(endpoint, *arguments)

    url_map.add = add  # type: ignore[method-assign]
    url_map.is_endpoint_expecting = is_endpoint_expecting  # type: ignore[method-assign]
    url_map._gitplug_runtime = runtime  # type: ignore[attr-defined]
