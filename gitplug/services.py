"""The background side of a serving process: converge, heartbeat, control.

Every serving process (each gunicorn worker, or the one ``gitplug serve``
process) runs :class:`HostServices`:

* **converge**: watch the state store's change counter and make this
  process serve what the store says is live (loading releases from disk,
  never fetching or testing);
* **heartbeat**: register the process and the commit it serves per plugin,
  so ``gitplug status`` shows every worker;
* **control**: one process per data directory holds ``locks/controller.lock``
  (an ``fcntl`` lock the kernel releases when its holder dies) and is the
  controller: it polls (APScheduler), runs the deploy queue and takes the
  deploy requests other processes (webhooks and API calls received by
  another worker) left in the store. Another process takes over within a
  few seconds of the controller's death.

In a fleet (``state: postgresql://...``; README, "Running a fleet") each host
has its own data directory and controller, and the controllers share out
one lease per plugin (and per ``discover`` entry;
:meth:`~gitplug.state.StateStore.acquire_lease`), each host taking at most
its fair share of the plugins and handing one to a host that has fewer: a
plugin's holder, its *leader*, polls it and runs its deploys (requests
from any host reach it through the store), so two plugins may deploy on
two hosts at once; when it dies another host takes the lease within
seconds. Every other controller *follows* the plugin: when the store's
live commit changes it fetches that commit into its own mirror, stages it,
checks its tree and swaps it (no test run), and reports what its host
serves in the host heartbeat. Changes are heard through the store's change
feed (``LISTEN``/``NOTIFY``), with a slow poll as the backstop.

The store may be unreachable at any time: every background call is guarded,
the trouble is logged once, this process keeps serving what it serves, and
converges when the store answers again. A process that starts without it
serves what its host last served (``<data_dir>/served.json``).
"""

from __future__ import annotations

import json
import logging
import math
import os
import threading
import time
import typing as t
import uuid
import zlib
from concurrent.futures import Future
from pathlib import Path

from .config import ConfigDiff, GitplugConfig, diff_plugins, load_config
from .deploy.autorollback import AutoRollbackWatch
from .deploy.canary import CanaryWatch
from .deploy.discovery import discovered_path, record_scan, scan, try_discovered, with_discovered
from .deploy.hosted import HostedRepos
from .deploy.hostwatch import LostHostWatch
from .deploy.layout import DataLayout, FileLock
from .deploy.pipeline import Deployer
from .deploy.triggers import PollScheduler, Trigger, TriggerQueue
from .errors import FetchError, GitplugError, RefNotFound, StateError, UnknownPlugin
from .runtime.swap import Runtime
from .state import (
    HOST_LOST_AFTER_S,
    DeployRecord,
    DeployResult,
    HostInfo,
    HostPlugin,
    Lease,
    PluginState,
    PluginStateValue,
    Stage,
    StateStore,
    WorkerInfo,
)

__all__ = ["HostServices"]

#: Trigger "plugin" names of discover scans: ``discover:<index>`` (no plugin name has ':').
_DISCOVER = "discover:"

logger = logging.getLogger(__name__)


class HostServices:
    """Convergence, heartbeat and (when elected) control, for one process."""

    #: Seconds between checks of the store's change counter.
    converge_interval = 0.25
    #: Seconds between heartbeats; a worker silent for 5x this is dead.
    heartbeat_interval = 2.0
    #: Seconds between attempts to become the controller (or the fleet's leader).
    election_interval = 1.0
    #: Seconds between reads of the change counter when the store announces
    #: changes (the backstop for a lost notification).
    backstop_interval = 2.0
    #: Prefix of the per-plugin leases: ``poll:<plugin>``, ``poll:discover:<index>``.
    lease_prefix = "poll:"
    #: Seconds a host keeps a lease it took before it may hand it to a host with fewer.
    rebalance_after_s = 5.0
    #: A plugin another live host leads is tried every this many elections (about seconds).
    retry_led_every = 4

    def __init__(
        self,
        config: GitplugConfig,
        store: StateStore,
        deployer: Deployer,
        runtime: Runtime,
        *,
        file_config: GitplugConfig | None = None,
    ) -> None:
        #: What the services run: the configuration plus the discovered plugins.
        self.config = config
        #: The configuration as read (``discover:`` entries, no discovered plugins).
        self.file_config = file_config or config
        self.store = store
        self.deployer = deployer
        self.runtime = runtime
        self.layout = DataLayout(config.data_dir)
        self.queue = TriggerQueue(self._run_trigger)
        self.scheduler = PollScheduler(self.queue)
        self.auto_rollback = AutoRollbackWatch(store, deployer)
        self.canary_watch = CanaryWatch(store, deployer)
        self._pushed_stats: dict[tuple[str, str], tuple[int, int]] = {}
        self._controller_lock = FileLock(self.layout.lock_file("controller"))
        self.is_controller = False
        self.host_id = config.host
        #: In a fleet, the controller reports the other hosts that go silent (``host_lost``).
        self.lost_hosts = LostHostWatch(store, deployer, self.host_id)
        #: The leases this process holds, by unit (a plugin, or ``discover:<index>``).
        self._leases: dict[str, Lease] = {}
        self._lease_taken: dict[str, float] = {}
        self._elections = 0
        #: Commits this process could not serve, per plugin: (commit, why, when to
        #: try again). A fetch that failed (the git server down, or behind the one
        #: the leader fetched from) is retried with a growing delay; a refusal
        #: (another tree, a release that does not load) waits for a change.
        self._refused: dict[str, tuple[str, str, float | None]] = {}
        self._refusal_streak: dict[str, int] = {}
        #: The canary commit this process could not load, per plugin (not retried).
        self._refused_canary: dict[str, str] = {}
        self._store_down = False
        self._beat_now = threading.Event()
        self._served_written: dict[str, str] | None = None
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._started_pid: int | None = None
        #: The process this object was made in (gunicorn's master with --preload);
        #: None after shutdown().
        self._owner_pid: int | None = os.getpid()
        self._start_lock = threading.Lock()
        self._seen_counter = -1
        self.worker_id = f"{self.host_id}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self._converge_lock = threading.Lock()
        #: Called with the new configuration after a reload (the extension's state).
        self.on_config: list[t.Callable[[GitplugConfig], None]] = []
        self._config_mtime = self._source_mtime()
        self._discovered_mtime = self._discovered_file_mtime()
        self._discover_problems: list[str] = []
        #: One configuration change at a time (a reload, a scan, the watcher).
        self._adopt_lock = threading.RLock()
        deployer.on_fetch.append(self._after_fetch)

    # -- startup ------------------------------------------------------------------

    @property
    def is_leader(self) -> bool:
        """This process leads some plugin: it controls its host and holds a plugin's lease."""
        return self.is_controller and bool(self._leases)

    def holds(self, unit: str) -> bool:
        """This process polls and deploys ``unit`` (a plugin, or ``discover:<index>``).

        On one host (a SQLite store) its controller does so for every plugin.
        """
        if not self.is_controller:
            return False
        return unit in self._leases or not self._fleet

    def restore(self) -> None:
        """Serve every plugin's last live release from disk; no network but the store.

        When the store cannot be reached, serve what this host last served
        (``served.json``) and converge once it answers. Also creates the bare
        repository of every ``repo: push`` plugin.
        """
        self._ensure_hosted()
        self._converge_guarded(force=True)

    def _converge_guarded(self, *, force: bool = False) -> None:
        try:
            self._converge(force=force)
            self._store_ok()
        except StateError as exc:
            self._store_trouble(exc)
            if not self.runtime.snapshot.releases:
                self._serve_local_record()

    def _store_trouble(self, exc: StateError) -> None:
        """Log the first failure of a run of them; keep serving."""
        if not self._store_down:
            self._store_down = True
            logger.warning(
                "gitplug: the state store is unreachable; serving what is live and retrying: %s", exc
            )

    def _store_ok(self) -> None:
        if self._store_down:
            self._store_down = False
            logger.info("gitplug: the state store answers again; catching up")
            self._seen_counter = -1

    def _serve_local_record(self, only: str | None = None) -> None:
        """Serve what this host last served (``served.json``), for plugins serving nothing.

        ``only``: that plugin alone (it cannot have the fleet's release yet).
        """
        try:
            served = json.loads(self.layout.served_file.read_text("utf-8"))
        except FileNotFoundError:
            return
        except (OSError, ValueError) as exc:
            logger.warning("gitplug: cannot read %s: %s", self.layout.served_file, exc)
            return
        for name, commit in served.items():
            if only is not None and name != only:
                continue
            if name in self.config.plugins and isinstance(commit, str) and self.runtime.live(name) is None:
                if self.deployer.load_from_disk(name, commit, record_error=False):
                    why = "no state store" if only is None else "until the fleet's release is here"
                    logger.info("plugin %s: serving %s as this host last did (%s)", name, commit[:12], why)

    def _write_local_record(self) -> None:
        """Keep ``served.json`` equal to what this process serves (the host controller only)."""
        served = {
            name: release.commit
            for name, release in self.runtime.snapshot.releases.items()
            if release.commit and name in self.config.plugins
        }
        if served == self._served_written:
            return
        path = self.layout.served_file
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps(served, indent=1, sort_keys=True) + "\n", "utf-8")
            os.replace(tmp, path)
            self._served_written = served
        except OSError as exc:
            logger.warning("gitplug: cannot write %s: %s", path, exc)

    def _ensure_hosted(self) -> None:
        try:
            HostedRepos(self.deployer).ensure_all()
        except OSError as exc:
            logger.error("gitplug: could not create a hosted repository under %s: %s",
                         self.layout.hosted, exc)

    def _poll_intervals(self, config: GitplugConfig) -> dict[str, float]:
        # A hosted plugin (repo: push) changes only by a push, which deploys itself.
        intervals = {n: p.poll_interval for n, p in config.plugins.items() if not p.hosted}
        # Each discover entry is scanned on its own interval too ("discover:<index>").
        intervals.update({f"{_DISCOVER}{i}": d.poll_interval for i, d in enumerate(self.file_config.discover)})
        return intervals

    def ensure_started(self) -> None:
        """Start the background threads once per process (fork-safe)."""
        pid = os.getpid()
        if self._started_pid == pid:
            return
        with self._start_lock:
            if self._started_pid == pid:
                return
            if self._owner_pid != pid:
                # Made in a parent (gunicorn --preload), or shut down before:
                # this process needs its own identity, locks, queue and scheduler.
                self._after_fork()
                self._owner_pid = pid
            # A fresh worker (gunicorn --preload, --max-requests) may hold
            # what the master loaded long ago: converge before serving.
            self._converge_guarded(force=True)
            self._stop.clear()
            for target, name in (
                (self._watch_loop, "gitplug-converge"),
                (self._control_loop, "gitplug-control"),
            ):
                thread = threading.Thread(target=target, name=name, daemon=True)
                thread.start()
                self._threads.append(thread)
            self._started_pid = pid

    def _after_fork(self) -> None:
        # Threads, locks and the scheduler do not survive fork(): start over.
        self.worker_id = f"{self.host_id}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self._threads = []
        self.is_controller = False
        self._controller_lock = FileLock(self.layout.lock_file("controller"))
        self.queue = TriggerQueue(self._run_trigger)
        self.scheduler = PollScheduler(self.queue)
        self.auto_rollback = AutoRollbackWatch(self.store, self.deployer)
        self.canary_watch = CanaryWatch(self.store, self.deployer)
        self.lost_hosts = LostHostWatch(self.store, self.deployer, self.host_id)
        self._adopt_lock = threading.RLock()
        self._pushed_stats = {}
        self._seen_counter = -1
        self._converge_lock = threading.Lock()
        self._leases = {}
        self._lease_taken = {}
        self._refused = {}
        self._refusal_streak = {}
        self._refused_canary = {}
        self._beat_now = threading.Event()

    def shutdown(self) -> None:
        """Stop threads, the scheduler and the queue; drop the heartbeat."""
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=5)
        self._threads = []
        self.scheduler.shutdown()
        self.queue.shutdown(wait=False)
        self._drop_leases()
        if self.is_controller:
            self._controller_lock.release()
            self.is_controller = False
        try:
            self.store.remove_worker(self.worker_id)
        except GitplugError:
            pass
        self._started_pid = None
        # A later ensure_started() builds a fresh queue, scheduler and identity.
        self._owner_pid = None

    # -- converge -------------------------------------------------------------------

    def _change_feed(self) -> t.Any:
        try:
            return self.store.change_feed()
        except StateError as exc:
            self._store_trouble(exc)
            return None

    def _watch_loop(self) -> None:
        next_beat = 0.0
        feed = self._change_feed()
        while not self._stop.is_set():
            incomplete = self._seen_counter == -2
            if feed is not None and not incomplete and not self._store_down:
                # Woken at once by a change; the timeout is the backstop poll.
                feed.wait(min(self.backstop_interval, max(next_beat - time.monotonic(), 0.01)))
            else:
                self._stop.wait(self.converge_interval)
            if self._stop.is_set():
                break
            try:
                self._converge()
                self._store_ok()
                self.push_stats()
                now = time.monotonic()
                if now >= next_beat or self._beat_now.is_set():
                    self._beat_now.clear()
                    self.heartbeat()
                    next_beat = now + self.heartbeat_interval
            except StateError as exc:
                self._store_trouble(exc)
            except Exception:  # noqa: BLE001 - the watcher must keep watching
                logger.exception("gitplug: converging with the state store failed")
            if self.is_controller:
                self._write_local_record()

    def _converge(self, *, force: bool = False) -> None:
        """Make this process serve what the store says is live.

        A plugin that a thread of *this* process is deploying is skipped and
        retried on the next tick: that deploy swaps this process itself, and
        converging between its swap and its state write would undo it. A
        deploy in another process (the controller, the CLI) does not hold a
        worker back: until it writes the store, the store's live release is
        the right one to serve.
        """
        with self._converge_lock:
            counter = self.store.change_counter()
            if counter == self._seen_counter and not force:
                return
            complete = True
            for name in self.config.plugins:
                if not self._needs_change(name, self.store.get_plugin(name)):
                    continue
                lock = self.deployer.lock_for(name)
                if not lock.try_local():
                    complete = False
                    continue
                try:
                    complete = self._apply(name, self.store.get_plugin(name)) and complete
                finally:
                    lock.release_local()
            if any(retry is not None for _, _, retry in self._refused.values()):
                complete = False  # a fetch to retry: look again on the next ticks
            # -2: something is still to do; the watcher retries on its next tick.
            self._seen_counter = counter if complete else -2

    def _needs_change(self, name: str, state: PluginState | None) -> bool:
        live = self.runtime.live(name)
        if state is None or not state.live_commit:
            return False
        if state.state in (PluginStateValue.STOPPED, PluginStateValue.REMOVED):
            return live is not None
        refused = self._refused.get(name)
        if refused is not None and refused[0] == state.live_commit and (
                refused[2] is None or time.monotonic() < refused[2]):
            return False  # tried and failed: wait for another commit, or the retry's time
        return live is None or live.commit != state.live_commit or self._canary_differs(name, state)

    def _canary_differs(self, name: str, state: PluginState) -> bool:
        """Whether this process runs another canary of ``name`` than the store's (README, "Canary releases")."""
        wanted = state.canary_state
        running = self.runtime.canary(name)
        if wanted is None:
            return running is not None
        if running is not None and running.commit == wanted.commit:
            return False
        refused = self._refused_canary.get(name)
        return refused != wanted.commit  # a canary this process could not load is not retried

    def _apply(self, name: str, state: PluginState | None) -> bool:
        """Converge one plugin; False when it must be retried (its release is being staged)."""
        if state is None or not self._needs_change(name, state):
            return True
        commit = state.live_commit
        assert commit is not None
        if state.state in (PluginStateValue.STOPPED, PluginStateValue.REMOVED):
            self.runtime.stop(name)
            logger.info("plugin %s: stopped", name)
            return True
        live = self.runtime.live(name)
        if live is not None and live.commit == commit:
            return self._apply_canary(name, state)
        canary = self.runtime.canary(name)
        if canary is not None and canary.commit == commit:
            # The canary was promoted: it serves everyone, nothing is reloaded.
            self.runtime.promote_canary(name)
            logger.info("plugin %s: canary %s promoted; now serving it to every client", name, commit[:12])
            self._served(name)
            return self._apply_canary(name, state)
        release = self.deployer.releases.get(name, commit)
        if release is None and not self.is_controller:
            # This host's controller is staging it: load it once it is on disk,
            # serving meanwhile what this host served last (a fresh worker).
            if self.runtime.live(name) is None:
                self._serve_local_record(only=name)
            return False
        if release is not None and self._fleet and state.live_tree and release.subtree != state.live_tree:
            self._refuse(name, commit, f"commit {commit[:12]} gives tree {release.subtree[:12]} on this "
                         f"host but {state.live_tree[:12]} on the host that tested it; check that every "
                         "host configures the same repository and path for the plugin")
            return True
        if release is None or (self._fleet and (release.test is None or not release.test.passed)):
            # Decided on another host (or this host lost the release): fetch,
            # stage and check it here, without running the tests again.
            try:
                self.deployer.follow(name, commit, state.live_tree)
            except (FetchError, RefNotFound) as exc:
                # The git server may be down, or behind the one the leader used
                # (a mirror, a replica): try again, sooner than the next commit.
                self._refuse(name, commit, str(exc), retry=True)
                return True
            except GitplugError as exc:
                self._refuse(name, commit, str(exc))
                return True
            logger.info("plugin %s: now serving %s, as the fleet does", name, commit[:12])
            self._served(name)
            return True
        if self.deployer.load_from_disk(name, commit, record_error=not self._fleet):
            logger.info("plugin %s: now serving %s", name, commit[:12])
            self._served(name)
            return self._apply_canary(name, state)
        self._refuse(name, commit, f"release {commit[:12]} did not load on this host; see its log")
        return True

    def _apply_canary(self, name: str, state: PluginState) -> bool:
        """Start, replace or end this process's canary of ``name`` as the store says."""
        if not self._canary_differs(name, state):
            return True
        wanted = state.canary_state
        if wanted is None:
            if self.runtime.end_canary(name) is not None:
                logger.info("plugin %s: canary ended; the live release serves every client", name)
            return True
        if self.deployer.releases.get(name, wanted.commit) is None and not self.is_controller and not self._fleet:
            return False  # this host's controller is staging it
        try:
            self.deployer.serve_canary(name, wanted)
        except GitplugError as exc:
            self._refused_canary[name] = wanted.commit
            logger.error("plugin %s: not serving canary %s here (the live release serves all): %s",
                         name, wanted.commit[:12], exc)
            return True
        self._refused_canary.pop(name, None)
        logger.info("plugin %s: canary %s serves %g%% here", name, wanted.commit[:12], wanted.percent)
        return True

    @property
    def _fleet(self) -> bool:
        return bool(getattr(self.store, "fleet", False))

    #: The first and the longest wait before a failed fetch of the fleet's commit is retried.
    refusal_retry_s = (2.0, 60.0)

    def _refuse(self, name: str, commit: str, error: str, *, retry: bool = False) -> None:
        """Keep serving what this process serves; show the host as diverged.

        A process that serves nothing of the plugin yet (it just started)
        serves what this host served last. ``retry``: the cause may pass by
        itself (a fetch); try ``commit`` again after a delay that doubles
        with each failure (:attr:`refusal_retry_s`), else only once the
        store names another commit or the configuration changes.
        """
        retry_at = None
        if retry:
            first, longest = self.refusal_retry_s
            streak = self._refusal_streak.get(name, 0) if self._refused.get(name, ("",))[0] == commit else 0
            self._refusal_streak[name] = streak + 1
            delay = min(first * 2 ** streak, longest)
            retry_at = time.monotonic() + delay
            error = f"{error} (tried {streak + 1} time{'s' if streak else ''}; trying again in {delay:g}s)"
        self._refused[name] = (commit, error, retry_at)
        logger.error("plugin %s: not serving %s (keeping the last good release): %s", name, commit[:12], error)
        if self.runtime.live(name) is None:
            self._serve_local_record(only=name)
        self._beat_now.set()

    def _served(self, name: str) -> None:
        self._refused.pop(name, None)
        self._refusal_streak.pop(name, None)
        self._beat_now.set()

    def push_stats(self) -> None:
        """Write this process's request/error counts per release when they changed."""
        snapshot = self.runtime.snapshot
        serving = [*snapshot.releases.items(), *((n, split.canary) for n, split in snapshot.canaries.items())]
        stats = {
            (name, release.commit or release.release_id): (release.requests, release.errors)
            for name, release in serving
        }
        changed = {k: v for k, v in stats.items() if self._pushed_stats.get(k) != v}
        if changed:
            self.store.record_release_stats(self.worker_id, changed)
            self._pushed_stats.update(changed)

    def heartbeat(self) -> None:
        """Record this process's beat; the host controller records its host's too."""
        commits = {name: (r.commit or r.release_id) for name, r in self.runtime.snapshot.releases.items()}
        now = time.time()
        self.store.heartbeat(
            WorkerInfo(
                worker_id=self.worker_id,
                host=self.host_id,
                pid=os.getpid(),
                plugin_commits=commits,
                heartbeat_at=now,
            )
        )
        if self.is_controller:
            plugins = {}
            for name in self.config.plugins:
                live = self.runtime.live(name)
                refused = self._refused.get(name)
                plugins[name] = HostPlugin(
                    live.commit if live is not None else None, refused[1] if refused else None,
                    leads=self.holds(name),
                )
            self.store.host_heartbeat(HostInfo(self.host_id, now, plugins, leader=self.is_leader,
                                               url=self.config.host_url))

    # -- control -----------------------------------------------------------------------

    def _control_loop(self) -> None:
        feed = None
        while not self._stop.is_set():
            if feed is None and self.is_leader:
                feed = self._change_feed()
            mtime = self._source_mtime()
            if mtime is not None and mtime != self._config_mtime:
                self._config_mtime = mtime
                self.reload_config()
            discovered = self._discovered_file_mtime()
            if discovered != self._discovered_mtime:
                # The controller scanned: every process serves what it found.
                self._discovered_mtime = discovered
                try:
                    self.refresh_discovered()
                except Exception:  # noqa: BLE001 - the loop must keep running
                    logger.exception("gitplug: applying the discovered plugins failed")
            if not self.is_controller:
                if self._controller_lock.acquire(blocking=False):
                    self.is_controller = True
                    logger.info("gitplug: process %d is the controller for %s", os.getpid(), self.config.data_dir)
                    self._become_controller()
            if self.is_controller:
                try:
                    hosts = self._elect()
                    if hosts is not None:  # a fleet: the election read its hosts
                        self.lost_hosts.check(hosts)
                    if self.is_leader:
                        self._take_requests()
                        held = {n for n in self.config.plugins if self.holds(n)}
                        self.auto_rollback.check(self.config, only=held)
                        self.canary_watch.check(self.config, only=held)
                    self._store_ok()
                except StateError as exc:
                    self.lost_hosts.interrupted()
                    self._store_trouble(exc)
                except Exception:  # noqa: BLE001 - the controller must keep controlling
                    logger.exception("gitplug: controller duties failed")
            if self.is_leader:
                # A deploy request from another process or host NOTIFYs: take it at once.
                if feed is not None and not self._store_down:
                    feed.wait(self.converge_interval)
                else:
                    self._stop.wait(self.converge_interval)
            else:
                self._stop.wait(self.election_interval)

    def _units(self) -> list[str]:
        """What leases are for: every plugin, and every ``discover`` entry."""
        return [*self.config.plugins, *(f"{_DISCOVER}{i}" for i in range(len(self.file_config.discover)))]

    def _preference(self, unit: str) -> int:
        # Each host ranks the plugins differently, so hosts starting together
        # go for different plugins first.
        return zlib.crc32(f"{self.host_id}/{unit}".encode())

    def _held_plugins(self) -> list[str]:
        return [unit for unit in self._leases if not unit.startswith(_DISCOVER)]

    def _share(self, plugins: int, hosts: list[HostInfo]) -> tuple[int, bool, set[str]]:
        """``(plugins this host may lead, whether a live host leads fewer, plugins led elsewhere)``.

        The share is the plugins divided by the live hosts (of ``hosts``, the
        fleet's as just read), rounded up, so the hosts' shares together
        cover every plugin; a dead host counts until it is ``lost`` (10 s),
        which bounds a takeover.
        """
        if not self._fleet:
            return plugins, False, set()
        now = time.time()
        others = [
            host for host in hosts
            if host.host_id != self.host_id and now - host.heartbeat_at <= HOST_LOST_AFTER_S
        ]
        share = math.ceil(plugins / (len(others) + 1))
        short = any(sum(1 for p in host.plugins.values() if p.leads) < share for host in others)
        led = {name for host in others for name, p in host.plugins.items() if p.leads}
        return share, short, led

    def _elect(self) -> list[HostInfo] | None:
        """Keep, lose, take or hand over leases (always granted on one machine's store).

        Returns the fleet's hosts as read for the shares (one read a round,
        which the lost hosts' watch uses too); None on one machine's store.
        """
        units = self._units()
        changed = False
        for unit, lease in list(self._leases.items()):
            if unit in units and lease.alive():
                continue
            self._release(unit)
            changed = True
            if unit in units:
                logger.warning("gitplug: host %s lost the lease of %s; another host will deploy it",
                               self.host_id, unit)
        # Read after the dead leases are dropped: a store failing here still lets those go.
        hosts = self.store.hosts() if self._fleet else None
        share, short, led_elsewhere = self._share(
            sum(1 for unit in units if not unit.startswith(_DISCOVER)), hosts or [])
        self._elections += 1
        handed: str | None = None
        held = self._held_plugins()
        if short and len(held) > share:
            now = time.monotonic()
            settled = [u for u in held if now - self._lease_taken.get(u, now) >= self.rebalance_after_s]
            if settled:
                # The plugin this host ranks last goes to a host that has fewer than its share.
                handed = max(settled, key=self._preference)
                self._release(handed)
                changed = True
                logger.info("gitplug: host %s hands plugin %s to a host that leads fewer", self.host_id, handed)
        for unit in sorted(units, key=self._preference):
            if unit in self._leases or unit == handed:
                continue
            if not unit.startswith(_DISCOVER) and len(self._held_plugins()) >= share:
                continue
            if unit in led_elsewhere and self._elections % self.retry_led_every:
                # A live host said it leads it: asked now and then (its death
                # frees the lease at once), not a connection every second.
                continue
            lease = self.store.acquire_lease(self.lease_prefix + unit)
            if lease is None:
                continue
            self._leases[unit] = lease
            self._lease_taken[unit] = time.monotonic()
            changed = True
            if self._fleet:
                logger.info("gitplug: host %s leads %s: it polls it and runs its deploys", self.host_id, unit)
            try:
                self._become_holder(unit)
            except BaseException:
                self._release(unit)
                raise
        if changed:
            self._schedule()
            self._beat_now.set()
        return hosts

    def _release(self, unit: str) -> None:
        lease = self._leases.pop(unit, None)
        self._lease_taken.pop(unit, None)
        if lease is not None:
            lease.release()

    def _drop_leases(self) -> None:
        for unit in list(self._leases):
            self._release(unit)
        self.scheduler.set_plugins({})
        self._beat_now.set()

    def _schedule(self) -> None:
        """Poll what this process leads."""
        intervals = {u: i for u, i in self._poll_intervals(self.config).items() if u in self._leases}
        # The first polls come a second from now: they finish what the
        # previous holder was deploying (an interrupted commit is retried).
        self.scheduler.set_plugins(intervals)
        if intervals:
            self.scheduler.start()

    def _become_controller(self) -> None:
        try:
            removed = self.deployer.releases.cleanup_incomplete()
            if removed:
                logger.info("gitplug: removed %d incomplete release(s) left by a crash", len(removed))
        except OSError as exc:
            logger.warning("gitplug: cleaning incomplete releases failed: %s", exc)
        try:
            self.heartbeat()  # the host shows up in every host's status at once
        except StateError as exc:
            self._store_trouble(exc)

    def _become_holder(self, unit: str) -> None:
        """Close the deploys of ``unit`` that a dead process left running."""
        if unit.startswith(_DISCOVER) or unit not in self.config.plugins:
            return
        lock = self.deployer.lock_for(unit)
        # Not to be had: a deploy of it runs (a command line, or in a fleet
        # any process of any host): its record is not interrupted.
        if not lock.acquire(blocking=False):
            return
        try:
            state = self.store.get_plugin(unit)
            canary = state.canary_state if state is not None else None
            for record in self.store.history(unit, limit=10):
                if canary is not None and record.id == canary.deploy_id:
                    continue  # a canary in progress: its new holder judges it from now on
                if record.result == DeployResult.RUNNING:
                    self.store.finish_deploy(
                        record.id, result=DeployResult.INTERRUPTED, error="the process died during the deploy",
                    )
        finally:
            lock.release()

    def _take_requests(self) -> None:
        take = getattr(self.store, "take_deploy_requests", None)
        if take is None:
            return
        # In a fleet, only the requests of what this host leads; the rest wait for their leader.
        for request in take(list(self._leases) if self._fleet else None):
            self.queue.submit(Trigger(request.plugin, request.trigger, request.ref))

    def _run_trigger(self, trigger: Trigger) -> DeployRecord | None:
        if trigger.plugin.startswith(_DISCOVER):
            self.discover(int(trigger.plugin[len(_DISCOVER):]), fresh_after=trigger.at)
            return None
        # The deployer itself ignores background triggers of a pinned or
        # stopped plugin (checked under the plugin's lock).
        try:
            return self.deployer.deploy(trigger.plugin, ref=trigger.ref, trigger=trigger.kind,
                                        fresh_after=trigger.at)
        except UnknownPlugin:
            # Removed (discovery, reload-config) after this trigger was queued: a
            # webhook's deploy of a directory the same push deleted. Nothing to do.
            logger.info("plugin %s: %s trigger dropped: the plugin is no longer configured",
                        trigger.plugin, trigger.kind)
            return None

    # -- the entry point for webhooks and the API ------------------------------------

    def trigger(
        self, plugin: str, kind: str, ref: str | None = None, *, at: float | None = None
    ) -> Future[DeployRecord | None] | None:
        """Queue a deploy here if this process leads the plugin, else via the store (to its leader).

        ``at`` (``time.monotonic()``) is when its cause was known, e.g. when a
        webhook arrived: the plugins of one repository it triggers then share
        one fetch (:meth:`~gitplug.deploy.pipeline.Deployer.fetch`).
        """
        if self.holds(plugin) or self._started_pid is None:
            if at is None:
                return self.queue.submit(Trigger(plugin, kind, ref))
            return self.queue.submit(Trigger(plugin, kind, ref, at=at))
        request = getattr(self.store, "request_deploy", None)
        if request is None:
            return self.queue.submit(Trigger(plugin, kind, ref))
        request(plugin, trigger=kind, ref=ref)
        return None

    # -- configuration reload -----------------------------------------------------

    def _source_path(self) -> Path | None:
        source = self.config.source
        if source and Path(source).is_file():
            return Path(source)
        return None

    def _source_mtime(self) -> int | None:
        path = self._source_path()
        try:
            return path.stat().st_mtime_ns if path is not None else None
        except OSError:
            return None

    # -- discovery ---------------------------------------------------------------------

    def _discovered_file_mtime(self) -> int | None:
        try:
            return discovered_path(self.file_config).stat().st_mtime_ns
        except OSError:
            return None

    def _after_fetch(self, url: str, started: float) -> None:
        """A plugin's deploy fetched ``url``: scan the discover entries of that repository."""
        if not self.is_controller and self._started_pid is not None:
            return
        mirror = self.deployer.git.mirror_path(url)
        for index, entry in enumerate(self.file_config.discover):
            if self.deployer.git.mirror_path(entry.repo) == mirror:
                unit = f"{_DISCOVER}{index}"
                if self.holds(unit) or self._started_pid is None:
                    # at=started: the scan uses that fetch instead of fetching again.
                    self.queue.submit(Trigger(unit, "discover", at=started))
                    continue
                try:  # another host leads the scan: it fetches for itself
                    self.store.request_deploy(unit, trigger="discover")
                except StateError as exc:
                    self._store_trouble(exc)

    def discover(self, index: int, *, fresh_after: float | None = None) -> list[str]:
        """Scan ``discover[index]`` (fetching its repository) and apply what changed.

        Run by the controller. A fetch or resolve that fails changes nothing:
        the plugins found before keep running. Returns the problems found.
        """
        if index >= len(self.file_config.discover):
            return []
        entry = self.file_config.discover[index]
        try:
            self.deployer.fetch("", entry.repo, fresh_after=fresh_after)
            commit = self.deployer.git.resolve("", entry.repo, entry.ref).commit
            found, problems = scan(self.deployer.git, entry, commit)
        except GitplugError as exc:
            logger.warning("gitplug: discover %r in %s: the scan failed, the plugins found before stay: %s",
                           entry.path, entry.repo, exc)
            return []
        gone = record_scan(self.file_config, entry, commit, found, problems)
        self._discovered_mtime = self._discovered_file_mtime()
        self.refresh_discovered()
        for name in gone:
            if name in self.config.removed:
                self._record_removed(name, entry.ref, commit, self.config.removed[name].path or "")
        return list(problems.values())

    def _record_removed(self, name: str, ref: str, commit: str, directory: str) -> None:
        with self.deployer.lock_for(name):
            self.store.update_plugin(name, state=PluginStateValue.REMOVED)
            record = self.store.start_deploy(name, trigger="discover", ref=ref, commit=commit)
            self.store.finish_deploy(
                record.id,
                result=DeployResult.SKIPPED,
                error=f"removed: {directory}/ is no longer in {commit[:12]}; the plugin is stopped",
                duration_s=0.0,
            )
        logger.info("plugin %s: removed (%s/ is gone from %s)", name, directory, commit[:12])

    def refresh_discovered(self) -> ConfigDiff:
        """Merge the last scans into the configuration and apply the difference.

        Each problem is logged once, when it appears. An unreadable
        ``discovered.json`` changes nothing: the discovered plugins keep
        running, and the controller scans every entry again (which rewrites it).
        """
        with self._adopt_lock:  # a scan and the control loop may both refresh: each problem logged once
            merged = try_discovered(self.file_config)
            if isinstance(merged, str):
                logger.warning("gitplug: ignoring an unreadable %s (%s): the discovered plugins keep running;"
                               " discovery runs again", discovered_path(self.file_config), merged)
                for index in range(len(self.file_config.discover)):
                    unit = f"{_DISCOVER}{index}"
                    if self.holds(unit) or self._started_pid is None:
                        self.queue.submit(Trigger(unit, "discover"))
                return ConfigDiff()
            new, problems = merged
            for problem in problems:
                if problem not in self._discover_problems:
                    logger.error("gitplug: %s", problem)
            self._discover_problems = problems
            return self._adopt(new, "discover")

    # -- configuration reload -----------------------------------------------------

    def reload_config(self) -> ConfigDiff | None:
        """Re-read the configuration file and apply it.

        An invalid file is refused whole (logged); the running configuration
        stays. A valid one replaces the running one for every reader (the
        webhook's secret, the admin token, ...), whether or not a plugin
        changed. Added plugins are deployed, removed ones stopped, changed
        ones reloaded (prefix, config) and deployed (ref). Every process of
        a server runs this itself when it sees the file change (the control
        loop, about once a second), so every worker applies a reload.
        """
        path = self._source_path()
        if path is None:
            return None
        try:
            new_file = load_config(path)
        except GitplugError as exc:
            logger.error("gitplug: refusing the edited configuration, keeping the running one: %s", exc)
            return None
        rescan = new_file.discover != self.file_config.discover
        self.file_config = new_file
        new, _problems = with_discovered(new_file)
        diff = self._adopt(new, "config")
        if rescan:
            for index in range(len(new_file.discover)):
                if self.holds(f"{_DISCOVER}{index}") or self._started_pid is None:
                    self.queue.submit(Trigger(f"{_DISCOVER}{index}", "discover"))
        return diff

    def _adopt(self, new: GitplugConfig, kind: str) -> ConfigDiff:
        """Run ``new`` (configuration plus discovered plugins): stop, reload, queue what changed."""
        with self._adopt_lock:
            return self._adopt_locked(new, kind)

    def _adopt_locked(self, new: GitplugConfig, kind: str) -> ConfigDiff:
        diff = diff_plugins(self.config, new)
        if not diff:
            self.config = new
            self.deployer.config = new
            for callback in self.on_config:
                callback(new)
            return diff
        logger.info(
            "gitplug: configuration (%s): added %s, removed %s, changed %s",
            kind, list(diff.added), list(diff.removed), list(diff.changed),
        )
        old = self.config
        for name in diff.changed:
            self._refused.pop(name, None)  # a changed configuration may serve what it refused
        self.set_config(new)
        for name in diff.removed:
            # Only what the configuration removed: plugins this process serves
            # from elsewhere (`serve --dev`, load_directory) are not its to stop.
            self.runtime.stop(name)
        for name in diff.changed:
            live = self.runtime.live(name)
            before, after = old.plugins[name], new.plugins[name]
            if live is not None and live.commit and (
                before.url_prefix != after.url_prefix or before.subdomain != after.subdomain
                or before.config != after.config or before.entry != after.entry
            ):
                self.deployer.load_from_disk(name, live.commit)
        for name in (*diff.added, *diff.changed):
            # In a fleet, a plugin added here is deployed by whichever host takes its lease.
            if self.holds(name) or self._started_pid is None:
                self.queue.submit(Trigger(name, kind))
        return diff

    def deploy_and_wait(
        self, plugin: str, kind: str, ref: str | None = None, *, timeout: float = 900.0
    ) -> DeployRecord | None:
        """Run a deploy where deploys run, and wait for its record.

        In the controller (or a process without background services) it
        runs on this process's queue. In any other worker it is handed to
        the controller through the store, so only one process per host
        fetches, stages and tests; the record is read back from the store.
        """
        if self.holds(plugin) or self._started_pid is None:
            return self.queue.submit(Trigger(plugin, kind, ref)).result(timeout=timeout)
        last = self.store.last_deploy(plugin)
        after = last.id if last is not None else 0
        self.store.request_deploy(plugin, trigger=kind, ref=ref)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for record in self.store.history(plugin, limit=20):
                # A deploy that started a canary is done as far as its caller waits (README, "Canary releases").
                started_canary = record.result == DeployResult.RUNNING and record.stage == Stage.CANARY
                if record.id > after and record.trigger == kind and (
                        record.result != DeployResult.RUNNING or started_canary):
                    return record
            time.sleep(0.1)
        raise GitplugError(
            f"plugin {plugin!r}: the controller did not finish the deploy within {timeout:g} s;"
            f" it may still be running: see `gitplug history {plugin}`."
        )

    def set_config(self, config: GitplugConfig) -> None:
        """Adopt a new configuration (already validated)."""
        self.config = config
        self.deployer.config = config
        for callback in self.on_config:
            callback(config)
        self._ensure_hosted()
        if self.is_controller:
            self._schedule()
        self._converge_guarded(force=True)

