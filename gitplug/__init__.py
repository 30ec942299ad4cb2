"""gitplug: deploy Flask plugins from git and hot-swap them in a running server.

Public API::

    from gitplug import GitPlug, Plugin, current_plugin
"""

from __future__ import annotations

import typing as t

from . import signals
from .errors import (
    CanaryFailed,
    ConfigError,
    EntryPointError,
    FetchError,
    GitplugError,
    HealthCheckFailed,
    MountError,
    OnLoadFailed,
    PluginImportError,
    PluginLoadError,
    RefNotFound,
    StagingError,
    TestGateFailed,
    UnsafeTree,
)
from .runtime.plugin import Plugin, PluginContext, current_plugin

if t.TYPE_CHECKING:
    from .extension import GitPlug


def __getattr__(name: str) -> t.Any:
    # GitPlug pulls in the whole deploy machinery (dulwich, APScheduler,
    # SQLite); plugin code only needs Plugin and current_plugin, and a
    # plugin's tests run in a fresh interpreter per deploy: import it lazily.
    if name == "GitPlug":
        from .extension import GitPlug

        return GitPlug
    raise AttributeError(f"module 'gitplug' has no attribute {name!r}")

__all__ = [
    "GitPlug",
    "Plugin",
    "PluginContext",
    "current_plugin",
    "signals",
    "GitplugError",
    "ConfigError",
    "FetchError",
    "RefNotFound",
    "StagingError",
    "UnsafeTree",
    "TestGateFailed",
    "PluginLoadError",
    "PluginImportError",
    "EntryPointError",
    "OnLoadFailed",
    "HealthCheckFailed",
    "CanaryFailed",
    "MountError",
]

__version__ = "0.1.0"
