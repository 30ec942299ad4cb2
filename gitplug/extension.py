"""The Flask extension: ``GitPlug(app)`` / ``GitPlug().init_app(app)``.

The extension object is the programmatic face of gitplug (SPEC 10). Its
per-application state lives in ``app.extensions["gitplug"]``; the object
remembers the application it was last initialised with so that the Python
API (``gp.deploy("hello")``) needs no app argument, as SPEC 10 shows.
"""

from __future__ import annotations

import logging
import tempfile
import typing as t
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType

from flask import Flask, current_app

from .devdir import DirectoryWatcher, snapshot_directory
from .errors import GitplugError, PluginLoadError
from .loaded import LoadedRelease, ReleaseSpec
from .runtime import Runtime

__all__ = ["GitPlug"]

logger = logging.getLogger(__name__)

EXTENSION_KEY = "gitplug"


class GitPlug:
    """Hot-swappable Flask plugins, deployed from git.

    :param app: the host application; or call :meth:`init_app` later.
    """

    def __init__(self, app: Flask | None = None) -> None:
        self._app: Flask | None = None
        if app is not None:
            self.init_app(app)

    def init_app(self, app: Flask) -> None:
        """Install gitplug's runtime on ``app``."""
        if EXTENSION_KEY in app.extensions:
            raise GitplugError(
                "gitplug is already initialised on this application; create one GitPlug per app."
            )
        runtime = Runtime(app)
        app.extensions[EXTENSION_KEY] = _AppState(runtime)
        self._app = app

    # -- helpers -------------------------------------------------------------

    @property
    def app(self) -> Flask:
        """The application this extension serves (the current app if several)."""
        if self._app is not None:
            return self._app
        return t.cast(Flask, current_app._get_current_object())  # type: ignore[attr-defined]

    @property
    def _state(self) -> _AppState:
        state = self.app.extensions.get(EXTENSION_KEY)
        if state is None:
            raise GitplugError("call GitPlug(app) or init_app(app) before using gitplug.")
        return t.cast(_AppState, state)

    @property
    def runtime(self) -> Runtime:
        """The runtime that serves and swaps releases (internal API)."""
        return self._state.runtime

    # -- Python API ------------------------------------------------------------

    def load_directory(
        self,
        name: str,
        path: str | Path,
        *,
        url_prefix: str | None = None,
        config: Mapping[str, t.Any] | None = None,
        entry: str | None = None,
    ) -> LoadedRelease:
        """Load a plugin from a plain directory (no git, no test gate), atomically.

        The directory is snapshotted first; the release id is ``dir-<hash of
        its content>``. Raises :class:`PluginLoadError` and keeps the live
        release when the new one does not load.
        """
        state = self._state
        source = Path(path).resolve()
        if not source.is_dir():
            raise PluginLoadError(
                f"plugin {name!r}: {source} is not a directory. Pass the checkout of the"
                " plugin's repository.",
                plugin=name,
            )
        release_id, snapshot = snapshot_directory(source, state.dev_root / name)
        spec = ReleaseSpec(
            name=name,
            path=snapshot,
            release_id=release_id,
            url_prefix=url_prefix or f"/{name}",
            entry=entry,
            config=MappingProxyType(dict(config or {})),
        )
        return self.runtime.swap(spec)

    def watch_directory(
        self,
        name: str,
        path: str | Path,
        *,
        url_prefix: str | None = None,
        config: Mapping[str, t.Any] | None = None,
        entry: str | None = None,
        interval: float = 0.4,
        on_error: t.Callable[[GitplugError], None] | None = None,
    ) -> DirectoryWatcher:
        """Load ``path`` now and again on every save that loads cleanly.

        A save that does not load is reported (``on_error``, else logged) and
        the previous release keeps serving.
        """

        def reload() -> None:
            try:
                release = self.load_directory(name, path, url_prefix=url_prefix, config=config, entry=entry)
            except GitplugError as exc:
                (on_error or (lambda e: logger.error("%s", e)))(exc)
            else:
                logger.info("plugin %s: reloaded %s as %s", name, path, release.release_id)

        reload()
        watcher = DirectoryWatcher(Path(path), reload, interval=interval)
        watcher.start()
        self._state.watchers.append(watcher)
        return watcher

    def stop(self, name: str) -> bool:
        """Unmount a plugin: its URLs answer 404 and its hooks are gone."""
        return self.runtime.stop(name)

    def start(self, name: str) -> bool:
        """Bring a stopped plugin back on the release it had."""
        return self.runtime.start(name) is not None

    def live_release(self, name: str) -> LoadedRelease | None:
        """The release currently serving ``name`` in this process."""
        return self.runtime.live(name)


class _AppState:
    """What gitplug keeps per application (in ``app.extensions``)."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.watchers: list[DirectoryWatcher] = []
        self._dev_root: Path | None = None

    @property
    def dev_root(self) -> Path:
        if self._dev_root is None:
            self._dev_root = Path(tempfile.mkdtemp(prefix="gitplug-dev-"))
        return self._dev_root
