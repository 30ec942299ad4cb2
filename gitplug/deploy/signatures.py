"""The ``signature`` stage: deploy only commits (or tags) signed by an allowed key.

README, "Signed commits". :func:`check_signature` asks the ``git`` command
itself (``git verify-commit`` / ``git verify-tag`` on the plugin's mirror) so
that what counts as a valid signature is exactly what git says:

- SSH signatures are checked against the ``allowed_signers`` file, handed to
  git as ``-c gpg.ssh.allowedSignersFile=PATH`` (git runs ``ssh-keygen -Y``).
  Without one, ``/dev/null``: every SSH signature is untrusted.
- OpenPGP signatures are checked against a keyring made for this one check
  in a temporary ``GNUPGHOME`` holding only the ``gpg_keys`` (imported with
  ``gpg --import``), so neither the server's own keyring nor its trust
  database counts, and no ``gpg-agent`` is started (``no-autostart``).

Every command gets an argument list, a deadline, its own process group
(killed whole on the deadline) and gitplug's scrubbed git environment. A
refusal raises :class:`~gitplug.errors.SignatureRefused` naming the signing
key's fingerprint when there is a signature, and what to do.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..config import VerifyConfig
from ..errors import SignatureRefused
from .gitsource import GitSource, ResolvedRef

__all__ = ["Verdict", "check_signature"]

_SSH_GOOD = re.compile(r'Good "git" signature for (?P<who>\S+) with (?P<type>\S+) key (?P<fpr>\S+)')
_SSH_UNTRUSTED = re.compile(r'Good "git" signature with (?P<type>\S+) key (?P<fpr>\S+)')
_NO_SIGNERS_FILE = "gpg.ssh.allowedSignersFile needs to be configured"


@dataclass(frozen=True)
class Verdict:
    """A signature that passed: who signed what."""

    signer: str  #: ``alice@example.com (ssh ED25519 SHA256:...)`` or ``Alice <a@x> (gpg FPR)``
    what: str  #: ``commit 1a2b3c4d5e6f`` or ``tag v1.2.0``

    def __str__(self) -> str:
        return f"{self.what} signed by {self.signer}"


@dataclass(frozen=True)
class _Outcome:
    ok: bool
    signer: str | None  #: who signed, when ``ok``
    fingerprint: str | None  #: the key that signed, when there is a signature
    why: str  #: what is wrong, when not ``ok``
    #: ``expired`` / ``revoked``: a key of ``gpg_keys`` that signed but is no longer valid
    key_state: str | None = None


def check_signature(git: GitSource, plugin: str, url: str, resolved: ResolvedRef,
                    verify: VerifyConfig, *, timeout: float = 60.0) -> Verdict:
    """Check the signature ``verify`` asks for on ``resolved`` in the mirror of ``url``.

    Mode ``head``: the commit must carry a good signature by an allowed key.
    Mode ``tag``: the annotated tag the ref names (when it is a tag), else any
    tag of the mirror naming the commit, must. Returns the verdict; raises
    SignatureRefused (missing, bad or untrusted signature, or a tool that
    failed) with the signer's fingerprint when there is one.
    """
    short = resolved.commit[:12]
    if git.git_command is None:
        raise SignatureRefused(f"plugin {plugin!r}: verifying signatures needs the `git` "
                               "command: install it (Debian: apt-get install git).",
                               plugin=plugin, commit=resolved.commit)
    with _keyring(verify, timeout, plugin, resolved.commit) as gnupghome:
        run = _Runner(git, url, verify, gnupghome, timeout, plugin, resolved.commit)
        if verify.mode == "head":
            outcome = run.verify("verify-commit", resolved.commit)
            if outcome.ok:
                return Verdict(str(outcome.signer), f"commit {short}")
            raise _refused(plugin, resolved.commit, f"commit {short}", outcome, verify,
                           "Sign the commit (git commit -S, with a key listed in verify) and "
                           "push it.")
        tags = git.tags_naming(plugin, url, resolved.commit)
        if resolved.kind == "tag":
            name = resolved.ref.removeprefix("refs/tags/")
            tags = {name: tags[name]} if name in tags else {}
        if not tags:
            raise SignatureRefused(
                f"plugin {plugin!r}: verify mode tag: no tag names commit {short}, so there is "
                "no tag signature to check. Tag it with a signed annotated tag (git tag -s "
                "v1.2.3 && git push --tags) and deploy that tag.",
                plugin=plugin, commit=resolved.commit)
        refused: list[tuple[str, _Outcome]] = []
        for name, obj in sorted(tags.items()):
            if not obj.tag:
                refused.append((name, _Outcome(False, None, None, "a lightweight tag carries "
                                               "no signature")))
                continue
            outcome = run.verify("verify-tag", obj.sha)
            if outcome.ok:
                return Verdict(str(outcome.signer), f"tag {name}")
            refused.append((name, outcome))
        name, worst = next(((n, o) for n, o in refused if o.fingerprint), refused[0])
        others = f" (and {len(refused) - 1} more tag(s) of it)" if len(refused) > 1 else ""
        raise _refused(plugin, resolved.commit, f"tag {name} of commit {short}{others}", worst,
                       verify, "Make a signed annotated tag with an allowed key (git tag -s "
                       "NAME) and push it.")


def _refused(plugin: str, commit: str, what: str, outcome: _Outcome, verify: VerifyConfig,
             todo: str) -> SignatureRefused:
    todo_lower = f"{todo[0].lower()}{todo[1:]}"
    if outcome.key_state == "expired":
        # The key is among gpg_keys already (gpg judges it as it is now, not when it signed).
        todo = (f"If the key is still trusted, extend it (gpg --quick-set-expire "
                f"{outcome.fingerprint} 1y) and export it again into verify.gpg_keys (gpg --armor "
                f"--export {outcome.fingerprint} > key.asc); else {todo_lower}")
    elif outcome.key_state == "revoked":
        todo = f"A revoked key is refused whatever it signed: {todo_lower}"
    elif outcome.fingerprint:
        where = _key_files(verify, outcome.fingerprint)
        todo = f"If you trust that key, add it to {where}; else {todo_lower}"
    return SignatureRefused(f"plugin {plugin!r}: {what}: {outcome.why}. {todo} Nothing was "
                            "deployed; the live release keeps serving.",
                            plugin=plugin, commit=commit, signer=outcome.fingerprint)


def _key_files(verify: VerifyConfig, fingerprint: str) -> str:
    if fingerprint.startswith("SHA256:"):
        return (f"allowed_signers ({verify.allowed_signers})" if verify.allowed_signers
                else "a verify.allowed_signers file")
    return "verify.gpg_keys (gpg --armor --export KEYID > key.asc)"


class _Runner:
    """Runs ``git verify-commit`` / ``verify-tag`` on one mirror and reads what it says."""

    def __init__(self, git: GitSource, url: str, verify: VerifyConfig, gnupghome: str,
                 timeout: float, plugin: str, commit: str) -> None:
        self.git, self.url, self.verify_config = git, url, verify
        self.gnupghome, self.timeout, self.plugin, self.commit = gnupghome, timeout, plugin, commit

    def verify(self, command: str, sha: str) -> _Outcome:
        assert self.git.git_command is not None
        signers = self.verify_config.allowed_signers or os.devnull
        argv = [self.git.git_command, "--git-dir", str(self.git.mirror_path(self.url)),
                "-c", f"gpg.ssh.allowedSignersFile={signers}", "-c", "gpg.program=gpg",
                "-c", "gpg.ssh.program=ssh-keygen", command, "--raw", sha]
        env = dict(self.git.command_env(), GNUPGHOME=self.gnupghome)
        code, out = _run(argv, env, self.timeout, self.plugin, self.commit, f"git {command}")
        outcome = _read_outcome(code, out)
        if outcome.fingerprint and re.fullmatch(r"[0-9A-F]{16}", outcome.fingerprint):
            # gpg names a bad signature's key by its id only: show the fingerprint.
            fpr = self._fingerprint_of(outcome.fingerprint)
            if fpr:
                outcome = _Outcome(False, None, fpr, outcome.why.replace(outcome.fingerprint, fpr))
        return outcome

    def _fingerprint_of(self, key_id: str) -> str | None:
        """The fingerprint of ``key_id`` in the temporary keyring, if it holds that key."""
        argv = ["gpg", "--batch", "--no-autostart", "--with-colons", "--homedir", self.gnupghome,
                "--list-keys", key_id]
        code, out = _run(argv, {"PATH": os.environ.get("PATH", os.defpath), "LC_ALL": "C",
                                "GNUPGHOME": self.gnupghome, "HOME": self.gnupghome},
                         self.timeout, self.plugin, self.commit, "gpg --list-keys")
        fprs = [line.split(":")[9] for line in out.splitlines() if line.startswith("fpr:")]
        return next((f for f in fprs if f.endswith(key_id)), None) if code == 0 else None


def _read_outcome(code: int, out: str) -> _Outcome:
    """What ``git verify-* --raw`` printed (ssh-keygen's words, or gpg's status lines)."""
    status = {}
    for line in out.splitlines():
        if line.startswith("[GNUPG:] "):
            word, _, rest = line[9:].partition(" ")
            status.setdefault(word, rest)
    if "GNUPG" in out or status:
        fpr = status.get("VALIDSIG", "").split(" ", 1)[0] or None
        if fpr is None:
            # ERRSIG: keyid, algo, hash, class, time, rc, fingerprint (gpg >= 2.2.7).
            fields = status.get("ERRSIG", "").split()
            fpr = fields[6] if len(fields) > 6 and fields[6] != "-" else (
                fields[0] if fields else None)
        if code == 0 and "GOODSIG" in status and "VALIDSIG" in status:
            who = status["GOODSIG"].split(" ", 1)[-1]
            return _Outcome(True, f"{who} (gpg {fpr})", fpr, "")
        if "BADSIG" in status:
            return _Outcome(False, None, fpr or status["BADSIG"].split()[0],
                            f"the OpenPGP signature does not match the content (forged or "
                            f"altered; key {fpr or status['BADSIG'].split()[0]})")
        if "EXPKEYSIG" in status or "REVKEYSIG" in status:
            word = "EXPKEYSIG" if "EXPKEYSIG" in status else "REVKEYSIG"
            what = "expired" if word == "EXPKEYSIG" else "revoked"
            return _Outcome(False, None, fpr, f"signed with OpenPGP key {fpr}, which is {what}",
                            key_state=what)
        if "NO_PUBKEY" in status or "ERRSIG" in status:
            return _Outcome(False, None, fpr, f"signed with OpenPGP key {fpr}, which is not "
                                              "among verify.gpg_keys")
        return _Outcome(False, None, fpr, "the OpenPGP signature is not valid"
                        + (f" (key {fpr})" if fpr else ""))
    good = _SSH_GOOD.search(out)
    if code == 0 and good:
        return _Outcome(True, f"{good['who']} (ssh {good['type']} {good['fpr']})", good["fpr"], "")
    untrusted = _SSH_UNTRUSTED.search(out)
    if untrusted:
        return _Outcome(False, None, untrusted["fpr"], f"signed with SSH key {untrusted['type']} "
                        f"{untrusted['fpr']}, which is not in allowed_signers")
    if _NO_SIGNERS_FILE in out:
        return _Outcome(False, None, None, "signed with an SSH key, but verify gives no "
                                           "allowed_signers file to check SSH signatures against")
    if "incorrect signature" in out or "Could not verify signature" in out:
        return _Outcome(False, None, None, "the SSH signature does not match the content "
                                           "(forged or altered)")
    if "no signature found" in out or not out.strip():
        return _Outcome(False, None, None, "not signed")
    if "cannot verify a non-tag object" in out:
        return _Outcome(False, None, None, "a lightweight tag carries no signature")
    said = " / ".join(line.strip() for line in out.splitlines() if line.strip())[-300:]
    return _Outcome(False, None, None, f"the signature could not be verified ({said})")


@contextlib.contextmanager
def _keyring(verify: VerifyConfig, timeout: float, plugin: str, commit: str) -> Iterator[str]:
    """A temporary ``GNUPGHOME`` holding only ``verify.gpg_keys``; removed on the way out.

    Made even without ``gpg_keys``, so a gpg that git runs never sees the
    server's own keyring.
    """
    with tempfile.TemporaryDirectory(prefix="gitplug-gnupg-") as home:
        os.chmod(home, 0o700)
        # No agent, no key servers: this keyring only verifies.
        Path(home, "gpg.conf").write_text("no-autostart\nno-auto-key-retrieve\n")
        if verify.gpg_keys:
            argv = ["gpg", "--batch", "--quiet", "--no-tty", "--no-autostart", "--homedir", home,
                    "--import", *verify.gpg_keys]
            code, out = _run(argv, {"PATH": os.environ.get("PATH", os.defpath), "LC_ALL": "C",
                                    "GNUPGHOME": home, "HOME": home}, timeout, plugin, commit,
                             "gpg --import")
            if code != 0:
                said = " / ".join(line.strip() for line in out.splitlines() if line.strip())[-300:]
                raise SignatureRefused(
                    f"plugin {plugin!r}: gpg could not import verify.gpg_keys "
                    f"({', '.join(verify.gpg_keys)}): {said or f'exit status {code}'}. Give "
                    "OpenPGP public keys (gpg --armor --export KEYID > key.asc).",
                    plugin=plugin, commit=commit)
        yield home


def _run(argv: Sequence[str], env: Mapping[str, str], timeout: float, plugin: str,
         commit: str, what: str) -> tuple[int, str]:
    """Run ``argv`` in its own process group with a deadline; ``(exit status, stdout+stderr)``."""
    try:
        proc = subprocess.Popen(list(argv), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, env=dict(env), start_new_session=True,
                                close_fds=True)
    except OSError as exc:
        raise SignatureRefused(f"plugin {plugin!r}: could not run {what}: {exc}. Install the "
                               "tools verify needs (Debian: apt-get install git openssh-client "
                               "gnupg).", plugin=plugin, commit=commit) from exc
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        raise SignatureRefused(f"plugin {plugin!r}: {what} did not finish within {timeout:g}s; "
                               "check the load of this host and retry the deploy.",
                               plugin=plugin, commit=commit) from None
    finally:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
    return proc.returncode, out.decode("utf-8", "replace")
