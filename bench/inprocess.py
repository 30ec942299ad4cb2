"""The figures measured inside this process: per-request cost, swap time, memory.

* ``overhead_ratio``: the same view served by a plugin route in a gitplug
  host and by a native blueprint in a plain Flask app;
* ``scale_100_ratio``: per-request time with 100 plugins mounted / with 1;
* ``swap_ms_p50``, ``swap_ms_p99``: :meth:`Runtime.swap` of the example
  plugin from a staged release directory (import, register, compile
  templates, ``on_load``, health check, publish);
* ``rss_growth_mib_1000``: resident memory after reload cycles of the
  example plugin, each swap followed by two requests served by the new release.

Requests are direct WSGI calls (:func:`bench.fixtures.wsgi_call`). Cases are
interleaved: every round runs each case once, in rotating order, so drift of
a noisy machine (CPU frequency, neighbours) hits all cases alike; a round's
figure is the median per-request time, and the headline is the median of the
per-round ratios.
"""

from __future__ import annotations

import gc
import logging
import statistics
import tempfile
import threading
import time
import typing as t
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import MappingProxyType

from flask import Flask

from gitplug import GitPlug
from gitplug.runtime.loaded import ReleaseSpec
from gitplug.runtime.swap import Runtime

from .figures import Figure, FigureSpec, Target, Unmeasurable, figure, median_ci, spread
from .fixtures import (
    environ_for,
    native_blueprint,
    overhead_apps,
    stage_example,
    write_synthetic_plugin,
    wsgi_call,
)

__all__ = [
    "OVERHEAD",
    "SCALE",
    "SWAP_P50",
    "SWAP_P99",
    "RSS",
    "measure_overhead",
    "measure_scale",
    "measure_swap",
    "measure_rss",
    "measure_default_leak_timers",
]

logger = logging.getLogger(__name__)

OVERHEAD: FigureSpec = ("overhead_ratio", "plugin route / native blueprint, per request", "ratio", Target("<=", 1.05))
SCALE: FigureSpec = ("scale_100_ratio", "per request, 100 plugins / 1 plugin", "ratio", Target("<=", 1.1))
SWAP_P50: FigureSpec = ("swap_ms_p50", "load + verify + swap of the example plugin, median", "ms", Target("<", 50))
SWAP_P99: FigureSpec = ("swap_ms_p99", "load + verify + swap of the example plugin, p99", "ms", Target("<", 50))
RSS: FigureSpec = ("rss_growth_mib_1000", "RSS growth over 1000 reload cycles", "MiB", Target("<", 5))

_WsgiCase = tuple[Callable[..., t.Any], Sequence[dict[str, t.Any]]]
_EXAMPLE_CONFIG = MappingProxyType({"GREETING": "Hello from the bench"})


def interleaved(cases: Mapping[str, _WsgiCase], *, rounds: int, per_round: int, warmup: int = 200) -> dict[str, list[float]]:
    """Per-round median request time (µs) of every case, cases interleaved.

    Every case's responses are checked (2xx) during the warm-up.
    """
    names = list(cases)
    for name, (app, templates) in cases.items():
        for i in range(warmup):
            _, status, body = wsgi_call(app, templates[i % len(templates)])
            if not status.startswith("2"):
                raise Unmeasurable(f"case {name!r}: {templates[0].get('PATH_INFO')} answered {status}: {body[:200]!r}")
    medians: dict[str, list[float]] = {name: [] for name in names}
    gc.collect()
    for r in range(rounds):
        order = names[r % len(names):] + names[: r % len(names)]
        if r % 2:
            order.reverse()
        for name in order:
            app, templates = cases[name]
            count = len(templates)
            times = [wsgi_call(app, templates[i % count])[0] for i in range(per_round)]
            medians[name].append(statistics.median(times) / 1000.0)
    return medians


def _ratio_figure(spec: FigureSpec, medians: Mapping[str, list[float]], num: str, den: str, **kwargs: t.Any) -> Figure:
    ratios = [a / b for a, b in zip(medians[num], medians[den])]
    s = spread(ratios)
    detail = {f"{name}_us_p50": statistics.median(values) for name, values in medians.items()}
    detail.update(kwargs.pop("detail", {}))
    return figure(spec, value=s.p50, n=s.n, p10=s.p10, p90=s.p90, ci95=median_ci(ratios), detail=detail, **kwargs)


# --------------------------------------------------------------------------- per request


def measure_overhead(*, rounds: int, per_round: int) -> list[Figure]:
    """``overhead_ratio``; also the cost gitplug adds to the host's own routes."""
    with tempfile.TemporaryDirectory(prefix="gitplug-bench-") as tmp:
        plain, host, gp = overhead_apps(Path(tmp))
        cases: dict[str, _WsgiCase] = {
            "native": (plain.wsgi_app, [environ_for("/native/item/7")]),
            "plugin": (host.wsgi_app, [environ_for("/plug/item/7")]),
            "host_native": (host.wsgi_app, [environ_for("/native/item/7")]),
            "native_page": (plain.wsgi_app, [environ_for("/native/page")]),
            "plugin_page": (host.wsgi_app, [environ_for("/plug/page")]),
        }
        try:
            medians = interleaved(cases, rounds=rounds, per_round=per_round)
        finally:
            _unmount_all(gp)
        host_ratio = spread([a / b for a, b in zip(medians["host_native"], medians["native"])])
        page_ratio = spread([a / b for a, b in zip(medians["plugin_page"], medians["native_page"])])
    return [
        _ratio_figure(
            OVERHEAD, medians, "plugin", "native",
            baseline="the same view in a native blueprint of a plain Flask app",
            note=f"{rounds} interleaved rounds x {per_round} requests; minimal JSON view (worst case)",
            detail={"host_route_ratio_p50": host_ratio.p50, "host_route_ratio_p10": host_ratio.p10,
                    "host_route_ratio_p90": host_ratio.p90,
                    "host_route_ratio_is": "native blueprint in the gitplug host / in the plain app",
                    "page_ratio_p50": page_ratio.p50, "page_ratio_p10": page_ratio.p10,
                    "page_ratio_p90": page_ratio.p90,
                    "page_ratio_is": "a view rendering a template (30 items, a filter, url_for):"
                                     " plugin / native blueprint"},
        )
    ]


def measure_scale(*, plugins: int, rounds: int, per_round: int) -> list[Figure]:
    """``scale_100_ratio``: requests spread over 100 mounted plugins vs 1 plugin.

    The same comparison for native blueprints in a plain app (100 round-robin
    vs 1) is measured alongside: it is what a bigger working set costs any
    Flask app, gitplug or not.
    """
    with tempfile.TemporaryDirectory(prefix="gitplug-bench-") as tmp:
        root = Path(tmp)
        one, many = Flask("bench_scale_one"), Flask("bench_scale_many")
        gp_one, gp_many = GitPlug(one), GitPlug(many)
        gp_one.runtime.swap(_synthetic_spec(root, 0, "one"))
        started = time.perf_counter()
        for i in range(plugins):
            gp_many.runtime.swap(_synthetic_spec(root, i, "many"))
        mount_s = time.perf_counter() - started
        native_one, native_many = Flask("bench_native_one"), Flask("bench_native_many")
        native_one.register_blueprint(native_blueprint("b0"), url_prefix="/b0")
        for i in range(plugins):
            native_many.register_blueprint(native_blueprint(f"b{i}"), url_prefix=f"/b{i}")
        cases: dict[str, _WsgiCase] = {
            "one": (one.wsgi_app, [environ_for("/p0/item/7")]),
            "many": (many.wsgi_app, [environ_for(f"/p{i}/item/7") for i in range(plugins)]),
            "many_same_plugin": (many.wsgi_app, [environ_for("/p0/item/7")]),
            "native_one": (native_one.wsgi_app, [environ_for("/b0/item/7")]),
            "native_many": (native_many.wsgi_app, [environ_for(f"/b{i}/item/7") for i in range(plugins)]),
        }
        try:
            medians = interleaved(cases, rounds=rounds, per_round=per_round)
        finally:
            _unmount_all(gp_one)
            _unmount_all(gp_many)
    same = spread([a / b for a, b in zip(medians["many_same_plugin"], medians["one"])])
    native = spread([a / b for a, b in zip(medians["native_many"], medians["native_one"])])
    return [_ratio_figure(
        SCALE, medians, "many", "one",
        baseline="the same host with 1 plugin mounted",
        note=(f"{plugins} plugins, requests round-robin over all of them; {rounds} rounds x {per_round};"
              f" a plain Flask app with {plugins} native blueprints, round-robin: {native.p50:.3f}"),
        detail={"same_plugin_ratio_p50": same.p50, "native_100_blueprints_ratio_p50": native.p50,
                "native_100_blueprints_ratio_p10": native.p10, "native_100_blueprints_ratio_p90": native.p90,
                "mount_all_s": mount_s, "plugins": plugins},
    )]


def _unmount_all(gp: GitPlug) -> None:
    """Stop every plugin and wait for the unloads: the next figure starts from a clean heap."""
    for name in list(gp.runtime.snapshot.releases):
        gp.runtime.stop(name)
    gp.runtime.wait_idle(timeout=30)
    gp.shutdown()
    gc.collect()


def _synthetic_spec(root: Path, i: int, tag: str) -> ReleaseSpec:
    path = write_synthetic_plugin(root / tag / f"p{i}", f"p{i}")
    return ReleaseSpec(name=f"p{i}", path=path, release_id=f"bench-{tag}-{i}", url_prefix=f"/p{i}")


# --------------------------------------------------------------------------- swap and memory


class _ExampleHost:
    """A host app, a runtime and two staged releases of the example plugin to alternate."""

    def __init__(self, root: Path, *, leak_grace_s: float) -> None:
        self.app = Flask("bench_swap_host")
        self.app.config["SECRET_KEY"] = "bench"
        if leak_grace_s == 0:
            self.runtime = Runtime(self.app, leak_grace_s=0)
            self.gp: GitPlug | None = None
        else:
            self.gp = GitPlug(self.app)  # the shipped default (30 s leak-report timer)
            self.runtime = self.gp.runtime
        self.releases = stage_example(root, ["1.0.0", "1.1.0"])
        self.index = environ_for("/hello/")
        self.api = environ_for("/hello/api/release")
        self.swaps = 0

    def spec(self, i: int) -> ReleaseSpec:
        path = self.releases[i % len(self.releases)]
        return ReleaseSpec(name="hello", path=path, release_id=path.name, url_prefix="/hello",
                           commit=path.name, config=_EXAMPLE_CONFIG)

    def swap(self) -> float:
        """One timed swap (seconds); then, untimed, wait for the old release's unload."""
        spec = self.spec(self.swaps)
        started = time.perf_counter()
        self.runtime.swap(spec)
        elapsed = time.perf_counter() - started
        self.swaps += 1
        if not self.runtime.wait_idle(timeout=30):
            raise Unmeasurable("the retired release was not unloaded within 30 s of a swap")
        return elapsed

    def serve(self, *, check: bool) -> None:
        """Two requests served by the live release (a page with templates, a JSON call)."""
        for template in (self.index, self.api):
            _, status, body = wsgi_call(self.app.wsgi_app, template)
            if check and not status.startswith("200"):
                raise Unmeasurable(f"the example plugin answered {status} after a swap: {body[:200]!r}")
        if check:
            live = self.runtime.live("hello")
            if live is None or body.find(live.release_id.encode()) < 0:
                raise Unmeasurable("after a swap the example plugin did not answer from the new release")

    def close(self) -> None:
        self.runtime.stop("hello")
        self.runtime.wait_idle(timeout=30)
        if self.gp is not None:
            self.gp.shutdown()
        else:
            self.runtime.shutdown()


class _FullGcWatch:
    """Counts full (generation 2) garbage collections and their duration."""

    def __init__(self) -> None:
        self.count = 0
        self.seconds = 0.0
        self._started = 0.0

    def __call__(self, phase: str, info: Mapping[str, t.Any]) -> None:
        if info.get("generation") != 2:
            return
        if phase == "start":
            self._started = time.perf_counter()
        else:
            self.count += 1
            self.seconds += time.perf_counter() - self._started

    def __enter__(self) -> _FullGcWatch:
        gc.callbacks.append(self)
        return self

    def __exit__(self, *exc: object) -> None:
        gc.callbacks.remove(self)


def measure_swap(*, samples: int, warmup: int = 5) -> list[Figure]:
    """``swap_ms_p50`` and ``swap_ms_p99`` (also used by ``restart_ratio``)."""
    gc_pauses: list[float] = []
    with tempfile.TemporaryDirectory(prefix="gitplug-bench-") as tmp:
        host = _ExampleHost(Path(tmp), leak_grace_s=0)
        try:
            for _ in range(warmup):
                host.swap()
                host.serve(check=True)
            times = []
            with _FullGcWatch() as watch:
                for _ in range(samples):
                    count, seconds = watch.count, watch.seconds
                    times.append(host.swap() * 1000.0)
                    if watch.count != count:
                        gc_pauses.append((watch.seconds - seconds) * 1000.0)
                    host.serve(check=True)
        finally:
            host.close()
    s = spread(times)
    note = (f"{samples} swaps alternating two releases, each checked by a request; Runtime.swap only"
            f" (no directory copy), leak-report timer off; {len(gc_pauses)} swaps ran a full GC")
    detail = {"min": s.min, "max": s.max, "mean": statistics.fmean(times),
              "swaps_with_full_gc": len(gc_pauses),
              "full_gc_ms_p50": statistics.median(gc_pauses) if gc_pauses else None}
    return [
        figure(SWAP_P50, value=s.p50, n=s.n, p10=s.p10, p90=s.p90, note=note, detail=detail),
        figure(SWAP_P99, value=s.p99, n=s.n, p10=s.p10, p90=s.p90, note=note, detail=detail),
    ]


def _rss_mib() -> float:
    try:
        import psutil
    except ImportError as exc:
        raise Unmeasurable("psutil is not installed; run `pip install -e '.[test]'`") from exc
    gc.collect()
    return float(psutil.Process().memory_info().rss) / 2**20


def measure_rss(*, warmup: int, cycles: int, window: int) -> list[Figure]:
    """``rss_growth_mib_1000``: growth over ``cycles`` after ``warmup``, scaled to 1000."""
    with tempfile.TemporaryDirectory(prefix="gitplug-bench-") as tmp:
        host = _ExampleHost(Path(tmp), leak_grace_s=0)
        try:
            for _ in range(warmup):
                host.swap()
                host.serve(check=False)
            host.serve(check=True)
            start = _rss_mib()
            threads_before = threading.active_count()
            series = [start]
            for i in range(1, cycles + 1):
                host.swap()
                host.serve(check=False)
                if i % window == 0:
                    series.append(_rss_mib())
            host.serve(check=True)
            end = _rss_mib()
            leaks = host.runtime.report_leaks()
            threads_after = threading.active_count()
        finally:
            host.close()
    scale = 1000.0 / cycles
    growth = (end - start) * scale
    per_window = [(b - a) * 1000.0 / window for a, b in zip(series, series[1:])]
    s = spread(per_window) if per_window else None
    note = f"{warmup} warm-up + {cycles} cycles (swap + 2 requests), leak-report timer off"
    if cycles != 1000:
        note += f"; growth scaled x{scale:g} to 1000 cycles"
    return [
        figure(
            RSS, value=growth, n=len(per_window), p10=s.p10 if s else None, p90=s.p90 if s else None,
            note=note,
            detail={
                "cycles": cycles, "warmup": warmup, "rss_start_mib": start, "rss_end_mib": end,
                "checkpoint_every": window, "series_mib": series,
                "spread_is": f"growth of each {window}-cycle window, scaled to 1000 cycles",
                "releases_still_reachable": len(leaks), "threads_before": threads_before,
                "threads_after": threads_after,
            },
        )
    ]


def measure_default_leak_timers(*, cycles: int) -> dict[str, t.Any]:
    """What the shipped 30 s leak-report timer costs at a high reload rate.

    Run last: the timers it starts fire (a full ``gc.collect`` each) 30 s later.
    """
    with tempfile.TemporaryDirectory(prefix="gitplug-bench-") as tmp:
        host = _ExampleHost(Path(tmp), leak_grace_s=30.0)
        try:
            host.swap()
            start, threads0, t0 = _rss_mib(), threading.active_count(), time.perf_counter()
            times = []
            for _ in range(cycles):
                times.append(host.swap() * 1000.0)
                host.serve(check=False)
            end, threads1, elapsed = _rss_mib(), threading.active_count(), time.perf_counter() - t0
        finally:
            host.close()
    return {
        "cycles": cycles,
        "elapsed_s": elapsed,
        "rss_growth_mib": end - start,
        "threads_alive_before": threads0,
        "threads_alive_after": threads1,
        "swap_ms_p50": statistics.median(times),
    }
