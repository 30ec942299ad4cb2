"""The push remote: repositories gitplug hosts, and what a push of one does.

A plugin configured with ``repo: push`` has a bare repository at
``<data_dir>/hosted/<plugin>.git`` (created on start, its ``HEAD`` on the
tracked branch). :mod:`gitplug.web.gitremote` serves it over git's smart HTTP
protocol; this module speaks the protocol (dulwich's server side) once the
web face has checked the credentials and read the request body:

* :meth:`HostedRepos.advertise` answers ``info/refs?service=...``;
* :meth:`HostedRepos.upload_pack` serves a fetch or clone;
* :meth:`HostedRepos.receive_pack` takes a push, with a pre-receive policy
  (:class:`_PushPolicy`): the pack goes into the object store first, then,
  for each ref, before it moves:

  - a force push (the old tip is not an ancestor of the new one), a moved
    tag or a deleted ref is refused unless ``allow_force_push: true``; the
    tracked branch can never be deleted;
  - the tracked branch runs the pipeline on the pushed commit (trigger
    ``push``) while its stages go back to the pusher as ``remote:`` lines
    (git's progress side band); a failed deploy rejects the update
    (``! [remote rejected] main -> main (deploy failed at test: ...)``), so
    the hosted branch only ever names a commit that went live;
  - other branches and tags are stored without a deploy.

The plugin's deploy lock (threads and processes) is held from before the
deploy until the branch has moved, so two pushes, or a push and a rollback,
never interleave. A push that finds a deploy of its plugin running waits for
it, at most ``test_timeout`` + :data:`LOCK_MARGIN_S` seconds, then is refused
with a message saying so.

Whichever process receives the push runs its deploy, under that lock; the
other processes of the host converge on the result through the state store.
"""

from __future__ import annotations

import logging
import typing as t
from collections.abc import Callable
from pathlib import Path

from dulwich.errors import NotGitRepository
from dulwich.protocol import (
    CAPABILITY_SIDE_BAND_64K,
    SIDE_BAND_CHANNEL_PROGRESS,
    ReceivableProtocol,
)
from dulwich.refs import check_ref_format
from dulwich.repo import Repo
from dulwich.server import DictBackend, ReceivePackHandler, UploadPackHandler

from ..config import GitplugConfig, PluginConfig
from ..state import DeployResult, PluginStateValue
from .peers import is_ancestor

if t.TYPE_CHECKING:
    from .pipeline import Deployer

__all__ = ["HostedRepos", "LOCK_MARGIN_S", "SERVICES"]

logger = logging.getLogger(__name__)

#: The smart-HTTP services a hosted repository answers.
SERVICES: t.Final = ("git-upload-pack", "git-receive-pack")
#: Seconds a push waits for a running deploy beyond the plugin's ``test_timeout``.
LOCK_MARGIN_S: t.Final = 120.0
_ZERO = b"0" * 40
#: Longest progress line sent to the pusher; the rest is cut (the log has it all).
_MAX_LINE = 400
#: Lines of a failure sent to the pusher at most (the test log has the rest).
_MAX_FAILURE_LINES = 25

#: dulwich >= 1.1.0 asks :meth:`_PushPolicy._on_update` before it moves each ref.
_HAS_UPDATE_HOOK: t.Final = callable(getattr(ReceivePackHandler, "_on_update", None))

Read = Callable[[int], bytes]
Write = Callable[[bytes], t.Any]


class HostedRepos:
    """The bare repositories of the ``repo: push`` plugins of one configuration."""

    def __init__(self, deployer: Deployer) -> None:
        self.deployer = deployer

    @property
    def config(self) -> GitplugConfig:
        return self.deployer.config

    def plugin(self, name: str) -> PluginConfig | None:
        """The hosted plugin called ``name``, or None (unknown or not ``repo: push``)."""
        plugin = self.config.plugins.get(name)
        return plugin if plugin is not None and plugin.hosted else None

    def ensure_all(self) -> None:
        """Create the bare repository of every hosted plugin that has none yet."""
        for plugin in self.config.plugins.values():
            if plugin.hosted:
                self.ensure(plugin)

    def ensure(self, plugin: PluginConfig) -> Path:
        """The bare repository of ``plugin``, created on first use with HEAD on its branch."""
        path = Path(plugin.repo)
        try:
            Repo(str(path)).close()
        except NotGitRepository:
            path.mkdir(parents=True, exist_ok=True)
            repo = Repo.init_bare(str(path), default_branch=plugin.ref.encode())
            repo.close()
            logger.info("plugin %s: hosting its repository at %s", plugin.name, path)
        return path

    # -- the protocol ----------------------------------------------------------------

    def advertise(self, plugin: PluginConfig, service: str, write: Write) -> None:
        """The ``info/refs?service=...`` answer: the service line, then the refs."""
        proto = ReceivableProtocol(lambda n: b"", _writer(write))
        proto.write_pkt_line(b"# service=" + service.encode("ascii") + b"\n")
        proto.write_pkt_line(None)
        handler_cls = UploadPackHandler if service == "git-upload-pack" else ReceivePackHandler
        with self._backend(plugin) as backend:
            handler_cls(backend, ["/"], proto, stateless_rpc=True, advertise_refs=True).handle()

    def upload_pack(self, plugin: PluginConfig, read: Read, write: Write) -> None:
        """Serve a fetch or clone from the request body ``read``."""
        proto = ReceivableProtocol(read, _writer(write))
        with self._backend(plugin) as backend:
            UploadPackHandler(backend, ["/"], proto, stateless_rpc=True).handle()

    def receive_pack(self, plugin: PluginConfig, read: Read, write: Write) -> None:
        """Take a push from the request body ``read``; see the module docstring."""
        if not _HAS_UPDATE_HOOK:  # an older dulwich would move refs without asking us
            raise RuntimeError("the push remote needs dulwich >= 1.1.0 (ReceivePackHandler._on_update);"
                               " upgrade it: pip install -U dulwich")
        proto = ReceivableProtocol(read, _writer(write))
        with self._backend(plugin) as backend:
            _PushPolicy(backend, ["/"], proto, stateless_rpc=True, hosted=self, plugin=plugin).handle()

    class _Backend:
        def __init__(self, path: Path) -> None:
            self.repo = Repo(str(path))

        def __enter__(self) -> DictBackend:
            return DictBackend({"/": self.repo})

        def __exit__(self, *exc: t.Any) -> None:
            self.repo.close()

    def _backend(self, plugin: PluginConfig) -> HostedRepos._Backend:
        return HostedRepos._Backend(self.ensure(plugin))


def _writer(write: Write) -> Callable[[bytes], int]:
    def write_fn(data: bytes) -> int:
        write(data)
        return len(data)

    return write_fn


class _PushPolicy(ReceivePackHandler):
    """dulwich's receive-pack with gitplug's pre-receive rules (see the module docstring).

    dulwich receives the pack into the object store, then calls
    :meth:`_on_update` for each ref before it moves the ref with a
    compare-and-swap (``set_if_equals``); a non-None answer rejects that ref.
    """

    def __init__(self, *args: t.Any, hosted: HostedRepos, plugin: PluginConfig, **kwargs: t.Any) -> None:
        super().__init__(*args, **kwargs)
        self.hosted = hosted
        self.plugin = plugin
        self._tracked = b"refs/heads/" + plugin.ref.encode()
        self._locked = False
        self._lock_refusal: bytes | None = None

    # Held around the whole update (pack, checks, deploy, ref moves) when the
    # tracked branch is among the refs: a second push of the branch waits.
    def _apply_pack(self, refs: t.Any) -> t.Iterator[tuple[bytes, bytes]]:
        lock = self.hosted.deployer.lock_for(self.plugin.name)
        if any(ref == self._tracked for _, _, ref in refs):
            wait = self.plugin.test_timeout + LOCK_MARGIN_S
            self._locked = lock.acquire(timeout=0)
            if not self._locked:
                self._say(f"gitplug: another deploy of {self.plugin.name} is running; waiting for it"
                          f" (at most {wait:g} s) ...")
                self._locked = lock.acquire(timeout=wait)
            if not self._locked:
                self._lock_refusal = (f"another deploy of {self.plugin.name} ran for over {wait:g} s;"
                                      f" push again once `gitplug status {self.plugin.name}` shows it"
                                      " finished").encode()
            else:
                # In a fleet, an earlier push may have reached another host: judge
                # this one (fast-forward, ref moved) against the newest branch.
                self.hosted.deployer.sync_hosted(self.plugin)
        try:
            yield from super()._apply_pack(refs)
        finally:
            if self._locked:
                self._locked = False
                lock.release()

    def _on_update(self, ref_name: bytes, old_sha: bytes, new_sha: bytes) -> bytes | None:
        try:
            refusal = self._check(ref_name, old_sha, new_sha)
        except Exception as exc:  # noqa: BLE001 - a bug must reject the ref, never move it
            logger.exception("plugin %s: checking the push of %s failed", self.plugin.name, ref_name)
            refusal = f"internal error: {type(exc).__name__}"
        if refusal is not None:
            logger.info("plugin %s: push of %s refused: %s", self.plugin.name, ref_name.decode(errors="replace"),
                        refusal)
            return _one_line(refusal).encode("utf-8", "replace")
        return None

    def _check(self, ref: bytes, old: bytes, new: bytes) -> str | None:
        name = self.plugin.name
        allow = self.plugin.allow_force_push
        if not ref.startswith((b"refs/heads/", b"refs/tags/")) or not check_ref_format(ref):
            return "only branches and tags can be pushed here"
        try:
            current = self.repo.refs[ref]
        except KeyError:
            current = _ZERO
        if current != old:
            # Another push moved it while this one waited for the deploy lock.
            return "the ref moved since this push started (another push); fetch, then push again"
        if new == _ZERO:
            if ref == self._tracked:
                return f"{ref.decode()} is the branch {name} deploys from; it cannot be deleted"
            if not allow:
                return "deleting a ref is refused (set allow_force_push: true for this plugin to allow it)"
            return None
        if old != _ZERO and not allow:
            if ref.startswith(b"refs/tags/"):
                return "tags do not move: push a new tag (allow_force_push: true allows moving one)"
            if not is_ancestor(self.repo, old, new):
                return "non-fast-forward: force pushes are refused (pull first, or set allow_force_push: true)"
        if ref != self._tracked:
            return None  # other branches and tags are stored, not deployed
        if self._lock_refusal is not None:
            return self._lock_refusal.decode()
        return self._deploy(new.decode())

    def _deploy(self, commit: str) -> str | None:
        deployer = self.hosted.deployer
        name = self.plugin.name
        state = deployer.store.get_plugin(name)
        if state is not None and state.pin:
            return (f"{name} is pinned at {state.pin} (a rollback); run `gitplug resume {name}` before"
                    " pushing, or push to another branch")
        if state is not None and state.state == PluginStateValue.STOPPED:
            return f"{name} is stopped; run `gitplug start {name}` before pushing"
        self._say(f"gitplug: deploying {commit[:12]} to {name} ...")
        record = deployer.deploy(name, ref=self.plugin.ref, commit=commit, trigger="push", progress=self._progress)
        if record is None:
            return "nothing was deployed; see the server log"
        if record.result == DeployResult.FAILED:
            stage = record.stage.value if record.stage else "?"
            return f"deploy failed at {stage}: {_reason(name, record.error or '?')}"
        if record.result == DeployResult.SKIPPED:
            self._say(f"gitplug: {commit[:12]} was already live")
        return None

    def _progress(self, stage: str, message: str) -> None:
        lines = [line for line in message.splitlines() if line.strip()] or [""]
        if stage == "failed":
            lines = lines[:_MAX_FAILURE_LINES] + (
                [f"... ({len(lines) - _MAX_FAILURE_LINES} more lines: `gitplug logs {self.plugin.name}`)"]
                if len(lines) > _MAX_FAILURE_LINES else [])
        self._say(f"gitplug: {stage:<8} {lines[0]}")
        for line in lines[1:]:
            self._say(f"gitplug:          {line}")

    def _say(self, line: str) -> None:
        """One ``remote:`` line on the pusher's terminal (git's progress side band)."""
        if len(line) > _MAX_LINE:
            line = line[:_MAX_LINE] + " ..."
        # Also under `quiet` (git asks for it when not verbose): like a hook's
        # output in git's own receive-pack, the deploy's lines are the answer.
        if self._client_capabilities is not None and self.has_capability(CAPABILITY_SIDE_BAND_64K):
            try:
                self.proto.write_sideband(SIDE_BAND_CHANNEL_PROGRESS, line.encode("utf-8", "replace") + b"\n")
            except OSError:
                pass  # the pusher went away; the deploy goes on and is recorded
        logger.info("plugin %s: push: %s", self.plugin.name, line)


def _reason(name: str, error: str) -> str:
    """The first sentence of a deploy's error, for the ``ng`` line (the lines above have it all)."""
    first = error.strip().splitlines()[0] if error.strip() else "?"
    first = first.removeprefix(f"plugin {name!r}: ")
    head, dot, _ = first.partition(". ")
    return head + "." if dot and len(first) > 120 else first


def _one_line(text: str) -> str:
    line = " ".join(text.split())
    return line if len(line) <= _MAX_LINE else line[:_MAX_LINE] + " ..."
