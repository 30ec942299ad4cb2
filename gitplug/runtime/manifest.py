"""The manifest of a release: what was staged, so a changed release is never loaded.

Staging writes ``.gitplug/manifest.json`` into the release before renaming it
into place; :func:`verify_release` checks the release against it before the
loader imports anything (README "Guarantees": immutable releases). Every
entry outside ``.gitplug/`` is listed with its kind (file, executable,
symlink), its size, its git blob id (or a symlink's target) and the inode
number and ``ctime`` it had once staged.

The check is cheap: one ``lstat`` per entry. ``ctime`` cannot be set by a
process (any write, chmod, rename over or link changes it), so a file whose
inode and ctime are unchanged has unchanged contents; only a file whose
ctime changed (a copied or restored data directory, a ``chmod`` back and
forth) is hashed again. A missing, extra or different entry refuses the
release with :class:`~gitplug.errors.ReleaseModified`.

Releases of one plugin share the files they have in common (hard links into
the deployer's object store, README "Data directory and state"), so a later
staging that links a file changes that inode's ``ctime`` in every release
holding it. The manifest names the store's *ledger* (``ledger``, a path
relative to the release): for each shared inode, the blob id it holds and the
``ctime`` it had when the deployer last knew its content to be that blob. A
file whose inode is the staged one and whose ``ctime`` is the ledger's is
unchanged as well; any write or chmod since moves its ``ctime`` past both, so
it is hashed and refused in every release sharing it.

The manifest sits inside the release: it protects against accidents and
against tests that cannot write there (``test_user``, ``test_sandbox:
bwrap``), not against a process running as the server's own user, which
can rewrite the manifest too (README "Security model").
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import stat
import typing as t
from pathlib import Path

from ..errors import ReleaseModified

__all__ = ["MANIFEST_NAME", "make_manifest", "manifest_of", "verify_release", "git_blob_id",
           "read_ledger"]

logger = logging.getLogger(__name__)

#: The manifest's file name inside a release's ``.gitplug/`` directory.
MANIFEST_NAME = "manifest.json"
_METADATA_DIR = ".gitplug"
_FORMAT = 2  # 2: may name a ledger of shared inodes
_CHUNK = 1024 * 1024


def git_blob_id(path: str | Path) -> str:
    """The git blob id (hex sha-1) of the file at ``path``, read in chunks."""
    size = os.lstat(path).st_size
    digest = hashlib.sha1(f"blob {size}\0".encode(), usedforsecurity=False)
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _walk(root: Path) -> t.Iterator[tuple[str, os.stat_result]]:
    """``(relative path, lstat)`` of every entry under ``root`` but ``.gitplug/`` and dirs."""
    stack = [("", str(root))]
    while stack:
        prefix, directory = stack.pop()
        with os.scandir(directory) as scan:
            for item in scan:
                rel = prefix + item.name
                if rel == _METADATA_DIR:
                    continue
                info = item.stat(follow_symlinks=False)
                if stat.S_ISDIR(info.st_mode):
                    stack.append((rel + "/", item.path))
                else:
                    yield rel, info


def read_ledger(path: str | Path) -> dict[str, list[t.Any]]:
    """The ledger at ``path``: ``{str(inode): [blob id, ctime_ns, ...]}``; empty if absent or damaged.

    A damaged or missing ledger costs time (files are hashed), never safety.
    """
    try:
        with open(path, "rb") as handle:
            data = json.loads(handle.read())
        inodes = data["inodes"]
        return inodes if isinstance(inodes, dict) else {}
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        logger.warning("ignoring the unreadable ledger %s (%s): shared files are hashed", path, exc)
        return {}


def make_manifest(root: Path, blob_ids: t.Mapping[str, str], *,
                  ledger: str | None = None) -> dict[str, t.Any]:
    """The manifest of the staged tree at ``root``; ``blob_ids`` maps paths to git blob ids.

    ``ledger``: the path, relative to ``root``, of the ledger of the inodes
    this release shares with others (see the module docstring).
    """
    entries: dict[str, list[t.Any]] = {}
    for rel, info in _walk(root):
        if stat.S_ISLNK(info.st_mode):
            entries[rel] = ["l", info.st_size, os.readlink(root / rel), 0, 0]
        else:
            kind = "x" if info.st_mode & 0o111 else "f"
            entries[rel] = [kind, info.st_size, blob_ids[rel], info.st_ino, info.st_ctime_ns]
    manifest: dict[str, t.Any] = {"format": _FORMAT, "entries": entries}
    if ledger is not None:
        manifest["ledger"] = ledger
    return manifest


def manifest_of(files: t.Mapping[str, tuple[os.stat_result, str]],
                links: t.Mapping[str, str], *, ledger: str | None = None) -> dict[str, t.Any]:
    """The manifest of a tree its stager knows entry by entry, without walking it.

    ``files`` maps each file's path to its ``lstat`` (taken after the last
    link to its inode was made) and its git blob id; ``links`` maps each
    symlink's path to its target. Equal to :func:`make_manifest` of that tree.
    """
    entries: dict[str, list[t.Any]] = {}
    for rel, (info, blob) in files.items():
        kind = "x" if info.st_mode & 0o111 else "f"
        entries[rel] = [kind, info.st_size, blob, info.st_ino, info.st_ctime_ns]
    for rel, target in links.items():
        entries[rel] = ["l", len(os.fsencode(target)), target, 0, 0]
    manifest: dict[str, t.Any] = {"format": _FORMAT, "entries": entries}
    if ledger is not None:
        manifest["ledger"] = ledger
    return manifest


def verify_release(root: Path, *, plugin: str, release_id: str) -> None:
    """Refuse (ReleaseModified) a release whose files differ from its manifest.

    A release staged before manifests existed (``release.json`` format 1)
    passes with a warning.
    """
    root = Path(root)
    meta_dir = root / _METADATA_DIR

    def refuse(why: str) -> ReleaseModified:
        return ReleaseModified(
            f"plugin {plugin!r}: release {release_id[:12]} at {root} differs from what was "
            f"staged: {why}. Something changed it on disk after staging; it is not loaded. "
            f"Delete {root} and deploy again (it is staged afresh from git), and find out what "
            "wrote there (README \"Security model\").", plugin=plugin, release=release_id)

    try:
        manifest = json.loads((meta_dir / MANIFEST_NAME).read_text("utf-8"))
        entries: dict[str, list[t.Any]] = manifest["entries"]
        ledger_path = manifest.get("ledger")
    except FileNotFoundError:
        try:
            legacy = json.loads((meta_dir / "release.json").read_text("utf-8")).get("format") == 1
        except (OSError, ValueError, AttributeError):
            legacy = False
        if legacy:
            logger.warning("plugin %s: release %s predates release manifests; loading it "
                           "unverified", plugin, release_id[:12])
            return
        raise refuse(f"its manifest {meta_dir / MANIFEST_NAME} is missing") from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise refuse(f"its manifest {meta_dir / MANIFEST_NAME} is unreadable ({exc})") from None
    ledger: dict[str, list[t.Any]] | None = None
    seen = 0
    try:
        for rel, info in _walk(root):
            entry = entries.get(rel)
            if entry is None:
                raise refuse(f"{rel!r} was added")
            seen += 1
            kind, size, ident, ino, ctime = entry
            if stat.S_ISLNK(info.st_mode):
                if kind != "l" or os.readlink(root / rel) != ident:
                    raise refuse(f"{rel!r} was replaced by a different symlink")
                continue
            if not stat.S_ISREG(info.st_mode) or kind == "l":
                raise refuse(f"{rel!r} changed its type")
            if (kind == "x") != bool(info.st_mode & 0o111) or info.st_size != size:
                raise refuse(f"{rel!r} was modified (its size or mode changed)")
            if (info.st_ino, info.st_ctime_ns) == (ino, ctime):
                continue
            if info.st_ino == ino and isinstance(ledger_path, str):
                # Shared with a later release, which moved its ctime by linking it.
                if ledger is None:
                    ledger = read_ledger(root / ledger_path)
                shared = ledger.get(str(ino))
                if isinstance(shared, list) and shared[:2] == [ident, info.st_ctime_ns]:
                    continue
            if git_blob_id(root / rel) != ident:
                raise refuse(f"{rel!r} was modified")
    except OSError as exc:
        raise refuse(f"it could not be read ({exc})") from None
    if seen != len(entries):
        missing = sorted(set(entries) - {rel for rel, _ in _walk(root)})
        raise refuse(f"{missing[0]!r} was removed" if missing else "entries were removed")
