"""A real OpenSSH server on 127.0.0.1 for tests, serving git repositories.

::

    from sshd import SshServer, start_sshd       # tests/ is on sys.path under pytest

    with start_sshd(tmp_path / "sshd") as server:      # skips when sshd is not installed
        url = server.url(repo_path)                    # ssh://root@127.0.0.1:PORT/abs/path
        env = server.git_ssh_command()                 # "ssh -i KEY -o UserKnownHostsFile=..."

Everything lives in the directory given: a fresh host key, a client (deploy)
key authorised for the current user, a ``known_hosts`` holding the host key
and an sshd configuration of its own (``-f``), so the machine's sshd setup is
neither read nor changed. The one exception: sshd refuses to start without
its privilege-separation directory ``/run/sshd``, which Debian's service
creates at boot; it is created here if missing (root only).

The server runs in the foreground (``-D -e``) and is stopped on every path
out of the ``with`` block. Readiness is its own "Server listening" line, not
a sleep. When ``sshd`` is not installed the test is skipped, except under
``CI=true``, where it fails: CI installs ``openssh-server`` (``.ci/run``).
"""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import socket
import subprocess
import threading
import typing as t
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

SSHD_CANDIDATES = ("/usr/sbin/sshd", "/usr/local/sbin/sshd")


def find_sshd() -> str | None:
    """The sshd binary, or None."""
    for candidate in SSHD_CANDIDATES:
        if os.access(candidate, os.X_OK):
            return candidate
    return shutil.which("sshd")


def require_sshd() -> str:
    """The sshd binary; skips the test when missing (fails under CI=true)."""
    sshd = find_sshd()
    missing = [tool for tool in ("ssh", "ssh-keygen", "git-upload-pack") if shutil.which(tool) is None]
    if sshd is None or missing:
        what = "sshd" if sshd is None else ", ".join(missing)
        message = f"{what} not installed: `apt-get install -y openssh-server git` to run the ssh tests"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return sshd


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _keygen(path: Path) -> None:
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "gitplug-test", "-f", str(path)],
        check=True,
        timeout=30,
        stdin=subprocess.DEVNULL,
    )


def _drain(stream: t.IO[str], lines: list[str], ready: threading.Event) -> None:
    """Collect sshd's log; ``ready`` is set once it listens (or has ended)."""
    for line in stream:
        lines.append(line.rstrip("\n"))
        if "Server listening on" in line:
            ready.set()
    ready.set()


@dataclass
class SshServer:
    """A running sshd: where it listens and the files a client needs."""

    port: int
    user: str
    client_key: Path
    known_hosts: Path
    host_key: Path
    log: list[str]

    def url(self, repo: Path) -> str:
        """The ssh:// URL of a repository directory on this machine."""
        return f"ssh://{self.user}@127.0.0.1:{self.port}{Path(repo).resolve()}"

    def git_ssh_command(self, known_hosts: Path | None = None) -> str:
        """A ``GIT_SSH_COMMAND`` value that logs in with the deploy key."""
        return shlex.join(
            [
                "ssh",
                "-i",
                str(self.client_key),
                "-o",
                f"UserKnownHostsFile={known_hosts or self.known_hosts}",
                "-o",
                "GlobalKnownHostsFile=/dev/null",
                "-o",
                "IdentitiesOnly=yes",
                "-F",
                "/dev/null",
            ]
        )


@contextlib.contextmanager
def start_sshd(root: Path) -> Iterator[SshServer]:
    """Start sshd on a free 127.0.0.1 port with keys and config under ``root``."""
    sshd = require_sshd()
    root.mkdir(parents=True, exist_ok=True)
    os.chmod(root, 0o700)
    host_key, client_key = root / "host_key", root / "client_key"
    _keygen(host_key)
    _keygen(client_key)
    authorized = root / "authorized_keys"
    authorized.write_text(client_key.with_suffix(".pub").read_text())
    authorized.chmod(0o600)
    if os.geteuid() == 0:
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
    user = os.environ.get("USER") or subprocess.run(
        ["id", "-un"], capture_output=True, text=True, check=True, timeout=10
    ).stdout.strip()
    log: list[str] = []
    for _attempt in range(5):  # a free port can be taken between the probe and sshd's bind
        port = _free_port()
        config = root / "sshd_config"
        config.write_text(
            "\n".join(
                [
                    f"Port {port}",
                    "ListenAddress 127.0.0.1",
                    f"HostKey {host_key}",
                    f"AuthorizedKeysFile {authorized}",
                    f"PidFile {root / 'sshd.pid'}",
                    "PermitRootLogin prohibit-password",
                    "PubkeyAuthentication yes",
                    "PasswordAuthentication no",
                    "KbdInteractiveAuthentication no",
                    "UsePAM no",
                    "StrictModes no",
                    "AcceptEnv GIT_PROTOCOL",
                    f"SetEnv PATH={os.environ.get('PATH', '/usr/bin:/bin')}",
                    "LogLevel VERBOSE",
                    "",
                ]
            )
        )
        process = subprocess.Popen(
            [sshd, "-D", "-e", "-f", str(config)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        ready = threading.Event()
        reader = threading.Thread(target=_drain, args=(process.stderr, log, ready), name="sshd-log", daemon=True)
        reader.start()
        try:
            ready.wait(timeout=30)
            if process.poll() is None and any("Server listening on" in line for line in log):
                known_hosts = root / "known_hosts"
                host_pub = host_key.with_suffix(".pub").read_text().split()
                known_hosts.write_text(f"[127.0.0.1]:{port} {host_pub[0]} {host_pub[1]}\n")
                yield SshServer(port, user, client_key, known_hosts, host_key, log)
                return
            if not any("Address already in use" in line for line in log):
                raise RuntimeError("sshd did not start:\n" + "\n".join(log))
        finally:
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait(timeout=10)
            reader.join(timeout=10)
            if process.stderr is not None:
                process.stderr.close()
    raise RuntimeError("sshd found no free port in 5 attempts:\n" + "\n".join(log))

