"""The pytest fixtures of the gunicorn tests, imported by each test module.

Import them explicitly (``from gunicorn_fixtures import site_fixture  # noqa: F401``):
they are not in ``conftest.py``, so only the gunicorn tests see them. Each is
registered under its short name (``site``, ``gated_site``) with ``name=``, so a
test's parameter does not shadow the imported function (ruff F811).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from gunicorn_site import Site, make_site


@pytest.fixture(name="site")
def site_fixture(tmp_path: Path) -> Site:
    """Release r000 deployed through the CLI, before any server starts; no test gate."""
    return make_site(tmp_path)


@pytest.fixture(name="gated_site")
def gated_site_fixture(tmp_path: Path) -> Site:
    """As :func:`site`, with each release's ``gate.py`` as its test gate."""
    return make_site(tmp_path, gate=True)
