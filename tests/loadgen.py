"""A bounded HTTP load generator for tests, on 127.0.0.1 only.

``clients`` threads each keep one HTTP/1.1 keep-alive connection
(:mod:`http.client`) to ``127.0.0.1:<port>`` and send GET requests until
either ``max_requests`` (all threads together) or ``max_seconds`` is reached,
or :meth:`LoadGenerator.stop` is called. Every response is recorded as a
:class:`Sample` (status, body, client send/receive ``time.monotonic()``)::

    from loadgen import LoadGenerator            # tests/ is on sys.path under pytest

    with LoadGenerator(port, "/hello/", clients=12, max_seconds=20, max_requests=20_000) as load:
        ...                                      # deploy, kill workers, ...
    result = load.result()
    assert result.connection_errors == [] and not result.non_2xx

Contract:

- The target host is always ``127.0.0.1``; there is no parameter for it.
- ``rate`` (requests per second, all threads together) paces the threads so
  the machine keeps CPU for what the test does meanwhile; without it, the
  threads send as fast as the server answers.
- ``reconnect_every`` closes a thread's connection after that many requests
  and opens a new one, so connections (and with them gunicorn workers) are
  spread anew instead of staying on the workers that accepted them first.
- A failure to connect, send or read is a sample with ``status=None`` and
  ``error`` set. With ``retry_stale=True`` a request whose *reused*
  keep-alive connection turned out to be closed by the server before any
  byte of the answer arrived (what a browser or urllib3 retries silently:
  the server may close an idle or recycled connection at any time) is sent
  once more on a new connection; such retries are counted in
  :attr:`LoadResult.stale_retries`, never hidden.
"""

from __future__ import annotations

import http.client
import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from types import TracebackType
from typing import Self

__all__ = ["LoadGenerator", "LoadResult", "Sample", "percentile"]

logger = logging.getLogger(__name__)

#: The only address this module ever talks to.
HOST = "127.0.0.1"

#: Errors that mean "the server closed this keep-alive connection before
#: answering"; retried once on a new connection when ``retry_stale`` is set.
_STALE_ERRORS = (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError)


@dataclass(frozen=True)
class Sample:
    """One request as the client saw it.

    ``status`` is None when no answer arrived (``error`` says why). ``sent``
    and ``received`` are ``time.monotonic()`` of this process; ``client``
    is the index of the thread that sent it.
    """

    status: int | None
    body: bytes
    sent: float
    received: float
    client: int
    error: str | None = None


@dataclass
class LoadResult:
    """Everything a run recorded, with the derived numbers tests assert on."""

    samples: list[Sample]
    #: ``time.monotonic()`` when the first thread started and the last one ended.
    started: float
    finished: float
    #: Requests re-sent once on a new connection (see ``retry_stale``).
    stale_retries: int = 0
    #: Connections opened in all (first ones and reconnections).
    connections: int = 0

    @property
    def duration_s(self) -> float:
        return max(self.finished - self.started, 1e-9)

    @property
    def rps(self) -> float:
        """Answered requests per second of wall time."""
        return sum(1 for s in self.samples if s.status is not None) / self.duration_s

    @property
    def connection_errors(self) -> list[Sample]:
        return [s for s in self.samples if s.status is None]

    @property
    def non_2xx(self) -> list[Sample]:
        return [s for s in self.samples if s.status is not None and not 200 <= s.status < 300]

    @property
    def ok(self) -> list[Sample]:
        return [s for s in self.samples if s.status is not None and 200 <= s.status < 300]

    def summary(self) -> str:
        """One line for logs and assertion messages."""
        return (
            f"{len(self.samples)} requests in {self.duration_s:.1f} s ({self.rps:.0f} rps),"
            f" {len(self.connection_errors)} connection errors, {len(self.non_2xx)} non-2xx,"
            f" {self.stale_retries} stale keep-alive retries, {self.connections} connections"
        )


def percentile(values: list[float], q: float) -> float:
    """The ``q``-th percentile (0-100) of ``values`` by nearest rank; NaN if empty."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


@dataclass
class _Shared:
    lock: threading.Lock = field(default_factory=threading.Lock)
    issued: int = 0
    stale_retries: int = 0
    connections: int = 0


class LoadGenerator:
    """``clients`` keep-alive GET loops against ``http://127.0.0.1:<port><path>``.

    Bounded by ``max_requests`` (total) and ``max_seconds`` (wall clock);
    both are required so a test can never hang on it. Use as a context
    manager (starts on enter, stops and joins on exit) or call
    :meth:`start` / :meth:`stop` / :meth:`result`.
    """

    def __init__(
        self,
        port: int,
        path: str,
        *,
        clients: int = 8,
        max_requests: int,
        max_seconds: float,
        rate: float | None = None,
        reconnect_every: int | None = None,
        retry_stale: bool = False,
        timeout_s: float = 10.0,
    ) -> None:
        if not path.startswith("/"):
            raise ValueError(f"path {path!r} must start with '/', e.g. '/hello/'")
        if clients < 1 or max_requests < 1 or max_seconds <= 0:
            raise ValueError(
                f"clients={clients}, max_requests={max_requests}, max_seconds={max_seconds}:"
                " each must be positive"
            )
        self.port = port
        self.path = path
        self.clients = clients
        self.max_requests = max_requests
        self.max_seconds = max_seconds
        self.rate = rate
        self.reconnect_every = reconnect_every
        self.retry_stale = retry_stale
        self.timeout_s = timeout_s
        self._stop = threading.Event()
        self._shared = _Shared()
        self._per_client: list[list[Sample]] = [[] for _ in range(clients)]
        self._threads: list[threading.Thread] = []
        self._started = 0.0
        self._finished = 0.0

    # -- lifecycle -----------------------------------------------------------

    def start(self) -> Self:
        if self._threads:
            raise RuntimeError("this LoadGenerator was started already; make a new one")
        self._started = time.monotonic()
        for index in range(self.clients):
            thread = threading.Thread(
                target=self._client, args=(index,), name=f"loadgen-{index}", daemon=True
            )
            thread.start()
            self._threads.append(thread)
        return self

    def stop(self) -> None:
        """Ask every thread to finish its current request and end."""
        self._stop.set()

    def join(self) -> None:
        """Wait for the threads (at most ``max_seconds`` + one timeout past the start)."""
        deadline = self._started + self.max_seconds + self.timeout_s + 5
        for thread in self._threads:
            thread.join(timeout=max(0.1, deadline - time.monotonic()))
        if any(t.is_alive() for t in self._threads):
            raise RuntimeError(
                f"load generator threads still running past {self.max_seconds} s + timeouts"
            )
        self._finished = max(
            (s.received for c in self._per_client for s in c), default=time.monotonic()
        )

    @property
    def started(self) -> float:
        """``time.monotonic()`` when :meth:`start` was called (0 before)."""
        return self._started

    @property
    def running(self) -> bool:
        return any(t.is_alive() for t in self._threads)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
        self.join()

    def samples_so_far(self) -> Iterator[Sample]:
        """Samples recorded until now (safe while running; list appends are atomic)."""
        for per_client in self._per_client:
            yield from list(per_client)

    def result(self) -> LoadResult:
        """Every sample, in send order; call after :meth:`join` (or the ``with`` block)."""
        if self.running:
            raise RuntimeError("the load generator is still running; call stop() and join() first")
        samples = sorted((s for c in self._per_client for s in c), key=lambda s: s.sent)
        return LoadResult(
            samples=samples,
            started=self._started,
            finished=self._finished or time.monotonic(),
            stale_retries=self._shared.stale_retries,
            connections=self._shared.connections,
        )

    # -- the client threads --------------------------------------------------

    def _take_slot(self) -> bool:
        shared = self._shared
        with shared.lock:
            if shared.issued >= self.max_requests:
                return False
            shared.issued += 1
            return True

    def _connect(self) -> http.client.HTTPConnection:
        conn = http.client.HTTPConnection(HOST, self.port, timeout=self.timeout_s)
        with self._shared.lock:
            self._shared.connections += 1
        return conn

    def _client(self, index: int) -> None:
        out = self._per_client[index]
        deadline = self._started + self.max_seconds
        # Paced threads start spread over one interval so they do not send in lockstep.
        interval = self.clients / self.rate if self.rate else 0.0
        next_send = self._started + interval * index / self.clients
        conn: http.client.HTTPConnection | None = None
        used = 0
        try:
            while not self._stop.is_set() and time.monotonic() < deadline and self._take_slot():
                if interval:
                    delay = next_send - time.monotonic()
                    if delay > 0 and self._stop.wait(delay):
                        break
                    next_send = max(next_send + interval, time.monotonic() - interval)
                if conn is None or (self.reconnect_every and used >= self.reconnect_every):
                    if conn is not None:
                        conn.close()
                    conn, used = self._connect(), 0
                sample, conn = self._request(conn, index, reused=used > 0)
                used += 1
                out.append(sample)
        finally:
            if conn is not None:
                conn.close()

    def _request(
        self, conn: http.client.HTTPConnection, index: int, *, reused: bool
    ) -> tuple[Sample, http.client.HTTPConnection | None]:
        """Send one GET; return its sample and the connection to reuse (None: reconnect)."""
        sent = time.monotonic()
        try:
            conn.request("GET", self.path)
            response = conn.getresponse()
            body = response.read()
        except _STALE_ERRORS as exc:
            conn.close()
            if not (self.retry_stale and reused):
                return Sample(
                    None, b"", sent, time.monotonic(), index, f"{type(exc).__name__}: {exc}"
                ), None
            with self._shared.lock:
                self._shared.stale_retries += 1
            return self._request(self._connect(), index, reused=False)
        except (OSError, http.client.HTTPException) as exc:
            conn.close()
            return Sample(
                None, b"", sent, time.monotonic(), index, f"{type(exc).__name__}: {exc}"
            ), None
        received = time.monotonic()
        sample = Sample(response.status, body, sent, received, index)
        if response.will_close:
            conn.close()
            return sample, None
        return sample, conn
