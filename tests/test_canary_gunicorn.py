"""Canary releases under gunicorn with several workers (SPEC 6; README "Canary releases").

gunicorn runs ``gitplug.wsgi:app`` with 3 workers behind a PROXY protocol
front (``--proxy-protocol v1``, as behind HAProxy): the test's clients send
the PROXY line, so each speaks from an address of its own and gunicorn sets
``REMOTE_ADDR`` from it. Deploys go through the ``gitplug`` CLI and the
admin API, as an operator's would.

* the split agrees across workers: every client address is served by the
  side its bucket names (:func:`gitplug.runtime.canary.bucket`), whichever
  worker answers, and the canary's share over 200 addresses is 30 % +- 10;
* the judgement agrees: one verdict per canary, taken on the counts of all
  workers (the record's canary figures cover requests several workers served);
* no request fails while a canary starts, is promoted (by itself), is rolled
  back (by itself: the release errs on ``/hello/work``) or is aborted (by
  hand, over the API): every answer of ``/hello/`` is a 200 from one release.
"""

from __future__ import annotations

import json
import socket
import textwrap
import threading
import time
import typing as t

from gitplug.runtime.canary import BUCKETS, bucket
from gunicorn_fixtures import site_fixture  # noqa: F401 - the ``site`` fixture
from gunicorn_site import Site, gunicorn, label

PLUGIN_INIT = """
import os

from flask import jsonify, render_template
from gitplug import Plugin, current_plugin

from hello import alpha, beta
from hello.gamma import STAMP as GAMMA

plugin = Plugin("hello", __name__)


@plugin.route("/")
def index():
    from hello.lazy import STAMP as LAZY
    return jsonify(stamps=[alpha.STAMP, beta.STAMP, GAMMA, LAZY, render_template("stamp.txt").strip()],
                   seq=alpha.SEQ, commit=current_plugin.commit, pid=os.getpid())


@plugin.route("/work")
def work():
    if alpha.WORK_FAILS:
        raise RuntimeError("this release cannot work")
    return jsonify(seq=alpha.SEQ, pid=os.getpid())
"""

#: ``duration`` leaves the split check time to finish before the verdict, on a loaded machine too.
CANARY = {"percent": 30, "min_requests": 60, "duration": 15, "max_error_rate": 0.05}


def release(site: Site, seq: int, *, fails: bool = False) -> str:
    """Commit release ``seq``; ``fails``: its ``/hello/work`` raises."""
    stamp = label(seq)
    site.repo.write("hello/__init__.py", textwrap.dedent(PLUGIN_INIT).lstrip())
    site.repo.write("hello/alpha.py", f'STAMP = "{stamp}"\nSEQ = {seq}\nWORK_FAILS = {fails}\n')
    for module in ("beta", "gamma", "lazy"):
        site.repo.write(f"hello/{module}.py", f'STAMP = "{stamp}"\n')
    site.repo.write("hello/templates/stamp.txt", f"{stamp}\n")
    sha = site.repo.commit(f"hello {stamp}")
    site.commits[seq] = sha
    return sha


def get(port: int, path: str, client: str) -> tuple[int, dict[str, t.Any] | None]:
    """GET ``path`` as the client at ``client`` (a PROXY protocol v1 line first)."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(
            f"PROXY TCP4 {client} 127.0.0.1 40000 {port}\r\n"
            f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode()
        )
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    try:
        return status, json.loads(body)
    except ValueError:
        return status, None


def wait_for(what: str, predicate: t.Callable[[], t.Any], timeout: float = 60.0) -> t.Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.05)


class Load:
    """Client threads asking ``/hello/`` (and ``/hello/work``) from many addresses, all along."""

    def __init__(self, port: int, threads: int = 4) -> None:
        self.port = port
        self.stop = threading.Event()
        self.lock = threading.Lock()
        #: ``(path, client, status, body)`` of every answer.
        self.answers: list[tuple[str, str, int, dict[str, t.Any] | None]] = []
        self.failures: list[str] = []
        #: Set once a release with ``/hello/work`` serves everyone (r000 has none).
        self.work = threading.Event()
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(threads)]

    def _run(self, index: int) -> None:
        n = 0
        while not self.stop.is_set():
            n += 1
            client = f"10.{index}.{n // 250 % 250}.{n % 250}"
            path = "/hello/work" if n % 2 and self.work.is_set() else "/hello/"
            try:
                status, body = get(self.port, path, client)
            except OSError as exc:
                with self.lock:
                    self.failures.append(f"{path} from {client}: {exc!r}")
                continue
            with self.lock:
                self.answers.append((path, client, status, body))

    def __enter__(self) -> Load:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: t.Any) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=60)


def test_canaries_under_gunicorn_split_judge_and_fail_no_request(site: Site) -> None:
    # r000 is live (the fixture); from now on new releases go through a canary.
    site.config.write_text(site.config.read_text().replace(
        "plugins:", f"canary: {json.dumps(CANARY)}\nplugins:"))
    with gunicorn(site, "--proxy-protocol", "v1", workers=3) as server, Load(server.port) as load:
        wait_for("answers from the load", lambda: len(load.answers) > 20)
        # The controller polls once when elected: after that, only this test's deploys deploy.
        wait_for("the controller's first poll", server.controller_polled)

        # 1. A healthy canary: the split, the same in every worker; then promoted by itself.
        r1 = release(site, 1)
        done = site.cli("deploy", "hello", "--json")
        record = json.loads(done.stdout)
        assert done.returncode == 0 and (record["result"], record["stage"]) == ("running", "canary"), done
        token = r1[:12]
        threshold = round(CANARY["percent"] * BUCKETS / 100)

        def expected(client: str) -> str:
            return r1 if bucket(token, client) < threshold else site.commits[0]

        probes = [f"172.16.{i // 100}.{i % 100}" for i in range(200)]
        canary_pids: set[int] = set()

        def every_worker_split() -> bool:
            for client in probes[:30]:
                status, body = get(server.port, "/hello/", client)
                assert status == 200 and body is not None
                if body["commit"] == r1:
                    canary_pids.add(body["pid"])
            return len(canary_pids) == 3

        wait_for("the canary in all 3 workers", every_worker_split)
        seen: dict[str, set[tuple[str, int]]] = {}
        for client in probes:
            for _ in range(2):
                status, body = get(server.port, "/hello/", client)
                assert status == 200 and body is not None, (status, body)
                seen.setdefault(client, set()).add((body["commit"], body["pid"]))
        status = site.cli_json("status")["plugins"][0]
        assert status["canary"] is not None, ("the canary was decided before the split check ended", status)
        wrong = {c: s for c, s in seen.items() if {commit for commit, _ in s} != {expected(c)}}
        assert not wrong, wrong
        assert len({pid for s in seen.values() for _, pid in s}) == 3  # every worker answered probes
        share = sum(1 for c in probes if expected(c) == r1) / len(probes)
        assert 0.20 <= share <= 0.40, share
        wait_for("the promotion", lambda: site.cli_json("status")["plugins"][0]["live_commit"] == r1
                 and site.cli_json("status")["plugins"][0]["canary"] is None)
        promoted = next(r for r in site.history() if r["id"] == record["id"])
        assert (promoted["result"], promoted["commit"]) == ("live", r1), promoted
        figures = promoted["canary"]
        assert figures["canary"]["errors"] == 0 and figures["canary"]["requests"] >= CANARY["min_requests"]
        assert figures["decision"].startswith("promoted: canary 0 errors in")
        wait_for("every worker on r001", lambda: set(site.cli_json("status")["plugins"][0]["workers"].values()) == {r1})
        load.work.set()

        # 2. A canary whose /hello/work raises: rolled back by itself, failed at stage canary.
        r2 = release(site, 2, fails=True)
        second = site.cli_json("deploy", "hello")
        assert (second["result"], second["stage"], second["commit"]) == ("running", "canary", r2)
        wait_for("the automatic rollback",
                 lambda: next(r for r in site.history() if r["id"] == second["id"])["result"] != "running")
        rolled = next(r for r in site.history() if r["id"] == second["id"])
        assert (rolled["result"], rolled["stage"]) == ("failed", "canary"), rolled
        assert rolled["canary"]["canary"]["errors"] >= 1 and rolled["canary"]["stable"]["errors"] == 0, rolled
        assert "canary rolled back" in rolled["error"], rolled
        assert site.cli_json("status")["plugins"][0]["live_commit"] == r1

        # 3. A canary aborted by hand over the API.
        r3 = release(site, 3)
        code, third = server.api("POST", "/plugins/hello/deploy", {"wait": True})
        assert code == 202 and (third["stage"], third["commit"]) == ("canary", r3), (code, third)
        wait_for("answers from the third canary", lambda: any(
            body and body.get("commit") == r3 for _, _, _, body in list(load.answers)[-400:]))
        code, aborted = server.api("POST", "/plugins/hello/abort")
        assert code == 200 and (aborted["result"], aborted["stage"]) == ("failed", "canary"), aborted
        wait_for("every worker back on r001 alone", lambda: all(
            get(server.port, "/hello/", f"172.17.0.{i}")[1]["commit"] == r1 for i in range(40)))
        time.sleep(0)  # the load keeps running until the block ends

    assert not load.failures, load.failures[:5]
    by_commit = {sha: seq for seq, sha in site.commits.items()}
    for path, client, status, body in load.answers:
        if path == "/hello/":
            assert status == 200 and body is not None, (path, client, status, body)
            stamps = set(body["stamps"])
            assert stamps == {label(body["seq"])} and by_commit[body["commit"]] == body["seq"], body
        elif status != 200:
            # Only the erring canary r002 answers 500, only on /hello/work.
            assert status == 500, (path, client, status)
    failing = [a for a in load.answers if a[0] == "/hello/work" and a[2] == 500]
    assert failing, "the erring canary served none of the load's /hello/work requests"
