"""Templates per release without touching any global loader per request.

The host's Jinja environment gets a routing subclass (by ``__class__``
assignment, so every existing reference to ``app.jinja_env`` stays valid).
When a request is served by a plugin release, ``render_template`` and
friends are answered by that release's own environment: an overlay of the
host's with a loader that searches the release's templates first, then the
host's, and a template cache of its own. Jinja caches templates by
``(loader, name)``, so two plugins' ``index.html`` can never be confused,
and ``extends``/``include`` stay inside the release because a template
resolves them through its own environment.

App-wide template filters, globals and tests of plugins are merged into the
host environment's dicts when a release goes live and removed when it
retires (the overlays share those dicts). This is the one registration that
is swapped by mutation; the host's own entries always win.
"""

from __future__ import annotations

import typing as t

import jinja2
from flask.globals import _cv_request

from .plugin import ENVIRON_RELEASE

if t.TYPE_CHECKING:
    from .loaded import LoadedRelease

__all__ = ["install_routing_environment", "TemplateRegistrations"]


def _release_env(env: jinja2.Environment) -> jinja2.Environment | None:
    if not env.__dict__.get("_gitplug_routing", False):
        return None
    ctx = _cv_request.get(None)
    if ctx is None:
        return None
    release = ctx.request.environ.get(ENVIRON_RELEASE)
    if release is None:
        return None
    return t.cast("jinja2.Environment | None", release.jinja_env)


class _RoutingMixin:
    """Sends template lookups of plugin requests to the release's environment."""

    def get_template(self, name: t.Any, parent: t.Any = None, globals: t.Any = None) -> t.Any:
        env = _release_env(self)  # type: ignore[arg-type]
        if env is not None:
            return env.get_template(name, parent, globals)
        return super().get_template(name, parent, globals)  # type: ignore[misc]

    def select_template(self, names: t.Any, parent: t.Any = None, globals: t.Any = None) -> t.Any:
        env = _release_env(self)  # type: ignore[arg-type]
        if env is not None:
            return env.select_template(names, parent, globals)
        return super().select_template(names, parent, globals)  # type: ignore[misc]

    def get_or_select_template(
        self, template_name_or_list: t.Any, parent: t.Any = None, globals: t.Any = None
    ) -> t.Any:
        env = _release_env(self)  # type: ignore[arg-type]
        if env is not None:
            return env.get_or_select_template(template_name_or_list, parent, globals)
        return super().get_or_select_template(template_name_or_list, parent, globals)  # type: ignore[misc]

    def from_string(self, source: t.Any, globals: t.Any = None, template_class: t.Any = None) -> t.Any:
        env = _release_env(self)  # type: ignore[arg-type]
        if env is not None:
            return env.from_string(source, globals, template_class)
        return super().from_string(source, globals, template_class)  # type: ignore[misc]


_routing_classes: dict[type, type] = {}


def install_routing_environment(env: jinja2.Environment) -> None:
    """Turn the host's environment into a routing one, in place."""
    if isinstance(env, _RoutingMixin):
        return
    cls = type(env)
    routing = _routing_classes.get(cls)
    if routing is None:
        routing = type(f"Gitplug{cls.__name__}", (_RoutingMixin, cls), {})
        _routing_classes[cls] = routing
    env.__class__ = routing
    env.__dict__["_gitplug_routing"] = True


class TemplateRegistrations:
    """Applies plugins' app-wide template filters/globals/tests to the host env.

    Not thread-safe by itself: the runtime calls it under its swap lock.
    """

    KINDS = ("filters", "globals", "tests")

    def __init__(self, env: jinja2.Environment) -> None:
        self._env = env
        #: ``{(kind, name): release}`` of entries a plugin put there.
        self._owner: dict[tuple[str, str], LoadedRelease] = {}

    def apply(self, new: LoadedRelease | None, old: LoadedRelease | None) -> list[str]:
        """Swap ``old``'s registrations for ``new``'s; return refused names."""
        refused: list[str] = []
        if old is not None:
            for kind in self.KINDS:
                target: dict[str, t.Any] = getattr(self._env, kind)
                for name in old.template_registrations.get(kind, {}):
                    if self._owner.get((kind, name)) is old:
                        del self._owner[(kind, name)]
                        target.pop(name, None)
        if new is not None:
            for kind in self.KINDS:
                target = getattr(self._env, kind)
                for name, value in new.template_registrations.get(kind, {}).items():
                    owner = self._owner.get((kind, name))
                    if name in target and owner is None:
                        refused.append(f"{kind[:-1]} {name!r}")  # the host's own wins
                        continue
                    target[name] = value
                    self._owner[(kind, name)] = new
        return refused
