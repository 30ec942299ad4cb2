"""A canary across a fleet: two ``gitplug serve`` hosts on one PostgreSQL database
(README "Canary releases" and "Running a fleet").

web-1 starts first and leads ``hello``; web-2 follows. v1 goes live on both, then v2 is pushed
and runs as a 50 % canary. The README promises that the split is the same on every host, that
the requests and errors of every worker of every host count (they are summed in the store),
that the plugin's leader judges on that sum and that its decision holds for the whole fleet.

Clients connect from loopback addresses of their own (``127.0.0.N`` bound as the source address,
so each host places them by ``REMOTE_ADDR``) and keep the canary cookie they are given. The test
knows in advance which side an address belongs to (:func:`gitplug.runtime.canary.bucket` of the
canary's commit), and every answer of ``/hello/`` names the commit that served it, so it counts
exactly what each side of each host was sent. No plugin URL is asked before the canary starts
(the hosts' v1 is awaited through the workers' heartbeats), so the fleet's figures must equal
those counts. Every wait polls with a deadline; no fixed sleeps.

* a healthy v2: both hosts show one canary and serve one split (a client gets the same side, and
  the same cookie, from either host; a cookie names its side on the other host from any address);
  the API of either host shows the sum of what both were sent; half of ``min_requests`` to each
  host (neither alone reaches it) and the leader promotes v2, which both hosts then serve to all;
* a v2 whose route raises, its errors sent half to each host: the leader rolls it back by itself
  for the fleet (both serve v1 to all); the history says ``failed`` at ``canary`` with both sides'
  figures, equal to what was sent;
* ``gitplug rollback`` and ``gitplug stop`` (command lines, so both servers must follow the
  store) end a running canary on both hosts (``superseded``) and act at once.
"""

from __future__ import annotations

import functools
import http.client
import typing as t
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from fleet import Host, leader_of, stop_hosts
from gitplug.runtime.canary import BUCKETS, COOKIE_PREFIX, bucket
from gitrepo import GitRepo
from pgserver import fresh_database
from serverproc import run_cli, wait_for

#: Generous: a loaded 2-core machine is slow, not wrong.
CONVERGE_S = 30.0
PERCENT = 50

PLUGIN = """\
from gitplug import Plugin, current_plugin

plugin = Plugin("hello", __name__)


@plugin.route("/")
def index():
    return current_plugin.commit


@plugin.route("/work")
def work():
{work}
"""

WORK = {
    "healthy": "    return current_plugin.commit",
    "raise": '    raise RuntimeError("this release cannot work")',
}


# -- the fleet -----------------------------------------------------------------------------------


class Fleet:
    def __init__(self, root: Path, db_url: str) -> None:
        self.root = root
        self.db_url = db_url
        self.repo = GitRepo(root / "hello-repo")
        self.hosts: list[Host] = []

    def commit(self, version: str, work: str = "healthy") -> str:
        self.repo.write("hello/__init__.py", PLUGIN.format(work=WORK[work]))
        self.repo.write("hello/VERSION", version + "\n")
        return self.repo.commit(f"hello {version} ({work})")

    def start(self, canary: dict[str, t.Any]) -> tuple[Host, Host, str]:
        """web-1 (leading) and web-2, both ``gitplug serve``, serving v1 (a first release goes live)."""
        v1 = self.commit("v1")
        settings = {"canary": canary}
        a = Host(self.root, "web-1", self.db_url, self.repo.url, gate=False, settings=settings)
        self.hosts.append(a)
        a.start()
        wait_for(lambda: leader_of(a) == "web-1", timeout=CONVERGE_S, what="web-1 leading hello")
        b = Host(self.root, "web-2", self.db_url, self.repo.url, gate=False, settings=settings)
        self.hosts.append(b)
        b.start()
        # Through the workers' heartbeats: a request to the plugin would count.
        wait_for(lambda: list(a.status()["workers"].values()) == [v1, v1], timeout=CONVERGE_S,
                 what="both hosts serving v1")
        wait_for(lambda: all(h.status()["live_commit"] == v1 for h in (a, b)), timeout=CONVERGE_S,
                 what="both hosts' runtimes live on v1")
        return a, b, v1


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    with fresh_database("gitplug_canary_fleet") as url:
        made = Fleet(tmp_path, url)
        try:
            yield made
        finally:
            stop_hosts(made.hosts)


# -- clients -------------------------------------------------------------------------------------


@dataclass
class Client:
    address: str
    #: The side its address belongs to for the canary of ``token``: "canary" or "stable".
    side: str
    cookie: str | None = None


@dataclass
class Answer:
    status: int
    body: str
    set_cookie: str | None


@dataclass
class Tally:
    """What each host was sent, per side, as the answers said: {host_id: {side: [requests, errors]}}."""

    by_host: dict[str, dict[str, list[int]]] = field(default_factory=dict)

    def add(self, host: Host, side: str, error: bool) -> None:
        sides = self.by_host.setdefault(host.host_id, {"stable": [0, 0], "canary": [0, 0]})
        sides[side][0] += 1
        sides[side][1] += int(error)

    def of(self, host: Host, side: str) -> tuple[int, int]:
        requests, errors = self.by_host.get(host.host_id, {}).get(side, [0, 0])
        return requests, errors

    def total(self, side: str) -> tuple[int, int]:
        sides = [s[side] for s in self.by_host.values()]
        return sum(s[0] for s in sides), sum(s[1] for s in sides)


class Traffic:
    """Clients of one canary (commit ``v2`` beside ``v1``), and what they were sent."""

    def __init__(self, v1: str, v2: str) -> None:
        self.commits = {"stable": v1, "canary": v2}
        self.token = v2[:12]
        self.tally = Tally()
        threshold = round(PERCENT * BUCKETS / 100)
        self.clients = {
            side: [Client(f"127.0.0.{n}", side) for n in range(2, 250)
                   if (bucket(self.token, f"127.0.0.{n}") < threshold) == (side == "canary")]
            for side in ("stable", "canary")
        }
        assert min(len(c) for c in self.clients.values()) >= 20, self.clients

    def client(self, side: str, index: int) -> Client:
        return self.clients[side][index]

    def get(self, host: Host, path: str, address: str, cookie: str | None) -> Answer:
        conn = http.client.HTTPConnection("127.0.0.1", host.port, timeout=15, source_address=(address, 0))
        try:
            conn.request("GET", path, headers={"Cookie": cookie} if cookie else {})
            response = conn.getresponse()
            set_cookie = response.getheader("Set-Cookie")
            return Answer(response.status, response.read().decode(errors="replace"),
                          set_cookie.split(";")[0] if set_cookie else None)
        finally:
            conn.close()

    def visit(self, host: Host, client: Client, path: str = "/hello/", *, keep_cookie: bool = True,
              cookie: str | None | bool = True) -> Answer:
        """One request of ``client`` to ``host`` during the split; checks and counts the side it got.

        ``cookie``: True sends the client's own cookie, None none, a string that cookie.
        """
        sent = client.cookie if cookie is True else cookie or None
        answer = self.get(host, path, client.address, sent)
        side = self.check_side(answer, sent, client)
        self.tally.add(host, side, answer.status >= 500)
        if keep_cookie and answer.set_cookie:
            client.cookie = answer.set_cookie
        return answer

    def check_side(self, answer: Answer, sent: str | None, client: Client) -> str:
        by_commit = {commit: side for side, commit in self.commits.items()}
        if answer.status == 200:
            assert answer.body in by_commit, answer
            side = by_commit[answer.body]
        else:  # only the erring canary answers 500 (an unhandled exception)
            assert answer.status == 500 and "Internal Server Error" in answer.body, answer
            side = "canary"
        expected = client.side if sent is None else ("canary" if sent.endswith(".c") else "stable")
        assert side == expected, (client, sent, answer)
        if sent is None:  # placed by its address: told its side in a cookie naming this canary
            suffix = "c" if side == "canary" else "s"
            assert answer.set_cookie == f"{COOKIE_PREFIX}hello={self.token}.{suffix}", answer
        else:  # it has its side already
            assert answer.set_cookie is None, answer
        return side

    def everyone(self) -> list[Client]:
        return [c for side in ("stable", "canary") for c in self.clients[side] if c.cookie]


def splitting(host: Host, traffic: Traffic, probe: Client) -> bool:
    """Whether ``host`` serves the canary's split now (a canary client without cookie gets v2).

    Until it does the probe is served by v1 alone (no cookie): counted as the stable side's.
    """
    answer = traffic.get(host, "/hello/", probe.address, None)
    if answer.status == 200 and answer.body == traffic.commits["stable"] and answer.set_cookie is None:
        traffic.tally.add(host, "stable", False)
        return False
    traffic.check_side(answer, None, probe)
    traffic.tally.add(host, "canary", False)
    return True


def start_canary(fleet: Fleet, a: Host, b: Host, v1: str, work: str) -> tuple[str, int, Traffic]:
    """Push v2 (webhook to the follower, web-2): both hosts show and serve the same canary."""
    v2 = fleet.commit("v2", work)
    status, body = b.hook(fleet.repo.url, v2)
    assert status == 202 and body["queued"] == ["hello"], body
    wait_for(lambda: all((h.status()["canary"] or {}).get("commit") == v2 for h in (a, b)),
             timeout=CONVERGE_S, what="both hosts showing v2's canary")
    seen = [h.status()["canary"] for h in (a, b)]
    assert seen[0] == seen[1], seen  # one canary, the same figures, seen from either host
    canary = seen[0]
    assert (canary["commit"], canary["stable_commit"], canary["percent"]) == (v2, v1, PERCENT), canary
    for host in (a, b):
        status_ = host.status()
        assert (status_["state"], status_["live_commit"]) == ("canary", v1), (host.host_id, status_)
    traffic = Traffic(v1, v2)
    probe = traffic.client("canary", 0)
    on_each((a, b), lambda host: splitting(host, traffic, probe), "serving the split")
    return v2, int(canary["deploy_id"]), traffic


def figures(host: Host) -> dict[str, tuple[int, int]] | None:
    canary = host.status()["canary"]
    if canary is None:
        return None
    return {side: (canary[side]["requests"], canary[side]["errors"]) for side in ("stable", "canary")}


def wait_counted(traffic: Traffic, *hosts: Host) -> None:
    """Until every host's API shows, as the fleet's figures, the sum of what both hosts were sent."""
    wanted = {side: traffic.tally.total(side) for side in ("stable", "canary")}
    last: list[t.Any] = []

    def counted() -> bool:
        last[:] = [figures(h) for h in hosts]
        return all(f == wanted for f in last)

    try:
        wait_for(counted, timeout=CONVERGE_S, what="the fleet's figures")
        return
    except pytest.fail.Exception:
        pass
    pytest.fail(f"the fleet's figures never became the sum of what was sent, {wanted}: sent "
                f"{traffic.tally.by_host}; the hosts last showed {last}", pytrace=False)


def send_until(traffic: Traffic, host: Host, canary_requests: int, path: str, first: int) -> None:
    """Clients from index ``first`` on (each twice: a client without a cookie is placed by its
    address, then sends the cookie it got) visit ``host``, a canary and a stable one at a time,
    until ``host`` was sent ``canary_requests`` requests on the canary's side."""
    index = first
    while traffic.tally.of(host, "canary")[0] < canary_requests:
        for side in ("canary", "stable"):
            client = traffic.client(side, index)
            for _ in range(2):
                if side == "canary" and traffic.tally.of(host, "canary")[0] >= canary_requests:
                    break
                traffic.visit(host, client, path)
        index += 1


def shown(host: Host) -> tuple[str, str | None, t.Any, str | None]:
    """``(state, live_commit, canary, pin)`` of hello on ``host``."""
    status = host.status()
    return status["state"], status["live_commit"], status["canary"], status["pin"]


def on_each(hosts: t.Iterable[Host], check: t.Callable[[Host], t.Any], what: str) -> None:
    """Wait until ``check(host)`` holds, for each host in turn."""
    for host in hosts:
        wait_for(functools.partial(check, host), timeout=CONVERGE_S, what=f"{host.host_id}: {what}")


def history_record(host: Host, deploy_id: int) -> dict[str, t.Any]:
    status, history = host.api("GET", "/plugins/hello/history")
    assert status == 200, history
    return next(r for r in history if r["id"] == deploy_id)


def serve_everyone(traffic: Traffic, hosts: tuple[Host, ...], commit: str) -> None:
    """Every client, whatever side its cookie names, is served ``commit`` by every host."""
    for host in hosts:
        for client in traffic.everyone():
            answer = traffic.get(host, "/hello/", client.address, client.cookie)
            assert (answer.status, answer.body) == (200, commit), (host.host_id, client, answer)


# -- the tests -----------------------------------------------------------------------------------


def test_one_split_counted_fleet_wide_and_promoted_by_the_leader(fleet: Fleet) -> None:
    n = 20
    a, b, v1 = fleet.start({"percent": PERCENT, "min_requests": n, "duration": 1, "max_error_rate": 0.2})
    v2, deploy_id, traffic = start_canary(fleet, a, b, v1, "healthy")

    # web-1 is sent half the canary's min_requests.
    send_until(traffic, a, n // 2, "/hello/", first=1)
    assert traffic.tally.of(a, "canary")[0] == n // 2
    wait_counted(traffic, a, b)

    # The same clients on web-2: the same side, by their cookie and by their address alone (the
    # cookie web-2 gives is the one web-1 gave); a cookie names the side from any address.
    for index in range(1, 4):
        for side in ("canary", "stable"):
            client = traffic.client(side, index)
            given = client.cookie
            traffic.visit(b, client)
            again = traffic.visit(b, client, cookie=None)
            assert again.set_cookie == given, (client, again)
    moved = Client(traffic.client("stable", 19).address, "stable")
    traffic.visit(b, moved, cookie=traffic.client("canary", 1).cookie, keep_cookie=False)
    moved = Client(traffic.client("canary", 19).address, "canary")
    traffic.visit(b, moved, cookie=traffic.client("stable", 1).cookie, keep_cookie=False)
    # ... until web-2 too had one canary request less than half: the fleet has n - 1, still running.
    send_until(traffic, b, n // 2 - 1, "/hello/", first=4)
    assert traffic.tally.of(b, "canary")[0] == n // 2 - 1
    assert traffic.tally.total("canary")[0] == n - 1
    wait_counted(traffic, a, b)
    assert history_record(a, deploy_id)["result"] == "running"

    # One more canary request, to web-2: neither host alone was sent n, the fleet was. The leader promotes.
    traffic.visit(b, traffic.client("canary", 1))
    assert [traffic.tally.of(h, "canary")[0] for h in (a, b)] == [n // 2, n // 2]
    wait_for(lambda: history_record(b, deploy_id)["result"] != "running", timeout=CONVERGE_S,
             what="the leader's verdict on v2")
    record = history_record(b, deploy_id)
    assert (record["result"], record["commit"], record["host"]) == ("live", v2, "web-1"), record
    kept = record["canary"]
    assert kept["decision"].startswith(f"promoted: canary 0 errors in {n} requests"), kept
    assert (kept["canary"]["requests"], kept["canary"]["errors"]) == (n, 0), kept
    assert (kept["stable"]["requests"], kept["stable"]["errors"]) == traffic.tally.total("stable"), kept
    assert f"canary {v2[:12]} promoted: promoted:" in a.log()  # judged on the leader ...
    assert "promoted: promoted:" not in b.log()  # ... not on the follower

    # Both hosts serve v2 to every client, whatever side its cookie named.
    on_each((a, b), lambda host: shown(host) == ("live", v2, None, None), "live on v2")
    serve_everyone(traffic, (a, b), v2)


def test_an_erring_canary_is_rolled_back_for_the_whole_fleet(fleet: Fleet) -> None:
    n = 10
    a, b, v1 = fleet.start({"percent": PERCENT, "min_requests": n, "duration": 1, "max_error_rate": 0.2})
    v2, deploy_id, traffic = start_canary(fleet, a, b, v1, "raise")

    # Half the canary's min_requests to each host, on the route that raises in v2.
    send_until(traffic, a, n // 2, "/hello/work", first=1)
    wait_counted(traffic, a, b)
    assert history_record(a, deploy_id)["result"] == "running"  # web-1's errors alone do not judge it
    send_until(traffic, b, n // 2, "/hello/work", first=1)
    assert [traffic.tally.of(h, "canary")[0] for h in (a, b)] == [n // 2, n // 2]
    wait_for(lambda: history_record(a, deploy_id)["result"] != "running", timeout=CONVERGE_S,
             what="the leader rolling v2 back")

    record = history_record(b, deploy_id)
    assert (record["result"], record["stage"], record["commit"], record["host"]) == (
        "failed", "canary", v2, "web-1"), record
    assert "above max_error_rate 20.0%" in record["error"], record
    kept = record["canary"]
    canary_sent, stable_sent = traffic.tally.total("canary"), traffic.tally.total("stable")
    assert canary_sent[1] == canary_sent[0] - 2  # the probes of the split did not err
    assert (kept["canary"]["requests"], kept["canary"]["errors"]) == canary_sent, kept
    assert (kept["stable"]["requests"], kept["stable"]["errors"]) == stable_sent, kept
    assert stable_sent[1] == 0 and stable_sent[0] > 0, stable_sent

    # Both hosts serve v1 to every client (a canary cookie now names nothing), /work works again;
    # the plugin is "behind": main's tip failed, an older commit is served.
    on_each((a, b), lambda host: shown(host) == ("behind", v1, None, None), "back on v1 alone")
    serve_everyone(traffic, (a, b), v1)
    erred = traffic.client("canary", 1)
    for host in (a, b):
        answer = traffic.get(host, "/hello/work", erred.address, erred.cookie)
        assert (answer.status, answer.body) == (200, v1), answer

    # The history, from the follower's command line: failed at stage canary, both sides' figures.
    history = run_cli("history", "hello", "-c", b.config, env=b.env(), timeout=60)
    assert history.returncode == 0, history.stdout + history.stderr
    assert f"{v2[:12]} failed      canary" in history.stdout, history.stdout
    assert (f"canary {PERCENT}%: {canary_sent[1]} errors / {canary_sent[0]} requests;"
            f" live {v1[:12]}: 0 / {stable_sent[0]}") in history.stdout, history.stdout


def test_a_rollback_or_a_stop_ends_the_canary_on_every_host(fleet: Fleet) -> None:
    # Never decides by itself: only the operators end it.
    a, b, v1 = fleet.start({"percent": PERCENT, "min_requests": 100000, "duration": 3600})
    v2, deploy_id, traffic = start_canary(fleet, a, b, v1, "healthy")
    for index in range(1, 4):
        for side in ("canary", "stable"):
            for host in (a, b):  # each side served its release by both hosts
                traffic.visit(host, traffic.client(side, index))

    # `gitplug rollback` to v1 (a command line beside web-1: neither server decides it, both must
    # follow the store): no canary; v1, pinned, for every client of both hosts.
    rolled = run_cli("rollback", "hello", v1, "-c", a.config, env=a.env(), timeout=60)
    assert rolled.returncode == 0, rolled.stdout + rolled.stderr
    record = history_record(a, deploy_id)
    assert (record["result"], record["stage"]) == ("superseded", "canary"), record
    on_each((a, b), lambda host: shown(host) == ("live", v1, None, v1), "pinned on v1")
    was_canary = traffic.client("canary", 1)
    on_each((a, b), lambda host: traffic.get(host, "/hello/", was_canary.address, was_canary.cookie).body
            == v1, "its split ended")
    serve_everyone(traffic, (a, b), v1)

    # Resumed, the branch's v2 runs a canary again on both hosts (a new deploy; the same commit, so
    # the cookies of the first one still name their sides) ...
    status, body = a.api("POST", "/plugins/hello/resume")
    assert status == 202, body
    assert (body["result"], body["stage"], body["commit"]) == ("running", "canary", v2), body
    wait_for(lambda: all((h.status()["canary"] or {}).get("commit") == v2 for h in (a, b)),
             timeout=CONVERGE_S, what="v2's second canary on both hosts")
    second = int(a.status()["canary"]["deploy_id"])
    assert second != deploy_id
    probe = traffic.client("canary", 0)
    on_each((a, b), lambda host: splitting(host, traffic, probe), "serving the second split")

    # ... and `gitplug stop` on web-2's command line ends it and unmounts the plugin on both hosts.
    stopped = run_cli("stop", "hello", "-c", b.config, env=b.env(), timeout=60)
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    record = history_record(a, second)
    assert (record["result"], record["stage"]) == ("superseded", "canary"), record
    assert "stopped during its canary" in record["error"], record
    on_each((a, b), lambda host: traffic.get(host, "/hello/", probe.address, None).status == 404,
            "hello unmounted")
    assert all(host.status()["canary"] is None for host in (a, b))
    # Started again: v1 (the live release) for everyone on both hosts, no canary.
    status, body = a.api("POST", "/plugins/hello/start")
    assert status == 200, body
    on_each((a, b), lambda host: traffic.get(host, "/hello/", probe.address, None).status == 200,
            "serving hello again")
    serve_everyone(traffic, (a, b), v1)
    for host in (a, b):
        answer = traffic.get(host, "/hello/", probe.address, None)
        assert (answer.body, answer.set_cookie) == (v1, None), answer
        assert host.status()["canary"] is None and host.status()["state"] == "live"
