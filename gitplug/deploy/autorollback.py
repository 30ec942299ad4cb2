"""Automatic rollback of a newly live release that errors (README, "Guarantees": auto-rollback).

Run by the controller (in a fleet, by the plugin's leader). For each plugin
with ``auto_rollback``, a release that went live is watched for ``window``
seconds: once its first ``min_requests`` requests (summed over every worker
of the host, or of every host of a fleet, from the counts workers write to
the store with their heartbeats) are in, an error rate (5xx and
unhandled exceptions) above ``max_error_rate`` swaps the previous release
back, pins it, and records the deploy with trigger ``auto-rollback`` and
the observed rate. A release judged once is not judged again.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Collection
from dataclasses import dataclass

from ..config import GitplugConfig
from ..state import DeployRecord, PluginStateValue, StateStore
from .pipeline import Deployer

__all__ = ["AutoRollbackWatch"]

logger = logging.getLogger(__name__)


@dataclass
class _Watched:
    commit: str
    since: float
    judged: bool = False


class AutoRollbackWatch:
    """Judges newly live releases; call :meth:`check` periodically."""

    def __init__(self, store: StateStore, deployer: Deployer) -> None:
        self.store = store
        self.deployer = deployer
        self._watched: dict[str, _Watched] = {}
        #: Completed calls of :meth:`check`. Whoever must know that the watch has
        #: looked at the store since some moment (a test, a debugger) waits for it to grow.
        self.checks = 0

    def check(self, config: GitplugConfig, *, only: Collection[str] | None = None) -> list[DeployRecord]:
        """Roll back every release that breached its error budget; return the records.

        ``only``: judge these plugins alone (in a fleet, the ones this host leads).
        """
        try:
            return self._check(config, only)
        finally:
            self.checks += 1

    def _check(self, config: GitplugConfig, only: Collection[str] | None) -> list[DeployRecord]:
        done: list[DeployRecord] = []
        now = time.monotonic()
        for name, plugin in config.plugins.items():
            policy = plugin.auto_rollback
            if policy is None or (only is not None and name not in only):
                self._watched.pop(name, None)
                continue
            state = self.store.get_plugin(name)
            if state is None or state.state != PluginStateValue.LIVE or not state.live_commit:
                continue
            watched = self._watched.get(name)
            if watched is None or watched.commit != state.live_commit:
                # First sight of this live commit: its window starts now.
                # The release the service started with is judged too: it
                # may have gone live just before a restart.
                watched = self._watched[name] = _Watched(state.live_commit, now)
            if watched.judged:
                continue
            if now - watched.since > policy.window:
                watched.judged = True  # survived its window: accepted
                continue
            requests, errors = self.store.release_stats(name, watched.commit)
            if requests < policy.min_requests:
                continue
            watched.judged = True
            rate = errors / requests if requests else 0.0
            if rate <= policy.max_error_rate:
                continue
            if not state.previous_commit:
                logger.error(
                    "plugin %s: release %s errs on %.0f%% of %d requests but there is no previous"
                    " release to roll back to",
                    name, watched.commit[:12], rate * 100, requests,
                )
                continue
            reason = (
                f"error rate {rate:.0%} ({errors} of {requests} requests) exceeded"
                f" max_error_rate {policy.max_error_rate:.0%} for {watched.commit[:12]}"
            )
            logger.warning("plugin %s: auto-rollback to %s: %s", name, state.previous_commit[:12], reason)
            record = self.deployer.rollback(name, state.previous_commit, trigger="auto-rollback", reason=reason)
            if record is not None:
                done.append(record)
        return done
