"""The data of ``gitplug status --json`` and ``GET /_gitplug/api/plugins`` (README, "HTTP API").

``state`` is ``live``, ``stopped``, ``failed`` (nothing served: the first
deploy failed), ``pending`` (never deployed), ``canary`` (a new release
serves a share of the clients beside the live one: ``canary`` holds the
split, both commits and each side's requests and errors) or ``behind``: a release is
served, no pin holds it, and the latest deploy of the tracked ref failed
(a failed ``gitplug resume``, a poll or webhook that failed), so the plugin
serves an older commit than its ref asks for; ``state_reason`` says why in
one line (None for the other states).
"""

from __future__ import annotations

import typing as t

from .config import GitplugConfig, PluginConfig
from .deploy.gitsource import redact_url
from .errors import UnknownPlugin
from .runtime.swap import Runtime
from .state import (
    DeployRecord,
    DeployResult,
    HostInfo,
    PluginStateValue,
    StateStore,
    canary_figures,
    host_status,
)

__all__ = ["plugin_status", "build_status"]


def plugin_status(
    plugin: PluginConfig,
    store: StateStore,
    *,
    runtime: Runtime | None = None,
    workers: list[t.Any] | None = None,
    hosts: list[HostInfo] | None = None,
    removed: bool = False,
) -> dict[str, t.Any]:
    """One plugin's entry of the status object (``removed``: a discovered plugin whose directory is gone)."""
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
    reason = None
    if value == "live" and state is not None and not state.pin and _failed_on_ref(last, plugin.ref):
        assert last is not None
        value, reason = "behind", _behind_reason(plugin.ref, last, state.live_commit)
    if removed:
        value, reason = PluginStateValue.REMOVED.value, None
        live_commit = None
    canary = state.canary_state if state is not None and value in ("live", "behind") else None
    if canary is not None:
        value = "canary"
    workers = workers if workers is not None else store.workers()
    hosts = hosts if hosts is not None else store.hosts()
    found = plugin.discovered_from
    return {
        "name": plugin.name,
        "repo": redact_url(plugin.repo),  # never a password, whoever asks
        "path": plugin.path,
        "ref": plugin.ref,
        "pin": state.pin if state else None,
        "state": value,
        "state_reason": reason,
        "live_commit": live_commit,
        "previous_commit": state.previous_commit if state else None,
        "url_prefix": url_prefix,
        "discovered_from": {"repo": found[0], "path": found[1]} if found else None,
        "workers": {w.worker_id: w.plugin_commits.get(plugin.name) for w in workers},
        "hosts": host_status(plugin.name, state, hosts),
        "canary": _canary_status(store, plugin.name, canary) if canary is not None else None,
        "last_error": state.last_error if state else None,
        "last_deploy": last.to_json() if last is not None else None,
    }


def _canary_status(store: StateStore, name: str, canary: t.Any) -> dict[str, t.Any]:
    """The ``canary`` object of a plugin's status: the split, both commits, each side's figures."""
    figures = canary_figures(store, name, canary)
    return {
        "commit": canary.commit,
        "stable_commit": canary.stable_commit,
        "percent": canary.percent,
        "deploy_id": canary.deploy_id,
        "started_at": canary.started_at,
        "stable": figures["stable"],
        "canary": figures["canary"],
    }


def _failed_on_ref(last: DeployRecord | None, ref: str) -> bool:
    return last is not None and last.result == DeployResult.FAILED and last.ref == ref


def _behind_reason(ref: str, last: DeployRecord, live_commit: str | None) -> str:
    """``serving abc, not the head of main: deploy #7 (cli) of def failed at test: ...``."""
    what = f" of {last.commit[:12]}" if last.commit else ""
    error = (last.error or "").strip().splitlines()
    detail = f": {error[0][:200]}" if error else ""
    return (
        f"serving {(live_commit or '?')[:12]}, not the head of {ref}: deploy #{last.id}"
        f" ({last.trigger}){what} failed at {last.stage.value if last.stage else '?'}{detail}"
    )


def build_status(
    config: GitplugConfig,
    store: StateStore,
    *,
    runtime: Runtime | None = None,
    only: str | None = None,
) -> dict[str, t.Any]:
    """``{"plugins": [...]}`` for every configured plugin (or just ``only``).

    Discovered plugins whose directory is gone follow, with state ``removed``.
    """
    if only is not None and only not in config.plugins and only not in config.removed:
        raise UnknownPlugin(only, list(config.plugins))
    workers = store.workers()
    hosts = store.hosts()
    names = [only] if only is not None else [*config.plugins, *config.removed]
    return {
        "plugins": [
            plugin_status(config.plugins.get(n) or config.removed[n], store, runtime=runtime, workers=workers,
                          hosts=hosts, removed=n not in config.plugins)
            for n in names
        ]
    }
