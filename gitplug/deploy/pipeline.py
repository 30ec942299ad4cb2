"""The deploy pipeline: fetch -> resolve -> [signature] -> stage -> requirements -> test -> load -> verify -> swap -> record.

:class:`Deployer` runs one deploy at a time per plugin (a thread lock plus
an ``fcntl`` lock file, so the CLI and a server on the same data directory
never deploy one plugin at once). Every failure is recorded with its stage
and error; nothing served changes unless every stage passed. A background
trigger (poll, webhook) that fails before it knows the commit (at ``fetch``)
is recorded too, once per run of identical failures: the record counts the
repeats (:attr:`~gitplug.state.DeployRecord.repeats`) instead of a poll
adding a line each interval.

A deployer either serves (it has the server's :class:`~gitplug.runtime.swap.Runtime`
and swaps it) or only verifies (the CLI: it loads the release into a private
host application to prove it loads, then records it as live; the servers
watching the state store converge on it).
"""

from __future__ import annotations

import functools
import json
import logging
import threading
import time
import typing as t
from collections.abc import Callable
from pathlib import Path

from flask import Flask

from .. import signals
from ..config import GitplugConfig, PluginConfig
from ..errors import (
    BadInput,
    CanaryFailed,
    FetchError,
    GitplugError,
    HealthCheckFailed,
    MountError,
    OnLoadFailed,
    PluginLoadError,
    RefNotFound,
    ReleaseModified,
    RequirementsNotMet,
    SignatureRefused,
    StagingError,
    StateError,
    TestGateFailed,
    UnknownPlugin,
)
from ..runtime.codecache import CodeCache
from ..runtime.loaded import ReleaseSpec
from ..runtime.swap import Runtime
from ..state import (
    CanaryState,
    DeployRecord,
    DeployResult,
    Lease,
    PluginState,
    PluginStateValue,
    Stage,
    StateStore,
    canary_figures,
    now_iso,
)
from .gitsource import GitSource, ResolvedRef, redact_url
from .layout import DataLayout, FileLock, PluginLock
from .peers import sync_from_peers
from .releases import Release, ReleaseStore, TestRecord
from .requirements import check_requirements
from .signatures import check_signature
from .testgate import run_test_gate

__all__ = ["Deployer", "Progress", "EXPLICIT_TRIGGERS"]

logger = logging.getLogger(__name__)

#: ``progress(stage, message)``: called as a deploy passes each stage.
Progress = Callable[[str, str], None]

#: Triggers a person asked for: they always leave a history record and
#: re-run a failed test gate. Background triggers (poll, startup: a server's
#: first poll, webhook, config) stay silent when there is nothing to do and
#: never retry a failed commit.
EXPLICIT_TRIGGERS = frozenset({"cli", "api", "rollback", "auto-rollback", "push", "discover"})

#: Triggers that are polls: a success stamps the plugin's last successful poll.
POLL_TRIGGERS = frozenset({"poll", "startup"})

#: Triggers that pin an earlier release and send ``rolled_back``.
ROLLBACK_TRIGGERS = frozenset({"rollback", "auto-rollback"})

_STAGE_OF_ERROR: tuple[tuple[type[BaseException], Stage], ...] = (
    (FetchError, Stage.FETCH),
    (RefNotFound, Stage.FETCH),
    (SignatureRefused, Stage.SIGNATURE),
    (StagingError, Stage.STAGE),
    (RequirementsNotMet, Stage.REQUIREMENTS),
    (TestGateFailed, Stage.TEST),
    (OnLoadFailed, Stage.VERIFY),
    (HealthCheckFailed, Stage.VERIFY),
    (PluginLoadError, Stage.LOAD),
    (MountError, Stage.LOAD),
)

#: The directory holding the ``gitplug`` package, put on the test gate's
#: PYTHONPATH so a plugin's tests can ``import gitplug.testing``.
_GITPLUG_PARENT = Path(__file__).resolve().parents[2]


def _timed(sender: object, plugin: str, progress: Progress | None) -> Progress:
    """Wrap ``progress`` so the time between stages is sent as :data:`~gitplug.signals.stage_finished`."""
    last: list[t.Any] = [None, time.monotonic()]

    def say(stage: str, message: str) -> None:
        now = time.monotonic()
        if last[0] is not None:
            signals.stage_finished.send(sender, plugin=plugin, stage=last[0], seconds=now - last[1])
        last[0], last[1] = (stage if stage in _TIMED_STAGES else None), now
        if progress is not None:
            progress(stage, message)

    return say


_TIMED_STAGES = frozenset({"fetch", "stage", "test", "load", "swap"})


def _stage_of(exc: BaseException, default: Stage) -> Stage:
    for kind, stage in _STAGE_OF_ERROR:
        if isinstance(exc, kind):
            return stage
    return default


class _NothingToDo(Exception):
    """Internal: the resolved commit, or its tree under ``path``, is already live; the reason."""


class Deployer:
    """Runs the pipeline for the plugins of one configuration."""

    def __init__(self, config: GitplugConfig, store: StateStore, runtime: Runtime | None = None) -> None:
        self.config = config
        self.store = store
        self.runtime = runtime
        self.layout = DataLayout(config.data_dir)
        # Read through self.config at each fetch: a reload's rotated credentials apply at once.
        self.git = GitSource(self.layout.mirrors, credentials=lambda: self.config.credentials)
        self.releases = ReleaseStore(self.layout.releases)
        self._locks: dict[str, PluginLock] = {}
        self._locks_guard = threading.Lock()
        self._verify_runtime: Runtime | None = None
        #: ``{plugin: state}`` a background trigger last said it ignores
        #: ("pinned at v1", "failed <sha>"): logged at INFO when it starts,
        #: at DEBUG on every later poll (see :meth:`_ignoring`).
        self._ignored: dict[str, str] = {}
        self._ignored_guard = threading.Lock()
        self._fetch_guard = threading.Lock()
        self._fetch_locks: dict[Path, threading.Lock] = {}
        #: mirror -> monotonic time the last fetch into it started (see :meth:`fetch`).
        self._fetched_at: dict[Path, float] = {}
        #: Called as ``hook(url, started)`` after a plugin's deploy fetched ``url``
        #: (``started``: when the fetch it used began); discovery listens.
        self.on_fetch: list[Callable[[str, float], None]] = []

    # -- helpers -------------------------------------------------------------

    def plugin_config(self, name: str) -> PluginConfig:
        plugin = self.config.plugins.get(name)
        if plugin is None:
            raise UnknownPlugin(name, list(self.config.plugins))
        return plugin

    def lock_for(self, name: str) -> PluginLock:
        """The plugin's deploy lock: this host's, and in a fleet the fleet's (:class:`PluginLock`)."""
        with self._locks_guard:
            lock = self._locks.get(name)
            if lock is None:
                take = functools.partial(self._plugin_lease, name) if self.fleet else None
                lock = self._locks[name] = PluginLock(FileLock(self.layout.lock_file(f"deploy-{name}")), take)
            return lock

    def _plugin_lease(self, name: str, wait_s: float | None) -> Lease | None:
        lease = self.store.acquire_lease(f"plugin:{name}", wait_s=0.0)
        if lease is None and wait_s != 0.0:
            # Said once: the wait may be a whole test run on another host.
            logger.info("plugin %s: another host is deploying it; waiting for its decision", name)
            lease = self.store.acquire_lease(f"plugin:{name}", wait_s=wait_s)
        return lease

    @property
    def fleet(self) -> bool:
        """Whether the store is shared by several hosts (README, "Running a fleet")."""
        return bool(getattr(self.store, "fleet", False))

    def sync_hosted(self, plugin: PluginConfig) -> list[str]:
        """In a fleet, fetch the other hosts' copies of a ``repo: push`` plugin's repository here.

        A push reaches one host (see :mod:`.peers`). A no-op for other
        plugins and on a single host. Never raises: returns the problems
        (a peer that did not answer, one without ``host_url``), logged too.
        """
        if not (plugin.hosted and self.fleet):
            return []
        try:
            hosts = self.store.hosts()
        except StateError as exc:
            return [f"could not list the other hosts: {exc}"]
        return sync_from_peers(self.git, self.config, plugin, hosts)

    def spec_for(self, plugin: PluginConfig, release: Release) -> ReleaseSpec:
        return ReleaseSpec(
            name=plugin.name,
            path=release.path,
            release_id=release.commit,
            url_prefix=plugin.url_prefix,
            subdomain=plugin.subdomain,
            commit=release.commit,
            entry=plugin.entry,
            config=plugin.config,
            verify=True,
        )

    def _secrets(self) -> list[str]:
        """Values the test gate's environment must not hold (scrubbed by value, whatever the name)."""
        credentials = [v for c in self.config.credentials for v in (c.password, c.passphrase)]
        return [s for s in (self.config.admin_token, self.config.webhook_secret, *credentials) if s]

    def _ignoring(self, name: str, state: str, message: str, *args: t.Any) -> None:
        """Log that a background trigger does nothing because of ``state``: once.

        A 3 s poll would otherwise log the same line every 3 s. The state is
        forgotten when a deploy of the plugin starts, so it is logged again
        when it comes back.
        """
        with self._ignored_guard:
            new = self._ignored.get(name) != state
            self._ignored[name] = state
        logger.log(logging.INFO if new else logging.DEBUG, message, *args)

    def _not_ignoring(self, name: str) -> None:
        with self._ignored_guard:
            self._ignored.pop(name, None)

    def _decided_commit(self, name: str, state: PluginState | None) -> str | None:
        """The commit a deploy of ``name`` would change: what is live where decisions are made.

        In a fleet that is the store's live commit (read under the plugin's
        fleet-wide lock), not what this process happens to serve: a host
        that has not converged yet must not take the fleet's release for
        its own, or a decision would write a pin beside another live commit.
        """
        if self.fleet:
            live = state is not None and state.state == PluginStateValue.LIVE
            return state.live_commit if live and state is not None else None
        return self.served_commit(name)

    def served_commit(self, name: str) -> str | None:
        if self.runtime is None:
            state = self.store.get_plugin(name)
            return state.live_commit if state and state.state == PluginStateValue.LIVE else None
        live = self.runtime.live(name)
        return live.commit if live is not None else None

    # -- the pipeline ----------------------------------------------------------

    def deploy(
        self,
        name: str,
        *,
        ref: str | None = None,
        trigger: str = "cli",
        pin: str | None | t.Literal[False] = False,
        fetch: bool = True,
        progress: Progress | None = None,
        reason: str | None = None,
        commit: str | None = None,
        fresh_after: float | None = None,
    ) -> DeployRecord | None:
        """Deploy ``ref`` (default: the pin, else the tracked ref) of ``name``.

        ``fresh_after`` (``time.monotonic()``, default now): a fetch of the
        repository that started after it is fresh enough (see :meth:`fetch`).

        Returns the deploy record, or None when a background trigger found
        nothing to do. Never raises for a failed deploy: the record says
        ``failed`` with its stage and error (for a background trigger that
        failed like the plugin's latest record, that record, its ``repeats``
        counted up). ``pin`` (a ref, None to unpin,
        False to leave as is) is written together with the new live commit.
        ``commit`` (a full sha) is deployed as ``ref`` although ``ref`` does
        not name it yet: the push remote deploys a pushed commit before it
        moves the branch. The caller may already hold :meth:`lock_for`.
        """
        plugin = self.plugin_config(name)
        say = _timed(self, name, progress)
        explicit = trigger in EXPLICIT_TRIGGERS
        with self.lock_for(name):
            state = self.store.get_plugin(name)
            if not explicit and state is not None:
                # Re-checked under the lock: a rollback may have pinned or a
                # stop may have stopped the plugin while this trigger waited.
                if state.pin or state.state == PluginStateValue.STOPPED:
                    why = f"pinned at {state.pin}" if state.pin else "stopped"
                    self._ignoring(name, why, "plugin %s: %s; ignoring %s triggers", name, why, trigger)
                    return None
            target = ref or (state.pin if state and state.pin else None) or plugin.ref
            started = time.monotonic()
            record: DeployRecord | None = None
            if explicit:
                self._not_ignoring(name)
                record = self.store.start_deploy(
                    name, trigger=trigger, ref=target, commit=commit, host=self.config.host
                )
                signals.deploy_started.send(self, plugin=name, deploy=record)
            stage = Stage.FETCH
            try:
                resolved = self._resolve(plugin, target, fetch=fetch, commit=commit, say=say, fresh_after=fresh_after)
                if trigger in POLL_TRIGGERS:
                    signals.poll_succeeded.send(self, plugin=name, at=time.time())
                if record is not None:
                    record = self.store.update_deploy(record.id, commit=resolved.commit)
                running = state.canary_state if state is not None else None
                if resolved.commit == self._decided_commit(name, state):
                    if running is not None and (pin is not False or trigger in ROLLBACK_TRIGGERS):
                        # A rollback or pin to the live release ends the canary: it stays put.
                        self._end_canary(name, running, result=DeployResult.SUPERSEDED,
                                         reason=f"{trigger} pinned {name} at {target}")
                    raise _NothingToDo(f"{resolved.commit[:12]} is already live")
                if running is not None and resolved.commit == running.commit:
                    if not explicit:
                        return None  # its canary is deciding about it
                    raise _NothingToDo(
                        f"{resolved.commit[:12]} is in its canary (deploy {running.deploy_id}); "
                        f"`gitplug promote {name}` or `gitplug abort {name}` decides now"
                    )
                if not explicit and state is not None and resolved.commit == state.live_commit:
                    return None  # already deployed; this process converges on it by itself
                unchanged = self._unchanged_path(plugin, resolved.commit)
                if unchanged is not None:
                    if record is None:
                        if self._skipped_before(name, resolved.commit):
                            return None  # one history line per commit, not one per poll
                        record = self.store.start_deploy(name, trigger=trigger, ref=target, commit=resolved.commit)
                        signals.deploy_started.send(self, plugin=name, deploy=record)
                    raise _NothingToDo(unchanged)
                if not explicit:
                    if resolved.commit in self.store.failed_commits(name):
                        self._ignoring(
                            name, f"failed {resolved.commit}",
                            "plugin %s: %s failed before; not retrying it on %s triggers (push a fix,"
                            " or `gitplug deploy %s` to run it again)", name, resolved.commit[:12], trigger, name,
                        )
                        return None
                    self._not_ignoring(name)
                    record = self.store.start_deploy(
                        name, trigger=trigger, ref=target, commit=resolved.commit, host=self.config.host
                    )
                    signals.deploy_started.send(self, plugin=name, deploy=record)
                assert record is not None
                if plugin.verify is not None:
                    stage = Stage.SIGNATURE
                    record = self._check_signature(plugin, resolved, record, trigger, say)
                stage = Stage.STAGE
                release = self.releases.get(name, resolved.commit)
                if release is None or release.source_path != plugin.path:  # else on disk already: say nothing
                    say("stage", resolved.commit[:12])
                    release = self._stage(plugin, resolved.commit, target)
                stage = Stage.REQUIREMENTS
                self._check_requirements(plugin, release, say)
                stage = Stage.TEST
                release = self._test(plugin, release, record, explicit=explicit, say=say)
                stage = Stage.LOAD
                say("load", release.commit[:12])
                if running is not None:
                    # A new commit (or a rollback, pin, stop) supersedes the running canary.
                    self._end_canary(name, running, result=DeployResult.SUPERSEDED,
                                     reason=f"superseded by deploy {record.id} of {release.commit[:12]}")
                if self._wants_canary(plugin, state, release.commit, trigger=trigger, pin=pin):
                    assert state is not None and state.live_commit is not None
                    return self._start_canary(plugin, release, record, state.live_commit, say)
                url_prefix = self._load_verify_swap(plugin, release, say)
                stage = Stage.SWAP
                previous = state.live_commit if state else None
                fields: dict[str, t.Any] = {
                    "live_commit": release.commit,
                    # The other hosts of a fleet stage this commit themselves and
                    # check that the tree they stage is the one tested here (the
                    # commit's tree, or its directory's for a plugin with a path).
                    "live_tree": release.subtree,
                    "url_prefix": url_prefix,
                    "desired_commit": release.commit,
                    "state": PluginStateValue.LIVE,
                    "ref": plugin.ref,
                    "last_error": None,
                }
                if previous and previous != release.commit:
                    fields["previous_commit"] = previous
                if pin is not False:
                    fields["pin"] = pin
                record = self.store.finish_deploy(
                    record.id,
                    result=DeployResult.LIVE,
                    commit=release.commit,
                    duration_s=round(time.monotonic() - started, 3),
                    error=reason,
                    plugin_update=fields,
                )
                say("live", release.commit[:12])
                logger.info("plugin %s: %s is live (%s)", name, release.commit[:12], trigger)
                signals.deploy_succeeded.send(self, plugin=name, deploy=record)
                if trigger in ROLLBACK_TRIGGERS:
                    self._signal_rolled_back(name, record, previous, reason or trigger)
                else:
                    self._prune(name)  # a rollback only goes back to what is on disk
                return record
            except _NothingToDo as done:
                if record is None:
                    if pin is not False:
                        self.store.update_plugin(name, pin=pin)
                    return None
                record = self.store.finish_deploy(
                    record.id,
                    result=DeployResult.SKIPPED,
                    error=str(done),
                    duration_s=round(time.monotonic() - started, 3),
                    plugin_update={"pin": pin} if pin is not False else None,
                )
                say("skipped", str(done))
                if trigger in ROLLBACK_TRIGGERS:
                    self._signal_rolled_back(name, record, state.live_commit if state else None, reason or trigger)
                return record
            except GitplugError as exc:
                failed_stage = _stage_of(exc, stage)
                message = str(exc)
                if isinstance(exc, ReleaseModified):
                    self._discard(name, exc)  # the next deploy stages it afresh
                if record is None:
                    # A background trigger that could not even resolve.
                    return self._background_failure(name, trigger, target, failed_stage, message, started, exc, say)
                return self._fail(name, record, failed_stage, message, started, exc, say)
            except Exception as exc:  # noqa: BLE001 - a bug must still be recorded, not lost
                logger.exception("plugin %s: deploy crashed at %s", name, stage)
                message = f"internal error: {type(exc).__name__}: {exc}"
                if record is None:
                    return self._background_failure(name, trigger, target, stage, message, started, exc, say)
                return self._fail(name, record, stage, message, started, exc, say)

    def _fail(
        self,
        name: str,
        record: DeployRecord,
        stage: Stage,
        message: str,
        started: float,
        exc: BaseException,
        say: Progress,
    ) -> DeployRecord:
        record = self.store.finish_deploy(
            record.id,
            result=DeployResult.FAILED,
            stage=stage,
            error=message,
            duration_s=round(time.monotonic() - started, 3),
        )
        state = self.store.get_plugin(name)
        has_live = bool(state and state.live_commit)
        self.store.update_plugin(
            name,
            last_error=message,
            state=(state.state if has_live and state else PluginStateValue.FAILED),
        )
        say("failed", f"{stage.value}: {message}")
        logger.warning("plugin %s: deploy %d failed at %s: %s", name, record.id, stage.value, message)
        signals.deploy_failed.send(self, plugin=name, deploy=record, error=exc)
        # Failed releases count against keep_releases too (their records and logs stay).
        self._prune(name)
        return record

    def _background_failure(
        self,
        name: str,
        trigger: str,
        target: str,
        stage: Stage,
        message: str,
        started: float,
        exc: BaseException,
        say: Progress,
    ) -> DeployRecord:
        """Record a background trigger that failed before it had a record.

        When the plugin's latest record is a background failure of the same
        ref at the same stage with the same error, that record counts one
        more repeat (no new line, no second ``deploy_failed``); otherwise a
        new failed record is written like any failed deploy.
        """
        last = self.store.last_deploy(name)
        if (
            last is not None
            and last.result == DeployResult.FAILED
            and last.trigger not in EXPLICIT_TRIGGERS
            and (last.ref, last.stage, last.error) == (target, stage, message)
        ):
            record = self.store.update_deploy(last.id, repeats=last.repeats + 1, last_seen_at=now_iso())
            say("failed", f"{stage.value}: {message}")
            logger.warning(
                "plugin %s: %s failed again at %s (%d times since %s, deploy %d): %s",
                name, trigger, stage.value, record.repeats, record.started_at, record.id, message,
            )
            return record
        record = self.store.start_deploy(name, trigger=trigger, ref=target)
        signals.deploy_started.send(self, plugin=name, deploy=record)
        return self._fail(name, record, stage, message, started, exc, say)

    def _resolve(
        self,
        plugin: PluginConfig,
        ref: str,
        *,
        fetch: bool,
        say: Progress,
        commit: str | None = None,
        fresh_after: float | None = None,
    ) -> ResolvedRef:
        """Resolve ``ref``; without ``fetch``, try the local mirror first.

        With ``commit``, fetch that commit and stand it for ``ref``. Says
        ``fetch`` only when it fetches: progress lists the steps that ran.
        """
        if commit is not None:
            say("fetch", f"{redact_url(plugin.repo)} ({ref})")
            self.git.fetch(plugin.name, plugin.repo, want=commit)
            found = self.git.resolve(plugin.name, plugin.repo, commit)
            return ResolvedRef(ref, found.commit, "branch")
        if not fetch:
            try:
                return self.git.resolve(plugin.name, plugin.repo, ref)
            except (RefNotFound, FetchError):
                pass  # not known locally yet: fetch after all
        say("fetch", f"{redact_url(plugin.repo)} ({ref})")
        self.sync_hosted(plugin)  # a push may have reached another host of the fleet
        started = self.fetch(plugin.name, plugin.repo, fresh_after=fresh_after)
        for hook in self.on_fetch:
            try:
                hook(plugin.repo, started)
            except Exception:  # noqa: BLE001 - a listener never fails a deploy
                logger.exception("plugin %s: a fetch listener failed", plugin.name)
        return self.git.resolve(plugin.name, plugin.repo, ref)

    def fetch(self, name: str, url: str, *, fresh_after: float | None = None) -> float:
        """Fetch ``url`` into its mirror, sharing one fetch between the plugins of a repository.

        A fetch that *started after* ``fresh_after`` (default: now, i.e. a
        fetch waited for) sees every push made before it, so it is used
        instead of fetching again: nothing is missed, and the plugins of one
        monorepo triggered by one webhook (``fresh_after`` = its arrival)
        make one fetch. Returns when the fetch it used started (``time.monotonic()``).
        """
        asked = time.monotonic() if fresh_after is None else fresh_after
        key = self.git.mirror_path(url)
        with self._fetch_guard:
            lock = self._fetch_locks.setdefault(key, threading.Lock())
        with lock:
            last = self._fetched_at.get(key, -1.0)
            if last >= asked:
                logger.debug("plugin %s: using the fetch of %s that just finished", name, key.name)
                return last
            started = time.monotonic()
            self.git.fetch(name, url)
            self._fetched_at[key] = started
            return started

    def _unchanged_path(self, plugin: PluginConfig, commit: str) -> str | None:
        """Why ``commit`` needs no deploy: its tree under ``path`` is the live release's.

        None for a plugin without ``path``, when nothing of it is live, or
        when the directory changed (or vanished: staging reports that).
        """
        if not plugin.path:
            return None
        served = self.served_commit(plugin.name)
        live = self.releases.get(plugin.name, served) if served else None
        if live is None or live.source_path != plugin.path:
            return None
        subtree = self.git.subtree(plugin.repo, commit, plugin.path, plugin=plugin.name)
        if subtree is None or subtree != live.subtree:
            return None
        return (
            f"nothing changed under {plugin.path}/ in {commit[:12]}: the live release"
            f" {served[:12]} holds the same tree ({subtree[:12]})"
        )

    def _skipped_before(self, name: str, commit: str) -> bool:
        return any(
            r.commit == commit and r.result == DeployResult.SKIPPED for r in self.store.history(name, limit=20)
        )

    def _check_signature(
        self, plugin: PluginConfig, resolved: ResolvedRef, record: DeployRecord, trigger: str, say: Progress
    ) -> DeployRecord:
        """Refuse ``resolved`` unless it is signed as ``plugin.verify`` asks; record the signer.

        A rollback keeps the verdict of the commit's first deploy (it goes
        back to what was verified then, even if the keys changed since);
        every other trigger checks the mirror (no network) with git.
        """
        assert plugin.verify is not None
        if trigger in ROLLBACK_TRIGGERS:
            earlier = self._signer_before(plugin.name, resolved.commit)
            if earlier is not None:
                say("signature", f"{resolved.commit[:12]} signed by {earlier} (as verified at its first deploy)")
                return self.store.update_deploy(record.id, signer=earlier)
        verdict = check_signature(self.git, plugin.name, plugin.repo, resolved, plugin.verify, timeout=self.git.timeout)
        say("signature", str(verdict))
        logger.info("plugin %s: %s", plugin.name, verdict)
        return self.store.update_deploy(record.id, signer=verdict.signer)

    def _signer_before(self, name: str, commit: str) -> str | None:
        """Who signed ``commit`` when it last went live, as recorded then; None if never recorded."""
        for earlier in self.store.history(name, limit=None):
            if earlier.commit == commit and earlier.result == DeployResult.LIVE and earlier.signer:
                return earlier.signer
        return None

    def _check_requirements(self, plugin: PluginConfig, release: Release, say: Progress) -> None:
        """Fail the deploy unless the host has every distribution the release asks for.

        Checked on every deploy, also of a release whose tests passed before:
        the host's environment may have changed since.
        """
        report = check_requirements(release.path)
        say("requirements", f"{len(report.met)} met ({report.source})" if report.source else "none declared")
        if not report.ok:
            raise RequirementsNotMet(
                report.message(plugin.name, release.commit[:12]),
                plugin=plugin.name,
                commit=release.commit,
                problems=report.problems,
            )

    def _test(
        self, plugin: PluginConfig, release: Release, record: DeployRecord, *, explicit: bool, say: Progress
    ) -> Release:
        if release.test is not None and (release.test.passed or not explicit):
            if not release.test.passed:
                raise TestGateFailed(
                    f"plugin {plugin.name!r}: the tests of {release.commit[:12]} failed before"
                    f" (log: {release.test.log_path}). Push a fix, or run `gitplug deploy"
                    f" {plugin.name}` to run them again.",
                    plugin=plugin.name,
                    commit=release.commit,
                    log_path=release.test.log_path,
                )
            say("reuse", f"{release.commit[:12]} is on disk and passed its tests before; not run again")
            return release
        log_path = self.layout.deploy_log(plugin.name, record.id)
        say("test", " ".join(plugin.test) if plugin.test else "gate off")
        self.store.update_deploy(record.id, log_path=str(log_path))
        result = run_test_gate(
            release.path,
            plugin.test,
            is_default=plugin.test_is_default,
            timeout=plugin.test_timeout,
            log_path=log_path,
            secrets=self._secrets(),
            extra_pythonpath=[_GITPLUG_PARENT],
            sandbox=self.config.test_sandbox,
            test_user=self.config.test_user,
        )
        release = self.releases.record_test_result(
            plugin.name,
            release.commit,
            TestRecord(
                passed=result.passed,
                returncode=result.returncode,
                timed_out=result.timed_out,
                duration_s=round(result.duration_s, 3),
                log_path=str(result.log_path),
                ran_at=now_iso(),
            ),
        )
        if not result.passed:
            what = (
                f"timed out after {plugin.test_timeout:g} s"
                if result.timed_out
                else f"failed (exit status {result.returncode})"
            )
            tail = result.output_tail.strip().splitlines()[-5:]
            raise TestGateFailed(
                f"plugin {plugin.name!r}: tests of {release.commit[:12]} {what}. Log:"
                f" {result.log_path}; `gitplug logs {plugin.name}` shows it."
                + ("\n" + "\n".join(tail) if tail else ""),
                plugin=plugin.name,
                commit=release.commit,
                log_path=str(result.log_path),
                timed_out=result.timed_out,
                returncode=result.returncode,
            )
        return release

    def _load_verify_swap(self, plugin: PluginConfig, release: Release, say: Progress) -> str:
        """Load, verify and (with a server here) swap; returns the prefix in use."""
        spec = self.spec_for(plugin, release)
        if self.runtime is not None:
            with self.runtime.swap_lock(plugin.name):
                if plugin.name not in self.config.plugins:
                    # Removed (discovery, reload-config) while this deploy ran: the removal
                    # stopped it already, or stops it once this lock is free. Published
                    # now, it would serve with no configuration listing it.
                    logger.info("plugin %s: removed from the configuration during deploy of %s; not published",
                                plugin.name, release.commit[:12])
                    raise _NothingToDo("removed from the configuration during the deploy; not published")
                loaded = self.runtime.load(spec)
                say("swap", release.commit[:12])
                self.runtime.publish(plugin.name, loaded)
            return loaded.prefix
        # No server here (the CLI): prove the release loads and verifies in a
        # private host app; the servers watching the store swap it in.
        runtime = self._verifier()
        loaded = runtime.load(spec)
        runtime._unload_now(loaded, run_callbacks=True)
        return loaded.prefix

    def _verifier(self) -> Runtime:
        if self._verify_runtime is None:
            app = Flask("gitplug_verify")
            app.config["TESTING"] = True
            # The same code cache as the servers: verifying here warms it for them.
            self._verify_runtime = Runtime(app, leak_grace_s=0, code_cache=CodeCache(self.layout.root / "cache"))
            self._verify_runtime.reserve(self.config.api_prefix)
        return self._verify_runtime

    def _prune(self, name: str) -> None:
        state = self.store.get_plugin(name)
        protect = {c for c in (state.live_commit, state.previous_commit, state.desired_commit) if c} if state else set()
        running = state.canary_state if state else None
        if running is not None:
            protect.add(running.commit)
        if state and state.pin:
            try:
                protect.add(self.git.resolve(name, self.plugin_config(name).repo, state.pin).commit)
            except GitplugError:
                pass
        for release in self.releases.list(name):
            if release.test is not None and release.test.passed:
                protect.add(release.commit)  # the last good one, newest first
                break
        try:
            removed = self.releases.prune(name, self.config.keep_releases, protect)
        except (OSError, GitplugError) as exc:
            logger.warning("plugin %s: pruning releases failed: %s", name, exc)
            return
        if removed:
            logger.info("plugin %s: pruned %d old release(s)", name, len(removed))

    # -- canary releases (README, "Canary releases") ------------------------------

    def _wants_canary(
        self, plugin: PluginConfig, state: PluginState | None, commit: str, *, trigger: str, pin: t.Any
    ) -> bool:
        """Whether ``commit`` starts a canary instead of a swap.

        Only with ``canary`` configured, and only when another release is live
        to share the traffic with; a rollback or a pin never goes through one.
        """
        if plugin.canary is None or pin is not False or trigger in ROLLBACK_TRIGGERS:
            return False
        if state is None or state.state != PluginStateValue.LIVE or not state.live_commit:
            return False
        return state.live_commit != commit and self._decided_commit(plugin.name, state) == state.live_commit

    def _start_canary(
        self, plugin: PluginConfig, release: Release, record: DeployRecord, stable: str, say: Progress
    ) -> DeployRecord:
        """Load and verify ``release`` and let it serve its share beside ``stable``.

        The deploy stays ``running`` at stage ``canary`` until the canary is
        promoted (``live``) or rolled back (``failed`` at stage ``canary``).
        """
        assert plugin.canary is not None
        name = plugin.name
        percent = plugin.canary.percent
        spec = self.spec_for(plugin, release)
        if self.runtime is not None:
            with self.runtime.swap_lock(name):
                loaded = self.runtime.load(spec)
            self.runtime.start_canary(name, loaded, percent)
        else:
            # No server here (the CLI): prove it loads; the servers start the canary.
            runtime = self._verifier()
            loaded = runtime.load(spec)
            runtime._unload_now(loaded, run_callbacks=True)
        canary = CanaryState(
            commit=release.commit, stable_commit=stable, percent=percent, deploy_id=record.id,
            started_at=time.time(), tree=release.tree,
            base_stable=self.store.release_stats(name, stable),
            base_canary=self.store.release_stats(name, release.commit),
        )
        self.store.update_plugin(name, canary=canary.to_text(), last_error=None)
        record = self.store.update_deploy(
            record.id, stage=Stage.CANARY, canary=json.dumps(self.canary_figures(name, canary))
        )
        say("canary", f"{release.commit[:12]} serves {percent:g}% of the clients beside {stable[:12]}")
        logger.info("plugin %s: canary %s serves %g%% beside %s", name, release.commit[:12], percent, stable[:12])
        signals.canary_started.send(
            self, plugin=name, deploy=record, commit=release.commit, stable_commit=stable, percent=percent
        )
        return record

    def canary_figures(self, name: str, canary: CanaryState) -> dict[str, t.Any]:
        """Both sides' requests and errors since the canary started, summed over every worker and host."""
        return canary_figures(self.store, name, canary)

    def running_canary(self, name: str) -> CanaryState | None:
        """The canary ``name`` runs, as the store says, or None."""
        state = self.store.get_plugin(name)
        return state.canary_state if state is not None else None

    def promote(
        self, name: str, *, trigger: str = "cli", reason: str | None = None, expect: CanaryState | None = None
    ) -> DeployRecord:
        """End ``name``'s canary by making its release live for every client.

        Raises :class:`BadInput` when no canary runs (or, with ``expect``,
        another one than expected). The canary's deploy is recorded ``live`` with both sides' figures; the old release retires
        (its ``on_unload`` runs after its last request).
        """
        self.plugin_config(name)
        with self.lock_for(name):
            state = self.store.get_plugin(name)
            canary = state.canary_state if state is not None else None
            if state is None or canary is None or (expect is not None and canary != expect):
                raise self._no_canary(name, "promote")
            figures = self.canary_figures(name, canary)
            figures["decision"] = reason or f"promoted by hand ({trigger})"
            self.store.update_deploy(canary.deploy_id, canary=json.dumps(figures))
            url_prefix = state.url_prefix
            if self.runtime is not None:
                promoted = self.runtime.promote_canary(name)
                if promoted is not None:
                    url_prefix = promoted.prefix
            plugin = self.plugin_config(name)
            record = self.store.finish_deploy(
                canary.deploy_id,
                result=DeployResult.LIVE,
                commit=canary.commit,
                error=None,
                plugin_update={
                    "live_commit": canary.commit, "live_tree": canary.tree, "desired_commit": canary.commit,
                    "previous_commit": canary.stable_commit, "state": PluginStateValue.LIVE,
                    "ref": plugin.ref, "last_error": None, "canary": None, "url_prefix": url_prefix,
                },
            )
            logger.info("plugin %s: canary %s promoted: %s", name, canary.commit[:12], figures["decision"])
            signals.canary_promoted.send(
                self, plugin=name, deploy=record, commit=canary.commit, stable_commit=canary.stable_commit,
                figures=figures, reason=figures["decision"],
            )
            signals.deploy_succeeded.send(self, plugin=name, deploy=record)
            self._prune(name)
            return record

    def abort(
        self, name: str, *, trigger: str = "cli", reason: str | None = None, expect: CanaryState | None = None
    ) -> DeployRecord:
        """Roll ``name``'s canary back: every client returns to the live release.

        Raises :class:`BadInput` when no canary runs. The canary's deploy is
        recorded ``failed`` at stage ``canary`` with both sides' figures.
        """
        self.plugin_config(name)
        with self.lock_for(name):
            canary = self.running_canary(name)
            if canary is None or (expect is not None and canary != expect):
                raise self._no_canary(name, "abort")
            why = reason or f"aborted by hand ({trigger})"
            record = self._end_canary(name, canary, result=DeployResult.FAILED, reason=why)
            assert record is not None
            return record

    def _no_canary(self, name: str, verb: str) -> BadInput:
        return BadInput(
            f"plugin {name!r} runs no canary, so there is nothing to {verb}; `gitplug status` shows"
            f" each plugin's canary (README, \"Canary releases\")."
        )

    def _end_canary(
        self, name: str, canary: CanaryState, *, result: DeployResult, reason: str
    ) -> DeployRecord | None:
        """Send every client back to the live release and record the canary's end. Lock held.

        ``result`` is FAILED (rolled back: stage ``canary``) or SUPERSEDED (a
        newer deploy, a stop). Returns the canary's deploy record as finished
        (None when it had finished already, e.g. ``interrupted`` by a restart).
        """
        figures = self.canary_figures(name, canary)
        figures["decision"] = reason
        if self.runtime is not None:
            self.runtime.end_canary(name)
        update: dict[str, t.Any] = {"canary": None}
        if result == DeployResult.FAILED:
            update["last_error"] = f"canary {canary.commit[:12]} rolled back: {reason}"
        record = self.store.get_deploy(canary.deploy_id)
        if record is None or record.result != DeployResult.RUNNING:
            self.store.update_plugin(name, **update)
            return None
        self.store.update_deploy(canary.deploy_id, canary=json.dumps(figures))
        record = self.store.finish_deploy(
            canary.deploy_id,
            result=result,
            stage=Stage.CANARY,
            error=f"canary rolled back: {reason}" if result == DeployResult.FAILED else reason,
            plugin_update=update,
        )
        logger.warning("plugin %s: canary %s ended (%s): %s", name, canary.commit[:12], result.value, reason)
        signals.canary_aborted.send(
            self, plugin=name, deploy=record, commit=canary.commit, stable_commit=canary.stable_commit,
            figures=figures, reason=reason,
        )
        if result == DeployResult.FAILED:
            signals.deploy_failed.send(
                self, plugin=name, deploy=record,
                error=CanaryFailed(record.error or reason, plugin=name, commit=canary.commit),
            )
        return record

    def serve_canary(self, name: str, canary: CanaryState) -> None:
        """Start in this process the canary the store says runs (a worker converging).

        Loads the release from disk (in a fleet, fetched and staged here and
        checked against the tree the deciding host tested). Raises the
        GitplugError of the step that failed; the live release keeps serving.
        """
        assert self.runtime is not None
        plugin = self.plugin_config(name)
        release = self.releases.get(name, canary.commit)
        if release is None or getattr(self.store, "fleet", False):
            release = self._fleet_release(name, canary.commit, canary.tree)
        with self.runtime.swap_lock(name):
            loaded = self.runtime.load(self.spec_for(plugin, release))
        self.runtime.start_canary(name, loaded, canary.percent)

    # -- rollback, resume, stop, start -----------------------------------------

    def rollback(
        self,
        name: str,
        target: str,
        *,
        trigger: str = "rollback",
        progress: Progress | None = None,
        reason: str | None = None,
    ) -> DeployRecord | None:
        """Pin ``name`` at ``target`` (a ref, a sha or ``previous``) and deploy it.

        A release on disk that passed its tests is swapped in with no fetch
        and no test run.
        """
        self.plugin_config(name)
        # Under the plugin's lock from the read of "previous" to the write:
        # in a fleet, a rollback decided on another host meanwhile is seen.
        with self.lock_for(name):
            state = self.store.get_plugin(name)
            ref = target
            if target == "previous":
                if state is None or not state.previous_commit:
                    raise GitplugError(
                        f"plugin {name!r}: there is no previous release to roll back to."
                        " Name a tag or commit: `gitplug rollback NAME v1.2.0`."
                    )
                ref = state.previous_commit
            # The reason (auto-rollback's observed error rate) is recorded with the
            # deploy; rolled_back is sent from inside the deploy, under its lock,
            # so from_commit is the commit it really replaced.
            return self.deploy(name, ref=ref, trigger=trigger, pin=ref, fetch=False, progress=progress,
                               reason=reason)

    def _signal_rolled_back(self, name: str, record: DeployRecord, from_commit: str | None, reason: str) -> None:
        signals.rolled_back.send(
            self, plugin=name, deploy=record, from_commit=from_commit, to_commit=record.commit, reason=reason
        )

    def resume(self, name: str, *, trigger: str = "cli", progress: Progress | None = None) -> DeployRecord | None:
        """Unpin ``name`` and deploy its tracked ref.

        The pin is lifted even if the deploy fails: the plugin follows its
        ref again (polls and webhooks apply), still serving what it served.
        """
        plugin = self.plugin_config(name)
        # One hold of the (re-entrant) lock for both: a background trigger
        # waiting for it must not deploy the branch between unpin and deploy.
        with self.lock_for(name):
            self.store.update_plugin(name, pin=None)
            return self.deploy(name, ref=plugin.ref, trigger=trigger, progress=progress)

    def stop(self, name: str) -> None:
        """Record ``name`` as stopped; serving runtimes unmount it."""
        self.plugin_config(name)
        with self.lock_for(name):
            state = self.store.get_plugin(name)
            running = state.canary_state if state is not None else None
            if running is not None:
                self._end_canary(name, running, result=DeployResult.SUPERSEDED,
                                 reason="the plugin was stopped during its canary")
            self.store.update_plugin(name, state=PluginStateValue.STOPPED)
            if self.runtime is not None:
                self.runtime.stop(name)

    def start(self, name: str) -> None:
        """Record ``name`` as live again on the commit it had."""
        self.plugin_config(name)
        with self.lock_for(name):
            state = self.store.get_plugin(name)
            if state is None or not state.live_commit:
                raise GitplugError(
                    f"plugin {name!r} has never been deployed; run `gitplug deploy {name}`."
                )
            self.store.update_plugin(name, state=PluginStateValue.LIVE)
            if self.runtime is not None and self.runtime.live(name) is None:
                self.load_from_disk(name, state.live_commit)

    def follow(self, name: str, commit: str, tree: str | None) -> Release:
        """Serve ``commit`` of ``name``, which another host of the fleet tested.

        Fetches it into this host's mirror when it is not there yet, stages
        it, checks that its tree is ``tree`` (the one the deciding host
        tested; None skips the check), records the test verdict as the
        fleet's (the tests are not run again) and loads, verifies and swaps
        it. Raises the GitplugError of the step that failed; what this
        process serves then stays as it was. Writes nothing to the store.
        The caller holds the plugin's lock in this process (staging is safe
        across processes by itself).
        """
        assert self.runtime is not None
        plugin = self.plugin_config(name)
        release = self._fleet_release(name, commit, tree)
        try:
            self._load_verify_swap(plugin, release, lambda stage, message: None)
        except _NothingToDo as exc:  # removed from the configuration meanwhile
            raise GitplugError(f"plugin {name!r}: {exc}") from None
        return release

    def _fleet_release(self, name: str, commit: str, tree: str | None) -> Release:
        """``commit`` of ``name`` staged here (fetched if need be), its tree checked; see :meth:`follow`."""
        plugin = self.plugin_config(name)
        release = self.releases.get(name, commit)
        if release is None:
            if not self.git.has_commit(plugin.repo, commit):
                # A pushed commit is on the host that received the push: fetch it from there.
                problems = self.sync_hosted(plugin)
                try:
                    self.git.fetch(name, plugin.repo)
                except FetchError:
                    if not problems:
                        raise
                if problems and not self.git.has_commit(plugin.repo, commit):
                    raise FetchError(
                        f"plugin {name!r}: commit {commit[:12]}, live on the fleet, was pushed to "
                        f"another host and could not be fetched from it: {'; '.join(problems)}. "
                        "This host keeps its release meanwhile and fetches again",
                        plugin=name, url=plugin.repo, ref=commit,
                    )
            if not self.git.has_commit(plugin.repo, commit):
                raise RefNotFound(
                    f"plugin {name!r}: commit {commit[:12]}, live on the fleet, is not in "
                    f"{redact_url(plugin.repo)} as this host sees it (a branch force-pushed "
                    "since, or another repository); check that every host configures the same "
                    "repository. This host keeps its release meanwhile and fetches again",
                    plugin=name, url=plugin.repo, ref=commit,
                )
            # Checked before staging: a tree that did not pass is never written here.
            if plugin.path:
                staged = self.git.subtree(plugin.repo, commit, plugin.path, plugin=name) or "(none)"
            else:
                staged = self.git.commit_info(plugin.repo, commit, plugin=name).tree
            self._check_tree(name, commit, staged, tree)
            release = self._stage(plugin, commit, plugin.ref)
        self._check_tree(name, commit, release.subtree, tree)
        if release.test is None or not release.test.passed:
            release = self.releases.record_test_result(
                name, commit,
                TestRecord(passed=True, returncode=None, timed_out=False, duration_s=0.0,
                           log_path=None, ran_at=now_iso()),
            )
        return release

    @staticmethod
    def _check_tree(name: str, commit: str, here: str, tested: str | None) -> None:
        """Raise StagingError unless ``here`` is the tree id the deciding host tested.

        The tree is what a release holds: the commit's, or its ``path``
        directory's. A commit id fixes its tree (the mirror verifies object
        ids), so a difference means this host stages another part of the
        commit than the host that tested it: its configuration differs.
        """
        if tested is not None and here != tested:
            raise StagingError(
                f"plugin {name!r}: commit {commit[:12]} gives tree {here[:12]} on this host but "
                f"{tested[:12]} on the host that tested it; not serving it. Check that every "
                "host configures the same repository and path for the plugin",
                plugin=name, commit=commit,
            )

    def load_from_disk(self, name: str, commit: str, *, record_error: bool = True) -> bool:
        """Serve ``commit`` of ``name`` from its release on disk (no network).

        Returns False (and logs why) when the release is missing or fails;
        ``record_error`` also writes the failure on the plugin's state.
        """
        assert self.runtime is not None
        plugin = self.plugin_config(name)
        release = self.releases.get(name, commit)
        if release is None:
            logger.error(
                "plugin %s: release %s is not on disk (%s); it will be deployed again",
                name,
                commit[:12],
                self.releases.path_for(name, commit),
            )
            return False
        try:
            try:
                self.runtime.swap(self.spec_for(plugin, release))
            except ReleaseModified as exc:
                # Its commit is still in the mirror: stage it afresh, keep its verdict.
                logger.error("plugin %s: %s Staging %s afresh from the mirror.", name, exc,
                             commit[:12])
                self._discard(name, exc)
                fresh = self._stage(plugin, commit, release.ref)
                if release.test is not None:
                    fresh = self.releases.record_test_result(name, commit, release.test)
                self.runtime.swap(self.spec_for(plugin, fresh))
        except GitplugError as exc:
            logger.error("plugin %s: release %s did not load from disk: %s", name, commit[:12], exc)
            if record_error:
                try:
                    self.store.update_plugin(name, last_error=str(exc))
                except StateError as store_exc:
                    logger.warning("plugin %s: could not record the load error: %s", name, store_exc)
            return False
        return True

    def _stage(self, plugin: PluginConfig, commit: str, ref: str) -> Release:
        return self.releases.stage(
            plugin.name, self.git, plugin.repo, commit, ref,
            max_file_bytes=self.config.max_file_size,
            max_total_bytes=self.config.max_release_size,
            max_files=self.config.max_files,
            path=plugin.path,
        )

    def _discard(self, name: str, exc: ReleaseModified) -> None:
        """Remove a release that changed on disk; it is never loaded again as it is."""
        if exc.release:
            try:
                self.releases.remove(name, exc.release)
            except (OSError, ValueError) as error:
                logger.warning("plugin %s: could not remove the modified release %s: %s",
                               name, exc.release[:12], error)

