"""The plugin author's API: :class:`Plugin` and :data:`current_plugin`.

A :class:`Plugin` *is* a :class:`flask.Blueprint`: everything a blueprint can
register (routes, hooks, error handlers, template filters, static files,
nested blueprints) a plugin can too, and gitplug registers it for real into a
private application per release (see :mod:`gitplug.runtime.loader`). On top of that it
has three life-cycle hooks:

``on_load``
    Runs on the new release before it goes live. An exception aborts the
    deploy and leaves the old release serving.
``health_check``
    Runs after ``on_load``, before the swap. A false value or an exception
    aborts the deploy.
``on_unload``
    Runs once the release is no longer live *and* its last in-flight request
    has finished.
"""

from __future__ import annotations

import contextvars
import logging
import os
import sys
import types
import typing as t
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from flask import Blueprint
from flask.globals import _cv_request
from werkzeug.local import LocalProxy
from werkzeug.routing import Rule

from .environ import ENVIRON_RELEASE

__all__ = ["Plugin", "PluginContext", "current_plugin"]

F = t.TypeVar("F", bound=Callable[..., t.Any])

_AUTO: t.Any = object()

#: One year: static URLs contain the release id, so a URL never changes content.
STATIC_MAX_AGE = 365 * 24 * 3600


class PlainStaticRule(Rule):
    """The rule of a plugin's plain, unversioned static URL (``<prefix>/static/<file>``)."""


class Plugin(Blueprint):
    """A blueprint that gitplug can deploy, swap and unload.

    ``template_folder`` and ``static_folder`` default to ``templates`` and
    ``static`` beside the module that creates the plugin, when they exist.
    """

    def __init__(
        self,
        name: str,
        import_name: str,
        static_folder: str | os.PathLike[str] | None = _AUTO,
        static_url_path: str | None = None,
        template_folder: str | os.PathLike[str] | None = _AUTO,
        url_prefix: str | None = None,
        **kwargs: t.Any,
    ) -> None:
        from flask.helpers import get_root_path

        root = Path(kwargs.get("root_path") or get_root_path(import_name))
        if static_folder is _AUTO:
            static_folder = "static" if (root / "static").is_dir() else None
        if template_folder is _AUTO:
            template_folder = "templates" if (root / "templates").is_dir() else None
        super().__init__(
            name,
            import_name,
            static_folder=static_folder,
            static_url_path=static_url_path,
            template_folder=template_folder,
            url_prefix=url_prefix,
            **kwargs,
        )
        #: Callbacks run before the release goes live. Internal; use :meth:`on_load`.
        self.on_load_funcs: list[Callable[[], t.Any]] = []
        #: Callbacks run after the release's last request. Use :meth:`on_unload`.
        self.on_unload_funcs: list[Callable[[], t.Any]] = []
        #: Callbacks that must return a true value for the release to go live.
        self.health_check_funcs: list[Callable[[], t.Any]] = []

    def on_load(self, f: F) -> F:
        """Register ``f`` to run on a new release before it goes live.

        An exception aborts the deploy; the previous release keeps serving.
        """
        self.on_load_funcs.append(f)
        return f

    def on_unload(self, f: F) -> F:
        """Register ``f`` to run after the release's last in-flight request."""
        self.on_unload_funcs.append(f)
        return f

    def health_check(self, f: F) -> F:
        """Register ``f`` to verify a new release before the swap.

        A false return value or an exception aborts the deploy.
        """
        self.health_check_funcs.append(f)
        return f

    def get_send_file_max_age(self, filename: str | None) -> int | None:
        # Versioned static URLs (what url_for builds) carry the release id, so
        # the content behind one never changes: let browsers keep it. The
        # plain URL serves whatever release is live: the host's default.
        ctx = _cv_request.get(None)
        if ctx is not None and isinstance(ctx.request.url_rule, PlainStaticRule):
            return super().get_send_file_max_age(filename)
        return STATIC_MAX_AGE

    def __repr__(self) -> str:
        return f"<Plugin {self.name!r} from {self.import_name!r}>"


@dataclass(frozen=True, eq=False)
class PluginContext:
    """What :data:`current_plugin` gives: facts about one loaded release."""

    #: The plugin's name in the configuration (also its blueprint name).
    name: str
    #: The release id: the commit sha for git releases, ``dir-<hash>`` for a directory.
    release_id: str
    #: The commit sha, or ``None`` for a release loaded from a plain directory.
    commit: str | None
    #: The release directory the code was loaded from.
    path: Path
    #: The plugin's ``config`` mapping from the configuration (read-only).
    config: Mapping[str, t.Any]
    #: The URL prefix the plugin is mounted at.
    url_prefix: str
    #: A logger named ``gitplug.plugin.<name>``; one per plugin, not per release.
    logger: logging.Logger = field(repr=False)


#: The release (a ``gitplug.runtime.loaded.LoadedRelease``) whose code gitplug is
#: running outside that plugin's own requests: ``on_load``, ``health_check``,
#: ``on_unload``, app-wide hooks, template filters and globals.
_active_release: contextvars.ContextVar[t.Any] = contextvars.ContextVar(
    "gitplug_active_release", default=None
)


def calling_release(depth: int = 1) -> t.Any:
    """The release (a ``LoadedRelease``) of the nearest caller defined in one, or None.

    A view, or an app-wide filter, test or global that the host's template
    calls: its module holds the release's sentinel. Walks the stack from
    ``depth`` frames above the function that calls this one (0: that
    function itself), so ask only when needed.
    """
    frame: types.FrameType | None = sys._getframe(depth + 1)
    while frame is not None:
        sentinel = frame.f_globals.get("__gitplug_release__")
        if sentinel is not None:
            ref = getattr(sentinel, "release", None)
            return ref() if ref is not None else None
        frame = frame.f_back
    return None


def _find_current_plugin() -> PluginContext:
    active = _active_release.get()
    if active is not None:
        return t.cast(PluginContext, active.context)
    release = calling_release(1)
    if release is not None:
        return t.cast(PluginContext, release.context)
    ctx = _cv_request.get(None)
    if ctx is not None:
        release = ctx.request.environ.get(ENVIRON_RELEASE)
        if release is not None:
            return t.cast(PluginContext, release.context)
    raise RuntimeError(
        "current_plugin is only available while gitplug runs plugin code: in a"
        " request under the plugin's url_prefix, or in its on_load, on_unload,"
        " health_check and app-wide hooks."
    )


#: The :class:`PluginContext` of the plugin whose code is running.
current_plugin: PluginContext = t.cast(PluginContext, LocalProxy(_find_current_plugin))
