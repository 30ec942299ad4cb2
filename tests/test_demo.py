"""The README's demo walkthrough, run exactly as written against a real ``gitplug demo``.

The commands are read from the README's walkthrough code block, so the
README and this test cannot drift apart: every line of it is run, in order,
in a fresh directory holding a copy of the root ``deploy.yaml``, with the
environment the demo's ``export`` line gives. ``$EDITOR FILE`` is the one
line a test cannot type into; it is replaced by an edit of FILE. Between
steps the test waits for what the README says the user will see (a poll
every 3 s deploys the commit), then checks what each command printed.
"""

from __future__ import annotations

import re
import shlex
import shutil
import signal
import subprocess
import sys
import typing as t
from pathlib import Path

import pytest

from serverproc import clean_env, free_port, get, script, wait_for

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


def walkthrough() -> list[str]:
    """The command lines of the README's demo walkthrough (comments and blanks dropped)."""
    text = README.read_text()
    section = text[text.index("## Five minutes with the demo") :]
    block = re.search(r"```sh\n(.*?)```", section, re.S)
    assert block, "the README's demo section has no ```sh block"
    commands = []
    for line in block.group(1).splitlines():
        line = line.split(" #", 1)[0].strip()
        if line and not line.startswith("#"):
            commands.append(line)
    return commands


class Demo:
    """``gitplug demo`` in a subprocess, in ``workdir``; stopped with Ctrl+C on exit."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log_path = workdir / "demo.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Demo:
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                [script("gitplug"), "demo", "--port", str(self.port)],
                cwd=self.workdir,
                env=clean_env(),
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        try:
            wait_for(self.ready, timeout=120, interval=0.2, what="the demo serving /hello/")
        except BaseException:
            self.__exit__()
            raise
        return self

    def ready(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            pytest.fail(f"gitplug demo exited with {self.proc.returncode}:\n{self.log()}")
        return get(self.base + "/hello/").startswith("200 ")

    def __exit__(self, *exc: object) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def exported(self) -> dict[str, str]:
        """The variables of the ``export`` line the demo printed."""
        match = re.search(r"^\s*export (.+)$", self.log(), re.M)
        assert match, self.log()
        pairs = dict(item.split("=", 1) for item in shlex.split(match.group(1)))
        assert set(pairs) == {"GITPLUG_ADMIN_TOKEN", "GITPLUG_WEBHOOK_SECRET"}, pairs
        return pairs


def argv(line: str) -> list[str]:
    words = shlex.split(line)
    if words[:3] == ["python", "-m", "gitplug.demo"]:
        return [sys.executable, *words[1:]]
    if words[0] == "gitplug":
        return [script("gitplug"), *words[1:]]
    raise AssertionError(f"the walkthrough has a command this test does not know: {line!r}")


@pytest.mark.timeout(600)
def test_the_readme_walkthrough_runs_as_written(tmp_path: Path) -> None:
    commands = walkthrough()
    # The walkthrough this test checks: a change, a break, a fix, a rollback, a resume.
    kinds = [" ".join(shlex.split(c)[:4]) for c in commands]
    assert kinds == [
        "$EDITOR .gitplug/demo/hello/hello/templates/index.html",
        'python -m gitplug.demo commit',
        "python -m gitplug.demo break",
        "gitplug status",
        "gitplug logs hello",
        "python -m gitplug.demo fix",
        "gitplug rollback hello v1.0.0",
        "gitplug history hello",
        "gitplug resume hello",
    ], commands
    shutil.copy(ROOT / "deploy.yaml", tmp_path / "deploy.yaml")
    with Demo(tmp_path) as demo:
        env = clean_env(**demo.exported())
        store = tmp_path / ".gitplug"

        def run(line: str) -> subprocess.CompletedProcess[str]:
            proc = subprocess.run(
                argv(line), cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300, check=False
            )
            assert proc.returncode == 0, f"{line!r} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
            assert "Traceback" not in proc.stdout + proc.stderr, proc.stderr
            return proc

        def status() -> dict[str, t.Any]:
            import json

            proc = run("gitplug status --json")
            (plugin,) = json.loads(proc.stdout)["plugins"]
            return t.cast(dict[str, t.Any], plugin)

        def head() -> str:
            return (store / "demo" / "hello" / ".git" / "refs" / "heads" / "main").read_text().strip()

        def live_is(sha: str) -> bool:
            return bool(status()["live_commit"] == sha)

        first = status()
        assert first["last_deploy"]["trigger"] == "startup", first
        for line in commands:
            if line.startswith("$EDITOR "):
                path = tmp_path / shlex.split(line)[1]
                text = path.read_text()
                edit = "swapped into a running Flask server."
                assert edit in text
                path.write_text(text.replace(edit, edit + " (edited)"))
                continue
            proc = run(line)
            words = shlex.split(line)
            if words[3:4] == ["commit"]:
                sha = head()
                wait_for(lambda: live_is(sha), timeout=120, interval=0.5, what="the commit going live")
                assert "(edited)" in get(demo.base + "/hello/")
                edited = sha
            elif words[3:4] == ["break"]:
                broken = head()

                def failed_at_test() -> bool:
                    last = status()["last_deploy"]
                    return bool(last and last["commit"] == broken and last["result"] == "failed")

                wait_for(failed_at_test, timeout=180, interval=0.5, what="the broken commit failing")
                assert status()["last_deploy"]["stage"] == "test"
                assert live_is(edited) and "(edited)" in get(demo.base + "/hello/")
            elif words[:2] == ["gitplug", "status"]:
                assert f"{edited[:12]}" in proc.stdout and "failed at test" in proc.stdout, proc.stdout
            elif words[:2] == ["gitplug", "logs"]:
                # The error once, naming the plugin's file and line; not a traceback per test.
                assert re.search(r"hello/report\.py line \d+", proc.stdout), proc.stdout
                # Counted above pytest's short summary, which repeats each message in full
                # when pytest believes it runs on CI (CI=true) and truncates it elsewhere.
                report = proc.stdout.split("short test summary info")[0]
                assert report.count("hello/report.py") <= 3, proc.stdout
                assert len(proc.stdout.splitlines()) < 40, proc.stdout
            elif words[3:4] == ["fix"]:
                fixed = head()
                wait_for(lambda: live_is(fixed), timeout=180, interval=0.5, what="the fix going live")
            elif words[1:2] == ["rollback"]:
                assert "live" in proc.stdout, proc.stdout
                # v1.0.0 was never deployed here: staged and tested, no fetch (the mirror knows it).
                steps = [s.split()[0] for s in proc.stderr.splitlines() if s.startswith("  ")]
                assert steps == ["stage", "requirements", "test", "load", "live"], proc.stderr
                pinned = status()
                assert pinned["pin"] == "v1.0.0", pinned
                wait_for(
                    lambda: "(edited)" not in get(demo.base + "/hello/"), timeout=30, what="v1.0.0 served"
                )
            elif words[1:2] == ["history"]:
                triggers = {row.split()[2] for row in proc.stdout.splitlines()[1:] if row.strip()}
                assert {"startup", "poll", "rollback"} <= triggers, proc.stdout
            elif words[1:2] == ["resume"]:
                assert "live" in proc.stdout, proc.stdout
                wait_for(lambda: live_is(fixed) and status()["pin"] is None, timeout=30, what="main again")
        assert "(edited)" in get(demo.base + "/hello/")
    assert "Traceback" not in demo.log(), demo.log()
