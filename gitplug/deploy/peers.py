"""The push remote in a fleet: a host fetches a hosted repository from the other hosts.

A ``git push`` reaches one host of a fleet; the others hold none of its
objects. Every host announces where the others reach it (``host_url``, in
its heartbeat) and serves its hosted repositories at the push remote's
endpoint (``<api_prefix>/git/<plugin>.git``). A host that needs what its
own copy may lack (the commit the fleet made live, the tag a rollback
names, the branch a CLI deploy resolves) first fetches every live peer's
copy into its own (:func:`sync_from_peers`):

* only objects it lacks are transferred (nothing when it is up to date);
* a branch or tag it lacks is created; one of its branches moves when the
  peer's is a fast-forward of it; with ``allow_force_push: true`` a peer's
  rewritten branch or moved tag is taken as well; deletions are not copied.

Each host's hosted branch, like the receiving host's, therefore only ever
names a commit that went live in the fleet, and a later push may reach any
host. The peers authenticate the fetch with the plugin's ``push_token``
(else the ``admin_token``): every host reads the same secrets.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

from dulwich.objects import Commit, Tag
from dulwich.repo import Repo

from ..config import GitplugConfig, PluginConfig
from ..errors import GitplugError, redact_url
from ..state import HOST_LOST_AFTER_S, HostInfo
from .gitsource import GitSource

__all__ = ["Peer", "is_ancestor", "live_peers", "sync_from_peers"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Peer:
    """Another live host of the fleet and the URL it announced (``host_url``)."""

    host_id: str
    url: str

    def remote(self, config: GitplugConfig, plugin: str) -> str:
        """The push remote of ``plugin`` on this peer."""
        return f"{self.url}{config.api_prefix}/git/{plugin}.git"


def live_peers(config: GitplugConfig, hosts: list[HostInfo], *, now: float | None = None
               ) -> tuple[list[Peer], list[str]]:
    """The other live hosts that announce a ``host_url``, and the ids of those that announce none."""
    now = time.time() if now is None else now
    peers, silent = [], []
    for host in hosts:
        if host.host_id == config.host or now - host.heartbeat_at > HOST_LOST_AFTER_S:
            continue
        if host.url:
            peers.append(Peer(host.host_id, host.url))
        else:
            silent.append(host.host_id)
    return peers, silent


def sync_from_peers(git: GitSource, config: GitplugConfig, plugin: PluginConfig,
                    hosts: list[HostInfo]) -> list[str]:
    """Bring ``plugin``'s hosted repository here up to date with the other hosts' copies.

    ``hosts`` is the store's list (this host's own entry is skipped, as are
    lost hosts). Never raises for a peer that cannot be reached: returns
    one line per problem (``"web-2 (http://...): could not connect"``, or
    a host that announces no ``host_url``), empty when every peer answered.
    """
    peers, silent = live_peers(config, hosts)
    problems = [f"{host_id}: announces no host_url, so its pushes cannot be fetched; set "
                "host_url on every host (README, \"Deploy with git push\")" for host_id in silent]
    password = plugin.push_token or config.admin_token
    if peers and password is None:
        return problems + ["no push_token (or admin_token) is set for fetching from the other "
                           f"hosts; set push_token for {plugin.name} on every host"]
    repo_path = Path(plugin.repo)
    for peer in peers:
        remote = peer.remote(config, plugin.name)
        try:
            refs = git.fetch_into(plugin.name, remote, repo_path, password=password)
        except GitplugError as exc:
            logger.warning("plugin %s: could not fetch from host %s: %s", plugin.name, peer.host_id, exc)
            problems.append(f"{peer.host_id} ({redact_url(remote)}): {exc}")
            continue
        moved = _adopt_refs(repo_path, refs, force=plugin.allow_force_push)
        if moved:
            logger.info("plugin %s: from host %s: %s", plugin.name, peer.host_id, ", ".join(moved))
    return problems


def _adopt_refs(repo_path: Path, refs: dict[bytes, bytes], *, force: bool) -> list[str]:
    """Create or move the refs of ``repo_path`` that ``refs`` (a peer's) are ahead on; see the module."""
    moved = []
    with Repo(str(repo_path)) as repo:
        for ref, sha in sorted(refs.items()):
            try:
                here = repo.refs[ref]
            except KeyError:
                if repo.refs.add_if_new(ref, sha):
                    moved.append(f"{ref.decode()} {sha.decode()[:12]}")
                continue
            if here == sha:
                continue
            ahead = ref.startswith(b"refs/heads/") and is_ancestor(repo, here, sha)
            # Compare-and-swap: a push to this host meanwhile wins.
            if (ahead or force) and repo.refs.set_if_equals(ref, here, sha):
                moved.append(f"{ref.decode()} {here.decode()[:12]} -> {sha.decode()[:12]}")
    return moved


def is_ancestor(repo: Repo, old: bytes, new: bytes) -> bool:
    """Whether commit ``old`` is reachable from ``new`` (moving ``old`` to ``new`` fast-forwards)."""
    store = repo.object_store
    seen: set[bytes] = set()
    todo = [new]
    while todo:
        sha = todo.pop()
        if sha == old:
            return True
        if sha in seen or sha not in store:
            continue
        seen.add(sha)
        obj = store[sha]
        while isinstance(obj, Tag):
            obj = store[obj.object[1]]
        if isinstance(obj, Commit):
            todo.extend(obj.parents)
    return False
