"""gitplug under gunicorn: every worker converges and none regresses (issue 5).

Real things only: a dulwich repository in ``tmp_path``, ``gunicorn`` started
as a subprocess on ``127.0.0.1`` with ``gitplug.wsgi:app`` and
``gitplug.gunicorn_conf`` (killed in a ``finally``; its log printed when a test
fails), deploys through the ``gitplug`` CLI (its own process) and the admin
API, and client threads from :mod:`loadgen`.

The plugin answers JSON carrying its release label from four modules (one
imported lazily by the view) and a template, the worker's pid, the snapshot
generation the request was pinned to and ``time.time()`` taken in the view,
so every response says which release, in which process, served it and when.
SPEC sections covered: 4.1 (atomic), 4.2 (failure keeps the last good
release), 4.8 (every worker converges), 7 (status per worker).

The load test paces its clients at 450 requests/s and asserts >= 300: an
unpaced run reaches ~1,700 rps on 2 cores with gthread x 3, but then starves
the deploys it runs meanwhile of CPU (each CLI deploy is a new Python process).

The tests at the end pin down two product bugs this file found (a worker held
back from converging by another process's deploy lock; preloaded workers
sharing one id), both fixed.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import psutil
import pytest
from gitrepo import GitRepo
from loadgen import LoadGenerator, LoadResult, Sample, percentile

ADMIN_TOKEN = "gunicorn-test-admin-token"

#: The seconds SPEC 4.8 allows between a swap and every worker serving it.
CONVERGENCE_S = 2.0

PLUGIN_INIT = """
import os
import time

from flask import jsonify, render_template, request
from gitplug import Plugin, current_plugin

from hello import alpha, beta
from hello.gamma import STAMP as GAMMA

plugin = Plugin("hello", __name__)


@plugin.route("/")
def index():
    now = time.time()
    from hello.lazy import STAMP as LAZY
    snapshot = request.environ.get("gitplug.snapshot")
    return jsonify(
        stamps=[alpha.STAMP, beta.STAMP, GAMMA, LAZY, render_template("stamp.txt").strip()],
        seq=alpha.SEQ,
        commit=current_plugin.commit,
        pid=os.getpid(),
        generation=getattr(snapshot, "generation", None),
        t=now,
    )
"""

#: Ways a release is broken so that it fails at load (SPEC 4.2).
BROKEN_KINDS = ("lazy_syntax", "import_error")


def label(seq: int) -> str:
    return f"r{seq:03d}"


def write_release(
    repo: GitRepo, seq: int, *, broken: str | None = None, gate_s: float = 0.0
) -> str:
    """Commit release ``seq`` of the ``hello`` plugin; return its sha.

    ``gate.py`` is the release's own test gate (used by :func:`make_site` with
    ``gate=True``): it passes after sleeping ``gate_s`` seconds, so a test can hold
    a real deploy in its test stage.
    """
    repo.write("gate.py", f"import time\ntime.sleep({gate_s})\n")
    stamp = label(seq) if broken is None else f"broken{seq:03d}"
    repo.write("hello/__init__.py", textwrap.dedent(PLUGIN_INIT).lstrip())
    repo.write("hello/alpha.py", f'STAMP = "{stamp}"\nSEQ = {seq}\n')
    repo.write("hello/beta.py", f'STAMP = "{stamp}"\n')
    gamma = f'STAMP = "{stamp}"\n'
    lazy = f'STAMP = "{stamp}"\n'
    if broken == "lazy_syntax":
        lazy += "def oops(:\n"
    elif broken == "import_error":
        gamma += 'raise RuntimeError("gamma cannot start")\n'
    elif broken is not None:
        raise ValueError(f"unknown broken kind {broken!r}; expected one of {BROKEN_KINDS}")
    repo.write("hello/gamma.py", gamma)
    repo.write("hello/lazy.py", lazy)
    repo.write("hello/templates/stamp.txt", f"{stamp}\n")
    return repo.commit(f"hello {stamp}")


@dataclass(frozen=True)
class DeployDone:
    """One deploy as the operator saw it.

    ``done_at`` is ``time.time()`` when the CLI exited or the API answered; when the
    controller's poll deployed the commit first (the deploy answered "already live"),
    it is when that poll's deploy finished, and ``via`` is ``poll``.
    """

    seq: int
    commit: str
    via: str  # cli | api | poll
    broken: str | None
    result: str
    stage: str | None
    exit: int  # the CLI's exit status or the API's HTTP status
    done_at: float
    took_s: float


def finished_at(record: dict[str, Any]) -> float:
    """``time.time()`` when a deploy record (``history --json``) finished."""
    started = datetime.fromisoformat(record["started_at"]).timestamp()  # "...Z": UTC
    return started + record["duration_s"]


# -- the site: repository, configuration, CLI ---------------------------------------


@dataclass
class Site:
    """A plugin repository and a deploy.yaml in ``root``; the CLI bound to them."""

    root: Path
    repo: GitRepo
    config: Path
    data_dir: Path
    commits: dict[int, str] = field(default_factory=dict)

    @property
    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            GITPLUG_CONFIG=str(self.config),
            GITPLUG_ADMIN_TOKEN=ADMIN_TOKEN,
            PYTHONUNBUFFERED="1",
        )
        return env

    def cli(self, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        """Run ``gitplug ARGS`` in its own process (as an operator would)."""
        return subprocess.run(
            [
                sys.executable,
                "-c",
                "import sys; from gitplug.cli import main; sys.argv[0] = 'gitplug'; main()",
                *args,
            ],
            check=False,  # the caller asserts on the exit status
            env=self.env,
            cwd=self.root,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def cli_json(self, *args: str) -> Any:
        done = self.cli(*args, "--json")
        assert done.returncode == 0, (
            f"gitplug {' '.join(args)} exited {done.returncode}: {done.stderr}"
        )
        return json.loads(done.stdout)

    def release(self, seq: int, *, broken: str | None = None, gate_s: float = 0.0) -> str:
        sha = write_release(self.repo, seq, broken=broken, gate_s=gate_s)
        if broken is None:
            self.commits[seq] = sha
        return sha

    def deploy_cli(self) -> tuple[dict[str, Any], int]:
        """``gitplug deploy hello --json``: the record and the exit status."""
        done = self.cli("deploy", "hello", "--json")
        try:
            record = json.loads(done.stdout)
        except json.JSONDecodeError:
            raise AssertionError(
                f"gitplug deploy printed no JSON (exit {done.returncode}): {done.stderr}"
            ) from None
        return record, done.returncode

    def deploy(
        self,
        seq: int,
        *,
        via: str,
        server: Gunicorn | None = None,
        broken: str | None = None,
        gate_s: float = 0.0,
    ) -> DeployDone:
        """Commit release ``seq`` and deploy it through the CLI or the admin API (waiting)."""
        sha = self.release(seq, broken=broken, gate_s=gate_s)
        started = time.monotonic()
        if via == "cli":
            record, code = self.deploy_cli()
        else:
            assert server is not None
            code, record = server.api("POST", "/plugins/hello/deploy", {"wait": True})
        done_at, took = time.time(), time.monotonic() - started
        assert record.get("commit") == sha, (via, code, record)
        if record["result"] == "skipped":
            # The controller polls its tracked ref once on election: it may have
            # deployed the commit first. Its own history record says when.
            live = [
                r
                for r in self.cli_json("history", "hello")
                if r["commit"] == sha and r["result"] == "live"
            ]
            assert live and live[0]["trigger"] == "poll", (record, live)
            return DeployDone(
                seq, sha, "poll", broken, "live", None, code, finished_at(live[0]), took
            )
        return DeployDone(
            seq, sha, via, broken, record["result"], record["stage"], code, done_at, took
        )

    @property
    def controller_lock(self) -> Path:
        return self.data_dir / "locks" / "controller.lock"

    @property
    def deploy_lock(self) -> Path:
        return self.data_dir / "locks" / "deploy-hello.lock"

    def history(self) -> list[dict[str, Any]]:
        return self.cli_json("history", "hello")


def make_site(root: Path, *, gate: bool = False) -> Site:
    """A repository and deploy.yaml in ``root``; release r000 deployed by the CLI.

    The test gate is off (``test: false``) unless ``gate``: then each release's
    ``gate.py`` is its test command. Polls are hourly: only the controller's poll on
    election runs during a test.
    """
    repo = GitRepo(root / "hello-repo")
    config = root / "deploy.yaml"
    test = json.dumps([sys.executable, "gate.py"]) if gate else "false"
    config.write_text(
        textwrap.dedent(
            f"""\
            data_dir: data
            poll_interval: 3600
            admin_token: ${{GITPLUG_ADMIN_TOKEN}}
            plugins:
              hello:
                repo: {repo.path}
                ref: main
                test: {test}
            """
        )
    )
    site = Site(root=root, repo=repo, config=config, data_dir=root / "data")
    site.release(0)
    record, code = site.deploy_cli()
    assert code == 0 and record["result"] == "live", (record, code)
    return site


@pytest.fixture
def site(tmp_path: Path) -> Site:
    """Release r000 deployed through the CLI, before any server starts; no test gate."""
    return make_site(tmp_path)


@pytest.fixture
def gated_site(tmp_path: Path) -> Site:
    """As :func:`site`, with each release's ``gate.py`` as its test gate."""
    return make_site(tmp_path, gate=True)


# -- gunicorn ------------------------------------------------------------------------


class Gunicorn:
    """``gunicorn ARGS gitplug.wsgi:app`` on 127.0.0.1, its log in a file.

    Always stopped by :meth:`close` (SIGTERM, then SIGKILL of the master and
    of every worker it ever had). A thread records each worker's pid and
    creation time as it appears.
    """

    def __init__(self, site: Site, *args: str, workers: int) -> None:
        self.site = site
        self.workers = workers
        self.log_path = site.root / f"gunicorn-{time.monotonic_ns()}.log"
        self._log = self.log_path.open("wb")
        command = [
            sys.executable,
            "-m",
            "gunicorn",
            "-w",
            str(workers),
            "-b",
            "127.0.0.1:0",
            "-c",
            "python:gitplug.gunicorn_conf",
            "--graceful-timeout",
            "5",
            "--log-level",
            "info",
            *_isolation_args(),
            *args,
            "gitplug.wsgi:app",
        ]
        self.proc = subprocess.Popen(
            command, env=site.env, cwd=site.root, stdout=self._log, stderr=subprocess.STDOUT
        )
        #: ``{pid: creation time (time.time())}`` of every worker seen.
        self.births: dict[int, float] = {}
        self._watching = threading.Event()
        self._watcher = threading.Thread(
            target=self._watch_workers, name="gunicorn-workers", daemon=True
        )
        self._watcher.start()
        self.port = self._wait_port()

    def _watch_workers(self) -> None:
        try:
            master = psutil.Process(self.proc.pid)
        except psutil.Error:
            return
        while not self._watching.is_set():
            try:
                for child in master.children():
                    if child.pid not in self.births:
                        with contextlib.suppress(psutil.Error):
                            self.births[child.pid] = child.create_time()
            except psutil.Error:
                return
            self._watching.wait(0.02)

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def _wait_port(self, timeout: float = 20.0) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = re.search(r"Listening at: http://127\.0\.0\.1:(\d+)", self.log())
            if found:
                return int(found.group(1))
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        self.close()
        raise AssertionError(f"gunicorn did not start listening within {timeout} s:\n{self.log()}")

    def worker_pids(self) -> list[int]:
        try:
            return sorted(c.pid for c in psutil.Process(self.proc.pid).children())
        except psutil.Error:
            return []

    def get(self, path: str, *, timeout: float = 10.0) -> tuple[int, bytes]:
        with urllib.request.urlopen(
            f"http://127.0.0.1:{self.port}{path}", timeout=timeout
        ) as response:
            return response.status, response.read()

    def api(
        self, method: str, path: str, body: Any = None, *, timeout: float = 60.0
    ) -> tuple[int, Any]:
        """Call the admin API with the admin token; return status and decoded JSON."""
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.port}/_gitplug/api{path}",
            method=method,
            data=None if body is None else json.dumps(body).encode(),
            headers={"Authorization": f"Bearer {ADMIN_TOKEN}", "Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read() or b"null")

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Wait for every worker to be up and the plugin to answer."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"gunicorn exited with {self.proc.returncode}:\n{self.log()}")
            if (
                len(self.worker_pids()) == self.workers
                and self.log().count("Booting worker") >= self.workers
            ):
                with contextlib.suppress(OSError):
                    if self.get("/hello/")[0] == 200:
                        return
            time.sleep(0.1)
        raise AssertionError(f"gunicorn was not ready within {timeout} s:\n{self.log()}")

    def close(self) -> None:
        self._watching.set()
        pids = set(self.births) | set(self.worker_pids())
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        for pid in pids:
            # Only workers this master had, checked by creation time (pids are reused).
            with contextlib.suppress(psutil.Error):
                proc = psutil.Process(pid)
                if pid in self.births and abs(proc.create_time() - self.births[pid]) < 0.05:
                    proc.kill()
        self._log.close()


def _isolation_args() -> list[str]:
    """Keep parallel gunicorns apart: gunicorn >= 24 opens a control socket in ~/.gunicorn."""
    from gunicorn.config import KNOWN_SETTINGS

    return (
        ["--no-control-socket"]
        if any(s.name == "control_socket_disable" for s in KNOWN_SETTINGS)
        else []
    )


def machine_load() -> str:
    """The load averages, to tell a slow product from a machine busy with other work."""
    one, five, _ = os.getloadavg()
    return f"load average {one:.1f}/{five:.1f} on {os.cpu_count()} CPUs"


@contextlib.contextmanager
def gunicorn(site: Site, *args: str, workers: int) -> Iterator[Gunicorn]:
    """A running gunicorn; its log is printed when the block fails."""
    server = Gunicorn(site, *args, workers=workers)
    try:
        server.wait_ready()
        yield server
    except BaseException:
        print(
            f"---- gunicorn log ({server.log_path}; {machine_load()}) ----\n{server.log()[-20000:]}"
        )
        raise
    finally:
        server.close()


# -- reading responses ------------------------------------------------------------------


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


def wait_for(what: str, check: Any, *, timeout: float, interval: float = 0.1) -> Any:
    """Call ``check()`` until it returns a true value; fail naming ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        last = check()
        if last:
            return last
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def lock_holder(path: Path) -> int | None:
    """The pid written in an fcntl lock file, if the lock is held right now."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            text = os.read(fd, 64).decode().strip()
            return int(text) if text.isdigit() else None
        fcntl.flock(fd, fcntl.LOCK_UN)  # nobody held it
        return None
    finally:
        os.close(fd)


def status_is(site: Site, expected: dict[int, str]) -> dict[int, str | None] | None:
    """``gitplug status`` workers when they are exactly ``expected``, else None."""
    workers = status_workers(site)
    return workers if workers == expected else None


def status_workers(site: Site) -> dict[int, str | None]:
    """``gitplug status --json``: ``{pid: commit}`` of the hello plugin's workers."""
    plugin = site.cli_json("status")["plugins"][0]
    return {int(worker_id.split(":")[1]): commit for worker_id, commit in plugin["workers"].items()}


def test_analysis_finds_mixing_regressions_and_late_workers() -> None:
    """The checks below can fail: each is shown a response it must flag."""

    def served(
        seq: int, pid: int, generation: int, t: float, stamps: tuple[str, ...] | None = None
    ) -> Served:
        return Served(
            Sample(200, b"", 0.0, 0.0, 0),
            stamps or (label(seq),) * 5,
            seq,
            f"c{seq}",
            pid,
            generation,
            t,
        )

    good = [
        served(1, 7, 1, 10.0),
        served(2, 7, 2, 11.0),
        served(1, 8, 1, 10.5),
        served(2, 8, 2, 12.9),
    ]
    assert mixed(good) == [] and regressions(good) == ([], 0)
    half = served(2, 7, 2, 11.5, stamps=(label(2),) * 4 + (label(1),))
    assert mixed([*good, half]) == [half]
    back = served(1, 7, 3, 11.2)  # a newer snapshot of an older release: the worker went back
    assert regressions([*good, back])[0] == [(good[1], back)]
    pinned_before = served(1, 7, 1, 11.1)  # pinned before the swap, timed after: in flight
    assert regressions([*good, pinned_before]) == ([], 1)
    assert first_serving(good, 2, {7, 8, 9}) == {7: 11.0, 8: 12.9, 9: None}


# -- 1. the load test of issue 5 ---------------------------------------------------------


#: Deploys in the load test: every 4th is broken (alternately a syntax error in a
#: lazily imported module and an import-time exception), so 18 go live, 6 fail.
LOAD_DEPLOYS = 24
#: The load test drives at least this long.
LOAD_MIN_S = 20.0
#: The asserted floor of the load test's throughput (see the module docstring).
LOAD_MIN_RPS = 300.0


@pytest.mark.slow
def test_load_with_deploys_never_mixes_regresses_or_lags(site: Site) -> None:
    """Issue 5: >= 300 rps on gthread x 3 while 24 deploys (6 broken) go through."""
    done: list[DeployDone] = []
    with gunicorn(site, "-k", "gthread", "--threads", "4", workers=3) as server:
        load = LoadGenerator(
            server.port,
            "/hello/",
            clients=12,
            rate=450,
            reconnect_every=25,
            max_requests=100_000,
            max_seconds=150.0,
        )
        with load:
            time.sleep(1.0)
            for seq in range(1, LOAD_DEPLOYS + 1):
                broken = BROKEN_KINDS[(seq // 4) % 2] if seq % 4 == 0 else None
                d = site.deploy(seq, via="cli" if seq % 2 else "api", server=server, broken=broken)
                done.append(d)
                if broken:
                    assert (d.result, d.stage, d.exit) == (
                        "failed",
                        "load",
                        1 if d.via == "cli" else 409,
                    ), d
                else:
                    assert d.result == "live" and d.exit in (0, 200), d
            # Load on for LOAD_MIN_S in all, and past the last deploy's window.
            while (
                time.monotonic() - load.started < LOAD_MIN_S
                or time.time() - done[-1].done_at < 2 * CONVERGENCE_S
            ):
                time.sleep(0.1)
            # Heartbeats kept beating under load: status lists the 3 workers on the last release.
            last_live = next(d.commit for d in reversed(done) if d.result == "live")
            workers = status_workers(site)
        result = load.result()
    assert workers == {pid: last_live for pid in server.births}, workers
    check_load(result, done, site)


def check_load(result: LoadResult, done: list[DeployDone], site: Site) -> None:
    print(f"\nload: {result.summary()}; {machine_load()}")
    for via in ("cli", "api", "poll"):
        took = [d.took_s for d in done if d.via == via]
        if took:
            p50, worst = percentile(took, 50), max(took)
            print(f"deploys via {via}: {len(took)}, took p50 {p50:.2f} s, max {worst:.2f} s")
    assert not result.connection_errors, (result.summary(), result.connection_errors[:5])
    assert not result.non_2xx, (result.summary(), result.non_2xx[:5])
    served = decode(result.samples)
    pids = {s.pid for s in served}
    print(
        "responses per worker:",
        {pid: sum(1 for s in served if s.pid == pid) for pid in sorted(pids)},
    )
    assert len(pids) == 3, f"expected responses from 3 workers, got {sorted(pids)}"

    assert not mixed(served), mixed(served)[:5]
    broken = {d.commit for d in done if d.broken}
    from_broken = [
        s for s in served if s.commit in broken or any(x.startswith("broken") for x in s.stamps)
    ]
    assert not from_broken, from_broken[:5]
    wrong_commit = [s for s in served if site.commits.get(s.seq) != s.commit]
    assert not wrong_commit, wrong_commit[:5]
    went_back, in_flight = regressions(served)
    print(f"in-flight requests finished on the release they were pinned to: {in_flight}")
    assert not went_back, went_back[:5]

    # Convergence: per live deploy and worker, the first response of that release
    # (or a newer one) against the moment the CLI exited / the API answered.
    lag: list[float] = []
    late = []
    for d in done:
        if d.result != "live":
            continue
        for pid, first in first_serving(served, d.seq, pids).items():
            if first is None or first - d.done_at > CONVERGENCE_S:
                late.append(
                    (
                        label(d.seq),
                        d.via,
                        pid,
                        None if first is None else round(first - d.done_at, 3),
                    )
                )
            if first is not None:
                lag.append(first - d.done_at)
    clamped = [max(x, 0.0) for x in lag]
    print(
        f"convergence ({len(lag)} worker swaps): p50 {percentile(clamped, 50):.3f} s,"
        f" p99 {percentile(clamped, 99):.3f} s, max {max(clamped):.3f} s"
        f" (signed: p50 {percentile(lag, 50):+.3f} s, p99 {percentile(lag, 99):+.3f} s;"
        " negative = before the deploy command returned)"
    )
    assert not late, (
        f"workers later than {CONVERGENCE_S} s (release, via, pid, lag s): {late}; {machine_load()}"
    )
    assert result.rps >= LOAD_MIN_RPS, f"{result.summary()}; {machine_load()}"


# -- 2. status lists every worker ------------------------------------------------------


#: Heartbeats older than this are dropped by ``gitplug status`` (StateStore.workers).
HEARTBEAT_MAX_AGE_S = 10.0


def test_status_lists_every_worker_and_drops_a_killed_one(site: Site) -> None:
    with gunicorn(site, "-k", "gthread", "--threads", "4", workers=3) as server:
        d = site.deploy(1, via="cli")
        assert d.result == "live", d
        v1 = d.commit

        pids = set(server.worker_pids())
        workers = wait_for(
            "gitplug status to list the 3 workers on r001",
            lambda: status_is(site, {pid: v1 for pid in pids}),
            timeout=8,
            interval=0.3,
        )
        plugin = site.cli_json("status")["plugins"][0]
        assert plugin["live_commit"] == v1 and plugin["state"] == "live", plugin
        controller = lock_holder(site.controller_lock)
        victim = max(pid for pid in workers if pid != controller)

        load = LoadGenerator(
            server.port,
            "/hello/",
            clients=4,
            rate=60,
            reconnect_every=1,
            retry_stale=True,
            max_requests=5_000,
            max_seconds=40.0,
        )
        with load:
            time.sleep(0.5)
            os.kill(victim, signal.SIGKILL)
            killed_at = time.monotonic()
            respawned = wait_for(
                "gunicorn to replace the killed worker",
                lambda: set(server.worker_pids()) - pids - {victim},
                timeout=10,
            )
            (newcomer,) = respawned

            def victim_gone() -> float | None:
                asked = time.monotonic()
                return asked - killed_at if victim not in status_workers(site) else None

            gone_after = wait_for(
                "the killed worker to leave gitplug status",
                victim_gone,
                timeout=HEARTBEAT_MAX_AGE_S + 5,
                interval=0.3,
            )
            print(f"\nkilled worker {victim} left gitplug status after {gone_after:.1f} s")
            final = wait_for(
                "gitplug status to list the new worker on r001",
                lambda: status_is(site, {pid: v1 for pid in (pids - {victim}) | {newcomer}}),
                timeout=6,
                interval=0.3,
            )
            wait_for(
                "the new worker to answer",
                lambda: any(
                    json.loads(s.body)["pid"] == newcomer
                    for s in load.samples_so_far()
                    if s.status == 200
                ),
                timeout=10,
            )
        result = load.result()
    print(f"load: {result.summary()}")
    assert set(final) == (pids - {victim}) | {newcomer}
    # The last beat was at most one heartbeat before the kill: gone within the max age,
    # plus the time one `gitplug status` takes (measured from when it was asked).
    assert gone_after <= HEARTBEAT_MAX_AGE_S + 1.0, gone_after
    lost = killed_in_flight(result.samples, killed_at, load.clients)
    assert not result.non_2xx and len(result.connection_errors) == len(lost), result.summary()
    served = decode(result.ok)
    from_newcomer = sorted((s for s in served if s.pid == newcomer), key=lambda s: s.t)
    assert from_newcomer, "the new worker served nothing"
    assert {s.seq for s in from_newcomer} == {1}, [label(s.seq) for s in from_newcomer[:10]]


# -- 3. --preload and --max-requests ----------------------------------------------------


def test_preload_and_recycled_workers_never_serve_a_stale_release(site: Site) -> None:
    """The master imports the app (and r000) once; every fork converges before serving."""
    args = (
        "-k",
        "gthread",
        "--threads",
        "2",
        "--preload",
        "--max-requests",
        "50",
        "--max-requests-jitter",
        "10",
    )
    with gunicorn(site, *args, workers=2) as server:
        load = LoadGenerator(
            server.port,
            "/hello/",
            clients=4,
            rate=50,
            reconnect_every=5,
            retry_stale=True,
            max_requests=5_000,
            max_seconds=40.0,
        )
        with load:
            time.sleep(3.0)
            d = site.deploy(1, via="cli")
            assert d.result == "live", d
            v1, done_at = d.commit, d.done_at
            done_mono = time.monotonic() - (time.time() - done_at)
            time.sleep(2 * CONVERGENCE_S + 3.0)
        result = load.result()
    print(f"\nload: {result.summary()}")
    assert not result.non_2xx and not result.connection_errors, result.summary()
    served = decode(result.samples)
    before = {pid for pid, born in server.births.items() if born < done_at - 0.1}
    after = {pid for pid, born in server.births.items() if born > done_at}
    print(f"workers born before the deploy returned: {len(before)}, after: {len(after)}")
    assert len({s.pid for s in served if s.pid in after}) >= 2, (
        "expected workers recycled after the deploy"
    )
    assert {s.seq for s in served if s.pid in before} >= {0}
    # A worker forked after the deploy returned serves r001 from its first request.
    stale_newborn = [s for s in served if s.pid in after and s.seq != 1]
    assert not stale_newborn, stale_newborn[:5]
    # Every worker serves r001 once the convergence window has passed.
    stale = [s for s in served if s.sample.sent > done_mono + CONVERGENCE_S and s.commit != v1]
    assert not stale, stale[:5]
    assert not mixed(served) and not regressions(served)[0]


# -- 4. controller takeover -----------------------------------------------------------------


def test_controller_takeover_after_sigkill(site: Site) -> None:
    with gunicorn(site, "-k", "gthread", "--threads", "4", workers=3) as server:
        controller = wait_for(
            "a worker to hold locks/controller.lock",
            lambda: (
                holder
                if (holder := lock_holder(site.controller_lock)) in server.worker_pids()
                else None
            ),
            timeout=5,
        )
        os.kill(controller, signal.SIGKILL)
        killed_at = time.monotonic()
        v1 = site.release(1)
        # Sent at once: whichever worker takes it, the deploy must happen, queued via the
        # store while no worker is the controller yet.
        code, answer = server.api("POST", "/plugins/hello/deploy", {"wait": False})
        assert (code, answer) == (202, {"status": "queued"})
        successor = wait_for(
            "another worker to become the controller",
            lambda: (pid := lock_holder(site.controller_lock)) not in (None, controller) and pid,
            timeout=5,
            interval=0.05,
        )
        took_over = time.monotonic() - killed_at
        assert successor in server.worker_pids(), (successor, server.worker_pids())
        # The successor also polls its tracked ref once on election and may deploy r001
        # first; the queued request then still runs and is recorded as skipped.
        deployed = wait_for(
            "the queued API deploy to run",
            lambda: next(
                (r for r in site.cli_json("history", "hello") if r["trigger"] == "api"), None
            ),
            timeout=15,
            interval=0.3,
        )
        assert deployed["commit"] == v1 and deployed["result"] in ("live", "skipped"), deployed
        live_after = time.monotonic() - killed_at
        wait_for(
            "every worker to serve r001",
            lambda: set(status_workers(site).values()) == {v1},
            timeout=6,
            interval=0.3,
        )
        assert json.loads(server.get("/hello/")[1])["commit"] == v1
    print(
        f"\ncontroller {controller} killed; {successor} took over after {took_over:.1f} s;"
        f" the API deploy was live {live_after:.1f} s after the kill"
    )


# -- 5. sync workers -------------------------------------------------------------------------


def test_sync_workers_converge_after_a_cli_deploy(site: Site) -> None:
    with gunicorn(site, "-k", "sync", workers=2) as server:
        load = LoadGenerator(
            server.port, "/hello/", clients=3, rate=60, max_requests=5_000, max_seconds=30.0
        )
        with load:
            time.sleep(1.0)
            d = site.deploy(1, via="cli")
            assert d.result == "live", d
            v1, done_at = d.commit, d.done_at
            time.sleep(CONVERGENCE_S + 1.0)
        result = load.result()
    print(f"\nload: {result.summary()}")
    assert not result.non_2xx and not result.connection_errors, result.summary()
    served = decode(result.samples)
    pids = {s.pid for s in served}
    assert len(pids) == 2, pids
    first = first_serving(served, 1, pids)
    print(
        "sync workers serving r001 after the CLI returned (s):",
        {pid: None if t is None else round(t - done_at, 3) for pid, t in first.items()},
    )
    assert all(t is not None and t - done_at <= CONVERGENCE_S for t in first.values()), first
    assert not [s for s in served if s.t > done_at + CONVERGENCE_S and s.commit != v1]
    assert not mixed(served) and not regressions(served)[0]


# -- regressions of product bugs found here ---------------------------------------------------

#: The controller polls its tracked ref 1 s after its election: tests that hold a
#: deploy in its gate wait this long first, so that poll does not deploy it instead.
FIRST_POLL_S = 2.0

@pytest.mark.parametrize(
    "preload",
    [
        pytest.param(True, id="preload"),
        pytest.param(False, id="no-preload"),
    ],
)
def test_worker_started_during_a_deploy_serves_the_live_release(
    gated_site: Site, preload: bool
) -> None:
    """SPEC 4.2 and 4.8: a deploy in progress changes nothing served, in any worker.

    r001 is live everywhere; the CLI deploys r002, whose test gate takes 5 s. A worker
    killed meanwhile is replaced by gunicorn; the replacement must serve r001.
    """
    site = gated_site
    args = ("-k", "gthread", "--threads", "4", *(("--preload",) if preload else ()))
    with gunicorn(site, *args, workers=2) as server:
        pids = set(server.worker_pids())
        time.sleep(FIRST_POLL_S)
        load = LoadGenerator(
            server.port,
            "/hello/",
            clients=3,
            rate=60,
            reconnect_every=1,
            retry_stale=True,
            max_requests=5_000,
            max_seconds=40.0,
        )
        with load:
            d1 = site.deploy(1, via="cli")
            assert d1.result == "live", d1
            wait_for(
                "both workers to serve r001",
                lambda: (
                    pids
                    <= {
                        json.loads(s.body)["pid"]
                        for s in load.samples_so_far()
                        if s.status == 200
                        and s.received > time.monotonic() - 0.5
                        and json.loads(s.body)["seq"] == 1
                    }
                ),
                timeout=6,
            )
            converged = time.monotonic()
            site.release(2, gate_s=5.0)
            deploy = subprocess.Popen(
                [
                    sys.executable,
                    "-c",
                    "from gitplug.cli import main; main()",
                    "deploy",
                    "hello",
                    "--json",
                ],
                env=site.env,
                cwd=site.root,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            try:
                wait_for(
                    "the CLI deploy to hold the plugin's deploy lock",
                    lambda: lock_holder(site.deploy_lock) == deploy.pid,
                    timeout=10,
                    interval=0.05,
                )
                victim = min(pids)
                os.kill(victim, signal.SIGKILL)
                killed_at = time.monotonic()
                newcomer = wait_for(
                    "gunicorn to replace the killed worker",
                    lambda: set(server.worker_pids()) - pids,
                    timeout=10,
                )
                time.sleep(1.5)  # the newcomer serves while r002 is still in its test gate
                assert lock_holder(site.deploy_lock) == deploy.pid, (
                    "the deploy ended too early to tell"
                )
                out, err = deploy.communicate(timeout=30)
            finally:
                if deploy.poll() is None:
                    deploy.kill()
            assert json.loads(out)["result"] == "live", (out, err)
            gate_ended = time.monotonic()
        result = load.result()
    print(f"\nload: {result.summary()}; new worker {newcomer}")
    lost = killed_in_flight(result.samples, killed_at, load.clients)
    during = [
        s
        for s in result.samples
        if converged < s.sent and s.received < gate_ended and s not in lost
    ]
    bad = [s for s in during if s.status != 200 or json.loads(s.body)["seq"] < 1]
    example = bad[0].error or bad[0].body[:160] if bad else None
    assert not bad, (
        f"{len(bad)} of {len(during)} responses during r002's deploy were not r001:"
        f" statuses {sorted({str(s.status) for s in bad})}, e.g. {example!r}"
    )


def test_convergence_is_not_held_back_by_the_next_deploy(gated_site: Site) -> None:
    """SPEC 4.8: every worker serves a release within 2 s of its swap, even when the
    controller goes straight on to the next deploy (two pushes in a row)."""
    site = gated_site
    with gunicorn(site, "-k", "gthread", "--threads", "4", workers=3) as server:
        time.sleep(FIRST_POLL_S)
        load = LoadGenerator(
            server.port,
            "/hello/",
            clients=3,
            rate=90,
            reconnect_every=1,
            retry_stale=True,
            max_requests=5_000,
            max_seconds=60.0,
        )
        with load:
            v1 = site.release(1, gate_s=4.0)
            assert server.api("POST", "/plugins/hello/deploy", {"wait": False})[0] == 202
            wait_for(
                "r001 to be in its test gate",
                lambda: any(r["commit"] == v1 and r["result"] == "running" for r in site.history()),
                timeout=10,
                interval=0.2,
            )
            v2 = site.release(2, gate_s=5.0)
            assert server.api("POST", "/plugins/hello/deploy", {"wait": False})[0] == 202
            queued_while_running = any(
                r["commit"] == v1 and r["result"] == "running" for r in site.history()
            )
            first = wait_for(
                "r001 to go live",
                lambda: next(
                    (r for r in site.history() if r["commit"] == v1 and r["result"] != "running"),
                    None,
                ),
                timeout=15,
            )
            assert first["result"] == "live", first
            second = wait_for(
                "r002 to go live",
                lambda: next(
                    (r for r in site.history() if r["commit"] == v2 and r["result"] != "running"),
                    None,
                ),
                timeout=20,
            )
            assert second["result"] == "live", second
            time.sleep(1.0)
        result = load.result()
    print(f"\nload: {result.summary()}")
    assert not result.non_2xx and not result.connection_errors, result.summary()
    served = decode(result.samples)
    done_at = finished_at(first)
    first_r1 = first_serving(served, 1, {s.pid for s in served})
    lag = {pid: None if t is None else round(t - done_at, 2) for pid, t in first_r1.items()}
    print(f"workers serving r001 or newer, seconds after r001 went live: {lag}")
    assert queued_while_running, (
        "r002 was queued after r001 had finished: the scenario did not happen"
    )
    assert all(x is not None and x <= CONVERGENCE_S for x in lag.values()), lag


def test_status_lists_every_preloaded_worker(site: Site) -> None:
    """SPEC 7: `gitplug status` shows the live commit per worker, --preload or not."""
    with gunicorn(site, "-k", "gthread", "--threads", "2", "--preload", workers=3) as server:
        pids = set(server.worker_pids())
        expected = {pid: site.commits[0] for pid in pids}
        try:
            wait_for(
                "gitplug status to list the 3 preloaded workers",
                lambda: status_is(site, expected),
                timeout=5,
                interval=0.3,
            )
        except AssertionError as exc:
            got = status_workers(site)
            raise AssertionError(
                f"{exc}: got {got}, master {server.proc.pid}, workers {sorted(pids)}"
            ) from None
