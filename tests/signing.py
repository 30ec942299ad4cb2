"""Signing keys and signed commits for tests: real ``ssh-keygen`` and ``gpg`` keys, real ``git``.

::

    from signing import GitWorkTree, SshKey, GpgKey   # tests/ is on sys.path under pytest

    alice = SshKey.make(tmp_path / "alice", "alice@example.com")
    repo = GitWorkTree.init(tmp_path / "repo")
    repo.write("hello/__init__.py", "...")
    sha = repo.commit("v1", sign=alice)              # git commit -S with gpg.format=ssh
    repo.tag("v1", sign=alice)                       # git tag -s
    (tmp_path / "allowed").write_text(alice.allowed_line())

    with GpgKey.make(tmp_path / "gpg", "Rel <rel@example.com>") as rel:   # own GNUPGHOME
        repo.commit("v2", sign=rel); rel.public_file  # an armored public key
        rel.revoke()                                 # for good; public_file exported again

    # Made two days ago, expired yesterday: this GNUPGHOME's gpg keeps a clock
    # in the key's lifetime (faked-system-time), so git can still sign with it.
    with GpgKey.make(tmp_path / "old", "Old <old@example.com>", created=time.time() - 2 * DAY,
                     expires=DAY) as old:
        repo.commit("v3", sign=old)
        old.set_expiry("never")                      # public_file exported again

Every git and gpg command runs with an argument list, a deadline and an
environment of its own (no user or system git configuration). A GpgKey
stops the gpg-agent its GNUPGHOME started when its block ends. The tools
are required: missing, the test is skipped with what to install, except
under ``CI=true``, where it fails (``.ci/run`` installs them).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

_PACKAGES = {"git": "git", "ssh-keygen": "openssh-client", "gpg": "gnupg", "gpgconf": "gnupg"}
DAY = 24 * 3600


def require_tools(*tools: str) -> None:
    """Skip the test (fail it under CI=true) unless every tool is on PATH."""
    missing = [tool for tool in tools if shutil.which(tool) is None]
    if missing:
        packages = " ".join(sorted({_PACKAGES.get(tool, tool) for tool in missing}))
        message = f"{', '.join(missing)} not installed: `apt-get install -y {packages}` to run this test"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)


def _run(argv: list[str], *, cwd: Path | None = None, env: dict[str, str] | None = None,
         input: bytes | None = None) -> str:
    done = subprocess.run(argv, cwd=cwd, env=env, input=input, capture_output=True, timeout=60,
                          check=False)
    if done.returncode != 0:
        raise AssertionError(f"{argv!r} failed ({done.returncode}): {done.stderr.decode(errors='replace')}")
    return done.stdout.decode()


@dataclass
class SshKey:
    """An ed25519 key pair made by ssh-keygen (no passphrase)."""

    path: Path
    principal: str

    @classmethod
    def make(cls, path: Path, principal: str) -> SshKey:
        require_tools("ssh-keygen")
        path.parent.mkdir(parents=True, exist_ok=True)
        _run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", principal, "-f", str(path)])
        return cls(path, principal)

    @property
    def public(self) -> str:
        return self.path.with_suffix(".pub").read_text().strip()

    @property
    def fingerprint(self) -> str:
        """``SHA256:...`` as ssh-keygen and git print it."""
        return _run(["ssh-keygen", "-l", "-f", str(self.path.with_suffix(".pub"))]).split()[1]

    def allowed_line(self) -> str:
        """This key's line in an allowed_signers file."""
        return f"{self.principal} {self.public}\n"

    def git_config(self) -> list[str]:
        return ["-c", "gpg.format=ssh", "-c", f"user.signingkey={self.path}"]


@dataclass
class GpgKey:
    """An OpenPGP signing key in a GNUPGHOME of its own."""

    home: Path
    uid: str
    fingerprint: str
    public_file: Path

    @classmethod
    @contextlib.contextmanager
    def make(cls, home: Path, uid: str, *, created: float | None = None,
             expires: int | None = None) -> Iterator[GpgKey]:
        """A new key; ``created`` (epoch seconds, in the past) and ``expires`` (seconds after that).

        With ``created``, this GNUPGHOME's gpg runs with its clock set back to
        that time (``faked-system-time`` in its gpg.conf, so git's gpg too):
        what the key signs is signed then, while it was valid, and a verifier
        on the real clock judges the key as it is now.
        """
        require_tools("gpg", "gpgconf")
        home.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(home, 0o700)
        env = cls._env_for(home)
        if created is not None:
            (home / "gpg.conf").write_text(f"faked-system-time {int(created)}\n")
        try:
            _run(["gpg", "--batch", "--quiet", "--passphrase", "", "--quick-gen-key", uid,
                  "ed25519", "sign", "never" if expires is None else f"seconds={expires}"], env=env)
            listing = _run(["gpg", "--batch", "--with-colons", "--list-keys", uid], env=env)
            fingerprint = next(line.split(":")[9] for line in listing.splitlines() if line.startswith("fpr:"))
            key = cls(home, uid, fingerprint, home.parent / f"{home.name}.asc")
            key._export()
            yield key
        finally:
            subprocess.run(["gpgconf", "--kill", "all"], env=env, capture_output=True, timeout=30, check=False)

    def _export(self) -> None:
        self.public_file.write_text(_run(["gpg", "--batch", "--armor", "--export", self.fingerprint],
                                         env=self.env))

    def set_expiry(self, expire: str) -> None:
        """``gpg --quick-set-expire`` (``never``, ``1y``, ...; from gpg's clock); public_file exported again.

        Takes about a second: gpg waits until its new self-signature is newer than the last.
        """
        _run(["gpg", "--batch", "--quiet", "--pinentry-mode", "loopback", "--passphrase", "",
              "--quick-set-expire", self.fingerprint, "0" if expire == "never" else expire], env=self.env)
        self._export()

    def revoke(self) -> None:
        """Revoke the key for good; public_file exported again, the revocation in it.

        gpg wrote a revocation certificate when it made the key
        (``openpgp-revocs.d/FPR.rev``), its armor line prefixed with ``:`` so
        that it cannot be imported by accident: importing it without the ``:``
        revokes the key, with no prompt.
        """
        certificate = (self.home / "openpgp-revocs.d" / f"{self.fingerprint}.rev").read_text()
        _run(["gpg", "--batch", "--quiet", "--import"], env=self.env,
             input=certificate.replace(":-----BEGIN PGP", "-----BEGIN PGP").encode())
        self._export()

    @staticmethod
    def _env_for(home: Path) -> dict[str, str]:
        return {"PATH": os.environ.get("PATH", os.defpath), "GNUPGHOME": str(home), "HOME": str(home),
                "LC_ALL": "C"}

    @property
    def env(self) -> dict[str, str]:
        return self._env_for(self.home)

    def git_config(self) -> list[str]:
        return ["-c", "gpg.format=openpgp", "-c", f"user.signingkey={self.fingerprint}"]


Signer = SshKey | GpgKey


class GitWorkTree:
    """A non-bare repository driven by the ``git`` command (signing needs it), branch ``main``."""

    def __init__(self, path: Path) -> None:
        self.path = path

    @classmethod
    def init(cls, path: Path) -> GitWorkTree:
        require_tools("git")
        path.mkdir(parents=True, exist_ok=True)
        tree = cls(path)
        tree.git("init", "-q", "-b", "main")
        return tree

    @property
    def url(self) -> str:
        return self.path.resolve().as_uri()

    def env(self, signer: Signer | None = None) -> dict[str, str]:
        env = {"PATH": os.environ.get("PATH", os.defpath), "HOME": str(self.path),
               "GIT_CONFIG_NOSYSTEM": "1", "GIT_CONFIG_GLOBAL": os.devnull, "LC_ALL": "C",
               "GIT_AUTHOR_NAME": "Ada", "GIT_AUTHOR_EMAIL": "ada@example.com",
               "GIT_COMMITTER_NAME": "Ada", "GIT_COMMITTER_EMAIL": "ada@example.com"}
        if isinstance(signer, GpgKey):
            env["GNUPGHOME"] = str(signer.home)
        return env

    def git(self, *args: str, signer: Signer | None = None) -> str:
        config = signer.git_config() if signer is not None else []
        return _run(["git", *config, *args], cwd=self.path, env=self.env(signer)).strip()

    def write(self, relpath: str, content: str) -> None:
        target = self.path / relpath
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(textwrap.dedent(content).lstrip("\n"))

    def commit(self, message: str, *, sign: Signer | None = None) -> str:
        """Commit everything in the work tree (signed with ``sign``); the new sha."""
        self.git("add", "-A")
        self.git("commit", "-q", "--allow-empty", *(["-S"] if sign else []), "-m", message, signer=sign)
        return self.git("rev-parse", "HEAD")

    def tag(self, name: str, *, sign: Signer | None = None, annotated: bool = True) -> None:
        if sign is not None:
            self.git("tag", "-s", "-m", name, name, signer=sign)
        elif annotated:
            self.git("tag", "-a", "-m", name, name)
        else:
            self.git("tag", name)

    def forge(self, signed_sha: str, new_message: str) -> str:
        """A commit whose signature was copied from ``signed_sha`` onto another message; its sha.

        What an attacker gets by editing a signed commit: the signature no
        longer matches. The branch is moved to it.
        """
        raw = self.git("cat-file", "commit", signed_sha) + "\n"
        head, _, message = raw.partition("\n\n")
        forged = f"{head}\n\n{new_message}\n".encode()
        sha = _run(["git", "hash-object", "-t", "commit", "-w", "--stdin"], cwd=self.path,
                   env=self.env(), input=forged).strip()
        self.git("update-ref", "refs/heads/main", sha)
        self.git("reset", "-q", "--hard", sha)
        return sha
