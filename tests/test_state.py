"""Tests for gitplug.state: the store contract against a real SQLite file and a real
PostgreSQL database (one parametrized module), with real threads and processes.

Tests taking ``store`` or ``backend`` run once per backend; tests taking ``db``
are about the SQLite file itself.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import re
import socket
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from gitplug.errors import StateError
from gitplug.state import (
    DeployResult,
    HostInfo,
    HostPlugin,
    PluginStateValue,
    SQLiteStateStore,
    Stage,
    StateStore,
    WorkerInfo,
    open_state_store,
)
from gitplug.state import sqlite as state_module

ISO = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
FORK = multiprocessing.get_context("fork")


@pytest.fixture()
def db(tmp_path: Path) -> Path:
    return tmp_path / "data" / "state.db"


class Backend:
    """One store's location: ``open()`` gives another connection to the same data."""

    def __init__(self, kind: str, url: str, where: str) -> None:
        self.kind, self.url, self.where = kind, url, where

    def open(self) -> StateStore:
        return open_state_store(self.url)


@pytest.fixture(params=["sqlite", "postgres"])
def backend(request: pytest.FixtureRequest, db: Path):
    if request.param == "sqlite":
        yield Backend("sqlite", "sqlite:///" + str(db), str(db))
        return
    from pgserver import fresh_database

    with fresh_database() as url:
        yield Backend("postgres", url, url)


@pytest.fixture()
def store(backend: Backend):
    opened = backend.open()
    try:
        yield opened
    finally:
        opened.close()


# -- helpers run in child processes (module level so they can be targets) ----


def _dedupe_worker(url: str, ids: list[str], barrier: Any, out: Any) -> None:
    with open_state_store(url) as child:  # type: ignore[attr-defined]
        barrier.wait()
        out.put([child.remember_delivery(i) for i in ids])


def _counter_worker(url: str, name: str, n: int, barrier: Any, out: Any) -> None:
    with open_state_store(url) as child:  # type: ignore[attr-defined]
        barrier.wait()
        seen = []
        for i in range(n):
            child.update_plugin(name, live_commit=f"{i:040x}")
            seen.append(child.change_counter())
        out.put(seen)


def _writer_worker(url: str, index: int, n: int, barrier: Any, out: Any) -> None:
    try:
        with open_state_store(url) as child:  # type: ignore[attr-defined]
            barrier.wait()
            for i in range(n):
                if i % 2:
                    child.update_plugin(f"p{index}", live_commit=f"{i:040x}", state="live")
                else:
                    record = child.start_deploy(f"p{index}", trigger="poll", ref="main")
                    child.finish_deploy(record.id, result=DeployResult.LIVE, commit=f"{i:040x}")
        out.put(None)
    except Exception as exc:  # report any failure to the parent
        out.put(repr(exc))


def _run_processes(target: Any, args_for: list[tuple[Any, ...]], timeout: float = 30) -> list[Any]:
    barrier = FORK.Barrier(len(args_for))
    out = FORK.Queue()
    procs = [FORK.Process(target=target, args=(*args, barrier, out)) for args in args_for]
    for proc in procs:
        proc.start()
    results = [out.get(timeout=timeout) for _ in procs]
    for proc in procs:
        proc.join(timeout=timeout)
        assert proc.exitcode == 0
    return results


# -- plugins -------------------------------------------------------------------


def test_plugin_crud(store: StateStore) -> None:
    assert store.get_plugin("hello") is None
    created = store.update_plugin("hello", ref="main")
    assert created.name == "hello" and created.ref == "main"
    assert created.state is PluginStateValue.PENDING
    assert created.pin is None and created.live_commit is None
    assert ISO.match(created.updated_at)

    updated = store.update_plugin("hello", live_commit="a" * 40, state="live", pin="v1.2.0")
    assert updated.state is PluginStateValue.LIVE
    assert (updated.ref, updated.pin, updated.live_commit) == ("main", "v1.2.0", "a" * 40)
    assert store.get_plugin("hello") == updated
    assert store.update_plugin("hello", pin=None).pin is None

    store.update_plugin("alpha", state=PluginStateValue.STOPPED)
    assert [p.name for p in store.list_plugins()] == ["alpha", "hello"]
    store.delete_plugin("hello")
    assert store.get_plugin("hello") is None
    assert [p.name for p in store.list_plugins()] == ["alpha"]


def test_update_plugin_rejects_unknown_fields_and_states(store: StateStore) -> None:
    with pytest.raises(TypeError, match=r"unknown fields \['colour'\]"):
        store.update_plugin("hello", colour="blue")
    with pytest.raises(ValueError, match="'sleeping' is not a valid PluginStateValue"):
        store.update_plugin("hello", state="sleeping")
    assert store.get_plugin("hello") is None


def test_change_counter_counts_plugin_writes_only(store: StateStore) -> None:
    start = store.change_counter()
    store.update_plugin("hello", ref="main")
    store.update_plugin("hello", pin="v1")
    assert store.change_counter() == start + 2
    store.start_deploy("hello", trigger="cli", ref="main")
    store.delete_plugin("nobody")
    assert store.change_counter() == start + 2
    store.delete_plugin("hello")
    assert store.change_counter() == start + 3


# -- deploys -------------------------------------------------------------------


def test_deploy_lifecycle(store: StateStore) -> None:
    record = store.start_deploy("hello", trigger="webhook", ref="main")
    assert record.result is DeployResult.RUNNING and record.stage is None
    assert record.host == socket.gethostname()
    assert ISO.match(record.started_at) and record.duration_s is None

    record = store.update_deploy(record.id, commit="c" * 40, log_path="/logs/1.log")
    assert (record.commit, record.log_path) == ("c" * 40, "/logs/1.log")

    done = store.finish_deploy(
        record.id, result=DeployResult.FAILED, stage=Stage.TEST, error="2 failed"
    )
    assert done.result is DeployResult.FAILED and done.stage is Stage.TEST
    assert done.commit == "c" * 40 and done.log_path == "/logs/1.log"  # kept when not given
    assert done.duration_s is not None and 0 <= done.duration_s < 5
    assert store.get_deploy(record.id) == done

    other = store.start_deploy("hello", trigger="cli", ref=None, commit="d" * 40, host="web-2")
    done = store.finish_deploy(other.id, result="live", duration_s=1.9, commit="e" * 40)
    assert (done.host, done.duration_s, done.commit) == ("web-2", 1.9, "e" * 40)


def test_deploy_errors(store: StateStore, backend: Backend) -> None:
    assert store.get_deploy(42) is None
    where = re.escape(backend.where)
    with pytest.raises(StateError, match=f"state database {where}: no deploy with id 42"):
        store.finish_deploy(42, result=DeployResult.LIVE)
    with pytest.raises(StateError, match="no deploy with id 42"):
        store.update_deploy(42, commit="x")
    record = store.start_deploy("hello", trigger="cli", ref="main")
    with pytest.raises(ValueError, match="needs a final result, not 'running'"):
        store.finish_deploy(record.id, result=DeployResult.RUNNING)
    with pytest.raises(TypeError, match=r"unknown fields \['plugin'\]"):
        store.update_deploy(record.id, plugin="other")


def test_history_is_newest_first_and_limited(store: StateStore) -> None:
    ids = [store.start_deploy("hello", trigger="poll", ref="main").id for _ in range(5)]
    store.start_deploy("other", trigger="poll", ref="main")
    assert [r.id for r in store.history("hello")] == ids[::-1]
    assert [r.id for r in store.history("hello", limit=3)] == ids[:1:-1]
    assert [r.id for r in store.history("hello", limit=None)] == ids[::-1]
    assert store.history("hello", limit=0) == []
    assert store.history("nobody") == []
    last = store.last_deploy("hello")
    assert last is not None and last.id == ids[-1]
    assert store.last_deploy("nobody") is None


def test_to_json_has_the_spec_shape(store: StateStore) -> None:
    record = store.start_deploy("hello", trigger="webhook", ref="main", commit="a" * 40)
    record = store.finish_deploy(
        record.id, result=DeployResult.FAILED, stage=Stage.TEST, error="boom"
    )
    data = record.to_json()
    spec_keys = {
        "id", "trigger", "ref", "commit", "result", "stage", "error", "started_at", "duration_s"
    }
    assert spec_keys <= set(data) <= spec_keys | {"plugin", "log_path", "host", "repeats", "last_seen_at", "signer", "canary"}
    assert data["result"] == "failed" and data["stage"] == "test" and data["commit"] == "a" * 40
    assert type(data["result"]) is str and type(data["stage"]) is str
    assert json.loads(json.dumps(data)) == data
    running = store.start_deploy("hello", trigger="cli", ref="main").to_json()
    assert running["stage"] is None and running["result"] == "running"


def test_mark_running_interrupted(store: StateStore) -> None:
    mine = store.start_deploy("hello", trigger="poll", ref="main", host="web-1")
    theirs = store.start_deploy("hello", trigger="poll", ref="main", host="web-2")
    done = store.start_deploy("other", trigger="poll", ref="main", host="web-1")
    store.finish_deploy(done.id, result=DeployResult.LIVE)
    local = store.start_deploy("hello", trigger="startup", ref="main")  # this machine

    marked = store.mark_running_interrupted("web-1")
    assert [r.id for r in marked] == [mine.id]
    assert marked[0].result is DeployResult.INTERRUPTED
    assert marked[0].error == "the process died during the deploy"
    assert store.get_deploy(theirs.id).result is DeployResult.RUNNING  # type: ignore[union-attr]
    assert store.get_deploy(done.id).result is DeployResult.LIVE  # type: ignore[union-attr]
    assert [r.id for r in store.mark_running_interrupted()] == [local.id]
    assert store.mark_running_interrupted() == []
    assert store.get_deploy(theirs.id).result is DeployResult.RUNNING  # type: ignore[union-attr]


def test_failed_commits(store: StateStore) -> None:
    def deploy(commit: str | None, result: DeployResult, plugin: str = "hello") -> None:
        record = store.start_deploy(plugin, trigger="poll", ref="main", commit=commit)
        store.finish_deploy(record.id, result=result, stage=Stage.TEST)

    c1, c2, c3 = "1" * 40, "2" * 40, "3" * 40
    deploy(c1, DeployResult.FAILED)
    deploy(c2, DeployResult.FAILED)
    deploy(c2, DeployResult.LIVE)  # a later live deploy clears it
    deploy(c3, DeployResult.LIVE)
    deploy(c3, DeployResult.FAILED)  # a later failure sets it again
    deploy(None, DeployResult.FAILED)  # failed before the commit was known
    deploy(c2, DeployResult.FAILED, plugin="other")
    assert store.failed_commits("hello") == {c1, c3}

    for result in (DeployResult.SKIPPED, DeployResult.SUPERSEDED, DeployResult.INTERRUPTED):
        deploy(c1, result)  # not decisive: does not clear
    store.start_deploy("hello", trigger="poll", ref="main", commit=c1)  # still running
    assert store.failed_commits("hello") == {c1, c3}
    deploy(c1, DeployResult.LIVE)
    assert store.failed_commits("hello") == {c3}
    assert store.failed_commits("other") == {c2}
    assert store.failed_commits("nobody") == set()


# -- webhook deliveries ----------------------------------------------------------


def test_revoked_logins_are_remembered_until_they_expire(store: StateStore) -> None:
    assert not store.login_revoked("nonce-a")
    store.revoke_login("nonce-a", until=time.time() + 60)
    store.revoke_login("nonce-b", until=time.time() - 1)  # expired already: forgotten
    assert store.login_revoked("nonce-a") and not store.login_revoked("nonce-b")
    store.revoke_login("nonce-a", until=time.time() + 120)  # twice is fine
    assert store.login_revoked("nonce-a")
    # A webhook delivery of the same text is another thing.
    assert store.remember_delivery("nonce-a") is True


def test_remember_delivery_and_expiry(store: StateStore) -> None:
    assert store.remember_delivery("d-1") is True
    assert store.remember_delivery("d-1") is False
    assert store.remember_delivery("d-2", ttl_s=0.05) is True
    time.sleep(0.1)
    assert store.remember_delivery("d-2") is True  # expired, so new again
    assert store.remember_delivery("d-1") is False


def test_delivery_dedupe_under_threads(store: StateStore) -> None:
    ids = [f"delivery-{i}" for i in range(20)]
    barrier = threading.Barrier(8)
    results: list[list[bool]] = []
    lock = threading.Lock()

    def worker() -> None:
        barrier.wait()
        seen = [store.remember_delivery(i) for i in ids]
        with lock:
            results.append(seen)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert len(results) == 8
    assert [sum(column) for column in zip(*results)] == [1] * len(ids)


def test_delivery_dedupe_across_processes(store: StateStore, backend: Backend) -> None:
    store.change_counter()  # create the schema first
    ids = [f"delivery-{i}" for i in range(20)]
    results = _run_processes(_dedupe_worker, [(backend.url, ids), (backend.url, ids)])
    assert [sum(column) for column in zip(*results)] == [1] * len(ids)


# -- change counter and concurrency across processes -------------------------------


def test_change_counter_is_monotonic_across_processes(store: StateStore, backend: Backend) -> None:
    start = store.change_counter()
    results = _run_processes(_counter_worker, [(backend.url, "a", 25), (backend.url, "b", 25)])
    for seen in results:
        assert all(x < y for x, y in zip(seen, seen[1:])), seen
        assert seen[0] > start
    assert store.change_counter() == start + 50


def test_concurrent_writers_from_four_processes(store: StateStore, backend: Backend) -> None:
    store.change_counter()  # create the schema first
    results = _run_processes(_writer_worker, [(backend.url, i, 50) for i in range(4)], timeout=60)
    assert results == [None] * 4, results
    for i in range(4):
        assert len(store.history(f"p{i}", limit=None)) == 25
        plugin = store.get_plugin(f"p{i}")
        assert plugin is not None and plugin.live_commit == f"{49:040x}"


def test_store_object_survives_fork(store: StateStore) -> None:
    store.update_plugin("parent", ref="main")  # the parent now holds a connection
    pid = os.fork()
    if pid == 0:  # child: use the inherited object, then leave without cleanup
        code = 0
        try:
            store.update_plugin("child", ref="main")
        except BaseException:
            code = 1
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert [p.name for p in store.list_plugins()] == ["child", "parent"]


def test_threads_write_concurrently(store: StateStore) -> None:
    errors: list[BaseException] = []

    def worker(n: int) -> None:
        try:
            for i in range(10):
                store.update_plugin(f"t{n}", live_commit=str(i))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert errors == []
    assert len(store.list_plugins()) == 8


# -- workers ---------------------------------------------------------------------


def test_workers_heartbeat_and_expiry(store: StateStore) -> None:
    now = time.time()
    fresh = WorkerInfo("host-a:101", "host-a", 101, {"hello": "a" * 40}, now)
    stale = WorkerInfo("host-a:102", "host-a", 102, {}, now - 30)
    store.heartbeat(fresh)
    store.heartbeat(stale)
    assert store.workers() == [fresh]
    assert store.workers(max_age_s=3600) == [fresh]  # the stale one was pruned
    beat = WorkerInfo("host-a:101", "host-a", 101, {"hello": "b" * 40}, now + 1)
    store.heartbeat(beat)
    assert store.workers() == [beat]
    store.remove_worker("host-a:101")
    assert store.workers() == []


# -- files, URLs, errors ---------------------------------------------------------------


def test_state_survives_reopen(backend: Backend) -> None:
    first = backend.open()
    first.update_plugin("hello", live_commit="a" * 40, state="live")
    record = first.start_deploy("hello", trigger="cli", ref="main")
    counter = first.change_counter()
    first.close()
    second = backend.open()
    assert second.get_plugin("hello").live_commit == "a" * 40  # type: ignore[union-attr]
    assert second.get_deploy(record.id) == record
    assert second.change_counter() == counter
    second.close()


def test_sqlite_file_is_wal_with_a_schema_version(db: Path) -> None:
    SQLiteStateStore(db).close()
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT version FROM schema_version").fetchall() == [
            (state_module.SCHEMA_VERSION,)
        ]
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_unwritable_path_raises_state_error(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a regular file\n")
    path = blocker / "state.db"
    where = re.escape(str(path))
    with pytest.raises(StateError, match=rf"state database {where}: cannot create its directory"):
        SQLiteStateStore(path)


def test_garbage_file_raises_state_error(db: Path) -> None:
    db.parent.mkdir(parents=True)
    db.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(
        StateError, match=r"file is not a database; it is not a gitplug state database"
    ):
        SQLiteStateStore(db)


def test_newer_schema_is_refused(db: Path) -> None:
    SQLiteStateStore(db).close()
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE schema_version SET version = 99")
    known = state_module.SCHEMA_VERSION
    with pytest.raises(StateError, match=rf"schema version 99, newer than this gitplug knows \({known}\)"):
        SQLiteStateStore(db)


def test_locked_database_names_the_cause(db: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(state_module, "BUSY_TIMEOUT_S", 0.2)
    store = SQLiteStateStore(db)
    holder = sqlite3.connect(db, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        with pytest.raises(
            StateError,
            match=r"could not update plugin 'hello': database is locked; .*stuck gitplug process",
        ):
            store.update_plugin("hello", ref="main")
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert store.update_plugin("hello", ref="main").ref == "main"  # usable again
    store.close()


def test_closed_store_raises(store: StateStore) -> None:
    store.change_counter()
    store.close()
    with pytest.raises(StateError, match="the store is closed"):
        store.list_plugins()


def test_open_state_store_urls(tmp_path: Path) -> None:
    relative = open_state_store("sqlite:///.gitplug/state.db", base_dir=tmp_path)
    assert isinstance(relative, SQLiteStateStore)
    assert relative.path == tmp_path / ".gitplug" / "state.db"
    relative.close()
    absolute = open_state_store("sqlite:///" + str(tmp_path / "abs.db"))
    assert absolute.path == tmp_path / "abs.db"  # type: ignore[attr-defined]
    absolute.close()
    with pytest.raises(StateError, match=r"through PostgreSQL, not redis; use postgresql://"):
        open_state_store("redis://:hunter2@localhost:6379/0")
    with pytest.raises(StateError, match="names no file"):
        open_state_store("sqlite:///:memory:")
    with pytest.raises(StateError, match="'mysql://db/x' is not a store URL gitplug knows"):
        open_state_store("mysql://db/x")


def test_connections_of_finished_threads_are_closed(db: Path) -> None:
    store = SQLiteStateStore(db)

    def open_fds() -> int:
        fd_dir = Path("/proc/self/fd")
        count = 0
        for fd in fd_dir.iterdir():
            try:
                count += os.readlink(fd) == str(db)
            except OSError:
                continue
        return count

    def write_in_a_thread(n: int) -> None:
        thread = threading.Thread(target=store.update_plugin, args=(f"t{n}",), kwargs={"ref": "x"})
        thread.start()
        thread.join()

    for n in range(2):
        write_in_a_thread(n)
    baseline = open_fds()
    for n in range(2, 12):
        write_in_a_thread(n)
    # SQLite keeps a closed connection's fd for reuse while the process has
    # locks on the file, so the count is small and stable rather than 1 per thread.
    assert open_fds() == baseline <= 3


def test_deploy_requests_are_taken_once_in_order(store: StateStore, backend: Backend) -> None:
    other = backend.open()  # another process's view of the same data
    assert store.take_deploy_requests() == []
    first = other.request_deploy("hello", trigger="webhook")
    other.request_deploy("world", trigger="api", ref="v2")
    taken = store.take_deploy_requests()
    assert [(r.id, r.plugin, r.trigger, r.ref) for r in taken] == [
        (first, "hello", "webhook", None),
        (first + 1, "world", "api", "v2"),
    ]
    assert store.take_deploy_requests() == []
    # A leader takes the requests of the plugins it leads; the others wait for theirs.
    other.request_deploy("hello", trigger="webhook")
    last = other.request_deploy("world", trigger="webhook")
    assert store.take_deploy_requests([]) == []
    assert [(r.plugin, r.trigger) for r in store.take_deploy_requests(["hello", "gone"])] == [("hello", "webhook")]
    assert store.take_deploy_requests(["hello"]) == []
    assert [r.id for r in store.take_deploy_requests(["world"])] == [last]
    assert store.take_deploy_requests() == []
    other.close()


def test_deploy_counts_per_plugin_and_result(store: StateStore) -> None:
    for plugin, result in [("a", DeployResult.LIVE), ("a", DeployResult.LIVE), ("a", DeployResult.FAILED),
                           ("b", DeployResult.SKIPPED)]:
        record = store.start_deploy(plugin, trigger="cli", ref="main")
        store.finish_deploy(record.id, result=result)
    store.start_deploy("b", trigger="poll", ref="main")  # still running
    assert store.deploy_counts() == {
        ("a", "live"): 2, ("a", "failed"): 1, ("b", "skipped"): 1, ("b", "running"): 1,
    }


# -- hosts, leases, change feeds (the fleet's needs) ------------------------------------


def test_hosts_are_kept_and_replaced(store: StateStore) -> None:
    assert store.hosts() == []
    counter = store.change_counter()
    now = time.time()
    web1 = HostInfo("web-1", now, {"hello": HostPlugin("a" * 40, leads=True), "world": HostPlugin(None)},
                    leader=True)
    web2 = HostInfo("web-2", now - 3600, {"hello": HostPlugin("b" * 40, "did not load")})
    store.heartbeat(WorkerInfo("web-1:1", "web-1", 1, {}, now))
    store.host_heartbeat(web2)
    store.host_heartbeat(web1)
    assert store.hosts() == [web1, web2]  # the silent one is kept, not dropped
    again = HostInfo("web-1", now + 1, {"hello": HostPlugin("c" * 40)}, leader=False)
    store.host_heartbeat(again)
    assert store.hosts() == [again, web2]
    assert store.change_counter() == counter  # beats are not state changes


def test_plugin_live_tree_round_trips(store: StateStore) -> None:
    state = store.update_plugin("hello", live_commit="a" * 40, live_tree="f" * 40, state="live")
    assert state.live_tree == "f" * 40
    assert store.get_plugin("hello").live_tree == "f" * 40  # type: ignore[union-attr]


def test_sqlite_lease_is_the_host_lock(db: Path) -> None:
    store = SQLiteStateStore(db)
    lease = store.acquire_lease("controller")
    assert lease is not None and lease.alive()
    assert store.change_feed() is None  # callers poll the counter
    store.close()


# -- PostgreSQL only ---------------------------------------------------------------------


def _hold_lease(url: str, name: str, ready: Any, out: Any) -> None:
    store = open_state_store(url)
    lease = store.acquire_lease(name)
    out.put(lease is not None)
    ready.set()
    time.sleep(60)  # killed by the test


def test_postgres_lease_is_exclusive_and_freed_when_its_holder_dies(pg_url: str) -> None:
    store = open_state_store(pg_url)
    ready, out = FORK.Event(), FORK.Queue()
    holder = FORK.Process(target=_hold_lease, args=(pg_url, "controller", ready, out))
    holder.start()
    try:
        assert ready.wait(30) and out.get(timeout=5) is True
        assert store.acquire_lease("controller") is None  # held by the other process
        other = store.acquire_lease("another")  # names are independent
        assert other is not None and other.alive()
        other.release()
        assert not other.alive()
        os.kill(holder.pid, 9)
        holder.join(10)
        deadline = time.monotonic() + 10
        lease = None
        while lease is None and time.monotonic() < deadline:
            lease = store.acquire_lease("controller")
        assert lease is not None and lease.alive()
        lease.release()
    finally:
        if holder.is_alive():
            holder.kill()
        holder.join(5)
        store.close()


def test_postgres_lease_waits_for_its_holder(pg_url: str) -> None:
    holder_store, waiter_store = open_state_store(pg_url), open_state_store(pg_url)
    try:
        held = holder_store.acquire_lease("plugin:hello")
        assert held is not None
        # A bounded wait ends without the lease while it is held ...
        assert waiter_store.acquire_lease("plugin:hello", wait_s=0.2) is None
        got: list[Any] = []
        waiter = threading.Thread(target=lambda: got.append(waiter_store.acquire_lease("plugin:hello", wait_s=None)))
        waiter.start()
        # ... an unbounded one is still waiting (a bounded one got its answer in 0.2 s) ...
        waiter.join(0.5)
        assert waiter.is_alive() and not got
        held.release()
        # ... and gets it once the holder lets go.
        waiter.join(30)
        assert not waiter.is_alive() and got and got[0] is not None and got[0].alive()
        assert holder_store.acquire_lease("plugin:hello") is None
        got[0].release()
        again = holder_store.acquire_lease("plugin:hello", wait_s=5)
        assert again is not None
        again.release()
    finally:
        holder_store.close()
        waiter_store.close()


def test_postgres_change_feed_hears_other_processes(pg_url: str) -> None:
    store = open_state_store(pg_url)
    writer = open_state_store(pg_url)
    try:
        feed = store.change_feed()
        assert feed is not None
        feed.wait(5)  # the first connect announces itself
        assert feed.wait(0.2) is False  # nothing changed: it would have woken
        started = time.monotonic()
        threading.Timer(0.3, writer.update_plugin, args=("hello",), kwargs={"ref": "main"}).start()
        assert feed.wait(10) is True
        assert time.monotonic() - started < 10
        threading.Timer(0.3, writer.request_deploy, args=("hello",), kwargs={"trigger": "api"}).start()
        assert feed.wait(10) is True
    finally:
        store.close()
        writer.close()


def _open_and_count(url: str, barrier: Any, out: Any) -> None:
    try:
        child = open_state_store(url)
        barrier.wait()
        out.put(child.change_counter())
        child.close()
    except Exception as exc:  # report any failure to the parent
        out.put(repr(exc))


def test_postgres_schema_is_created_once_by_racing_hosts(pg_url: str) -> None:
    results = _run_processes(_open_and_count, [(pg_url,)] * 4)
    assert results == [0, 0, 0, 0]
    import psycopg

    with psycopg.connect(pg_url) as conn:
        from gitplug.state.postgres import SCHEMA_VERSION as PG_VERSION

        assert conn.execute("SELECT version FROM schema_version").fetchall() == [(PG_VERSION,)]
        conn.execute("UPDATE schema_version SET version = 99")
    with pytest.raises(StateError, match=rf"schema version 99, newer than this gitplug knows \({PG_VERSION}\)"):
        open_state_store(pg_url).list_plugins()


def test_postgres_down_is_a_state_error_without_the_password() -> None:
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    store = open_state_store(f"postgresql://gitplug:hunter2@127.0.0.1:{port}/fleet")  # connects lazily
    with pytest.raises(StateError) as caught:
        store.list_plugins()
    message = str(caught.value)
    assert "hunter2" not in message
    assert f"state database postgresql://gitplug:***@127.0.0.1:{port}/fleet: could not list plugins" in message
    assert "is the PostgreSQL server running" in message
    store.close()


def test_host_status_says_live_diverged_or_lost(store: StateStore) -> None:
    from gitplug.state import HOST_LOST_AFTER_S, host_status

    now = time.time()
    state = store.update_plugin("hello", live_commit="a" * 40, state="live")
    hosts = [
        HostInfo("web-1", now, {"hello": HostPlugin("a" * 40, leads=True)}, leader=True),
        HostInfo("web-2", now, {"hello": HostPlugin("b" * 40, "did not load")}, leader=True),  # leads another
        HostInfo("web-3", now, {"hello": HostPlugin("b" * 40)}),
        HostInfo("web-4", now - HOST_LOST_AFTER_S - 1, {"hello": HostPlugin("a" * 40)}),
        HostInfo("web-5", now, {}),  # beats, but does not serve the plugin
    ]
    shown = host_status("hello", state, hosts, now=now)
    assert {h: e["state"] for h, e in shown.items()} == {
        "web-1": "live", "web-2": "diverged", "web-3": "diverged", "web-4": "lost", "web-5": "diverged",
    }
    assert shown["web-2"]["error"] == "did not load" and shown["web-1"]["leader"] is True
    assert [h for h, e in shown.items() if e["leader"]] == ["web-1"]  # the plugin's leader only
    assert ISO.match(shown["web-1"]["heartbeat_at"])
    stopped = store.update_plugin("hello", state="stopped")
    assert host_status("hello", stopped, hosts[4:], now=now)["web-5"]["state"] == "live"  # nothing, as wanted


def test_postgres_keeps_a_few_connections_not_one_per_thread(pg_url: str) -> None:
    import psycopg

    from gitplug.state import postgres

    def connections() -> int:
        with psycopg.connect(pg_url) as conn:
            row = conn.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                "AND application_name = 'gitplug'"
            ).fetchone()
        return int(row[0]) if row else -1

    store = open_state_store(pg_url)
    barrier = threading.Barrier(16)

    def worker(n: int) -> None:
        barrier.wait()
        for i in range(5):
            store.update_plugin(f"t{n}", live_commit=str(i))

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert len(store.list_plugins()) == 16
    # 16 threads used it; a few stay open. A connection the store closed over
    # its idle limit is listed until its backend exits: wait for that.
    deadline = time.monotonic() + 10
    while connections() > postgres.MAX_IDLE and time.monotonic() < deadline:
        time.sleep(0.05)
    assert 1 <= connections() <= postgres.MAX_IDLE
    store.close()
    deadline = time.monotonic() + 10
    while connections() and time.monotonic() < deadline:
        time.sleep(0.05)  # the server lists a closed session until its backend exits
    assert connections() == 0


def test_revoked_logins_expire(store: StateStore) -> None:
    assert store.login_revoked("l-1") is False
    store.revoke_login("l-1", until=time.time() + 60)
    store.revoke_login("l-2", until=time.time() - 1)  # already expired
    assert store.login_revoked("l-1") is True and store.login_revoked("l-2") is False
    store.revoke_login("l-1", until=time.time() + 120)  # again: replaced, not an error
    assert store.login_revoked("l-1") is True
    assert store.remember_delivery("l-1") is True  # not confused with a webhook delivery


def test_every_store_implements_the_whole_protocol() -> None:
    from gitplug.state import postgres, store

    wanted = {name for name in vars(store.StateStore) if not name.startswith("_")}
    for impl in (SQLiteStateStore, postgres.PostgresStateStore):
        missing = sorted(name for name in wanted if not callable(getattr(impl, name, None)))
        assert missing == [], f"{impl.__name__} lacks {missing}"


def test_postgres_url_without_psycopg_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    monkeypatch.delitem(sys.modules, "gitplug.state.postgres", raising=False)
    monkeypatch.setitem(sys.modules, "psycopg", None)  # what an environment without it gives
    with pytest.raises(StateError, match=r"needs psycopg .*pip install 'gitplug\[fleet\]'") as caught:
        open_state_store("postgresql://gitplug:hunter2@db/fleet")
    assert "hunter2" not in str(caught.value)


def test_a_schema_3_database_gains_repeats_and_keeps_its_history(db: Path) -> None:
    """The migration adding repeats and last_seen_at: records written before it count once."""
    db.parent.mkdir(parents=True)
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
        for statements in state_module._MIGRATIONS[:3]:
            for statement in statements:
                conn.execute(statement)
        conn.execute("INSERT INTO schema_version (version) VALUES (3)")
        conn.execute(
            "INSERT INTO deploys (plugin, trigger, ref, result, stage, error, started_at, host)"
            " VALUES ('hello', 'poll', 'main', 'failed', 'fetch', 'gone', '2026-01-01T00:00:00.000Z', 'h')"
        )
    conn.close()
    with SQLiteStateStore(db) as store:
        (old,) = store.history("hello")
        assert (old.error, old.repeats, old.last_seen_at) == ("gone", 1, None)
        again = store.update_deploy(old.id, repeats=2, last_seen_at="2026-01-01T00:01:00.000Z")
        assert (again.repeats, again.last_seen_at) == (2, "2026-01-01T00:01:00.000Z")
        assert store.get_deploy(old.id) == again
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT version FROM schema_version").fetchone()[0] == state_module.SCHEMA_VERSION
    conn.close()


def test_a_repeated_failure_counts_on_its_record(store: StateStore) -> None:
    """What the pipeline writes for a background failure that recurs (both stores)."""
    record = store.start_deploy("hello", trigger="poll", ref="main")
    record = store.finish_deploy(record.id, result=DeployResult.FAILED, stage=Stage.FETCH, error="gone")
    assert (record.repeats, record.last_seen_at) == (1, None)
    again = store.update_deploy(record.id, repeats=record.repeats + 1, last_seen_at="2026-01-01T00:01:00.000Z")
    assert (again.repeats, again.last_seen_at, again.error, again.stage) == (
        2, "2026-01-01T00:01:00.000Z", "gone", Stage.FETCH
    )
    assert store.history("hello") == [again] and store.last_deploy("hello") == again
    assert again.to_json()["repeats"] == 2
