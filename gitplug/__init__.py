"""gitplug: deploy Flask plugins from git and hot-swap them in a running server.

Public API::

    from gitplug import GitPlug, Plugin, current_plugin
"""

from __future__ import annotations

from . import signals
from .errors import (
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
from .extension import GitPlug
from .plugin import Plugin, PluginContext, current_plugin

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
    "MountError",
]

__version__ = "0.1.0"
