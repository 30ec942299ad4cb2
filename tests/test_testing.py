"""Tests of gitplug.testing: mount_plugin, the test client and the pytest fixtures."""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

import pytest
from flask import Flask
from flask.testing import FlaskClient

from gitplug import EntryPointError, GitPlug, GitplugError, PluginImportError
from gitplug.deploy.testgate import run_test_gate
from gitplug.errors import PluginNameMismatch
from gitplug.testing import (
    PLUGIN_DIR_ENV,
    GitplugTestClient,
    default_plugin_dir,
    mount_plugin,
    unmount,
)

pytest_plugins = ["pytester"]

#: The gitplug checkout, so subprocesses import this gitplug.
ROOT = Path(__file__).resolve().parents[1]
#: The line that places a frame in a pytest traceback: ``path/file.py:12: in func`` or ``...: Error``.
_FRAME_LINE = re.compile(r"^(\S[^:]*\.py):\d+:(?: .*)?$")

PLUGIN_INIT = '''
from pathlib import Path

from flask import flash, get_flashed_messages, render_template_string, session
from gitplug import Plugin, current_plugin

plugin = Plugin("greet", __name__)


@plugin.get("/")
def index():
    return render_template_string(
        "{{ name }} {{ config.get('WORD', 'hi') }}",
        name=current_plugin.name,
        config=current_plugin.config,
    )


@plugin.post("/visit")
def visit():
    session["n"] = session.get("n", 0) + 1
    flash(f"visit {session['n']}")
    return "ok"


@plugin.get("/flashes")
def flashes():
    return ",".join(get_flashed_messages())


@plugin.get("/stream")
def stream():
    def body():
        yield "part 1,"
        yield "part 2"
    return body()


@plugin.on_unload
def bye():
    marker = current_plugin.config.get("UNLOAD_MARKER")
    if marker:
        Path(marker).write_text(current_plugin.release_id)
'''


def write_plugin(root: Path, package: str = "greet", init: str = PLUGIN_INIT) -> Path:
    """A plugin repository in ``root`` with one package."""
    (root / package).mkdir(parents=True, exist_ok=True)
    (root / package / "__init__.py").write_text(textwrap.dedent(init))
    return root


@pytest.fixture
def plugin_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.delenv(PLUGIN_DIR_ENV, raising=False)
    return write_plugin(tmp_path / "repo")


@pytest.fixture
def mounted(plugin_dir: Path):
    app, gitplug = mount_plugin(plugin_dir)
    yield app, gitplug
    unmount(gitplug)


# -- mount_plugin --------------------------------------------------------------


def test_mount_plugin_defaults(mounted: tuple[Flask, GitPlug]) -> None:
    app, gitplug = mounted
    assert app.testing and app.secret_key
    client = app.test_client()
    assert isinstance(client, GitplugTestClient)
    response = client.get("/greet/")
    assert response.status_code == 200
    assert response.get_data(as_text=True) == "greet hi"
    live = gitplug.live_release("greet")
    assert live is not None and live.release_id.startswith("dir-")
    # The bare host keeps no routes of its own, not even /static.
    assert client.get("/static/x").status_code == 404


def test_mount_plugin_options(plugin_dir: Path) -> None:
    app, gitplug = mount_plugin(plugin_dir, url_prefix="/a/b", config={"WORD": "yo"})
    try:
        client = app.test_client()
        assert client.get("/a/b/").get_data(as_text=True) == "greet yo"
        assert client.get("/greet/").status_code == 404
    finally:
        unmount(gitplug)
    # Under a name its Plugin(...) does not declare, it is refused, as a deploy would be.
    with pytest.raises(PluginNameMismatch, match=r"creates Plugin\('greet', \.\.\.\) but is configured as 'hi'"):
        mount_plugin(plugin_dir, name="hi")


def test_session_and_flash_work_across_requests(mounted: tuple[Flask, GitPlug]) -> None:
    client = mounted[0].test_client()
    client.post("/greet/visit")
    client.post("/greet/visit")
    assert client.get("/greet/flashes").get_data(as_text=True) == "visit 1,visit 2"
    assert client.get("/greet/flashes").get_data(as_text=True) == ""


def test_plugin_dir_from_environment_then_cwd(
    plugin_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert default_plugin_dir() == tmp_path
    monkeypatch.setenv(PLUGIN_DIR_ENV, str(plugin_dir))
    assert default_plugin_dir() == plugin_dir
    app, gitplug = mount_plugin()
    unmount(gitplug)
    monkeypatch.delenv(PLUGIN_DIR_ENV)
    monkeypatch.chdir(plugin_dir)
    app, gitplug = mount_plugin()
    try:
        assert app.test_client().get("/greet/").status_code == 200
    finally:
        unmount(gitplug)


def test_directory_without_package_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(PLUGIN_DIR_ENV, raising=False)
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "__init__.py").write_text("")
    with pytest.raises(EntryPointError, match=rf"found none\..*set {PLUGIN_DIR_ENV}"):
        mount_plugin(tmp_path)
    with pytest.raises(GitplugError, match=r"plugin directory .*missing does not exist"):
        mount_plugin(tmp_path / "missing")


def test_two_packages_need_an_entry(plugin_dir: Path) -> None:
    write_plugin(plugin_dir, "other", PLUGIN_INIT.replace('"greet"', '"other"'))
    with pytest.raises(EntryPointError, match="found greet, other"):
        mount_plugin(plugin_dir)
    app, gitplug = mount_plugin(plugin_dir, entry="other:plugin")
    try:
        assert app.test_client().get("/other/").get_data(as_text=True) == "other hi"
    finally:
        unmount(gitplug)


def test_load_error_names_file_and_line(plugin_dir: Path) -> None:
    (plugin_dir / "greet" / "views.py").write_text("x = 1\ndef broken(:\n")
    with pytest.raises(PluginImportError, match=r"syntax error in greet/views\.py line 2"):
        mount_plugin(plugin_dir)


def test_mount_into_a_given_host_app(plugin_dir: Path) -> None:
    host = Flask("host", root_path=str(plugin_dir))
    host.secret_key = "k"

    @host.get("/")
    def home() -> str:
        return "host home"

    app, gitplug = mount_plugin(plugin_dir, app=host)
    try:
        assert app is host
        client = host.test_client()
        assert client.get("/").get_data(as_text=True) == "host home"
        assert client.get("/greet/").get_data(as_text=True) == "greet hi"
        with pytest.raises(GitplugError, match=r"already has gitplug.*load_directory\(\)"):
            mount_plugin(plugin_dir, app=host)
    finally:
        unmount(gitplug)


def test_a_custom_client_class_of_a_given_app_is_kept(plugin_dir: Path) -> None:
    class Custom(FlaskClient):
        pass

    host = Flask("host")
    host.test_client_class = Custom
    _, gitplug = mount_plugin(plugin_dir, app=host)
    try:
        assert type(host.test_client()) is Custom
    finally:
        unmount(gitplug)


def test_client_closes_responses_so_releases_can_retire(mounted: tuple[Flask, GitPlug]) -> None:
    app, gitplug = mounted
    client = app.test_client()
    assert client.get("/greet/stream").get_data(as_text=True) == "part 1,part 2"
    assert gitplug.runtime.snapshot.inflight == 0
    # A streamed body runs the release's code until the server closes it: pinned till then.
    streaming = client.get("/greet/stream", buffered=False)
    assert gitplug.runtime.snapshot.inflight == 1
    streaming.close()
    assert gitplug.runtime.snapshot.inflight == 0
    # A plain body is bytes when the view returns: the pin is dropped right then.
    plain = client.get("/greet/", buffered=False)
    assert gitplug.runtime.snapshot.inflight == 0
    assert plain.get_data(as_text=True) == "greet hi"
    plain.close()


def test_unmount_runs_on_unload_and_removes_the_snapshot(plugin_dir: Path, tmp_path: Path) -> None:
    marker = tmp_path / "unloaded"
    app, gitplug = mount_plugin(plugin_dir, config={"UNLOAD_MARKER": str(marker)})
    release = gitplug.live_release("greet")
    assert release is not None and release.spec.path.is_dir()
    unmount(gitplug)
    assert marker.read_text() == release.release_id
    assert not release.spec.path.exists()
    assert app.test_client().get("/greet/").status_code == 404
    unmount(gitplug)  # idempotent


# -- the pytest fixtures, run as a plugin author runs them ----------------------

CONFTEST = 'pytest_plugins = ["gitplug.testing"]\n'

#: In-process runs: gitplug.testing is already imported (by this module), so
#: pytest says it cannot rewrite its asserts; irrelevant here.
INNER_ARGS = ("-p", "no:cacheprovider", "-W", "ignore::pytest.PytestAssertRewriteWarning")

PLUGIN_TESTS = '''
import pytest
from flask import Flask

from gitplug import GitPlug
from gitplug.testing import GitplugTestClient


def test_client(gitplug_client):
    assert isinstance(gitplug_client, GitplugTestClient)
    assert gitplug_client.get("/greet/").get_data(as_text=True) == "greet hi"


def test_app_and_extension(gitplug_app, gitplug_extension):
    assert isinstance(gitplug_app, Flask) and gitplug_app.testing
    assert isinstance(gitplug_extension, GitPlug)
    assert gitplug_extension.live_release("greet") is not None


def test_each_test_gets_a_fresh_app(gitplug_client):
    gitplug_client.post("/greet/visit")
    assert gitplug_client.get("/greet/flashes").get_data(as_text=True) == "visit 1"


class TestOverride:
    @pytest.fixture
    def gitplug_plugin_options(self):
        return {"name": "greet", "url_prefix": "/x", "config": {"WORD": "there"}}

    def test_options(self, gitplug_client):
        assert gitplug_client.get("/x/").get_data(as_text=True) == "greet there"
'''


def write_plugin_repo(root: Path, tests: str = PLUGIN_TESTS) -> None:
    write_plugin(root)
    (root / "tests").mkdir(exist_ok=True)
    (root / "tests" / "conftest.py").write_text(CONFTEST)
    (root / "tests" / "test_plugin.py").write_text(textwrap.dedent(tests))


def test_fixtures_in_a_plugin_repository(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(PLUGIN_DIR_ENV, raising=False)
    write_plugin_repo(pytester.path)
    result = pytester.runpytest_inprocess(*INNER_ARGS)
    result.assert_outcomes(passed=4)


def test_fixture_reports_a_broken_plugin(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(PLUGIN_DIR_ENV, raising=False)
    write_plugin_repo(pytester.path)
    (pytester.path / "greet" / "views.py").write_text("import does_not_exist_anywhere\n")
    result = pytester.runpytest_inprocess(*INNER_ARGS)
    # The error once, in the first test; the others are skipped, not failed again.
    result.assert_outcomes(errors=1, skipped=3)
    result.stdout.fnmatch_lines(["*the plugin did not load: plugin 'greet': importing greet.views failed in greet/views.py line 1*"])
    output = result.stdout.str()
    # Counted above pytest's short summary, which repeats the message in full when
    # pytest believes it runs on CI (CI=true) and truncates it elsewhere.
    report = output.split("short test summary info")[0]
    assert report.count("No module named 'does_not_exist_anywhere'") == 1, output
    # Neither gitplug's frames nor the fixture's: the message names the plugin's file and line.
    assert "gitplug/runtime" not in output and "Traceback" not in output, output


def test_fixture_refuses_unknown_options(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(PLUGIN_DIR_ENV, raising=False)
    write_plugin_repo(
        pytester.path,
        """
        import pytest

        @pytest.fixture
        def gitplug_plugin_options():
            return {"prefix": "/x"}

        def test_it(gitplug_client):
            pass
        """,
    )
    result = pytester.runpytest_inprocess(*INNER_ARGS)
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*unknown option(s) 'prefix'. Expected some of: app, config, entry*"])


def test_fixtures_in_the_test_gate(tmp_path: Path) -> None:
    """The gate runs the plugin's tests in the release dir with a scrubbed environment."""
    release = tmp_path / "release"
    write_plugin_repo(release)
    result = run_test_gate(
        release,
        ["python", "-m", "pytest", "-q", "-p", "no:cacheprovider"],
        is_default=True,
        timeout=120,
        log_path=tmp_path / "gate.log",
        extra_pythonpath=[ROOT],
    )
    assert result.passed, (tmp_path / "gate.log").read_text()
    assert "4 passed" in (tmp_path / "gate.log").read_text()
    assert not (release / ".pytest_cache").exists()


def test_the_gate_log_is_read_with_the_plugins_frames_first(tmp_path: Path) -> None:
    """``gitplug logs`` hides gitplug's, pytest's and Flask's frames; --full keeps them."""
    from gitplug.deploy.testgate import trim_test_log

    release = tmp_path / "release"
    write_plugin_repo(
        release,
        """
        def test_boom(gitplug_client):
            gitplug_client.get("/greet/boom")
        """,
    )
    init = release / "greet" / "__init__.py"
    init.write_text(
        init.read_text()
        + '\n\n@plugin.get("/boom")\ndef boom():\n    return helper()\n\n\ndef helper():\n    raise KeyError("the plugin broke")\n'
    )
    result = run_test_gate(
        release,
        ["python", "-m", "pytest", "-q", "-p", "no:cacheprovider"],
        is_default=True,
        timeout=120,
        log_path=tmp_path / "gate.log",
        extra_pythonpath=[ROOT],
    )
    assert not result.passed
    full = (tmp_path / "gate.log").read_text()
    short = trim_test_log(full)
    gitplug_dir = str(ROOT / "gitplug")
    # The full log walks through Flask, Werkzeug and gitplug; the short one does not.
    assert gitplug_dir in full and "/werkzeug/" in full
    assert gitplug_dir not in short and "/werkzeug/" not in short and "/flask/" not in short, short
    assert "frame(s) of gitplug, pytest or Flask hidden; --full shows them" in short
    # The plugin's own frames stay, in order: the test, the view, the helper that raised.
    test_at, view_at, helper_at = (short.find(s) for s in ("tests/test_plugin.py:", "return helper()", 'raise KeyError("the plugin broke")'))
    assert -1 < test_at < view_at < helper_at, short
    # Counted in frames, not lines: how many lines pytest prints per frame changes
    # between its releases (pytest 8.0 prints short frames, later ones whole sources).
    full_frames = [m.group(1) for m in map(_FRAME_LINE.match, full.splitlines()) if m]
    short_frames = [m.group(1) for m in map(_FRAME_LINE.match, short.splitlines()) if m]
    assert [f.endswith(("tests/test_plugin.py", "/greet/__init__.py")) for f in short_frames] == [True] * 3, short
    hidden = re.search(r"^\[(\d+) frame\(s\) of gitplug, pytest or Flask hidden", short, re.M)
    assert hidden is not None and int(hidden.group(1)) > 3, short
    assert len(full_frames) == len(short_frames) + int(hidden.group(1)), full
