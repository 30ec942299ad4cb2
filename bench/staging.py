"""Staging a big repository: first staging, after a one-file change, and push to live.

A repository of the example plugin plus vendored modules, 5,000 files in all
(:data:`FILES`, about 7 MiB), built with the ``git`` command, which the
baseline needs anyway.

``stage_full_ratio``: per round, in rotating order, ``git archive <commit> |
tar -x`` into a new directory and :meth:`ReleaseStore.stage` of the same
commit into a new, empty releases directory (the first staging of a plugin,
nothing to reuse; its one ``syncfs`` included: tar does not sync). Before each
case, untimed, ``sync`` writes back what the other left dirty, so the
staging's ``syncfs`` does not pay for tar's data; and an untimed extraction
of the same commit first takes the slowdown that follows the previous
round's deletions, which would otherwise fall on whichever case runs first.
The round's sample is the staging's time / the archive's; the figure is
their median.

``stage_incr_s``: per round, a commit changing one file is fetched (not
timed) and staged into the releases directory that holds the previous
commit's release: only the changed blob is written, every other file is a
hard link of the previous release's (README "Data directory and state").

``push_to_live_s_p50``: the gitplug server of :class:`bench.site.Site`
(``gunicorn -w 2``, ``test: false``) serving that repository; per sample, a
commit changing one file and a signed webhook; the clock runs from sending
the webhook until the last worker has published the new commit (fetch,
stage, load with its manifest check, swap).
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import time
from pathlib import Path

from gitplug.deploy.gitsource import GitSource
from gitplug.deploy.releases import ReleaseStore

from .figures import Figure, FigureSpec, Target, Unmeasurable, figure, spread
from .fixtures import set_version
from .server import wait_for
from .site import LivePlan, Site, served

__all__ = ["STAGE_FULL", "STAGE_INCR", "PUSH_LIVE", "FILES", "measure_staging", "measure_push_to_live"]

logger = logging.getLogger(__name__)

STAGE_FULL: FigureSpec = ("stage_full_ratio", "first staging of a 5,000-file tree / git archive | tar -x",
                          "ratio", Target("<=", 1.5))
STAGE_INCR: FigureSpec = ("stage_incr_s", "staging after a one-file change, 5,000 files", "s", Target("<", 0.3))
PUSH_LIVE: FigureSpec = ("push_to_live_s_p50", "webhook -> every worker serving a one-file change, 5,000 files",
                         "s", Target("<", 1))

#: Files in the repository, the example plugin's included.
FILES = 5000
_PER_DIR = 100
#: What a vendored module holds (about 1.4 KiB): the size of ordinary source files.
_MODULE = '"""Vendored module {d}/{f} (bench.staging)."""\n\n' + "".join(
    f"def function_{n}(value):\n    return value * {n} + {{f}}\n\n" for n in range(24))
_TIMEOUT = 120.0


def _git(repo: Path, *args: str, stdin: bytes | None = None) -> str:
    env = {"PATH": os.environ.get("PATH", os.defpath), "HOME": str(repo), "LC_ALL": "C",
           "GIT_CONFIG_NOSYSTEM": "1", "GIT_AUTHOR_NAME": "bench", "GIT_AUTHOR_EMAIL": "bench@localhost",
           "GIT_COMMITTER_NAME": "bench", "GIT_COMMITTER_EMAIL": "bench@localhost"}
    done = subprocess.run(["git", "-C", str(repo), *args], input=stdin, capture_output=True,
                          env=env, timeout=_TIMEOUT, check=False)
    if done.returncode != 0:
        raise Unmeasurable(f"git {' '.join(args)} failed in {repo}: {done.stderr.decode(errors='replace')[:300]}")
    return done.stdout.decode().strip()


def _require_git() -> None:
    if shutil.which("git") is None or shutil.which("tar") is None:
        raise Unmeasurable("the staging figures need the git and tar commands (the baseline is "
                           "git archive | tar -x); install them")


def grow_repo(repo: Path) -> str:
    """Add vendored modules to ``repo`` (a git work tree) up to :data:`FILES` files; commit; return the sha."""
    tracked = len(_git(repo, "ls-files").splitlines())
    missing = FILES - tracked
    for n in range(missing):
        d, f = divmod(n, _PER_DIR)
        path = repo / "vendor" / f"pkg{d:03}" / f"mod{f:03}.py"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(_MODULE.format(d=d, f=f))
    _git(repo, "add", "-A")
    _git(repo, "commit", "-q", "-m", f"{missing} vendored modules")
    return _git(repo, "rev-parse", "HEAD")


def one_file_change(repo: Path, version: str) -> str:
    """Commit a new ``__version__`` of the example plugin (one changed file); return the sha."""
    set_version(repo, version)
    _git(repo, "commit", "-q", "-a", "-m", f"hello {version}")
    return _git(repo, "rev-parse", "HEAD")


def _archive(repo: Path, commit: str, into: Path) -> float:
    """Seconds for ``git archive commit | tar -x -C into`` (no shell)."""
    into.mkdir(parents=True)
    env = {"PATH": os.environ.get("PATH", os.defpath), "LC_ALL": "C", "HOME": str(repo), "GIT_CONFIG_NOSYSTEM": "1"}
    t0 = time.perf_counter()
    archive = subprocess.Popen(["git", "-C", str(repo), "archive", commit], stdout=subprocess.PIPE, env=env)
    try:
        extract = subprocess.run(["tar", "-x", "-C", str(into)], stdin=archive.stdout, timeout=_TIMEOUT,
                                 check=False, capture_output=True)
    finally:
        assert archive.stdout is not None
        archive.stdout.close()
        archive.wait(timeout=_TIMEOUT)
    elapsed = time.perf_counter() - t0
    if archive.returncode != 0 or extract.returncode != 0:
        raise Unmeasurable(f"git archive | tar -x failed: {extract.stderr.decode(errors='replace')[:300]}")
    return elapsed


def _stage(store: ReleaseStore, source: GitSource, repo: Path, commit: str) -> float:
    t0 = time.perf_counter()
    store.stage("big", source, str(repo), commit, "main", max_files=FILES + 100)
    return time.perf_counter() - t0


def measure_staging(workdir: Path, *, rounds: int) -> list[Figure]:
    """``stage_full_ratio`` and ``stage_incr_s`` (see the module docstring)."""
    _require_git()
    from .fixtures import init_repo

    root = workdir / "staging"
    repo = root / "repo"
    root.mkdir(parents=True)
    init_repo(repo, "1.0.0")
    commit = grow_repo(repo)
    source = GitSource(root / "mirrors")
    source.fetch("big", str(repo))
    files = len(_git(repo, "ls-tree", "-r", "--name-only", commit).splitlines())
    ratios, archives, fulls, incrs = [], [], [], []
    # The incremental side: a releases directory that holds the previous commit's release.
    kept = ReleaseStore(root / "kept")
    _stage(kept, source, repo, commit)
    for k in range(rounds):
        scratch = ReleaseStore(root / f"full-{k}")
        # Untimed: the first tree created after the previous round's deletions
        # (10,000 files) takes 3-4 times as long, whichever case it is (0.5-0.65 s
        # for git archive | tar -x where the next takes 0.15 s). Without this the
        # case that runs first pays for it, and rounds alternate the order.
        os.sync()
        _archive(repo, commit, root / f"settle-{k}")
        for case in ("archive", "stage") if k % 2 == 0 else ("stage", "archive"):
            # Untimed: the other case's dirty pages are written back first, or the
            # stager's one syncfs would pay for tar's data too.
            os.sync()
            if case == "archive":
                archives.append(_archive(repo, commit, root / f"archive-{k}"))
            else:
                fulls.append(_stage(scratch, source, repo, commit))
        ratios.append(fulls[-1] / archives[-1])
        scratch.prune("big", keep=0, protect=[])
        shutil.rmtree(root / f"archive-{k}")
        shutil.rmtree(root / f"settle-{k}")
        shutil.rmtree(root / f"full-{k}")
        changed = one_file_change(repo, f"1.0.{k + 1}")
        source.fetch("big", str(repo))
        os.sync()
        incrs.append(_stage(kept, source, repo, changed))
        kept.prune("big", keep=2, protect=[])
    r, i = spread(ratios), spread(incrs)
    return [
        figure(STAGE_FULL, value=r.p50, n=r.n, p10=r.p10, p90=r.p90,
               baseline=f"git archive | tar -x of the same commit ({files} files), same round",
               note="per round: ReleaseStore.stage into an empty releases directory / git archive | tar -x",
               detail={"files": files, "archive_s": archives, "stage_full_s": fulls,
                       "archive_s_p50": spread(archives).p50, "stage_full_s_p50": spread(fulls).p50}),
        figure(STAGE_INCR, value=i.p50, n=i.n, p10=i.p10, p90=i.p90,
               note=f"{files} files, one changed since the release already staged; fetch not timed",
               detail={"files": files, "samples_s": incrs}),
    ]


def measure_push_to_live(plan: LivePlan, workdir: Path) -> Figure:
    """``push_to_live_s_p50``: signed webhook of a one-file change until every worker serves it."""
    _require_git()
    site = Site(workdir, plan.workers, name="big-site")
    site.first_commit = site.last_commit = grow_repo(site.repo)
    samples, firsts = [], []
    with site.server as server:
        wait_for(lambda: server.check_alive() or served(server, "commit") == site.first_commit,
                 timeout=180, what=f"the first poll to deploy the {FILES}-file repository")
        site.wait_all_workers(site.first_commit, 0.0, "every worker to serve the first commit")
        for k in range(plan.webhook_samples):
            commit = one_file_change(site.repo, f"1.2.{k}")
            wall0, t0 = time.time(), time.perf_counter()
            site.webhook(commit)
            wait_for(lambda c=commit: server.check_alive() or served(server, "commit") == c,
                     timeout=60, what=f"commit {commit[:12]} to go live after its webhook")
            firsts.append(time.perf_counter() - t0)
            site.wait_all_workers(commit, wall0, f"every worker to serve {commit[:12]}")
            loads = site.loads(commit, wall0)
            samples.append(max(loads[pid] for pid in server.worker_pids() if pid in loads) - wall0)
    s = spread(samples)
    return figure(
        PUSH_LIVE, value=s.p50, n=s.n, p10=s.p10, p90=s.p90,
        note=(f"gunicorn -w {plan.workers} gthread, local repo of {FILES} files, test gate off, one changed "
              "file per webhook; until the last worker publishes it"),
        detail={"samples_s": samples, "first_response_s_p50": spread(firsts).p50, "max_s": s.max},
    )
