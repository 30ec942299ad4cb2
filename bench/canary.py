"""The per-request cost of a running canary (README, "Canary releases").

``canary_overhead_ratio``: the same plugin route served by a host whose
plugin runs a 50 % canary (two releases loaded, every request picking its
side: by its cookie, or by a hash of its address for a client without one)
over the same route of a host with one release and no canary. Requests are
direct WSGI calls; the cases are interleaved as in :mod:`bench.inprocess`.
The mix: a third of the requests carry a canary cookie, a third a stable
cookie, a third none (a first visit: the address is hashed and the cookie set).
"""

from __future__ import annotations

import statistics
import tempfile
from pathlib import Path

from flask import Flask

from gitplug import GitPlug
from gitplug.runtime.loaded import ReleaseSpec

from .figures import Figure, FigureSpec, Target, figure, median_ci, spread
from .fixtures import environ_for, write_synthetic_plugin
from .inprocess import _unmount_all, interleaved

__all__ = ["CANARY", "measure_canary"]

CANARY: FigureSpec = (
    "canary_overhead_ratio", "per request during a 50 % canary / without a canary", "ratio", Target("<=", 1.05)
)


def _host(root: Path, tag: str, *, canary: bool) -> tuple[Flask, GitPlug]:
    app = Flask(f"bench_canary_{tag}")
    gp = GitPlug(app)
    stable = write_synthetic_plugin(root / tag / "r1", "plug")
    gp.runtime.swap(ReleaseSpec(name="plug", path=stable, release_id=f"bench-{tag}-r1", url_prefix="/plug"))
    if canary:
        new = write_synthetic_plugin(root / tag / "r2", "plug")
        loaded = gp.runtime.load(ReleaseSpec(name="plug", path=new, release_id=f"bench-{tag}-r2",
                                             url_prefix="/plug"))
        gp.runtime.start_canary("plug", loaded, 50.0)
    return app, gp


def measure_canary(*, rounds: int, per_round: int) -> list[Figure]:
    """``canary_overhead_ratio``."""
    with tempfile.TemporaryDirectory(prefix="gitplug-bench-") as tmp:
        root = Path(tmp)
        plain_app, plain_gp = _host(root, "plain", canary=False)
        canary_app, canary_gp = _host(root, "canary", canary=True)
        split = canary_gp.runtime.snapshot.canaries["plug"]
        requests = []
        for i in range(30):
            address = f"10.0.{i}.1"
            cookie = {0: f"{split.cookie}={split.token}.c", 1: f"{split.cookie}={split.token}.s", 2: None}[i % 3]
            headers = {"Cookie": cookie} if cookie else {}
            requests.append(environ_for("/plug/item/7", headers=headers, environ_base={"REMOTE_ADDR": address}))
        cases = {
            "no_canary": (plain_app.wsgi_app, requests),
            "canary": (canary_app.wsgi_app, requests),
        }
        try:
            medians = interleaved(cases, rounds=rounds, per_round=per_round)
        finally:
            _unmount_all(plain_gp)
            _unmount_all(canary_gp)
    ratios = [a / b for a, b in zip(medians["canary"], medians["no_canary"])]
    s = spread(ratios)
    detail = {f"{name}_us_p50": statistics.median(values) for name, values in medians.items()}
    return [figure(
        CANARY, value=s.p50, n=s.n, p10=s.p10, p90=s.p90, ci95=median_ci(ratios), detail=detail,
        baseline="the same plugin route of a host with one release and no canary",
        note=(f"{rounds} interleaved rounds x {per_round} requests; 30 clients: 1/3 canary cookie,"
              " 1/3 stable cookie, 1/3 none (address hashed, cookie set); minimal JSON view (worst case)"),
    )]
