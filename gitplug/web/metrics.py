"""Prometheus metrics for ``GET /_gitplug/metrics``.

Collected at scrape time from the state store (deploys, live commits, the
workers' heartbeats) and from this process's runtime (requests and errors
per release), so every worker answers with the host's deploy figures and
its own traffic figures. Stage durations and successful polls arrive as the
signals :data:`~gitplug.signals.stage_finished` and
:data:`~gitplug.signals.poll_succeeded`, in the process that runs the deploys
(the controller); this module subscribes when it is imported, which
:mod:`gitplug.web.admin` does when the API is mounted.
"""

from __future__ import annotations

import time
import typing as t

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from .. import signals
from ..deploy import notify
from ..state import HOST_LOST_AFTER_S, canary_figures, host_status

if t.TYPE_CHECKING:
    from .facade import GitplugFacade

__all__ = ["render_metrics", "observe_stage", "mark_poll_ok", "STAGE_SECONDS"]

_REGISTRY = CollectorRegistry(auto_describe=True)

#: Seconds spent per pipeline stage, observed by the process that deploys.
STAGE_SECONDS = Histogram(
    "gitplug_deploy_stage_seconds",
    "Time spent in each stage of the deploy pipeline.",
    ["plugin", "stage"],
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
    registry=_REGISTRY,
)

_last_poll_ok: dict[str, float] = {}


def observe_stage(plugin: str, stage: str, seconds: float) -> None:
    STAGE_SECONDS.labels(plugin=plugin, stage=stage).observe(seconds)


def mark_poll_ok(plugin: str, at: float | None = None) -> None:
    """Record that a poll of ``plugin`` reached its repository (at ``at``, default now)."""
    _last_poll_ok[plugin] = time.time() if at is None else at


def _on_stage_finished(sender: object, *, plugin: str, stage: str, seconds: float, **_: t.Any) -> None:
    observe_stage(plugin, stage, seconds)


def _on_poll_succeeded(sender: object, *, plugin: str, at: float, **_: t.Any) -> None:
    mark_poll_ok(plugin, at)


# Module-level functions: blinker's weak references stay alive with the module.
signals.stage_finished.connect(_on_stage_finished)
signals.poll_succeeded.connect(_on_poll_succeeded)


class _GitplugCollector:
    def __init__(self, gp: GitplugFacade) -> None:
        self.gp = gp

    def collect(self) -> t.Iterator[t.Any]:
        gp = self.gp
        config = gp.config
        deploys = CounterMetricFamily("gitplug_deploys", "Deploys by plugin and result.", labels=["plugin", "result"])
        live = InfoMetricFamily("gitplug_live_release", "The release each plugin serves in this process.", labels=["plugin"])
        requests = CounterMetricFamily(
            "gitplug_plugin_requests", "Requests served per plugin release (this process).", labels=["plugin", "commit"]
        )
        errors = CounterMetricFamily(
            "gitplug_plugin_errors",
            "5xx answers and unhandled exceptions per plugin release (this process).",
            labels=["plugin", "commit"],
        )
        polls = GaugeMetricFamily(
            "gitplug_last_successful_poll_timestamp_seconds",
            "Unix time of the last poll that reached the repository.",
            labels=["plugin"],
        )
        workers = GaugeMetricFamily("gitplug_workers", "Serving processes with a recent heartbeat.")
        lost = CounterMetricFamily(
            "gitplug_notifications_failed",
            "Notifications this process gave up on (after three tries, or dropped on a full queue).",
        )
        lost.add_metric([], notify.failures())
        hosts_up = GaugeMetricFamily(
            "gitplug_host_up", "1 while the host beats, 0 once it is lost (every host of the fleet).",
            labels=["host"],
        )
        host_release = GaugeMetricFamily(
            "gitplug_host_release",
            "1 per host and plugin, labelled with the commit it serves and its state (live, diverged, lost).",
            labels=["host", "plugin", "commit", "state"],
        )
        canary_percent = GaugeMetricFamily(
            "gitplug_canary_percent", "Share of the clients a running canary serves (README, \"Canary releases\").",
            labels=["plugin", "commit", "stable_commit"],
        )
        canary_requests = GaugeMetricFamily(
            "gitplug_canary_requests",
            "Requests each side of a running canary served since it started (every worker and host).",
            labels=["plugin", "side", "commit"],
        )
        canary_errors = GaugeMetricFamily(
            "gitplug_canary_errors",
            "5xx answers and unhandled exceptions of each side of a running canary since it started.",
            labels=["plugin", "side", "commit"],
        )
        if config is not None:
            for name in config.plugins:
                state = gp.store.get_plugin(name)
                canary = state.canary_state if state is not None else None
                if canary is None:
                    continue
                figures = canary_figures(gp.store, name, canary)
                canary_percent.add_metric([name, canary.commit, canary.stable_commit], canary.percent)
                for side in ("stable", "canary"):
                    canary_requests.add_metric([name, side, figures[side]["commit"]], figures[side]["requests"])
                    canary_errors.add_metric([name, side, figures[side]["commit"]], figures[side]["errors"])
            # One GROUP BY per scrape, not every plugin's whole history.
            for (name, result), count in sorted(gp.store.deploy_counts().items()):
                if name in config.plugins:
                    deploys.add_metric([name, result], count)
            workers.add_metric([], len(gp.store.workers()))
            hosts = gp.store.hosts()
            now = time.time()
            for host in hosts:
                hosts_up.add_metric([host.host_id], 0 if now - host.heartbeat_at > HOST_LOST_AFTER_S else 1)
            for name in config.plugins:
                for host_id, entry in host_status(name, gp.store.get_plugin(name), hosts, now=now).items():
                    host_release.add_metric([host_id, name, entry["live_commit"] or "", entry["state"]], 1)
        for name, release in gp.runtime.snapshot.releases.items():
            commit = release.commit or release.release_id
            live.add_metric([name], {"commit": commit, "release": release.release_id})
            requests.add_metric([name, commit], release.requests)
            errors.add_metric([name, commit], release.errors)
        for name, split in gp.runtime.snapshot.canaries.items():
            commit = split.canary.commit or split.canary.release_id
            requests.add_metric([name, commit], split.canary.requests)
            errors.add_metric([name, commit], split.canary.errors)
        for name, when in sorted(_last_poll_ok.items()):
            polls.add_metric([name], when)
        yield from (deploys, live, requests, errors, polls, workers, lost, hosts_up, host_release,
                    canary_percent, canary_requests, canary_errors)


def render_metrics(gp: GitplugFacade) -> tuple[bytes, str]:
    """The Prometheus exposition of ``gp``'s metrics and the stage histogram."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_GitplugCollector(gp))  # type: ignore[arg-type]
    return generate_latest(registry) + generate_latest(_REGISTRY), CONTENT_TYPE_LATEST
