"""Where the time goes: cProfile of the paths behind the bench's figures.

    python -m bench.profiling plugin       [--requests 20000] [--top 25]
    python -m bench.profiling page         [--requests 20000]
    python -m bench.profiling host_native  [--requests 20000]
    python -m bench.profiling scale        [--requests 20000]
    python -m bench.profiling swap         [--requests 40]    # swaps
    python -m bench.profiling rollback     [--requests 40]    # rollbacks

``plugin``, ``page``, ``host_native`` and ``scale`` serve the same view
(:data:`bench.fixtures.VIEW_SOURCE`) ``--requests`` times through the measured
path and its baseline, in alternating chunks, and print per function the
difference in own time per request (µs), with the calls per request on each
side: a plugin route / a native blueprint in the gitplug host, each against a
native blueprint in a plain Flask app (``overhead_ratio``; ``page`` is the
templated page of ``detail.page_ratio_p50``); requests
round-robin over 100 plugins against one plugin (``scale_100_ratio``).

``swap`` profiles ``Runtime.swap`` of the example plugin plus the old
release's unload (``swap_ms_*``, ``rss_growth_mib_1000``); ``rollback``
profiles ``GitPlug.rollback`` between two commits of a local git repository
with the SQLite store and the test gate off, which is what each swap of
``throughput_ratio_during_swaps`` runs in the worker that takes the API call.
Both print the functions with the largest cumulative time per operation.

cProfile inflates call-heavy code: read the columns as "where", not as exact
costs; ``python -m bench --only KEY`` gives the unprofiled figure.
"""

from __future__ import annotations

import argparse
import cProfile
import logging
import pstats
import tempfile
import typing as t
from collections.abc import Sequence
from pathlib import Path

from flask import Flask

from gitplug import GitPlug
from gitplug.runtime.loaded import ReleaseSpec

from .fixtures import (
    commit_version,
    environ_for,
    init_repo,
    overhead_apps,
    write_synthetic_plugin,
    wsgi_call,
)

__all__ = ["profile_cases", "compare", "cumulative", "main"]

logger = logging.getLogger(__name__)

_Key = tuple[str, int, str]


def profile_cases(
    cases: Sequence[tuple[t.Callable[..., t.Any], Sequence[str]]], requests: int, chunk: int = 250
) -> list[dict[_Key, tuple[int, float]]]:
    """Per case, ``{(file, line, function): (calls, own seconds)}`` for ``requests`` GETs.

    A case is a WSGI app and the paths it is asked for, round-robin. The
    cases are profiled in alternating chunks (one profiler each), so a noisy
    machine slows them alike.
    """
    templates = [[environ_for(path) for path in paths] for _, paths in cases]
    for (app, _), envs in zip(cases, templates):
        for i in range(500):
            wsgi_call(app, envs[i % len(envs)])
    profilers = [cProfile.Profile() for _ in cases]
    done = 0
    while done < requests:
        n = min(chunk, requests - done)
        for profiler, (app, _), envs in zip(profilers, cases, templates):
            count = len(envs)
            profiler.enable()
            for i in range(done, done + n):
                wsgi_call(app, envs[i % count])
            profiler.disable()
        done += n
    out = []
    for profiler in profilers:
        stats = pstats.Stats(profiler).stats  # type: ignore[attr-defined]
        out.append({key: (value[1], value[2]) for key, value in stats.items()})
    return out


def _label(key: _Key) -> str:
    file, line, func = key
    for marker in ("site-packages/", "/gitplug/", "/bench/"):
        if marker in file:
            file = ("gitplug/" if marker == "/gitplug/" else "bench/" if marker == "/bench/" else "") + file.split(marker, 1)[1]
            break
    return f"{file}:{line}({func})" if line else func


def compare(case: dict[_Key, tuple[int, float]], base: dict[_Key, tuple[int, float]], requests: int, top: int) -> str:
    """A table of the functions that cost the case the most extra time per request."""
    rows = []
    for key in set(case) | set(base):
        c_calls, c_time = case.get(key, (0, 0.0))
        b_calls, b_time = base.get(key, (0, 0.0))
        diff_us = (c_time - b_time) / requests * 1e6
        per_call = c_time / c_calls * 1e6 if c_calls else 0.0
        rows.append((diff_us, c_calls / requests, b_calls / requests, per_call, _label(key)))
    rows.sort(reverse=True)
    total_case = sum(v[1] for v in case.values()) / requests * 1e6
    total_base = sum(v[1] for v in base.values()) / requests * 1e6
    lines = [
        f"profiled per request: case {total_case:.1f} µs, native {total_base:.1f} µs,"
        f" difference {total_case - total_base:+.1f} µs (cProfile-inflated)",
        "",
        f"{'extra µs/req':>12}  {'calls/req':>9}  {'native':>6}  {'µs/call':>7}  function",
    ]
    for diff_us, c_per, b_per, per_call, label in rows[:top]:
        lines.append(f"{diff_us:12.2f}  {c_per:9.2f}  {b_per:6.2f}  {per_call:7.2f}  {label}")
    gitplug_own = sum(v[1] for k, v in case.items() if "/gitplug/" in k[0]) / requests * 1e6
    lines.append("")
    lines.append(f"own time in gitplug/ functions: {gitplug_own:.1f} µs per request")
    return "\n".join(lines)


def cumulative(profiler: cProfile.Profile, operations: int, top: int) -> str:
    """The functions with the largest cumulative time, per operation (ms)."""
    stats = pstats.Stats(profiler).stats  # type: ignore[attr-defined]
    rows = sorted(((v[3], v[2], v[1], k) for k, v in stats.items()), reverse=True)
    lines = [f"{'cum ms/op':>9}  {'own ms/op':>9}  {'calls/op':>8}  function"]
    for cum, own, calls, key in rows[:top]:
        lines.append(f"{cum / operations * 1e3:9.2f}  {own / operations * 1e3:9.2f}  {calls / operations:8.1f}  {_label(key)}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.profiling", description=__doc__.split("\n\n")[0])
    parser.add_argument("case", choices=("plugin", "page", "host_native", "scale", "swap", "rollback"))
    parser.add_argument("--requests", type=int, default=None,
                        help="requests per case (default 20000), or swaps/rollbacks (default 40)")
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="gitplug-bench-") as tmp:
        if args.case in ("swap", "rollback"):
            count = args.requests or 40
            run = _swap if args.case == "swap" else _rollback
            title, profiler = run(Path(tmp), count)
            print(f"{title}, {count} operations\n")
            print(cumulative(profiler, count, args.top))
            return
        requests = args.requests or 20000
        if args.case == "scale":
            title, (base, case) = _scale(Path(tmp), requests)
        else:
            title, (base, case) = _overhead(Path(tmp), args.case, requests)
    print(f"{title}, {requests} requests each\n")
    print(compare(case, base, requests, args.top))


def _swap(tmp: Path, count: int) -> tuple[str, cProfile.Profile]:
    from .inprocess import _ExampleHost

    host = _ExampleHost(tmp, leak_grace_s=0)
    try:
        for _ in range(5):
            host.swap()
        profiler = cProfile.Profile()
        profiler.enable()
        for _ in range(count):
            host.swap()  # Runtime.swap, then waits for the reaper's unload
        profiler.disable()
    finally:
        host.close()
    return "Runtime.swap of the example plugin + the old release's unload (reaper thread not profiled)", profiler


def _rollback(tmp: Path, count: int) -> tuple[str, cProfile.Profile]:
    from gitplug.config import config_from_mapping

    repo = tmp / "repo" / "hello"
    first = init_repo(repo, "1.0.0")
    config = config_from_mapping(
        {"data_dir": str(tmp / "data"), "poll_interval": 3600,
         "plugins": {"hello": {"repo": str(repo), "ref": "main", "test": False,
                               "config": {"GREETING": "Hello from the bench"}}}},
        base_dir=tmp,
    )
    app = Flask("bench_rollback_host")
    app.config["SECRET_KEY"] = "bench"
    gp = GitPlug(app, config=config)
    try:
        for ref in (first, commit_version(repo, "1.1.0")):
            record = gp.deploy("hello", ref=ref)
            if record is None or record.result.value != "live":
                raise RuntimeError(f"setting up the rollback profile: deploying {ref[:12]} gave {record}")
        commits = [first, ref]
        for i in range(4):
            gp.rollback("hello", commits[i % 2])
        profiler = cProfile.Profile()
        profiler.enable()
        for i in range(count):
            gp.rollback("hello", commits[i % 2])
        profiler.disable()
        gp.runtime.wait_idle()
    finally:
        gp.shutdown()
    return "GitPlug.rollback alternating two commits on disk (what the API runs per swap)", profiler


def _overhead(tmp: Path, which: str, requests: int) -> tuple[str, list[dict[_Key, tuple[int, float]]]]:
    plain, host, gp = overhead_apps(tmp)
    path = {"plugin": "/plug/item/7", "page": "/plug/page"}.get(which, "/native/item/7")
    native = "/native/page" if which == "page" else "/native/item/7"
    try:
        return (
            f"case {which} ({path}) vs native blueprint in a plain Flask app ({native})",
            profile_cases([(plain.wsgi_app, [native]), (host.wsgi_app, [path])], requests),
        )
    finally:
        gp.shutdown()


def _scale(tmp: Path, requests: int, plugins: int = 100) -> tuple[str, list[dict[_Key, tuple[int, float]]]]:
    one, many = Flask("bench_scale_one"), Flask("bench_scale_many")
    gp_one, gp_many = GitPlug(one), GitPlug(many)
    for gp, count, tag in ((gp_one, 1, "one"), (gp_many, plugins, "many")):
        for i in range(count):
            path = write_synthetic_plugin(tmp / tag / f"p{i}", f"p{i}")
            gp.runtime.swap(ReleaseSpec(name=f"p{i}", path=path, release_id=f"{tag}-{i}", url_prefix=f"/p{i}"))
    try:
        return (
            f"case: {plugins} plugins, round-robin, vs 1 plugin",
            profile_cases([(one.wsgi_app, ["/p0/item/7"]),
                           (many.wsgi_app, [f"/p{i}/item/7" for i in range(plugins)])], requests),
        )
    finally:
        gp_one.shutdown()
        gp_many.shutdown()


if __name__ == "__main__":
    main()
