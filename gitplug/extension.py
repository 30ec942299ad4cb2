"""The Flask extension: ``GitPlug(app)`` / ``GitPlug().init_app(app)``.

The extension object is the programmatic face of gitplug. Its
per-application state lives in ``app.extensions["gitplug"]``; the object
remembers the application it was last initialised with so that the Python
API (``gp.deploy("hello")``) needs no app argument.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
import typing as t
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType

from flask import Flask, current_app

from .config import GitplugConfig, config_from_mapping, load_config
from .deploy.discovery import with_discovered
from .deploy.notify import Notifier
from .deploy.pipeline import Deployer
from .deploy.requirements import check_requirements
from .errors import ConfigError, GitplugError, PluginLoadError
from .runtime.codecache import CodeCache
from .runtime.devdir import DirectoryWatcher, snapshot_directory
from .runtime.loaded import LoadedRelease, ReleaseSpec
from .runtime.swap import Runtime
from .services import HostServices
from .state import DeployRecord, StateStore, open_state_store
from .status import build_status

__all__ = ["GitPlug"]

logger = logging.getLogger(__name__)

EXTENSION_KEY = "gitplug"


class GitPlug:
    """Hot-swappable Flask plugins, deployed from git.

    :param app: the host application; or call :meth:`init_app` later.
    """

    #: Seconds :meth:`shutdown` waits for queued notifications.
    notify_grace_s: float = 5.0

    def __init__(self, app: Flask | None = None, *, config: GitplugConfig | None = None) -> None:
        self._app: Flask | None = None
        self._config = config
        if app is not None:
            self.init_app(app)

    def init_app(self, app: Flask, *, config: GitplugConfig | None = None) -> None:
        """Install gitplug on ``app``.

        The configuration comes from ``config``, else ``app.config["GITPLUG"]``
        (a mapping of the deploy.yaml schema), else the file named by
        ``app.config["GITPLUG_CONFIG"]``. Without any, only the runtime is
        installed (``load_directory`` works; nothing is deployed from git).
        A relative ``GITPLUG_CONFIG`` is relative to ``app.root_path``.
        Each plugin's last live release is loaded from disk here, before the
        first request, without any network access; polling, convergence and
        the webhook queue start with the first request in each process (or
        :meth:`start_background`), so they never run in a process that only
        imports the app (Flask's reloader parent, gunicorn's master).
        """
        if EXTENSION_KEY in app.extensions:
            raise GitplugError(
                "gitplug is already initialised on this application; create one GitPlug per app."
            )
        file_config = config or self._config or _config_from_app(app)
        # What runs: the configuration plus the plugins discovered so far (read from disk).
        config = with_discovered(file_config)[0] if file_config is not None else None
        code_cache = CodeCache(config.data_dir / "cache") if config is not None else None
        runtime = Runtime(app, code_cache=code_cache)
        if config is not None:
            # No plugin (root, or a prefix with converters) may receive gitplug's own URLs.
            runtime.reserve(config.api_prefix)
        state = _AppState(runtime, config)
        app.extensions[EXTENSION_KEY] = state
        self._app = app
        if config is not None:
            state.dev_root_base = config.data_dir / "dev"
            store = open_state_store(config.state, base_dir=config.base_dir)
            deployer = Deployer(config, store, runtime)
            state.store, state.deployer = store, deployer
            # Subscribed now; its sender thread starts with the first message.
            state.notifier = Notifier(lambda: deployer.config, sender=deployer).connect()
            state.services = HostServices(config, store, deployer, runtime, file_config=file_config)
            state.services.on_config.append(lambda new: setattr(state, "config", new))
            state.services.restore()
            from .web.admin import register_admin

            register_admin(app, self, config)
            app.wsgi_app = _StartServices(app.wsgi_app, state.services)  # type: ignore[method-assign]

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
        self._warn_requirements(name, snapshot)
        spec = ReleaseSpec(
            name=name,
            path=snapshot,
            release_id=release_id,
            url_prefix=url_prefix or None,
            entry=entry,
            config=MappingProxyType(dict(config or {})),
        )
        return self.runtime.swap(spec)

    def _warn_requirements(self, name: str, root: Path) -> None:
        """The requirements check of a deploy, as a warning: a directory loads anyway.

        Logged when the verdict changes, not on every save of a watched directory.
        """
        report = check_requirements(root)
        verdict = tuple(report.problems)
        if self._state.requirement_warnings.get(name) == verdict:
            return
        self._state.requirement_warnings[name] = verdict
        if not report.ok:
            logger.warning("%s", report.message(name, str(root)).replace(
                " then deploy again", " then save again"))

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

    def watch_plugins_directory(
        self,
        path: str | Path,
        *,
        interval: float = 0.4,
        on_error: t.Callable[[GitplugError], None] | None = None,
    ) -> list[str]:
        """Watch a directory of plugins: each subdirectory holding a plugin package is one.

        Each is served at ``/<subdirectory name>`` and swapped on every save
        that loads (:meth:`watch_directory`); a subdirectory added later is
        loaded, one deleted is stopped. Returns the names loaded now.
        """
        root = Path(path).resolve()
        if not root.is_dir():
            raise PluginLoadError(f"{root} is not a directory. Pass a directory whose subdirectories are"
                                  " plugin checkouts.", plugin=root.name)
        watching: dict[str, DirectoryWatcher] = {}
        report = on_error or (lambda e: logger.error("%s", e))

        def rescan() -> None:
            found = {}
            for child in sorted(root.iterdir()):
                if child.is_dir() and not child.name.startswith(".") and _holds_package(child):
                    if _PLUGIN_NAME.match(child.name):
                        found[child.name] = child
                    elif child.name not in watching:
                        report(PluginLoadError(
                            f"{child} is not loaded: {child.name!r} is not a valid plugin name (letters,"
                            " digits, '_' and '-', starting with a letter or '_'). Rename the directory.",
                            plugin=child.name))
            for name in sorted(set(watching) - set(found)):
                watching.pop(name).stop()
                self._state.watchers = [w for w in self._state.watchers if w.root != root / name]
                self.runtime.stop(name)
                logger.info("plugin %s: %s is gone; stopped", name, root / name)
            for name, child in found.items():
                if name not in watching:
                    watching[name] = self.watch_directory(name, child, interval=interval, on_error=on_error)

        rescan()
        watcher = DirectoryWatcher(root, rescan, interval=interval)
        watcher.start()
        self._state.watchers.append(watcher)
        return sorted(watching)

    def stop(self, name: str) -> bool:
        """Unmount a plugin: its URLs answer 404 and its hooks are gone.

        With a configuration, the stop is recorded and every worker follows.
        """
        state = self._state
        if state.deployer is not None and name in state.deployer.config.plugins:
            was_live = self.runtime.live(name) is not None
            state.deployer.stop(name)
            return was_live
        return self.runtime.stop(name)

    def start(self, name: str) -> bool:
        """Bring a stopped plugin back on the release it had."""
        state = self._state
        if state.deployer is not None and name in state.deployer.config.plugins:
            state.deployer.start(name)
            return self.runtime.live(name) is not None
        return self.runtime.start(name) is not None

    # -- deploying from git (needs a configuration) ----------------------------

    def _require(self) -> _AppState:
        state = self._state
        if state.deployer is None or state.services is None:
            raise ConfigError(
                "gitplug has no configuration: set app.config['GITPLUG_CONFIG'] = 'deploy.yaml'"
                " (or app.config['GITPLUG'] = {...}) before GitPlug(app)."
            )
        return state

    @property
    def config(self) -> GitplugConfig | None:
        """The configuration in force, or None without one."""
        return self._state.config

    def start_background(self) -> None:
        """Start polling, convergence and the deploy queue in this process now."""
        self._require().services.ensure_started()  # type: ignore[union-attr]

    def deploy(self, name: str, ref: str | None = None, wait: bool = True, *, trigger: str = "api") -> DeployRecord | None:
        """Deploy ``ref`` (default: the tracked ref, or the pin) of ``name``.

        With ``wait``, returns the deploy record (``result`` says whether it
        went live; a failed deploy raises nothing). Returns None when there
        was nothing to do or when ``wait`` is False.
        """
        state = self._require()
        state.deployer.plugin_config(name)  # type: ignore[union-attr]
        if wait:
            # Runs on the controller (this process or, via the store, another).
            return state.services.deploy_and_wait(name, trigger, ref)  # type: ignore[union-attr]
        state.services.trigger(name, trigger, ref)  # type: ignore[union-attr]
        return None

    def rollback(self, name: str, ref: str, *, trigger: str = "rollback") -> DeployRecord | None:
        """Pin ``name`` at ``ref`` (tag, sha, branch or ``previous``) and deploy it."""
        return self._require().deployer.rollback(name, ref, trigger=trigger)  # type: ignore[union-attr]

    def resume(self, name: str, *, trigger: str = "api") -> DeployRecord | None:
        """Unpin ``name`` and deploy its tracked ref."""
        return self._require().deployer.resume(name, trigger=trigger)  # type: ignore[union-attr]

    def promote(self, name: str, *, trigger: str = "api") -> DeployRecord:
        """End ``name``'s canary now: its release serves every client (README, "Canary releases").

        Raises :class:`~gitplug.errors.BadInput` when no canary runs.
        """
        return self._require().deployer.promote(name, trigger=trigger)  # type: ignore[union-attr]

    def abort(self, name: str, *, trigger: str = "api") -> DeployRecord:
        """Roll ``name``'s canary back now: the live release serves every client again.

        The canary's deploy is recorded ``failed`` at stage ``canary``. Raises
        :class:`~gitplug.errors.BadInput` when no canary runs.
        """
        return self._require().deployer.abort(name, trigger=trigger)  # type: ignore[union-attr]

    def status(self, only: str | None = None) -> dict[str, t.Any]:
        """The data of ``gitplug status --json`` (of plugin ``only``, when given)."""
        state = self._require()
        return build_status(state.deployer.config, state.store, runtime=self.runtime, only=only)  # type: ignore[union-attr,arg-type]

    @property
    def store(self) -> StateStore:
        """The state store (internal API; None until a configuration is given)."""
        return self._state.store  # type: ignore[no-any-return]

    @property
    def deployer(self) -> Deployer:
        """The pipeline of this application (internal API)."""
        return self._require().deployer  # type: ignore[return-value]

    def queue_deploy(self, name: str, trigger: str, *, at: float | None = None) -> None:
        """Queue a background deploy of ``name``: coalesced, run by the controller.

        ``at`` (``time.monotonic()``): when its cause was known (see HostServices.trigger).
        """
        self._require().services.trigger(name, trigger, at=at)  # type: ignore[union-attr]

    def history(self, name: str, *, limit: int = 50) -> list[DeployRecord]:
        """Deploys of ``name``, newest first."""
        state = self._require()
        if name not in state.deployer.config.removed:  # type: ignore[union-attr]
            state.deployer.plugin_config(name)  # type: ignore[union-attr]
        return state.store.history(name, limit=limit)  # type: ignore[union-attr]

    def shutdown(self) -> None:
        """Stop background threads (tests; the process exiting does this too)."""
        state = self._state
        if state.services is not None:
            state.services.shutdown()
        if state.notifier is not None:
            state.notifier.close(timeout=self.notify_grace_s)
        for watcher in state.watchers:
            watcher.stop()
        state.watchers = []
        state.runtime.shutdown()
        state.remove_temporary_snapshots()

    def live_release(self, name: str) -> LoadedRelease | None:
        """The release currently serving ``name`` in this process."""
        return self.runtime.live(name)


class _AppState:
    """What gitplug keeps per application (in ``app.extensions``)."""

    def __init__(self, runtime: Runtime, config: GitplugConfig | None) -> None:
        self.runtime = runtime
        self.config = config
        self.store: t.Any = None
        self.deployer: Deployer | None = None
        self.services: HostServices | None = None
        self.notifier: Notifier | None = None
        self.watchers: list[DirectoryWatcher] = []
        #: The last requirements problems logged per directory plugin.
        self.requirement_warnings: dict[str, tuple[str, ...]] = {}
        self.dev_root_base: Path | None = None
        self._dev_root: Path | None = None

    @property
    def dev_root(self) -> Path:
        """Where ``load_directory`` snapshots go: ``<data_dir>/dev``, else a temp dir."""
        if self._dev_root is None:
            if self.dev_root_base is not None:
                self.dev_root_base.mkdir(parents=True, exist_ok=True)
                self._dev_root = self.dev_root_base
            else:
                self._dev_root = Path(tempfile.mkdtemp(prefix="gitplug-dev-"))
                self._temporary_dev_root = True
        return self._dev_root

    def remove_temporary_snapshots(self) -> None:
        """Delete the temp dir of directory snapshots (never ``<data_dir>/dev``)."""
        if self._dev_root is not None and getattr(self, "_temporary_dev_root", False):
            shutil.rmtree(self._dev_root, ignore_errors=True)
            self._dev_root = None
            self._temporary_dev_root = False


_PLUGIN_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*\Z")


def _holds_package(directory: Path) -> bool:
    """Whether ``directory`` has a subdirectory with an ``__init__.py`` (a plugin checkout)."""
    return any(sub.is_dir() and (sub / "__init__.py").is_file() for sub in directory.iterdir())


def _config_from_app(app: Flask) -> GitplugConfig | None:
    mapping = app.config.get("GITPLUG")
    if mapping is not None:
        return config_from_mapping(mapping, base_dir=Path(app.root_path))
    path = app.config.get("GITPLUG_CONFIG")
    if path:
        # Relative to the application, as Flask's own config.from_pyfile(): the same
        # file whatever the working directory (`flask --app ... gitplug` from elsewhere).
        return load_config(Path(app.root_path, os.path.expanduser(os.fspath(path))))
    return None


class _StartServices:
    """WSGI wrapper: start the background services on the first request of each process."""

    def __init__(self, wsgi_app: t.Callable[..., t.Any], services: HostServices) -> None:
        self.wsgi_app = wsgi_app
        self.services = services
        self._pid: int | None = None

    def __call__(self, environ: dict[str, t.Any], start_response: t.Callable[..., t.Any]) -> t.Any:
        if self._pid != os.getpid():
            self.services.ensure_started()
            self._pid = os.getpid()
        return self.wsgi_app(environ, start_response)
