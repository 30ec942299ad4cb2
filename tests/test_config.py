"""Tests for gitplug.config: the schema of SPEC section 3, its defaults and its errors."""

from __future__ import annotations

import re
import socket
import textwrap
from pathlib import Path
from types import MappingProxyType

import pytest

from gitplug.config import (
    DEFAULT_TEST_COMMAND,
    MAPPING_SOURCE,
    AutoRollback,
    Canary,
    ConfigDiff,
    GitplugConfig,
    PluginConfig,
    config_from_mapping,
    diff_plugins,
    load_config,
    resolve_config_path,
)
from gitplug.errors import ConfigError, UnknownPlugin


def write(tmp_path: Path, text: str, name: str = "deploy.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text).lstrip("\n"), encoding="utf-8")
    return path


def load(tmp_path: Path, text: str, **env: str) -> GitplugConfig:
    return load_config(write(tmp_path, text), environ=env)


# --------------------------------------------------------------------------- valid files


def test_defaults(tmp_path: Path) -> None:
    cfg = load(tmp_path, """
        plugins:
          hello:
            repo: ./hello
    """)
    assert cfg.data_dir == tmp_path / ".gitplug"
    assert cfg.poll_interval == 60.0
    assert cfg.keep_releases == 5
    assert cfg.state == f"sqlite:///{tmp_path}/.gitplug/state.db"
    assert cfg.state.startswith("sqlite:////")  # four slashes: an absolute path
    assert cfg.admin_token is None and cfg.webhook_secret is None
    assert cfg.api_prefix == "/_gitplug"
    assert cfg.source == str(tmp_path / "deploy.yaml")
    assert cfg.base_dir == tmp_path
    hello = cfg.plugins["hello"]
    assert hello == PluginConfig(name="hello", repo=str(tmp_path / "hello"))
    # No url_prefix: the plugin constructor's, else /<name>, once a release is loaded.
    assert hello.ref == "main" and hello.url_prefix is None and hello.entry is None
    assert hello.default_prefix == "/hello"
    assert hello.test == DEFAULT_TEST_COMMAND and hello.test_is_default is True
    assert hello.test_timeout == 120.0 and hello.auto_rollback is None
    assert hello.config == {} and isinstance(hello.config, MappingProxyType)


@pytest.mark.parametrize(("value", "size"), [
    ("25MiB", 25 << 20), ("512 KiB", 512 << 10), ("1.5MB", 1_500_000), (4096, 4096),
    ("'4096'", 4096), ("2gib", None),
])
def test_webhook_max_body(tmp_path: Path, value: object, size: int | None) -> None:
    if size is None:
        with pytest.raises(ConfigError, match="at most 1024MiB"):
            load(tmp_path, f"webhook: {{max_body: {value}}}\n")
        return
    assert load(tmp_path, f"webhook: {{max_body: {value}}}\n").webhook_max_body == size
    # Not given: GitHub's own cap on a delivery.
    assert load(tmp_path, "webhook: {secret: sixteen-or-more-chars}\n").webhook_max_body == 25 << 20


def test_spec_example(tmp_path: Path) -> None:
    cfg = load(tmp_path, """
        data_dir: .gitplug
        poll_interval: 60
        keep_releases: 5
        state: sqlite:///.gitplug/state.db
        admin_token: ${GITPLUG_ADMIN_TOKEN}
        webhook:
          secret: ${GITPLUG_WEBHOOK_SECRET}
        plugins:
          hello:
            repo: https://git.example.com/team/hello.git
            ref: main
            url_prefix: /hello
            entry: hello:plugin
            poll_interval: 30
            test: python -m pytest -q
            test_timeout: 120
            auto_rollback: {max_error_rate: 0.2, min_requests: 20, window: 60}
            config:
              GREETING: Hello
    """, GITPLUG_ADMIN_TOKEN="tok-0123456789abcdef", GITPLUG_WEBHOOK_SECRET="sec-0123456789abcdef")
    assert cfg.admin_token == "tok-0123456789abcdef" and cfg.webhook_secret == "sec-0123456789abcdef"
    assert cfg.state == f"sqlite:///{tmp_path}/.gitplug/state.db"
    hello = cfg.plugins["hello"]
    assert hello.repo == "https://git.example.com/team/hello.git"
    assert hello.entry == "hello:plugin" and hello.poll_interval == 30.0
    assert hello.test == ("python", "-m", "pytest", "-q") and hello.test_is_default is False
    assert hello.auto_rollback == AutoRollback(max_error_rate=0.2, min_requests=20, window=60.0)
    assert dict(hello.config) == {"GREETING": "Hello"}


def test_limits_sandbox_and_test_user(tmp_path: Path) -> None:
    cfg = load(tmp_path, """
        limits: {max_file_size: 100MiB, max_release_size: 1GiB, max_files: 50000}
    """)
    assert (cfg.max_file_size, cfg.max_release_size, cfg.max_files) == (100 << 20, 1 << 30, 50000)
    assert cfg.test_sandbox == "none" and cfg.test_user is None
    cfg = load(tmp_path, """
        limits:
          max_file_size: 1.5 MB
          max_release_size: 4096
        test_sandbox: bwrap
        test_user: "65534"
    """)
    assert (cfg.max_file_size, cfg.max_release_size, cfg.max_files) == (1_500_000, 4096, 50000)
    assert cfg.test_sandbox == "bwrap" and cfg.test_user == "nobody"


def test_a_local_path_with_a_colon_is_local(tmp_path: Path) -> None:
    (tmp_path / "odd:repo").mkdir()
    cfg = load(tmp_path, """
        plugins:
          a: {repo: "odd:repo"}
          b: {repo: "./new:repo"}
          c: {repo: "git.example.com:team/c.git"}
    """)
    assert cfg.plugins["a"].repo == str(tmp_path / "odd:repo")  # exists here: local
    assert cfg.plugins["b"].repo == str(tmp_path / "new:repo")  # spelled as a path
    assert cfg.plugins["c"].repo == "git.example.com:team/c.git"  # scp-like ssh, as in git


def test_plugins_keep_file_order_and_take_top_level_poll_interval(tmp_path: Path) -> None:
    cfg = load(tmp_path, """
        poll_interval: 15
        plugins:
          zeta: {repo: ./z}
          alpha: {repo: ./a, poll_interval: 2.5}
    """)
    assert list(cfg.plugins) == ["zeta", "alpha"]
    assert cfg.plugins["zeta"].poll_interval == 15.0
    assert cfg.plugins["alpha"].poll_interval == 2.5


@pytest.mark.parametrize("text", ["plugins: {}\n", "plugins:\n", "data_dir: d\n"])
def test_no_plugins_is_valid(tmp_path: Path, text: str) -> None:
    assert dict(load(tmp_path, text).plugins) == {}


def test_env_interpolation(tmp_path: Path) -> None:
    cfg = load(tmp_path, """
        keep_releases: ${KEEP}
        plugins:
          hello:
            repo: https://${HOST}/team/hello.git
            ref: release-${VERSION}
            poll_interval: ${POLL}
            test_timeout: ${TIMEOUT}
            auto_rollback: {min_requests: "${MIN}", max_error_rate: "${RATE}"}
            config: {GREETING: "price: $${NOT_A_VAR} ${VERSION}", NESTED: [a, "${VERSION}"]}
    """, KEEP="3", HOST="git.example.com", VERSION="1.2", POLL="30", TIMEOUT=" 7.5 ",
        MIN="5", RATE="0.5")
    hello = cfg.plugins["hello"]
    assert cfg.keep_releases == 3
    assert hello.repo == "https://git.example.com/team/hello.git" and hello.ref == "release-1.2"
    assert hello.poll_interval == 30.0 and hello.test_timeout == 7.5
    assert hello.auto_rollback == AutoRollback(min_requests=5, max_error_rate=0.5)
    assert dict(hello.config) == {"GREETING": "price: ${NOT_A_VAR} 1.2", "NESTED": ["a", "1.2"]}
    assert type(hello.config["GREETING"]) is str and type(hello.ref) is str


@pytest.mark.parametrize("value, expected", [("false", (None, False)), ("FALSE", (None, False)),
                                             ("make check", (("make", "check"), False))])
def test_test_command_from_env(tmp_path: Path, value: str, expected: tuple) -> None:
    cfg = load(tmp_path, "plugins:\n  p:\n    repo: ./p\n    test: ${T}\n", T=value)
    assert (cfg.plugins["p"].test, cfg.plugins["p"].test_is_default) == expected


def test_empty_secret_from_env_means_not_set(tmp_path: Path) -> None:
    cfg = load(tmp_path, "admin_token: ${T}\nwebhook: {secret: '${T}'}\n", T="")
    assert cfg.admin_token is None and cfg.webhook_secret is None


def test_numbers_as_literal_strings_are_refused(tmp_path: Path) -> None:
    # Only ${NAME} turns text into a number: a quoted '30' in the file is a mistake.
    with pytest.raises(ConfigError, match=r"poll_interval: expected a positive number .* got '30'"):
        load(tmp_path, "poll_interval: '30'\n")


def test_relative_paths_resolve_against_the_file(tmp_path: Path) -> None:
    sub = tmp_path / "etc"
    sub.mkdir()
    cfg = load_config(write(sub, """
        data_dir: ../var/gitplug
        state: sqlite:///db/state.db
        plugins:
          local: {repo: ../plugins/local}
          absolute: {repo: /srv/abs, url_prefix: /abs}
          home: {repo: ~/plugin, url_prefix: /home}
    """), environ={})
    assert cfg.base_dir == sub
    assert cfg.data_dir == tmp_path / "var" / "gitplug"
    assert cfg.state == f"sqlite:///{sub}/db/state.db"
    assert cfg.plugins["local"].repo == str(tmp_path / "plugins" / "local")
    assert cfg.plugins["absolute"].repo == "/srv/abs"
    assert cfg.plugins["home"].repo == str(Path("~/plugin").expanduser())


@pytest.mark.parametrize("state", ["sqlite:////var/lib/gitplug/state.db",
                                   "postgresql://gitplug@db.internal/fleet",
                                   "postgres://user:pw@127.0.0.1:5433/gitplug?sslmode=require"])
def test_state_urls_kept(tmp_path: Path, state: str) -> None:
    assert load(tmp_path, f"state: {state}\n").state == state


def test_host_id_defaults_to_the_host_name(tmp_path: Path) -> None:
    assert load(tmp_path, "host_id: web-1\n").host == "web-1"
    assert load(tmp_path, "{}\n").host == socket.gethostname()


@pytest.mark.parametrize("repo", [
    "https://git.example.com/team/hello.git", "http://127.0.0.1:8000/hello.git",
    "ssh://git@example.com/team/hello.git", "git://example.com/hello.git",
    "file:///srv/git/hello.git", "git@example.com:team/hello.git", "example.com:hello.git",
])
def test_repo_urls_kept_as_given(tmp_path: Path, repo: str) -> None:
    assert load(tmp_path, f"plugins:\n  p:\n    repo: '{repo}'\n").plugins["p"].repo == repo


@pytest.mark.parametrize("value, expected", [
    ("true", AutoRollback()),
    ("{}", AutoRollback()),
    ("{window: 5}", AutoRollback(window=5.0)),
    ("{max_error_rate: 1}", AutoRollback(max_error_rate=1.0)),
    ("false", None),
    ("null", None),
])
def test_auto_rollback_forms(tmp_path: Path, value: str, expected: AutoRollback | None) -> None:
    cfg = load(tmp_path, f"plugins:\n  p:\n    repo: ./p\n    auto_rollback: {value}\n")
    assert cfg.plugins["p"].auto_rollback == expected


@pytest.mark.parametrize("value, expected", [
    ("true", Canary()),
    ("{}", Canary()),
    ("{percent: 10, min_requests: 100, duration: 300, max_error_rate: 0.05}", Canary()),
    ("{percent: 2.5, duration: 60}", Canary(percent=2.5, duration=60.0)),
    ("false", None),
    ("null", None),
])
def test_canary_forms(tmp_path: Path, value: str, expected: Canary | None) -> None:
    cfg = load(tmp_path, f"plugins:\n  p:\n    repo: ./p\n    canary: {value}\n")
    assert cfg.plugins["p"].canary == expected


def test_canary_default_applies_to_plugins_without_their_own(tmp_path: Path) -> None:
    cfg = load(tmp_path, textwrap.dedent("""
        canary: {percent: 20}
        discover:
          - {repo: ./mono, path: "plugins/*"}
        plugins:
          a: {repo: ./a}
          b: {repo: ./b, canary: {percent: 5, max_error_rate: 0.01}}
          c: {repo: ./c, canary: false}
    """))
    assert cfg.canary == Canary(percent=20.0)
    assert cfg.plugins["a"].canary == Canary(percent=20.0)
    assert cfg.plugins["b"].canary == Canary(percent=5.0, max_error_rate=0.01)
    assert cfg.plugins["c"].canary is None
    assert cfg.discover[0].plugin("x", "plugins/x").canary == Canary(percent=20.0)


@pytest.mark.parametrize("value, expected", [
    ("false", None),
    ("'python -m pytest -x \"tests/a b\"'", ("python", "-m", "pytest", "-x", "tests/a b")),
    ("[tox, -e, py311]", ("tox", "-e", "py311")),
])
def test_test_forms(tmp_path: Path, value: str, expected: tuple[str, ...] | None) -> None:
    plugin = load(tmp_path, f"plugins:\n  p:\n    repo: ./p\n    test: {value}\n").plugins["p"]
    assert plugin.test == expected and plugin.test_is_default is False


def test_yaml_merge_keys_and_x_anchors(tmp_path: Path) -> None:
    cfg = load(tmp_path, """
        x-defaults: &defaults
          ref: stable
          test: false
        plugins:
          a:
            <<: *defaults
            repo: ./a
          b:
            <<: *defaults
            repo: ./b
            ref: edge
    """)
    assert (cfg.plugins["a"].ref, cfg.plugins["a"].test) == ("stable", None)
    assert cfg.plugins["b"].ref == "edge"


def test_repo_push_is_hosted_under_data_dir(tmp_path: Path) -> None:
    config = load(tmp_path, """
        data_dir: state
        push_max_size: 25MiB
        plugins:
          notes:
            repo: push
            push_token: ${NOTES_TOKEN}
            allow_force_push: true
          plain:
            repo: ./plain
    """, NOTES_TOKEN="t" * 20)
    notes, plain = config.plugins["notes"], config.plugins["plain"]
    assert notes.hosted and notes.repo == str(tmp_path / "state" / "hosted" / "notes.git")
    assert notes.push_token == "t" * 20 and notes.allow_force_push
    assert "t" * 20 not in repr(notes)  # the token is never shown
    assert not plain.hosted and plain.push_token is None and not plain.allow_force_push
    assert config.push_max_size == 25 << 20
    assert load(tmp_path, "plugins: {}\n").push_max_size == 100 << 20


def test_notify_entries(tmp_path: Path) -> None:
    config = load(tmp_path, """
        public_url: https://deploy.example.com/
        host_url: http://web-1.internal:5000/
        notify:
          - {url: https://hooks.example.com/deploys, events: [deploy_failed, rolled_back],
             secret: "${NOTIFY_SECRET}"}
          - {url: https://hooks.slack.com/services/T/B/XYZ, events: [deploy_succeeded], format: slack,
             plugins: [hello]}
          - {url: https://api.github.com/repos/team/hello, format: github, token: "${GH_TOKEN}",
             events: [deploy_started, deploy_succeeded, deploy_failed], timeout: 3}
          - {url: https://gitlab.example.com/api/v4/projects/team%2Fhello, format: gitlab,
             token: "${GH_TOKEN}", events: [deploy_succeeded, canary_started, host_lost]}
          - {url: https://gitea.example.com/api/v1/repos/team/hello, format: gitea,
             token: "${GH_TOKEN}", events: [deploy_failed]}
        plugins:
          hello: {repo: ./hello}
    """, NOTIFY_SECRET="s" * 20, GH_TOKEN="g" * 20)
    assert config.public_url == "https://deploy.example.com"
    assert config.host_url == "http://web-1.internal:5000"
    json_, slack, github, gitlab, gitea = config.notify
    assert (json_.format, json_.secret, json_.events, json_.plugins, json_.timeout) == (
        "json", "s" * 20, frozenset({"deploy_failed", "rolled_back"}), None, 10.0)
    assert (slack.format, slack.plugins) == ("slack", frozenset({"hello"}))
    assert (github.token, github.timeout, gitlab.format, gitea.format) == ("g" * 20, 3.0, "gitlab", "gitea")
    shown = repr(config.notify)
    assert "XYZ" not in shown and "s" * 20 not in shown and "g" * 20 not in shown
    assert load(tmp_path, "plugins: {}\n").notify == ()


def test_plugin_config_is_a_read_only_copy() -> None:
    settings = {"GREETING": "hi", "LIST": [1]}
    cfg = config_from_mapping({"plugins": {"p": {"repo": "/p", "config": settings}}},
                              base_dir=Path("/"), environ={})
    settings["LIST"].append(2)
    assert cfg.plugins["p"].config["LIST"] == [1]
    with pytest.raises(TypeError):
        cfg.plugins["p"].config["NEW"] = 1  # type: ignore[index]


def test_unknown_plugin_lookup(tmp_path: Path) -> None:
    cfg = load(tmp_path, "plugins:\n  hello: {repo: ./h}\n")
    assert cfg.plugin("hello").name == "hello"
    with pytest.raises(UnknownPlugin, match="no plugin named 'nope'.*Known plugins: hello"):
        cfg.plugin("nope")


# --------------------------------------------------------------------------- broken files

# Each case: the file, the 1-based line at fault, the dotted key (None for YAML syntax),
# and a regex the reason must match. Line 1 is the first line of the dedented text.
BROKEN = [
    pytest.param("""
        data_dir: .gitplug
        pol_interval: 30
        plugins: {}
    """, 2, "pol_interval", r"unknown key 'pol_interval'; did you mean 'poll_interval'\? "
                            r"Allowed here: data_dir, poll_interval, .*plugins",
                 id="unknown-top-key"),
    pytest.param("""
        plugins:
          hello:
            repo: ./hello
            urlprefix: /hi
    """, 4, "plugins.hello.urlprefix", r"did you mean 'url_prefix'\? Allowed here: repo, ref",
                 id="unknown-plugin-key"),
    pytest.param("""
        data_dir: .gitplug
        plugins:
          hello:
            repo: ./hello

            poll_interval: soon
    """, 6, "plugins.hello.poll_interval",
                 r"expected a positive number of seconds, got 'soon'", id="wrong-type"),
    pytest.param("""
        poll_interval: true
    """, 1, "poll_interval", r"expected a positive number of seconds, got True",
                 id="bool-is-not-a-number"),
    pytest.param("""
        plugins:
          hello:
            repo: ./hello
            test_timeout: -5
    """, 4, "plugins.hello.test_timeout", r"expected a positive number of seconds, got -5",
                 id="negative-interval"),
    pytest.param("""
        plugins:
          hello:
            repo: ./hello
            url_prefix: hello
    """, 4, "plugins.hello.url_prefix", r"expected a URL path prefix .*start with '/'.*'hello'",
                 id="bad-prefix"),
    pytest.param("""
        plugins:
          one:
            repo: ./one
            url_prefix: /shared
          two:
            repo: ./two
            url_prefix: /shared
    """, 7, "plugins.two.url_prefix", r"'/shared' of plugin 'two' is the same as url_prefix "
                                      r"'/shared' of plugin 'one'", id="duplicate-prefix"),
    pytest.param("""
        plugins:
          outer:
            repo: ./outer
            url_prefix: /a/b
          inner:
            repo: ./inner
            url_prefix: /a
    """, 7, "plugins.inner.url_prefix", r"'/a' of plugin 'inner' contains url_prefix '/a/b' "
                                        r"of plugin 'outer'", id="nested-prefix"),
    pytest.param("""
        api_prefix: /admin
        plugins:
          admin:
            repo: ./admin
    """, 3, "plugins.admin.url_prefix", r"'/admin' of plugin 'admin' clashes with api_prefix",
                 id="api-prefix-clash"),
    pytest.param("""
        plugins:
          hello:
            repo: ./hello
            entry: hello.plugin
    """, 4, "plugins.hello.entry", r"expected 'module.path:attribute'.*got 'hello.plugin'",
                 id="bad-entry"),
    pytest.param("""
        plugins:
          hello:
            repo: ./hello
            test: 42
    """, 4, "plugins.hello.test", r"expected a command .* or false to skip the gate, got 42",
                 id="bad-test-type"),
    pytest.param("""
        plugins:
          hello:
            repo: ./hello
            auto_rollback:
              min_requests: 10
              max_error_rate: 1.5
    """, 6, "plugins.hello.auto_rollback.max_error_rate",
                 r"expected an error rate in \(0, 1\].*got 1.5", id="auto-rollback-bad-rate"),
    pytest.param("""
        plugins:
          hello:
            repo: ./hello
            canary:
              percent: 100
    """, 5, "plugins.hello.canary.percent",
                 r"expected a share of the clients in \(0, 100\), e.g. 10 \(100 would skip the comparison.*got 100",
                 id="canary-percent-100"),
    pytest.param("""
        canary: {percent: 10, min_requests: 0}
        plugins:
          hello:
            repo: ./hello
    """, 1, "canary.min_requests", r"expected an integer >= 1 \(requests the canary serves before it is judged\), got 0",
                 id="canary-default-min-requests"),
    pytest.param("""
        plugins:
          hello:
            repo: ./hello
            canary: {percent: 10, duraton: 60}
    """, 4, "plugins.hello.canary.duraton", r"unknown key 'duraton'; did you mean 'duration'\?",
                 id="canary-unknown-key"),
    pytest.param("""
        plugins:
          hello:
            repo: ./hello
            canary: soon
    """, 4, "plugins.hello.canary",
                 r"expected a mapping \{percent, min_requests, duration, max_error_rate\}, true or false.*got 'soon'",
                 id="canary-not-a-mapping"),
    pytest.param("""
        plugins:
          hello:
            repo: ./one
            ref: main
            repo: ./two
    """, 5, "plugins.hello.repo", r"duplicate key 'repo' \(first on line 3\)",
                 id="duplicate-key"),
    pytest.param("""
        plugins:
          hello:
            repo: ./hello
             ref: main
    """, 4, None, r"invalid YAML: mapping values are not allowed here", id="yaml-syntax"),
    pytest.param("""
        data_dir: .gitplug
        admin_token: Bearer-${NOPE_TOKEN}
    """, 2, "admin_token", r"environment variable NOPE_TOKEN is not set.*export NOPE_TOKEN=",
                 id="unset-var"),
    pytest.param("""
        plugins:
          - hello
    """, 1, "plugins", r"expected a mapping of plugin name to settings.*got \['hello'\]",
                 id="plugins-not-a-mapping"),
    pytest.param("""
        plugins:
          my.plugin:
            repo: ./hello
    """, 2, "plugins.my.plugin", r"invalid plugin name 'my.plugin'.*blueprint name",
                 id="bad-plugin-name"),
    pytest.param("""
        keep_releases: 0
    """, 1, "keep_releases", r"expected an integer >= 1 .*got 0", id="keep-releases-0"),
    pytest.param("""
        limits:
          max_file_size: 10 parsecs
    """, 2, "limits.max_file_size", r"expected a size such as 100MiB", id="bad-size"),
    pytest.param("""
        limits: {max_files: 0}
    """, 1, "limits.max_files", r"expected an integer >= 1 \(files per release\)",
                 id="max-files-0"),
    pytest.param("""
        limits: {max_size: 1MiB}
    """, 1, "limits.max_size", r"did you mean 'max_file_size'", id="limits-unknown-key"),
    pytest.param("""
        test_sandbox: docker
    """, 1, "test_sandbox", r"expected none or bwrap", id="bad-sandbox"),
    pytest.param("""
        test_user: no-such-user-here
    """, 1, "test_user", r"no user 'no-such-user-here' on this host", id="unknown-test-user"),
    pytest.param("""
        plugins:
          hello:
            ref: main
    """, 2, "plugins.hello.repo", r"missing; expected the plugin's git repository",
                 id="missing-repo"),
    pytest.param("""
        plugins:
          hello:
            repo: ftp://example.com/hello.git
    """, 3, "plugins.hello.repo", r"expected a git URL .* got 'ftp://", id="bad-repo-scheme"),
    pytest.param("""
        state: redis://cache/0
    """, 1, "state", r"expected sqlite:///PATH .* or postgresql://", id="bad-state"),
    pytest.param("""\
        state: postgresql://gitplug:hunter2@db
    """, 1, "state", r"or postgresql://USER@HOST\[:PORT\]/DATABASE, got 'postgresql://gitplug:\*\*\*@db'",
                 id="state-without-database"),
    pytest.param("""\
        host_id: "web 1"
    """, 1, "host_id", r"expected a host name such as 'web-1'", id="bad-host-id"),
    pytest.param("""
        webhook:
          secrt: abc
    """, 2, "webhook.secrt", r"did you mean 'secret'", id="webhook-unknown-key"),
    pytest.param("""
        webhook:
          max_body: lots
    """, 2, "webhook.max_body", r"expected a size such as 100MiB, 25MB or a number of bytes, "
                                 r"got 'lots'", id="webhook-max-body-not-a-size"),
    pytest.param("""
        webhook:
          max_body: 0
    """, 2, "webhook.max_body", r"expected a size such as 100MiB", id="webhook-max-body-zero"),
    pytest.param("""
        webhook:
          max_body: 2GiB
    """, 2, "webhook.max_body", r"expected a size of at most 1024MiB \(GitHub sends 25MB at "
                                 r"most\), got '2GiB'", id="webhook-max-body-too-big"),
    pytest.param("""
        plugins:
          hello:
            repo: ./hello
            ref: main..evil
    """, 4, "plugins.hello.ref", r"expected a branch, tag or commit sha", id="bad-ref"),
    pytest.param("""
        plugins:
          hello:
            repo: ./hello
            ref: 1234567
    """, 4, "plugins.hello.ref", r"\(quote it: '1234567'\)", id="unquoted-numeric-sha"),
    pytest.param("""
        plugins:
          hello:
            repo: ./hello
            test: 'python -m pytest "unclosed'
    """, 4, "plugins.hello.test", r"No closing quotation", id="test-bad-quoting"),
    pytest.param("""
        plugins:
          hello:
            repo: ./hello
            config: [a, b]
    """, 4, "plugins.hello.config", r"expected a mapping", id="config-not-a-mapping"),
    pytest.param("""
        plugins:
          hello:
            repo: ./hello
            push_token: abcdefghijklmnopqrstuvwxyz
    """, 4, "plugins.hello.push_token", r"applies only to a plugin with 'repo: push'",
        id="push-token-without-push"),
    pytest.param("""
        plugins:
          hello:
            repo: push
            push_token: short
    """, 4, "plugins.hello.push_token", r"5 characters long; use at least 16",
        id="push-token-too-short"),
    pytest.param("""
        plugins:
          hello:
            repo: push
            ref: refs/tags/v1
    """, 4, "plugins.hello.ref", r"with 'repo: push', the branch whose pushes deploy",
        id="push-ref-not-a-branch"),
    pytest.param("""
        plugins:
          hello:
            repo: push
            allow_force_push: sometimes
    """, 4, "plugins.hello.allow_force_push", r"expected true or false", id="push-force-not-bool"),
    pytest.param("""
        push_max_size: lots
    """, 1, "push_max_size", r"expected a size such as 100MiB", id="push-max-size"),
    pytest.param("""
        notify:
          - url: https://hooks.example.com/x
            events: [deploy_faild]
    """, 3, "notify.0.events", r"unknown event 'deploy_faild'; did you mean 'deploy_failed'",
        id="notify-unknown-event"),
    pytest.param("""
        notify:
          - url: ftp://hooks.example.com/x
            events: [deploy_failed]
    """, 2, "notify.0.url", r"expected an http\(s\) URL with a host", id="notify-bad-url"),
    pytest.param("""
        notify:
          - events: [deploy_failed]
            url: https://api.github.com/team/hello
            format: github
            token: abc
    """, 3, "notify.0.url", r"API URL for format github: https://api.github.com/repos/OWNER/REPO",
        id="notify-github-url"),
    pytest.param("""
        notify:
          - url: https://gitlab.example.com/api/v4/projects/7
            events: [deploy_failed]
            format: gitlab
    """, 2, "notify.0.token", r"missing; format gitlab needs the forge's API token",
        id="notify-forge-no-token"),
    pytest.param("""
        notify:
          - url: https://hooks.example.com/x
            events: [deploy_failed]
            format: slack
            secret: abc
    """, 5, "notify.0.secret", r"a secret signs format json only", id="notify-secret-not-json"),
    pytest.param("""
        notify:
          - url: https://hooks.example.com/x
            events: [deploy_failed]
            format: teams
    """, 4, "notify.0.format", r"expected one of json, slack, github, gitlab, gitea",
        id="notify-format"),
    pytest.param("""
        notify:
          - url: https://hooks.example.com/x
            events: [deploy_failed]
            plugins: [nope]
    """, 4, "notify.0.plugins", r"no plugin named 'nope'", id="notify-unknown-plugin"),
    pytest.param("""
        public_url: deploy.example.com
    """, 1, "public_url", r"expected the URL people reach this server at", id="public-url"),
    pytest.param("""
        host_url: web-1:5000
    """, 1, "host_url", r"expected the URL the other hosts of the fleet reach this one at", id="host-url"),
]


@pytest.mark.parametrize("text, line, key, reason", BROKEN)
def test_broken_file(tmp_path: Path, text: str, line: int, key: str | None, reason: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path, environ={})
    err = info.value
    assert (err.file, err.line, err.key) == (str(path), line, key)
    where = f"{path}:{line}: " + (f"{key}: " if key else "")
    assert str(err).startswith(where), str(err)
    assert re.search(reason, err.reason), err.reason


def test_all_problems_are_listed_first_one_in_attributes(tmp_path: Path) -> None:
    path = write(tmp_path, """
        keep_releases: 0
        plugins:
          hello:
            repo: ./hello
            poll_interval: soon
            entry: nope
    """)
    with pytest.raises(ConfigError, match=r"(?s)deploy.yaml:1: keep_releases: .*"
                                          r"and 2 more problem\(s\):\n"
                                          r".*deploy.yaml:5: plugins.hello.poll_interval: .*\n"
                                          r".*deploy.yaml:6: plugins.hello.entry: ") as info:
        load_config(path, environ={})
    assert (info.value.line, info.value.key) == (1, "keep_releases")


def test_a_bad_ref_does_not_hide_nested_prefixes(tmp_path: Path) -> None:
    path = write(tmp_path, """
        plugins:
          shop:
            repo: ./shop
            ref: main..dev
            url_prefix: /shop
          cart:
            repo: ./cart
            url_prefix: /shop/cart
    """)
    with pytest.raises(ConfigError, match=r"(?s)deploy.yaml:4: plugins.shop.ref: .*"
                                          r"and 1 more problem\(s\):\n"
                                          r".*deploy.yaml:8: plugins.cart.url_prefix: url_prefix "
                                          r"'/shop/cart' of plugin 'cart' is inside url_prefix "
                                          r"'/shop' of plugin 'shop'"):
        load_config(path, environ={})


@pytest.mark.parametrize("key, text", [
    ("admin_token", "admin_token: ${T}\n"),
    ("webhook.secret", "webhook: {secret: '${T}'}\n"),
])
def test_short_secrets_are_refused_without_echoing_them(tmp_path: Path, key: str, text: str) -> None:
    with pytest.raises(ConfigError, match=rf"{re.escape(key)}: too short \(15 characters\); use at "
                                          r"least 16") as info:
        load(tmp_path, text + "plugins: {}\n", T="abcdefghijklmno")
    assert "abcdefghijklmno" not in str(info.value) and "abc" not in str(info.value)
    assert load(tmp_path, text + "plugins: {}\n", T="abcdefghijklmnop") is not None


def test_read_only_commands_need_no_secret_in_the_environment(tmp_path: Path) -> None:
    path = write(tmp_path, """
        admin_token: ${UNSET_TOKEN}
        webhook: {secret: '${UNSET_SECRET}'}
        plugins: {}
    """)
    with pytest.raises(ConfigError, match=r"UNSET_TOKEN is not set"):
        load_config(path, environ={})
    cfg = load_config(path, environ={}, need_secrets=False)
    assert cfg.admin_token is None and cfg.webhook_secret is None
    # Other settings still need their variables.
    bad = write(tmp_path, "data_dir: ${UNSET_DIR}\nplugins: {}\n", name="other.yaml")
    with pytest.raises(ConfigError, match=r"UNSET_DIR is not set"):
        load_config(bad, environ={}, need_secrets=False)


@pytest.mark.parametrize("text, reason", [
    ("", r"the file is empty"),
    ("# only a comment\n", r"the file is empty"),
    ("- a\n- b\n", r"the top level must be a mapping"),
    ("just text\n", r"the top level must be a mapping"),
])
def test_empty_or_not_a_mapping(tmp_path: Path, text: str, reason: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(path))}:1: {reason}"):
        load_config(path, environ={})


def test_missing_file_says_how_to_choose_another(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match=rf"no configuration file at {re.escape(str(missing))}"
                                          r".*-c FILE or set GITPLUG_CONFIG"):
        load_config(missing)


def test_unsafe_yaml_tags_are_refused(tmp_path: Path) -> None:
    path = write(tmp_path, "plugins: !!python/object/apply:os.system ['true']\n")
    with pytest.raises(ConfigError, match=r"deploy.yaml:1: plugins: unsupported YAML tag"):
        load_config(path, environ={})


# --------------------------------------------------------------------------- from a mapping


def test_config_from_mapping(tmp_path: Path) -> None:
    cfg = config_from_mapping({
        "data_dir": tmp_path / "data",
        "admin_token": "${TOKEN}",
        "plugins": {"hello": {"repo": Path("hello"), "test": ("make", "test"),
                              "poll_interval": 5}},
    }, base_dir=tmp_path, environ={"TOKEN": "t" * 16})
    assert cfg.source == MAPPING_SOURCE and cfg.base_dir == tmp_path
    assert cfg.data_dir == tmp_path / "data" and cfg.admin_token == "t" * 16
    assert cfg.plugins["hello"].repo == str(tmp_path / "hello")
    assert cfg.plugins["hello"].test == ("make", "test")


@pytest.mark.parametrize("data, key, reason", [
    ({"plugins": {"p": {"repo": "/p", "poll_interval": True}}}, "plugins.p.poll_interval",
     r"expected a positive number of seconds, got True"),
    ({"plugins": {"p": {"repo": "/p", "url_prefix": "/p/<x"}}}, "plugins.p.url_prefix",
     r"not a converter"),
    ({"api_prefix": "/"}, "api_prefix", r"site root"),
    ({"api_prefix": "/<x>"}, "api_prefix", r"literal path"),
    ({"plugins": {"p": {"repo": "/p", "url_prefix": "/p//"}}}, "plugins.p.url_prefix",
     r"'//'"),
    ({"plugins": {"p": {"repo": "/p", "url_prefix": "p"}}}, "plugins.p.url_prefix",
     r"start with '/'"),
    ({"api_prefix": "/api/"}, "api_prefix", r"trailing '/'"),
    ({"plugins": {"p": {"repo": "/p", "url_prefix": "/p/<path:rest>"}}}, "plugins.p.url_prefix",
     r"spans segments"),
    ({"plugins": {"p": {"repo": "/p", "url_prefix": "/a//b"}}}, "plugins.p.url_prefix",
     r"'//'"),
    ({"plugins": {"p": {"repo": "-oProxyCommand=x"}}}, "plugins.p.repo", r"not starting with '-'"),
    ({"plugins": {"p": {"repo": "https:///path"}}}, "plugins.p.repo", r"with a host"),
    ({"plugins": {"p": {"repo": "/p", "test": True}}}, "plugins.p.test", r"got True"),
    ({"plugins": {"p": {"repo": "/p", "test": ""}}}, "plugins.p.test", r"got ''"),
    ({"plugins": {"p": {"repo": "/p", "entry": "a:b:c"}}}, "plugins.p.entry", r"'a:b:c'"),
    ({"plugins": {"p": {"repo": "/p", "auto_rollback": {"min_requests": 2.5}}}},
     "plugins.p.auto_rollback.min_requests", r"expected an integer >= 1"),
    ({"admin_token": 1234}, "admin_token", r"got a value of type int"),
    ({"api_prefix": "api"}, "api_prefix", r"start with '/'"),
    ({"plugins": {"p": {"repo": "/p", "ref": "${REF}"}}}, "plugins.p.ref", r"REF is not set"),
])
def test_config_from_mapping_errors(data: dict, key: str, reason: str) -> None:
    with pytest.raises(ConfigError, match=reason) as info:
        config_from_mapping(data, base_dir=Path("/srv"), environ={})
    err = info.value
    assert (err.file, err.line, err.key) == (MAPPING_SOURCE, None, key)
    assert str(err).startswith(f"{MAPPING_SOURCE}: {key}: ")


def test_secrets_are_not_echoed() -> None:
    with pytest.raises(ConfigError) as info:
        config_from_mapping({"webhook": {"secret": 987654321}}, base_dir=Path("/"), environ={})
    assert "987654321" not in str(info.value)


# --------------------------------------------------------------------------- paths and diffs


@pytest.mark.parametrize("given, env, expected", [
    ("mine.yaml", {"GITPLUG_CONFIG": "env.yaml"}, "mine.yaml"),
    (None, {"GITPLUG_CONFIG": "env.yaml"}, "env.yaml"),
    (None, {"GITPLUG_CONFIG": ""}, "deploy.yaml"),
    (None, {}, "deploy.yaml"),
])
def test_resolve_config_path(given: str | None, env: dict, expected: str) -> None:
    assert resolve_config_path(given, environ=env) == Path(expected)


def test_diff_plugins(tmp_path: Path) -> None:
    base = {"plugins": {"same": {"repo": "/s"}, "bumped": {"repo": "/b", "ref": "v1"},
                        "configured": {"repo": "/c", "config": {"A": 1}}, "gone": {"repo": "/g"}}}
    new = {"poll_interval": 60, "plugins": {
        "same": {"repo": "/s"}, "bumped": {"repo": "/b", "ref": "v2"},
        "configured": {"repo": "/c", "config": {"A": 2}}, "fresh": {"repo": "/f"}}}
    old_cfg = config_from_mapping(base, base_dir=tmp_path, environ={})
    new_cfg = config_from_mapping(new, base_dir=tmp_path, environ={})
    diff = diff_plugins(old_cfg, new_cfg)
    assert diff == ConfigDiff(added=("fresh",), removed=("gone",),
                              changed=("bumped", "configured"))
    assert diff and not diff_plugins(new_cfg, new_cfg)


def test_top_level_poll_interval_change_shows_as_plugin_change(tmp_path: Path) -> None:
    plugins = {"p": {"repo": "/p"}}
    old = config_from_mapping({"plugins": plugins}, base_dir=tmp_path, environ={})
    new = config_from_mapping({"poll_interval": 5, "plugins": plugins}, base_dir=tmp_path,
                              environ={})
    assert diff_plugins(old, new).changed == ("p",)


def test_keys_are_text_not_yaml_booleans(tmp_path: Path) -> None:
    cfg = load(tmp_path, "plugins:\n  no:\n    repo: ./no\n    config: {1: one, on: yes}\n")
    assert list(cfg.plugins) == ["no"]
    assert dict(cfg.plugins["no"].config) == {"1": "one", "on": True}


def test_one_trailing_slash_is_a_valid_prefix_and_clashes_as_without_it() -> None:
    """As in Flask, ``/shop/`` is a prefix (``/shop/`` + ``//bar`` is ``/shop/bar``)."""
    cfg = config_from_mapping({"plugins": {"p": {"repo": "/p", "url_prefix": "/shop/"}}}, base_dir=Path("/"))
    assert cfg.plugins["p"].url_prefix == "/shop/"
    with pytest.raises(ConfigError, match=r"'/shop' of plugin 'q' is the same as url_prefix '/shop'"):
        config_from_mapping({"plugins": {"p": {"repo": "/p", "url_prefix": "/shop/"},
                                         "q": {"repo": "/q", "url_prefix": "/shop"}}},
                            base_dir=Path("/"))


@pytest.mark.parametrize("value, ok", [("api", True), ("<user>.api", True), ("a/b", False), ("", False),
                                       ("-x", False)])
def test_plugin_subdomain_setting(value: str, ok: bool) -> None:
    data = {"plugins": {"p": {"repo": "/p", "subdomain": value}}}
    if ok:
        assert config_from_mapping(data, base_dir=Path("/")).plugins["p"].subdomain == value
    else:
        with pytest.raises(ConfigError, match=r"plugins\.p\.subdomain: expected a subdomain such as 'api'"):
            config_from_mapping(data, base_dir=Path("/"))
