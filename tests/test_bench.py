"""Tests of the bench itself: ``python -m pytest -q tests/test_bench.py`` (about 10 s).

Real things only: the statistics on known samples, the load generator
against a real HTTP server on 127.0.0.1, and ``python -m bench`` as a
subprocess.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import pytest

from bench.figures import Figure, Target, Unmeasurable, guarded, median_ci, quantile, render_table, spread
from bench.fixtures import REPO_ROOT
from bench.loadgen import run_load


def test_quantiles_interpolate_and_sort_timeouts_last() -> None:
    assert quantile([1, 2, 3, 4, 5], 0.5) == 3
    assert quantile([1, 2, 3, 4, 5], 0.1) == pytest.approx(1.4)
    assert quantile([5, 1], 0.9) == pytest.approx(4.6)
    s = spread([0.1, 0.2, math.inf])
    assert (s.n, s.p50, s.max) == (3, 0.2, math.inf)
    assert math.isinf(s.p99)
    with pytest.raises(ValueError, match="quantile of no samples"):
        quantile([], 0.5)


def test_targets() -> None:
    assert Target("<=", 1.05).met(1.05) is True
    assert Target("<", 50).met(50) is False
    assert Target(">=", 20).met(35.0) is True
    assert Target(">=", 0.95).met(None) is None
    assert str(Target("<", 0.5)) == "< 0.5"


def test_figure_json_shape_and_infinity() -> None:
    fig = Figure(key="convergence_s_p99", title="t", unit="s", target=Target("<", 0.5),
                 value=math.inf, n=3, p10=0.1, p90=math.inf, detail={"samples": [0.1, math.inf]})
    data = fig.to_json()
    assert set(data) == {"value", "unit", "n", "p10", "p90", "target", "met", "ci95", "settled", "baseline",
                         "note", "error", "detail"}
    assert data["value"] == "inf" and data["met"] is False
    assert data["detail"] == {"samples": [0.1, "inf"]}
    json.dumps(data)  # strict JSON: no Infinity


def test_median_interval_is_two_order_statistics_with_95_percent_coverage() -> None:
    # n = 10: x_2 .. x_9 covers 1 - 2 * P(B(10, 1/2) < 2) = 97.9 %; x_3 .. x_8 only 89 %.
    assert median_ci([10, 1, 9, 2, 8, 3, 7, 4, 6, 5]) == (2, 9)
    assert median_ci(list(range(1, 21))) == (6, 15)  # n = 20: 95.9 %
    assert median_ci([1, 2, 3, 4, 5]) is None  # at best 93.8 %: no 95 % interval from 5 samples
    assert median_ci([1, 2, 3, 4, 5, 6]) == (1, 6)  # 96.9 %


def test_a_verdict_is_settled_only_when_the_whole_interval_agrees() -> None:
    def fig(ci: tuple[float, float] | None, value: float = 1.6) -> Figure:
        return Figure(key="restart_ratio", title="t", unit="ratio", target=Target(">=", 20), value=value,
                      n=10, p10=1.2, p90=1.8, ci95=ci)

    assert fig((1.3, 1.8)).settled is True  # missed, whatever the noise
    assert fig((18.0, 23.0), value=21.0).settled is False  # met, but noise could flip it
    assert fig(None).settled is None
    table = render_table([fig((18.0, 23.0), value=21.0), fig((1.3, 1.8))], {"mode": "quick"})
    # Columns: figure, value, unit, target (">=", "20"), met.
    assert [line.split()[5] for line in table.splitlines() if line.startswith("restart_ratio")] == ["~yes", "NO"]
    assert "straddles the target" in table
    unjudged = Figure(key="release_rss_mib", title="t", unit="MiB", target=None, value=0.2, n=1)
    assert (unjudged.met, unjudged.settled, unjudged.to_json()["target"]) == (None, None, None)
    assert "release_rss_mib  0.200  MiB   -" in render_table([unjudged], {"mode": "quick"})


def test_guarded_says_why_a_figure_is_missing() -> None:
    def broken() -> list[Figure]:
        raise Unmeasurable("gunicorn is not installed; run `pip install -e '.[test]'`")

    (fig,) = guarded([("restart_ratio", "t", "ratio", Target(">=", 20))], broken)
    assert fig.value is None and fig.met is None
    assert fig.to_json()["error"] == "gunicorn is not installed; run `pip install -e '.[test]'`"
    table = render_table([fig], {"mode": "quick"})
    assert "restart_ratio: NOT MEASURED: gunicorn is not installed" in table


class _Quiet(WSGIRequestHandler):
    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def http_port() -> Iterator[int]:
    def app(environ: dict[str, object], start_response: object) -> list[bytes]:
        start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "2")])  # type: ignore[operator]
        return [b"ok"]

    server = make_server("127.0.0.1", 0, app, server_class=WSGIServer, handler_class=_Quiet)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield server.server_port
    server.shutdown()
    server.server_close()


def test_loadgen_stops_at_its_request_cap(http_port: int) -> None:
    result = run_load(http_port, "/x", duration=10, connections=2, max_requests=50)
    assert result.requests == 50 and result.ok == 50 and result.errors == 0
    assert result.elapsed_s < 10
    with pytest.raises(ValueError, match="path must start with '/'"):
        run_load(http_port, "x", duration=1, connections=1, max_requests=1)


def test_loadgen_stops_at_its_duration(http_port: int) -> None:
    result = run_load(http_port, "/x", duration=0.3, connections=1, max_requests=10**9)
    assert 0.3 <= result.elapsed_s < 3 and result.ok > 0


def test_cli_json_for_one_figure() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--json", "--only", "overhead_ratio"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120, check=True,
    )
    data = json.loads(out.stdout)
    assert set(data) == {"meta", "overhead_ratio"}
    fig = data["overhead_ratio"]
    assert fig["error"] is None and fig["n"] == 20 and fig["value"] > 0.5
    assert fig["p10"] <= fig["value"] <= fig["p90"]
    assert data["meta"]["mode"] == "quick" and data["meta"]["nproc"] >= 1


def test_cli_refuses_unknown_figures() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "bench", "--only", "latency"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=60, check=False,
    )
    assert out.returncode == 2
    assert "unknown figure(s) latency; choose from overhead_ratio" in out.stderr


_FAILING_MEASUREMENT = r"""
import json, os, sys
sys.modules["psutil"] = None          # as on a machine without psutil: import fails
from pathlib import Path
from bench.figures import Unmeasurable
from bench.server import Gunicorn, wait_for

log = Path(sys.argv[1])
with Gunicorn("bench.apps:plain_restart_host()", log_path=log, workers=2, gitplug_hooks=False,
              env={"GITPLUG_BENCH_VERSION_FILE": sys.argv[2]}) as server:
    print(json.dumps({"master": server.proc.pid, "port": server.port}), flush=True)
    wait_for(lambda: server.get("/hello/api/release").status == 200, timeout=60, what="the server")
    try:
        server.worker_pids()              # the measurement fails here
    except Unmeasurable as exc:
        print(json.dumps({"error": str(exc)}), flush=True)
        raise SystemExit(3)
"""


def test_a_failed_measurement_leaves_no_server_running(tmp_path: Path) -> None:
    """When a measurement fails (here: psutil missing), the bench's gunicorn stops too."""
    psutil = pytest.importorskip("psutil")
    version = tmp_path / "version"
    version.write_text("1.0.0")
    done = subprocess.run(
        [sys.executable, "-c", _FAILING_MEASUREMENT, str(tmp_path / "gunicorn.log"), str(version)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
    )
    lines = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert done.returncode == 3, (done.stdout, done.stderr)
    master = lines[0]["master"]
    assert "psutil is not installed" in lines[1]["error"]
    # Nothing of that server is left: not the master, not a worker in its group. A
    # member SIGKILLed an instant ago may still be dying (or a zombie awaiting its
    # reaper) on a loaded machine: what counts is that none lives on.
    def living() -> list[int]:
        found = []
        for proc in psutil.process_iter(["pid", "status"]):
            if _pgid(proc.pid) == master and proc.info["status"] != psutil.STATUS_ZOMBIE:
                found.append(proc.pid)
        return found

    deadline = time.monotonic() + 10
    while (leftovers := living()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not leftovers, f"processes of the bench's gunicorn left running: {leftovers}"


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except OSError:
        return None
