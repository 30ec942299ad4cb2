"""``fleet_convergence_s_p99``: a fleet of three hosts on one PostgreSQL database.

Three gitplug hosts (``bench.apps:gitplug_host()`` under ``gunicorn -w 1``,
each with its own port, ``data_dir`` and ``host_id``) share a fresh database
created for the run (``CREATE DATABASE gitplug_bench_<random>`` on
``$GITPLUG_BENCH_PG``, default ``postgresql://postgres@127.0.0.1:5432/postgres``;
dropped at the end). For each of ``samples`` deploys: a commit, a signed
webhook to one host (rotating), and the clock runs from sending it to the
moment the *last* host's worker published the commit (the workers' own
``plugin_loaded`` event times). ``detail.from_leader_swap_s`` is the time
from the deciding host's swap to the last host's (what README, "Running a
fleet", promises under 1 s on an idle fleet).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import secrets
import time
import uuid
from pathlib import Path

from .figures import Figure, FigureSpec, Target, Unmeasurable, figure, spread
from .fixtures import commit_version, init_repo
from .server import Gunicorn, read_events, wait_for

__all__ = ["FLEET", "measure_fleet"]

logger = logging.getLogger(__name__)

FLEET: FigureSpec = (
    "fleet_convergence_s_p99", "3 hosts: webhook to one -> the last host serving the new commit", "s",
    Target("<", 1),
)

_CONFIG = """\
data_dir: data
host_id: {host_id}
state: ${{GITPLUG_STATE}}
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
"""


class _Database:
    """A fresh database on the bench's PostgreSQL server, dropped on exit."""

    def __init__(self) -> None:
        self.admin = os.environ.get("GITPLUG_BENCH_PG") or "postgresql://postgres@127.0.0.1:5432/postgres"
        self.name = f"gitplug_bench_{secrets.token_hex(5)}"
        self.url = self.admin.rsplit("/", 1)[0] + "/" + self.name

    def _connect(self):  # type: ignore[no-untyped-def]
        try:
            import psycopg
        except ImportError as exc:
            raise Unmeasurable("psycopg is not installed; run `pip install -e '.[test]'`") from exc
        try:
            return psycopg.connect(self.admin, autocommit=True, connect_timeout=3)
        except psycopg.Error as exc:
            from gitplug.errors import redact_url

            raise Unmeasurable(
                f"no PostgreSQL server answers at {redact_url(self.admin)} ({str(exc).strip()[:200]}); "
                "start one or set GITPLUG_BENCH_PG"
            ) from exc

    def __enter__(self) -> _Database:
        with self._connect() as conn:
            conn.execute(f'CREATE DATABASE "{self.name}"')
        return self

    def __exit__(self, *exc: object) -> None:
        with self._connect() as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')


class _Host:
    def __init__(self, root: Path, host_id: str, repo: Path, db_url: str, token: str, secret: str) -> None:
        self.host_id = host_id
        self.dir = root / host_id
        (self.dir / "tmp").mkdir(parents=True)
        self.events = self.dir / "events.jsonl"
        self.secret = secret
        config = self.dir / "deploy.yaml"
        config.write_text(_CONFIG.format(host_id=host_id, repo=json.dumps(str(repo))))
        self.server = Gunicorn(
            "bench.apps:gitplug_host()",
            env={
                "GITPLUG_CONFIG": str(config),
                "GITPLUG_STATE": db_url,
                "GITPLUG_ADMIN_TOKEN": token,
                "GITPLUG_WEBHOOK_SECRET": secret,
                "GITPLUG_SECRET_KEY": secrets.token_hex(16),
                "GITPLUG_BENCH_EVENTS": str(self.events),
                "TMPDIR": str(self.dir / "tmp"),
            },
            log_path=self.dir / "gunicorn.log",
            workers=1,
        )

    def loaded_at(self, commit: str, since: float) -> float | None:
        """When this host's worker published ``commit`` (after ``since``), or None."""
        times = [
            e["t"] for e in read_events(self.events)
            if e["event"] == "loaded" and e.get("commit") == commit and e["t"] >= since
        ]
        return min(times) if times else None

    def webhook(self, repo: Path, commit: str) -> None:
        body = json.dumps({
            "ref": "refs/heads/main", "after": commit,
            "repository": {"clone_url": str(repo), "default_branch": "main"},
        }).encode()
        signature = hmac.new(self.secret.encode(), body, hashlib.sha256).hexdigest()
        reply = self.server.post("/_gitplug/webhook", body=body, headers={
            "Content-Type": "application/json",
            "X-GitHub-Event": "push",
            "X-GitHub-Delivery": str(uuid.uuid4()),
            "X-Hub-Signature-256": f"sha256={signature}",
        })
        if reply.status != 202:
            raise Unmeasurable(f"{self.host_id}: the webhook answered {reply.status}: {reply.body[:300]!r}")


def measure_fleet(workdir: Path, *, samples: int) -> Figure:
    """The figure; raises :class:`Unmeasurable` without a PostgreSQL server."""
    root = workdir / "fleet"
    repo = root / "repo" / "hello"
    repo.parent.mkdir(parents=True)
    first = init_repo(repo, "1.0.0")
    token, secret = secrets.token_urlsafe(16), secrets.token_urlsafe(16)
    with _Database() as db:
        hosts = [_Host(root, f"bench-{i}", repo, db.url, token, secret) for i in (1, 2, 3)]
        started: list[_Host] = []
        try:
            for host in hosts:
                host.server.start()
                started.append(host)
            for host in hosts:
                wait_for(lambda host=host: host.server.check_alive() or host.loaded_at(first, 0.0),
                         timeout=120, what=f"{host.host_id} serving the first commit")
            totals, from_swap, leaders = [], [], []
            for k in range(samples):
                commit = commit_version(repo, f"1.2.{k}")
                target = hosts[k % len(hosts)]
                wall0 = time.time()
                target.webhook(repo, commit)
                wait_for(lambda c=commit, w=wall0: all(h.loaded_at(c, w) for h in hosts), timeout=60,
                         what=f"every host serving {commit[:12]}")
                times = [t for t in (h.loaded_at(commit, wall0) for h in hosts) if t is not None]
                totals.append(max(times) - wall0)
                from_swap.append(max(times) - min(times))
                leaders.append(next(h.host_id for h in hosts if h.loaded_at(commit, wall0) == min(times)))
        finally:
            for host in started:
                host.server.stop()
    s = spread(totals)
    return figure(
        FLEET, value=s.p99, n=s.n, p10=s.p10, p90=s.p90,
        note="3 hosts (gunicorn -w 1 each), PostgreSQL 127.0.0.1, local repo, test gate off; "
             "webhook to one host (rotating) until the last host's worker publishes the commit",
        detail={
            "samples_s": totals,
            "p50_s": s.p50,
            "from_leader_swap_s": from_swap,
            "from_leader_swap_s_p99": spread(from_swap).p99,
            "deciding_hosts": sorted(set(leaders)),
        },
    )
