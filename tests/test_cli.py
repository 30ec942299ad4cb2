"""The ``gitplug`` command line, as an operator runs it (SPEC 3, 6, 7, 10).

Every command runs in a real subprocess (``python -c "from gitplug.cli
import main; main()"``, the installed console script, or ``python -m flask
... gitplug``) against real git repositories in ``tmp_path``. The server
tests start ``gitplug serve`` as a subprocess and watch what it serves over
HTTP while the CLI rolls back, resumes, stops, starts and reloads.

The helpers (:func:`run_cli`, :class:`Server`, :func:`request`,
:func:`wait_for`, :func:`write_version`) are in :mod:`serverproc`, shared with
``test_api.py``.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pytest

from gitplug.config import load_config
from gitplug.state import open_state_store
from gitrepo import GitRepo
from serverproc import (
    RECORD_KEYS,
    STATUS_KEYS,
    Server,
    clean_env,
    cli_json,
    expected,
    run_cli,
    script,
    wait_for,
    within,
    write_config,
    write_version,
)


@pytest.fixture
def repo(tmp_path: Path) -> GitRepo:
    return GitRepo(tmp_path / "hello-repo")


@pytest.fixture
def config(tmp_path: Path, repo: GitRepo) -> Path:
    return write_config(tmp_path / "deploy.yaml", {"hello": {"repo": repo.url}})


# --------------------------------------------------------------------------- check-config


def test_check_config_reads_dash_c_env_and_default_file(tmp_path: Path, config: Path) -> None:
    proc = run_cli("check-config", "-c", config)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"{config}: OK, 1 plugin(s)")
    assert "hello:" in proc.stdout and "-> /hello" in proc.stdout and "tests: off" in proc.stdout

    # $GITPLUG_CONFIG, from another directory; the console script works the same.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    proc = run_cli(
        "check-config",
        cwd=elsewhere,
        env=clean_env(GITPLUG_CONFIG=str(config)),
        argv0=[script("gitplug")],
    )
    assert proc.returncode == 0, proc.stderr
    assert "OK, 1 plugin(s)" in proc.stdout

    # Neither: ./deploy.yaml.
    proc = run_cli("check-config", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("deploy.yaml: OK, 1 plugin(s)")


def test_check_config_refuses_a_broken_file_in_one_line(tmp_path: Path, repo: GitRepo) -> None:
    broken = tmp_path / "broken.yaml"
    broken.write_text(
        f"data_dir: data\nplugins:\n  hello:\n    repo: {repo.url}\n    poll_interval: soon\n"
    )
    proc = run_cli("check-config", "-c", broken)
    assert proc.returncode == 2
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"Error: {broken}:5: plugins.hello.poll_interval: expected ")
    assert "'soon'" in lines[0]
    assert "Traceback" not in proc.stdout + proc.stderr

    # Bad YAML: the line, no traceback.
    broken.write_text("plugins:\n  hello: [\n")
    proc = run_cli("check-config", "-c", broken)
    assert proc.returncode == 2
    assert proc.stderr.startswith(f"Error: {broken}:3: invalid YAML")
    assert "Traceback" not in proc.stdout + proc.stderr


def test_check_config_missing_file_says_how_to_choose_one(tmp_path: Path) -> None:
    proc = run_cli("check-config", cwd=tmp_path)
    assert proc.returncode == 2
    assert (
        "no configuration file at" in proc.stderr and str(tmp_path / "deploy.yaml") in proc.stderr
    )
    assert "-c FILE" in proc.stderr and "GITPLUG_CONFIG" in proc.stderr
    assert "Traceback" not in proc.stderr

    proc = run_cli(
        "status", cwd=tmp_path, env=clean_env(GITPLUG_CONFIG=str(tmp_path / "nope.yaml"))
    )
    assert proc.returncode == 2
    assert str(tmp_path / "nope.yaml") in proc.stderr and "GITPLUG_CONFIG" in proc.stderr


# --------------------------------------------------------------------------- deploy, logs, history


def test_deploy_runs_the_test_gate_and_logs_shows_its_output(tmp_path: Path, repo: GitRepo) -> None:
    sha = write_version(repo, "hello", "v1", gate_test=True)
    config = write_config(
        tmp_path / "deploy.yaml",
        {
            "hello": {
                "repo": repo.url,
                "test": "python -m pytest -q -s -p no:cacheprovider",
                "test_timeout": 60,
            }
        },
    )
    proc = run_cli("deploy", "hello", "-c", config)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"deploy 1 of hello: live ({sha[:12]})"
    progress = [line.split()[0] for line in proc.stderr.splitlines() if line.startswith("  ")]
    assert progress == ["fetch", "stage", "requirements", "test", "load", "live"], proc.stderr
    assert "python -m pytest" in proc.stderr

    proc = run_cli("logs", "hello", "-c", config)
    assert proc.returncode == 0, proc.stderr
    assert "GATE-OUTPUT v1" in proc.stdout and "1 passed" in proc.stdout
    assert run_cli("logs", "hello", "--deploy", "1", "-c", config).stdout == proc.stdout

    proc = run_cli("logs", "hello", "--deploy", "99", "-c", config)
    assert proc.returncode == 2
    assert (
        "no deploy 99 of plugin 'hello'" in proc.stderr and "gitplug history hello" in proc.stderr
    )


def _steps(stderr: str) -> list[str]:
    """The progress steps a command printed (``  fetch    ...`` lines)."""
    return [line.split()[0] for line in stderr.splitlines() if line.startswith("  ")]


def test_rollback_prints_only_the_steps_that_ran(tmp_path: Path, repo: GitRepo) -> None:
    v1 = write_version(repo, "hello", "v1", gate_test=True)
    repo.tag("v1")
    write_version(repo, "hello", "v2", gate_test=True)
    config = write_config(
        tmp_path / "deploy.yaml",
        {"hello": {"repo": repo.url, "test": "python -m pytest -q -p no:cacheprovider", "test_timeout": 60}},
    )
    proc = run_cli("deploy", "hello", "-c", config)
    assert proc.returncode == 0 and _steps(proc.stderr) == ["fetch", "stage", "requirements", "test", "load", "live"], proc.stderr

    # v1 was never deployed: the mirror knows the tag (no fetch), it is staged and tested.
    proc = run_cli("rollback", "hello", "v1", "-c", config)
    assert proc.returncode == 0, proc.stderr
    assert _steps(proc.stderr) == ["stage", "requirements", "test", "load", "live"], proc.stderr
    assert v1[:12] in proc.stdout

    # Back on v2 (on disk, passed): then v1 again is on disk and passed: no fetch, no test.
    assert run_cli("resume", "hello", "-c", config).returncode == 0
    proc = run_cli("rollback", "hello", "v1", "-c", config)
    assert proc.returncode == 0, proc.stderr
    # The host's environment may have changed: requirements are checked on every deploy.
    assert _steps(proc.stderr) == ["requirements", "reuse", "load", "live"], proc.stderr
    assert "fetch" not in proc.stderr and "pytest" not in proc.stderr

    # A tag the mirror has not seen yet is fetched first.
    write_version(repo, "hello", "v3", gate_test=True)
    repo.tag("v3")
    proc = run_cli("rollback", "hello", "v3", "-c", config)
    assert proc.returncode == 0, proc.stderr
    assert _steps(proc.stderr) == ["fetch", "stage", "requirements", "test", "load", "live"], proc.stderr


def test_a_failed_deploy_prints_its_error_and_tail_once(tmp_path: Path, repo: GitRepo) -> None:
    write_version(repo, "hello", "v1")
    repo.write("tests/test_gate.py", "def test_gate():\n    print('TAIL-MARKER')\n    assert False\n")
    repo.commit("a failing gate")
    config = write_config(
        tmp_path / "deploy.yaml",
        {"hello": {"repo": repo.url, "test": "python -m pytest -q -s -p no:cacheprovider", "test_timeout": 60}},
    )
    proc = run_cli("deploy", "hello", "-c", config)
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.count("TAIL-MARKER") <= 1 and proc.stderr.count("failed (exit status 1)") == 1, proc.stderr
    assert "  failed   test\n" in proc.stderr, proc.stderr
    assert "deploy 1 of hello failed at test: plugin 'hello': tests of" in proc.stderr


def test_read_only_commands_need_no_secret_and_show_no_password(tmp_path: Path, repo: GitRepo) -> None:
    write_version(repo, "hello", "v1")
    secret_url = "https://deploy:hunter2-password@127.0.0.1:9/hello.git"
    path = tmp_path / "deploy.yaml"
    path.write_text(
        "data_dir: data\nadmin_token: ${GITPLUG_ADMIN_TOKEN}\n"
        "webhook: {secret: '${GITPLUG_WEBHOOK_SECRET}'}\n"
        f"plugins:\n  hello: {{repo: {repo.url}, test: false}}\n"
        f"  other: {{repo: '{secret_url}', test: false}}\n"
    )
    env = clean_env()  # neither secret in the environment
    for args in (("check-config",), ("status",), ("status", "--json"), ("history", "hello"),):
        proc = run_cli(*args, "-c", path, env=env)
        assert proc.returncode == 0, (args, proc.stderr)
        assert "hunter2" not in proc.stdout + proc.stderr, (args, proc.stdout)
    checked = run_cli("check-config", "-c", path, env=env)
    assert "https://deploy:***@127.0.0.1:9/hello.git" in checked.stdout
    assert "note: `gitplug serve` would refuse it here" in checked.stderr and "GITPLUG_ADMIN_TOKEN is not set" in checked.stderr
    plugins = {p["name"]: p for p in cli_json("status", "-c", path, env=env)["plugins"]}
    assert plugins["other"]["repo"] == "https://deploy:***@127.0.0.1:9/hello.git"
    proc = run_cli("logs", "hello", "-c", path, env=env)
    assert proc.returncode == 1 and "no deploy of 'hello' has a test log yet" in proc.stderr, proc.stderr
    # What needs a secret still asks for it.
    proc = run_cli("deploy", "hello", "-c", path, env=env)
    assert proc.returncode == 2 and "GITPLUG_ADMIN_TOKEN is not set" in proc.stderr, proc.stderr


def test_no_user_visible_text_cites_the_spec(tmp_path: Path) -> None:
    """Help, errors and every other string the product shows name README sections, not SPEC."""
    import ast

    import gitplug

    package = Path(gitplug.__file__).parent
    found = []
    for file in package.rglob("*.py"):
        tree = ast.parse(file.read_text())
        docstrings = {
            id(node.body[0].value)
            for node in ast.walk(tree)
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
            and node.body and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)
        }
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
                if "SPEC" in node.value:
                    found.append(f"{file.relative_to(package)}:{node.lineno}: {node.value[:60]!r}")
    for template in package.rglob("*.html"):
        if "SPEC" in template.read_text():
            found.append(str(template.relative_to(package)))
    assert not found, found
    # Click shows command docstrings as help: check the help of every command.
    for command in ("", "demo", "check-config", "status", "logs", "rollback", "serve"):
        proc = run_cli(*([command] if command else []), "--help")
        assert proc.returncode == 0 and "SPEC" not in proc.stdout, (command, proc.stdout)
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    proc = run_cli("check-config", "-c", empty)
    assert proc.returncode == 2 and "SPEC" not in proc.stderr and 'README, "Configuration"' in proc.stderr


def test_deploy_json_failure_history_and_status(
    tmp_path: Path, repo: GitRepo, config: Path
) -> None:
    v1 = write_version(repo, "hello", "v1")
    proc = run_cli("deploy", "hello", "-c", config, "--json")
    assert proc.returncode == 0, proc.stderr
    record = json.loads(proc.stdout)  # exactly one JSON value, nothing else on stdout
    assert isinstance(record, dict) and RECORD_KEYS <= set(record), record
    assert (record["id"], record["trigger"], record["ref"], record["commit"]) == (
        1,
        "cli",
        "main",
        v1,
    )
    assert (record["result"], record["stage"], record["error"]) == ("live", None, None)
    assert isinstance(record["duration_s"], float) and record["started_at"].endswith("Z")

    # Nothing new: skipped, still exit 0.
    proc = run_cli("deploy", "hello", "-c", config)
    assert proc.returncode == 0 and "skipped" in proc.stdout, proc.stderr

    bad = write_version(repo, "hello", "v2", broken=True)
    proc = run_cli("deploy", "hello", "-c", config)
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert (
        last.startswith("deploy 3 of hello failed at load: ") and "hello/views.py line 1" in last
    ), proc.stderr
    # Said once: no log records repeating the progress lines (those need -v).
    assert [line for line in proc.stderr.splitlines() if not line.startswith("  ")] == [
        "deploying hello ...",
        last,
    ]
    assert "  failed   load\n" in proc.stderr

    proc = run_cli("-v", "deploy", "hello", "-c", config, "--json")
    assert proc.returncode == 1
    assert "WARNING gitplug.deploy.pipeline: plugin hello: deploy 4 failed at load" in proc.stderr
    failed = json.loads(proc.stdout)
    assert (failed["result"], failed["stage"], failed["commit"]) == ("failed", "load", bad)
    assert "syntax error" in failed["error"]

    history = cli_json("history", "hello", "-c", config)
    assert [r["id"] for r in history] == [4, 3, 2, 1]
    assert [r["result"] for r in history] == ["failed", "failed", "skipped", "live"]
    assert all(RECORD_KEYS <= set(r) for r in history)

    status = cli_json("status", "-c", config)
    (plugin,) = status["plugins"]
    assert STATUS_KEYS <= set(plugin), plugin
    assert (plugin["name"], plugin["repo"], plugin["ref"], plugin["pin"]) == (
        "hello",
        repo.url,
        "main",
        None,
    )
    # The tracked ref's head failed: the plugin serves v1, behind main, and says why.
    assert (plugin["state"], plugin["live_commit"], plugin["workers"]) == ("behind", v1, {})
    assert plugin["state_reason"].startswith(
        f"serving {v1[:12]}, not the head of main: deploy #4 (cli) of {bad[:12]} failed at load: "
    )
    assert plugin["last_deploy"] == history[0]

    proc = run_cli("history", "hello", "-c", config)
    assert proc.returncode == 0
    assert [line.split()[0] for line in proc.stdout.splitlines()[1:]] == ["4", "3", "2", "1"]


def test_status_after_a_failed_resume_says_behind_and_why(tmp_path: Path, repo: GitRepo, config: Path) -> None:
    v1 = write_version(repo, "hello", "v1")
    assert run_cli("deploy", "hello", "-c", config).returncode == 0
    write_version(repo, "hello", "v2")
    assert run_cli("deploy", "hello", "-c", config).returncode == 0
    proc = run_cli("rollback", "hello", v1, "-c", config)
    assert proc.returncode == 0, proc.stderr
    (plugin,) = cli_json("status", "-c", config)["plugins"]
    assert (plugin["state"], plugin["state_reason"], plugin["pin"]) == ("live", None, v1)

    bad = write_version(repo, "hello", "v3", broken=True)
    proc = run_cli("resume", "hello", "-c", config)
    assert proc.returncode == 1, proc.stdout
    failed = cli_json("history", "hello", "-c", config)[0]
    assert (failed["trigger"], failed["result"], failed["commit"]) == ("cli", "failed", bad)
    reason = (
        f"serving {v1[:12]}, not the head of main: deploy #{failed['id']} (cli) of {bad[:12]}"
        f" failed at load: {failed['error'].splitlines()[0]}"
    )
    (plugin,) = cli_json("status", "-c", config)["plugins"]
    assert (plugin["state"], plugin["pin"], plugin["live_commit"]) == ("behind", None, v1)
    assert plugin["state_reason"] == reason
    proc = run_cli("status", "-c", config)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith(f"hello: behind  {v1[:12]}  ref main  /hello"), lines
    assert lines[1] == f"    behind: {reason}", lines


def test_unknown_plugin_exits_2_listing_the_known_ones(config: Path) -> None:
    for args in (
        ["deploy", "nope"],
        ["history", "nope"],
        ["rollback", "nope", "v1"],
        ["stop", "nope"],
        ["logs", "nope"],
    ):
        proc = run_cli(*args, "-c", config)
        assert proc.returncode == 2, (args, proc.stderr)
        assert proc.stderr.strip() == (
            "Error: no plugin named 'nope' in the configuration. Known plugins: hello."
            " Add it under 'plugins:' in deploy.yaml."
        ), args
        assert proc.stdout == ""


def test_flask_gitplug_group(tmp_path: Path, repo: GitRepo, config: Path) -> None:
    from importlib.metadata import entry_points

    from gitplug.cli import cli, flask_group

    (ep,) = [ep for ep in entry_points(group="flask.commands") if ep.name == "gitplug"]
    assert ep.load() is flask_group
    assert set(flask_group.commands) == set(cli.commands)

    sha = write_version(repo, "hello", "v1")
    assert run_cli("deploy", "hello", "-c", config).returncode == 0
    (tmp_path / "myhost.py").write_text("from flask import Flask\n\napp = Flask(__name__)\n")
    flask = [script("flask"), "--app", "myhost"]
    proc = run_cli("gitplug", "status", "-c", config, cwd=tmp_path, argv0=flask)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"hello: live  {sha[:12]}  ref main  /hello")

    # Without -c, `flask gitplug` uses the app's own GITPLUG_CONFIG.
    (tmp_path / "confighost.py").write_text(
        "from flask import Flask\n\napp = Flask(__name__)\n"
        f"app.config['GITPLUG_CONFIG'] = {str(config)!r}\n"
    )
    proc = run_cli(
        "--app",
        "confighost",
        "gitplug",
        "status",
        "--json",
        cwd=tmp_path,
        argv0=[sys.executable, "-m", "flask"],
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["plugins"][0]["live_commit"] == sha


def test_flask_app_relative_gitplug_config_is_relative_to_the_app(
    tmp_path: Path, repo: GitRepo
) -> None:
    # app.config["GITPLUG_CONFIG"] = "deploy.yaml" names the file beside the app, as
    # Flask's own config.from_pyfile() does, whatever directory `flask` runs from.
    sha = write_version(repo, "hello", "v1")
    project = tmp_path / "project"
    project.mkdir()
    write_config(project / "deploy.yaml", {"hello": {"repo": repo.url}})
    assert run_cli("deploy", "hello", "-c", project / "deploy.yaml").returncode == 0
    (project / "relhost.py").write_text(
        "from flask import Flask\n\napp = Flask(__name__)\n"
        "app.config['GITPLUG_CONFIG'] = 'deploy.yaml'\n"
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    proc = run_cli(
        "--app", str(project / "relhost.py"), "gitplug", "status", "--json",
        cwd=elsewhere, argv0=[sys.executable, "-m", "flask"],
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["plugins"][0]["live_commit"] == sha
    assert not (elsewhere / "deploy.yaml").exists()


# --------------------------------------------------------------------------- with a server


def test_cli_drives_a_running_server(tmp_path: Path, repo: GitRepo, config: Path) -> None:
    v1 = write_version(repo, "hello", "v1")
    repo.tag("v1")
    assert run_cli("deploy", "hello", "-c", config).returncode == 0
    with Server(config) as server:
        assert server.get("/hello/") == expected("hello", "v1", v1)

        v2 = write_version(repo, "hello", "v2")
        deployed = cli_json("deploy", "hello", "-c", config)
        # The server polls once a second after it starts; it may have taken v2 first.
        assert deployed["result"] in ("live", "skipped") and deployed["commit"] == v2, deployed
        within(
            2, lambda: server.get("/hello/") == expected("hello", "v2", v2), what="v2 after deploy"
        )

        proc = run_cli("rollback", "hello", "v1", "-c", config)
        assert proc.returncode == 0, proc.stderr
        assert "live" in proc.stdout and v1[:12] in proc.stdout
        within(
            2,
            lambda: server.get("/hello/") == expected("hello", "v1", v1),
            what="v1 after rollback",
        )

        # The server's heartbeat (every 2 s) carries the commit it serves.
        store = open_state_store(load_config(config).state)
        try:
            wait_for(
                lambda: [
                    w
                    for w in store.workers()
                    if w.pid == server.pid and w.plugin_commits == {"hello": v1}
                ],
                timeout=20,
                what="the server's heartbeat with v1",
            )
        finally:
            store.close()
        (plugin,) = cli_json("status", "-c", config)["plugins"]
        assert (plugin["pin"], plugin["live_commit"], plugin["last_deploy"]["trigger"]) == (
            "v1",
            v1,
            "rollback",
        )
        ((worker, commit),) = plugin["workers"].items()
        assert f":{server.pid}:" in worker and commit == v1
        text = run_cli("status", "-c", config).stdout
        assert "(pinned at v1)" in text and f"worker {worker}: {v1[:12]}" in text

        proc = run_cli("resume", "hello", "-c", config)
        assert proc.returncode == 0, proc.stderr
        within(
            2, lambda: server.get("/hello/") == expected("hello", "v2", v2), what="v2 after resume"
        )
        assert cli_json("status", "-c", config)["plugins"][0]["pin"] is None

        proc = run_cli("stop", "hello", "-c", config)
        assert (proc.returncode, proc.stdout.strip()) == (0, "hello: stopped"), proc.stderr
        within(2, lambda: server.get("/hello/").startswith("404 "), what="404 after stop")
        assert cli_json("status", "-c", config)["plugins"][0]["state"] == "stopped"

        proc = run_cli("start", "hello", "-c", config)
        assert (proc.returncode, proc.stdout.strip()) == (0, "hello: started"), proc.stderr
        within(
            2, lambda: server.get("/hello/") == expected("hello", "v2", v2), what="v2 after start"
        )
    assert "Traceback" not in server.log()


def test_pins_and_stops_survive_a_crash_and_a_restart(tmp_path: Path, repo: GitRepo) -> None:
    """SPEC 4.7: a pin and a stop outlive the process, even a SIGKILL, and polls obey them."""
    v1 = write_version(repo, "hello", "v1")
    repo.tag("v1")
    v2 = write_version(repo, "hello", "v2")
    world_repo = GitRepo(tmp_path / "world-repo")
    w1 = write_version(world_repo, "world", "w1")
    ctrl_repo = GitRepo(tmp_path / "ctrl-repo")
    c1 = write_version(ctrl_repo, "ctrl", "c1")
    config = write_config(
        tmp_path / "deploy.yaml",
        {"hello": {"repo": repo.url}, "world": {"repo": world_repo.url}, "ctrl": {"repo": ctrl_repo.url}},
        poll_interval=1,
    )
    for name in ("hello", "world", "ctrl"):
        assert run_cli("deploy", name, "-c", config).returncode == 0
    assert run_cli("rollback", "hello", "v1", "-c", config).returncode == 0
    assert run_cli("stop", "world", "-c", config).returncode == 0
    v3 = write_version(repo, "hello", "v3")  # what a poll of main would deploy, were it not pinned

    for attempt, how in enumerate(("SIGKILL", "restart")):
        with Server(config) as server:
            assert server.get("/hello/") == expected("hello", "v1", v1)
            assert server.get("/world/").startswith("404 ")
            # The positive control: polls run and deploy an unpinned plugin's new
            # commits. Two of them, one after the other, span a whole poll interval
            # (1 s for every plugin), so hello's and world's polls ran meanwhile.
            for step in ("a", "b"):
                version = f"c{attempt}{step}"
                c_new = write_version(ctrl_repo, "ctrl", version)
                wait_for(
                    lambda c_new=c_new, version=version: server.get("/ctrl/") == expected("ctrl", version, c_new),
                    timeout=30,
                    what=f"a poll to deploy ctrl {version}",
                )
            assert server.get("/hello/") == expected("hello", "v1", v1)
            assert server.get("/world/").startswith("404 ")
            if how == "SIGKILL":
                assert server.proc is not None
                server.proc.kill()
                server.proc.wait(timeout=10)
        status = {p["name"]: p for p in cli_json("status", "-c", config)["plugins"]}
        assert (status["hello"]["pin"], status["hello"]["live_commit"]) == ("v1", v1), status["hello"]
        assert status["world"]["state"] == "stopped", status["world"]
    assert v2 != v3 and c1 and w1  # both were real commits the pins held back


def test_config_reload_while_serving(tmp_path: Path, repo: GitRepo, config: Path) -> None:
    v1 = write_version(repo, "hello", "v1")
    v2 = write_version(repo, "hello", "v2")
    repo.branch("release")
    repo.set_ref("main", v1)  # main stays at v1: v2 is only on "release"
    world_repo = GitRepo(tmp_path / "world-repo")
    w1 = write_version(world_repo, "world", "w1")
    assert run_cli("deploy", "hello", "-c", config).returncode == 0
    with Server(config) as server:
        assert server.get("/world/").startswith("404 ")

        # An added plugin is deployed and served without a restart.
        write_config(config, {"hello": {"repo": repo.url}, "world": {"repo": world_repo.url}})
        within(
            5, lambda: server.get("/world/") == expected("world", "w1", w1), what="the added plugin"
        )

        # An invalid edit is refused; the running configuration keeps serving.
        good = config.read_text()
        edited = time.monotonic()
        config.write_text(good.replace("poll_interval: 3600", "poll_interval: soon"))
        wait_for(
            lambda: "refusing the edited configuration" in server.log(),
            timeout=20,
            what="the refusal",
        )
        # The positive control: how long the file watcher took to notice an edit.
        noticed_after = time.monotonic() - edited
        assert f"{config.name}:2: poll_interval: expected a positive number" in server.log()
        assert server.get("/hello/") == expected("hello", "v1", v1)
        assert server.get("/world/") == expected("world", "w1", w1)

        # reload-config refuses it too, and leaves the file untouched.
        mtime = config.stat().st_mtime_ns
        proc = run_cli("reload-config", "-c", config)
        assert proc.returncode == 2 and "poll_interval" in proc.stderr
        assert config.stat().st_mtime_ns == mtime

        # A valid file the watcher cannot see (same mtime): reload-config nudges it.
        # world is removed (stopped) and hello's ref changed (deployed).
        staged = tmp_path / "staged.yaml"
        write_config(staged, {"hello": {"repo": repo.url, "ref": "release"}})
        os.utime(staged, ns=(mtime, mtime))
        os.replace(staged, config)
        # Three times what the watcher took to notice the edit above: it must not have.
        time.sleep(max(1.0, 3 * noticed_after))
        assert server.get("/world/") == expected("world", "w1", w1)
        proc = run_cli("reload-config", "-c", config)
        assert proc.returncode == 0, proc.stderr
        assert "OK, 1 plugin(s)" in proc.stdout
        within(
            5, lambda: server.get("/world/").startswith("404 "), what="the removed plugin stopped"
        )
        within(
            5,
            lambda: server.get("/hello/") == expected("hello", "v2", v2),
            what="the changed ref deployed",
        )
    assert "Traceback" not in server.log()


def test_serve_dev_swaps_on_every_save_that_loads(tmp_path: Path) -> None:
    """`gitplug serve --dev NAME=PATH`: a good save goes live, a broken one is reported."""
    plugin_dir = tmp_path / "workdir"
    views = plugin_dir / "devplug" / "views.py"
    views.parent.mkdir(parents=True)
    (plugin_dir / "devplug" / "__init__.py").write_text(
        "from gitplug import Plugin\n\nplugin = Plugin('devplug', __name__)\n\nfrom . import views  # noqa\n"
    )
    views.write_text("from . import plugin\n\n@plugin.route('/')\ndef index():\n    return 'first'\n")
    config = tmp_path / "deploy.yaml"
    config.write_text("data_dir: data\nplugins: {}\n")
    with Server(config, extra=["--dev", f"devplug={plugin_dir}"]) as server:
        wait_for(lambda: server.get("/devplug/") == "200 first", timeout=30, what="the first load")
        views.write_text(views.read_text().replace("'first'", "'second'"))
        wait_for(lambda: server.get("/devplug/") == "200 second", timeout=30, what="the saved change")
        views.write_text(views.read_text() + "\ndef broken(:\n")
        wait_for(lambda: "devplug/views.py line" in server.log(), timeout=30, what="the load error")
        assert server.get("/devplug/") == "200 second"
        assert "previous release keeps serving" in server.log()


def test_status_shows_the_prefix_the_plugin_constructor_declares(tmp_path: Path, repo: GitRepo) -> None:
    """No url_prefix configured: the release's Plugin(url_prefix=...) is used, and shown."""
    repo.write("shop/__init__.py", (
        "from gitplug import Plugin\n"
        "plugin = Plugin('shop', __name__, url_prefix='/store')\n"
        "@plugin.route('/')\n"
        "def index():\n"
        "    return 'shop'\n"
    ))
    repo.commit("shop at /store")
    config = write_config(tmp_path / "shop.yaml", {"shop": {"repo": repo.url}})
    (before,) = cli_json("status", "-c", config)["plugins"]
    assert before["url_prefix"] == "/shop"  # nothing loaded yet: the configuration's default
    proc = run_cli("deploy", "shop", "-c", config)
    assert proc.returncode == 0, proc.stderr
    (after,) = cli_json("status", "-c", config)["plugins"]
    assert (after["state"], after["url_prefix"]) == ("live", "/store")
    assert run_cli("status", "-c", config).stdout.splitlines()[0].endswith("  /store")
