"""``release_rss_mib``: what loaded releases cost in resident memory.

Each measurement runs in a fresh Python process (``python -m bench.memory
child ...``, started by :func:`measure_release_rss`), so no figure measured
before it in the bench's own process (heaps grown and freed, caches) changes
its RSS. A child imports everything first, builds its app, serves its routes
once (templates compiled and cached on both sides, as in a serving worker),
then reports RSS (psutil, after ``gc.collect()``) and exits.

* ``release``: a host with ``GitPlug(app)`` and the example plugin live; then
  ``--count`` more releases of it (each its own staged directory) loaded and
  verified beside it with :meth:`Runtime.load`, which is what a swap holds
  while it builds the next release. The figure is the RSS growth per
  additional release.
* ``plugins`` / ``blueprints``: a gitplug host with ``--count`` synthetic
  one-view plugins mounted, and a plain Flask app with the same number of
  native blueprints serving the same views (:mod:`bench.fixtures`).

Child processes get an argument list, a deadline and a minimal environment.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import typing as t
from collections.abc import Sequence
from pathlib import Path

from .figures import Figure, FigureSpec, Unmeasurable, figure
from .fixtures import REPO_ROOT

__all__ = ["RELEASE_RSS", "measure_release_rss", "main"]

#: No target in the issue that asked for it: reported, not judged.
RELEASE_RSS: FigureSpec = ("release_rss_mib", "RSS of one more loaded release of the example plugin", "MiB", None)

_CHILD_TIMEOUT_S = 300


def measure_release_rss(*, runs: int, releases: int, plugins: int) -> list[Figure]:
    """``release_rss_mib``, plus 100 plugins vs 100 native blueprints, ``runs`` child processes each.

    The three kinds of child alternate run by run.
    """
    results: dict[str, list[dict[str, float]]] = {"release": [], "plugins": [], "blueprints": []}
    with tempfile.TemporaryDirectory(prefix="gitplug-bench-mem-") as tmp:
        for run in range(runs):
            for kind, count in (("release", releases), ("plugins", plugins), ("blueprints", plugins)):
                results[kind].append(_child(kind, count, Path(tmp) / f"{kind}-{run}"))
    per_release = [r["grown_mib"] / releases for r in results["release"]]
    value = statistics.median(per_release)

    def med(kind: str, key: str) -> float:
        return statistics.median(r[key] for r in results[kind])

    plugins_rss, blueprints_rss = med("plugins", "rss_mib"), med("blueprints", "rss_mib")
    plugins_grown, blueprints_grown = med("plugins", "grown_mib"), med("blueprints", "grown_mib")
    return [figure(
        RELEASE_RSS, value=value, n=len(per_release),
        p10=min(per_release), p90=max(per_release),
        baseline=f"{plugins} plugins vs {plugins} native blueprints of a plain Flask app (same views)",
        note=(f"{releases} more releases of the example plugin loaded beside the live one, per release;"
              f" {plugins} plugins {plugins_rss:.1f} MiB RSS vs {plugins} native blueprints"
              f" {blueprints_rss:.1f} MiB ({plugins_rss / blueprints_rss:.2f}x); median of {runs}"
              " fresh process(es) each"),
        detail={
            "per_release_mib": per_release,
            "live_example_rss_mib": med("release", "before_mib"),
            "rss_100_plugins_mib": plugins_rss,
            "rss_100_blueprints_mib": blueprints_rss,
            "rss_ratio_100": plugins_rss / blueprints_rss,
            "per_plugin_mib": plugins_grown / plugins,
            "per_blueprint_mib": blueprints_grown / plugins,
            "host_before_plugins_mib": med("plugins", "before_mib"),
            "app_before_blueprints_mib": med("blueprints", "before_mib"),
            "spread_is": "min and max over the runs",
            "count": plugins,
            "releases": releases,
        },
    )]


def _child(kind: str, count: int, root: Path) -> dict[str, float]:
    """Run one child measurement; its last stdout line is a JSON object."""
    root.mkdir(parents=True)
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "PYTHONPATH": str(REPO_ROOT),
        "TMPDIR": str(root),
        "LANG": os.environ.get("LANG", "C.UTF-8"),
    }
    argv = [sys.executable, "-m", "bench.memory", "child", kind, "--count", str(count), "--root", str(root)]
    try:
        proc = subprocess.run(argv, cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                              timeout=_CHILD_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired as exc:
        raise Unmeasurable(f"the {kind} memory child did not finish within {_CHILD_TIMEOUT_S} s") from exc
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        raise Unmeasurable(f"the {kind} memory child failed (exit {proc.returncode}): {proc.stderr.strip()[-800:]}")
    return t.cast(dict[str, float], json.loads(lines[-1]))


# --------------------------------------------------------------------------- in the child


def _rss_mib() -> float:
    import psutil

    gc.collect()
    return float(psutil.Process().memory_info().rss) / 2**20


def _serve_all(app: t.Any, paths: Sequence[str]) -> None:
    from .fixtures import environ_for, wsgi_call

    for path in paths:
        _, status, body = wsgi_call(app.wsgi_app, environ_for(path))
        if not status.startswith("200"):
            raise SystemExit(f"{path} answered {status}: {body[:200]!r}")


def _child_release(count: int, root: Path) -> dict[str, float]:
    from flask import Flask

    from gitplug.runtime.loaded import ReleaseSpec
    from gitplug.runtime.swap import Runtime

    from .fixtures import stage_example

    dirs = stage_example(root, [f"1.0.{i}" for i in range(count + 1)])
    app = Flask("bench_rss_host")
    app.config["SECRET_KEY"] = "bench"
    runtime = Runtime(app, leak_grace_s=0)

    def spec(path: Path) -> ReleaseSpec:
        return ReleaseSpec(name="hello", path=path, release_id=path.name, url_prefix="/hello",
                           commit=path.name, config={"GREETING": "Hello from the bench"})

    runtime.swap(spec(dirs[0]))
    _serve_all(app, ["/hello/", "/hello/api/release"])
    before = _rss_mib()
    held = [runtime.load(spec(path)) for path in dirs[1:]]
    after = _rss_mib()
    if len(held) != count:
        raise SystemExit(f"loaded {len(held)} releases, not {count}")
    return {"before_mib": before, "rss_mib": after, "grown_mib": after - before}


def _child_plugins(count: int, root: Path) -> dict[str, float]:
    from flask import Flask

    from gitplug import GitPlug
    from gitplug.runtime.loaded import ReleaseSpec

    from .fixtures import write_synthetic_plugin

    app = Flask("bench_rss_plugins")
    gp = GitPlug(app)
    dirs = [write_synthetic_plugin(root / f"p{i}", f"p{i}") for i in range(count)]
    before = _rss_mib()
    for i, path in enumerate(dirs):
        gp.runtime.swap(ReleaseSpec(name=f"p{i}", path=path, release_id=f"rss-{i}", url_prefix=f"/p{i}"))
    _serve_all(app, [f"/p{i}/{view}" for i in range(count) for view in ("item/7", "page")])
    after = _rss_mib()
    return {"before_mib": before, "rss_mib": after, "grown_mib": after - before}


def _child_blueprints(count: int, root: Path) -> dict[str, float]:
    from flask import Flask

    import gitplug  # noqa: F401 - imported on both sides, so only what is mounted differs

    from .fixtures import native_blueprint

    app = Flask("bench_rss_blueprints")
    before = _rss_mib()
    for i in range(count):
        app.register_blueprint(native_blueprint(f"b{i}"), url_prefix=f"/b{i}")
    _serve_all(app, [f"/b{i}/{view}" for i in range(count) for view in ("item/7", "page")])
    after = _rss_mib()
    return {"before_mib": before, "rss_mib": after, "grown_mib": after - before}


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.memory", description="one release_rss_mib child")
    parser.add_argument("role", choices=("child",))
    parser.add_argument("kind", choices=("release", "plugins", "blueprints"))
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--root", type=Path, required=True)
    args = parser.parse_args(argv)
    run = {"release": _child_release, "plugins": _child_plugins, "blueprints": _child_blueprints}[args.kind]
    print(json.dumps(run(args.count, args.root)))


if __name__ == "__main__":
    main()
