"""Test a plugin the way gitplug runs it: mounted in a host app, behind a test client.

A plugin's own tests (in its repository's ``tests/``) run twice: on the
author's machine and in gitplug's test gate, in the staged release directory,
before the release may go live. This module makes both runs identical: the
plugin under test is loaded by a real :class:`~gitplug.GitPlug` from its
directory, with the same isolated import, template lookup, versioned static
URLs and :data:`~gitplug.current_plugin` as in production.

Opt in from the repository's ``tests/conftest.py`` (``pytest_plugins`` must
be declared in the top-level conftest, which ``tests/conftest.py`` is when
pytest runs from the repository root)::

    # tests/conftest.py
    pytest_plugins = ["gitplug.testing"]

    # tests/test_hello.py
    def test_index(gitplug_client):
        response = gitplug_client.get("/hello/")
        assert response.status_code == 200

Fixtures (all function-scoped, so every test gets a fresh host app):

``gitplug_plugin_options``
    Keyword arguments for :func:`mount_plugin`; ``{}`` by default. Override
    it in a conftest, a module or a class to change ``name``, ``url_prefix``,
    ``config``, ``entry``, ``path`` or to pass your own host ``app``::

        @pytest.fixture
        def gitplug_plugin_options():
            return {"config": {"GREETING": "Hej"}, "url_prefix": "/hi"}

``gitplug_app``
    The host :class:`flask.Flask` app with the plugin live in it.
``gitplug_extension``
    The :class:`~gitplug.GitPlug` that serves it (to stop, start or reload).
``gitplug_client``
    ``gitplug_app.test_client()``, a :class:`GitplugTestClient`.

Which directory is the plugin: ``path`` if given, else ``$GITPLUG_PLUGIN_DIR``,
else the current directory, which is the repository root both when an author
runs ``python -m pytest`` there and in the test gate (it runs in the release
directory). The plugin's name defaults to its package name: the single
top-level package of the directory (``tests/``, ``docs/`` and the like are
not candidates), or the name its ``Plugin(...)`` declares when that differs.

Teardown stops the plugin, so its ``on_unload`` callbacks run as they would
in production, then removes the directory snapshot gitplug loaded from.
"""

from __future__ import annotations

import logging
import os
import typing as t
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest
from flask import Flask
from flask.testing import FlaskClient
from werkzeug.test import TestResponse

from .errors import EntryPointError, GitplugError, PluginLoadError, PluginNameMismatch
from .extension import EXTENSION_KEY, GitPlug
from .runtime.loader import find_package

__all__ = [
    "GitplugTestClient",
    "PLUGIN_DIR_ENV",
    "default_plugin_dir",
    "mount_plugin",
    "unmount",
    "gitplug_plugin_options",
    "gitplug_app",
    "gitplug_extension",
    "gitplug_client",
]

logger = logging.getLogger(__name__)

#: Environment variable naming the plugin directory under test.
PLUGIN_DIR_ENV = "GITPLUG_PLUGIN_DIR"

#: The keyword arguments :func:`mount_plugin` accepts, for validating options.
_MOUNT_OPTIONS = frozenset({"path", "name", "url_prefix", "config", "entry", "app"})

#: Secret key of the throw-away host app: session and ``flash`` need one.
_TEST_SECRET_KEY = "gitplug-testing-not-a-secret"


class GitplugTestClient(FlaskClient):
    """A Flask test client whose responses are closed as soon as they arrive.

    gitplug counts the requests in flight per release and only unloads a
    retired release once all of their responses are closed. Flask's client
    leaves a response open until it is closed explicitly, so here ``open()``
    (and ``get``, ``post``, ...) default to ``buffered=True``: the body is
    read and the response closed before it is returned. Pass
    ``buffered=False`` to test a streaming response, and close it yourself.
    """

    def open(
        self,
        *args: t.Any,
        buffered: bool = True,
        follow_redirects: bool = False,
        **kwargs: t.Any,
    ) -> TestResponse:
        return super().open(*args, buffered=buffered, follow_redirects=follow_redirects, **kwargs)


def default_plugin_dir() -> Path:
    """``$GITPLUG_PLUGIN_DIR`` if set and non-empty, else the current directory."""
    configured = os.environ.get(PLUGIN_DIR_ENV, "").strip()
    return Path(configured) if configured else Path.cwd()


def _default_name(path: Path, entry: str | None) -> str:
    """The package name of the plugin in ``path`` (from ``entry`` if given)."""
    if entry:
        return entry.partition(":")[0].split(".")[0]
    try:
        package, _ = find_package(path, None, path.name)
    except EntryPointError as exc:
        raise EntryPointError(
            f"{exc} In tests: run pytest from the plugin repository's root, set"
            f" {PLUGIN_DIR_ENV}, or pass path=/entry= to mount_plugin (or in the"
            " gitplug_plugin_options fixture).",
            plugin=exc.plugin,
        ) from exc
    return package


def _host_app(root: Path) -> Flask:
    """A bare host application: what ``gitplug serve`` mounts plugins into."""
    # No static or template folder of its own, so "/static" and every
    # template name are free for the plugin, as in a minimal host.
    app = Flask("gitplug_test_host", root_path=str(root), static_folder=None, template_folder=None)
    app.config.update(TESTING=True, SECRET_KEY=_TEST_SECRET_KEY)
    return app


def mount_plugin(
    path: str | Path | None = None,
    *,
    name: str | None = None,
    url_prefix: str | None = None,
    config: Mapping[str, t.Any] | None = None,
    entry: str | None = None,
    app: Flask | None = None,
) -> tuple[Flask, GitPlug]:
    """Load the plugin in ``path`` into a host app and return ``(app, gitplug)``.

    :param path: the plugin's repository root; default :func:`default_plugin_dir`.
    :param name: the plugin name (blueprint name, default prefix ``/<name>``);
        default the package name.
    :param url_prefix: where to mount it; default ``/<name>``.
    :param config: what ``current_plugin.config`` holds.
    :param entry: ``"module.path:attr"`` of the :class:`~gitplug.Plugin`.
    :param app: a host app to mount into; default a fresh one with
        ``TESTING`` and a ``SECRET_KEY``. It must not have gitplug yet: to
        mount a second plugin, call ``gitplug.load_directory`` on the returned
        extension.

    The app's ``test_client_class`` becomes :class:`GitplugTestClient` unless
    the given app already sets one. Raises :class:`~gitplug.PluginLoadError`
    (with file and line) when the plugin does not load, exactly as a deploy
    would fail. Call :func:`unmount` when done (the fixtures do).
    """
    source = Path(path) if path is not None else default_plugin_dir()
    source = source.resolve()
    if not source.is_dir():
        raise GitplugError(
            f"mount_plugin: plugin directory {source} does not exist. Pass the plugin"
            f" repository's root as path= or set {PLUGIN_DIR_ENV}."
        )
    plugin_name = name or _default_name(source, entry)
    if app is None:
        app = _host_app(source)
    elif EXTENSION_KEY in app.extensions:
        raise GitplugError(
            f"mount_plugin: the app {app.import_name!r} already has gitplug. To mount"
            f" {plugin_name!r} next to another plugin, call load_directory() on the"
            " GitPlug that mount_plugin returned for the first one."
        )
    gitplug = GitPlug(app)
    if app.test_client_class is None:
        app.test_client_class = GitplugTestClient
    try:
        try:
            release = gitplug.load_directory(
                plugin_name, source, url_prefix=url_prefix, config=config, entry=entry
            )
        except PluginNameMismatch as exc:
            if name is not None:
                raise
            # No name asked for: the plugin's own Plugin(...) name, not its package's.
            plugin_name = exc.declared
            release = gitplug.load_directory(
                plugin_name, source, url_prefix=url_prefix, config=config, entry=entry
            )
    except BaseException:
        unmount(gitplug)
        raise
    logger.debug("mounted plugin %s from %s as %s", plugin_name, source, release.release_id)
    return app, gitplug


def unmount(gitplug: GitPlug, *, timeout: float = 10.0) -> None:
    """Stop every plugin of ``gitplug``, run their ``on_unload``, free resources.

    Waits up to ``timeout`` seconds for the unloads (a response still open
    keeps its release loaded; it is then left to the garbage collector).
    Idempotent.
    """
    runtime = gitplug.runtime
    for plugin_name in list(runtime.snapshot.releases):
        gitplug.stop(plugin_name)
    if not runtime.wait_idle(timeout):
        logger.warning("unmount: plugin releases were still unloading after %ss", timeout)
    # Stops the reaper and removes the directory snapshots load_directory made.
    gitplug.shutdown()


# -- pytest fixtures -----------------------------------------------------------


@pytest.fixture
def gitplug_plugin_options() -> Mapping[str, t.Any]:
    """Keyword arguments for :func:`mount_plugin`; override to configure the mount."""
    return {}


#: ``{mount key: error}`` of plugins that failed to load in this session.
_load_failures: dict[str, str] = {}


class _NoLoadFailureLog(logging.Filter):
    """Drops the runtime's "failed to load" warning while the fixture mounts."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "failed to load" not in str(record.msg)


def pytest_sessionstart(session: pytest.Session) -> None:
    """A new session tries every plugin again (pytester runs sessions in one process)."""
    _load_failures.clear()


def _mount_key(options: Mapping[str, t.Any]) -> str:
    """Which plugin code the options load: its directory and entry."""
    path = options.get("path")
    where = Path(path).resolve() if path is not None else default_plugin_dir().resolve()
    return repr((str(where), options.get("entry")))


@pytest.fixture
def _gitplug_mount(gitplug_plugin_options: Mapping[str, t.Any]) -> Iterator[tuple[Flask, GitPlug]]:
    options = dict(gitplug_plugin_options)
    unknown = sorted(set(options) - _MOUNT_OPTIONS)
    if unknown:
        raise GitplugError(
            f"gitplug_plugin_options: unknown option(s) {', '.join(map(repr, unknown))}."
            f" Expected some of: {', '.join(sorted(_MOUNT_OPTIONS))}."
        )
    # A plugin that does not load fails the first test that mounts it, with
    # the error alone (it names the plugin's file and line; gitplug's and
    # pytest's frames say nothing about it), and the others are skipped:
    # one error in the log, not the same traceback once per test.
    key = _mount_key(options)
    if key in _load_failures:
        pytest.skip(f"the plugin did not load (see the first failure): {_load_failures[key].splitlines()[0]}")
    quiet = _NoLoadFailureLog()
    swap_logger = logging.getLogger("gitplug.runtime.swap")
    swap_logger.addFilter(quiet)  # the failure below says it; pytest would show the log too
    try:
        app, gitplug = mount_plugin(**options)
    except PluginLoadError as exc:
        _load_failures[key] = str(exc)
    finally:
        swap_logger.removeFilter(quiet)
    if key in _load_failures:  # outside the except: no "during handling" chain in the report
        pytest.fail(f"the plugin did not load: {_load_failures[key]}", pytrace=False)
    try:
        yield app, gitplug
    finally:
        unmount(gitplug)


@pytest.fixture
def gitplug_app(_gitplug_mount: tuple[Flask, GitPlug]) -> Flask:
    """The host app with the plugin under test live in it."""
    return _gitplug_mount[0]


@pytest.fixture
def gitplug_extension(_gitplug_mount: tuple[Flask, GitPlug]) -> GitPlug:
    """The :class:`~gitplug.GitPlug` serving the plugin under test."""
    return _gitplug_mount[1]


@pytest.fixture
def gitplug_client(gitplug_app: Flask) -> FlaskClient:
    """A test client of the host app (a :class:`GitplugTestClient`)."""
    return gitplug_app.test_client()
