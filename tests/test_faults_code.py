"""The fault catalogue (issue 5): plugin code and the test gate.

Each test breaks one thing on purpose and asserts that (a) the error names what
was wrong, where and what to do, and (b) the last good release still serves;
the harness and the catalogue's conventions are in :mod:`faults_site`.
"""

from __future__ import annotations

import re
import time
import typing as t
from pathlib import Path

import psutil
import pytest

from faults_site import (
    DEFAULT_GATE,
    Host,
    MiB,
    host_fixture,  # noqa: F401
    make_host_fixture,  # noqa: F401
    plugin_files,
)
from gitplug.state import DeployRecord, DeployResult

# =========================================================================== plugin code

CODE_FAULTS = [
    pytest.param(
        {"hello/views.py": "def broken(:\n    pass\n"},
        "load",
        r"plugin 'hello': syntax error in hello/views\.py line 1: .*Fix the file and deploy a"
        r" new commit; the live release is unchanged\.",
        id="syntax-error",
    ),
    pytest.param(
        {"hello/deep/__init__.py": "", "hello/deep/er.py": "x = 1\nif x:\n  y = (\n"},
        "load",
        r"syntax error in hello/deep/er\.py line 3",
        id="syntax-error-unimported-subpackage",
    ),
    pytest.param(
        {"hello/db.py": "import not_a_module_xyz\n"},
        "load",
        r"plugin 'hello': importing hello\.db failed in hello/db\.py line 1: ModuleNotFoundError:"
        r" No module named 'not_a_module_xyz'\. Fix the code and deploy a new commit",
        id="import-error",
    ),
    pytest.param(
        {"hello/db.py": "X = 1\nraise RuntimeError('database url missing')\n"},
        "load",
        r"importing hello\.db failed in hello/db\.py line 2: RuntimeError: database url missing\.",
        id="import-time-exception",
    ),
    pytest.param(
        {"hello/db.py": "import sys\nsys.exit(3)\n"},
        "load",
        r"importing hello\.db failed in hello/db\.py line 2: SystemExit: 3\.",
        id="sys-exit-at-import",
    ),
    pytest.param(
        {
            "hello/hooks.py": """
        from hello import plugin

        @plugin.on_load
        def connect():
            raise ConnectionError("database unreachable")
        """
        },
        "verify",
        r"plugin 'hello': on_load callback connect raised ConnectionError: database unreachable in"
        r" hello/hooks\.py line 6\. The live release is unchanged\.",
        id="on-load-raises",
    ),
    pytest.param(
        {
            "hello/hooks.py": """
        from hello import plugin

        @plugin.health_check
        def healthy():
            return False
        """
        },
        "verify",
        r"plugin 'hello': health check healthy returned False\. The live release is unchanged\.",
        id="health-check-false",
    ),
    pytest.param(
        {
            "hello/hooks.py": """
        from hello import plugin

        @plugin.health_check
        def healthy():
            raise TimeoutError("cache did not answer")
        """
        },
        "verify",
        r"health check healthy raised TimeoutError: cache did not answer in hello/hooks\.py line 6",
        id="health-check-raises",
    ),
]


@pytest.mark.parametrize(("extra", "stage", "match"), CODE_FAULTS)
def test_plugin_code_faults(host: Host, extra: dict[str, str], stage: str, match: str) -> None:
    host.commit(plugin_files("v2", **extra), "broken code")
    host.deploy_fails(stage, match)


def test_infinite_loop_at_import_is_stopped_by_the_test_gate(
    make_host: t.Callable[..., Host],
) -> None:
    # The gate imports the plugin in a child process first: the loop never reaches the server.
    host = make_host(plugin={"test": DEFAULT_GATE, "test_timeout": 3})
    bad = host.commit(
        plugin_files(
            "v2",
            **{
                "hello/spin.py": "while True:\n    pass\n",
                "tests/test_spin.py": "import hello.spin\n",
            },
        ),
        "spin",
    )
    started = time.monotonic()
    record = host.deploy_fails(
        "test",
        rf"plugin 'hello': tests of {bad[:12]} timed out after 3 s\. Log: .*/logs/hello/\d+\.log;"
        r" `gitplug logs hello` shows it\.",
    )
    assert time.monotonic() - started < 30
    assert "timed out after 3" in Path(record.log_path or "").read_text()


# =========================================================================== test gate


def test_failing_tests(make_host: t.Callable[..., Host]) -> None:
    host = make_host(plugin={"test": DEFAULT_GATE, "test_timeout": 60})
    bad = host.commit(
        plugin_files(
            "v2",
            **{
                "tests/test_hello.py": """
        def test_checkout_total():
            assert 2 + 2 == 5, "totals are off"
        """
            },
        ),
        "failing test",
    )
    record = host.deploy_fails(
        "test",
        rf"plugin 'hello': tests of {bad[:12]} failed \(exit status 1\)\. Log: .*; `gitplug logs hello`"
        r" shows it\.\n.*1 failed",
    )
    assert "totals are off" in Path(record.log_path or "").read_text()


def test_hanging_tests(make_host: t.Callable[..., Host]) -> None:
    host = make_host(plugin={"test": DEFAULT_GATE, "test_timeout": 3})
    bad = host.commit(
        plugin_files(
            "v2",
            **{
                "tests/test_hello.py": """
        import time
        def test_hang():
            time.sleep(60)
        """
            },
        ),
        "hanging test",
    )
    started = time.monotonic()
    host.deploy_fails("test", rf"plugin 'hello': tests of {bad[:12]} timed out after 3 s\.")
    assert time.monotonic() - started < 30


def test_test_command_not_found(make_host: t.Callable[..., Host]) -> None:
    host = make_host(others={"other": {"repo": "{repo}", "test": "no-such-test-runner-xyz -q"}})
    record = host.gp.deploy("other")
    assert record is not None and (record.result, record.stage.value) == (
        DeployResult.FAILED,
        "test",
    )
    assert re.search(
        r"plugin 'other': tests of [0-9a-f]{12} failed \(exit status None\)\. Log: .*\n"
        r"command not found: no-such-test-runner-xyz; set `test:` in deploy\.yaml",
        record.error or "",
    ), record.error
    host.assert_good_serves()


FLOOD = """
import sys

def test_flood():
    line = "x" * 99 + "\\n"
    for _ in range(200):
        sys.stdout.write(line * 1000)   # 20 MB in all
    sys.stdout.flush()
    assert {verdict}
"""


def _assert_capped(record: DeployRecord) -> None:
    log = Path(record.log_path or "")
    size = log.stat().st_size
    assert 5 * MiB - 64 * 1024 < size <= 5 * MiB + 1024, size
    tail = log.read_bytes()[-512:].decode()
    assert re.search(r"\[output truncated after \d+ bytes; \d+ more bytes discarded\]", tail), tail
    assert "# exit code" in tail


def test_flooding_output_is_capped_and_the_verdict_kept(make_host: t.Callable[..., Host]) -> None:
    host = make_host(plugin={"test": DEFAULT_GATE, "test_timeout": 60})
    # The plugin's own pytest.ini turns capture off, so 20 MB reach the gate's pipe.
    ini = {"pytest.ini": "[pytest]\naddopts = -s\n"}
    failing = host.commit(
        plugin_files("v2", **ini, **{"tests/test_flood.py": FLOOD.format(verdict=False)}),
        "flood and fail",
    )
    record = host.deploy_fails("test", rf"tests of {failing[:12]} failed \(exit status 1\)")
    assert len(record.error or "") < 8 * 1024, (
        "the recorded error carries a short tail, not the flood"
    )
    _assert_capped(record)
    host.failed.clear()

    passing = host.commit(
        plugin_files("v3", **ini, **{"tests/test_flood.py": FLOOD.format(verdict=True)}),
        "flood and pass",
    )
    record = host.gp.deploy("hello")
    assert record is not None and (record.result, record.commit) == (DeployResult.LIVE, passing), (
        record
    )
    assert host.served() == f"200 stamp=v3@{passing[:7]}"
    _assert_capped(record)


DAEMON_TEST = """
import os
import subprocess
import sys

def test_starts_a_server_and_forgets_it():
    daemon = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"],
                              start_new_session=True, stdout={stdout})
    with open(os.environ["FAULTS_DAEMON_PIDFILE"], "w") as out:
        out.write(str(daemon.pid))
"""


def _deploy_with_daemon(
    make_host: t.Callable[..., Host], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, stdout: str
) -> t.Iterator[tuple[Host, DeployRecord, int]]:
    pidfile = tmp_path / "daemon.pid"
    monkeypatch.setenv("FAULTS_DAEMON_PIDFILE", str(pidfile))
    host = make_host(plugin={"test": DEFAULT_GATE, "test_timeout": 60})
    v2 = host.commit(
        plugin_files("v2", **{"tests/test_daemon.py": DAEMON_TEST.format(stdout=stdout)}),
        "tests leave a daemon",
    )
    record = host.gp.deploy("hello")
    pid = int(pidfile.read_text())
    try:
        assert record is not None and (record.result, record.commit) == (DeployResult.LIVE, v2), (
            record
        )
        yield host, record, pid
    finally:
        try:  # the daemon was started by this test's deploy: end it by its id
            psutil.Process(pid).kill()
        except psutil.NoSuchProcess:
            pass


def test_gate_returns_although_a_left_behind_process_holds_its_output(
    make_host: t.Callable[..., Host], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    started = time.monotonic()
    for host, record, _pid in _deploy_with_daemon(make_host, tmp_path, monkeypatch, "None"):
        assert time.monotonic() - started < 45, "the gate waited for the daemon's end of the pipe"
        assert "# exit code 0" in Path(record.log_path or "").read_text()
        assert host.served().startswith("200 stamp=v2@")


def test_processes_left_by_the_tests_do_not_outlive_the_gate(
    make_host: t.Callable[..., Host], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for _host, _record, pid in _deploy_with_daemon(
        make_host, tmp_path, monkeypatch, "subprocess.DEVNULL"
    ):
        deadline = time.monotonic() + 3
        while psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
            assert time.monotonic() < deadline, f"process {pid} started by the tests still runs"
            time.sleep(0.05)


def test_plugin_tests_never_see_the_servers_secrets(
    make_host: t.Callable[..., Host], monkeypatch: pytest.MonkeyPatch
) -> None:
    token, secret = "faults-admin-token-4711", "faults-webhook-secret-4711"
    monkeypatch.setenv("GITPLUG_ADMIN_TOKEN", token)
    monkeypatch.setenv("INNOCENT_LOOKING_SETTING", secret)  # caught by value, whatever its name
    host = make_host(
        plugin={"test": DEFAULT_GATE, "test_timeout": 60},
        top={"admin_token": "${GITPLUG_ADMIN_TOKEN}", "webhook": {"secret": secret}},
    )
    v2 = host.commit(
        plugin_files(
            "v2",
            **{
                "tests/test_snoop.py": """
        import os

        def test_snoop():
            found = {k: v for k, v in os.environ.items() if "4711" in v}
            assert not found, found
        """
            },
        ),
        "tests that look for secrets",
    )
    record = host.gp.deploy("hello")
    assert record is not None and (record.result, record.commit) == (DeployResult.LIVE, v2), record
    log = Path(record.log_path or "").read_text()
    assert token not in log and secret not in log
