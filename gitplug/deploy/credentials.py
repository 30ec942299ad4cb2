"""Credentials for private repositories (README, "Private repositories").

:func:`match` picks the ``credentials:`` entry for a repository URL (the
longest matching prefix, as git's credential matching and Argo CD's
credential templates do); :func:`suggest_prefix` says which entry would match
one that none does. :class:`CredentialSSHVendor` runs ``ssh`` for an entry
with a key: its own key only (``IdentitiesOnly``), host keys checked against
the entry's ``known_hosts`` and nothing else (``StrictHostKeyChecking=yes``),
in a scrubbed environment; a passphrase reaches ssh through an ``SSH_ASKPASS``
helper that reads it from ssh's environment, never from a file or an
argument. :func:`unknown_host_help` turns "Host key verification failed"
into the server's fingerprint and the known_hosts line to add.

Secrets never leave this module except towards the git server: ``repr`` of
a :class:`~gitplug.config.Credential` hides them, and messages name an
entry by its URL prefix only.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import subprocess
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from urllib.parse import quote, unquote, urlsplit, urlunsplit

from dulwich.client import SSHVendor, StrangeHostname, SubprocessWrapper
from dulwich.protocol import DEFAULT_GIT_PROTOCOL_VERSION_FETCH

from ..config import Credential

__all__ = ["CredentialSSHVendor", "match", "suggest_prefix", "unknown_host_help", "ssh_options"]

#: ``Credentials()``: the current ``credentials:`` (read at each use: a reload rotates them).
Credentials = Callable[[], Iterable[Credential]]

_ASKPASS = "#!/bin/sh\n# gitplug: hands ssh the deploy key's passphrase from its own environment\n" \
           "printf '%s\\n' \"$GITPLUG_SSH_PASSPHRASE\"\n"


#: The environment ``git fetch`` over HTTP keeps from the server's: proxies and
#: certificate authorities, as dulwich and curl read them.
HTTP_ENV_PASSED = frozenset({
    "http_proxy", "https_proxy", "all_proxy", "no_proxy", "HTTP_PROXY", "HTTPS_PROXY",
    "ALL_PROXY", "NO_PROXY", "GIT_SSL_CAINFO", "GIT_SSL_CAPATH", "SSL_CERT_FILE",
    "SSL_CERT_DIR", "CURL_CA_BUNDLE",
})

#: Answers git's two prompts for exactly the expected origin, from its own
#: environment (never a file, never an argument); anything else gets nothing.
_GIT_ASKPASS = """#!/bin/sh
# gitplug: answers git's HTTP credential prompts for one origin from git's environment
if [ "$1" = "$GITPLUG_ASK_USERNAME" ]; then printf '%s\\n' "$GITPLUG_GIT_USERNAME"
elif [ "$1" = "$GITPLUG_ASK_PASSWORD" ]; then printf '%s\\n' "$GITPLUG_GIT_PASSWORD"
else exit 1
fi
"""


def _helper(directory: Path, name: str, text: str) -> Path:
    """The executable helper script ``name`` under ``directory``, written once, atomically."""
    helper = directory / name
    if not helper.exists() or helper.read_text() != text:
        directory.mkdir(parents=True, exist_ok=True)
        tmp = helper.with_name(f"{name}.{os.getpid()}.{threading.get_ident()}")
        tmp.write_text(text)
        tmp.chmod(0o700)
        os.replace(tmp, helper)
    return helper


def http_askpass_env(location: str, entry: Credential | None, helper_dir: Path) -> tuple[str, dict[str, str]]:
    """``(URL without any password, environment for git)`` for fetching ``location`` over HTTP.

    The password in the URL itself wins, else ``entry``'s; git asks for them
    through the askpass helper only when the server says 401, and the helper
    answers only the prompts naming the URL's own origin (not a host a
    redirect leads to).
    """
    parts = urlsplit(location)
    username, password = parts.username, parts.password
    if password is None and entry is not None and entry.password is not None:
        username, password = entry.username or "git", entry.password
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port is not None else host
    bare = urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))
    if password is None:
        if parts.username:  # a user without a password: keep it, git asks nothing more
            bare = urlunsplit((parts.scheme, f"{quote(unquote(parts.username), safe='')}@{netloc}",
                               parts.path, parts.query, parts.fragment))
        return bare, {}
    user = unquote(username or "git")
    origin = f"{parts.scheme}://{netloc}"
    helper = _helper(helper_dir, ".gitplug-git-askpass", _GIT_ASKPASS)
    return bare, {
        "GIT_ASKPASS": str(helper),
        "GITPLUG_ASK_USERNAME": f"Username for '{origin}': ",
        "GITPLUG_ASK_PASSWORD": f"Password for '{parts.scheme}://{quote(user, safe='')}@{netloc}': ",
        "GITPLUG_GIT_USERNAME": user,
        "GITPLUG_GIT_PASSWORD": unquote(password),
    }


def _key(url: str) -> str:
    """``url`` in one spelling for prefix matching: scheme and host lower case, no password.

    HTTP(S) drops the user too (an entry gives its own); ssh keeps it
    (``git@``). scp-like ``git@host:team/x`` reads as ``ssh://git@host/team/x``.
    """
    url = url.strip()
    if "://" not in url:
        userhost, _, path = url.partition(":")
        return f"ssh://{userhost.lower()}/{path.lstrip('/')}"
    parts = urlsplit(url)
    scheme = parts.scheme.lower().replace("git+ssh", "ssh")
    host = (parts.hostname or "").lower()
    port = f":{parts.port}" if parts.port is not None else ""
    user = f"{parts.username}@" if parts.username and scheme == "ssh" else ""
    return f"{scheme}://{user}{host}{port}{parts.path}"


def match(credentials: Iterable[Credential], url: str) -> Credential | None:
    """The entry whose ``url`` is the longest prefix of ``url``, or None."""
    target = _key(url)
    best: Credential | None = None
    for entry in credentials:
        prefix = _key(entry.url)
        if target.startswith(prefix) and (best is None or len(prefix) > len(_key(best.url))):
            best = entry
    return best


def suggest_prefix(url: str) -> str:
    """A ``credentials:`` prefix that would match ``url``: its host and first directory."""
    if "://" not in url:
        userhost, _, path = url.partition(":")
        first = path.lstrip("/").split("/", 1)
        return f"{userhost}:{first[0]}/" if len(first) > 1 else f"{userhost}:"
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port is not None:
        host += f":{parts.port}"
    if parts.username and parts.scheme.lower() in ("ssh", "git+ssh"):
        host = f"{parts.username}@{host}"
    first = parts.path.lstrip("/").split("/", 1)
    path = f"/{first[0]}/" if len(first) > 1 else "/"
    return f"{parts.scheme.lower()}://{host}{path}"


def example_entry(url: str) -> str:
    """The ``credentials:`` entry to add for ``url``, as YAML flow mapping text."""
    prefix = suggest_prefix(url)
    if prefix.startswith(("http://", "https://")):
        return f"{{url: {prefix}, username: deploy, password: ${{GIT_TOKEN}}}}"
    return f"{{url: {prefix}, ssh_key: /run/secrets/deploy_key, known_hosts: /etc/gitplug/known_hosts}}"


def ssh_options(entry: Credential) -> list[str]:
    """The ssh options for ``entry``, placed before gitplug's own (ssh keeps the first value)."""
    options = ["-F", os.devnull]  # no ~/.ssh/config: this entry says everything
    if entry.ssh_key:
        options += ["-i", entry.ssh_key, "-o", "IdentitiesOnly=yes", "-o", "IdentityAgent=none"]
    options += ["-o", f"UserKnownHostsFile={entry.known_hosts or os.devnull}",
                "-o", "GlobalKnownHostsFile=/dev/null", "-o", "StrictHostKeyChecking=yes",
                "-o", "PasswordAuthentication=no", "-o", "KbdInteractiveAuthentication=no"]
    if entry.passphrase:
        # BatchMode would forbid asking for the passphrase even through SSH_ASKPASS;
        # with host keys checked strictly and password logins off, nothing else asks.
        options += ["-o", "BatchMode=no"]
    return options


class CredentialSSHVendor(SSHVendor):
    """dulwich's ssh transport for one ``credentials:`` entry (see the module docstring).

    ``ssh_command`` (from :func:`gitplug.deploy.gitsource.ssh_command`) is
    split, never run by a shell; ssh runs in a scrubbed environment
    (``PATH``, ``HOME``, ``LC_ALL``), plus the askpass helper for a passphrase.
    """

    def __init__(self, entry: Credential, helper_dir: Path) -> None:
        self.entry = entry
        self.helper_dir = helper_dir

    def environment(self) -> dict[str, str]:
        """The environment ssh runs in for this entry (also under ``git fetch``)."""
        return self._env()

    def _env(self) -> dict[str, str]:
        env = {"PATH": os.environ.get("PATH", os.defpath), "LC_ALL": "C",
               "HOME": str(self.helper_dir)}
        if self.entry.passphrase:
            helper = _helper(self.helper_dir, ".gitplug-askpass", _ASKPASS)
            env.update(SSH_ASKPASS=str(helper), SSH_ASKPASS_REQUIRE="force", DISPLAY=":0",
                       GITPLUG_SSH_PASSPHRASE=self.entry.passphrase)
        return env

    def run_command(self, host: str, command: bytes, username: str | None = None,
                    port: int | None = None, password: str | None = None,
                    key_filename: str | None = None, ssh_command: str | None = None,
                    protocol_version: int | None = None) -> SubprocessWrapper:
        """Start ``ssh [options] [user@]host command``, as dulwich's SubprocessSSHVendor does."""
        args = [*shlex.split(ssh_command or "ssh"), "-x"]
        if port:
            args += ["-p", str(port)]
        if protocol_version is None:
            protocol_version = DEFAULT_GIT_PROTOCOL_VERSION_FETCH
        if protocol_version > 0:
            args += ["-o", f"SetEnv GIT_PROTOCOL=version={protocol_version}"]
        target = f"{username}@{host}" if username else host
        if target.startswith("-"):
            raise StrangeHostname(hostname=target)
        proc = subprocess.Popen([*args, target, os.fsdecode(command)], bufsize=0,
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, env=self._env(),
                                start_new_session=True, close_fds=True)
        return SubprocessWrapper(proc)


def unknown_host_help(url: str, entry: Credential, timeout: float) -> str:
    """What to add to ``entry.known_hosts`` for the host of ``url``: fingerprint and line.

    Asks the server for its host keys (``ssh-keyscan``: the same server the
    fetch just reached). Empty when it cannot say.
    """
    key = _key(url)
    parts = urlsplit(key)
    host, port = parts.hostname or "", parts.port
    if not host:
        return ""
    argv = ["ssh-keyscan", "-T", f"{max(1, int(timeout))}", *(["-p", str(port)] if port else []),
            "-t", "ed25519,ecdsa,rsa", "--", host]
    try:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL, start_new_session=True, close_fds=True,
                                env={"PATH": os.environ.get("PATH", os.defpath), "LC_ALL": "C"})
    except OSError:
        return ""
    try:
        out, _ = proc.communicate(timeout=max(2.0, timeout) + 2)
    except subprocess.TimeoutExpired:
        out = b""
    finally:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
    lines = [line for line in out.decode("utf-8", "replace").splitlines()
             if line.strip() and not line.startswith("#")]
    if not lines:
        return ""
    line = lines[0]
    try:
        printed = subprocess.run(["ssh-keygen", "-l", "-f", "-"], input=line.encode(),
                                 capture_output=True, timeout=max(2.0, timeout), check=False,
                                 env={"PATH": os.environ.get("PATH", os.defpath), "LC_ALL": "C"})
        fields = printed.stdout.decode().split()
        fingerprint = f"{fields[-1].strip('()')} {fields[1]}" if len(fields) >= 2 else ""
    except (OSError, subprocess.TimeoutExpired):
        fingerprint = ""
    return (f" The server's host key is {fingerprint or 'unknown'}: if that is the fingerprint "
            f"your git server publishes, add this line to {entry.known_hosts}: {line}")
