"""A bounded HTTP load generator for 127.0.0.1, run as its own process.

    python -m bench.loadgen --port 8000 --path /hello/api/greeting --duration 5 \\
        --connections 4 --max-requests 200000

Each of ``--connections`` threads keeps one HTTP/1.1 connection open and
sends ``GET`` requests back to back. It stops by itself after ``--duration``
seconds or ``--max-requests`` requests, whichever comes first, and prints one
JSON object: ``{"requests", "ok", "errors", "elapsed_s", "rps", "statuses",
"t0", "bin_s", "bins"}`` on its last line (``ok`` counts 2xx answers; ``rps`` is ``ok /
elapsed_s``; ``bins[i]`` counts the 2xx answers received between ``t0 + i *
bin_s`` and ``t0 + (i + 1) * bin_s``, ``t0`` being the Unix time the first
request was sent, so a caller can cut the run into windows). The host is fixed
to 127.0.0.1: there is no option to point it anywhere else.

Running it in a separate process keeps the bench's own threads (which
trigger swaps) from competing with it for the GIL; the same generator runs
in the baseline and the measured rounds.
"""

from __future__ import annotations

import argparse
import http.client
import json
import logging
import threading
import time
import typing as t
from collections import Counter
from dataclasses import asdict, dataclass

__all__ = ["LoadResult", "run_load", "main"]

logger = logging.getLogger(__name__)

HOST = "127.0.0.1"


@dataclass(frozen=True)
class LoadResult:
    requests: int
    ok: int
    errors: int
    elapsed_s: float
    rps: float
    statuses: dict[str, int]
    t0: float
    bin_s: float
    bins: list[int]


def run_load(
    port: int,
    path: str,
    *,
    duration: float,
    connections: int,
    max_requests: int,
    bin_s: float = 0.1,
    on_start: t.Callable[[float], None] | None = None,
) -> LoadResult:
    """Send requests to ``127.0.0.1:port`` until ``duration`` or ``max_requests``.

    ``on_start(t0)`` is called with the Unix time the clock starts at, just
    before the first request.
    """
    if not path.startswith("/"):
        raise ValueError(f"path must start with '/', got {path!r}")
    if bin_s <= 0:
        raise ValueError(f"bin_s must be positive, got {bin_s!r}")
    lock = threading.Lock()
    statuses: Counter[str] = Counter()
    bins: Counter[int] = Counter()
    sent = [0]
    t0 = time.time()
    start = time.perf_counter()
    deadline = start + duration

    def worker() -> None:
        conn: http.client.HTTPConnection | None = None
        local: Counter[str] = Counter()
        local_bins: Counter[int] = Counter()
        while time.perf_counter() < deadline:
            with lock:
                if sent[0] >= max_requests:
                    break
                sent[0] += 1
            try:
                if conn is None:
                    conn = http.client.HTTPConnection(HOST, port, timeout=10)
                conn.request("GET", path)
                resp = conn.getresponse()
                resp.read()
                local[str(resp.status)] += 1
                if 200 <= resp.status < 300:
                    local_bins[int((time.perf_counter() - start) / bin_s)] += 1
                if resp.will_close:
                    conn.close()
                    conn = None
            except (OSError, http.client.HTTPException) as exc:
                local[f"error:{type(exc).__name__}"] += 1
                if conn is not None:
                    conn.close()
                conn = None
        if conn is not None:
            conn.close()
        with lock:
            statuses.update(local)
            bins.update(local_bins)

    threads = [threading.Thread(target=worker, name=f"load-{i}", daemon=True) for i in range(connections)]
    if on_start is not None:
        on_start(t0)
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=duration + 30)
    elapsed = time.perf_counter() - start
    ok = sum(n for status, n in statuses.items() if status.startswith("2"))
    total = sum(statuses.values())
    return LoadResult(
        requests=total,
        ok=ok,
        errors=total - ok,
        elapsed_s=round(elapsed, 4),
        rps=round(ok / elapsed, 2) if elapsed > 0 else 0.0,
        statuses=dict(statuses),
        t0=t0,
        bin_s=bin_s,
        bins=[bins.get(i, 0) for i in range(max(bins) + 1 if bins else 0)],
    )


def main(argv: t.Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.loadgen", description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True, help="port on 127.0.0.1")
    parser.add_argument("--path", required=True, help="request path, e.g. /hello/api/greeting")
    parser.add_argument("--duration", type=float, required=True, help="seconds (the upper bound)")
    parser.add_argument("--connections", type=int, default=4)
    parser.add_argument("--max-requests", type=int, default=1_000_000)
    parser.add_argument("--bin", type=float, default=0.1, help="seconds per bin of the timeline")
    parser.add_argument("--announce", action="store_true",
                        help='print {"started": <unix time>} on a line of its own when the clock starts')
    args = parser.parse_args(argv)
    if not (0 < args.duration <= 600):
        parser.error("--duration must be in (0, 600] seconds")
    result = run_load(
        args.port, args.path, duration=args.duration, connections=args.connections,
        max_requests=args.max_requests, bin_s=args.bin,
        on_start=(lambda t0: print(json.dumps({"started": t0}), flush=True)) if args.announce else None,
    )
    print(json.dumps(asdict(result)))


if __name__ == "__main__":
    main()
