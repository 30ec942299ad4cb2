"""Gunicorn subprocesses on 127.0.0.1 and a minimal HTTP client for them.

:class:`Gunicorn` starts ``python -m gunicorn`` in its own session, knows its
worker processes (psutil), sends it ``SIGHUP`` and stops it, killing only
the processes it started, by pid. :func:`request` is one HTTP exchange on a
fresh connection to ``127.0.0.1``: nothing here can reach another host.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import logging
import os
import signal
import subprocess
import sys
import time
import typing as t
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from .figures import Unmeasurable
from .fixtures import REPO_ROOT, free_port

__all__ = ["Reply", "request", "Gunicorn", "wait_for", "read_events"]

logger = logging.getLogger(__name__)

LOCALHOST = "127.0.0.1"


@dataclass(frozen=True)
class Reply:
    """One HTTP answer; header names lowercased."""

    status: int
    headers: Mapping[str, str] = field(repr=False)
    body: bytes = field(repr=False)

    def json(self) -> t.Any:
        return json.loads(self.body)


def request(
    port: int,
    method: str,
    path: str,
    *,
    body: bytes | None = None,
    headers: Mapping[str, str] | None = None,
    timeout: float = 10.0,
) -> Reply:
    """One request to ``127.0.0.1:port`` on a new connection (no keep-alive)."""
    conn = http.client.HTTPConnection(LOCALHOST, port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=dict(headers or {}))
        resp = conn.getresponse()
        data = resp.read()
        return Reply(resp.status, {k.lower(): v for k, v in resp.getheaders()}, data)
    finally:
        conn.close()


def wait_for(predicate: Callable[[], t.Any], *, timeout: float, what: str, interval: float = 0.005) -> t.Any:
    """Poll ``predicate`` until it returns something truthy; raise :class:`Unmeasurable` on timeout.

    Connection errors count as "not yet".
    """
    deadline = time.monotonic() + timeout
    last_error: BaseException | None = None
    while True:
        try:
            value = predicate()
            if value:
                return value
        except (OSError, http.client.HTTPException, ValueError) as exc:
            last_error = exc
        if time.monotonic() > deadline:
            extra = f" (last error: {type(last_error).__name__}: {last_error})" if last_error else ""
            raise Unmeasurable(f"timed out after {timeout:g} s waiting for {what}{extra}")
        time.sleep(interval)


def read_events(path: Path) -> list[dict[str, t.Any]]:
    """The JSON lines the bench host apps append (see :mod:`bench.apps`)."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return []
    return [json.loads(line) for line in text.splitlines() if line.strip().endswith("}")]


class Gunicorn:
    """``python -m gunicorn -w N -k gthread`` serving ``app_spec`` on 127.0.0.1.

    Use as a context manager; the server is stopped (and, if it does not stop,
    killed by pid) when the block ends. Output goes to ``log_path``.
    """

    def __init__(
        self,
        app_spec: str,
        *,
        env: Mapping[str, str],
        log_path: Path,
        workers: int = 2,
        threads: int = 4,
        gitplug_hooks: bool = True,
    ) -> None:
        self.app_spec = app_spec
        self.port = free_port()
        self.workers = workers
        self.threads = threads
        self.log_path = log_path
        self.gitplug_hooks = gitplug_hooks
        self.env = {**os.environ, **env, "PYTHONPATH": _pythonpath(env)}
        self.proc: subprocess.Popen[bytes] | None = None
        self._seen_workers: set[int] = set()

    def __repr__(self) -> str:
        return f"<Gunicorn {self.app_spec} 127.0.0.1:{self.port} -w {self.workers}>"

    def start(self) -> None:
        try:
            import gunicorn  # noqa: F401
        except ImportError as exc:
            raise Unmeasurable("gunicorn is not installed; run `pip install -e '.[test]'`") from exc
        argv = [
            sys.executable, "-m", "gunicorn",
            "--bind", f"{LOCALHOST}:{self.port}",
            "--workers", str(self.workers),
            "--worker-class", "gthread",
            "--threads", str(self.threads),
            "--graceful-timeout", "5",
            "--timeout", "120",
            "--log-level", "warning",
        ]
        if self.gitplug_hooks:
            argv += ["--config", "python:gitplug.gunicorn_conf"]
        argv.append(self.app_spec)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("ab")
        try:
            self.proc = subprocess.Popen(
                argv, cwd=REPO_ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True,
            )
        finally:
            log.close()
        logger.info("bench: started %r (pid %d)", self, self.proc.pid)

    def check_alive(self) -> None:
        """Raise :class:`Unmeasurable` with the log's tail if the master died."""
        if self.proc is None or self.proc.poll() is not None:
            raise Unmeasurable(
                f"{self!r} exited (status {self.proc.returncode if self.proc else None});"
                f" last log lines:\n{self.log_tail()}"
            )

    def log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "(no log)"

    def worker_pids(self) -> set[int]:
        """The live worker processes of this master."""
        try:
            import psutil
        except ImportError as exc:
            raise Unmeasurable("psutil is not installed; run `pip install -e '.[test]'`") from exc

        if self.proc is None:
            return set()
        try:
            pids = {c.pid for c in psutil.Process(self.proc.pid).children() if c.is_running()}
        except psutil.NoSuchProcess:
            return set()
        self._seen_workers |= pids
        return pids

    def hup(self) -> None:
        """Ask the master to reload: new workers, old ones stopped gracefully."""
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGHUP)

    def get(self, path: str, **kwargs: t.Any) -> Reply:
        return request(self.port, "GET", path, **kwargs)

    def post(self, path: str, **kwargs: t.Any) -> Reply:
        return request(self.port, "POST", path, **kwargs)

    def stop(self) -> None:
        """SIGTERM the master, then SIGKILL it and whatever it left in its session.

        Must work on every path out, also when the measurement failed because
        psutil is missing: the master runs in a session (and process group) of
        its own, so its workers are found by group id without psutil.
        """
        if self.proc is None:
            return
        with contextlib.suppress(Unmeasurable):
            self.worker_pids()
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                logger.warning("bench: %r did not stop in 15 s; killing it", self)
                self.proc.kill()
                self.proc.wait(timeout=5)
        # Workers the master left behind are still in its process group (gunicorn
        # workers do not start sessions of their own); the group id is ours while
        # any member lives, so this cannot reach another process.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        for pid in self._seen_workers:
            try:
                os.kill(pid, 0)
            except OSError:
                continue
            # Only a pid we saw as this master's worker; it may have been reused
            # since, so check it is still a gunicorn process of ours first.
            if _is_our_worker(pid, self.proc.pid):
                os.kill(pid, signal.SIGKILL)
        self.proc = None

    def __enter__(self) -> Gunicorn:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _pythonpath(env: Mapping[str, str]) -> str:
    extra = env.get("PYTHONPATH") or os.environ.get("PYTHONPATH")
    return os.pathsep.join([str(REPO_ROOT), *([extra] if extra else [])])


def _is_our_worker(pid: int, master: int) -> bool:
    import psutil

    try:
        proc = psutil.Process(pid)
        return "gunicorn" in " ".join(proc.cmdline()) and proc.ppid() in (master, 1)
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False
