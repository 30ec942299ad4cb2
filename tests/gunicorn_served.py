"""Decoding and checking what the gunicorn tests' plugin answered.

Each response carries its release label from four modules and a template, the
worker's pid, the snapshot generation the request was pinned to and the view's
``time.time()`` (see :mod:`gunicorn_site`); the checks here tell mixed
releases, regressions and late workers apart from requests still in flight.
"""

from __future__ import annotations

import json
import time
import typing as t
from dataclasses import dataclass

from gunicorn_site import label
from loadgen import LoadGenerator, Sample


@dataclass(frozen=True)
class Served:
    """A decoded plugin response."""

    sample: Sample
    stamps: tuple[str, ...]
    seq: int
    commit: str
    pid: int
    generation: int
    t: float


def decode(samples: list[Sample]) -> list[Served]:
    out = []
    for sample in samples:
        data = json.loads(sample.body)
        out.append(
            Served(
                sample,
                tuple(data["stamps"]),
                data["seq"],
                data["commit"],
                data["pid"],
                data["generation"],
                data["t"],
            )
        )
    return out


def served_so_far(load: LoadGenerator) -> list[Served]:
    """The 200 answers ``load`` has received until now, decoded, in send order."""
    return decode(sorted((s for s in load.samples_so_far() if s.status == 200), key=lambda s: s.sent))


def wait_served(
    load: LoadGenerator, what: str, enough: t.Callable[[list[Served]], bool], *, timeout: float = 90.0
) -> list[Served]:
    """Keep the load running until what it has served satisfies ``enough``.

    Load windows wait for what the test needs to have observed (answers from
    every worker, answers sent after a convergence deadline), not for a fixed
    number of seconds that a loaded machine may not fill. ``timeout`` only
    guards against a hang; the load stopping first (its own bound) fails too.
    """
    deadline = time.monotonic() + timeout
    while True:
        served = served_so_far(load)
        if enough(served):
            return served
        if not load.running or time.monotonic() > deadline:
            raise AssertionError(
                f"the load {'stopped' if not load.running else f'ran {timeout} s'} before {what}:"
                f" {len(served)} answers from workers {sorted({s.pid for s in served})}"
            )
        time.sleep(0.05)


def mixed(served: list[Served]) -> list[Served]:
    """Responses whose modules, template and commit do not all name one release."""
    return [s for s in served if set(s.stamps) != {label(s.seq)}]


def regressions(served: list[Served]) -> tuple[list[tuple[Served, Served]], int]:
    """Per worker, ordered by the view's ``time.time()``: responses of an older release
    after one of a newer release; and how many in-flight pairs were told apart.

    A request keeps the snapshot it was pinned to on arrival (SPEC 4.1: in-flight
    requests finish on the release they started on), and the view reads the clock
    after the pin: a request pinned just before a swap can take its timestamp after
    one pinned just after it. The snapshot generation (per process, it grows with
    every publish) tells such a pair apart; a regression is an older release served
    from a newer-or-equal generation, i.e. the worker went back.
    """
    found = []
    in_flight = 0
    by_pid: dict[int, list[Served]] = {}
    for s in served:
        by_pid.setdefault(s.pid, []).append(s)
    for responses in by_pid.values():
        responses.sort(key=lambda s: s.t)
        newest: Served | None = None
        for s in responses:
            if newest is not None and s.seq < newest.seq:
                if s.generation >= newest.generation:
                    found.append((newest, s))
                else:
                    in_flight += 1
            if newest is None or s.seq > newest.seq:
                newest = s
    return found, in_flight


def first_serving(served: list[Served], seq: int, pids: set[int]) -> dict[int, float | None]:
    """Per pid: the view's ``time.time()`` of its first response of ``seq`` or newer."""
    first: dict[int, float] = {}
    for s in served:
        if s.pid in pids and s.seq >= seq and s.t < first.get(s.pid, float("inf")):
            first[s.pid] = s.t
    return {pid: first.get(pid) for pid in pids}


def killed_in_flight(samples: list[Sample], killed_at: float, clients: int) -> list[Sample]:
    """Connection errors of requests in flight when a worker was SIGKILLed (monotonic time).

    A killed worker takes the requests it was serving with it; nothing can answer them.
    Each client thread has at most one request in flight.
    """
    lost = [
        s
        for s in samples
        if s.status is None and s.sent <= killed_at + 0.01 and s.received >= killed_at
    ]
    assert len(lost) <= clients, lost
    return lost
