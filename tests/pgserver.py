"""A real PostgreSQL server for the tests: fresh databases, dropped afterwards.

The server is ``postgresql://postgres@127.0.0.1:5432/postgres`` (trust auth)
unless ``GITPLUG_TEST_PG`` names another (a libpq URL of a database the user
may ``CREATE DATABASE`` from). When no server answers the tests that need it
skip, saying how to run one; under ``CI=true`` they fail instead, so CI can
never pass by skipping them.
"""

from __future__ import annotations

import os
import secrets
import typing as t
from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import urlsplit, urlunsplit

import pytest

ADMIN_URL = os.environ.get("GITPLUG_TEST_PG") or "postgresql://postgres@127.0.0.1:5432/postgres"

HOW_TO_RUN = (
    "no PostgreSQL server answers at {url} ({why}). The fleet tests need one: start it with "
    "`docker run --rm -p 127.0.0.1:5432:5432 -e POSTGRES_HOST_AUTH_METHOD=trust postgres:15` "
    "(or apt-get install postgresql-15 and allow trust auth for 127.0.0.1), or point "
    "GITPLUG_TEST_PG at one: GITPLUG_TEST_PG=postgresql://USER:PASSWORD@HOST/postgres"
)

_answer: list[str | None] = []


def _admin() -> t.Any:
    import psycopg

    return psycopg.connect(ADMIN_URL, autocommit=True, connect_timeout=3)


def server_problem() -> str | None:
    """None when the server answers, else why not (checked once per run)."""
    if not _answer:
        try:
            import psycopg  # noqa: F401 - only to report a missing install clearly
        except ImportError as exc:
            _answer.append(f"psycopg is not installed ({exc}); pip install -e '.[test]'")
            return _answer[0]
        try:
            with _admin() as conn:
                conn.execute("SELECT 1")
            _answer.append(None)
        except Exception as exc:  # noqa: BLE001 - any failure means "no server"
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            _answer.append(first)
    return _answer[0]


def require_server() -> None:
    """Skip the calling test when no server answers (fail under ``CI=true``)."""
    problem = server_problem()
    if problem is None:
        return
    message = HOW_TO_RUN.format(url=_redacted(ADMIN_URL), why=problem)
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail("CI=true: " + message, pytrace=False)
    pytest.skip(message)


def _redacted(url: str) -> str:
    from gitplug.errors import redact_url

    return redact_url(url)


def url_for(database: str) -> str:
    """The admin URL with its database replaced by ``database``."""
    parts = urlsplit(ADMIN_URL)
    return urlunsplit((parts.scheme, parts.netloc, "/" + database, parts.query, parts.fragment))


@contextmanager
def fresh_database(prefix: str = "gitplug_test") -> Iterator[str]:
    """Create an empty database, yield its URL, drop it (even if still in use) afterwards."""
    require_server()
    name = f"{prefix}_{secrets.token_hex(6)}"
    with _admin() as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield url_for(name)
    finally:
        with _admin() as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
