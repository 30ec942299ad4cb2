"""A fleet: several real servers (one under gunicorn) sharing one real PostgreSQL database.

README, "Running a fleet". Each host has its own port, ``data_dir`` and
``host_id``; a deploy decided by one host (the leader) reaches every host.
Every wait polls the hosts' answers with a deadline; no fixed sleeps.
"""

from __future__ import annotations

import re
import threading
import typing as t
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from fleet import TOKEN, Host, leader_of, stop_hosts
from gitrepo import GitRepo
from pgserver import fresh_database
from serverproc import request, run_cli, wait_for, write_version
from tcpproxy import TcpProxy

#: Generous deadlines: a loaded 2-core machine is slow, not wrong.
CONVERGE_S = 30.0

SLOW_GATE_TEST = """\
import time


def test_slow():
    time.sleep(30)
"""


class Fleet:
    def __init__(self, root: Path, db_url: str) -> None:
        self.root = root
        self.db_url = db_url
        self.repo = GitRepo(root / "hello-repo")
        self.hosts: list[Host] = []

    def host(
        self, host_id: str, *, workers: int = 0, state_url: str | None = None,
        more: t.Mapping[str, str] | None = None, settings: t.Mapping[str, t.Any] | None = None,
    ) -> Host:
        host = Host(self.root, host_id, state_url or self.db_url, self.repo.url, workers=workers, more=more,
                    settings=settings)
        self.hosts.append(host)
        return host

    def all_serve(self, sha: str, hosts: t.Iterable[Host] | None = None) -> bool:
        return all(h.serves(sha) for h in (hosts if hosts is not None else self.running()))

    def running(self) -> list[Host]:
        return [h for h in self.hosts if h.proc is not None]

    def wait_all_serve(self, sha: str, what: str, hosts: t.Iterable[Host] | None = None) -> None:
        chosen = list(hosts) if hosts is not None else self.running()
        wait_for(
            lambda: self.all_serve(sha, chosen), timeout=CONVERGE_S, interval=0.05,
            what=f"{what}: every host serving {sha[:12]} "
                 f"(now {[(h.host_id, h.answer()) for h in chosen]})",
        )

    def test_runs(self) -> int:
        return sum(len(h.test_logs()) for h in self.hosts)


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    with fresh_database("gitplug_fleet") as url:
        made = Fleet(tmp_path, url)
        try:
            yield made
        finally:
            stop_hosts(made.hosts)


def start_fleet(
    fleet: Fleet, *, b_url: str | None = None, settings: t.Mapping[str, t.Any] | None = None
) -> tuple[Host, Host, Host, str]:
    """web-1 (serve) leads; web-2 (serve) and web-3 (gunicorn, 2 workers) follow. v1 is live."""
    v1 = write_version(fleet.repo, "hello", "v1", gate_test=True)
    fleet.repo.tag("v1")
    a = fleet.host("web-1", settings=settings).start()
    wait_for(lambda: leader_of(a) == "web-1", timeout=CONVERGE_S, what="web-1 leading the fleet")
    b = fleet.host("web-2", state_url=b_url, settings=settings).start()
    c = fleet.host("web-3", workers=2, settings=settings).start()
    fleet.wait_all_serve(v1, "the first poll")
    return a, b, c, v1


def test_one_deploy_reaches_every_host(fleet: Fleet) -> None:
    a, b, c, v1 = start_fleet(fleet)
    assert fleet.test_runs() == 1  # the leader tested v1; the others did not

    # Status on any host shows every host (once each has beaten), live on v1, web-1 leading.
    # (A host's beat says what it serves every 2 s: the first may predate its first swap.)
    wait_for(
        lambda: [e["state"] for e in c.status()["hosts"].values()] == ["live"] * 3,
        timeout=CONVERGE_S, what="three hosts live in the status",
    )
    hosts = c.status()["hosts"]
    assert set(hosts) == {"web-1", "web-2", "web-3"}
    assert {h: e["state"] for h, e in hosts.items()} == dict.fromkeys(hosts, "live")
    assert {e["live_commit"] for e in hosts.values()} == {v1}
    assert [h for h, e in hosts.items() if e["leader"]] == ["web-1"]
    # ... as do the command line and the metrics of any host.
    shown = run_cli("status", "-c", b.config, env=b.env())
    assert shown.returncode == 0, shown.stderr
    for host_id in ("web-1 (leader)", "web-2", "web-3"):
        assert f"host {host_id}: live  {v1[:12]}" in shown.stdout, shown.stdout
    code, metrics = request("GET", f"{c.base}/_gitplug/metrics", headers={"Authorization": f"Bearer {TOKEN}"})
    assert code == 200
    page = a.status_page()
    assert "<dt>Hosts</dt>" in page and "web-1 (leader)" in page and "web-3" in page
    for host_id in ("web-1", "web-2", "web-3"):
        assert f'gitplug_host_up{{host="{host_id}"}} 1.0' in metrics
        assert f'gitplug_host_release{{commit="{v1}",host="{host_id}",plugin="hello",state="live"}} 1.0' in metrics

    # A webhook reaching a follower deploys on the whole fleet, tested once.
    v2 = write_version(fleet.repo, "hello", "v2", gate_test=True)
    status, body = b.hook(fleet.repo.url, v2)
    assert status == 202 and body["queued"] == ["hello"], body
    fleet.wait_all_serve(v2, "webhook to web-2")
    assert fleet.test_runs() == 2
    record = a.status()["last_deploy"]
    assert (record["trigger"], record["result"], record["commit"], record["host"]) == ("webhook", "live", v2, "web-1")

    # A rollback through the gunicorn host pins the fleet on v1.
    status, body = c.api("POST", "/plugins/hello/rollback", {"ref": "v1"})
    assert status == 200 and body["commit"] == v1, body
    fleet.wait_all_serve(v1, "rollback through web-3")
    assert all(h.status()["pin"] == "v1" for h in (a, b, c))

    # Pinned: a push is ignored by every host; the last push deployed in
    # well under CONVERGE_S, so "nothing happened" is meaningful.
    deploys_before = len(a.api("GET", "/plugins/hello/history")[1])
    v3 = write_version(fleet.repo, "hello", "v3", gate_test=True)
    status, body = a.hook(fleet.repo.url, v3)
    assert status == 200 and body["status"] == "pinned", body
    assert fleet.all_serve(v1)
    assert len(a.api("GET", "/plugins/hello/history")[1]) == deploys_before

    # Resume through web-2: the fleet follows main again, v3 everywhere.
    status, body = b.api("POST", "/plugins/hello/resume")
    assert status == 200, body
    fleet.wait_all_serve(v3, "resume through web-2")
    assert all(h.status()["pin"] is None for h in (a, b, c))

    # Stop through web-3 unmounts the plugin on every host; start through web-1 brings it back.
    status, body = c.api("POST", "/plugins/hello/stop")
    assert status == 200, body
    wait_for(
        lambda: all(h.answer().startswith("404 ") for h in (a, b, c, c, c, c)),
        timeout=CONVERGE_S, what="every host stopping the plugin",
    )
    status, body = a.api("POST", "/plugins/hello/start")
    assert status == 200, body
    fleet.wait_all_serve(v3, "start through web-1")

    # A commit that does not load changes no host.
    broken = write_version(fleet.repo, "hello", "v4", gate_test=True, broken=True)
    status, body = c.hook(fleet.repo.url, broken)
    assert status == 202, body
    wait_for(
        lambda: (a.status()["last_deploy"] or {}).get("commit") == broken
        and a.status()["last_deploy"]["result"] == "failed",
        timeout=CONVERGE_S, what="the broken commit's deploy failing",
    )
    assert a.status()["last_deploy"]["stage"] == "load"
    assert fleet.all_serve(v3)
    assert {e["state"] for e in a.status()["hosts"].values()} == {"live"}


def _diverged_on(host: Host, host_id: str, sha: str) -> str | None:
    """The error ``host``'s status shows for ``host_id`` when it is diverged naming ``sha``, else None."""
    entry = host.status()["hosts"].get(host_id, {})
    error = entry.get("error") or ""
    return error if entry.get("state") == "diverged" and sha[:12] in error else None


def test_a_follower_refuses_a_commit_whose_tree_is_not_the_tested_one(fleet: Fleet) -> None:
    v1 = write_version(fleet.repo, "hello", "v1", gate_test=True)
    a = fleet.host("web-1").start()
    wait_for(lambda: leader_of(a) == "web-1", timeout=CONVERGE_S, what="web-1 leading the fleet")
    b = fleet.host("web-2").start()
    fleet.wait_all_serve(v1, "the first poll")

    # The branch is force-pushed between the leader's test and web-2's fetch:
    # web-2 (down meanwhile) cannot find the tested commit and keeps v1.
    b.stop()
    v2 = write_version(fleet.repo, "hello", "v2", gate_test=True)
    status, body = a.hook(fleet.repo.url, v2)
    assert status == 202, body
    fleet.wait_all_serve(v2, "the leader deploying v2", [a])
    fleet.repo.set_ref("refs/heads/main", v1)
    v2b = write_version(fleet.repo, "hello", "v2-rewritten")
    assert v2b != v2
    b.start()
    wait_for(lambda: _diverged_on(a, "web-2", v2), timeout=CONVERGE_S, what="web-2 diverged on v2")
    error = _diverged_on(a, "web-2", v2) or ""
    assert "is not in" in error and "trying again in" in error, error
    assert b.serves(v1) and a.serves(v2)

    # The git server catches up (a lagging replica): web-2 fetches again by
    # itself and serves v2, with no new commit and no configuration change.
    fleet.repo.set_ref("refs/heads/main", v2)
    fleet.wait_all_serve(v2, "web-2 fetching v2 again", [b])
    wait_for(
        lambda: a.status()["hosts"].get("web-2", {}).get("state") == "live",
        timeout=CONVERGE_S, what="web-2 live again after the retry",
    )

    # The tree check itself: web-2's configuration drifted (path: sub), so it
    # would stage another tree of the tested commit than the leader tested.
    config = yaml.safe_load(b.config.read_text())
    config["plugins"]["hello"]["path"] = "sub"
    b.config.write_text(yaml.safe_dump(config, sort_keys=False))
    wait_for(lambda: "changed ['hello']" in b.log(), timeout=CONVERGE_S, what="web-2 reloading its configuration")
    fleet.repo.write("sub/hello/__init__.py", (fleet.repo.path / "hello" / "__init__.py").read_text())
    v3 = write_version(fleet.repo, "hello", "v3", gate_test=True)
    status, body = a.hook(fleet.repo.url, v3)
    assert status == 202, body
    fleet.wait_all_serve(v3, "the leader deploying v3", [a])
    wait_for(lambda: _diverged_on(a, "web-2", v3), timeout=CONVERGE_S, what="web-2 diverged on v3")
    error = _diverged_on(a, "web-2", v3) or ""
    assert "gives tree" in error and "on the host that tested it" in error, error
    assert b.serves(v2)  # its last good release
    assert not (b.data_dir / "releases" / "hello" / v3).exists()  # nothing of it staged
    assert not b.test_logs()  # a follower never runs the tests
    shown = run_cli("status", "-c", b.config, env=b.env())
    assert "host web-2: diverged" in shown.stdout, shown.stdout

    # The configuration repaired, web-2 serves the fleet's release at once.
    del config["plugins"]["hello"]["path"]
    b.config.write_text(yaml.safe_dump(config, sort_keys=False))
    fleet.wait_all_serve(v3, "web-2 after the repair")
    wait_for(
        lambda: a.status()["hosts"].get("web-2", {}).get("state") == "live",
        timeout=CONVERGE_S, what="web-2 live again",
    )
    assert a.status()["hosts"]["web-2"]["error"] is None
    assert not b.test_logs()


def _at_once(*calls: t.Callable[[], tuple[int, t.Any]]) -> list[tuple[int, t.Any]]:
    """Run ``calls`` in threads released together; their answers, in order."""
    barrier = threading.Barrier(len(calls))
    answers: list[tuple[int, t.Any]] = [(0, None)] * len(calls)

    def run(index: int) -> None:
        barrier.wait(timeout=30)
        answers[index] = calls[index]()

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(len(calls))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=CONVERGE_S * 2)
    assert not any(thread.is_alive() for thread in threads), "an operator's call did not return"
    return answers


def _finished_at(record: dict[str, t.Any]) -> float:
    from gitplug.state import parse_iso

    return parse_iso(record["started_at"]).timestamp() + float(record["duration_s"] or 0.0)


def test_operators_on_two_hosts_at_once_leave_the_fleet_on_one_release(fleet: Fleet) -> None:
    a, b, c, v1 = start_fleet(fleet)
    v2 = write_version(fleet.repo, "hello", "v2", gate_test=True)
    fleet.repo.tag("v2")
    status, body = a.hook(fleet.repo.url, v2)
    assert status == 202, body
    fleet.wait_all_serve(v2, "v2 by webhook")
    commits = {"v1": v1, "v2": v2}

    seen = 0
    for first, second in (("v1", "v2"), ("v2", "v1"), ("v1", "v2")):
        # Two operators, on web-2 and on web-3 (a gunicorn worker), roll back
        # to different tags at the same moment.
        answers = _at_once(
            lambda ref=first: b.api("POST", "/plugins/hello/rollback", {"ref": ref}),  # type: ignore[misc]
            lambda ref=second: c.api("POST", "/plugins/hello/rollback", {"ref": ref}),  # type: ignore[misc]
        )
        assert [code for code, _ in answers] == [200, 200], answers
        history = a.api("GET", "/plugins/hello/history")[1]
        rollbacks = sorted((r for r in history if r["trigger"] == "rollback" and r["id"] > seen),
                           key=lambda r: r["id"])
        assert len(rollbacks) == 2, rollbacks
        seen = rollbacks[-1]["id"]
        earlier, later = rollbacks
        # One after the other, never interleaved (a small allowance for rounding) ...
        assert _finished_at(earlier) <= parse_started(later) + 0.05, rollbacks
        # ... and the later decision is the fleet's: its commit live, its tag pinned, everywhere.
        decided = commits[later["ref"]]
        assert later["commit"] == decided and later["result"] in ("live", "skipped"), later
        fleet.wait_all_serve(decided, f"the rollbacks to {first} and {second}")
        for host in (a, b, c):
            shown = host.status()
            assert (shown["pin"], shown["live_commit"]) == (later["ref"], decided), (host.host_id, shown)

    # A stop on one host and a rollback on another at once: the later one wins everywhere.
    answers = _at_once(
        lambda: b.api("POST", "/plugins/hello/stop"),
        lambda: c.api("POST", "/plugins/hello/rollback", {"ref": "v2"}),
    )
    assert [code for code, _ in answers] == [200, 200], answers
    state = a.status()
    if state["state"] == "stopped":
        wait_for(lambda: all(h.answer().startswith("404 ") for h in (a, b, c, c, c, c)),
                 timeout=CONVERGE_S, what="every host stopping the plugin")
        status, body = a.api("POST", "/plugins/hello/start")
        assert status == 200, body
    else:  # (live_commit is what web-1 serves: it may still be converging from the stop)
        wait_for(
            lambda: (lambda shown: (shown["state"], shown["live_commit"], shown["pin"]))(a.status())
            == ("live", v2, "v2"),
            timeout=CONVERGE_S, what="the rollback after the stop, live on v2 and pinned",
        )
    fleet.wait_all_serve(v2, "the plugin live on v2")

    # Resume through web-3 puts every host back on the branch.
    status, body = c.api("POST", "/plugins/hello/resume")
    assert status == 200, body
    fleet.wait_all_serve(v2, "resume")
    assert all(h.status()["pin"] is None for h in (a, b, c))
    assert fleet.test_runs() == 2  # v1 and v2 were tested once each, fleet-wide


def parse_started(record: dict[str, t.Any]) -> float:
    from gitplug.state import parse_iso

    return parse_iso(record["started_at"]).timestamp()


SLEEPY_GATE_TEST = """\
import time


def test_takes_a_while():
    time.sleep(3)
"""


def test_two_plugins_deploy_on_two_hosts_at_once(fleet: Fleet) -> None:
    world = GitRepo(fleet.root / "world-repo")
    v1 = {"hello": write_version(fleet.repo, "hello", "v1", gate_test=True),
          "world": write_version(world, "world", "v1", gate_test=True)}
    more = {"world": world.url}
    a = fleet.host("web-1", more=more).start()
    b = fleet.host("web-2", more=more).start()
    for name in ("hello", "world"):
        wait_for(lambda name=name: all(v1[name][:12] in h.answer(name) for h in (a, b)),  # type: ignore[misc]
                 timeout=CONVERGE_S, what=f"{name} v1 on both hosts")
    # One lease per plugin, shared out: each host leads one of the two.
    wait_for(
        lambda: {leader_of(a, "hello"), leader_of(a, "world")} == {"web-1", "web-2"},
        timeout=CONVERGE_S, what="each host leading one plugin",
    )

    # A push to each: the two test runs (3 s each) happen at once, each on its plugin's leader.
    for repo in (fleet.repo, world):
        repo.write("tests/test_slow.py", SLEEPY_GATE_TEST)
    v2 = {"hello": write_version(fleet.repo, "hello", "v2", gate_test=True),
          "world": write_version(world, "world", "v2", gate_test=True)}
    assert a.hook(fleet.repo.url, v2["hello"])[0] == 202
    assert a.hook(world.url, v2["world"])[0] == 202
    for name in ("hello", "world"):
        wait_for(lambda name=name: all(v2[name][:12] in h.answer(name) for h in (a, b)),  # type: ignore[misc]
                 timeout=CONVERGE_S, what=f"{name} v2 on both hosts")
    records = {}
    for name in ("hello", "world"):
        history = a.api("GET", f"/plugins/{name}/history")[1]
        records[name] = next(r for r in history if r["commit"] == v2[name] and r["result"] == "live")
    hello, world_record = records["hello"], records["world"]
    assert hello["host"] != world_record["host"], records
    assert parse_started(hello) < _finished_at(world_record), records  # the two runs overlapped
    assert parse_started(world_record) < _finished_at(hello), records
    assert len(a.test_logs()) + len(b.test_logs()) == 2  # hello's runs; each tested once (v1, v2)


ERRING_PLUGIN = """\
from gitplug import Plugin, current_plugin

plugin = Plugin("hello", __name__)


@plugin.route("/")
def index():
    return "hello v2 " + current_plugin.commit[:12]


@plugin.route("/work")
def work():
    return "v2 cannot work", 500
"""


def test_auto_rollback_counts_the_requests_of_every_host(fleet: Fleet) -> None:
    # 20 requests judge a release; each follower gets 12 of them: no host alone
    # reaches 20, the fleet does. The leader (web-1) gets none.
    policy = {"max_error_rate": 0.2, "min_requests": 20, "window": 120}
    a, b, c, v1 = start_fleet(fleet, settings={"auto_rollback": policy})
    fleet.repo.write("hello/__init__.py", ERRING_PLUGIN)
    v2 = fleet.repo.commit("hello v2: /work answers 500")
    status, body = b.hook(fleet.repo.url, v2)
    assert status == 202, body
    # Waited for through every worker's heartbeat (the plugin's own URLs would count as requests).
    wait_for(
        lambda: list(a.status()["workers"].values()) == [v2] * 4,
        timeout=CONVERGE_S, what="every worker of every host on v2",
    )
    codes = [request("GET", f"{host.base}/hello/work")[0] for host in (b, c) for _ in range(12)]
    assert codes == [500] * 24
    wait_for(
        lambda: any(r["trigger"] == "auto-rollback" and r["result"] != "running"
                    for r in a.api("GET", "/plugins/hello/history")[1]),
        timeout=CONVERGE_S, what="the fleet's auto-rollback",
    )
    record = next(r for r in a.api("GET", "/plugins/hello/history")[1] if r["trigger"] == "auto-rollback")
    assert record["result"] == "live" and record["commit"] == v1, record
    assert re.search(r"error rate 100% \((2[0-4]) of \1 requests\)", record["error"]), record["error"]
    fleet.wait_all_serve(v1, "the auto-rollback")
    assert all(h.status()["pin"] == v1 for h in (a, b, c))


def test_a_killed_leader_is_replaced_and_no_host_serves_a_half_deploy(fleet: Fleet) -> None:
    a, b, c, v1 = start_fleet(fleet)
    fleet.repo.write("tests/test_slow.py", SLOW_GATE_TEST)
    slow = write_version(fleet.repo, "hello", "v2", gate_test=True)
    status, body = b.hook(fleet.repo.url, slow)
    assert status == 202, body
    wait_for(
        lambda: (b.status()["last_deploy"] or {}).get("result") == "running"
        and b.status()["last_deploy"]["commit"] == slow,
        timeout=CONVERGE_S, what="the leader testing v2",
    )
    a.kill()  # SIGKILL of the lease holder in the middle of the test gate
    # Another host takes the lease within 15 s and records the deploy interrupted.
    wait_for(lambda: leader_of(b) in ("web-2", "web-3"), timeout=15 + 5, what="a new leader")
    wait_for(
        lambda: any(
            r["commit"] == slow and r["result"] == "interrupted"
            for r in b.api("GET", "/plugins/hello/history")[1]
        ),
        timeout=CONVERGE_S, what="the killed leader's deploy recorded interrupted",
    )
    assert fleet.all_serve(v1, [b, c])  # nothing half-deployed anywhere
    # The new leader polls and runs the deploy again (30 s test: still running).
    wait_for(
        lambda: any(
            r["commit"] == slow and r["result"] == "running" and r["host"] != "web-1"
            for r in b.api("GET", "/plugins/hello/history")[1]
        ),
        timeout=CONVERGE_S, what="the new leader deploying v2 again",
    )
    assert fleet.all_serve(v1, [b, c])
    # The dead host is shown lost, not dropped.
    wait_for(
        lambda: b.status()["hosts"].get("web-1", {}).get("state") == "lost",
        timeout=CONVERGE_S, what="web-1 shown lost",
    )


def test_a_host_cut_off_from_the_database_keeps_serving_and_catches_up(fleet: Fleet) -> None:
    proxy = TcpProxy(("127.0.0.1", _pg_port(fleet.db_url)))
    try:
        a, b, c, v1 = start_fleet(fleet, b_url=proxy.url_for(fleet.db_url.rsplit("/", 1)[1]))
        failures: list[str] = []
        served = [0]
        stop = threading.Event()

        def hammer() -> None:
            while not stop.is_set():
                answer = b.answer()
                served[0] += 1
                if not answer.startswith("200 "):
                    failures.append(answer)

        load = threading.Thread(target=hammer, daemon=True)
        load.start()
        try:
            proxy.cut()
            wait_for(lambda: "unreachable" in b.log(), timeout=CONVERGE_S, what="web-2 noticing the cut")
            v2 = write_version(fleet.repo, "hello", "v2", gate_test=True)
            status, body = a.hook(fleet.repo.url, v2)
            assert status == 202, body
            fleet.wait_all_serve(v2, "the hosts still connected", [a, c])
            assert b.serves(v1)  # cut off: it keeps its release
            proxy.restore()
            fleet.wait_all_serve(v2, "web-2 back on the database", [b])
        finally:
            stop.set()
            load.join(timeout=15)
        assert failures == [] and served[0] > 20, (failures[:5], served[0])

        # A restart while the database is unreachable serves the last live release.
        b.stop()
        proxy.cut()
        b.start()
        assert b.serves(v2)
        proxy.restore()

        # A new host with an empty data_dir joins and converges.
        d = fleet.host("web-4").start()
        fleet.wait_all_serve(v2, "web-4 joining", [d])
        assert not d.test_logs()  # it did not run the tests again
        wait_for(
            lambda: a.status()["hosts"].get("web-4", {}).get("state") == "live",
            timeout=CONVERGE_S, what="web-4 live in the fleet's status",
        )
    finally:
        proxy.close()


def _pg_port(url: str) -> int:
    from urllib.parse import urlsplit

    return urlsplit(url).port or 5432

