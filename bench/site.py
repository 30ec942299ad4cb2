"""The gitplug server the live figures run against, and their plan.

:class:`Site` is gitplug's standalone host (``bench.apps:gitplug_host()``)
under ``gunicorn -w 2 -k gthread --threads 4 -c python:gitplug.gunicorn_conf``,
configured with a local git repository of the example plugin, ``test:
false`` and a poll interval of an hour (the first poll deploys the first
commit; after that only webhooks and the API move it). It knows its secrets,
sends signed webhooks and rollback API calls, and reads the ``plugin_loaded``
events every worker appends (see :mod:`bench.apps`).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import secrets
import typing as t
import uuid
from dataclasses import dataclass
from pathlib import Path

from .figures import Unmeasurable
from .fixtures import init_repo
from .server import Gunicorn, read_events, wait_for

__all__ = ["LivePlan", "Site", "served", "RELEASE_PATH"]

logger = logging.getLogger(__name__)

#: The example plugin's JSON description of the release serving it.
RELEASE_PATH = "/hello/api/release"


@dataclass(frozen=True)
class LivePlan:
    """How much of each server figure to measure."""

    hup_samples: int
    webhook_samples: int
    #: Pairs of load windows (one still, one swapping) for throughput and convergence.
    load_pairs: int
    #: Length of a window; the first ``guard_s`` of each is not counted, so that
    #: the end of a swap that spills over from one window is never billed to
    #: the next one.
    window_s: float = 2.25
    guard_s: float = 0.25
    swap_every_s: float = 0.5
    connections: int = 4
    workers: int = 2


def served(server: Gunicorn, field: str) -> t.Any:
    """``field`` of ``/hello/api/release`` (``version``, ``commit``), or None."""
    reply = server.get(RELEASE_PATH, timeout=10)
    if reply.status != 200:
        return None
    return reply.json().get(field)


_CONFIG = """\
data_dir: data
poll_interval: 3600
admin_token: ${{GITPLUG_ADMIN_TOKEN}}
webhook:
  secret: ${{GITPLUG_WEBHOOK_SECRET}}
plugins:
  hello:
    repo: {repo}
    ref: main
    url_prefix: /hello
    test: false
    config:
      GREETING: Hello from the bench
"""


class Site:
    """The gitplug server under test, its repository and its secrets."""

    def __init__(self, workdir: Path, workers: int, *, name: str = "site") -> None:
        self.root = workdir / name
        self.repo = self.root / "repo" / "hello"
        self.events = self.root / "events.jsonl"
        self.token = secrets.token_urlsafe(16)
        self.secret = secrets.token_urlsafe(16)
        (self.root / "tmp").mkdir(parents=True)
        self.first_commit = init_repo(self.repo, "1.0.0")
        #: The two newest commits deployed (the load windows alternate them).
        self.last_commit: str = self.first_commit
        self.previous_commit: str | None = None
        self.config = self.root / "deploy.yaml"
        self.config.write_text(_CONFIG.format(repo=json.dumps(str(self.repo))))
        self.server = Gunicorn(
            "bench.apps:gitplug_host()",
            env={
                "GITPLUG_CONFIG": str(self.config),
                "GITPLUG_ADMIN_TOKEN": self.token,
                "GITPLUG_WEBHOOK_SECRET": self.secret,
                "GITPLUG_SECRET_KEY": secrets.token_hex(16),
                "GITPLUG_BENCH_EVENTS": str(self.events),
                "TMPDIR": str(self.root / "tmp"),
            },
            log_path=self.root / "gunicorn.log",
            workers=workers,
        )

    def __repr__(self) -> str:
        return f"<Site {self.root} {self.server!r}>"

    def loaded_events(self) -> list[dict[str, t.Any]]:
        """Every ``plugin_loaded`` event the workers recorded, oldest first."""
        return [e for e in read_events(self.events) if e["event"] == "loaded"]

    def loads(self, commit: str, since: float = 0.0) -> dict[int, float]:
        """``{worker pid: time it published commit}`` (first time after ``since``)."""
        out: dict[int, float] = {}
        for event in self.loaded_events():
            if event.get("commit") == commit and event["t"] >= since:
                out.setdefault(event["pid"], event["t"])
        return out

    def wait_all_workers(self, commit: str, since: float, what: str) -> None:
        """Wait until every live worker has published ``commit`` after ``since``."""

        def converged() -> bool:
            self.server.check_alive()
            workers = self.server.worker_pids()
            return bool(workers) and workers <= set(self.loads(commit, since))

        wait_for(converged, timeout=60, what=what)

    def webhook(self, commit: str) -> int:
        """A GitHub push event for ``main`` at ``commit``, signed; returns the status (202)."""
        body = json.dumps({
            "ref": "refs/heads/main",
            "after": commit,
            "repository": {"clone_url": str(self.repo), "default_branch": "main"},
        }).encode()
        signature = hmac.new(self.secret.encode(), body, hashlib.sha256).hexdigest()
        reply = self.server.post("/_gitplug/webhook", body=body, headers={
            "Content-Type": "application/json",
            "X-GitHub-Event": "push",
            "X-GitHub-Delivery": str(uuid.uuid4()),
            "X-Hub-Signature-256": f"sha256={signature}",
        })
        if reply.status != 202:
            raise Unmeasurable(f"the webhook answered {reply.status}: {reply.body[:300]!r}")
        return reply.status

    def rollback(self, commit: str) -> int:
        """``POST /_gitplug/api/plugins/hello/rollback`` to ``commit``; returns the status."""
        reply = self.server.post(
            "/_gitplug/api/plugins/hello/rollback",
            body=json.dumps({"ref": commit}).encode(),
            headers={"Authorization": f"Bearer {self.token}", "Content-Type": "application/json"},
            timeout=30,
        )
        return reply.status
