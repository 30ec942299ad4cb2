"""The data of ``gitplug status --json`` and ``GET /_gitplug/api/plugins`` (SPEC 10)."""

from __future__ import annotations

import typing as t

from .config import GitplugConfig, PluginConfig
from .deploy.gitsource import redact_url
from .errors import UnknownPlugin
from .runtime.swap import Runtime
from .state import HostInfo, PluginStateValue, StateStore, host_status

__all__ = ["plugin_status", "build_status"]

def plugin_status(
    plugin: PluginConfig,
    store: StateStore,
    *,
    runtime: Runtime | None = None,
    workers: list[t.Any] | None = None,
    hosts: list[HostInfo] | None = None,
) -> dict[str, t.Any]:
    """One plugin's entry of the status object."""
    state = store.get_plugin(plugin.name)
    last = store.last_deploy(plugin.name)
    # The prefix in use: the live release's (it may be the one its
    # constructor declares), else what the configuration says.
    url_prefix = plugin.default_prefix
    if runtime is not None:
        live = runtime.live(plugin.name)
        live_commit = live.commit if live is not None else None
        if live is not None:
            url_prefix = live.prefix
    else:
        live_commit = state.live_commit if state and state.state != PluginStateValue.STOPPED else None
        if state is not None and state.url_prefix and not plugin.url_prefix:
            url_prefix = state.url_prefix
    if state is None:
        value = PluginStateValue.PENDING.value
    elif state.state == PluginStateValue.STOPPED:
        value = "stopped"
    elif state.live_commit:
        value = "live"
    else:
        value = state.state.value
    workers = workers if workers is not None else store.workers()
    hosts = hosts if hosts is not None else store.hosts()
    return {
        "name": plugin.name,
        "repo": redact_url(plugin.repo),  # never a password, whoever asks
        "ref": plugin.ref,
        "pin": state.pin if state else None,
        "state": value,
        "live_commit": live_commit,
        "previous_commit": state.previous_commit if state else None,
        "url_prefix": url_prefix,
        "workers": {w.worker_id: w.plugin_commits.get(plugin.name) for w in workers},
        "hosts": host_status(plugin.name, state, hosts),
        "last_error": state.last_error if state else None,
        "last_deploy": last.to_json() if last is not None else None,
    }


def build_status(
    config: GitplugConfig,
    store: StateStore,
    *,
    runtime: Runtime | None = None,
    only: str | None = None,
) -> dict[str, t.Any]:
    """``{"plugins": [...]}`` for every configured plugin (or just ``only``)."""
    if only is not None and only not in config.plugins:
        raise UnknownPlugin(only, list(config.plugins))
    workers = store.workers()
    hosts = store.hosts()
    names = [only] if only is not None else list(config.plugins)
    return {
        "plugins": [
            plugin_status(config.plugins[n], store, runtime=runtime, workers=workers, hosts=hosts)
            for n in names
        ]
    }
