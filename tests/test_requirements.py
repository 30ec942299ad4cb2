"""The requirements stage (README, "Requirements"): checked before the tests run.

First the check itself on real files against this interpreter's real
distributions (flask and pytest are installed here; ``no-such-dist-xyz`` and
``flask>=99`` never are); then end to end through a real ``gitplug serve``
process: each unmet, missing, conflicting or unparsable requirement fails the
deploy at stage ``requirements`` with one line per requirement while the
live release keeps serving, a marker that excludes this host is skipped, and
``gitplug history`` shows the stage. ``serve --dev`` warns and loads anyway.
"""

from __future__ import annotations

import json
import uuid
from importlib import metadata
from pathlib import Path

import pytest

from gitplug.deploy.requirements import check_requirements
from gitrepo import GitRepo
from serverproc import Server, clean_env, cli_json, expected, request, run_cli, within, write_version

FLASK = metadata.version("flask")
TOKEN = "admin-" + uuid.uuid4().hex


def _check(tmp_path: Path, files: dict[str, str]) -> tuple[list[str], list[str], list[str], str | None]:
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    report = check_requirements(tmp_path)
    return report.problems, report.met, report.skipped, report.source


# --------------------------------------------------------------------------- the check


def test_met_requirements_from_pyproject_win_over_requirements_txt(tmp_path: Path) -> None:
    problems, met, _, source = _check(tmp_path, {
        "pyproject.toml": '[project]\nname = "p"\ndependencies = ["Flask>=3.0", "pytest"]\n',
        "requirements.txt": "no-such-dist-xyz\n",  # not read: pyproject declares dependencies
    })
    assert (problems, source) == ([], "pyproject.toml")
    assert met == [f"'Flask>=3.0': installed {FLASK}", f"'pytest': installed {metadata.version('pytest')}"]


def test_requirements_txt_is_read_when_pyproject_declares_none(tmp_path: Path) -> None:
    problems, met, _, source = _check(tmp_path, {
        "pyproject.toml": '[tool.ruff]\nline-length = 100\n',
        "requirements.txt": "# tools\nflask>=3  # the host's\n\n",
    })
    assert (problems, met, source) == ([], [f"'flask>=3': installed {FLASK}"], "requirements.txt")


def test_nothing_declared_is_nothing_to_check(tmp_path: Path) -> None:
    assert _check(tmp_path, {}) == ([], [], [], None)


def test_unmet_missing_and_conflicting_name_what_was_asked_and_what_is_installed(tmp_path: Path) -> None:
    problems, met, _, _ = _check(tmp_path, {"requirements.txt": (
        "flask>=99\nno-such-dist-xyz>=1\nwerkzeug<2\nwerkzeug>=3\nflask>=3\n")})
    assert problems == [
        f"'flask>=99': installed flask {FLASK} does not satisfy it",
        "'no-such-dist-xyz>=1': not installed",
        "'werkzeug<2' and 'werkzeug>=3': conflicting requirements for werkzeug (no version satisfies"
        f" all of them); installed: {metadata.version('werkzeug')}",
    ]
    assert met == [f"'flask>=3': installed {FLASK}"]


def test_two_lines_that_can_both_hold_are_no_conflict(tmp_path: Path) -> None:
    problems, met, _, _ = _check(tmp_path, {"requirements.txt": "flask>1\nflask<99\n"})
    assert problems == [] and len(met) == 2


def test_markers_are_evaluated_for_this_host(tmp_path: Path) -> None:
    problems, met, skipped, _ = _check(tmp_path, {"requirements.txt": (
        'no-such-dist-xyz; python_version < "3"\n'
        'flask>=3; python_version >= "3"\n'
        'no-such-dist-xyz; extra == "dev"\n')})
    assert problems == [] and met == [f"'flask>=3; python_version >= \"3\"': installed {FLASK}"]
    assert len(skipped) == 2


def test_lines_that_cannot_be_checked_are_reported_not_ignored(tmp_path: Path) -> None:
    problems, met, _, _ = _check(tmp_path, {"requirements.txt": (
        "-e .\n--index-url https://pypi.example.com/simple\n-r other.txt\n"
        "git+https://example.com/x.git\nbar @ https://example.com/bar.whl\n!!bad\n"
        "flask>=3 \\\n    --hash=sha256:0123\n")})
    assert [p.split(":", 2)[:2] for p in problems] == [
        ["requirements.txt", "1"], ["requirements.txt", "2"], ["requirements.txt", "3"],
        ["requirements.txt", "4"], ["requirements.txt", "5"], ["requirements.txt", "6"]]
    assert "editable install" in problems[0] and "gitplug installs nothing" in problems[1]
    assert "direct URL" in problems[4] and "not a valid requirement" in problems[5]
    assert met == [f"'flask>=3': installed {FLASK}"]  # --hash does not change what is required


def test_a_broken_pyproject_is_reported(tmp_path: Path) -> None:
    problems, *_ = _check(tmp_path, {"pyproject.toml": "[project\n"})
    assert len(problems) == 1 and problems[0].startswith("pyproject.toml: cannot be read as TOML")
    problems, *_ = _check(tmp_path, {"pyproject.toml": '[project]\ndependencies = "flask"\n'})
    assert problems == ['pyproject.toml: [project] dependencies must be a list of strings such as'
                        ' ["requests>=2.31"]']


# --------------------------------------------------------------------------- through a server


CONFIG = """\
data_dir: data
poll_interval: 3600
admin_token: ${{GITPLUG_ADMIN_TOKEN}}
plugins:
  hello:
    repo: {repo}
    ref: main
    test: python -m pytest -q -p no:cacheprovider
    test_timeout: 60
"""


def _deploy(server: Server) -> dict[str, object]:
    status, text = request("POST", f"{server.base}/_gitplug/api/plugins/hello/deploy",
                           body=b"{}", headers={"Authorization": f"Bearer {TOKEN}",
                                                "Content-Type": "application/json"})
    record = json.loads(text)
    assert status in (200, 409), text
    return record


@pytest.fixture
def served_repo(tmp_path: Path) -> tuple[GitRepo, Path, dict[str, str]]:
    repo = GitRepo(tmp_path / "hello-repo")
    repo.write("requirements.txt", "flask>=3.0\n")
    v1 = write_version(repo, "hello", "v1", gate_test=True)
    config = tmp_path / "deploy.yaml"
    config.write_text(CONFIG.format(repo=repo.url))
    env = clean_env(GITPLUG_ADMIN_TOKEN=TOKEN)
    deployed = run_cli("deploy", "hello", "-c", config, env=env)
    assert deployed.returncode == 0, deployed.stdout + deployed.stderr
    return repo, config, {"v1": v1}


@pytest.mark.parametrize(
    ("files", "lines"),
    [
        ({"requirements.txt": "flask>=99\n"}, [f"'flask>=99': installed flask {FLASK} does not satisfy it"]),
        ({"pyproject.toml": '[project]\nname = "hello"\ndependencies = ["no-such-dist-xyz"]\n'},
         ["'no-such-dist-xyz': not installed"]),
        ({"requirements.txt": "-e .\nflask>=3\n"},
         ["requirements.txt:1: '-e .': cannot be checked: an editable install cannot be checked;"
          " install it into the host and require it by name"]),
    ],
    ids=["unmet", "missing", "unparsable"],
)
def test_a_release_the_host_cannot_run_fails_at_requirements_and_v1_keeps_serving(
    tmp_path: Path, served_repo: tuple[GitRepo, Path, dict[str, str]], files: dict[str, str],
    lines: list[str],
) -> None:
    repo, config, shas = served_repo
    with Server(config, env=clean_env(GITPLUG_ADMIN_TOKEN=TOKEN)) as server:
        assert server.get("/hello/") == expected("hello", "v1", shas["v1"])
        for name, text in files.items():
            repo.write(name, text)
        v2 = write_version(repo, "hello", "v2", gate_test=True)
        record = _deploy(server)
        assert (record["result"], record["stage"], record["commit"]) == ("failed", "requirements", v2)
        error = str(record["error"])
        assert error.splitlines()[0].startswith(f"plugin 'hello': 1 requirement of {v2[:12]}")
        assert error.splitlines()[1:] == [f"  {line}" for line in lines]
        # The tests never ran: the gate's log was never written for this deploy.
        logs = tmp_path / "data" / "logs" / "hello"
        assert (logs / "1.log").is_file()  # v1's gate wrote its log: the check below can fail
        assert not (logs / f"{record['id']}.log").exists(), "the test gate ran"
        assert server.get("/hello/") == expected("hello", "v1", shas["v1"])

        history = cli_json("history", "hello", "-c", config, env=clean_env(GITPLUG_ADMIN_TOKEN=TOKEN))
        assert (history[0]["result"], history[0]["stage"]) == ("failed", "requirements")
        text = run_cli("history", "hello", "-c", config, env=clean_env(GITPLUG_ADMIN_TOKEN=TOKEN)).stdout
        assert "requirements" in text

        # Fixed (a marker that excludes this host, and a requirement it meets): live.
        repo.write("requirements.txt", 'no-such-dist-xyz; python_version < "3"\nflask>=3\n')
        if "pyproject.toml" in files:
            repo.remove("pyproject.toml")
        v3 = write_version(repo, "hello", "v3", gate_test=True)
        record = _deploy(server)
        # The controller's first poll, late on a loaded machine, may have deployed v3 before the
        # API asked: the API then answers "already live", and the history has v3's live deploy.
        if record["result"] == "skipped":
            assert record["commit"] == v3 and "already live" in str(record["error"]), record
            history = cli_json("history", "hello", "-c", config, env=clean_env(GITPLUG_ADMIN_TOKEN=TOKEN))
            assert any((h["result"], h["commit"]) == ("live", v3) for h in history), history
        else:
            assert (record["result"], record["commit"]) == ("live", v3), record
        within(2, lambda: server.get("/hello/") == expected("hello", "v3", v3), what="v3 served")
    assert "Traceback" not in server.log()


def test_serve_dev_warns_about_requirements_and_loads_anyway(tmp_path: Path) -> None:
    source = tmp_path / "checkout"
    (source / "hello").mkdir(parents=True)
    (source / "hello" / "__init__.py").write_text(
        "from gitplug import Plugin\nplugin = Plugin('hello', __name__)\n\n"
        "@plugin.route('/')\ndef index():\n    return 'dev hello'\n")
    (source / "requirements.txt").write_text("flask>=99\n")
    config = tmp_path / "deploy.yaml"
    config.write_text("data_dir: data\nplugins: {}\n")
    with Server(config, extra=["--dev", f"hello={source}"]) as server:
        within(2, lambda: server.get("/hello/") == "200 dev hello", what="the dev plugin served")
        log = server.log()
        assert "1 requirement of" in log and f"'flask>=99': installed flask {FLASK} does not satisfy it" in log
