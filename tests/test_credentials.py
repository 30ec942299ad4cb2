"""Private repositories (README, "Private repositories"): ``credentials:`` against real servers.

An HTTP git server on 127.0.0.1 that requires basic auth (dulwich's WSGI
server behind a check of the Authorization header: 401 without credentials,
403 with wrong ones) and a real sshd (tests/sshd.py) with its own host key.
The credentials come from ``${VAR}``; each test then greps every log line,
the status JSON, the test gate's environment (the gate prints it) and every
file under ``data_dir`` (mirrors, releases, state, logs) for its secrets:
never found.
"""

from __future__ import annotations

import json
import logging
import secrets
import subprocess
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from flask import Flask

from gitplug import GitPlug
from gitplug.config import Credential
from gitplug.deploy.credentials import match
from gitplug.deploy.gitsource import GitSource
from gitplug.errors import FetchError
from gitplug.state import DeployResult
from gitrepo import GitRepo, serve_http
from serverproc import run_cli
from sshd import SshServer, start_sshd

PLUGIN = '''
from gitplug import Plugin, current_plugin

plugin = Plugin("hello", __name__)

@plugin.route("/")
def index():
    from hello.version import VERSION
    return f"{VERSION}@{current_plugin.commit[:7]}"
'''

#: The gate prints its whole environment into the deploy's test log.
GATE = ["python", "-c", "import os; print('GATE-ENV', sorted(os.environ.items()))"]


def write_version(repo: GitRepo, version: str) -> str:
    repo.write("hello/__init__.py", textwrap.dedent(PLUGIN))
    repo.write("hello/version.py", f'VERSION = "{version}"\n')
    return repo.commit(version)


ADMIN_TOKEN = "admin-token-of-the-credentials-tests"


def make_app(
    make_gp: Callable[[Flask], GitPlug], tmp_path: Path, repo_url: str, credentials: list[dict[str, str]],
    **more: dict[str, object],
) -> tuple[Flask, GitPlug]:
    app = Flask("host")
    app.config["TESTING"] = True
    app.config["GITPLUG"] = {
        "data_dir": str(tmp_path / "data"),
        "admin_token": ADMIN_TOKEN,
        "credentials": credentials,
        "plugins": {"hello": {"repo": repo_url, "ref": "main", "test": GATE, "test_timeout": 60}, **more},
    }
    return app, make_gp(app)


def served(app: Flask) -> str:
    with app.test_client() as client:
        response = client.get("/hello/", buffered=True)
        return f"{response.status_code} {response.get_data(as_text=True)}"


def faces(app: Flask, gp: GitPlug) -> list[str]:
    """What the API, the status page and each deploy's log page show, as text."""
    shown = []
    with app.test_client() as client:
        bearer = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
        for path in ("/_gitplug/api/plugins", "/_gitplug/api/plugins/hello",
                     "/_gitplug/api/plugins/hello/history", "/_gitplug/metrics"):
            response = client.get(path, headers=bearer)
            assert response.status_code == 200, (path, response.status_code)
            shown.append(response.get_data(as_text=True))
        assert client.post("/_gitplug/login", data={"token": ADMIN_TOKEN}).status_code in (302, 303)
        page = client.get("/_gitplug/")
        assert page.status_code == 200 and "hello" in page.get_data(as_text=True)
        shown.append(page.get_data(as_text=True))
        for record in gp.store.history("hello", limit=None):
            log = client.get(f"/_gitplug/plugins/hello/deploys/{record.id}/log")
            assert log.status_code in (200, 404), log.status_code
            shown.append(log.get_data(as_text=True))
    return shown


def assert_nowhere(secret: str, *, data_dir: Path, texts: list[str]) -> None:
    """``secret`` is in none of ``texts`` and in no file under ``data_dir``."""
    for text in texts:
        assert secret not in text
    needle = secret.encode()
    looked = 0
    for path in data_dir.rglob("*"):
        if path.is_file() and not path.is_symlink():
            looked += 1
            assert needle not in path.read_bytes(), f"{secret[:3]}... found in {path}"
    assert looked > 5  # state, mirror, release, logs: there was something to search


@pytest.fixture
def private_http(tmp_path: Path) -> Iterator[tuple[str, str, GitRepo]]:
    """``(base URL, token, repo)``: a repository served only to ``deploy`` with the token."""
    token = secrets.token_urlsafe(24)
    repo = GitRepo(tmp_path / "srv" / "hello")
    with serve_http(tmp_path / "srv", auth=("deploy", token)) as base:
        yield base, token, repo


def test_https_credentials_deploy_and_never_show(make_gp: Callable[[Flask], GitPlug],
    tmp_path: Path, private_http: tuple[str, str, GitRepo], monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    base, token, repo = private_http
    monkeypatch.setenv("GITPLUG_T_GIT_TOKEN", token)
    caplog.set_level(logging.DEBUG)
    v1 = write_version(repo, "v1")
    rotated = secrets.token_urlsafe(24)  # what the server no longer takes
    monkeypatch.setenv("GITPLUG_T_OLD_TOKEN", rotated)
    other = GitRepo(tmp_path / "srv" / "other")
    other.write("other/__init__.py", "from gitplug import Plugin\nplugin = Plugin('other', __name__)\n")
    other.commit("other")
    app, gp = make_app(make_gp, tmp_path, f"{base}/hello", [
        {"url": f"{base}/", "username": "deploy", "password": "${GITPLUG_T_GIT_TOKEN}"},
        {"url": f"{base}/other", "username": "deploy", "password": "${GITPLUG_T_OLD_TOKEN}"},
    ], other={"repo": f"{base}/other", "test": False})
    record = gp.deploy("hello")
    assert record.result == DeployResult.LIVE, record
    assert served(app) == f"200 v1@{v1[:7]}"
    # A poll (background trigger) and a rollback fetch with the same entry.
    v2 = write_version(repo, "v2")
    record = gp.deployer.deploy("hello", trigger="poll")
    assert record is not None and record.result == DeployResult.LIVE, record
    assert served(app) == f"200 v2@{v2[:7]}"
    assert gp.rollback("hello", v1).result == DeployResult.LIVE
    assert served(app) == f"200 v1@{v1[:7]}"

    gate_log = Path(gp.store.history("hello", limit=None)[-1].log_path).read_text()
    assert "GATE-ENV" in gate_log and "PATH" in gate_log  # the gate did print its environment
    assert "GITPLUG_T_GIT_TOKEN" not in gate_log

    # The longer prefix wins for "other", and its token is refused: the failure
    # is shown everywhere, naming the entry; the token nowhere.
    record = gp.deploy("other")
    assert (record.result, record.stage.value) == (DeployResult.FAILED, "fetch"), record
    assert "access denied (HTTP 403)" in record.error
    assert f"The server refused the `credentials:` entry for {base}/other (username deploy)" in record.error

    status = json.dumps(gp.status())
    assert "refused the `credentials:` entry" in status and "HTTP 403" in status
    for secret in (token, rotated):
        assert_nowhere(secret, data_dir=tmp_path / "data",
                       texts=[gate_log, status, caplog.text, repr(gp.config), repr(gp.config.credentials),
                              *faces(app, gp)])


def test_https_auth_failures_name_the_entry_never_the_secret(
    tmp_path: Path, private_http: tuple[str, str, GitRepo]
) -> None:
    base, token, repo = private_http
    write_version(repo, "v1")
    wrong = secrets.token_urlsafe(24)
    url = f"{base}/hello"

    def fetch(*entries: Credential) -> FetchError:
        source = GitSource(tmp_path / f"mirrors-{secrets.token_hex(4)}", timeout=10, credentials=lambda: entries)
        with pytest.raises(FetchError) as caught:
            source.fetch("hello", url)
        return caught.value

    error = str(fetch(Credential(url=f"{base}/", username="deploy", password=wrong)))
    assert "access denied (HTTP 403)" in error, error
    assert f"The server refused the `credentials:` entry for {base}/ (username deploy)" in error
    assert wrong not in error and token not in error

    error = str(fetch(Credential(url="https://elsewhere.example/", username="deploy", password=wrong)))
    assert "authentication required (HTTP 401)" in error, error
    assert "No `credentials:` entry matches this URL, so none was sent" in error
    assert f"{{url: {base}/, username: deploy, password: ${{GIT_TOKEN}}}}" in error
    assert wrong not in error

    # The longest prefix wins: the repository's own entry over its host's.
    right = Credential(url=f"{base}/hello", username="deploy", password=token)
    host_wide = Credential(url=f"{base}/", username="deploy", password=wrong)
    assert match([host_wide, right], url) is right and match([right, host_wide], url) is right
    source = GitSource(tmp_path / "mirrors", timeout=10, credentials=lambda: (host_wide, right))
    source.fetch("hello", url)
    assert "main" in str(source.resolve("hello", url, "main"))
    # The objects came through `git fetch`, its credentials through the askpass
    # helper, which reads git's environment: the token is in no file.
    helper = tmp_path / "mirrors" / ".gitplug-git-askpass"
    assert helper.is_file() and token not in helper.read_text()
    assert token not in repr(right) and wrong not in repr(host_wide)


def test_credentials_configuration_errors(tmp_path: Path) -> None:
    from gitplug.config import config_from_mapping
    from gitplug.errors import ConfigError

    def problems(*entries: object) -> str:
        with pytest.raises(ConfigError) as caught:
            config_from_mapping({"credentials": list(entries), "plugins": {}}, base_dir=tmp_path,
                                environ={"TOKEN": "s3cr3t-value-never-shown"})
        assert "s3cr3t-value-never-shown" not in str(caught.value)
        return str(caught.value)

    assert "credentials.0.password: missing" in problems({"url": "https://h/team/", "username": "x"})
    assert "credentials.0.known_hosts: missing" in problems({"url": "ssh://git@h/", "ssh_key": str(tmp_path)})
    assert "credentials.0.url: holds a password" in problems({"url": "https://u:pw@h/", "password": "${TOKEN}"})
    assert "ssh_key is for ssh:// URLs" in problems({"url": "https://h/", "password": "${TOKEN}", "ssh_key": "k"})
    assert "given twice" in problems({"url": "https://h/", "password": "${TOKEN}"},
                                     {"url": "https://h/", "password": "${TOKEN}"})
    assert "credentials.0.url: expected an https://" in problems({"url": "ftp://h/", "password": "${TOKEN}"})


# -- ssh -------------------------------------------------------------------------


@pytest.fixture
def sshd(tmp_path: Path) -> Iterator[SshServer]:
    with start_sshd(tmp_path / "sshd") as server:
        yield server


def _keygen(path: Path, passphrase: str = "") -> Path:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", passphrase, "-C", "deploy", "-f", str(path)],
                   check=True, timeout=30, stdin=subprocess.DEVNULL)
    return path


def test_ssh_credentials_key_known_hosts_and_refusals(
    tmp_path: Path, sshd: SshServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("GIT_SSH_COMMAND", raising=False)
    monkeypatch.delenv("GIT_SSH", raising=False)
    repo = GitRepo(tmp_path / "hello")
    sha = write_version(repo, "v1")
    url = sshd.url(repo.path)
    prefix = f"ssh://{sshd.user}@127.0.0.1:{sshd.port}/"
    entry = Credential(url=prefix, ssh_key=str(sshd.client_key), known_hosts=str(sshd.known_hosts))
    source = GitSource(tmp_path / "mirrors", timeout=20, credentials=lambda: (entry,))
    source.fetch("hello", url)
    assert source.resolve("hello", url, "main").commit == sha

    # An unknown host: refused, with its fingerprint and the line to add.
    empty = tmp_path / "empty_known_hosts"
    empty.write_text("")
    unknown = Credential(url=prefix, ssh_key=str(sshd.client_key), known_hosts=str(empty))
    with pytest.raises(FetchError) as caught:
        GitSource(tmp_path / "m2", timeout=20, credentials=lambda: (unknown,)).fetch("hello", url)
    error = str(caught.value)
    host_pub = sshd.host_key.with_suffix(".pub").read_text().split()
    fingerprint = subprocess.run(["ssh-keygen", "-l", "-f", str(sshd.host_key.with_suffix(".pub"))],
                                 capture_output=True, text=True, check=True, timeout=30).stdout.split()[1]
    assert f"The server's host key is not in {empty}" in error, error
    assert fingerprint in error and f"[127.0.0.1]:{sshd.port} {host_pub[0]} {host_pub[1]}" in error
    assert "GIT_SSH_COMMAND" not in error  # the hint is about the entry

    # A key the server does not know: names the entry and the key file.
    stranger = _keygen(tmp_path / "stranger")
    refused = Credential(url=prefix, ssh_key=str(stranger), known_hosts=str(sshd.known_hosts))
    with pytest.raises(FetchError) as caught:
        GitSource(tmp_path / "m3", timeout=20, credentials=lambda: (refused,)).fetch("hello", url)
    error = str(caught.value)
    assert "Permission denied" in error, error
    assert f"refused the deploy key of the `credentials:` entry for {prefix} ({stranger})" in error

    # No entry: says which would match.
    with pytest.raises(FetchError) as caught:
        GitSource(tmp_path / "m4", timeout=20, credentials=lambda: ()).fetch("hello", url)
    assert f"add a `credentials:` entry whose url is a prefix of this URL (none matches): - {{url: {prefix}" in str(
        caught.value
    )


def test_ssh_key_with_a_passphrase_deploys_and_never_shows(make_gp: Callable[[Flask], GitPlug],
    tmp_path: Path, sshd: SshServer, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.delenv("GIT_SSH_COMMAND", raising=False)
    passphrase = secrets.token_urlsafe(18)
    key = _keygen(tmp_path / "locked", passphrase)
    authorized = tmp_path / "sshd" / "authorized_keys"
    authorized.write_text(authorized.read_text() + key.with_suffix(".pub").read_text())
    monkeypatch.setenv("GITPLUG_T_KEY_PASSPHRASE", passphrase)
    caplog.set_level(logging.DEBUG)
    repo = GitRepo(tmp_path / "hello")
    v1 = write_version(repo, "v1")
    app, gp = make_app(make_gp, tmp_path, sshd.url(repo.path), [
        {"url": f"ssh://{sshd.user}@127.0.0.1:{sshd.port}/", "ssh_key": str(key),
         "passphrase": "${GITPLUG_T_KEY_PASSPHRASE}", "known_hosts": str(sshd.known_hosts)},
    ])
    record = gp.deploy("hello")
    assert record.result == DeployResult.LIVE, record
    assert served(app) == f"200 v1@{v1[:7]}"
    gate_log = Path(record.log_path).read_text()
    assert "GATE-ENV" in gate_log
    assert_nowhere(passphrase, data_dir=tmp_path / "data",
                   texts=[gate_log, json.dumps(gp.status()), caplog.text, repr(gp.config)])


def test_a_wrong_passphrase_names_the_entry(tmp_path: Path, sshd: SshServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GIT_SSH_COMMAND", raising=False)
    passphrase, wrong = secrets.token_urlsafe(18), secrets.token_urlsafe(18)
    key = _keygen(tmp_path / "locked", passphrase)
    authorized = tmp_path / "sshd" / "authorized_keys"
    authorized.write_text(authorized.read_text() + key.with_suffix(".pub").read_text())
    repo = GitRepo(tmp_path / "hello")
    write_version(repo, "v1")
    prefix = f"ssh://{sshd.user}@127.0.0.1:{sshd.port}/"
    entry = Credential(url=prefix, ssh_key=str(key), passphrase=wrong, known_hosts=str(sshd.known_hosts))
    with pytest.raises(FetchError) as caught:
        GitSource(tmp_path / "m", timeout=20, credentials=lambda: (entry,)).fetch("hello", sshd.url(repo.path))
    error = str(caught.value)
    assert f"refused the deploy key of the `credentials:` entry for {prefix} ({key})" in error, error
    assert "check its passphrase" in error
    assert wrong not in error and passphrase not in error


def test_check_config_names_file_and_line_and_needs_no_secret(tmp_path: Path) -> None:
    config = tmp_path / "deploy.yaml"
    config.write_text(
        "credentials:\n"
        "  - url: https://git.example.com/team/\n"
        "    username: deploy\n"
        "    password: ${GITPLUG_T_UNSET_TOKEN}\n"
        "  - url: ssh://git@git.example.com/\n"
        f"    ssh_key: {tmp_path / 'nokey'}\n"
        "plugins: {}\n"
    )
    proc = run_cli("check-config", "-c", config)
    assert proc.returncode == 2, proc.stdout
    assert proc.stderr.startswith(f"Error: {config}:5: credentials.1.known_hosts: missing; expected a "
                                  "known_hosts file"), proc.stderr
    assert f"{config}:6: credentials.1.ssh_key: no file at {tmp_path / 'nokey'}" in proc.stderr
    assert "Traceback" not in proc.stderr

    # Valid but for the unset token: check-config passes, and says serve would refuse.
    (tmp_path / "key").write_text("-----BEGIN OPENSSH PRIVATE KEY-----\n")
    (tmp_path / "known_hosts").write_text("")
    config.write_text(
        "credentials:\n"
        "  - url: https://git.example.com/team/\n"
        "    username: deploy\n"
        "    password: ${GITPLUG_T_UNSET_TOKEN}\n"
        "  - url: ssh://git@git.example.com/\n"
        f"    ssh_key: {tmp_path / 'key'}\n"
        f"    known_hosts: {tmp_path / 'known_hosts'}\n"
        "plugins: {}\n"
    )
    proc = run_cli("check-config", "-c", config)
    assert proc.returncode == 0, proc.stderr
    assert "GITPLUG_T_UNSET_TOKEN is not set" in proc.stderr and "serve` would refuse" in proc.stderr


def test_a_served_server_polls_a_private_repository_and_shows_no_secret(
    tmp_path: Path, private_http: tuple[str, str, GitRepo]
) -> None:
    """``gitplug serve`` (a process of its own): startup deploy and polls fetch with the entry."""
    from serverproc import Server, clean_env, cli_json, expected, wait_for, write_config
    from serverproc import write_version as write_plugin

    base, token, repo = private_http
    v1 = write_plugin(repo, "hello", "v1")
    config = write_config(
        tmp_path / "deploy.yaml", {"hello": {"repo": f"{base}/hello", "poll_interval": 1}},
        credentials=[{"url": f"{base}/", "username": "deploy", "password": "${GITPLUG_T_SERVE_TOKEN}"}],
    )
    assert token not in config.read_text()
    env = clean_env(GITPLUG_T_SERVE_TOKEN=token)
    with Server(config, env=env) as server:
        wait_for(lambda: server.get("/hello/") == expected("hello", "v1", v1), timeout=60, what="v1 served")
        v2 = write_plugin(repo, "hello", "v2")
        wait_for(lambda: server.get("/hello/") == expected("hello", "v2", v2), timeout=60, what="a poll deploying v2")
        status = cli_json("status", "-c", config, env=env)
        history = cli_json("history", "hello", "-c", config, env=env)
        assert [r["trigger"] for r in history][:1] == ["poll"], history
        log = server.log()
    assert "fetching" in log  # the log is the server's, with its fetches
    for text in (log, json.dumps(status), json.dumps(history)):
        assert token not in text
    assert_nowhere(token, data_dir=tmp_path / "data", texts=[])
