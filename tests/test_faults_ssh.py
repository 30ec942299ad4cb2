"""SSH fetches against a real OpenSSH server on 127.0.0.1 (tests/sshd.py).

``GIT_SSH_COMMAND`` is honoured by gitplug itself (dulwich's client does not
read it), always with gitplug's batch mode and deadlines appended: a deploy
key given with ``-i`` fetches; an unknown host key fails at once with ssh's
own words and what to do, never a prompt or a hang; a server that accepts
the connection and never speaks is given up on after the timeout.
"""

from __future__ import annotations

import shlex
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from gitplug.deploy.gitsource import GitSource, ssh_command
from gitplug.errors import FetchError
from gitrepo import GitRepo
from sshd import SshServer, start_sshd


@pytest.fixture
def sshd(tmp_path: Path) -> Iterator[SshServer]:
    with start_sshd(tmp_path / "sshd") as server:
        yield server


@pytest.fixture
def repo(tmp_path: Path) -> tuple[Path, str]:
    git = GitRepo(tmp_path / "hello")
    git.write("hello/__init__.py", "VALUE = 1\n")
    return git.path, git.commit("first")


def _fetch_in_thread(source: GitSource, url: str, *, limit: float = 60.0) -> BaseException | None:
    """Fetch in a thread; fail the test if it has not returned within ``limit`` (a hang)."""
    outcome: list[BaseException | None] = []

    def run() -> None:
        try:
            source.fetch("hello", url)
            outcome.append(None)
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            outcome.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(limit)
    assert not thread.is_alive(), f"the fetch of {url} hung for {limit} s (a prompt or no deadline)"
    return outcome[0]


def test_git_ssh_command_with_a_deploy_key_fetches(
    sshd: SshServer, repo: tuple[Path, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path, sha = repo
    monkeypatch.setenv("GIT_SSH_COMMAND", sshd.git_ssh_command())
    source = GitSource(tmp_path / "mirrors", timeout=20)
    url = sshd.url(path)
    assert _fetch_in_thread(source, url) is None
    assert source.resolve("hello", url, "main").commit == sha
    assert any("Accepted publickey" in line for line in sshd.log), sshd.log


def test_an_unknown_host_key_fails_at_once_with_what_to_do(
    sshd: SshServer, repo: tuple[Path, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    empty = tmp_path / "empty_known_hosts"
    empty.write_text("")
    # StrictHostKeyChecking=ask is ssh's default: only batch mode stops the prompt.
    monkeypatch.setenv("GIT_SSH_COMMAND", sshd.git_ssh_command(known_hosts=empty) + " -o StrictHostKeyChecking=ask")
    source = GitSource(tmp_path / "mirrors", timeout=20)
    error = _fetch_in_thread(source, sshd.url(repo[0]))
    assert isinstance(error, FetchError), error
    text = str(error)
    assert text.startswith(f"plugin 'hello': could not fetch {sshd.url(repo[0])}: the remote end hung up; ssh said:")
    assert "Host key verification failed." in text
    assert "point -o UserKnownHostsFile=... in GIT_SSH_COMMAND at a file that has it" in text
    assert not any("Accepted publickey" in line for line in sshd.log)


def test_a_server_that_never_speaks_is_given_up_on(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """ConnectTimeout is appended to GIT_SSH_COMMAND: the handshake has a deadline."""
    silent = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        silent.bind(("127.0.0.1", 0))
        silent.listen(4)  # the kernel completes the TCP handshake; nothing ever answers
        port = silent.getsockname()[1]
        monkeypatch.setenv("GIT_SSH_COMMAND", "ssh -F /dev/null -o UserKnownHostsFile=/dev/null")
        source = GitSource(tmp_path / "mirrors", timeout=2)
        error = _fetch_in_thread(source, f"ssh://git@127.0.0.1:{port}/hello.git", limit=60)
        assert isinstance(error, FetchError), error
        assert "ssh said: Connection timed out during banner exchange" in str(error), error
    finally:
        silent.close()


def test_the_ssh_command_keeps_the_users_options_and_appends_gitplugs() -> None:
    ours = ["-o", "BatchMode=yes", "-o", "ConnectTimeout=10", "-o", "ServerAliveInterval=3", "-o", "ServerAliveCountMax=3"]
    env = {"GIT_SSH_COMMAND": "ssh -i '/keys/deploy key' -o UserKnownHostsFile=/etc/kh -p 2222"}
    assert shlex.split(ssh_command(10, env)) == [
        "ssh", "-i", "/keys/deploy key", "-o", "UserKnownHostsFile=/etc/kh", "-p", "2222", *ours
    ]
    # GIT_SSH is a program, not a command line; GIT_SSH_COMMAND wins over it, as in git.
    assert shlex.split(ssh_command(10, {"GIT_SSH": "/opt/my ssh"})) == ["/opt/my ssh", *ours]
    assert shlex.split(ssh_command(10, {"GIT_SSH": "/opt/x", **env}))[:3] == ["ssh", "-i", "/keys/deploy key"]
    assert shlex.split(ssh_command(10, {"GIT_SSH_COMMAND": "  "})) == ["ssh", *ours]
    # Metacharacters stay arguments: nothing runs through a shell.
    assert shlex.split(ssh_command(10, {"GIT_SSH_COMMAND": "ssh -o 'ProxyCommand=x; rm -rf /'"}))[:3] == [
        "ssh", "-o", "ProxyCommand=x; rm -rf /"
    ]
    with pytest.raises(ValueError, match=r"GIT_SSH_COMMAND cannot be split into arguments \(No closing quotation\)"):
        ssh_command(10, {"GIT_SSH_COMMAND": "ssh -i 'unclosed"})


def test_an_unsplittable_git_ssh_command_is_a_clear_fetch_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GIT_SSH_COMMAND", "ssh -i 'unclosed")
    with pytest.raises(FetchError, match=r"^plugin 'hello': GIT_SSH_COMMAND cannot be split into arguments .*"
                       r"Fix its quoting, or unset it to use plain ssh\.$"):
        GitSource(tmp_path / "mirrors", timeout=5).fetch("hello", "ssh://git@127.0.0.1:1/x.git")
