"""Tests for gitplug.deploy.testgate: real subprocesses, real pipes, real signals."""

from __future__ import annotations

import ctypes
import os
import re
import shlex
import sys
import textwrap
import time
import typing as t
from pathlib import Path

import psutil
import pytest

from gitplug.deploy.testgate import (
    GateResult,
    protect_process,
    run_test_gate,
    scrubbed_environment,
)
from serverproc import promptly


@pytest.fixture()
def release(tmp_path: Path) -> Path:
    """A staged release with a package and a tests/ directory."""
    root = tmp_path / "releases" / "hello" / ("ab" * 20)
    (root / "hello").mkdir(parents=True)
    (root / "hello" / "__init__.py").write_text("GREETING = 'hi'\n")
    (root / "tests").mkdir()
    return root


@pytest.fixture()
def log_path(tmp_path: Path) -> Path:
    return tmp_path / "logs" / "hello" / "7.log"


def gate(release: Path, log_path: Path, code: str | None, **kwargs: object) -> GateResult:
    command = None if code is None else ["python", "-c", code]
    kwargs.setdefault("is_default", False)
    kwargs.setdefault("timeout", 30)
    return run_test_gate(release, command, log_path=log_path, **kwargs)  # type: ignore[arg-type]


def wait_dead(pid: int, within: float = 2.0) -> bool:
    """True once ``pid`` is gone or a zombie (our container's pid 1 may not reap)."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.05)
    return False


# A test run that starts a grandchild sleeper, prints its pid, then does `tail`.
SPAWNER = textwrap.dedent(
    """
    import signal, subprocess, sys, time
    {prelude}
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    print("CHILD", child.pid, flush=True)
    {tail}
    """
)


def child_pid(log_path: Path) -> int:
    match = re.search(r"CHILD (\d+)", log_path.read_text())
    assert match, log_path.read_text()
    return int(match.group(1))


def test_passing_run_writes_header_output_and_footer(release: Path, log_path: Path) -> None:
    result = gate(release, log_path, "print('all good')")
    assert result.passed and result.returncode == 0 and not result.timed_out
    assert result.skipped_reason is None
    assert result.output_tail == "all good"
    log = log_path.read_text()
    command = shlex.join([sys.executable, "-c", "print('all good')"])
    assert log.startswith(f"# gitplug test gate: {command}\n")
    scratch = re.search(r"# cwd: (\S+) \(a scratch copy of (\S+)\)\n", log)
    assert scratch and scratch.group(2) == str(release)
    assert not Path(scratch.group(1)).exists()  # removed after the run
    assert re.search(r"# started: \d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", log)
    assert "all good\n" in log
    assert re.search(r"# exit code 0 after \d+\.\d\ds\n$", log)


def test_failing_run_reports_returncode_and_tail(release: Path, log_path: Path) -> None:
    code = (
        "import sys\nfor i in range(100): print('line', i)\n"
        "print('boom', file=sys.stderr)\nsys.exit(3)"
    )
    result = gate(release, log_path, code)
    assert not result.passed and result.returncode == 3 and not result.timed_out
    lines = result.output_tail.splitlines()
    assert len(lines) == 40
    assert lines[-1] == "boom"  # stderr is merged into the same stream
    assert lines[0] == "line 61"
    assert "# exit code 3" in log_path.read_text()


def test_hanging_run_is_killed_with_its_whole_process_group(release: Path, log_path: Path) -> None:
    code = SPAWNER.format(prelude="", tail="time.sleep(60)")
    started = time.monotonic()
    result = gate(release, log_path, code, timeout=1)
    # The behaviour is the verdict and the dead group; the time only guards against a hang.
    promptly(time.monotonic() - started, 4, what="a 1 s gate answered by SIGTERM")
    assert result.timed_out and not result.passed
    assert result.returncode == -15  # SIGTERM was enough
    assert result.output_tail.endswith("[timed out after 1s]")
    assert wait_dead(child_pid(log_path)), "the grandchild sleeper survived the timeout"
    assert "# timed out after 1s; process group killed" in log_path.read_text()


def test_run_ignoring_sigterm_gets_sigkill(release: Path, log_path: Path) -> None:
    code = SPAWNER.format(
        prelude="signal.signal(signal.SIGTERM, signal.SIG_IGN)",
        tail="while True: time.sleep(0.1)",
    )
    started = time.monotonic()
    result = gate(release, log_path, code, timeout=1)
    promptly(time.monotonic() - started, 4.5, what="a 1 s gate ignoring SIGTERM, then SIGKILLed")
    assert result.timed_out and result.returncode == -9
    assert wait_dead(child_pid(log_path))


def test_processes_left_behind_by_a_passing_run_are_killed(release: Path, log_path: Path) -> None:
    code = SPAWNER.format(prelude="", tail="")
    started = time.monotonic()
    result = gate(release, log_path, code)
    assert result.passed
    # The leftover holding the pipe (it sleeps 60 s) did not stall the gate until it exits.
    promptly(time.monotonic() - started, 4, what="a passing gate with a leftover holding its pipe")
    assert wait_dead(child_pid(log_path))


def test_output_flood_is_capped_and_drained(release: Path, log_path: Path) -> None:
    code = (
        "import sys\nblock = b'x' * 1023 + b'\\n'\n"
        "for _ in range(50 * 1024): sys.stdout.buffer.write(block)\n"
        "sys.stdout.buffer.write(b'END OF FLOOD\\n')"
    )
    cap = 1024 * 1024
    started = time.monotonic()
    result = gate(release, log_path, code, max_log_bytes=cap)
    promptly(time.monotonic() - started, 15, what="a gate flooding 50 MiB of output")
    assert result.passed
    size = log_path.stat().st_size
    assert cap - 10 <= size <= cap + 200, size
    log = log_path.read_bytes()[cap - 200 :].decode()
    assert re.search(r"\[output truncated after \d+ bytes; \d+ more bytes discarded\]", log)
    # the tail comes from the whole stream, so the real end stays visible
    assert result.output_tail.endswith("END OF FLOOD")


def test_secrets_are_scrubbed_from_the_environment(
    release: Path, log_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GITPLUG_ADMIN_TOKEN", "admin-tok-123")
    monkeypatch.setenv("GITPLUG_CONFIG", "/etc/deploy.yaml")
    monkeypatch.setenv("INNOCENT_LOOKING", "hook-secret-456")
    monkeypatch.setenv("DEPLOY_TOKEN", "deploy-tok-789")
    monkeypatch.setenv("DATABASE_URL", "postgres://app:pw-321@db/app")
    monkeypatch.setenv("KEEP_ME", "visible-value")
    code = "import os\nfor k, v in sorted(os.environ.items()): print(f'{k}={v}')"
    result = gate(release, log_path, code, secrets=["admin-tok-123", "hook-secret-456"])
    assert result.passed
    log = log_path.read_text()
    for leaked in ("admin-tok-123", "GITPLUG_", "hook-secret-456", "deploy-tok-789", "pw-321"):
        assert leaked not in log
    assert "KEEP_ME=visible-value" in log
    assert "PYTHONDONTWRITEBYTECODE=1" in log
    assert f"PATH={__import__('os').environ['PATH']}" in log


def test_scrubbed_environment_rules() -> None:
    base = {
        "PATH": "/usr/bin",
        "HOME": "/root",
        "LANG": "C.UTF-8",
        "PWD": "/srv",
        "GITPLUG_WEBHOOK_SECRET": "x",
        "GITHUB_TOKEN": "x",
        "OPENAI_API_KEY": "x",
        "AWS_REGION": "eu-west-1",
        "DJANGO_SECRET_KEY": "x",
        "PGPASSWORD": "x",
        "DB_PASSWORD": "x",
        "SSH_AUTH_SOCK": "/tmp/agent",
        "TOKENIZERS_PARALLELISM": "false",
        "REDIS_URL": "redis://localhost:6379/0",
        "SAME_AS_SECRET": "s3",
    }
    env = scrubbed_environment(base, secrets=["s3", ""])
    assert env == {
        "PATH": "/usr/bin",
        "HOME": "/root",
        "LANG": "C.UTF-8",
        "PWD": "/srv",
        "TOKENIZERS_PARALLELISM": "false",
        "REDIS_URL": "redis://localhost:6379/0",
        "PYTHONDONTWRITEBYTECODE": "1",
    }
    assert base["GITHUB_TOKEN"] == "x"  # the input is not modified


def test_pythonpath_has_release_then_extra_paths(
    release: Path, log_path: Path, tmp_path: Path
) -> None:
    extra = tmp_path / "extra"
    extra.mkdir()
    (extra / "extra_mod.py").write_text("VALUE = 42\n")
    code = ("import os, sys, hello, extra_mod\n"
            "print(hello.GREETING, extra_mod.VALUE, os.getcwd() == sys.path[1])")
    result = gate(release, log_path, code, extra_pythonpath=[extra])
    assert result.passed, result.output_tail
    assert result.output_tail == "hi 42 True"  # cwd is the scratch copy, first on the path


def test_real_pytest_run_leaves_no_bytecode_in_the_release(release: Path, log_path: Path) -> None:
    (release / "tests" / "test_hello.py").write_text(
        "import hello\n\ndef test_greeting():\n    assert hello.GREETING == 'hi'\n"
    )
    result = run_test_gate(
        release, ["python", "-m", "pytest", "-q", "-p", "no:cacheprovider"],
        is_default=True, timeout=60, log_path=log_path,
    )
    assert result.passed, result.output_tail
    assert "1 passed" in result.output_tail
    assert not list(release.rglob("__pycache__"))


def test_disabled_gate_is_skipped(release: Path, log_path: Path) -> None:
    result = gate(release, log_path, None)
    assert result.passed and result.skipped_reason == "test gate disabled"
    assert result.returncode is None and result.command == ()
    assert "skipped" in log_path.read_text()


def test_default_command_without_tests_dir_is_skipped(release: Path, log_path: Path) -> None:
    (release / "tests").rmdir()
    result = gate(release, log_path, "import sys; sys.exit(1)", is_default=True)
    assert result.passed and result.skipped_reason == "release has no tests/ directory"
    # an explicit command runs even without tests/
    assert not gate(release, log_path, "import sys; sys.exit(1)", is_default=False).passed


def test_default_command_with_tests_dir_runs(release: Path, log_path: Path) -> None:
    result = gate(release, log_path, "import sys; sys.exit(1)", is_default=True)
    assert not result.passed and result.skipped_reason is None


@pytest.mark.parametrize("name", ["python", "python3"])
def test_python_means_the_servers_interpreter(release: Path, log_path: Path, name: str) -> None:
    command = [name, "-c", "import sys; print(sys.executable)"]
    result = run_test_gate(release, command, is_default=False, timeout=30, log_path=log_path)
    assert result.command == (sys.executable, "-c", "import sys; print(sys.executable)")
    assert result.output_tail == sys.executable


def test_missing_command_fails_clearly(release: Path, log_path: Path) -> None:
    result = run_test_gate(
        release, ["no-such-test-runner", "-q"], is_default=False, timeout=30, log_path=log_path
    )
    assert not result.passed and result.returncode is None and not result.timed_out
    assert result.output_tail == (
        "command not found: no-such-test-runner; set `test:` in deploy.yaml"
    )
    assert "command not found: no-such-test-runner" in log_path.read_text()


def test_missing_release_dir_fails_clearly(tmp_path: Path, log_path: Path) -> None:
    result = gate(tmp_path / "nope", log_path, "pass")
    assert not result.passed
    assert result.output_tail == f"release directory {tmp_path / 'nope'} does not exist"


def test_scrub_removes_values_that_contain_a_secret() -> None:
    token = "tok-0123456789abcdef"
    base = {
        "PATH": "/usr/bin",
        "MY_HEADER": f"Bearer {token}",
        "DSN": f"host=db password={token} user=x",
        f"X_{token}": "1",  # a name can carry it too
        "SHORT": "abc",  # a short secret only as a whole value...
        "NOT_SHORT": "xabcx",  # ...never as a part, or PATH-like values would go
    }
    env = scrubbed_environment(base, secrets=[token, "abc"])
    assert env == {"PATH": "/usr/bin", "NOT_SHORT": "xabcx", "PYTHONDONTWRITEBYTECODE": "1"}


def test_a_process_that_drops_the_marker_and_calls_setsid_is_killed(
        release: Path, log_path: Path) -> None:
    # A double fork into a new session, without the run's marker: only the
    # supervisor (a child subreaper) still knows it.
    code = textwrap.dedent(
        """
        import os, subprocess, sys
        env = {k: v for k, v in os.environ.items() if k != "PLUGIN_TEST_RUN_ID"}
        child = subprocess.Popen(["setsid", "sh", "-c", "sleep 60 & echo CHILD $!"], env=env,
                                 stdout=subprocess.PIPE, text=True)
        print(child.stdout.readline().strip(), flush=True)
        sys.exit(3)
        """
    )
    result = gate(release, log_path, code)
    assert result.returncode == 3 and not result.passed
    pid = child_pid(log_path)
    environ = Path(f"/proc/{pid}/environ")
    assert not environ.exists() or b"PLUGIN_TEST_RUN_ID" not in environ.read_bytes()
    assert wait_dead(pid, within=0.5), "the escaped sleeper survived the test gate"


def _as_nobody(job: t.Callable[[], int]) -> int:
    """Fork, become nobody, run ``job``; return the child's pid (it exits with job's status)."""
    pid = os.fork()
    if pid == 0:  # the child: no pytest machinery from here on
        code = 1
        try:
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            code = job()
        finally:
            os._exit(code)
    return pid


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run two processes as another user")
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl is Linux only")
@pytest.mark.parametrize("protect", [False, True])
def test_protect_process_hides_environ_from_the_same_user(protect: bool) -> None:
    # Two processes of one unprivileged user: the reader can read the target's
    # environ unless the target called protect_process().
    ready_r, ready_w = os.pipe()

    def target() -> int:
        if protect and not protect_process():
            return 2
        if not protect:  # changing uid made it non-dumpable; a server's process is dumpable
            ctypes.CDLL(None).prctl(4, 1, 0, 0, 0)  # PR_SET_DUMPABLE, 1
        os.write(ready_w, b"R")
        time.sleep(30)
        return 0

    target_pid = _as_nobody(target)
    try:
        assert os.read(ready_r, 1) == b"R"

        def reader() -> int:
            try:
                with open(f"/proc/{target_pid}/environ", "rb") as handle:
                    handle.read()
                return 10  # read it
            except OSError:
                return 11  # could not

        reader_pid = _as_nobody(reader)
        _, status = os.waitpid(reader_pid, 0)
        assert os.waitstatus_to_exitcode(status) == (11 if protect else 10)
    finally:
        os.kill(target_pid, 9)
        os.waitpid(target_pid, 0)
        os.close(ready_r)
        os.close(ready_w)
