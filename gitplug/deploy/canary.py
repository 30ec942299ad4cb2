"""The judgement of running canaries (README, "Canary releases").

Run by the deciding controller (the fleet's leader), like the
auto-rollback watch. For each plugin whose state holds a canary, the figures
of both sides since it started (requests and errors, 5xx answers and
unhandled exceptions, summed over every worker of every host from the counts
they write to the store) decide, once the canary has served
``min_requests`` and ``duration`` has passed:

* **promoted** when its error rate is at most ``max_error_rate`` and not
  clearly worse than the live release's over the same time;
* **rolled back** otherwise: the deploy is ``failed`` at stage ``canary``.

"Clearly worse" is a one-sided two-proportion z-test: the canary's rate is
above the live one's by at least :data:`Z_CLEARLY_WORSE` standard errors
*and* more than :data:`RATIO_CLEARLY_WORSE` times it, so a canary is not
rolled back for one error more than chance gives, nor for a difference too
small to matter when both sides err alike (a shared database is down).
"""

from __future__ import annotations

import json
import logging
import math
import time
import typing as t
from collections.abc import Collection

from ..config import Canary, GitplugConfig
from ..errors import GitplugError
from ..state import DeployRecord, DeployResult, StateStore
from .pipeline import Deployer

__all__ = ["CanaryWatch", "Z_CLEARLY_WORSE", "RATIO_CLEARLY_WORSE", "verdict"]

logger = logging.getLogger(__name__)

#: Standard errors by which the canary's error rate must exceed the live
#: release's to count as clearly worse (one-sided, about 1 in 740 by chance).
Z_CLEARLY_WORSE = 3.0
#: ... and by this factor at least.
RATIO_CLEARLY_WORSE = 2.0


def clearly_worse(canary: tuple[int, int], stable: tuple[int, int]) -> bool:
    """Whether ``(requests, errors)`` of the canary err clearly more than the stable side's."""
    c_req, c_err = canary
    s_req, s_err = stable
    if c_req <= 0 or s_req <= 0 or c_err == 0:
        return False
    c_rate, s_rate = c_err / c_req, s_err / s_req
    if c_rate <= s_rate * RATIO_CLEARLY_WORSE:
        return False
    pooled = (c_err + s_err) / (c_req + s_req)
    spread = math.sqrt(pooled * (1 - pooled) * (1 / c_req + 1 / s_req))
    if spread == 0:
        return True  # every request of both sides failed, or none: rates differ only if c > s
    return (c_rate - s_rate) / spread >= Z_CLEARLY_WORSE


def verdict(policy: Canary, figures: dict[str, t.Any], elapsed: float) -> tuple[str, str] | None:
    """``("promote" | "abort", why)`` for a canary's figures, or None while it must keep running."""
    canary = (int(figures["canary"]["requests"]), int(figures["canary"]["errors"]))
    stable = (int(figures["stable"]["requests"]), int(figures["stable"]["errors"]))
    if canary[0] < policy.min_requests or elapsed < policy.duration:
        return None
    rate = canary[1] / canary[0]
    stable_rate = stable[1] / stable[0] if stable[0] else 0.0
    seen = (
        f"canary {canary[1]} errors in {canary[0]} requests ({rate:.1%}), live release"
        f" {stable[1]} in {stable[0]} ({stable_rate:.1%}) over {elapsed:.0f} s"
    )
    if rate > policy.max_error_rate:
        return "abort", f"{seen}: above max_error_rate {policy.max_error_rate:.1%}"
    if clearly_worse(canary, stable):
        return "abort", f"{seen}: clearly worse than the live release"
    return "promote", seen


class CanaryWatch:
    """Judges running canaries; call :meth:`check` periodically (the leader does)."""

    def __init__(self, store: StateStore, deployer: Deployer) -> None:
        self.store = store
        self.deployer = deployer
        #: The figures last written to each running canary's deploy record (written when they change).
        self._written: dict[int, str] = {}
        #: Completed calls of :meth:`check` (tests wait for it to grow).
        self.checks = 0

    def check(self, config: GitplugConfig, *, only: Collection[str] | None = None) -> list[DeployRecord]:
        """Promote or roll back every canary that has a verdict; return their records.

        ``only``: judge these plugins alone (in a fleet, the ones this host leads).
        """
        try:
            return self._check(config, only)
        finally:
            self.checks += 1

    def _check(self, config: GitplugConfig, only: Collection[str] | None) -> list[DeployRecord]:
        done: list[DeployRecord] = []
        for name, plugin in config.plugins.items():
            if only is not None and name not in only:
                continue
            state = self.store.get_plugin(name)
            canary = state.canary_state if state is not None else None
            if canary is None:
                continue
            record = self.store.get_deploy(canary.deploy_id)
            if record is None or record.result != DeployResult.RUNNING:
                # Its deploy ended elsewhere (interrupted by a restart): the
                # live release serves everyone again.
                logger.warning("plugin %s: canary %s has no running deploy; ending it", name, canary.commit[:12])
                with self.deployer.lock_for(name):
                    if self.deployer.running_canary(name) == canary:
                        self.deployer._end_canary(
                            name, canary, result=DeployResult.INTERRUPTED, reason="its deploy is no longer running"
                        )
                continue
            figures = self.deployer.canary_figures(name, canary)
            text = json.dumps(figures)
            if self._written.get(canary.deploy_id) != text:
                # History and status show the figures while it runs.
                self.store.update_deploy(canary.deploy_id, canary=text)
                self._written[canary.deploy_id] = text
            policy = plugin.canary or Canary()
            found = verdict(policy, figures, time.time() - canary.started_at)
            if found is None:
                continue
            decision, why = found
            try:
                if decision == "promote":
                    done.append(self.deployer.promote(name, trigger="canary", reason=f"promoted: {why}",
                                                      expect=canary))
                else:
                    done.append(self.deployer.abort(name, trigger="canary", reason=why, expect=canary))
            except GitplugError as exc:
                # Someone decided by hand in between (promote/abort): nothing left to judge.
                logger.info("plugin %s: canary already decided: %s", name, exc)
            self._written.pop(canary.deploy_id, None)
        return done
