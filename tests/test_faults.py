"""The fault catalogue (issue 5): bad inputs and faults, each with its error and its safety net.

Every test breaks one thing on purpose and asserts two facts:

(a) the error names what was wrong, where (plugin, file, line, key, url, ref,
    path) and what to do, matched on the message; and
(b) the last good release still serves: a GET through the host application's
    test client returns the stamp of the release that was live before.

Categories: configuration, git, trees, plugin code, test gate, disk,
concurrency, webhooks. The test gate is off (``test: false``) unless it is the
subject; then it is the default gate (pytest, skipped for a release without
``tests/``, so the good release never depends on the machine's load) with a
small timeout where the timeout is what is tested. Real git repositories
(dulwich), real subprocesses, real files; nothing of gitplug is mocked. The
poll scheduler is stopped (see :func:`start_without_polls`).

Bugs found are kept as ``xfail(strict=True)`` tests whose reason starts with "BUG:".
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import re
import shutil
import textwrap
import threading
import time
import typing as t
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest
from click.testing import CliRunner
from flask import Flask
from gitrepo import MODE_EXEC, MODE_FILE, MODE_GITLINK, MODE_LINK, GitRepo, serve_http

from gitplug import GitPlug, signals
from gitplug.cli import cli
from gitplug.config import load_config
from gitplug.errors import ConfigError
from gitplug.state import DeployRecord, DeployResult, parse_iso

logger = logging.getLogger(__name__)


class _ListHandler(logging.Handler):
    """Keeps what gitplug logs, to check that a failed deploy is logged."""

    def __init__(self, records: list[logging.LogRecord]) -> None:
        super().__init__(logging.WARNING)
        self.records = records

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


MiB = 1024 * 1024
SECRET = "fault-catalogue-secret"
UNSET_VAR = "GITPLUG_FAULTS_NEVER_SET"

PLUGIN_INIT = """
from gitplug import Plugin, current_plugin

STAMP = "{stamp}"
plugin = Plugin("hello", __name__)

@plugin.route("/")
def index():
    return f"stamp={{STAMP}}@{{current_plugin.commit[:7]}}"
"""

PASSING_TEST = """
import hello

def test_stamp():
    assert hello.STAMP
"""

#: Leave ``test:`` out of the plugin's settings: the default gate (pytest), which is
#: skipped for a release without ``tests/``. Good releases here have none, so the
#: machine's load (pytest's start-up time) never fails the release a fault is measured against.
DEFAULT_GATE: t.Any = object()


def plugin_files(stamp: str, **extra: str) -> dict[str, str]:
    """The files of a good plugin release stamped ``stamp``, plus ``extra``."""
    files = {"hello/__init__.py": textwrap.dedent(PLUGIN_INIT.format(stamp=stamp))}
    files.update({path: textwrap.dedent(text) for path, text in extra.items()})
    return files


def v1_repo(tmp_path: Path) -> tuple[GitRepo, str]:
    """The repository make_host would create, for tests that add refs before the first deploy."""
    repo = GitRepo(tmp_path / "repo")
    for path, content in plugin_files("v1").items():
        repo.write(path, content)
    return repo, repo.commit("v1")


@dataclass
class Host:
    """A host application serving plugin ``hello`` from a real git repository."""

    tmp: Path
    app: Flask
    gp: GitPlug
    repo: GitRepo
    good: str  #: the commit of the last good release
    good_stamp: str
    failed: list[tuple[str, DeployRecord, BaseException]] = field(default_factory=list)
    logged: list[logging.LogRecord] = field(default_factory=list)

    def served(self, path: str = "/hello/") -> str:
        with self.app.test_client() as client:
            response = client.get(path, buffered=True)
            return f"{response.status_code} {response.get_data(as_text=True)}"

    def assert_good_serves(self) -> None:
        """Fact (b): the release that was live before the fault still answers."""
        assert self.served() == f"200 {self.good_stamp}"
        live = self.gp.live_release("hello")
        assert live is not None and live.commit == self.good
        status = self.gp.status()["plugins"][0]
        assert (status["state"], status["live_commit"]) == ("live", self.good), status

    def commit(self, files: dict[str, str | bytes], message: str, *, replace: bool = True) -> str:
        """Commit ``files`` as the whole work tree (``replace``) or on top of it."""
        if replace:
            for child in self.repo.path.iterdir():
                if child.name != ".git":
                    self.repo.remove(child.name)
        for path, content in files.items():
            self.repo.write(path, content)
        return self.repo.commit(message)

    def deploy_fails(self, stage: str, match: str, *, ref: str | None = None) -> DeployRecord:
        """Deploy, expect a failure at ``stage`` whose error matches, and the good release live."""
        record = self.gp.deploy("hello", ref=ref)
        assert record is not None, "an explicit deploy always leaves a record"
        assert record.result == DeployResult.FAILED, record
        assert record.stage is not None and record.stage.value == stage, record
        assert re.search(match, record.error or "", re.DOTALL), f"{match!r} not in {record.error!r}"
        # Signalled with the same record, logged, and kept on the plugin for `gitplug status`.
        assert [d.id for _, d, _ in self.failed] == [record.id]
        said = [r.getMessage() for r in self.logged if r.levelno >= logging.WARNING]
        assert any(f"deploy {record.id} failed at {stage}: " in line for line in said), said
        status = self.gp.status()["plugins"][0]
        assert status["last_error"] == record.error
        assert status["last_deploy"]["result"] == "failed"
        self.assert_good_serves()
        return record


def _new_host(
    tmp_path: Path,
    *,
    files: dict[str, str] | None = None,
    plugin: dict[str, t.Any] | None = None,
    top: dict[str, t.Any] | None = None,
    others: dict[str, dict[str, t.Any]] | None = None,
    repo_url: str | None = None,
    app: Flask | None = None,
) -> Host:
    repo = GitRepo(tmp_path / "repo")
    if repo.head is None:  # else the test prepared the repository (branches, tags) itself
        for path, content in (files or plugin_files("v1")).items():
            repo.write(path, content)
        repo.commit("v1")
    good = repo.head
    assert good is not None
    if app is None:
        app = Flask("host")
        app.config["TESTING"] = True
    settings: dict[str, t.Any] = {"repo": repo_url or repo.url, "ref": "main", "test": False}
    settings.update(plugin or {})
    settings = {key: value for key, value in settings.items() if value is not DEFAULT_GATE}
    app.config["GITPLUG"] = {
        "data_dir": str(tmp_path / "data"),
        **(top or {}),
        "plugins": {
            "hello": settings,
            **{
                name: {k: (repo.url if v == "{repo}" else v) for k, v in other.items()}
                for name, other in (others or {}).items()
            },
        },
    }
    gp = GitPlug(app)
    start_without_polls(gp)
    record = gp.deploy("hello")
    assert record is not None and record.result == DeployResult.LIVE, record
    host = Host(tmp_path, app, gp, repo, good, f"stamp=v1@{good[:7]}")

    def on_failed(
        sender: object, *, plugin: str, deploy: DeployRecord, error: BaseException
    ) -> None:
        host.failed.append((plugin, deploy, error))

    signals.deploy_failed.connect(on_failed, weak=False)
    host._receiver = on_failed  # type: ignore[attr-defined]
    host._handler = _ListHandler(host.logged)  # type: ignore[attr-defined]
    logging.getLogger("gitplug").addHandler(host._handler)  # type: ignore[attr-defined]
    host.assert_good_serves()
    return host


def start_without_polls(gp: GitPlug, timeout: float = 30.0) -> None:
    """Start the background services as the first request would, minus the poll scheduler.

    Polls are a trigger of their own; here the explicit deploy is the subject,
    and the startup poll (one second after the election) would race it, deploy
    the faulty commit first and leave two records. Convergence, the deploy
    queue (webhooks) and the controller's other duties keep running.
    """
    gp.start_background()
    services = gp._state.services
    deadline = time.monotonic() + timeout
    while not (services.is_controller and services.scheduler.jobs):
        assert time.monotonic() < deadline, "this process never became the controller"
        time.sleep(0.01)
    services.scheduler.shutdown()


@pytest.fixture
def make_host(tmp_path: Path) -> t.Iterator[t.Callable[..., Host]]:
    hosts: list[Host] = []

    def make(**kwargs: t.Any) -> Host:
        host = _new_host(tmp_path, **kwargs)
        hosts.append(host)
        return host

    yield make
    for host in hosts:
        signals.deploy_failed.disconnect(host._receiver)  # type: ignore[attr-defined]
        logging.getLogger("gitplug").removeHandler(host._handler)  # type: ignore[attr-defined]
        host.gp.shutdown()


@pytest.fixture
def host(make_host: t.Callable[..., Host]) -> Host:
    return make_host()


# =========================================================================== configuration

GOOD_YAML = """\
data_dir: data
poll_interval: 60
webhook:
  secret: s3cret
plugins:
  hello:
    repo: {repo}
    ref: main
    test: false
"""

#: (id, text appended to / replacing the good file, the expected message as a regex,
#:  the line the message must name (a substring of that line), the key named)
CONFIG_FAULTS = [
    pytest.param(
        GOOD_YAML + "    reff: main\n",
        r"unknown key 'reff'; did you mean 'ref'\? Allowed here: repo, ref, url_prefix",
        "reff: main",
        "plugins.hello.reff",
        id="unknown-key",
    ),
    pytest.param(
        GOOD_YAML + "    test_timeout: soon\n",
        r"expected a positive number of seconds, got 'soon'",
        "test_timeout: soon",
        "plugins.hello.test_timeout",
        id="wrong-type",
    ),
    pytest.param(
        GOOD_YAML + '    poll_interval: "30"\n',
        r"expected a positive number of seconds, got '30'",
        'poll_interval: "30"',
        "plugins.hello.poll_interval",
        id="quoted-number",
    ),
    pytest.param(
        GOOD_YAML.replace("ref: main", "ref: main..dev"),
        r"expected a branch, tag or commit sha \(no spaces, '\.\.'.*got 'main\.\.dev'",
        "ref: main..dev",
        "plugins.hello.ref",
        id="bad-ref",
    ),
    pytest.param(
        GOOD_YAML + "    url_prefix: /shop\n  other:\n    repo: {repo}\n    url_prefix: /shop\n",
        r"url_prefix '/shop' of plugin 'other' is the same as url_prefix '/shop' of plugin"
        r" 'hello'; give each plugin a prefix that does not nest in another",
        "url_prefix: /shop",
        "plugins.other.url_prefix",
        id="duplicate-prefix",
    ),
    pytest.param(
        GOOD_YAML + "  other:\n    repo: {repo}\n    url_prefix: /hello/inner\n",
        r"url_prefix '/hello/inner' of plugin 'other' is inside url_prefix '/hello' of plugin 'hello'",
        "url_prefix: /hello/inner",
        "plugins.other.url_prefix",
        id="nested-prefix",
    ),
    pytest.param(
        GOOD_YAML.replace("secret: s3cret", "secret: ${" + UNSET_VAR + "}"),
        rf"environment variable {UNSET_VAR} is not set \(used as \${{{UNSET_VAR}}}\); export"
        rf" {UNSET_VAR}=\.\.\. before starting gitplug",
        "secret: ${",
        "webhook.secret",
        id="unset-env-var",
    ),
    pytest.param(
        GOOD_YAML + "    ref: dev\n",
        r"duplicate key 'ref' \(first on line 8\); YAML would silently keep only the last",
        "ref: dev",
        "plugins.hello.ref",
        id="duplicate-key",
    ),
    pytest.param(
        GOOD_YAML + "   bad_indent: [\n",
        r"invalid YAML: .*check the indentation and quoting here",
        None,
        None,
        id="invalid-yaml",
    ),
]


@pytest.mark.parametrize(("text", "message", "line_text", "key"), CONFIG_FAULTS)
def test_config_fault_is_refused_whole_and_the_running_config_stays(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    text: str,
    message: str,
    line_text: str | None,
    key: str | None,
) -> None:
    monkeypatch.delenv(UNSET_VAR, raising=False)
    repo, good = v1_repo(tmp_path)
    config_file = tmp_path / "deploy.yaml"
    config_file.write_text(GOOD_YAML.format(repo=repo.path))
    app = Flask("host")
    app.config.update(TESTING=True, GITPLUG_CONFIG=str(config_file))
    gp = GitPlug(app)
    try:
        assert gp.deploy("hello").result == DeployResult.LIVE
        running = gp.config

        bad = text.replace("{repo}", str(repo.path))
        config_file.write_text(bad)
        with pytest.raises(ConfigError, match=message) as caught:
            load_config(config_file)
        error = caught.value
        assert error.file == str(config_file)
        assert str(error).startswith(str(config_file))  # where: the file ...
        if line_text is not None:  # ... the line ...
            expected_line = max(
                i for i, line in enumerate(bad.splitlines(), 1) if line_text in line
            )
            assert error.line == expected_line, (error.line, bad)
            assert f"{config_file}:{expected_line}: {key}: " in str(error)
        else:
            assert error.line is not None and str(error).startswith(f"{config_file}:{error.line}: ")
        assert error.key == key  # ... and the key
        # What the operator sees from `gitplug check-config`: the same message, exit status 2.
        result = CliRunner().invoke(cli, ["check-config", "-c", str(config_file)])
        assert result.exit_code == 2, result.output
        assert f"Error: {error}" in result.output

        # A running server never reloads from a configuration it could not validate.
        assert gp._state.services.reload_config() is None
        assert gp.config is running
        with app.test_client() as client:
            assert (
                client.get("/hello/", buffered=True).get_data(as_text=True)
                == f"stamp=v1@{good[:7]}"
            )
    finally:
        gp.shutdown()


def test_invalid_mapping_config_never_starts_a_second_host(
    make_host: t.Callable[..., Host], tmp_path: Path
) -> None:
    host = make_host()
    app = Flask("second")
    app.config["GITPLUG"] = {"data_dir": str(tmp_path / "data"), "plugins": {"hello": {"repo": 42}}}
    with pytest.raises(
        ConfigError,
        match=r"app\.config\['GITPLUG'\]: plugins\.hello\.repo: expected a git"
        r" URL .* or a local path \(quote it: '42'\), got 42",
    ):
        GitPlug(app)
    assert "gitplug" not in app.extensions
    host.assert_good_serves()


def test_prefix_clashing_with_a_host_route_is_a_mount_error_at_load(
    make_host: t.Callable[..., Host],
) -> None:
    app = Flask("host")
    app.config["TESTING"] = True

    @app.route("/admin/panel")
    def panel() -> str:
        return "host panel"

    host = make_host(
        app=app, others={"admin": {"repo": "{repo}", "url_prefix": "/admin", "test": False}}
    )
    record = host.gp.deploy("admin")
    assert record is not None and (record.result, record.stage.value) == (
        DeployResult.FAILED,
        "load",
    ), record
    assert re.search(
        r"plugin 'admin': url_prefix '/admin' would hide the host's route '/admin/panel'"
        r" \(endpoint 'panel'\)\. Choose another url_prefix\.",
        record.error or "",
    ), record.error
    host.assert_good_serves()
    assert host.served("/admin/panel") == "200 host panel"


# =========================================================================== git


def test_unreachable_repository_moved_away(host: Host) -> None:
    shutil.move(str(host.repo.path), str(host.tmp / "moved"))
    host.deploy_fails(
        "fetch",
        rf"plugin 'hello': could not fetch {re.escape(host.repo.url)}: no git repository there\."
        r" Check that the repository exists and this host can reach it\.",
    )


def test_unreachable_http_server(make_host: t.Callable[..., Host], tmp_path: Path) -> None:
    with serve_http(tmp_path) as base:  # serves tmp_path/repo, which make_host creates
        url = f"{base}/repo"
        host = make_host(repo_url=url)
    # The server is gone: connection refused on that port.
    host.deploy_fails(
        "fetch",
        rf"plugin 'hello': could not fetch {re.escape(url)}: could not connect \(.*\)\."
        r" Check that the repository exists and this host can reach it\.",
    )


def test_branch_deleted_after_deploy(make_host: t.Callable[..., Host], tmp_path: Path) -> None:
    repo, _v1 = v1_repo(tmp_path)
    repo.branch("feature")
    host = make_host(plugin={"ref": "feature"})
    host.repo.delete_branch("feature")
    host.deploy_fails(
        "fetch",
        r"plugin 'hello': ref 'feature' names no branch, tag or commit in .*repo\."
        r" Available branches: main\. Use a branch, a tag or a commit sha",
    )


@pytest.mark.parametrize(
    "ref",
    [
        "no-such-tag",
        "../../../etc/passwd",
        "refs/heads/../../config",
        "HEAD~1",
        "-rf",
        "main:hello",
        "a" * 300,
    ],
)
def test_unknown_or_hostile_ref(host: Host, ref: str) -> None:
    host.deploy_fails(
        "fetch",
        rf"plugin 'hello': ref {re.escape(repr(ref))} names no branch, tag or commit in .*"
        r"Available branches: main\. Use a branch, a tag or a commit sha \(at least 7 hex digits\)\.",
        ref=ref,
    )


def test_tag_moved_to_a_tree(make_host: t.Callable[..., Host], tmp_path: Path) -> None:
    repo, v1 = v1_repo(tmp_path)
    repo.tag("stable", commit=v1)
    host = make_host(plugin={"ref": "stable"})
    with host.repo.open() as raw:
        tree = raw[host.good.encode()].tree.decode()
    host.repo.set_ref("refs/tags/stable", tree)
    host.deploy_fails(
        "fetch",
        r"plugin 'hello': ref 'stable' of .*repo names a tree, not a commit\. Use a branch, a tag of a"
        r" commit or a commit sha\.",
    )


def test_force_push_deploys_the_new_commit(host: Host) -> None:
    v2 = host.commit(plugin_files("v2"), "v2")
    assert host.gp.deploy("hello").result == DeployResult.LIVE
    # Rewrite history: main now points at a commit that does not descend from v2.
    host.repo.set_ref("refs/heads/main", host.good)
    rewritten = host.commit(plugin_files("rewritten"), "rewritten")
    assert rewritten != v2
    record = host.gp.deploy("hello")
    assert record is not None and (record.result, record.commit) == (DeployResult.LIVE, rewritten)
    assert host.served() == f"200 stamp=rewritten@{rewritten[:7]}"
    state = host.gp._state.store.get_plugin("hello")
    assert (state.live_commit, state.previous_commit) == (rewritten, v2)


def test_moved_tag_deploys_where_it_points_now(
    make_host: t.Callable[..., Host], tmp_path: Path
) -> None:
    repo, v1 = v1_repo(tmp_path)
    repo.tag("stable", annotated=True, message="stable", commit=v1)
    host = make_host(plugin={"ref": "stable"})
    moved = host.commit(plugin_files("v2"), "v2")
    host.repo.tag("stable", annotated=True, message="stable again", commit=moved)
    record = host.gp.deploy("hello")
    assert record is not None and (record.result, record.commit) == (DeployResult.LIVE, moved), (
        record
    )
    assert host.served() == f"200 stamp=v2@{moved[:7]}"


def test_repository_emptied(host: Host) -> None:
    shutil.rmtree(host.repo.path)
    GitRepo(host.repo.path)  # a fresh repository without any commit
    host.deploy_fails(
        "fetch",
        rf"plugin 'hello': .*the repository {re.escape(host.repo.url)} is empty \(no branches or"
        r" tags\)\. Push a commit to it\.",
    )


def test_file_over_the_staging_limit(host: Host) -> None:
    # 50 MiB is the per-file limit; zeros compress well, so the repo stays small.
    files: dict[str, str | bytes] = dict(plugin_files("v2"))
    files["hello/static/huge.bin"] = b"\0" * (50 * MiB + 1)
    bad = host.commit(files, "a huge file")
    host.deploy_fails(
        "stage",
        rf"plugin 'hello': commit {bad} is too large to stage: file size limit of {50 * MiB} bytes"
        r" exceeded at 'hello/static/huge\.bin' \(52428801 bytes.*Remove large files from the repository",
    )
    assert not (host.tmp / "data" / "releases" / "hello" / bad).exists()
    assert [p.name for p in (host.tmp / "data" / "releases" / "hello").iterdir()] == [host.good]


# =========================================================================== trees


def _raw(host: Host, extra: dict[bytes, tuple[int, bytes]]) -> str:
    entries = {
        path.encode(): (MODE_FILE, text.encode()) for path, text in plugin_files("v2").items()
    }
    entries.update(extra)
    return host.repo.commit_tree_raw(entries, "a hostile tree")


UNSAFE_TREES = [
    pytest.param(
        {b"../evil.py": (MODE_FILE, b"x")},
        "../evil.py",
        r"has a '\.' or '\.\.' component and could write outside the release",
        id="dotdot",
    ),
    pytest.param(
        {b"hello/../../evil.py": (MODE_FILE, b"x")},
        "hello/../../evil.py",
        r"has a '\.' or '\.\.' component and could write outside the release",
        id="dotdot-nested",
    ),
    pytest.param(
        {b".git/hooks/post-checkout": (MODE_EXEC, b"#!/bin/sh\n")},
        ".git/hooks/post-checkout",
        r"has a \.git component",
        id="dot-git",
    ),
    pytest.param(
        {b"hello/.GIT/config": (MODE_FILE, b"x")},
        "hello/.GIT/config",
        r"has a \.git component",
        id="dot-git-case",
    ),
    pytest.param(
        {b"hello/passwd": (MODE_LINK, b"/etc/passwd")},
        "hello/passwd",
        r"is a symlink to '/etc/passwd', which is an absolute path",
        id="symlink-absolute",
    ),
    pytest.param(
        {b"hello/up": (MODE_LINK, b"../../..")},
        "hello/up",
        r"is a symlink to '\.\./\.\./\.\.', which resolves outside the release",
        id="symlink-up",
    ),
    pytest.param(
        {b"hello/s": (MODE_LINK, b"."), b"hello/t": (MODE_LINK, b"s/../..")},
        "hello/t",
        r"is a symlink to 's/\.\./\.\.', which resolves outside the release",
        id="symlink-chain",
    ),
    pytest.param(
        {b"vendor": (MODE_GITLINK, b"1" * 40)},
        "vendor",
        r"is a submodule; submodules cannot be staged",
        id="submodule",
    ),
    pytest.param(
        {b".gitplug/release.json": (MODE_FILE, b"{}")},
        ".gitplug/release.json",
        r"is inside \.gitplug/, which is reserved for gitplug",
        id="metadata-dir",
    ),
]


@pytest.mark.parametrize(("extra", "path", "why"), UNSAFE_TREES)
def test_unsafe_tree_is_refused_before_anything_is_written(
    host: Host, extra: dict[bytes, tuple[int, bytes]], path: str, why: str
) -> None:
    bad = _raw(host, extra)
    host.deploy_fails(
        "stage",
        rf"plugin 'hello': refusing to stage commit {bad}: tree entry {re.escape(repr(path))} {why}\."
        r" Remove it from the repository and push a new commit\.",
    )
    releases = host.tmp / "data" / "releases" / "hello"
    assert sorted(p.name for p in releases.iterdir()) == [host.good]
    assert not (host.tmp / "evil.py").exists() and not (host.tmp / "data" / "evil.py").exists()


def test_native_extension_in_the_package(host: Host) -> None:
    files: dict[str, str | bytes] = dict(plugin_files("v2"))
    files["hello/_speedups.so"] = b"\x7fELF not really"
    host.commit(files, "native code")
    host.deploy_fails(
        "load",
        r"plugin 'hello': hello/_speedups\.so is a native extension module; native code cannot be"
        r" unloaded, so gitplug refuses it\. Install native dependencies in the host environment",
    )


def test_package_shadowing_a_host_module(host: Host) -> None:
    host.commit(
        {
            "flask/__init__.py": textwrap.dedent("""
        from flask import Blueprint
        from gitplug import Plugin
        plugin = Plugin("hello", __name__)
        """)
        },
        "a package named flask",
    )
    host.deploy_fails("load", r"package 'flask'.*(shadow|same name|hides).*[Rr]ename")


ENTRY_FAULTS = [
    pytest.param(
        {"README.md": "no package here\n"},
        r"plugin 'hello': cannot tell which package to load from .*: expected exactly one"
        r" top-level package, found none\. Set `entry: package\.module:attribute`",
        id="no-package",
    ),
    pytest.param(
        {**plugin_files("v2"), "other/__init__.py": "x = 1\n"},
        r"expected exactly one top-level package, found hello, other\. Set `entry:",
        id="two-packages",
    ),
    pytest.param(
        {"hello/__init__.py": "from gitplug import Plugin\nplug = Plugin('hello', __name__)\n"},
        r"plugin 'hello': hello has no attribute 'plugin'\. Create it \(`plugin ="
        r" Plugin\('hello', __name__\)`\) or fix `entry` in the configuration\.",
        id="wrong-attribute",
    ),
    pytest.param(
        {
            "hello/__init__.py": "from flask import Blueprint\nplugin = Blueprint('hello', __name__)\n"
        },
        r"plugin 'hello': hello:plugin is a Blueprint, not a gitplug\.Plugin\. Create it with"
        r" `Plugin\(name, __name__\)`\.",
        id="not-a-plugin",
    ),
]


@pytest.mark.parametrize(("files", "match"), ENTRY_FAULTS)
def test_entry_point_faults(host: Host, files: dict[str, str], match: str) -> None:
    host.commit(dict(files), "bad entry")
    host.deploy_fails("load", match)


def test_entry_naming_a_missing_package(make_host: t.Callable[..., Host]) -> None:
    host = make_host(others={"typo": {"repo": "{repo}", "entry": "helo:plugin", "test": False}})
    record = host.gp.deploy("typo")
    assert record is not None and (record.result, record.stage.value) == (
        DeployResult.FAILED,
        "load",
    )
    assert re.search(
        r"plugin 'typo': entry 'helo:plugin' names package 'helo', but the release has no"
        r" helo/__init__\.py\. Fix `entry` in the configuration",
        record.error or "",
    ), record.error
    host.assert_good_serves()


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


# =========================================================================== disk


def test_release_path_squatted_by_a_regular_file(host: Host) -> None:
    """The release directory cannot be written.

    Tests run as root, for whom permission bits do not apply, so an unwritable
    directory is made another way: a regular file already sits where the new
    release directory must be renamed to (what a full or read-only disk, a
    mistaken ``touch`` or a botched restore look like to the stager).
    """
    bad = host.commit(plugin_files("v2"), "v2")
    squatter = host.tmp / "data" / "releases" / "hello" / bad
    squatter.write_text("not a release")
    host.deploy_fails(
        "stage",
        rf"plugin 'hello': could not write the release of {bad} under .*/releases/hello: Not a"
        r" directory.*Check that .*/releases/hello is a directory writable by this user \(fix its"
        r" permissions, or point data_dir elsewhere\)\.",
    )
    assert squatter.read_text() == "not a release"
    assert not [p for p in squatter.parent.iterdir() if p.name.startswith(".tmp-")]


def test_log_directory_not_writable(make_host: t.Callable[..., Host]) -> None:
    """The test gate cannot open its log: ``logs/`` is a regular file (see above for why)."""
    gated_host = make_host(plugin={"test": DEFAULT_GATE, "test_timeout": 60})
    logs = gated_host.tmp / "data" / "logs"
    shutil.rmtree(logs, ignore_errors=True)
    logs.write_text("not a directory")
    bad = gated_host.commit(plugin_files("v2", **{"tests/test_hello.py": PASSING_TEST}), "v2")
    gated_host.deploy_fails(
        "test",
        rf"tests of {bad[:12]} failed.*could not open the test log .*/logs/hello/\d+\.log: .*; check"
        r" that the data_dir is writable",
    )


# =========================================================================== concurrency


def test_deploy_and_rollback_at_once_are_serialised(make_host: t.Callable[..., Host]) -> None:
    slow_test = """
        import time
        def test_slow():
            time.sleep(1.0)
        """
    host = make_host(plugin={"test": DEFAULT_GATE, "test_timeout": 60})
    host.repo.tag("v1", commit=host.good)
    host.commit(plugin_files("v2"), "v2")
    assert host.gp.deploy("hello").result == DeployResult.LIVE
    v3 = host.commit(plugin_files("v3", **{"tests/test_slow.py": slow_test}), "v3 with a slow test")

    results: dict[str, DeployRecord | None] = {}
    errors: list[BaseException] = []
    barrier = threading.Barrier(2)

    def run(kind: str) -> None:
        try:
            barrier.wait(timeout=5)
            results[kind] = (
                host.gp.deploy("hello") if kind == "deploy" else host.gp.rollback("hello", "v1")
            )
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(kind,)) for kind in ("deploy", "rollback")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not errors and not any(thread.is_alive() for thread in threads), errors
    deploy, rollback = results["deploy"], results["rollback"]
    assert deploy is not None and rollback is not None
    assert rollback.result == DeployResult.LIVE and rollback.commit == host.good, rollback

    # Serialised: one ran entirely before the other (deploy lock), in id order.
    first, second = sorted((deploy, rollback), key=lambda r: r.id)
    first_end = parse_iso(first.started_at).timestamp() + (first.duration_s or 0)
    assert parse_iso(second.started_at).timestamp() >= first_end - 0.005, (first, second)
    if first is deploy:
        assert (deploy.result, deploy.commit) == (DeployResult.LIVE, v3), deploy
    else:  # the rollback pinned v1 first: the deploy then targets the pin, already live
        assert deploy.result == DeployResult.SKIPPED and deploy.commit == host.good, deploy

    # Final state consistent: served == live == pinned, and the history has both.
    state = host.gp._state.store.get_plugin("hello")
    assert (state.live_commit, state.pin) == (host.good, "v1"), state
    assert host.served() == f"200 {host.good_stamp}"
    ids = {r.id: r.trigger for r in host.gp.history("hello", limit=5)}
    assert ids[deploy.id] == "api" and ids[rollback.id] == "rollback"


def _rollback_during_deploy(
    host: Host,
) -> tuple[DeployRecord, DeployRecord, str, list[dict[str, t.Any]]]:
    """Start a slow deploy of v3, roll back to v1 while its tests run; return both records."""
    host.repo.tag("v1", commit=host.good)
    host.commit(plugin_files("v2"), "v2")
    assert host.gp.deploy("hello").result == DeployResult.LIVE
    v3 = host.commit(
        plugin_files(
            "v3",
            **{
                "tests/test_slow.py": """
        import time
        def test_slow():
            time.sleep(1.5)
        """
            },
        ),
        "v3 with a slow test",
    )
    fired: list[dict[str, t.Any]] = []

    def on_rolled_back(sender: object, **kwargs: t.Any) -> None:
        fired.append(kwargs)

    results: list[DeployRecord | None] = []
    deployer = threading.Thread(target=lambda: results.append(host.gp.deploy("hello")))
    deployer.start()
    store = host.gp._state.store

    def in_test_gate() -> bool:
        running = [r for r in store.history("hello", limit=3) if r.result == DeployResult.RUNNING]
        return bool(running and running[0].log_path and Path(running[0].log_path).exists())

    deadline = time.monotonic() + 60
    while not in_test_gate():
        assert deployer.is_alive() and time.monotonic() < deadline, results
        time.sleep(0.01)
    signals.rolled_back.connect(on_rolled_back, weak=False)
    try:
        rollback = host.gp.rollback("hello", "v1")  # blocks on the deploy lock
    finally:
        signals.rolled_back.disconnect(on_rolled_back)
    deployer.join(timeout=60)
    assert results and results[0] is not None and rollback is not None
    return results[0], rollback, v3, fired


def test_rollback_during_a_deploy_waits_for_it(make_host: t.Callable[..., Host]) -> None:
    host = make_host(plugin={"test": DEFAULT_GATE, "test_timeout": 60})
    deploy, rollback, v3, _fired = _rollback_during_deploy(host)
    assert (deploy.result, deploy.commit) == (DeployResult.LIVE, v3), deploy
    assert (rollback.result, rollback.commit, rollback.trigger) == (
        DeployResult.LIVE,
        host.good,
        "rollback",
    )
    assert rollback.id > deploy.id
    deploy_end = parse_iso(deploy.started_at).timestamp() + (deploy.duration_s or 0)
    assert parse_iso(rollback.started_at).timestamp() >= deploy_end - 0.005, (deploy, rollback)
    state = host.gp._state.store.get_plugin("hello")
    assert (state.live_commit, state.previous_commit, state.pin) == (host.good, v3, "v1"), state
    assert [r.id for r in host.gp.history("hello", limit=2)] == [rollback.id, deploy.id]
    assert host.served() == f"200 {host.good_stamp}"


def test_rolled_back_signal_names_the_commit_it_replaced(make_host: t.Callable[..., Host]) -> None:
    host = make_host(plugin={"test": DEFAULT_GATE, "test_timeout": 60})
    _deploy, rollback, v3, fired = _rollback_during_deploy(host)
    assert len(fired) == 1
    assert (fired[0]["from_commit"], fired[0]["to_commit"]) == (v3, rollback.commit)


# =========================================================================== webhooks


def _signed(body: bytes, *, delivery: str, secret: str = SECRET) -> dict[str, str]:
    digest = hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    return {
        "X-GitHub-Event": "push",
        "X-GitHub-Delivery": delivery,
        "X-Hub-Signature-256": f"sha256={digest}",
        "Content-Type": "application/json",
    }


def _push(host: Host, after: str) -> bytes:
    return json.dumps(
        {"ref": "refs/heads/main", "after": after, "repository": {"clone_url": host.repo.url}}
    ).encode()


@pytest.fixture
def hook_host(make_host: t.Callable[..., Host]) -> Host:
    return make_host(top={"webhook": {"secret": SECRET}})


def _post(
    host: Host, body: bytes, headers: dict[str, str], path: str = "/_gitplug/webhook"
) -> tuple[int, dict[str, t.Any]]:
    with host.app.test_client() as client:
        response = client.post(path, data=body, headers=headers)
        return response.status_code, response.get_json()


def _wait_idle(host: Host, timeout: float = 60.0) -> None:
    services = host.gp._state.services
    deadline = time.monotonic() + timeout
    while services.queue.busy("hello"):
        assert time.monotonic() < deadline, "the webhook's deploy did not finish"
        time.sleep(0.02)


WEBHOOK_FAULTS = [
    pytest.param(
        lambda body: {
            **_signed(body, delivery="d1", secret="forged"),
        },
        None,
        401,
        r"X-Hub-Signature-256 does not match the body signed with webhook\.secret; give the"
        r" forge's webhook the same secret",
        id="forged-signature",
    ),
    pytest.param(
        lambda body: {
            k: v for k, v in _signed(body, delivery="d1").items() if k != "X-Hub-Signature-256"
        },
        None,
        401,
        r"missing signature: expected X-Hub-Signature-256",
        id="unsigned",
    ),
    pytest.param(
        lambda body: {
            **_signed(body, delivery="d1"),
            "X-Hub-Signature-256": "sha1=" + hmac.new(SECRET.encode(), body, "sha1").hexdigest(),
        },
        None,
        401,
        r"carries a SHA-1 signature, which gitplug refuses; configure the webhook to"
        r" sign with SHA-256",
        id="sha1-downgrade",
    ),
    pytest.param(
        lambda body: _signed(body, delivery="d1"),
        b"\0" * (MiB + 1),
        413,
        rf"the body of {MiB + 1} bytes is over the webhook's limit of {MiB} bytes",
        id="oversized",
    ),
    pytest.param(
        lambda body: _signed(body, delivery="d1"),
        b"{not json",
        400,
        r"the body is not valid JSON: .* at line 1 column 2",
        id="malformed-json",
    ),
    pytest.param(
        lambda body: _signed(body, delivery="d1"),
        b'{"ref": "main", "repository": {}}',
        400,
        r"the payload's 'ref' must be a full ref such as 'refs/heads/main'",
        id="bad-ref",
    ),
]


@pytest.mark.parametrize(("headers", "body", "status", "match"), WEBHOOK_FAULTS)
def test_webhook_refuses_and_deploys_nothing(
    hook_host: Host,
    headers: t.Callable[[bytes], dict[str, str]],
    body: bytes | None,
    status: int,
    match: str,
) -> None:
    v2 = hook_host.commit(plugin_files("v2"), "v2")
    payload = body if body is not None else _push(hook_host, v2)
    code, answer = _post(hook_host, payload, headers(payload))
    assert code == status, answer
    assert re.search(match, answer["message"]), answer
    _wait_idle(hook_host)
    assert not hook_host.gp._state.services.queue.busy("hello")
    assert [r.commit for r in hook_host.gp.history("hello")] == [hook_host.good]
    hook_host.assert_good_serves()


def test_webhook_unknown_plugin(hook_host: Host) -> None:
    body = _push(hook_host, hook_host.good)
    code, answer = _post(hook_host, body, _signed(body, delivery="u1"), "/_gitplug/webhook/nope")
    assert code == 404
    assert "no plugin named 'nope' in the configuration; check the webhook URL" in answer["message"]
    hook_host.assert_good_serves()


def test_webhook_without_a_secret_refuses_everything(host: Host) -> None:
    body = _push(host, host.good)
    code, answer = _post(host, body, _signed(body, delivery="n1"))
    assert code == 403
    assert re.search(
        r"the webhook is disabled because no secret is configured\. Set 'webhook:"
        r" \{secret: \$\{GITPLUG_WEBHOOK_SECRET\}\}' in deploy\.yaml",
        answer["message"],
    )
    host.assert_good_serves()


def test_replayed_webhook_deploys_nothing(hook_host: Host) -> None:
    first = _push(hook_host, hook_host.good)
    code, answer = _post(hook_host, first, _signed(first, delivery="delivery-1"))
    assert (code, answer["status"]) == (202, "queued"), answer
    _wait_idle(hook_host)  # v1 is already live: nothing to do

    # A new commit lands; an attacker (or a retrying proxy) replays the old delivery.
    v2 = hook_host.commit(plugin_files("v2"), "v2")
    code, answer = _post(hook_host, first, _signed(first, delivery="delivery-1"))
    assert (code, answer["status"]) == (200, "duplicate"), answer
    assert answer["message"] == "delivery delivery-1 was already handled; nothing queued"
    assert answer["queued"] == []
    _wait_idle(hook_host)
    hook_host.assert_good_serves()

    # Not vacuous: a fresh delivery does deploy the new commit.
    fresh = _push(hook_host, v2)
    code, answer = _post(hook_host, fresh, _signed(fresh, delivery="delivery-2"))
    assert (code, answer["status"]) == (202, "queued"), answer
    _wait_idle(hook_host)
    assert hook_host.served() == f"200 stamp=v2@{v2[:7]}"
    assert hook_host.gp.history("hello")[0].trigger == "webhook"
