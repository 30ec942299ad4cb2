"""Deploy triggers: a coalescing queue and the APScheduler poll jobs.

Every trigger (poll, webhook, API, config change) goes through
:class:`TriggerQueue`, which runs at most one deploy per plugin at a time
and folds a burst of triggers for one plugin into a single follow-up run:
ten webhooks for one push make one deploy (README, "Webhooks").

A stuck plugin never starves the others: each plugin holds at most one of
the queue's workers, every network step of a deploy has a deadline (see
:mod:`gitplug.deploy.gitsource`), and plugins waiting for a worker are served
in the order they asked, so a plugin whose deploys keep timing out is
re-queued behind the ones already waiting. The workers are daemon threads:
a deploy blocked on a silent server never keeps the process from exiting.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import threading
import time
import typing as t
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

from apscheduler.schedulers.background import BackgroundScheduler

from ..state import DeployRecord
from .pipeline import EXPLICIT_TRIGGERS

__all__ = ["Trigger", "TriggerQueue", "PollScheduler"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Trigger:
    """A request to bring one plugin up to date."""

    plugin: str
    kind: str  # poll | startup | webhook | api | config
    ref: str | None = None
    #: When the reason for it was known (``time.monotonic()``): a fetch of the
    #: repository that started after this sees every push that caused it.
    at: float = field(default_factory=time.monotonic, compare=False)


RunDeploy = Callable[[Trigger], "DeployRecord | None"]


class TriggerQueue:
    """At most one running and one pending deploy per plugin."""

    def __init__(self, run: RunDeploy, *, max_workers: int = 4) -> None:
        self._run = run
        self._max_workers = max_workers
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        #: Started deploys waiting for a worker, first come first served.
        self._ready: collections.deque[tuple[Trigger, Future[DeployRecord | None]]] = collections.deque()
        self._workers: list[threading.Thread] = []
        self._idle = 0
        self._running: dict[str, Future[DeployRecord | None]] = {}
        self._pending: dict[str, tuple[Trigger, Future[DeployRecord | None]]] = {}
        self._closed = False

    def submit(self, trigger: Trigger) -> Future[DeployRecord | None]:
        """Queue ``trigger``; returns a future of its deploy record.

        While a deploy of the plugin runs, triggers coalesce into one
        pending run; a pending run takes the most explicit trigger kind.
        """
        with self._lock:
            if self._closed:
                future: Future[DeployRecord | None] = Future()
                future.set_result(None)
                return future
            pending = self._pending.get(trigger.plugin)
            if pending is not None:
                kept, future = pending
                # Keep the most specific request: an explicit ref, or a person's
                # trigger (it must leave a history record) over a background one.
                if trigger.ref is not None or (trigger.kind in EXPLICIT_TRIGGERS and kept.ref is None):
                    kept = trigger
                # ...and the newest reason: its fetch must see the latest push.
                self._pending[trigger.plugin] = (dataclasses.replace(kept, at=max(kept.at, trigger.at)), future)
                return future
            future = Future()
            if trigger.plugin in self._running:
                self._pending[trigger.plugin] = (trigger, future)
            else:
                self._start(trigger, future)
            return future

    def _start(self, trigger: Trigger, future: Future[DeployRecord | None]) -> None:
        # Lock held.
        self._running[trigger.plugin] = future
        self._ready.append((trigger, future))
        if self._idle:
            self._wake.notify()
        # A notified worker counts as idle until it takes the lock again: start
        # another whenever more deploys wait than idle workers could take.
        if len(self._ready) > self._idle and len(self._workers) < self._max_workers:
            worker = threading.Thread(target=self._work, name=f"gitplug-deploy-{len(self._workers)}",
                                      daemon=True)
            self._workers.append(worker)
            worker.start()

    def _work(self) -> None:
        while True:
            with self._lock:
                while not self._ready and not self._closed:
                    self._idle += 1
                    self._wake.wait()
                    self._idle -= 1
                if self._closed:
                    return
                trigger, future = self._ready.popleft()
            self._execute(trigger, future)

    def _execute(self, trigger: Trigger, future: Future[DeployRecord | None]) -> None:
        try:
            result = self._run(trigger)
        except BaseException as exc:  # noqa: BLE001 - handed to whoever waits
            logger.exception("plugin %s: %s trigger failed", trigger.plugin, trigger.kind)
            future.set_exception(exc)
        else:
            future.set_result(result)
        finally:
            with self._lock:
                self._running.pop(trigger.plugin, None)
                pending = self._pending.pop(trigger.plugin, None)
                if pending is not None and not self._closed:
                    self._start(*pending)  # at the back of the line: others waiting go first
                elif pending is not None:
                    pending[1].set_result(None)

    def busy(self, plugin: str) -> bool:
        with self._lock:
            return plugin in self._running or plugin in self._pending

    def shutdown(self, wait: bool = True, *, timeout: float | None = None) -> None:
        """Run nothing more; with ``wait``, wait (at most ``timeout`` s) for running deploys.

        Deploys not started yet are dropped (their futures answer None). A
        deploy still running when the wait ends goes on in its daemon thread;
        its record is marked interrupted by the next controller if the
        process exits first.
        """
        with self._lock:
            self._closed = True
            dropped = list(self._ready) + list(self._pending.values())
            self._ready.clear()
            self._pending.clear()
            workers = list(self._workers)
            self._wake.notify_all()
        for _trigger, future in dropped:
            if not future.done():
                future.set_result(None)
        if wait:
            for worker in workers:
                worker.join(timeout)


class PollScheduler:
    """One APScheduler interval job per plugin, with jitter.

    ``coalesce=True`` and ``max_instances=1``: a late or slow poll never
    piles up. Started once per process by :class:`gitplug.services.HostServices`.
    """

    def __init__(self, queue: TriggerQueue) -> None:
        self._queue = queue
        self._scheduler = BackgroundScheduler(daemon=True, timezone="UTC")
        self._started = False
        self._polled: set[str] = set()

    def poll(self, plugin: str) -> None:
        """The job body: queue a poll trigger (deploy only if the ref moved).

        A plugin's first poll in this process is the ``startup`` trigger: the
        deploy it makes is the first deploy when a server starts.
        """
        kind = "poll" if plugin in self._polled else "startup"
        self._polled.add(plugin)
        self._queue.submit(Trigger(plugin, kind))

    def set_plugins(self, intervals: dict[str, float], *, first_delay_s: float = 1.0) -> None:
        """Make the jobs match ``{plugin: poll interval}``."""
        import datetime as dt

        wanted = {f"poll:{name}": (name, interval) for name, interval in intervals.items()}
        for job in self._scheduler.get_jobs():
            if job.id not in wanted:
                job.remove()
        for job_id, (name, interval) in wanted.items():
            existing = self._scheduler.get_job(job_id)
            if existing is not None and getattr(existing.trigger, "interval", None) == dt.timedelta(seconds=interval):
                continue
            self._scheduler.add_job(
                self.poll,
                "interval",
                seconds=interval,
                jitter=max(0.0, min(interval * 0.1, 30.0)),
                args=[name],
                id=job_id,
                name=f"poll {name}",
                coalesce=True,
                max_instances=1,
                replace_existing=True,
                next_run_time=dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=first_delay_s),
            )

    def start(self) -> None:
        if not self._started:
            self._scheduler.start()
            self._started = True

    def shutdown(self) -> None:
        if self._started:
            self._scheduler.shutdown(wait=False)
            self._started = False

    @property
    def jobs(self) -> list[t.Any]:
        return list(self._scheduler.get_jobs())
