"""CPU instructions per request: the per-request figures without the wall clock's noise.

    python -m bench.instructions                      # every case, about 6 minutes
    python -m bench.instructions plugin native        # some of them

On a shared host the time of one request moves by more, from minute to
minute, than what gitplug adds to it, so ``overhead_ratio`` can flip between
runs of the same code. The number of instructions a request executes does
not. Each case serves :data:`bench.fixtures.VIEW_SOURCE` (or the templated
page) from the same two applications the bench builds, in one process (a
plain Flask app with a native blueprint, a gitplug host with the same
blueprint and the synthetic plugin), under valgrind's callgrind with
``PYTHONHASHSEED=0``: 50 requests to warm up, then ``--requests`` more. The
same run with none after the warm-up is subtracted, and the difference is
divided by ``--requests``. Cases:

* ``native``, ``native_page``: the blueprint in the plain app (the baselines);
* ``host_native``: the same blueprint in the gitplug host (a host route);
* ``plugin``, ``plugin_page``: the plugin's routes in the gitplug host.

Needs ``valgrind`` (``apt-get install valgrind``). Counts include what
callgrind sees of the interpreter, the garbage collector included: compare
cases of one run, not runs on different machines.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

__all__ = ["CASES", "count", "main"]

#: ``{case: (application, path)}``; the application is ``plain`` or ``host``.
CASES = {
    "native": ("plain", "/native/item/7"),
    "host_native": ("host", "/native/item/7"),
    "plugin": ("host", "/plug/item/7"),
    "native_page": ("plain", "/native/page"),
    "plugin_page": ("host", "/plug/page"),
}
_WARMUP = 50
_TIMEOUT_S = 600.0
_COLLECTED = re.compile(rb"Collected : (\d+)")


def _serve(case: str, requests: int) -> None:
    """The measured process: build both apps, warm up, serve ``requests`` more."""
    from .fixtures import environ_for, overhead_apps, wsgi_call

    with tempfile.TemporaryDirectory(prefix="gitplug-bench-") as tmp:
        plain, host, gp = overhead_apps(Path(tmp))
        app_name, path = CASES[case]
        app = plain if app_name == "plain" else host
        environ = environ_for(path)
        for _ in range(_WARMUP):
            _, status, body = wsgi_call(app.wsgi_app, environ)
            if not status.startswith("2"):
                raise SystemExit(f"{case}: {path} answered {status}: {body[:200]!r}")
        for _ in range(requests):
            wsgi_call(app.wsgi_app, environ)
        gp.shutdown()


def _instructions(case: str, requests: int, valgrind: str) -> int:
    """Instructions of one whole process serving ``case`` (callgrind's total)."""
    env = dict(os.environ, PYTHONHASHSEED="0")
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    done = subprocess.run(
        [valgrind, "--tool=callgrind", "--callgrind-out-file=/dev/null",
         sys.executable, "-m", "bench.instructions", "--serve", case, "--requests", str(requests)],
        capture_output=True, env=env, timeout=_TIMEOUT_S, check=False,
    )
    found = _COLLECTED.search(done.stderr)
    if done.returncode != 0 or found is None:
        raise SystemExit(f"{case}: valgrind failed (exit {done.returncode}): {done.stderr[-600:].decode(errors='replace')}")
    return int(found.group(1))


def count(case: str, requests: int = 400) -> int:
    """Instructions one request of ``case`` executes (see the module docstring)."""
    valgrind = shutil.which("valgrind")
    if valgrind is None:
        raise SystemExit("bench.instructions needs valgrind: apt-get install valgrind")
    return (_instructions(case, requests, valgrind) - _instructions(case, 0, valgrind)) // requests


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.instructions", description=__doc__.split("\n\n")[0])
    # choices holds [] too: argparse checks an omitted nargs="*" argument's default against them.
    parser.add_argument("cases", nargs="*", choices=[*CASES, []], help="default: all")
    parser.add_argument("--requests", type=int, default=400, help="requests counted after the warm-up")
    parser.add_argument("--serve", choices=list(CASES), help=argparse.SUPPRESS)  # the measured child
    args = parser.parse_args(argv)
    if args.serve:
        _serve(args.serve, args.requests)
        return
    counts = {case: count(case, args.requests) for case in (args.cases or list(CASES))}
    for case, value in counts.items():
        base = counts.get("native_page" if case.endswith("page") else "native")
        ratio = f"  {value / base:.4f} of the native case" if base else ""
        print(f"{case:12} {value:>10,} instructions per request{ratio}")


if __name__ == "__main__":
    main()
