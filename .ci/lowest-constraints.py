#!/usr/bin/env python3
"""Write pip constraints pinning every dependency of gitplug at its lower bound.

Reads pyproject.toml ([project] dependencies and the optional groups named on
the command line, ``test`` and ``fleet`` by default) and prints one
``name==bound`` line per distribution, for ``pip install -c``. The lowest pass
of ``.ci/run`` installs exactly these versions, so the bounds that
pyproject.toml promises are the versions the suite runs on: there is no second
list that could drift from them (README, "Supported versions").

Exits 1, naming the requirement, when one has no ``>=`` or ``==`` lower bound,
or when two groups give the same distribution different lower bounds.
Needs ``packaging`` (a dependency of gitplug and of pip).
"""

from __future__ import annotations

import argparse
import sys
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent


def lower_bound(req: Requirement) -> Version | None:
    """The version a ``>=``/``==``/``~=`` specifier starts at (the highest if several)."""
    bounds = [Version(s.version) for s in req.specifier if s.operator in (">=", "==", "~=", "===")]
    return max(bounds) if bounds else None


def constraints(pyproject: Path, extras: list[str]) -> list[str]:
    """``name==bound`` lines for the dependencies and *extras* of *pyproject*, sorted by name.

    Raises SystemExit with a message naming the file and requirement on a
    dependency without a lower bound, an unknown extra, or conflicting bounds.
    """
    project = tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]
    groups: list[tuple[str, list[str]]] = [("dependencies", project.get("dependencies", []))]
    optional = project.get("optional-dependencies", {})
    for extra in extras:
        if extra not in optional:
            raise SystemExit(
                f"{pyproject}: no [project.optional-dependencies] group {extra!r} "
                f"(have: {', '.join(sorted(optional))}); fix the extras passed to {Path(__file__).name}"
            )
        groups.append((f"optional-dependencies.{extra}", optional[extra]))

    pins: dict[str, tuple[Version, str]] = {}
    for where, reqs in groups:
        for text in reqs:
            req = Requirement(text)
            bound = lower_bound(req)
            if bound is None:
                raise SystemExit(
                    f"{pyproject}: [project] {where}: {text!r} has no lower bound; "
                    f"give it one (name>=X.Y) so the lowest CI pass can install it"
                )
            name = canonicalize_name(req.name)
            if name in pins and pins[name][0] != bound:
                raise SystemExit(
                    f"{pyproject}: {req.name} has lower bound {pins[name][0]} in {pins[name][1]} "
                    f"but {bound} in {where}; make them the same"
                )
            pins[name] = (bound, where)
    # pip refuses extras in a constraints file: psycopg[binary] is pinned as psycopg
    # (its binary extra pins psycopg-binary to the same version).
    return [f"{name}=={bound}" for name, (bound, _) in sorted(pins.items())]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pyproject", type=Path, default=ROOT / "pyproject.toml")
    parser.add_argument("--extras", default="test,fleet", help="comma-separated optional groups")
    parser.add_argument("-o", "--output", type=Path, help="write here instead of stdout")
    args = parser.parse_args(argv)
    extras = [e for e in args.extras.split(",") if e]
    text = "".join(f"{line}\n" for line in constraints(args.pyproject, extras))
    if args.output:
        args.output.write_text(text, encoding="utf-8")
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
