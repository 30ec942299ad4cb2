"""Lost hosts of a fleet: the ``host_lost`` signal, once per fleet per loss (README, "Notifications").

Every host's controller runs a :class:`LostHostWatch` in its control loop,
over the ``hosts`` rows it reads there anyway (one query a round, shared
with the lease election). A host whose heartbeat is older than
:data:`~gitplug.state.HOST_LOST_AFTER_S` is *lost*, as ``gitplug status``
shows it. The loss is named by the host and its last heartbeat
(``gitplug-host-lost:<host id>:<heartbeat_at>``) and claimed in the store's
delivery ids (:meth:`~gitplug.state.StateStore.remember_delivery`), where
exactly one caller of the whole fleet wins: that controller sends
:data:`gitplug.signals.host_lost` (the notifier subscribes to it); the
others log that it was reported. A host that beats again and goes silent
again has another last heartbeat, so another loss, reported again. A
restarted controller finds the losses it sees already claimed.

Two guards against reporting what is not a loss:

* the watch judges only once this process has read the store without a
  failure for ``settle_s`` (default :data:`~gitplug.state.HOST_LOST_AFTER_S`):
  after the database was down for everyone, or on a fleet restarting at
  once, every live host has beaten again by then;
* a host already silent for longer than :attr:`LostHostWatch.window_s`
  (7 days) when first seen is not reported (long gone, or retired: hosts
  stay in the store and in ``gitplug status`` as ``lost``); its claim would
  have expired by then, so it could otherwise be reported again.

The claim is taken before the signal is sent: a controller dying between
the two loses that report (at most once, never twice).
"""

from __future__ import annotations

import logging
import time
import typing as t
from collections.abc import Iterable

from .. import signals
from ..state import HOST_LOST_AFTER_S, HostInfo, StateStore, iso_at

__all__ = ["LostHostWatch", "loss_key"]

logger = logging.getLogger(__name__)

#: The delivery ids of losses share the ``deliveries`` table with webhook ids,
#: under a prefix no forge's delivery id has.
KEY_PREFIX = "gitplug-host-lost:"


def loss_key(host: HostInfo) -> str:
    """The fleet-wide name of ``host``'s loss: its id and its last heartbeat."""
    return f"{KEY_PREFIX}{host.host_id}:{iso_at(host.heartbeat_at)}"


class LostHostWatch:
    """Sends ``host_lost`` for the hosts that went silent; call :meth:`check` each control round."""

    #: A host silent for longer than this when first seen lost is not reported.
    window_s = 7 * 86400.0

    def __init__(
        self, store: StateStore, sender: object, host_id: str, *, settle_s: float = HOST_LOST_AFTER_S,
        clock: t.Callable[[], float] = time.time, monotonic: t.Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self.sender = sender  #: the signal's sender (the host's deployer, which the notifier hears)
        self.host_id = host_id
        self.settle_s = settle_s
        self._clock = clock
        self._monotonic = monotonic
        #: The losses this process decided (reported, or found reported): host id -> heartbeat_at.
        self._decided: dict[str, float] = {}
        self._since: float | None = None
        #: Completed calls of :meth:`check` that judged (after the settling time).
        self.checks = 0

    def interrupted(self) -> None:
        """The store failed: judge again only after ``settle_s`` of answers."""
        self._since = None

    def check(self, hosts: Iterable[HostInfo]) -> list[HostInfo]:
        """Report every newly lost host among ``hosts`` (as just read); return those this process reported.

        Raises :class:`~gitplug.errors.StateError` when the store cannot
        record a claim (that loss is tried again on the next call).
        """
        mono = self._monotonic()
        if self._since is None:
            self._since = mono
        if mono - self._since < self.settle_s:
            return []
        now = self._clock()
        reported: list[HostInfo] = []
        lost: set[str] = set()
        for host in hosts:
            silent = now - host.heartbeat_at
            if host.host_id == self.host_id or silent <= HOST_LOST_AFTER_S:
                continue
            lost.add(host.host_id)
            if self._decided.get(host.host_id) == host.heartbeat_at:
                continue
            since = iso_at(host.heartbeat_at)
            if silent > self.window_s:
                logger.info("gitplug: host %s is lost since %s; not reported (silent for over %g days)",
                            host.host_id, since, self.window_s / 86400)
            elif self.store.remember_delivery(loss_key(host), ttl_s=self.window_s + HOST_LOST_AFTER_S):
                logger.warning("gitplug: host %s is lost: no heartbeat since %s (%.0f s); host %s reports it",
                               host.host_id, since, silent, self.host_id)
                reported.append(host)
                self._send(host)
            else:
                logger.info("gitplug: host %s is lost (no heartbeat since %s); another host reported it",
                            host.host_id, since)
            self._decided[host.host_id] = host.heartbeat_at
        for host_id in set(self._decided) - lost:
            del self._decided[host_id]  # it beats again: its next silence is a new loss
        self.checks += 1
        return reported

    def _send(self, host: HostInfo) -> None:
        try:
            signals.host_lost.send(self.sender, host=host.host_id, info=host, reported_by=self.host_id)
        except Exception:  # noqa: BLE001 - a receiver's failure must not stop the controller
            logger.exception("gitplug: a receiver of host_lost (host %s) failed", host.host_id)
