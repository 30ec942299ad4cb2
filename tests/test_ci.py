"""The lowest-pins pass of .ci/run: constraints written from pyproject.toml's lower bounds."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / ".ci" / "lowest-constraints.py"


def _run(pyproject: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SCRIPT), "--pyproject", str(pyproject), *args],
        capture_output=True, text=True, timeout=60, check=False,
    )


def _pyproject(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "pyproject.toml"
    path.write_text(textwrap.dedent(body), encoding="utf-8")
    return path


def test_every_dependency_and_extra_is_pinned_at_its_lower_bound(tmp_path: Path) -> None:
    pyproject = _pyproject(tmp_path, """
        [project]
        name = "x"
        dependencies = ["Flask>=3.1.0", "apscheduler>=3.10.0,<4", "PyYAML>=6.0", "jinja2>=3.1,>=3.1.2"]
        [project.optional-dependencies]
        fleet = ["psycopg[binary]>=3.2.1"]
        test = ["psycopg[binary]>=3.2.1", "gunicorn>=24.1.0; sys_platform != 'win32'"]
        docs = ["sphinx"]
    """)
    result = _run(pyproject)
    assert result.returncode == 0, result.stderr
    # One line per distribution, normalised names, extras dropped (pip refuses them in
    # constraints); the "docs" group is not asked for, so its unbounded sphinx is fine.
    assert result.stdout.splitlines() == [
        "apscheduler==3.10.0", "flask==3.1.0", "gunicorn==24.1.0", "jinja2==3.1.2",
        "psycopg==3.2.1", "pyyaml==6.0",
    ]


def test_a_dependency_without_a_lower_bound_is_refused_by_name(tmp_path: Path) -> None:
    pyproject = _pyproject(tmp_path, """
        [project]
        name = "x"
        dependencies = ["flask>=3.1.0"]
        [project.optional-dependencies]
        test = ["selenium<5"]
    """)
    result = _run(pyproject, "--extras", "test")
    assert result.returncode == 1 and result.stdout == ""
    assert "optional-dependencies.test: 'selenium<5' has no lower bound" in result.stderr
    assert "Traceback" not in result.stderr


def test_two_groups_disagreeing_on_a_bound_are_refused(tmp_path: Path) -> None:
    pyproject = _pyproject(tmp_path, """
        [project]
        name = "x"
        dependencies = []
        [project.optional-dependencies]
        fleet = ["psycopg[binary]>=3.2.1"]
        test = ["psycopg>=3.2"]
    """)
    result = _run(pyproject)
    assert result.returncode == 1
    assert "psycopg has lower bound 3.2 in optional-dependencies.test but 3.2.1 in optional-dependencies.fleet" in result.stderr


def test_the_projects_own_pins_cover_every_dependency(tmp_path: Path) -> None:
    """gitplug's pyproject.toml gives each dependency a bound, so the lowest pass can install it."""
    import tomllib

    out = tmp_path / "lowest.txt"
    result = _run(ROOT / "pyproject.toml", "-o", str(out))
    assert result.returncode == 0, result.stderr
    pinned = {line.split("==")[0] for line in out.read_text().splitlines()}
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = project["dependencies"] + project["optional-dependencies"]["test"] + project["optional-dependencies"]["fleet"]
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    assert pinned == {canonicalize_name(Requirement(r).name) for r in declared}
