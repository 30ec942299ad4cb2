"""The value types of gitplug's configuration: what loading it returns.

:class:`GitplugConfig` (the whole configuration), :class:`PluginConfig` (one
plugin), :class:`AutoRollback`, :class:`ConfigDiff` (what a reload changes)
and :data:`DEFAULT_TEST_COMMAND`. Import them from :mod:`gitplug.config`,
which re-exports them and is their public home.

They are defined here, apart from the loading functions, because both
:mod:`gitplug.config` (which returns them) and :mod:`gitplug.config.schema`
(which builds them) need them: defined in ``config.py`` they would make the
two modules import each other. This module imports no other part of the
configuration code.
"""

from __future__ import annotations

import copy
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Final

from ..errors import UnknownPlugin

#: The test gate's command when a plugin gives no ``test``.
DEFAULT_TEST_COMMAND: Final[tuple[str, ...]] = ("python", "-m", "pytest", "-q", "-p", "no:cacheprovider")
#: ``webhook.max_body`` when not given: GitHub's own cap on a delivery (25 MB), in MiB.
DEFAULT_WEBHOOK_MAX_BODY: Final = 25 << 20


#: The push remote's default body limit: 100 MiB.
DEFAULT_PUSH_MAX_SIZE: Final = 100 << 20

#: Where a ``repo: push`` plugin's bare repository lives, under ``data_dir``.
HOSTED_DIR: Final = "hosted"


def hosted_repo_path(data_dir: Path, name: str) -> Path:
    """The bare repository gitplug hosts for plugin ``name`` (``repo: push``)."""
    return data_dir / HOSTED_DIR / f"{name}.git"


@dataclass(frozen=True, kw_only=True)
class AutoRollback:
    """When a newly live release is swapped back (``auto_rollback`` in the README's "Configuration")."""

    max_error_rate: float = 0.2  #: 0 < rate <= 1, over the first ``min_requests`` requests
    min_requests: int = 20  #: >= 1
    window: float = 60.0  #: seconds > 0


#: ``verify.mode``: what must be signed.
VERIFY_MODES: Final = ("head", "tag")


@dataclass(frozen=True, kw_only=True)
class VerifyConfig:
    """``verify``: which signatures a deploy requires (README, "Signed commits").

    ``mode`` ``head``: the deployed commit itself must be signed; ``tag``: an
    annotated tag naming it (the ref's own tag, when the ref is a tag). A
    signature counts when its key is in ``allowed_signers`` (SSH, git's
    ``gpg.ssh.allowedSignersFile`` format) or among ``gpg_keys`` (OpenPGP
    public keys). Paths are absolute; at least one of the two is given.
    """

    mode: str = "head"
    allowed_signers: str | None = None
    gpg_keys: tuple[str, ...] = ()


@dataclass(frozen=True, kw_only=True)
class Credential:
    """One ``credentials:`` entry: what gitplug sends to repositories whose URL starts with ``url``.

    HTTPS: ``username`` + ``password`` (a token). SSH: ``ssh_key`` (a private
    key file), its ``passphrase`` if any, and ``known_hosts`` (host keys are
    always checked). Secrets never appear in ``repr``.
    """

    url: str  #: the prefix as written (no password in it)
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    ssh_key: str | None = None
    passphrase: str | None = field(default=None, repr=False)
    known_hosts: str | None = None


@dataclass(frozen=True, kw_only=True)
class Canary:
    """How a new release earns its traffic (``canary`` in the README's "Canary releases").

    The new release serves ``percent`` of the plugin's requests beside the
    live one; once it has served ``min_requests`` and ``duration`` seconds
    have passed it is promoted if its error rate is at most
    ``max_error_rate`` and not clearly worse than the live release's, else
    it is rolled back.
    """

    percent: float = 10.0  #: 0 < percent < 100, of the plugin's clients
    min_requests: int = 100  #: >= 1, served by the canary before it is judged
    duration: float = 300.0  #: seconds > 0 before it is judged
    max_error_rate: float = 0.05  #: 0 < rate <= 1 (5xx answers and unhandled exceptions)


@dataclass(frozen=True, kw_only=True)
class PluginConfig:
    """One validated entry of ``plugins:``. ``repo`` is a URL or an absolute path."""

    name: str
    repo: str
    ref: str = "main"
    #: A directory of the repository (``plugins/shop``, no ``..``) whose tree is the
    #: release; None: the repository's root. ``entry`` and the tests are relative to it.
    path: str | None = None
    #: ``None``: the prefix ``Plugin(..., url_prefix=...)`` declares, else
    #: ``/<name>`` (known once a release is loaded; see :attr:`default_prefix`).
    url_prefix: str | None = None
    #: The subdomain the plugin's routes answer on (``api``); None: the
    #: constructor's, else the host's default, as for a blueprint.
    subdomain: str | None = None
    entry: str | None = None  #: "module.path:attr"; None means the package's ``plugin``
    poll_interval: float = 60.0
    test: tuple[str, ...] | None = DEFAULT_TEST_COMMAND  #: None: the gate is off
    #: True when ``test`` was not given: the gate then runs only if the release has tests/.
    test_is_default: bool = True
    test_timeout: float = 120.0
    auto_rollback: AutoRollback | None = None
    #: None: a new release goes live for every request at once (no canary).
    canary: Canary | None = None
    #: ``repo: push``: gitplug hosts the repository (``repo`` is then the bare
    #: repository's path, ``<data_dir>/hosted/<name>.git``) and a ``git push``
    #: of ``ref`` deploys (README, "Deploy with git push").
    hosted: bool = False
    #: The HTTP basic password that may push to (and fetch from) the hosted repository.
    push_token: str | None = field(default=None, repr=False)
    #: Whether a push may rewrite history (force push, deleting a branch or tag).
    allow_force_push: bool = False
    #: Read-only; the plugin sees it as ``current_plugin.config``.
    config: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}), hash=False)
    #: ``(repo, path glob)`` of the ``discover:`` entry that found it; None: listed in ``plugins:``.
    discovered_from: tuple[str, str] | None = None
    #: Signatures a deploy requires (its own ``verify``, else the top-level
    #: default); None: any commit deploys.
    verify: VerifyConfig | None = None

    @property
    def default_prefix(self) -> str:
        """The configured prefix, else ``/<name>`` (what the configuration alone
        says; a plugin's constructor may declare another when none is configured)."""
        return self.url_prefix or f"/{self.name}"

    def __post_init__(self) -> None:
        # Frozen: object.__setattr__ is the sanctioned way to normalise in __post_init__.
        if not self.url_prefix:
            object.__setattr__(self, "url_prefix", None)
        if not isinstance(self.config, MappingProxyType):
            object.__setattr__(self, "config", MappingProxyType(copy.deepcopy(dict(self.config))))


#: What a ``notify`` entry may list in ``events`` (the canary events carry both
#: sides' figures; ``host_lost``: a fleet's host went silent, sent once per fleet
#: per loss by one host's controller). The forge formats post the ``deploy_*``
#: events only and accept the others silently.
NOTIFY_EVENTS: Final = ("deploy_started", "deploy_succeeded", "deploy_failed", "rolled_back",
                        "canary_started", "canary_promoted", "canary_aborted", "host_lost")
#: ``format`` of a ``notify`` entry.
NOTIFY_FORMATS: Final = ("json", "slack", "github", "gitlab", "gitea")


@dataclass(frozen=True, kw_only=True)
class NotifyTarget:
    """One validated entry of ``notify:`` (README, "Notifications")."""

    url: str = field(repr=False)  #: may carry a token in its path (Slack): never shown
    events: frozenset[str]
    format: str = "json"
    plugins: frozenset[str] | None = None  #: None: every plugin
    secret: str | None = field(default=None, repr=False)  #: signs ``json`` bodies
    token: str | None = field(default=None, repr=False)  #: a forge's API token
    timeout: float = 10.0  #: seconds per request, all included

    @property
    def display_url(self) -> str:
        """``url`` safe for logs: scheme, host and port only."""
        scheme, _, rest = self.url.partition("://")
        host = rest.split("/", 1)[0].rpartition("@")[2]
        return f"{scheme}://{host}"

    def __repr__(self) -> str:
        return (f"NotifyTarget(url={self.display_url!r}..., format={self.format!r}, "
                f"events={sorted(self.events)!r})")


def _with_name(value: Any, name: str) -> Any:
    """``value`` with ``{name}`` replaced in every string, also inside lists and mappings."""
    if isinstance(value, str):
        return value.replace("{name}", name)
    if isinstance(value, Mapping):
        return {k: _with_name(v, name) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_with_name(v, name) for v in value)
    return value


@dataclass(frozen=True, kw_only=True)
class DiscoverConfig:
    """One entry of ``discover:``: every directory matching ``path`` that holds a
    plugin package is a plugin named after the directory (README, "Discovery").

    The other fields are the defaults of the plugins found, with ``{name}`` in
    any string replaced by the plugin's name (:meth:`plugin`).
    """

    repo: str
    path: str  #: a glob of directories, '/'-separated: ``plugins/*``
    ref: str = "main"
    url_prefix: str = "/{name}"
    entry: str | None = None
    poll_interval: float = 60.0
    test: tuple[str, ...] | None = DEFAULT_TEST_COMMAND
    test_is_default: bool = True
    test_timeout: float = 120.0
    auto_rollback: AutoRollback | None = None
    canary: Canary | None = None
    config: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}), hash=False)
    verify: VerifyConfig | None = None

    def plugin(self, name: str, directory: str) -> PluginConfig:
        """The plugin found in ``directory`` (which matched :attr:`path`), called ``name``."""
        return PluginConfig(
            name=name, repo=self.repo, ref=_with_name(self.ref, name), path=directory,
            url_prefix=_with_name(self.url_prefix, name), entry=_with_name(self.entry, name),
            poll_interval=self.poll_interval, test=_with_name(self.test, name),
            test_is_default=self.test_is_default, test_timeout=self.test_timeout,
            auto_rollback=self.auto_rollback, canary=self.canary, config=_with_name(dict(self.config), name),
            discovered_from=(self.repo, self.path), verify=self.verify,
        )


@dataclass(frozen=True, kw_only=True)
class GitplugConfig:
    """The whole validated configuration. Paths are absolute."""

    data_dir: Path
    poll_interval: float = 60.0
    keep_releases: int = 5
    state: str = ""  #: "" means f"sqlite:///{data_dir}/state.db"
    #: This host's name in a fleet ("" means the machine's host name; see ``host``).
    host_id: str = ""
    admin_token: str | None = None
    webhook_secret: str | None = None
    #: Bytes; a webhook body over this is refused (413) from its Content-Length.
    webhook_max_body: int = DEFAULT_WEBHOOK_MAX_BODY
    api_prefix: str = "/_gitplug"
    #: Largest request body the push remote reads (bytes); refused from the headers above it.
    push_max_size: int = DEFAULT_PUSH_MAX_SIZE
    #: Where people reach this server (``https://deploy.example.com``): links in notifications.
    public_url: str | None = None
    #: Where the other hosts of a fleet reach this one (``http://web-1.internal:5000``):
    #: they fetch the repositories of ``repo: push`` plugins from the host that has them.
    host_url: str | None = None
    #: Outgoing notifications, in file order.
    notify: tuple[NotifyTarget, ...] = ()
    #: ``canary`` at the top: the default of every plugin that sets none (already applied to them).
    canary: Canary | None = None
    #: ``limits``: what one release may hold, checked before a blob is inflated.
    max_file_size: int = 100 * 1024 * 1024
    max_release_size: int = 1024 * 1024 * 1024
    max_files: int = 50_000
    #: ``test_sandbox``: "none" or "bwrap" (README "Security model").
    test_sandbox: str = "none"
    #: ``test_user``: run the test gate as this user (the server must be root).
    test_user: str | None = None
    #: Insertion order is the order of the file.
    plugins: Mapping[str, PluginConfig] = field(
        default_factory=lambda: MappingProxyType({}), hash=False
    )
    #: The ``discover:`` entries, in file order.
    discover: tuple[DiscoverConfig, ...] = ()
    #: ``credentials:``, in file order; the longest matching ``url`` prefix wins.
    credentials: tuple[Credential, ...] = field(default=(), repr=False)
    #: ``verify``: the default of every plugin that sets none.
    verify: VerifyConfig | None = None
    #: Discovered plugins whose directory is gone: stopped, shown as removed.
    removed: Mapping[str, PluginConfig] = field(
        default_factory=lambda: MappingProxyType({}), hash=False
    )
    source: str | None = None  #: the file it came from, or MAPPING_SOURCE
    base_dir: Path = field(default_factory=Path.cwd)

    def __post_init__(self) -> None:
        if not self.state:
            object.__setattr__(self, "state", f"sqlite:///{self.data_dir}/state.db")
        if not isinstance(self.plugins, MappingProxyType):
            object.__setattr__(self, "plugins", MappingProxyType(dict(self.plugins)))
        if not isinstance(self.removed, MappingProxyType):
            object.__setattr__(self, "removed", MappingProxyType(dict(self.removed)))

    @property
    def host(self) -> str:
        """The id this host records on its deploys and heartbeats."""
        return self.host_id or socket.gethostname()

    def plugin(self, name: str) -> PluginConfig:
        """The plugin called ``name``; raises :class:`UnknownPlugin` if there is none."""
        try:
            return self.plugins[name]
        except KeyError:
            raise UnknownPlugin(name, list(self.plugins)) from None


@dataclass(frozen=True)
class ConfigDiff:
    """What a reload changes: plugin names added, removed, and changed in any field."""

    added: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()
    changed: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.added or self.removed or self.changed)
