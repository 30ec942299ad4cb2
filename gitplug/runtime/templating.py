"""Templates per release without touching any global loader per request.

The host's Jinja environment gets a routing subclass (by ``__class__``
assignment, so every existing reference to ``app.jinja_env`` stays valid).
When a plugin's code renders (its views, and its app-wide hooks even on a
host request), ``render_template`` and friends are answered by that
release's own environment: an overlay of the host's with a loader that
searches the release's templates first, then the host's, and a template
cache of its own. Jinja caches templates by ``(loader, name)``, so two
plugins' ``index.html`` can never be confused, and ``extends``/``include``
stay inside the release because a template resolves them through its own
environment. An app-wide filter, test or global (the plugin's own object,
unwrapped) that renders while the host renders finds the host's templates,
then its own release's: the lookup falls back to the release of the calling
code only once the host's lookup failed, so host renders pay nothing.

App-wide template filters, globals and tests of plugins are layered into the
host environment's dicts per request, from the request's snapshot, exactly
like the hook registries: a swap changes them for new requests only, and the
host's own entries always win.
"""

from __future__ import annotations

import typing as t

import jinja2
import jinja2.defaults
from flask.globals import _cv_request

from .environ import ENVIRON_RELEASE, ENVIRON_SNAPSHOT
from .plugin import _active_release, calling_release

__all__ = [
    "install_routing_environment",
    "install_template_layers",
    "plain_environment",
    "LayeredTemplateDict",
    "TemplateRegistry",
    "ReleaseTemplateDict",
    "TEMPLATE_KINDS",
    "host_registers",
]


def _release_env(env: jinja2.Environment) -> jinja2.Environment | None:
    # Only the host's environment routes (a release's is of the plain class).
    active = _active_release.get()
    if active is not None:
        return active.jinja_env  # type: ignore[no-any-return]
    ctx = _cv_request.get(None)
    if ctx is None:
        return None
    release = ctx.request.environ.get(ENVIRON_RELEASE)
    if release is None:
        return None
    return release.jinja_env  # type: ignore[no-any-return]


def _calling_release_env() -> jinja2.Environment | None:
    """The environment of the release whose code asked the host's for a template it lacks.

    An app-wide filter, test or global is the plugin's own object, called
    by the host's templates on host requests too: like a blueprint's filter,
    which finds the app's templates and every blueprint's, it finds the
    host's templates and then its own release's. Asked only after the host's
    lookup failed, so host renders pay nothing for it.
    """
    release = calling_release(1)  # from the mixin's method up: its caller may be the plugin
    return None if release is None else release.jinja_env  # type: ignore[no-any-return]


class _RoutingMixin:
    """Sends template lookups of plugin requests to the release's environment."""

    def get_template(self, name: t.Any, parent: t.Any = None, globals: t.Any = None) -> t.Any:
        env = _release_env(self)  # type: ignore[arg-type]
        if env is not None:
            return env.get_template(name, parent, globals)
        try:
            return super().get_template(name, parent, globals)  # type: ignore[misc]
        except jinja2.TemplateNotFound:
            env = _calling_release_env()
            if env is None:
                raise
            return env.get_template(name, parent, globals)

    def select_template(self, names: t.Any, parent: t.Any = None, globals: t.Any = None) -> t.Any:
        env = _release_env(self)  # type: ignore[arg-type]
        if env is not None:
            return env.select_template(names, parent, globals)
        try:
            return super().select_template(names, parent, globals)  # type: ignore[misc]
        except jinja2.TemplateNotFound:
            env = _calling_release_env()
            if env is None:
                raise
            return env.select_template(names, parent, globals)

    def get_or_select_template(
        self, template_name_or_list: t.Any, parent: t.Any = None, globals: t.Any = None
    ) -> t.Any:
        env = _release_env(self)  # type: ignore[arg-type]
        if env is not None:
            return env.get_or_select_template(template_name_or_list, parent, globals)
        try:
            return super().get_or_select_template(template_name_or_list, parent, globals)  # type: ignore[misc]
        except jinja2.TemplateNotFound:
            env = _calling_release_env()
            if env is None:
                raise
            return env.get_or_select_template(template_name_or_list, parent, globals)

    def from_string(self, source: t.Any, globals: t.Any = None, template_class: t.Any = None) -> t.Any:
        env = _release_env(self)  # type: ignore[arg-type]
        if env is not None:
            return env.from_string(source, globals, template_class)
        return super().from_string(source, globals, template_class)  # type: ignore[misc]

    def list_templates(self, extensions: t.Any = None, filter_func: t.Any = None) -> list[str]:
        """The host's templates and those of every live plugin (as for blueprints)."""
        names: list[str] = super().list_templates(extensions, filter_func)  # type: ignore[misc]
        runtime = getattr(self, "_gitplug_runtime", None)
        if runtime is None:
            return names
        ctx = _cv_request.get(None)
        snapshot = ctx.request.environ.get(ENVIRON_SNAPSHOT) if ctx is not None else None
        if snapshot is None:
            snapshot = runtime.snapshot
        seen = set(names)
        extra = sorted(
            {
                name
                for release in snapshot.releases.values()
                for loader in release.template_loaders
                for name in loader.list_templates()
            }
            - seen
        )
        if extensions is not None:
            extra = [n for n in extra if "." in n and n.rsplit(".", 1)[1] in extensions]
        elif filter_func is not None:
            extra = [n for n in extra if filter_func(n)]
        return names + extra


_routing_classes: dict[type, type] = {}


def _routing_class(cls: type) -> type:
    routing = _routing_classes.get(cls)
    if routing is None:
        routing = type(f"Gitplug{cls.__name__}", (_RoutingMixin, cls), {})
        _routing_classes[cls] = routing
    return routing


def install_routing_environment(app: t.Any) -> jinja2.Environment:
    """Give ``app`` a routing Jinja environment; return it.

    If Flask has not created the environment yet, it creates one of the
    routing class. Otherwise the existing one becomes one, in place (by
    ``__class__`` assignment, so every reference to it stays valid). The
    first way is faster to render with: on CPython an object whose class
    was reassigned, or whose ``__dict__`` was touched, keeps its attributes
    in a plain dict, and Jinja reads the environment's attributes many times
    per render. Nothing here touches ``__dict__`` for the same reason.
    """
    if "jinja_env" not in app.__dict__:  # Flask's cached_property has not run yet
        base = app.jinja_environment
        if not issubclass(base, _RoutingMixin):
            app.jinja_environment = _routing_class(base)
    env: jinja2.Environment = app.jinja_env
    if not isinstance(env, _RoutingMixin):
        env.__class__ = _routing_class(type(env))
    return env


def plain_environment(env: jinja2.Environment) -> None:
    """Make ``env`` (an overlay of the host's routing environment) an ordinary one.

    A release's environment answers its own lookups: routing them again
    would only cost calls.
    """
    if isinstance(env, _RoutingMixin):
        env.__class__ = next(c for c in type(env).__mro__[1:] if c is not _RoutingMixin and not issubclass(c, _RoutingMixin))


class _MergedView(dict):  # type: ignore[type-arg]
    """A dict whose full mapping view (``keys``, ``items``, ...) is :meth:`_merged`.

    Jinja copies globals with ``dict(ChainMap(...))``, which iterates the
    mapping, so the views must show every layer, not just the dict's own.
    """

    def _merged(self) -> dict[str, t.Any]:
        raise NotImplementedError

    def keys(self) -> t.Any:
        return self._merged().keys()

    def items(self) -> t.Any:
        return self._merged().items()

    def values(self) -> t.Any:
        return self._merged().values()

    def copy(self) -> dict[str, t.Any]:
        return self._merged()

    def __reduce__(self) -> t.Any:  # pragma: no cover - never pickled in practice
        return (dict, (self._merged(),))


class TemplateRegistry(dict):  # type: ignore[type-arg]
    """The host env's ``filters``/``globals``/``tests``, able to layer live plugins' in.

    One object for the life of the environment (release environments,
    overlays of the host's, share it), in one of two classes. While no open
    snapshot registers app-wide template names, it is of this class: a dict
    with nothing overridden, so Jinja's lookups and the copy of the globals
    it makes for every render stay on dict's C paths, for host and plugin
    renders alike. Otherwise the runtime (lock held) turns it into a
    :class:`LayeredTemplateDict` by ``__class__`` assignment (:meth:`settle`),
    and back once no open snapshot needs it. Both classes answer alike
    while no layer is needed, so a render that spans the assignment sees
    the same entries.
    """

    def __init__(self, original: dict, runtime: t.Any, kind: str) -> None:  # type: ignore[type-arg]
        super().__init__(original)
        self._runtime = runtime
        self._kind = kind
        #: Jinja built-ins taken out of the dict while a plugin replaces them
        #: (``{name: built-in}``); lookups fall back to them (see yield_builtins).
        self._yielded: dict[str, t.Any] = {}

    def settle(self, layered: bool) -> None:
        """Be a :class:`LayeredTemplateDict` while ``layered`` or a built-in is yielded. Runtime lock held."""
        wanted = LayeredTemplateDict if layered or self._yielded else TemplateRegistry
        if type(self) is not wanted:
            self.__class__ = wanted

    def yield_builtins(self, names: t.Collection[str]) -> None:
        """Let plugins replace exactly these of Jinja's built-ins. Runtime lock held.

        The host's own registrations always win, so they stay in the dict;
        a Jinja default (the very object Jinja ships) named in ``names``
        moves to :attr:`_yielded`: a lookup then misses the dict, sees the
        request's plugin layer first and falls back to the built-in. A name
        no open snapshot replaces any more goes back into the dict. Called
        while layered (a lookup must never miss both).
        """
        builtins = _JINJA_DEFAULTS[self._kind]
        for name in [n for n in self._yielded if n not in names]:
            dict.__setitem__(self, name, self._yielded.pop(name))
        for name in names:
            value = dict.get(self, name, _MISSING)
            if name not in self._yielded and value is not _MISSING and value is builtins.get(name, _MISSING):
                self._yielded[name] = value  # before the pop: a lookup never misses both
                dict.pop(self, name, None)


class LayeredTemplateDict(_MergedView, TemplateRegistry):
    """A :class:`TemplateRegistry` while live plugins' entries are layered in.

    The host's own entries are the dict itself and win; plugin entries come
    from the request's snapshot (the live snapshot outside a request).
    Lookups of the host's own names stay on dict's C path (only a miss
    reaches :meth:`__missing__`), because compiled templates look filters
    up on every render. Jinja also copies globals into each render's
    context (``dict(ChainMap(..., env.globals))``), so iteration is layered
    too.
    """

    def _layer(self) -> dict[str, t.Any]:
        if not self._runtime.template_layers_needed:
            return _EMPTY  # no open snapshot registers any: skip the request lookup
        ctx = _cv_request.get(None)
        snapshot = ctx.request.environ.get(ENVIRON_SNAPSHOT) if ctx is not None else None
        if snapshot is None:
            snapshot = self._runtime.snapshot
        return snapshot.templates.get(self._kind, _EMPTY)  # type: ignore[no-any-return]

    def __missing__(self, name: t.Any) -> t.Any:
        layer = self._layer()
        if name in layer:
            return layer[name]
        yielded = self._yielded.get(name, _MISSING)
        if yielded is not _MISSING:
            return yielded
        raise KeyError(name)

    def __contains__(self, name: object) -> bool:
        return dict.__contains__(self, name) or name in self._layer() or name in self._yielded

    def get(self, name: t.Any, default: t.Any = None) -> t.Any:
        if dict.__contains__(self, name):
            return dict.__getitem__(self, name)
        value = self._layer().get(name, _MISSING)
        if value is _MISSING:
            value = self._yielded.get(name, default)
        return value

    def _merged(self) -> dict[str, t.Any]:
        layer = self._layer()
        if not layer and not self._yielded:
            return dict(dict.items(self))
        return {**self._yielded, **layer, **dict(dict.items(self))}

    def __iter__(self) -> t.Iterator[t.Any]:
        if not self._layer() and not self._yielded:
            return dict.__iter__(self)
        return iter(self._merged())

    def __len__(self) -> int:
        if not self._layer() and not self._yielded:
            return dict.__len__(self)
        return len(self._merged())


class ReleaseTemplateDict(_MergedView):
    """A release environment's filters/globals/tests: its own first, then the host's.

    Used only by a release that registers app-wide template names (Jinja
    checks filter names when it compiles the release's templates, so they
    must be visible here); the others share the host's dicts directly.
    """

    def __init__(self, own: dict, host: dict) -> None:  # type: ignore[type-arg]
        super().__init__(own)
        self._host = host

    def __missing__(self, name: t.Any) -> t.Any:
        return self._host[name]

    def __contains__(self, name: object) -> bool:
        return dict.__contains__(self, name) or name in self._host

    def get(self, name: t.Any, default: t.Any = None) -> t.Any:
        if dict.__contains__(self, name):
            return dict.__getitem__(self, name)
        return self._host.get(name, default)

    def _merged(self) -> dict[str, t.Any]:
        return {**dict(self._host.items()), **dict(dict.items(self))}

    def __iter__(self) -> t.Iterator[t.Any]:
        return iter(self._merged())

    def __len__(self) -> int:
        return len(self._merged())


#: The kinds of app-wide template registration a plugin can make.
TEMPLATE_KINDS = ("filters", "globals", "tests")

_EMPTY: dict[str, t.Any] = {}
_MISSING: t.Any = object()

#: Jinja's own filters, tests and globals: a plugin may replace these (the
#: host application's own registrations it may not).
_JINJA_DEFAULTS: dict[str, dict[str, t.Any]] = {
    "filters": jinja2.defaults.DEFAULT_FILTERS,
    "tests": jinja2.defaults.DEFAULT_TESTS,
    "globals": jinja2.defaults.DEFAULT_NAMESPACE,
}


def host_registers(registry: t.Mapping[str, t.Any], kind: str, name: str) -> bool:
    """True if the host's ``filters``/``tests``/``globals`` hold ``name`` as its
    own registration (not one of Jinja's built-ins, not a plugin's layer)."""
    value = dict.get(registry, name, _MISSING) if isinstance(registry, dict) else registry.get(name, _MISSING)
    return value is not _MISSING and value is not _JINJA_DEFAULTS[kind].get(name, _MISSING)


def install_template_layers(env: jinja2.Environment, runtime: t.Any) -> None:
    """Layer the live plugins' app-wide filters/globals/tests into ``env``."""
    env._gitplug_runtime = runtime  # type: ignore[attr-defined]  # for list_templates
    for kind in TEMPLATE_KINDS:
        current = getattr(env, kind)
        if not isinstance(current, TemplateRegistry):
            setattr(env, kind, TemplateRegistry(current, runtime, kind))
