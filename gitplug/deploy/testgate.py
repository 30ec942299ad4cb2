"""The test gate: run a plugin's own tests in a staged release, before it loads.

A release that fails its tests, hangs, or cannot start its test command never
goes live (README, "Guarantees"). The gate is the only place where gitplug runs code from
a plugin repository in a separate process, so it is also where that code is
contained::

    result = run_test_gate(release_dir, ["python", "-m", "pytest", "-q"],
                           is_default=True, timeout=120, log_path=log,
                           secrets=[admin_token, webhook_secret])
    if not result.passed:
        ...  # record the deploy as failed at stage "test", show result.output_tail

Containment, and why (README "Security model"):

- the tests run on a *scratch copy* of the release in a temp dir, removed
  afterwards, so nothing a test writes reaches the release that is loaded;
- the command is an argument list run without a shell, so a ref or a path in
  it is never interpreted;
- it runs under a small *supervisor* process (the server's interpreter, ``-I``)
  that is a child subreaper (``PR_SET_CHILD_SUBREAPER``): every process the
  tests start, also one that calls ``setsid`` and drops every variable, is
  reparented to it when its parent dies, and the supervisor kills and reaps
  all its descendants before it exits, on success, failure and timeout;
- its environment is :func:`scrubbed_environment`: no ``GITPLUG_*`` variable,
  no value that *contains* one of the server's secrets, no usual credential
  name, because a plugin's tests are code from a git server, not from the
  operator; and the gate makes the server non-dumpable
  (``PR_SET_DUMPABLE`` 0) so ``/proc/<server pid>/environ`` is unreadable to
  other processes of its user (root still reads it: use ``test_user``);
- ``test_user`` runs the tests as another user (the supervisor drops to it
  for the test command), so ``data_dir`` and the server's processes are out
  of reach by permissions; ``sandbox="bwrap"`` runs them in bubblewrap with
  a read-only root, a private ``/tmp``, no network and only the scratch
  copy writable;
- its output goes through a pipe read by a thread that writes at most
  ``max_log_bytes`` to the log and discards the rest, so a test printing
  gigabytes neither fills the disk nor blocks on a full pipe.

The gate reports; it does not raise. Turning a failed :class:`GateResult` into
:class:`gitplug.errors.TestGateFailed` is the deployer's decision.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import json
import logging
import os
import re
import selectors
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import BinaryIO, cast

logger = logging.getLogger(__name__)

__all__ = ["GateResult", "run_test_gate", "scrubbed_environment", "trim_test_log",
           "protect_process", "bwrap_path", "SANDBOXES"]

#: The values of ``test_sandbox``.
SANDBOXES = ("none", "bwrap")
#: A secret at least this long is removed wherever it appears in a value;
#: a shorter one only when it is the whole value (a 3-character secret would
#: otherwise remove ``PATH``).
_SUBSTRING_MIN = 8

#: Seconds between SIGTERM and SIGKILL when the test run is stopped.
KILL_GRACE_S = 2.0
#: How much of the end of the output :attr:`GateResult.output_tail` keeps.
TAIL_LINES = 40
TAIL_BYTES = 4096
#: Seconds the reader may keep draining once the test process has exited
#: (a process that escaped the group with ``setsid`` can hold the pipe open).
_DRAIN_GRACE_S = 2.0
_CHUNK = 64 * 1024

#: Variable names removed whatever their value: they grant access to
#: something (an SSH agent, a cloud account, a cluster) rather than hold a secret.
_CREDENTIAL_NAMES = frozenset(
    {
        "SSH_AUTH_SOCK", "SSH_ASKPASS", "GIT_ASKPASS", "NETRC", "KUBECONFIG",
        "DOCKER_AUTH_CONFIG", "MYSQL_PWD",
    }
)
#: Name prefixes of cloud provider credentials.
_CREDENTIAL_PREFIXES = ("GITPLUG_", "AWS_", "AZURE_", "GCP_", "GOOGLE_CLOUD_")
#: A variable is dropped when its name contains one of these anywhere
#: (``PGPASSWORD``, ``DJANGO_SECRET_KEY``, ``GOOGLE_CREDENTIALS_JSON``)...
_CREDENTIAL_SUBSTRINGS = ("PASSWORD", "PASSWD", "PASSPHRASE", "SECRET", "CREDENTIAL")
#: ...or when one of its ``_``-separated words is one of these (``GITHUB_TOKEN``),
#: or two consecutive words form one of the pairs (``OPENAI_API_KEY``).
#: Whole words keep ``TOKENIZERS_PARALLELISM`` and ``KEYBOARD_LAYOUT``.
_CREDENTIAL_WORDS = frozenset({"TOKEN", "TOKENS", "AUTHTOKEN", "APIKEY", "PRIVATEKEY"})
_CREDENTIAL_PAIRS = frozenset({("API", "KEY"), ("ACCESS", "KEY"), ("PRIVATE", "KEY")})
#: A URL that carries a password (``postgres://user:pw@db/x``) in any variable.
_URL_WITH_PASSWORD = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^/\s:@]*:[^/\s@]+@")


@dataclass(frozen=True)
class GateResult:
    """What one run of the test gate did.

    ``passed`` is True for a zero exit status and for a skipped gate
    (``skipped_reason`` says why). ``returncode`` is None when the command
    never started or was skipped; after a timeout it is the killing signal,
    negated (``-15``, ``-9``), as :mod:`subprocess` reports it.
    ``output_tail`` is the end of the output (last :data:`TAIL_LINES` lines,
    at most :data:`TAIL_BYTES` bytes) or a sentence saying why there is none;
    the whole output is in ``log_path``.
    """

    passed: bool
    returncode: int | None
    timed_out: bool
    duration_s: float
    command: tuple[str, ...]
    log_path: Path
    output_tail: str
    skipped_reason: str | None = None


def _is_credential_name(name: str) -> bool:
    upper = name.upper()
    if upper in _CREDENTIAL_NAMES or upper.startswith(_CREDENTIAL_PREFIXES):
        return True
    if any(part in upper for part in _CREDENTIAL_SUBSTRINGS):
        return True
    words = [w for w in upper.split("_") if w]
    if any(w in _CREDENTIAL_WORDS for w in words):
        return True
    return any(pair in _CREDENTIAL_PAIRS for pair in zip(words, words[1:]))


def scrubbed_environment(
    base: Mapping[str, str] | None = None, *, secrets: Iterable[str] = ()
) -> dict[str, str]:
    """Return a copy of ``base`` (default ``os.environ``) fit for untrusted tests.

    Removed: every ``GITPLUG_*`` variable; every variable whose value holds
    one of ``secrets`` anywhere (``MY_HEADER="Bearer <token>"``; a secret
    shorter than 8 characters only as the whole value; empty secrets are
    ignored), or whose name does; credential names (see
    ``_CREDENTIAL_NAMES``, ``_CREDENTIAL_PREFIXES``,
    ``_CREDENTIAL_SUBSTRINGS``, ``_CREDENTIAL_WORDS``: ``*_TOKEN``,
    ``*SECRET*``, ``*PASSWORD*``, ``*_API_KEY``, ``AWS_*``, ``SSH_AUTH_SOCK``,
    ...); any value holding a URL with a password. Kept: everything else
    (``PATH``, ``HOME``, ``LANG``, ``TMPDIR``, ...).
    ``PYTHONDONTWRITEBYTECODE=1`` is set so the tests do not write
    ``__pycache__`` into the immutable release.
    """
    source = os.environ if base is None else base
    secret_values = {s for s in secrets if s}
    long_secrets = [s for s in secret_values if len(s) >= _SUBSTRING_MIN]
    env: dict[str, str] = {}
    for name, value in source.items():
        if value in secret_values or _is_credential_name(name):
            continue
        if any(secret in value or secret in name for secret in long_secrets):
            continue
        if _URL_WITH_PASSWORD.search(value):
            continue
        env[name] = value
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env


def _now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _skipped(command: Sequence[str] | None, log_path: Path, reason: str) -> GateResult:
    _write_note(log_path, f"# gitplug test gate skipped at {_now_iso()}: {reason}\n")
    return GateResult(
        passed=True, returncode=None, timed_out=False, duration_s=0.0,
        command=tuple(command or ()), log_path=log_path, output_tail="",
        skipped_reason=reason,
    )


def _not_started(argv: tuple[str, ...], log_path: Path, message: str) -> GateResult:
    _write_note(log_path, f"# gitplug test gate at {_now_iso()}: {message}\n")
    return GateResult(
        passed=False, returncode=None, timed_out=False, duration_s=0.0,
        command=argv, log_path=log_path, output_tail=message,
    )


def _write_note(log_path: Path, text: str) -> None:
    # A missing log is a nuisance, not a reason to change the gate's verdict.
    try:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        log_path.write_text(text, encoding="utf-8")
    except OSError as exc:
        logger.warning("could not write the test gate log %s: %s", log_path, exc)


class _OutputPump(threading.Thread):
    """Copy the child's output pipe into the log, up to a byte budget.

    Past the budget it keeps reading (so the child never blocks on a full
    pipe) and discards. It always keeps the last bytes for the tail.
    """

    def __init__(self, pipe: BinaryIO, log: BinaryIO, budget: int) -> None:
        super().__init__(name="gitplug-testgate-output", daemon=True)
        self._pipe = pipe
        self._log = log
        self._budget = max(budget, 0)
        self._stop_reading = threading.Event()
        self.written = 0
        self.total = 0
        self.tail = bytearray()
        self.error: OSError | None = None
        self.log_ends_line = True  # the header ends with a newline

    def stop(self) -> None:
        self._stop_reading.set()

    def run(self) -> None:
        fd = self._pipe.fileno()
        with selectors.DefaultSelector() as selector:
            selector.register(fd, selectors.EVENT_READ)
            while not self._stop_reading.is_set():
                if not selector.select(timeout=0.1):
                    continue
                chunk = os.read(fd, _CHUNK)
                if not chunk:
                    return
                self._consume(chunk)

    def _consume(self, chunk: bytes) -> None:
        self.total += len(chunk)
        room = self._budget - self.written
        if room > 0 and self.error is None:
            part = chunk[:room]
            try:
                self._log.write(part)
            except OSError as exc:  # disk full: keep draining, report later
                self.error = exc
            self.written += len(part)
            self.log_ends_line = part.endswith(b"\n")
        self.tail += chunk
        if len(self.tail) > 2 * TAIL_BYTES:
            del self.tail[: len(self.tail) - 2 * TAIL_BYTES]


def _tail_text(data: bytes) -> str:
    lines = data.decode("utf-8", errors="replace").splitlines()[-TAIL_LINES:]
    text = "\n".join(lines)
    encoded = text.encode("utf-8")
    if len(encoded) > TAIL_BYTES:
        text = encoded[-TAIL_BYTES:].decode("utf-8", errors="ignore")
    return text


def _group_alive(pgid: int) -> bool:
    """True while a process of group ``pgid`` still runs (zombies do not count).

    Orphans of the test run are reparented to pid 1, which in a container may
    never reap them; ``killpg(pgid, 0)`` alone would see those zombies forever.
    """
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # a member changed user; it still exists
        return True
    try:
        entries = os.listdir("/proc")
    except OSError:  # no procfs: trust killpg
        return True
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as stat_file:
                # "pid (comm) state ppid pgrp ...": comm may hold spaces and parens
                fields = stat_file.read().rsplit(b")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if len(fields) > 2 and int(fields[2]) == pgid and fields[0] != b"Z":
            return True
    return False


#: Environment variable carrying a per-run id; not scrubbed from the gate's
#: own children because it is set after scrubbing. A second line of defence
#: only: the supervisor finds descendants without it.
_RUN_MARKER = "PLUGIN_TEST_RUN_ID"


def _kill_marked(marker: str | None) -> int:
    """SIGKILL every process whose environment carries this run's marker.

    A fallback for when the supervisor itself was killed by the tests. Needs
    procfs; returns how many processes were killed.
    """
    if not marker:
        return 0
    needle = f"{_RUN_MARKER}={marker}".encode()
    killed = 0
    try:
        entries = os.listdir("/proc")
    except OSError:
        return 0
    for entry in entries:
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as handle:
                environ = handle.read()
        except OSError:
            continue
        if needle in environ.split(b"\0"):
            try:
                os.kill(int(entry), signal.SIGKILL)
                killed += 1
            except (ProcessLookupError, PermissionError):
                pass
    if killed:
        logger.warning("test gate: killed %d process(es) the tests left running outside their group", killed)
    return killed


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


#: The supervisor: the server's interpreter in isolated mode (-I) with this
#: program. It makes itself a child subreaper, so every process the tests
#: start ends up its descendant even after ``setsid`` and a double fork; runs
#: the command (as ``user``/``group`` if given); on SIGTERM (the gate's
#: timeout) it sends SIGTERM to all its descendants, waits ``grace`` seconds
#: for the command, then SIGKILLs them; after the command ends it SIGKILLs
#: and reaps every descendant left; then it exits as the command did (the
#: same status, or killed by the same signal). Status 126 with a
#: ``gitplug test gate:`` line means the command could not be started.
_SUPERVISOR = r"""
import ctypes, json, os, signal, subprocess, sys, time
spec = json.loads(sys.argv[1])
me = os.getpid()
if sys.platform.startswith("linux"):
    ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
stop = []
signal.signal(signal.SIGTERM, lambda *_: stop.append(1))

def descendants():
    kids = {}
    try:
        entries = os.listdir("/proc")
    except OSError:  # no procfs: the process group kill in the gate is all there is
        return []
    for entry in entries:
        if entry.isdigit():
            try:
                with open("/proc/%s/stat" % entry, "rb") as handle:
                    fields = handle.read().rsplit(b")", 1)[1].split()
            except (OSError, IndexError):
                continue
            if fields[0] != b"Z":
                kids.setdefault(int(fields[1]), []).append(int(entry))
    found, todo = [], [me]
    while todo:
        for pid in kids.get(todo.pop(), ()):
            found.append(pid)
            todo.append(pid)
    return found

def signal_all(sig):
    pids = descendants()
    for pid in pids:
        try:
            os.kill(pid, sig)
        except OSError:
            pass
    return pids

def reap():
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return

extra = {}
if spec["user"] is not None:
    extra = {"user": spec["user"], "group": spec["group"], "extra_groups": []}
try:
    child = subprocess.Popen(spec["argv"], cwd=spec["cwd"], **extra)
except FileNotFoundError:
    print("gitplug test gate: command not found: %s" % spec["argv"][0], flush=True)
    sys.exit(126)
except OSError as exc:
    print("gitplug test gate: could not start the test command %s: %s" % (spec["argv"][0], exc),
          flush=True)
    sys.exit(126)
while child.poll() is None and not stop:
    try:
        child.wait(timeout=0.1)
    except subprocess.TimeoutExpired:
        pass
if child.returncode is None:
    signal_all(signal.SIGTERM)
    deadline = time.monotonic() + spec["grace"]
    while child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
for _ in range(200):
    if not signal_all(signal.SIGKILL):
        break
    if child.returncode is None:
        child.wait()
    time.sleep(0.01)
    reap()
child.wait()
reap()
code = child.returncode
if code < 0:
    if -code not in (signal.SIGKILL, signal.SIGSTOP):
        signal.signal(-code, signal.SIG_DFL)
    os.kill(me, -code)
sys.exit(code)
"""

#: The supervisor's status and line when it could not start the command.
_NOT_STARTED = 126
_NOT_STARTED_PREFIX = "gitplug test gate: "
#: Seconds the gate waits for the supervisor beyond the grace before it kills it.
_SUPERVISOR_SLACK_S = 5.0


def protect_process() -> bool:
    """Make this process non-dumpable, so others of its user cannot read its memory.

    ``prctl(PR_SET_DUMPABLE, 0)`` makes ``/proc/<pid>/environ`` (and mem, maps,
    ptrace) owned by root: a test running as the server's user cannot read
    the server's secrets there. Root is not stopped by it (use ``test_user``).
    Side effects: no core dumps, no debugger attach by the same user. Linux
    only; returns whether it took effect.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        return bool(libc.prctl(4, 0, 0, 0, 0) == 0)  # PR_SET_DUMPABLE
    except (OSError, AttributeError):
        return False


def bwrap_path() -> str | None:
    """The bubblewrap binary, if installed."""
    return shutil.which("bwrap")


def _bwrap_argv(bwrap: str, scratch: Path, readable: list[str]) -> list[str]:
    """Bubblewrap: read-only root, private /tmp, /dev and /proc, no network, scratch writable."""
    argv = [bwrap, "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc",
            "--tmpfs", "/tmp", "--tmpfs", "/var/tmp", "--tmpfs", "/dev/shm"]
    for path in readable:  # what a private /tmp would hide (a venv under /tmp)
        if path.startswith(("/tmp/", "/var/tmp/")):
            argv += ["--ro-bind", path, path]
    argv += ["--bind", str(scratch), str(scratch), "--unshare-net", "--unshare-pid",
             "--unshare-ipc", "--unshare-uts", "--die-with-parent", "--new-session",
             "--chdir", str(scratch), "--"]
    return argv


def _allowed(info: os.stat_result, uid: int, gid: int, bits: int) -> bool:
    if uid == 0:
        return True
    if info.st_uid == uid:
        shift = 6
    elif info.st_gid == gid:
        shift = 3
    else:
        shift = 0
    return (info.st_mode >> shift) & bits == bits


def _user_cannot(path: str, uid: int, gid: int, bits: int) -> str | None:
    """Why user ``uid`` cannot use ``path`` with ``bits`` (4 read, 1 execute), or None."""
    real = os.path.realpath(path)
    for spelled in dict.fromkeys((os.path.abspath(path), real)):  # as given, and resolved
        parts = spelled.split(os.sep)
        for i in range(1, len(parts)):
            directory = os.sep.join(parts[:i]) or os.sep
            try:
                if not _allowed(os.stat(directory), uid, gid, 1):
                    return f"the directory {directory} is not searchable by it"
            except OSError as exc:
                return f"{directory}: {exc.strerror}"
    try:
        info = os.stat(real)
    except OSError as exc:
        return f"{real}: {exc.strerror}"
    if stat.S_ISDIR(info.st_mode):
        bits |= 1
    if not _allowed(info, uid, gid, bits):
        return f"{real} is not {'readable' if bits & 4 else 'executable'} by it"
    return None


def _scratch_copy(release_dir: Path, owner: tuple[int, int] | None) -> Path:
    """A writable copy of the release (not its ``.gitplug/``) in a new temp dir.

    Real copies, no hard links: a test that writes to a file of its copy
    cannot reach the release. With ``owner`` every entry is chowned to it.
    """
    root = Path(tempfile.mkdtemp(prefix="gitplug-test-"))
    scratch = root / release_dir.name
    os.mkdir(scratch, 0o755)
    for directory, dirs, files in os.walk(release_dir):
        rel = os.path.relpath(directory, release_dir)
        target = scratch if rel == "." else scratch / rel
        if rel == ".":
            dirs[:] = [d for d in dirs if d != ".gitplug"]
        for name in list(dirs):
            source = os.path.join(directory, name)
            if os.path.islink(source):
                os.symlink(os.readlink(source), target / name)
                dirs.remove(name)
            else:
                os.mkdir(target / name, 0o755)
        for name in files:
            source = os.path.join(directory, name)
            if os.path.islink(source):
                os.symlink(os.readlink(source), target / name)
                continue
            shutil.copyfile(source, target / name, follow_symlinks=False)
            executable = os.stat(source).st_mode & 0o111
            os.chmod(target / name, 0o755 if executable else 0o644)
    if owner is not None:
        for directory, dirs, files in os.walk(root):
            os.lchown(directory, *owner)
            for name in dirs + files:
                os.lchown(os.path.join(directory, name), *owner)
    return scratch


def _remove_scratch(scratch: Path) -> None:
    root = scratch.parent
    for directory, dirs, _files in os.walk(root):  # a test may have made dirs read-only
        for name in dirs:
            path = os.path.join(directory, name)
            if not os.path.islink(path):
                with contextlib.suppress(OSError):
                    os.chmod(path, 0o755)
    shutil.rmtree(root, ignore_errors=True)
    if root.exists():
        logger.warning("test gate: could not remove the scratch copy %s", root)


def _resolve_argv(command: Sequence[str]) -> tuple[str, ...]:
    argv = tuple(str(part) for part in command)
    # The tests must run under the interpreter that will import the plugin,
    # not whatever "python" is first on PATH (often none, or another version).
    if argv and argv[0] in ("python", "python3") and sys.executable:
        argv = (sys.executable, *argv[1:])
    return argv


def run_test_gate(
    release_dir: Path,
    command: Sequence[str] | None,
    *,
    is_default: bool,
    timeout: float,
    log_path: Path,
    secrets: Iterable[str] = (),
    max_log_bytes: int = 5 * 1024 * 1024,
    extra_pythonpath: Sequence[Path] = (),
    sandbox: str = "none",
    test_user: str | None = None,
) -> GateResult:
    """Run ``command`` in a scratch copy of ``release_dir`` and report whether it passed.

    Skips (passed) when ``command`` is None (``test: false``), or when it is
    the default command (``is_default``) and the release has no ``tests/``.
    ``python``/``python3`` as first argument means ``sys.executable``.
    The command runs in a writable copy of the release (without its
    ``.gitplug/``) in a temp dir that is removed afterwards; ``PYTHONPATH``
    is that copy, then ``extra_pythonpath``, then any inherited
    ``PYTHONPATH``. The log holds a header (command, cwd, start time), at
    most ``max_log_bytes`` in all for header and output, a truncation line
    if output was dropped, and a footer (exit status, duration). After
    ``timeout`` seconds the tests get SIGTERM, then SIGKILL after
    :data:`KILL_GRACE_S`; every process they started is killed when the
    run ends, whatever it did to escape. ``sandbox="bwrap"`` runs the
    command in bubblewrap; ``test_user`` as that user (the server must be
    root). Never raises for a problem of the command or the sandbox;
    returns a failed result that says what to do.
    """
    release_dir = Path(release_dir)
    log_path = Path(log_path)
    if command is None:
        return _skipped(command, log_path, "test gate disabled")
    if is_default and not (release_dir / "tests").is_dir():
        return _skipped(command, log_path, "release has no tests/ directory")
    argv = _resolve_argv(command)
    if not argv:
        return _not_started(argv, log_path, "the test command is empty; set `test:` in deploy.yaml")
    if not release_dir.is_dir():
        return _not_started(argv, log_path, f"release directory {release_dir} does not exist")
    if sandbox not in SANDBOXES:
        return _not_started(argv, log_path, f"unknown test_sandbox {sandbox!r}; use none or bwrap")
    bwrap = bwrap_path() if sandbox == "bwrap" else None
    if sandbox == "bwrap" and bwrap is None:
        return _not_started(argv, log_path, "test_sandbox is bwrap but bubblewrap is not "
                            "installed (apt-get install bubblewrap); install it or set "
                            "test_sandbox: none (README \"Security model\")")
    owner: tuple[int, int] | None = None
    if test_user is not None:
        problem, owner = _check_test_user(test_user, argv, extra_pythonpath)
        if problem:
            return _not_started(argv, log_path, problem)

    protect_process()  # before any test runs: /proc/<server>/environ unreadable
    try:
        scratch = _scratch_copy(release_dir, owner)
    except OSError as exc:
        return _not_started(argv, log_path, f"could not copy the release to a scratch "
                            f"directory under {tempfile.gettempdir()}: {exc}; free some space "
                            "there or set TMPDIR to a writable directory")
    try:
        env = scrubbed_environment(secrets=secrets)
        paths = [str(scratch), *(str(p) for p in extra_pythonpath)]
        if env.get("PYTHONPATH"):
            paths.append(env["PYTHONPATH"])
        env["PYTHONPATH"] = os.pathsep.join(paths)
        # Every process of this run inherits the marker; a fallback if the tests
        # kill the supervisor (see _kill_marked).
        env[_RUN_MARKER] = uuid.uuid4().hex
        if bwrap is not None:
            readable = [os.path.dirname(sys.executable), sys.prefix,
                        *(str(p) for p in extra_pythonpath)]
            run_argv = (*_bwrap_argv(bwrap, scratch, readable), *argv)
        else:
            run_argv = argv

        header = (
            f"# gitplug test gate: {shlex.join(argv)}\n"
            f"# cwd: {scratch} (a scratch copy of {release_dir})\n"
            + (f"# sandbox: {sandbox}; user: {test_user or 'the server user'}\n"
               if bwrap or test_user else "")
            + f"# started: {_now_iso()}\n"
        )
        try:
            log_path.parent.mkdir(parents=True, exist_ok=True)
            log = open(log_path, "wb")  # noqa: SIM115 - closed in the finally below
        except OSError as exc:
            message = (
                f"could not open the test log {log_path}: {exc}; check that the data_dir is writable"
            )
            return GateResult(False, None, False, 0.0, argv, log_path, message)
        header_bytes = header.encode("utf-8")
        try:
            log.write(header_bytes)
            log.flush()
            budget = max_log_bytes - len(header_bytes)
            return _run(argv, run_argv, scratch, env, timeout, log, log_path, budget, owner)
        finally:
            log.close()
    finally:
        _remove_scratch(scratch)


def _check_test_user(test_user: str, argv: tuple[str, ...], extra_pythonpath: Sequence[Path]
                     ) -> tuple[str | None, tuple[int, int] | None]:
    """``(problem, (uid, gid))``: whether the tests can run as ``test_user`` here."""
    import pwd
    import site

    try:
        entry = pwd.getpwuid(int(test_user)) if test_user.isdigit() else pwd.getpwnam(test_user)
    except (KeyError, OverflowError):
        return f"test_user {test_user!r} does not exist on this host; create it or change " \
               "test_user in deploy.yaml", None
    uid, gid = entry.pw_uid, entry.pw_gid
    if os.geteuid() != 0 and uid != os.geteuid():
        return (f"test_user {test_user!r} needs the server to run as root (it runs as uid "
                f"{os.geteuid()}); run it as root or remove test_user"), None
    # The supervisor runs as the server; only the test command runs as test_user.
    needed = [(str(p), 5, "the test gate's PYTHONPATH") for p in extra_pythonpath]
    if argv and argv[0] == sys.executable:
        needed += [(sys.executable, 5, "the server's interpreter"),
                   (os.path.dirname(os.__file__), 5, "the Python standard library")]
        needed += [(p, 5, "Python packages") for p in site.getsitepackages() if os.path.isdir(p)]
    elif argv and os.path.isabs(argv[0]):
        needed.append((argv[0], 5, "the test command"))
    for path, bits, what in needed:
        problem = _user_cannot(path, uid, gid, bits)
        if problem:
            return (f"test_user {entry.pw_name!r} cannot use {path} ({what}): {problem}. "
                    "Install the server where that user can read and run it (for example "
                    "under /opt or /usr/local) or open up the permissions "
                    "(README \"Security model\")"), None
    return None, (uid, gid)


def _run(
    argv: tuple[str, ...],
    run_argv: tuple[str, ...],
    cwd: Path,
    env: dict[str, str],
    timeout: float,
    log: BinaryIO,
    log_path: Path,
    budget: int,
    owner: tuple[int, int] | None,
) -> GateResult:
    started = time.monotonic()
    spec = {"argv": list(run_argv), "cwd": str(cwd), "grace": KILL_GRACE_S,
            "user": owner[0] if owner else None, "group": owner[1] if owner else None}
    try:
        proc = subprocess.Popen(
            [sys.executable, "-I", "-c", _SUPERVISOR, json.dumps(spec)], cwd=cwd, env=env,
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            start_new_session=True, close_fds=True,
        )
    except OSError as exc:
        message = f"could not start the test gate's supervisor {sys.executable}: {exc}"
        log.write(f"# {message}\n".encode())
        return GateResult(False, None, False, time.monotonic() - started, argv, log_path, message)

    stdout = cast(BinaryIO, proc.stdout)  # stdout=PIPE above: never None
    pump = _OutputPump(stdout, log, budget)
    pump.start()
    timed_out = False
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
        logger.info("test gate timed out after %ss in %s; stopping %s", timeout, cwd, argv)
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)  # the supervisor stops the whole tree
        try:
            proc.wait(timeout=KILL_GRACE_S + _SUPERVISOR_SLACK_S)
        except subprocess.TimeoutExpired:
            logger.warning("test gate: the supervisor did not stop; killing its group")
    finally:
        # The supervisor killed everything it could; if the tests killed the
        # supervisor itself, its group and the marked processes are what is left.
        supervisor_gone = proc.poll() is not None
        _signal_group(proc.pid, signal.SIGKILL)
        proc.wait()
        if not supervisor_gone or proc.returncode == -signal.SIGKILL:
            _kill_marked(env.get(_RUN_MARKER))
        pump.join(timeout=_DRAIN_GRACE_S)
        pump.stop()
        pump.join()
        stdout.close()
    duration = time.monotonic() - started

    footer = []
    if pump.total > pump.written:
        footer.append(
            f"[output truncated after {pump.written} bytes; "
            f"{pump.total - pump.written} more bytes discarded]"
        )
    if timed_out:
        footer.append(f"# timed out after {timeout}s; process group killed ({duration:.2f}s)")
    else:
        footer.append(f"# exit code {proc.returncode} after {duration:.2f}s")
    try:
        start = "" if pump.log_ends_line else "\n"
        log.write((start + "\n".join(footer) + "\n").encode("utf-8"))
    except OSError as exc:
        logger.warning("could not finish the test gate log %s: %s", log_path, exc)
    if pump.error is not None:
        logger.warning("test gate log %s is incomplete: %s", log_path, pump.error)

    tail = _tail_text(bytes(pump.tail))
    returncode = proc.returncode
    if returncode == _NOT_STARTED and tail.startswith(_NOT_STARTED_PREFIX) and "\n" not in tail:
        # The supervisor could not start the command: say so, as before it ran.
        tail = tail.removeprefix(_NOT_STARTED_PREFIX) + "; set `test:` in deploy.yaml"
        returncode = None
    if timed_out:
        tail = f"{tail}\n[timed out after {timeout}s]".lstrip("\n")
    passed = not timed_out and returncode == 0
    logger.debug("test gate in %s: %s, exit %s, %.2fs", cwd, argv, returncode, duration)
    return GateResult(
        passed=passed, returncode=returncode, timed_out=timed_out,
        duration_s=duration, command=argv, log_path=log_path, output_tail=tail,
    )


# -- reading a log -----------------------------------------------------------------

#: pytest's separator between the frames of one long traceback.
_FRAME_SEPARATOR = re.compile(r"^(_ ){3,}_?\s*$")
#: The location line that ends a frame: ``path/to/file.py:12: in func`` or ``...: Error``.
_FRAME_LOCATION = re.compile(r"^(?P<file>\S[^:]*\.py):(?P<line>\d+):(?: (?P<what>.*))?$")
#: A failure section's header: ``____ test_name ____`` (or ``____ ERROR at setup of x ____``).
_SECTION_HEADER = re.compile(r"^_{3,} (?P<name>.+?) _{3,}$")
#: Frames in these places are gitplug's, pytest's or pluggy's, not the plugin's.
_FOREIGN_PARTS = ("/_pytest/", "/pluggy/", "/site-packages/flask/", "/site-packages/werkzeug/")
_GITPLUG_DIR = str(Path(__file__).resolve().parents[1]) + os.sep
#: An argument value pytest prints above a test's source: ``name = value``.
_FUNCARG = re.compile(r"^[A-Za-z_]\w* = ")


def _foreign(file: str) -> bool:
    return file.startswith(_GITPLUG_DIR) or any(part in file for part in _FOREIGN_PARTS)


def trim_test_log(text: str) -> str:
    """A test gate log as a person reads it first.

    In pytest's tracebacks, the frames of gitplug, pytest, pluggy, Flask and
    Werkzeug are replaced by one line saying how many were hidden, so the
    plugin's own file and line come first; a failure whose report repeats an
    earlier one word for word is shown once, with the names of the tests
    that had it. Everything else is kept as it is. ``gitplug logs --full``
    prints the log untouched.
    """
    lines = text.splitlines()
    sections: list[tuple[str | None, list[str]]] = [(None, [])]
    for line in lines:
        header = _SECTION_HEADER.match(line)
        if header and not _FRAME_SEPARATOR.match(line):
            sections.append((line, []))
        elif line.startswith("=") and sections[-1][0] is not None:
            sections.append((None, [line]))  # "=== short test summary ===" etc.
        else:
            sections[-1][1].append(line)
    out: list[str] = []
    seen: dict[str, str] = {}
    for header, body in sections:
        trimmed = _trim_frames(body) if header is not None else body
        if header is None:
            out.extend(trimmed)
            continue
        name = _SECTION_HEADER.match(header).group("name")  # type: ignore[union-attr]
        # Compared without the argument values pytest prints first ("greeting = ''"):
        # a parametrized test failing the same way each time is one report.
        key = "\n".join(line for line in trimmed if not _FUNCARG.match(line)).strip()
        if key and key in seen:
            out.append(header)
            out.append(f"(the same report as {seen[key]})")
            continue
        seen.setdefault(key, name)
        out.append(header)
        out.extend(trimmed)
    return "\n".join(out) + ("\n" if text.endswith("\n") else "")


def _trim_frames(body: list[str]) -> list[str]:
    """Replace foreign frames of one failure report by a count.

    pytest prints a frame long (source, then ``file.py:12: Error`` last) or,
    between separators, as a run of short frames (``file.py:12: in func``
    first, then indented source lines); both kinds are recognised.
    """
    chunks: list[list[str]] = [[]]
    for line in body:
        if _FRAME_SEPARATOR.match(line):
            chunks.append([])
        else:
            chunks[-1].append(line)
    # Each frame: (file or None, lines, is a long frame)
    frames: list[tuple[str | None, list[str], bool]] = []
    for number, chunk in enumerate(chunks):
        first = next((line for line in chunk if line.strip()), "")
        short = _FRAME_LOCATION.match(first)
        if short and (short.group("what") or "").startswith("in "):
            for line in chunk:
                location = _FRAME_LOCATION.match(line)
                if location and (location.group("what") or "").startswith("in "):
                    frames.append((location.group("file"), [line], False))
                elif frames:
                    frames[-1][1].append(line)
            if number < len(chunks) - 1:
                frames.append((None, [], True))  # keeps the separator before the next long frame
            continue
        location = next((m for m in map(_FRAME_LOCATION.match, reversed(chunk)) if m), None)
        frames.append((location.group("file") if location else None, chunk, True))
    out: list[str] = []
    hidden = 0
    for index, (file, lines, long) in enumerate(frames):
        if file is None and not lines:
            continue  # the separator marker: shown before the next frame that is shown
        if file is not None and _foreign(file):
            hidden += 1
            if index == len(frames) - 1:
                # The frame that raised: its "E   ..." lines are the error itself.
                out.append(_hidden_note(hidden))
                hidden = 0
                out.extend(line for line in lines if line.startswith("E ") or _is_captured(line))
            continue
        if hidden:
            out.append(_hidden_note(hidden))
            hidden = 0
        if long and out and out[-1] != "_ " * 20:
            out.append("_ " * 20)
        out.extend(lines)
    return _without_own_log(out)


def _hidden_note(count: int) -> str:
    return f"[{count} frame(s) of gitplug, pytest or Flask hidden; --full shows them]"


_CAPTURED = re.compile(r"^-{3,} Captured .* -{3,}$")
#: A record of gitplug's own loggers in a "Captured log" section: it repeats the error.
_OWN_LOG_LINE = re.compile(r"^(DEBUG|INFO|WARNING|ERROR|CRITICAL) +gitplug\.")


def _is_captured(line: str) -> bool:
    return bool(_CAPTURED.match(line))


def _without_own_log(lines: list[str]) -> list[str]:
    """Drop gitplug's own log records from captured-log sections, and sections left empty."""
    out: list[str] = []
    for line in lines:
        if _OWN_LOG_LINE.match(line):
            continue
        if out and _is_captured(out[-1]) and (_is_captured(line) or not line.strip()):
            out.pop()  # the previous section header has nothing left under it
        out.append(line)
    if out and _is_captured(out[-1]):
        out.pop()
    return out
