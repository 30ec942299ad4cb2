"""The test gate: run a plugin's own tests in a staged release, before it loads.

A release that fails its tests, hangs, or cannot start its test command never
goes live (SPEC 4.2). The gate is the only place where gitplug runs code from
a plugin repository in a separate process, so it is also where that code is
contained::

    result = run_test_gate(release_dir, ["python", "-m", "pytest", "-q"],
                           is_default=True, timeout=120, log_path=log,
                           secrets=[admin_token, webhook_secret])
    if not result.passed:
        ...  # record the deploy as failed at stage "test", show result.output_tail

Containment, and why:

- the command is an argument list run without a shell, so a ref or a path in
  it is never interpreted;
- it runs in a new session (its own process group), so on timeout the whole
  tree it spawned is signalled: SIGTERM, a short grace, then SIGKILL;
- its environment is :func:`scrubbed_environment`: no ``GITPLUG_*`` variable,
  no value equal to one of the server's secrets, no usual credential name,
  because a plugin's tests are code from a git server, not from the operator;
- its output goes through a pipe read by a thread that writes at most
  ``max_log_bytes`` to the log and discards the rest, so a test printing
  gigabytes neither fills the disk nor blocks on a full pipe.

The gate reports; it does not raise. Turning a failed :class:`GateResult` into
:class:`gitplug.errors.TestGateFailed` is the deployer's decision.
"""

from __future__ import annotations

import logging
import os
import re
import selectors
import shlex
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import BinaryIO, cast

logger = logging.getLogger(__name__)

__all__ = ["GateResult", "run_test_gate", "scrubbed_environment", "trim_test_log"]

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

    Removed: every ``GITPLUG_*`` variable; every variable whose value equals
    one of ``secrets`` (empty secrets are ignored); credential names (see
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
    env: dict[str, str] = {}
    for name, value in source.items():
        if value in secret_values or _is_credential_name(name):
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
            with open(f"/proc/{entry}/stat", "rb") as stat:
                # "pid (comm) state ppid pgrp ...": comm may hold spaces and parens
                fields = stat.read().rsplit(b")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if len(fields) > 2 and int(fields[2]) == pgid and fields[0] != b"Z":
            return True
    return False


#: Environment variable carrying a per-run id; not scrubbed from the gate's
#: own children because it is set after scrubbing.
_RUN_MARKER = "PLUGIN_TEST_RUN_ID"


def _kill_marked(marker: str | None) -> int:
    """SIGKILL every process whose environment carries this run's marker.

    Catches what the tests started in a session of their own (``setsid``,
    daemonising servers), which killing the process group misses. Needs
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


def _terminate_group(proc: subprocess.Popen[bytes], grace: float) -> None:
    """SIGTERM the process group, wait up to ``grace`` seconds, then SIGKILL it."""
    pgid = proc.pid  # start_new_session: the leader's pid is the group id
    _signal_group(pgid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        if proc.poll() is not None and not _group_alive(pgid):
            break
        time.sleep(0.05)
    _signal_group(pgid, signal.SIGKILL)
    proc.wait()


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
) -> GateResult:
    """Run ``command`` in ``release_dir`` and report whether it passed.

    Skips (passed) when ``command`` is None (``test: false``), or when it is
    the default command (``is_default``) and the release has no ``tests/``.
    ``python``/``python3`` as first argument means ``sys.executable``.
    ``PYTHONPATH`` is ``release_dir``, then ``extra_pythonpath``, then any
    inherited ``PYTHONPATH``. The log holds a header (command, cwd, start
    time), at most ``max_log_bytes`` in all for header and output, a truncation
    line if output was dropped, and a footer (exit status, duration). After
    ``timeout`` seconds the process group gets SIGTERM, then SIGKILL after
    :data:`KILL_GRACE_S`; processes the tests left behind are killed as well.
    Never raises for a problem of the command; returns a failed result.
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

    env = scrubbed_environment(secrets=secrets)
    paths = [str(release_dir), *(str(p) for p in extra_pythonpath)]
    if env.get("PYTHONPATH"):
        paths.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(paths)
    # Every process of this run inherits the marker, even one that escapes the
    # process group with setsid(); _kill_marked finds them by it afterwards.
    env[_RUN_MARKER] = uuid.uuid4().hex

    header = (
        f"# gitplug test gate: {shlex.join(argv)}\n"
        f"# cwd: {release_dir}\n# started: {_now_iso()}\n"
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
        return _run(argv, release_dir, env, timeout, log, log_path, budget)
    finally:
        log.close()


def _run(
    argv: tuple[str, ...],
    cwd: Path,
    env: dict[str, str],
    timeout: float,
    log: BinaryIO,
    log_path: Path,
    budget: int,
) -> GateResult:
    started = time.monotonic()
    try:
        proc = subprocess.Popen(
            argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, start_new_session=True, close_fds=True,
        )
    except FileNotFoundError:
        message = f"command not found: {argv[0]}; set `test:` in deploy.yaml"
        log.write(f"# {message}\n".encode())
        return GateResult(False, None, False, time.monotonic() - started, argv, log_path, message)
    except OSError as exc:
        message = f"could not start the test command {argv[0]}: {exc}; set `test:` in deploy.yaml"
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
    finally:
        # Also on success: whatever the tests left running must not outlive them.
        _terminate_group(proc, KILL_GRACE_S if timed_out else 0.0)
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
    if timed_out:
        tail = f"{tail}\n[timed out after {timeout}s]".lstrip("\n")
    passed = not timed_out and proc.returncode == 0
    logger.debug("test gate in %s: %s, exit %s, %.2fs", cwd, argv, proc.returncode, duration)
    return GateResult(
        passed=passed, returncode=proc.returncode, timed_out=timed_out,
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
