"""The requirements stage: does this host have what a release asks for?

A release declares its needs in ``pyproject.toml`` (``[project]
dependencies``), else in ``requirements.txt``; a release with neither needs
nothing. Before the test gate runs, :func:`check_requirements` checks each
requirement (environment markers evaluated for this interpreter) against the
distributions installed where the server runs (:mod:`importlib.metadata`)::

    report = check_requirements(release.path)
    if not report.ok:
        raise RequirementsNotMet(report.message("hello", "3f2a..."), ...)

A requirement fails when its distribution is missing, when the installed
version is outside its specifier, or when two lines for one project cannot
both hold (``flask>=3`` and ``flask<2``). A line that cannot be checked
(``-e .``, a URL, ``-r other.txt``, ``--index-url``) is a problem too: it is
reported, never silently ignored. gitplug never installs anything; the fix is
always the operator's (``pip install`` into the host's environment) or the
plugin author's (a requirement the host can meet). README, "Requirements".

Pure reading: no subprocess, no network, no import of the release's code.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

from packaging.markers import InvalidMarker, Marker, UndefinedComparison, UndefinedEnvironmentName
from packaging.requirements import InvalidRequirement, Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import InvalidVersion, Version

__all__ = ["RequirementsReport", "check_requirements", "installed_versions", "read_requirements"]

#: A per-requirement pip option that does not change *what* is required.
_HASH_OPTION = re.compile(r"\s+--hash[=\s]\S+")
_COMMENT = re.compile(r"(^|\s)#.*$")
_URLISH = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://|^[.~/]")


@dataclass(frozen=True)
class Line:
    """One requirement as written: where (``requirements.txt:3``) and what."""

    where: str
    text: str


@dataclass
class RequirementsReport:
    """What :func:`check_requirements` found for one directory.

    ``source`` is the file read (``pyproject.toml``, ``requirements.txt``)
    or None when the release declares nothing; ``problems`` holds one line
    per requirement that is not met or cannot be checked, ``met`` one line
    per requirement that is; ``skipped`` the lines whose markers exclude
    this host.
    """

    source: str | None = None
    problems: list[str] = field(default_factory=list)
    met: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def message(self, plugin: str, what: str) -> str:
        """The error of a failed check: a summary line, then one line per problem."""
        count = len(self.problems)
        head = (
            f"plugin {plugin!r}: {count} requirement{'s' if count != 1 else ''} of {what}"
            f" ({self.source}) {'are' if count != 1 else 'is'} not met by this host's Python"
            " environment. gitplug installs nothing: install them into the environment the"
            " server runs in (pip install ...), or change the requirement, then deploy again"
            " (README, \"Requirements\")."
        )
        return "\n".join([head, *(f"  {line}" for line in self.problems)])


def installed_versions() -> dict[str, str]:
    """``{canonical name: version}`` of every distribution this interpreter can import.

    The first one on ``sys.path`` wins, as it does for ``import``.
    """
    found: dict[str, str] = {}
    for dist in metadata.distributions():
        name = dist.metadata["Name"] if dist.metadata else None
        if name:
            found.setdefault(canonicalize_name(name), dist.version)
    return found


def read_requirements(root: Path) -> tuple[str | None, list[Line], list[str]]:
    """``(source, lines, problems)``: the requirements a release declares.

    ``pyproject.toml`` with a ``[project] dependencies`` list wins; else
    ``requirements.txt``; else nothing (``source`` None). ``problems`` are
    lines or files that cannot be read as requirements.
    """
    pyproject = root / "pyproject.toml"
    if pyproject.is_file():
        try:
            data = tomllib.loads(pyproject.read_text("utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError, OSError) as exc:
            return "pyproject.toml", [], [f"pyproject.toml: cannot be read as TOML ({exc}); fix the file"]
        project = data.get("project")
        if isinstance(project, Mapping) and "dependencies" in project:
            deps = project["dependencies"]
            if not isinstance(deps, list) or not all(isinstance(d, str) for d in deps):
                return "pyproject.toml", [], [
                    "pyproject.toml: [project] dependencies must be a list of strings such as"
                    ' ["requests>=2.31"]'
                ]
            return "pyproject.toml", [Line(f"pyproject.toml dependencies[{i}]", d) for i, d in enumerate(deps)], []
    txt = root / "requirements.txt"
    if txt.is_file():
        try:
            text = txt.read_text("utf-8")
        except (UnicodeDecodeError, OSError) as exc:
            return "requirements.txt", [], [f"requirements.txt: cannot be read ({exc}); save it as UTF-8 text"]
        return "requirements.txt", list(_txt_lines(text)), []
    return None, [], []


def _txt_lines(text: str) -> Iterable[Line]:
    """Non-blank lines of a requirements file, comments removed, ``\\`` continuations joined."""
    pending, start = "", 0
    for number, raw in enumerate(text.splitlines(), 1):
        if not pending:
            start = number
        if raw.endswith("\\"):
            pending += raw[:-1] + " "
            continue
        line = _COMMENT.sub("", pending + raw).strip()
        pending = ""
        if line:
            yield Line(f"requirements.txt:{start}", line)
    if pending.strip():
        yield Line(f"requirements.txt:{start}", _COMMENT.sub("", pending).strip())


def _unparsable(line: Line, why: str) -> str:
    return f"{line.where}: {line.text!r}: {why}"


def check_requirements(
    root: Path,
    *,
    installed: Mapping[str, str] | None = None,
    environment: Mapping[str, str] | None = None,
) -> RequirementsReport:
    """Check the requirements declared under ``root`` against the installed distributions.

    ``installed`` (``{canonical name: version}``) defaults to this
    interpreter's (:func:`installed_versions`); ``environment`` to the
    marker environment of this interpreter. Never raises for a release's
    content: everything wrong becomes a line of ``problems``.
    """
    source, lines, problems = read_requirements(Path(root))
    report = RequirementsReport(source=source, problems=list(problems))
    if not lines:
        return report
    versions = installed_versions() if installed is None else installed
    by_project: dict[str, list[tuple[Line, Requirement]]] = {}
    for line in lines:
        requirement = _parse(line, report)
        if requirement is None:
            continue
        if requirement.marker is not None and not _marker_holds(requirement.marker, environment, line, report):
            continue
        by_project.setdefault(canonicalize_name(requirement.name), []).append((line, requirement))
    for project, asked in by_project.items():
        have = versions.get(project)
        texts = " and ".join(repr(str(r)) for _, r in asked)
        if len(asked) > 1 and not _can_all_hold([r.specifier for _, r in asked], have):
            report.problems.append(
                f"{texts}: conflicting requirements for {project} (no version satisfies all of"
                f" them); installed: {have or 'none'}"
            )
            continue
        for _line, requirement in asked:
            met, text = _check_one(requirement, have, versions, environment)
            (report.met if met else report.problems).append(text)
    return report


def _parse(line: Line, report: RequirementsReport) -> Requirement | None:
    text = _HASH_OPTION.sub("", " " + line.text).strip()  # pip-compile's --hash options
    if text.startswith("-"):
        option = text.split()[0]
        why = {
            "-e": "an editable install cannot be checked; install it into the host and require it by name",
            "--editable": "an editable install cannot be checked; install it into the host and require it by name",
            "-r": "gitplug reads one requirements file; list the requirements here instead of including",
            "--requirement": "gitplug reads one requirements file; list the requirements here instead",
            "-c": "constraints files are not read; put the versions in the requirement lines",
            "--constraint": "constraints files are not read; put the versions in the requirement lines",
        }.get(option, "pip options (index URLs, find-links, ...) are not used: gitplug installs nothing")
        report.problems.append(_unparsable(line, f"cannot be checked: {why}"))
        return None
    if _URLISH.match(text):
        report.problems.append(_unparsable(
            line, "cannot be checked: a URL or path is not a requirement; require the project by name"
            " and version (e.g. 'requests>=2.31') and install it into the host"))
        return None
    try:
        requirement = Requirement(text)
    except InvalidRequirement as exc:
        report.problems.append(_unparsable(line, f"is not a valid requirement ({str(exc).splitlines()[0]})"))
        return None
    if requirement.url:
        report.problems.append(_unparsable(
            line, "cannot be checked: a direct URL reference ('name @ url'); require the project by"
            " name and version and install it into the host"))
        return None
    return requirement


def _marker_holds(
    marker: Marker, environment: Mapping[str, str] | None, line: Line, report: RequirementsReport
) -> bool:
    try:
        # extra "" : a plugin's own optional extras are never installed by gitplug.
        holds = marker.evaluate({**(environment or {}), "extra": ""})
    except (InvalidMarker, UndefinedComparison, UndefinedEnvironmentName) as exc:
        report.problems.append(_unparsable(line, f"its marker cannot be evaluated ({exc})"))
        return False
    if not holds:
        report.skipped.append(f"{line.text} (marker false on this host)")
    return holds


def _check_one(
    requirement: Requirement,
    have: str | None,
    versions: Mapping[str, str],
    environment: Mapping[str, str] | None,
) -> tuple[bool, str]:
    """``(met, the report line)`` for one requirement whose marker holds."""
    asked = str(requirement)
    if have is None:
        return False, f"{asked!r}: not installed"
    if not _satisfies(requirement.specifier, have):
        return False, f"{asked!r}: installed {canonicalize_name(requirement.name)} {have} does not satisfy it"
    missing = [problem for extra in sorted(requirement.extras)
               for problem in _extra_problems(requirement.name, extra, versions, environment)]
    if missing:
        return False, f"{asked!r}: installed {have}, but " + "; ".join(missing)
    return True, f"{asked!r}: installed {have}"


def _extra_problems(
    name: str, extra: str, versions: Mapping[str, str], environment: Mapping[str, str] | None
) -> list[str]:
    """What the extra ``name[extra]`` needs that is not installed (one level deep)."""
    try:
        requires = metadata.requires(name) or []
    except metadata.PackageNotFoundError:
        return []
    found = []
    for text in requires:
        try:
            dep = Requirement(text)
        except InvalidRequirement:
            continue
        if dep.marker is None or not dep.marker.evaluate({**(environment or {}), "extra": extra}):
            continue
        if dep.marker.evaluate({**(environment or {}), "extra": ""}):
            continue  # a plain dependency, not the extra's
        have = versions.get(canonicalize_name(dep.name))
        if have is None or not _satisfies(dep.specifier, have):
            what = f"installed {have}" if have else "not installed"
            found.append(f"extra {extra!r} needs {dep.name}{dep.specifier} ({what})")
    return found


def _satisfies(specifier: SpecifierSet, version: str) -> bool:
    try:
        return specifier.contains(Version(version), prereleases=True)
    except InvalidVersion:
        return specifier.contains(version, prereleases=True)


def _can_all_hold(specifiers: list[SpecifierSet], have: str | None) -> bool:
    """Whether some version satisfies every specifier (checked on candidate versions).

    Candidates: the installed version, every version the specifiers name,
    and their neighbours (a component bumped, a component appended), which
    is where a non-empty intersection of PEP 440 ranges always has a member.
    """
    combined = SpecifierSet(",".join(str(s) for s in specifiers if str(s)))
    if not str(combined):
        return True
    candidates: set[str] = {have} if have else set()
    for spec in combined:
        candidates.update(_neighbours(spec.version.rstrip(".*")))
    return any(_satisfies(combined, candidate) for candidate in candidates)


def _neighbours(text: str) -> set[str]:
    try:
        release = Version(text).release
    except InvalidVersion:
        return {text}
    out = {text, ".".join(map(str, release)) + ".1", ".".join(map(str, release)) + ".0.1"}
    for i in range(len(release)):
        bumped = [*release[:i], release[i] + 1]
        out.add(".".join(map(str, bumped)))
        if release[i] > 0:
            out.add(".".join(map(str, [*release[:i], release[i] - 1, 999])))
    return out
