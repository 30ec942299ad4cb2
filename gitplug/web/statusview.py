"""The status page's view-model: what the page shows of each plugin, commit and message.

:func:`_plugin_view` builds a :class:`PluginView` (with :class:`CommitView`
and the rollback :func:`_choices`) from a plugin's ``gitplug status`` entry,
its history, its releases on disk and its git mirror's tags;
:func:`_flash_view` turns the read-once message of
:mod:`gitplug.web.statuspage` into a :class:`FlashView`; :func:`_ago`,
:func:`_duration` and :func:`_short_ref` format values for the templates.

Separate from :mod:`gitplug.web.statuspage`, which keeps the routes, the login,
CSRF and cookies: nothing here reads the request, a cookie or the admin
token, so what the page shows can change without touching the code that
guards it.
"""

from __future__ import annotations

import logging
import typing as t
from dataclasses import dataclass
from datetime import datetime, timezone

from ..config import PluginConfig
from ..deploy.gitsource import redact_url
from ..errors import GitplugError
from ..state import DeployRecord, DeployResult, parse_iso

logger = logging.getLogger(__name__)

# -- what the page shows ------------------------------------------------------------

#: Rows of history per plugin, and entries per group of the rollback list.
HISTORY_ROWS = 15
CHOICE_LIMIT = 20


@dataclass(frozen=True)
class CommitView:
    """A commit as the page shows it: sha, first line, author, age, test verdict."""

    sha: str
    summary: str
    author: str
    when: str  #: ISO time: the commit's, else the release's staging time
    when_label: str  #: "committed" or "staged"
    tests: str


@dataclass(frozen=True)
class PluginView:
    """Everything the page shows about one plugin."""

    name: str
    state: str
    ref: str
    pin: str | None
    repo: str  #: password-free
    url_prefix: str
    live: CommitView | None
    live_since: DeployRecord | None
    workers: tuple[tuple[str, str | None], ...]
    #: (host id, its entry of ``status["hosts"]``), by id; shown when there are several.
    hosts: tuple[tuple[str, dict[str, t.Any]], ...]
    last_error: str | None
    history: tuple[DeployRecord, ...]
    #: Rollback targets: ((group label, ((value, label), ...)), ...).
    choices: tuple[tuple[str, tuple[tuple[str, str], ...]], ...]
    #: Why the plugin is ``behind`` its tracked ref, in one line (else None).
    state_reason: str | None = None
    #: The running canary (``status["canary"]``: split, both commits, each side's
    #: requests and errors), else None (README, "Canary releases").
    canary: dict[str, t.Any] | None = None

    @property
    def running(self) -> bool:
        return any(r.result == DeployResult.RUNNING for r in self.history[:3])


@dataclass(frozen=True)
class FlashView:
    """The message shown once after an action."""

    kind: str  #: ok | info | error
    title: str
    detail: str | None
    plugin: str | None
    record: DeployRecord | None


def _ago(iso: str | None) -> str:
    if not iso:
        return "-"
    try:
        seconds = (datetime.now(timezone.utc) - parse_iso(iso)).total_seconds()
    except ValueError:
        return iso
    for unit, size in (("day", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            n = int(seconds // size)
            return f"{n} {unit}{'s' if unit == 'day' and n > 1 else ''} ago"
    return "just now" if seconds < 5 else f"{int(seconds)} s ago"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 60:
        return f"{seconds:.2f} s"
    return f"{int(seconds // 60)} min {int(seconds % 60)} s"


def _short_ref(ref: str | None) -> str:
    """A full sha cut to 12 digits (a pin set from "previous"); any other ref as it is."""
    if ref and len(ref) == 40 and all(c in "0123456789abcdef" for c in ref):
        return ref[:12]
    return ref or ""


def _first_line(text: str) -> str:
    return (text.strip().splitlines() or [""])[0]


def _commit_view(deployer: t.Any, plugin: PluginConfig, sha: str) -> CommitView:
    try:
        release = deployer.releases.get(plugin.name, sha)
    except ValueError:  # not a full sha: a directory release
        release = None
    when, label = (release.staged_at if release else ""), "staged"
    try:
        info = deployer.git.commit_info(plugin.repo, sha, plugin=plugin.name)
        when, label = info.committed_at.isoformat().replace("+00:00", "Z"), "committed"
    except GitplugError:
        info = None  # no mirror (served from disk): the release metadata will do
    message = release.message if release else (info.message if info else "")
    author = release.author if release else (info.author if info else "")
    test = release.test if release else None
    if test is None:
        tests = "tests not run yet"
    elif test.passed:
        skipped = test.returncode is None  # the gate is off, or no tests/ to run
        tests = "test gate skipped" if skipped else f"tests passed in {_duration(test.duration_s)}"
    else:
        tests = "tests failed"
    return CommitView(sha, _first_line(message), author.split(" <")[0], when, label, tests)


def _tags(deployer: t.Any, plugin: PluginConfig) -> list[tuple[str, str]]:
    """(tag, commit) of the mirror's tags, newest commit first; [] before the first fetch."""
    if not deployer.git.mirror_path(plugin.repo).is_dir():
        return []
    try:
        tags = deployer.git.tags(plugin.name, plugin.repo)
    except GitplugError as exc:
        logger.warning("plugin %s: could not list its tags: %s", plugin.name, exc)
        return []
    return [(name, sha) for name, sha, _ in tags[:CHOICE_LIMIT]]


def _choices(
    deployer: t.Any, plugin: PluginConfig, live: str | None, previous: str | None
) -> tuple[tuple[str, tuple[tuple[str, str], ...]], ...]:
    """The rollback list: the previous commit, the tags, the releases on disk."""
    on_disk = deployer.releases.list(plugin.name)[:CHOICE_LIMIT]
    summaries = {r.commit: _first_line(r.message)[:50] for r in on_disk}

    def label(sha: str, prefix: str = "") -> str:
        parts = [prefix, sha[:7], summaries.get(sha, ""), "live" if sha == live else ""]
        return " · ".join(p for p in parts if p)

    def tested(release: t.Any) -> str:
        return "" if release.test is None or release.test.passed else " · tests failed"

    groups = (
        ("Previous release",
         tuple((c, label(c, "previous")) for c in [previous] if c and c != live)),
        ("Tags", tuple((name, label(sha, name)) for name, sha in _tags(deployer, plugin))),
        ("Releases on disk", tuple((r.commit, label(r.commit) + tested(r)) for r in on_disk)),
    )
    return tuple((name, items) for name, items in groups if any(v for v, _ in items))


def _plugin_view(
    deployer: t.Any, store: t.Any, plugin: PluginConfig, status: dict[str, t.Any]
) -> PluginView:
    """One plugin's card, from its ``gitplug status`` entry, history and releases."""
    live = status["live_commit"]
    history = tuple(store.history(plugin.name, limit=HISTORY_ROWS))
    return PluginView(
        name=plugin.name,
        state=status["state"],
        ref=plugin.ref,
        pin=status["pin"],
        repo=redact_url(plugin.repo),
        url_prefix=status["url_prefix"],
        live=_commit_view(deployer, plugin, live) if live else None,
        live_since=next(
            (r for r in history if r.result == DeployResult.LIVE and r.commit == live), None
        ),
        workers=tuple(sorted(status["workers"].items())),
        hosts=tuple(sorted(status.get("hosts", {}).items())),
        last_error=status["last_error"],
        history=history,
        choices=_choices(deployer, plugin, live, status.get("previous_commit")),
        state_reason=status.get("state_reason"),
        canary=status.get("canary"),
    )


def _flash_view(store: t.Any, data: dict[str, t.Any]) -> FlashView:
    """The message for the flash ``data``; a deploy's outcome is read back from the store."""
    plugin, action = data.get("plugin"), str(data.get("action") or "deploy")
    record = store.get_deploy(data["deploy"]) if isinstance(data.get("deploy"), int) else None
    if record is None:
        kind = data.get("kind") if data.get("kind") in ("ok", "info", "error") else "info"
        title, _, detail = str(data.get("text") or "Done.").partition("\n")
        return FlashView(kind, title, detail.strip() or None, plugin, None)
    short = (record.commit or "")[:7] or "?"
    if record.result == DeployResult.LIVE:
        title = f"{plugin}: {short} is live (deploy #{record.id}, {action})."
        if action == "rollback":
            title += (f" Pinned at {_short_ref(record.ref)}: polls and webhooks are ignored"
                      " until you resume.")
        return FlashView("ok", title, None, plugin, record)
    if record.result == DeployResult.RUNNING and record.stage is not None and record.stage.value == "canary":
        figures = record.canary_figures or {}
        title = (f"{plugin}: {short} serves {figures.get('percent', 0):g}% of the clients as a canary"
                 f" (deploy #{record.id}); it is promoted or rolled back by itself, or by the buttons below.")
        return FlashView("ok", title, None, plugin, record)
    if action == "abort" and record.result == DeployResult.FAILED:
        title = f"{plugin}: canary {short} rolled back (deploy #{record.id}); the live release serves every client."
        return FlashView("ok", title, None, plugin, record)
    if record.result == DeployResult.SKIPPED:
        title = f"{plugin}: {short} is already live; nothing to swap (deploy #{record.id})."
        return FlashView("info", title, None, plugin, record)
    # The plugin's card shows the error itself; the message says what happened.
    stage = record.stage.value if record.stage else "?"
    title = (f"{plugin}: {action} failed at {stage} (deploy #{record.id});"
             " the live release is unchanged.")
    return FlashView("error", title, None, plugin, record)
