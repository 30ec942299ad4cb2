"""The fault catalogue (issue 5): configuration faults.

Each test breaks one thing on purpose and asserts that (a) the error names what
was wrong, where and what to do, and (b) the last good release still serves;
the harness and the catalogue's conventions are in :mod:`faults_site`.
"""

from __future__ import annotations

import typing as t
from pathlib import Path

import pytest
from click.testing import CliRunner
from flask import Flask

from faults_site import (
    PLUGIN_INIT,
    UNSET_VAR,
    Host,
    make_host_fixture,  # noqa: F401
    v1_repo,
)
from gitplug import GitPlug
from gitplug.cli import cli
from gitplug.config import load_config
from gitplug.errors import ConfigError
from gitplug.state import DeployResult
from gitrepo import GitRepo

# =========================================================================== configuration

GOOD_YAML = """\
data_dir: data
poll_interval: 60
webhook:
  secret: s3cret-for-the-faults-table
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
        r"unknown key 'reff'; did you mean 'ref'\? Allowed here: repo, ref, path, url_prefix",
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
        GOOD_YAML.replace("secret: s3cret-for-the-faults-table", "secret: ${" + UNSET_VAR + "}"),
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
        # An unset secret is the exception: a read-only command needs none, so
        # check-config passes and notes that the server would refuse it.
        result = CliRunner().invoke(cli, ["check-config", "-c", str(config_file)])
        if key in ("admin_token", "webhook.secret") and "is not set" in message:
            assert result.exit_code == 0, result.output
            assert f"note: `gitplug serve` would refuse it here: {error}" in result.output
        else:
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


def test_prefix_over_a_host_route_deploys_and_the_host_route_keeps_answering(
    make_host: t.Callable[..., Host], caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    admin = GitRepo(tmp_path / "admin-repo")
    admin.write("admin/__init__.py", PLUGIN_INIT.format(stamp="admin").replace('Plugin("hello"', 'Plugin("admin"'))
    admin_head = admin.commit("admin v1")
    app = Flask("host")
    app.config["TESTING"] = True

    @app.route("/admin/panel")
    def panel() -> str:
        return "host panel"

    host = make_host(
        app=app, others={"admin": {"repo": admin.url, "url_prefix": "/admin", "test": False}}
    )
    caplog.set_level("WARNING", logger="gitplug")
    record = host.gp.deploy("admin")
    assert record is not None and record.result == DeployResult.LIVE, record
    assert (
        "plugin admin: the host's routes '/admin/panel' (endpoint 'panel') lie under url_prefix"
        " '/admin'; the host answers them, not the plugin (host routes win). Choose another"
        " url_prefix to serve them from the plugin."
    ) in caplog.text
    host.assert_good_serves()
    assert host.served("/admin/panel") == "200 host panel"
    assert host.served("/admin/") == f"200 stamp=admin@{admin_head[:7]}"
