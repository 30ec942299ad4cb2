"""End to end: real git repositories, a host app, the whole pipeline (SPEC 4, 6).

commit v1, deploy, served; v2, served; a failing test, a hanging test, a
syntax error in a lazily imported module, a symlink to /etc/passwd: each
recorded as failed at the right stage while v2 keeps serving; tag v1 and
roll back to it (pinned; polls ignore the branch); resume; restart with the
repository moved away: the same release serves at once.
"""

from __future__ import annotations

import logging
import shutil
import textwrap
from pathlib import Path

import pytest
from flask import Flask

from gitplug import GitPlug
from gitplug.deploy.triggers import Trigger
from gitplug.state import DeployResult
from gitrepo import GitRepo

PLUGIN_INIT = '''
from flask import render_template_string
from gitplug import Plugin, current_plugin

plugin = Plugin("hello", __name__)

@plugin.route("/")
def index():
    from hello.lazy import VERSION
    return render_template_string("{{ v }}@{{ c }}", v=VERSION, c=current_plugin.commit[:7])
'''

PASSING_TEST = '''
def test_ok():
    assert 1 + 1 == 2
'''


def write_version(repo: GitRepo, version: str, *, test: str = PASSING_TEST, lazy_extra: str = "") -> str:
    repo.write("hello/__init__.py", textwrap.dedent(PLUGIN_INIT))
    repo.write("hello/lazy.py", f'VERSION = "{version}"\n{lazy_extra}')
    repo.write("tests/test_hello.py", textwrap.dedent(test))
    return repo.commit(f"hello {version}")


def make_app(tmp_path: Path, repo_url: str, **plugin: object) -> tuple[Flask, GitPlug]:
    app = Flask("host")
    app.config["TESTING"] = True
    app.config["GITPLUG"] = {
        "data_dir": str(tmp_path / "data"),
        "plugins": {"hello": {"repo": repo_url, "ref": "main", "test_timeout": 10, **plugin}},
    }
    return app, GitPlug(app)


def served(app: Flask) -> str:
    with app.test_client() as client:
        response = client.get("/hello/", buffered=True)
        return f"{response.status_code} {response.get_data(as_text=True)}"


@pytest.fixture
def repo(tmp_path: Path) -> GitRepo:
    return GitRepo(tmp_path / "repo")


def test_deploy_fail_rollback_resume_restart(tmp_path: Path, repo: GitRepo) -> None:
    v1 = write_version(repo, "v1")
    repo.tag("v1.0", annotated=True, message="first")
    app, gp = make_app(tmp_path, repo.url)
    try:
        record = gp.deploy("hello")
        assert record is not None and record.result == DeployResult.LIVE, record
        assert served(app) == f"200 v1@{v1[:7]}"

        v2 = write_version(repo, "v2")
        assert gp.deploy("hello").result == DeployResult.LIVE
        assert served(app) == f"200 v2@{v2[:7]}"

        bad = {
            "test": write_version(repo, "v3", test="def test_no():\n    assert False\n"),
        }
        record = gp.deploy("hello")
        assert (record.result, record.stage.value) == (DeployResult.FAILED, "test"), record
        assert "failed (exit status 1)" in record.error
        assert served(app) == f"200 v2@{v2[:7]}"

        write_version(repo, "v4", test="import time\ndef test_hang():\n    time.sleep(60)\n")
        record = gp.deploy("hello")
        assert (record.result, record.stage.value) == (DeployResult.FAILED, "test"), record
        assert "timed out" in record.error
        assert served(app) == f"200 v2@{v2[:7]}"

        write_version(repo, "v5", test="def test_skip_import():\n    pass\n", lazy_extra="def broken(:\n")
        record = gp.deploy("hello")
        assert (record.result, record.stage.value) == (DeployResult.FAILED, "load"), record
        assert "hello/lazy.py line 2" in record.error
        assert served(app) == f"200 v2@{v2[:7]}"

        write_version(repo, "v6")
        repo.symlink("hello/passwd", "/etc/passwd")
        repo.commit("add a link out of the release")
        record = gp.deploy("hello")
        assert (record.result, record.stage.value) == (DeployResult.FAILED, "stage"), record
        assert "hello/passwd" in record.error
        assert served(app) == f"200 v2@{v2[:7]}"
        repo.remove("hello/passwd")
        repo.commit("remove the link")

        # Roll back by tag: pinned, served from disk without a test run.
        record = gp.rollback("hello", "v1.0")
        assert record.result == DeployResult.LIVE and record.commit == v1, record
        assert served(app) == f"200 v1@{v1[:7]}"
        assert gp.status()["plugins"][0]["pin"] == "v1.0"
        # A poll does nothing while pinned.
        services = gp._state.services
        assert services._run_trigger(Trigger("hello", "poll")) is None
        assert served(app) == f"200 v1@{v1[:7]}"

        v7 = write_version(repo, "v7")
        record = gp.resume("hello")
        assert record.result == DeployResult.LIVE and record.commit == v7, record
        assert served(app) == f"200 v7@{v7[:7]}"
        assert gp.status()["plugins"][0]["pin"] is None

        history = gp.history("hello")
        assert [r.result.value for r in history][:3] == ["live", "live", "failed"]
        assert bad["test"] in {r.commit for r in history}
    finally:
        gp.shutdown()

    # Restart with the repository gone: served at once from disk.
    shutil.move(str(repo.path), str(tmp_path / "moved-away"))
    app2, gp2 = make_app(tmp_path, repo.url)
    try:
        assert served(app2) == f"200 v7@{v7[:7]}"
        record = gp2.deploy("hello")
        assert (record.result, record.stage.value) == (DeployResult.FAILED, "fetch"), record
        status = gp2.status()["plugins"][0]
        assert status["live_commit"] == v7
        # The error names the repository that could not be reached, not merely the plugin.
        assert str(repo.path) in status["last_error"], status["last_error"]
        assert served(app2) == f"200 v7@{v7[:7]}"
    finally:
        gp2.shutdown()


def test_a_state_that_makes_polls_do_nothing_is_logged_once(
    tmp_path: Path, repo: GitRepo, caplog: pytest.LogCaptureFixture
) -> None:
    write_version(repo, "v1")
    repo.tag("v1")
    app, gp = make_app(tmp_path, repo.url)
    services = gp._state.services
    caplog.set_level(logging.DEBUG, logger="gitplug.deploy.pipeline")

    def said(text: str) -> list[int]:
        return [r.levelno for r in caplog.records if text in r.getMessage()]

    try:
        assert gp.deploy("hello").result == DeployResult.LIVE
        assert gp.rollback("hello", "v1").result in (DeployResult.LIVE, DeployResult.SKIPPED)
        for _ in range(3):
            assert services._run_trigger(Trigger("hello", "poll")) is None
        assert said("pinned at v1; ignoring poll triggers") == [logging.INFO, logging.DEBUG, logging.DEBUG]

        assert gp.resume("hello") is not None
        bad = write_version(repo, "v2", test="def test_no():\n    assert False\n")
        record = services._run_trigger(Trigger("hello", "poll"))
        assert record is not None and record.result == DeployResult.FAILED
        for _ in range(3):
            assert services._run_trigger(Trigger("hello", "poll")) is None
        assert said(f"{bad[:12]} failed before; not retrying") == [logging.INFO, logging.DEBUG, logging.DEBUG]
        # A new state is logged again: pinned once more.
        assert gp.rollback("hello", "v1") is not None
        assert services._run_trigger(Trigger("hello", "poll")) is None
        assert said("pinned at v1; ignoring poll triggers")[-1] == logging.INFO
    finally:
        gp.shutdown()
