"""A work tree driven by the real ``git`` client, and the plugin it commits (the push tests)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

GIT = shutil.which("git") or "/usr/bin/git"

SOURCE = """\
from gitplug import Plugin, current_plugin

plugin = Plugin("{name}", __name__)


@plugin.route("/")
def index():
    return "{name} {version} " + current_plugin.commit[:12]
"""

PASSING = "def test_ok():\n    print('GATE {version}')\n"
FAILING = "def test_broken():\n    assert 1 == 2, 'broken on purpose {version}'\n"


class Work:
    """A work tree driven by the real git client."""

    def __init__(self, path: Path, home: Path) -> None:
        self.path = path
        self.env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(home),
            "GIT_CONFIG_NOSYSTEM": "1",
            "GIT_CONFIG_GLOBAL": os.devnull,
            "GIT_TERMINAL_PROMPT": "0",
            "GIT_ASKPASS": "/bin/false",
            "GIT_AUTHOR_NAME": "Ada", "GIT_AUTHOR_EMAIL": "ada@example.com",
            "GIT_COMMITTER_NAME": "Ada", "GIT_COMMITTER_EMAIL": "ada@example.com",
            "LC_ALL": "C",
        }
        path.mkdir(parents=True, exist_ok=True)
        self.git("init", "-q", "-b", "main")

    def git(self, *args: str, check: bool = True, timeout: float = 180) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run([GIT, "-c", "credential.helper=", *args], cwd=self.path, env=self.env,
                              capture_output=True, text=True, timeout=timeout, check=False)
        if check:
            assert proc.returncode == 0, f"git {' '.join(args)}:\n{proc.stdout}\n{proc.stderr}"
        return proc

    def commit(self, name: str, version: str, *, test: str | None = PASSING) -> str:
        (self.path / name).mkdir(exist_ok=True)
        (self.path / name / "__init__.py").write_text(SOURCE.format(name=name, version=version))
        tests = self.path / "tests"
        if test is None:
            shutil.rmtree(tests, ignore_errors=True)
        else:
            tests.mkdir(exist_ok=True)
            (tests / "test_gate.py").write_text(test.format(version=version))
        self.git("add", "-A")
        self.git("commit", "-q", "-m", f"{name} {version}")
        return self.git("rev-parse", "HEAD").stdout.strip()
