"""URL matching and building against a request's snapshot.

The host keeps its own :class:`~werkzeug.routing.Map`; each release has a
``Map`` of its own. A request keeps Flask's plain adapter; a plugin request's
adapter has its release's map put in, and so *matches* against the release
that owns the request's path and *builds* the release's and the host's
endpoints (:func:`share_host_endpoints`). Any other ``url_for`` of a plugin
endpoint (from a host request, or another plugin's) fails on that map and is
built by :func:`install_plugin_url_builds`' handler, from the request's
snapshot. Rules are never added to a map after it is
built, which sidesteps ``Map.add`` not being thread-safe and ``Map`` having
no rule removal.

A host rule under a plugin's prefix wins over the plugin (README, "Guarantees":
the host is left as it was), whenever it was added: :func:`host_rules_under`
finds such rules and :func:`claims_map` copies them into a small private map
that decides, only for requests under such a prefix, whether the host answers.
"""

from __future__ import annotations

import typing as t
from urllib.parse import quote

from flask import Flask
from werkzeug.exceptions import HTTPException, NotFound
from werkzeug.routing import Map, MapAdapter, Rule

from ..prefixes import PrefixPattern

if t.TYPE_CHECKING:
    from .loaded import LoadedRelease

__all__ = [
    "claims_map",
    "host_claims",
    "host_rules_under",
    "install_plugin_url_builds",
    "install_snapshot_map",
    "share_host_endpoints",
]


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


def share_host_endpoints(release: LoadedRelease, host_map: Map, version: int) -> None:
    """Let ``release``'s map build the host's endpoints as well as its own.

    A plugin request's adapter is Flask's own, with the release's map put
    in: it matches on that map, and builds from it, so a plugin page's
    ``url_for`` of its own endpoints or of the host's (a layout's links)
    costs what it costs in a blueprint, with no wrapper. The map's endpoint
    index is replaced (one assignment, so a request reading it meanwhile
    sees the old or the new one, both valid) by one holding the host's rule
    lists (the same list objects) and the release's own, which win on a
    clash. ``version`` is the runtime's count of host rule additions this
    index was made from: the runtime makes it again when the host added
    rules since. Endpoints of other plugins are not in it; their URLs come
    from :func:`install_plugin_url_builds`' handler.
    """
    # The release's map was sorted when it was built (loaded._register) and
    # gets no rules since, so no update of it ever sorts the host's lists;
    # the host's own update sorts them, here first if rules were added.
    host_map.update()
    merged = dict(host_map._rules_by_endpoint)
    merged.update(release.own_rules_by_endpoint)
    release.url_map._rules_by_endpoint = merged
    release.host_rules_version = version


#: The characters Flask's ``url_for`` leaves unquoted in an ``_anchor``.
_ANCHOR_SAFE = "%!#$&'()*+,/:;=?@"


def install_plugin_url_builds(app: Flask, runtime: t.Any) -> None:
    """Let ``url_for`` outside plugin requests build plugin URLs.

    A host request (or an app context) keeps Flask's plain adapter, so its
    matching and its host URLs cost nothing extra. A plugin endpoint is not
    in the host's map: its build fails, and Flask asks its
    ``url_build_error_handlers``, where this one, first in line, builds the
    URL from the request's snapshot (else the live one) with an adapter
    bound like the failed one. Endpoints no live plugin has are left to the
    host's own handlers.
    """
    from .hooks import request_snapshot

    def build_plugin_url(error: Exception, endpoint: str, values: dict[str, t.Any]) -> str | None:
        base = getattr(error, "adapter", None)
        if base is None or not isinstance(endpoint, str):
            return None
        release = request_snapshot(runtime).release_for_scope(endpoint)
        if release is None or endpoint not in release.endpoints:
            return None
        # url_for put its own arguments back into ``values`` for the handlers.
        values = dict(values)
        anchor = values.pop("_anchor", None)
        method = values.pop("_method", None)
        scheme = values.pop("_scheme", None)
        external = bool(values.pop("_external", False))
        url = _adapter_like(release.url_map, base).build(
            endpoint, values, method=method, url_scheme=scheme, force_external=external
        )
        if anchor is not None:
            url = f"{url}#{quote(anchor, safe=_ANCHOR_SAFE)}"
        return url

    # Flask calls each handler until one returns a URL; None passes it on (its hint says str).
    app.url_build_error_handlers.insert(0, build_plugin_url)  # type: ignore[arg-type]


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
