"""A release that is imported, registered and ready to be swapped in.

:func:`build_release` imports a release (:mod:`gitplug.runtime.loader`), registers
its :class:`~gitplug.Plugin` into a private, throw-away Flask application,
exactly as Flask registers a blueprint, and harvests what that registration
produced: the URL rules, view functions, hooks, error handlers and template
registrations. Reusing Flask's own registration is what makes a plugin do
"everything a blueprint does" without re-implementing any of it.

The harvest is held by an immutable-after-build :class:`LoadedRelease`; the
runtime serves requests from it and never registers anything on the live
host application.
"""

from __future__ import annotations

import functools
import itertools
import logging
import threading
import typing as t
import weakref
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType, SimpleNamespace

import jinja2
from flask import Flask
from flask.templating import _default_template_ctx_processor
from werkzeug.routing import Map, Rule

from ..errors import MountError, PluginLoadError
from ..prefixes import PrefixConverterError, PrefixPattern, invalid_prefix_message, mount_key
from .codecache import CodeCache
from .loader import ReleaseNamespace, import_release, purge_namespace, release_relative
from .plugin import PlainStaticRule, Plugin, PluginContext, _active_release
from .templating import TEMPLATE_KINDS, ReleaseTemplateDict, host_registers, plain_environment

__all__ = ["ReleaseSpec", "LoadedRelease", "build_release", "mount_prefix", "prefix_pattern", "HOOK_REGISTRIES"]

logger = logging.getLogger(__name__)

#: The per-scope hook registries of a Flask app (``{scope: [funcs]}``) that
#: gitplug layers per request. ``None`` is the app-wide scope.
HOOK_REGISTRIES = (
    "before_request_funcs",
    "after_request_funcs",
    "teardown_request_funcs",
    "template_context_processors",
    "url_value_preprocessors",
    "url_default_functions",
)


@dataclass(frozen=True)
class ReleaseSpec:
    """Everything needed to load one release of one plugin."""

    name: str
    path: Path
    release_id: str
    #: The configured prefix; ``None``: the one the plugin's constructor
    #: declares, else ``/<name>`` (resolved by :func:`build_release`).
    url_prefix: str | None
    commit: str | None = None
    #: The configured subdomain; None: the constructor's (registered as Flask does).
    subdomain: str | None = None
    entry: str | None = None
    config: Mapping[str, t.Any] = field(default_factory=lambda: MappingProxyType({}))
    #: Check the release against its staging manifest before importing it.
    verify: bool = False


def mount_prefix(spec: ReleaseSpec, plugin: Plugin) -> str:
    """Where a release is mounted: the configuration's (or ``load_directory``'s)
    ``url_prefix``, else the one ``Plugin(..., url_prefix=...)`` declares (``""``
    is the site root, as in Flask), else ``/<name>`` (README, "Writing a plugin":
    mounting)."""
    if spec.url_prefix:
        return spec.url_prefix
    if plugin.url_prefix == "":
        return "/"  # as in Flask, a blueprint's own empty prefix is the site root
    return plugin.url_prefix or f"/{spec.name}"


class LoadedRelease:
    """One imported, registered release. Internal to gitplug.

    Everything a request needs is read from here; nothing in it changes after
    :func:`build_release` returns, except the runtime's bookkeeping fields.
    """

    def __init__(self, spec: ReleaseSpec, namespace: ReleaseNamespace, plugin: Plugin) -> None:
        self.spec = spec
        self.name = spec.name
        self.release_id = spec.release_id
        #: The prefix as given: the configuration's, else the constructor's, else
        #: ``/<name>``; registered as Flask registers a blueprint's (``/foo/`` +
        #: ``//bar`` is ``/foo/bar``).
        self.url_prefix = mount_prefix(spec, plugin)
        #: The same without a trailing ``/``: what routing and clash checks compare.
        self.prefix = mount_key(self.url_prefix)
        #: The prefix parsed with the host's converters (set by :func:`build_release`
        #: once the prefix is known to be valid): which paths the release owns.
        self.pattern: PrefixPattern
        self.namespace = namespace
        self.plugin: Plugin | None = plugin
        self.context = PluginContext(
            name=spec.name,
            release_id=spec.release_id,
            commit=spec.commit,
            path=spec.path,
            config=spec.config,
            url_prefix=self.url_prefix,
            logger=logging.getLogger(f"gitplug.plugin.{spec.name}"),
        )
        sentinel = namespace.sentinel_ref() if namespace.sentinel_ref is not None else None
        if sentinel is not None:
            sentinel.release = weakref.ref(self)
        self.url_map: Map
        #: Every endpoint of the release (``hello.index``, ``hello.static``).
        #: Like ``url_map`` it is kept after :meth:`purge`: URL building reads
        #: only these two, so a host request that began before a swap still
        #: builds the plugin's URLs after the old release is unloaded.
        self.endpoints: frozenset[str] = frozenset()
        #: The release's own ``{endpoint: rules}``; ``url_map``'s index also
        #: holds the host's, from the host rules of :attr:`host_rules_version`
        #: (see :func:`~gitplug.runtime.routing.share_host_endpoints`).
        self.own_rules_by_endpoint: dict[str, list[Rule]] = {}
        self.host_rules_version = -1
        self.view_functions: dict[str, t.Callable[..., t.Any]] = {}
        #: Scoped hooks, ``{registry: {scope: [funcs]}}``; scopes are the
        #: plugin's blueprint names (``hello``, ``hello.child``).
        self.scoped: dict[str, dict[str, list[t.Any]]] = {}
        #: App-wide hooks (``before_app_request`` ...): ``{registry: [funcs]}``.
        self.app_wide: dict[str, list[t.Any]] = {}
        self.error_handlers: dict[str, dict[int | None, dict[type, t.Any]]] = {}
        self.app_error_handlers: dict[int | None, dict[type, t.Any]] = {}
        #: ``app_template_filter`` / ``_global`` / ``_test`` registrations.
        self.template_registrations: dict[str, dict[str, t.Any]] = {}
        self.template_loaders: list[jinja2.BaseLoader] = []
        #: The release's own Jinja environment (an overlay of the host's).
        self.jinja_env: jinja2.Environment | None = None
        # --- runtime bookkeeping (guarded by the runtime's lock) ---
        #: Number of open snapshots that contain this release.
        self.snapshot_refs = 0
        #: True once the release is no longer live anywhere new.
        self.retired = False
        self.unloaded = False
        #: True once ``plugin_loaded`` was sent for it (as a canary or as live).
        self.announced = False
        #: Every ``next()`` is one request served (pinning calls it without a
        #: lock: ``next`` on an ``itertools.count`` is one atomic step) or one
        #: read of :attr:`requests`, which subtracts its own reads.
        self.served = itertools.count()
        self._served_reads = 0
        self._served_lock = threading.Lock()
        #: Requests failed (5xx or unhandled), counted under the runtime's lock
        #: (rare), for metrics and auto-rollback.
        self.errors = 0

    @property
    def requests(self) -> int:
        """Requests this release has served (answered or failed), in this process."""
        with self._served_lock:
            value = next(self.served) - self._served_reads
            self._served_reads += 1
        return value

    def app_endpoints(self) -> list[str]:
        """Endpoints outside the release's own scope whose view it gives (``Blueprint.endpoint``)."""
        own = self.name + "."
        return [endpoint for endpoint in self.view_functions if not endpoint.startswith(own)]

    @property
    def commit(self) -> str | None:
        return self.spec.commit

    def run_in_context(self, func: t.Callable[[], t.Any]) -> t.Any:
        """Call ``func`` with :data:`current_plugin` set to this release."""
        token = _active_release.set(self)
        try:
            return func()
        finally:
            _active_release.reset(token)

    def purge(self) -> None:
        """Drop every reference this object holds to the release's code."""
        purge_namespace(self.namespace)
        self.plugin = None
        self.view_functions = {}
        self.scoped = {}
        self.app_wide = {}
        self.error_handlers = {}
        self.app_error_handlers = {}
        self.template_registrations = {}
        self.template_loaders = []
        if self.jinja_env is not None and self.jinja_env.cache is not None:
            self.jinja_env.cache.clear()
        self.jinja_env = None
        # url_map and endpoints are kept: they hold rules and endpoint names,
        # no plugin code, and a host request that began before the swap (host
        # requests are not counted in flight) may still build a URL.
        self.unloaded = True

    def __repr__(self) -> str:
        state = "unloaded" if self.unloaded else ("retired" if self.retired else "loaded")
        return f"<LoadedRelease {self.name}@{self.release_id[:12]} {state}>"


def _scratch_app(host: Flask, namespace: ReleaseNamespace) -> Flask:
    """A private Flask app that mirrors the host's routing configuration."""
    scratch = Flask(
        namespace.mangled,
        static_folder=None,
        root_path=str(namespace.package_dir),
        instance_path=str(namespace.release_dir),
    )
    scratch.config = host.config  # read-only use: registration reads a few flags
    scratch.url_map = host.url_map_class(
        host_matching=host.url_map.host_matching,
        strict_slashes=host.url_map.strict_slashes,
        merge_slashes=host.url_map.merge_slashes,
        redirect_defaults=host.url_map.redirect_defaults,
        default_subdomain=host.url_map.default_subdomain,
        sort_parameters=host.url_map.sort_parameters,
        sort_key=host.url_map.sort_key,
    )
    scratch.url_map.converters = dict(host.url_map.converters)
    scratch.subdomain_matching = host.subdomain_matching
    # Captures app_template_filter/_global/_test without building a Jinja env.
    scratch.jinja_env = SimpleNamespace(filters={}, globals={}, tests={})  # type: ignore[assignment]
    return scratch


def _wrap_app_wide(release: LoadedRelease, func: t.Callable[..., t.Any]) -> t.Callable[..., t.Any]:
    """Run an app-wide hook, filter or global as its own plugin's code.

    Inside, :data:`current_plugin` is its plugin and ``render_template``
    finds its release's templates, even on a host request. Attributes such
    as Jinja's ``jinja_pass_arg`` are copied, so ``pass_context`` filters
    keep working.
    """

    def app_wide_hook(*args: t.Any, **kwargs: t.Any) -> t.Any:
        token = _active_release.set(release)
        try:
            return func(*args, **kwargs)
        finally:
            _active_release.reset(token)

    functools.update_wrapper(app_wide_hook, func)
    return app_wide_hook


def prefix_pattern(host: Flask, name: str, url_prefix: str) -> PrefixPattern:
    """``url_prefix`` (valid) parsed with the host's converters; :class:`MountError` if it
    names one the host lacks or one that spans segments."""
    try:
        return PrefixPattern(url_prefix, host.url_map)
    except PrefixConverterError as exc:
        raise MountError(
            f"plugin {name!r}: url_prefix {url_prefix!r} is not a valid URL prefix ({exc})."
            " Use a converter the host has, within one segment, such as '/<lang_code>/shop'"
            " (README, \"Writing a plugin\": mounting)."
        ) from None


def build_release(host: Flask, spec: ReleaseSpec, *, code_cache: CodeCache | None = None) -> LoadedRelease:
    """Import and register a release; nothing touches the live host.

    Raises a :class:`PluginLoadError` (subclass) naming plugin, file and line.
    """
    namespace, plugin = import_release(
        spec.path,
        plugin_name=spec.name,
        release_id=spec.release_id,
        entry=spec.entry,
        code_cache=code_cache,
        verify=spec.verify,
    )
    try:
        release = LoadedRelease(spec, namespace, plugin)
        invalid = invalid_prefix_message(spec.name, release.url_prefix)
        if invalid is not None:
            # A prefix from Plugin(url_prefix=...): checked like a configured one.
            raise MountError(invalid)
        release.pattern = prefix_pattern(host, spec.name, release.url_prefix)
        _register(host, release, plugin, namespace)
        _compile_templates(host, release, code_cache)
    except (PluginLoadError, MountError):
        purge_namespace(namespace)
        raise
    except Exception as exc:
        purge_namespace(namespace)
        raise PluginLoadError(
            f"plugin {spec.name!r}: registering the plugin failed: {type(exc).__name__}: {exc}",
            plugin=spec.name,
            release=spec.release_id,
        ) from exc
    return release


def _register(host: Flask, release: LoadedRelease, plugin: Plugin, namespace: ReleaseNamespace) -> None:
    scratch = _scratch_app(host, namespace)
    if plugin.has_static_folder:
        # Versioned static URLs: a page rendered by one release never loads
        # another release's assets.
        base = plugin.static_url_path or "/static"
        plugin.static_url_path = f"{base.rstrip('/')}/{release.release_id[:12]}"
    options: dict[str, t.Any] = {"url_prefix": release.url_prefix}
    if release.spec.subdomain:
        options["subdomain"] = release.spec.subdomain
    scratch.register_blueprint(plugin, **options)
    if plugin.has_static_folder:
        _add_plain_static_rules(scratch, plugin, base)

    release.url_map = scratch.url_map
    release.view_functions = dict(scratch.view_functions)
    # Sorted once here: later the map only gets its index replaced (routing.share_host_endpoints).
    scratch.url_map.update()
    release.own_rules_by_endpoint = dict(scratch.url_map._rules_by_endpoint)
    release.endpoints = frozenset(release.own_rules_by_endpoint)
    for registry in HOOK_REGISTRIES:
        source: dict[t.Any, list[t.Any]] = getattr(scratch, registry)
        scoped = {}
        for scope, funcs in source.items():
            # Every scaffold starts with Flask's default context processor;
            # the host already runs it for every request, so the plugin's
            # copies are dropped (and the registry stays plain, see runtime).
            funcs = [f for f in funcs if f is not _default_template_ctx_processor]
            if scope is not None and funcs:
                scoped[scope] = funcs
        release.scoped[registry] = scoped
        app_wide = [f for f in source.get(None, []) if f is not _default_template_ctx_processor]
        if app_wide:
            release.app_wide[registry] = [_wrap_app_wide(release, f) for f in app_wide]
    for scope, by_code in scratch.error_handler_spec.items():
        cleaned = {code: dict(handlers) for code, handlers in by_code.items() if handlers}
        if not cleaned:
            continue
        if scope is None:
            release.app_error_handlers = {
                code: {cls: _wrap_app_wide(release, f) for cls, f in handlers.items()}
                for code, handlers in cleaned.items()
            }
        else:
            spec_for_scope: defaultdict[int | None, dict[type, t.Any]] = defaultdict(dict)
            spec_for_scope.update(cleaned)
            release.error_handlers[scope] = spec_for_scope
    fake_env = t.cast(SimpleNamespace, scratch.jinja_env)
    # The plugin's own objects, unwrapped (``app.jinja_env.filters["rev"] is
    # rev``, as for a blueprint); current_plugin finds their plugin through
    # the release sentinel of the module they were defined in.
    release.template_registrations = {
        kind: dict(getattr(fake_env, kind)) for kind in ("filters", "globals", "tests")
    }
    release.template_loaders = [
        bp.jinja_loader for bp in scratch.iter_blueprints() if bp.jinja_loader is not None
    ]


def _add_plain_static_rules(scratch: Flask, plugin: Plugin, base: str) -> None:
    """Serve ``<prefix>/static/<file>`` too: the URL a hand-written link uses.

    Same endpoint and view as the versioned rule, added after it, so
    ``url_for`` still builds the versioned URL; the plain one is cached as
    the host's ``SEND_FILE_MAX_AGE_DEFAULT`` says (it changes with a swap).
    """
    version = plugin.static_url_path or ""
    for rule in list(scratch.url_map.iter_rules(f"{plugin.name}.static")):
        plain = rule.rule.replace(version, base.rstrip("/"), 1)
        if plain != rule.rule:
            scratch.url_map.add(
                PlainStaticRule(plain, endpoint=rule.endpoint, subdomain=rule.subdomain, host=rule.host)
            )


def _compile_templates(host: Flask, release: LoadedRelease, code_cache: CodeCache | None = None) -> None:
    """Build the release's Jinja overlay and compile every template it ships.

    A template syntax error fails the load, like a Python syntax error.
    """
    host_env = host.jinja_env
    loader = jinja2.ChoiceLoader([*release.template_loaders, host_env.loader])  # type: ignore[list-item]
    bytecode_cache = code_cache.jinja() if code_cache is not None else None
    env = host_env.overlay(loader=loader, cache_size=400, bytecode_cache=bytecode_cache)
    plain_environment(env)
    # The release's own app-wide filters/globals/tests first, then the host's
    # (a live view: the host may still add entries). Jinja checks filter names
    # at compile time, so the release's own must be visible here already.
    # The host application's own registrations win here too; Jinja's
    # built-ins do not (README, "Writing a plugin").
    regs = release.template_registrations
    for kind in TEMPLATE_KINDS:
        host_dict = getattr(host_env, kind)
        own = {name: value for name, value in regs.get(kind, {}).items() if not host_registers(host_dict, kind, name)}
        if own:
            setattr(env, kind, ReleaseTemplateDict(own, host_dict))
    release.jinja_env = env
    for own_loader in release.template_loaders:
        for name in own_loader.list_templates():
            try:
                env.get_template(name)
            except jinja2.TemplateSyntaxError as exc:
                file = name
                if exc.filename:
                    file = release_relative(Path(exc.filename).resolve(), release.namespace.release_dir)
                raise PluginLoadError(
                    f"plugin {release.name!r}: template syntax error in {file} line {exc.lineno}:"
                    f" {exc.message}. Fix the template and deploy a new commit; the live"
                    " release is unchanged.",
                    plugin=release.name,
                    release=release.release_id,
                    file=file,
                    line=exc.lineno,
                ) from None
            except jinja2.TemplateError:
                # Missing includes etc. surface at render time, as in Flask.
                continue
