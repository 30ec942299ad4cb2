"""The one exception tree of gitplug.

Every error a user can cause is a :class:`GitplugError`. Messages say what
was wrong, where, and what to do about it; only the CLI turns them into exit
codes (see :mod:`gitplug.cli`)::

    GitplugError
    ├── ConfigError              deploy.yaml / app.config["GITPLUG"] is invalid
    ├── UnknownPlugin            a name that is not in the configuration
    ├── SourceError              anything git
    │   ├── FetchError           the repository could not be reached or read
    │   └── RefNotFound          the ref names no commit in the repository
    ├── StagingError             the commit could not be written as a release
    │   └── UnsafeTree           the tree would write outside its release
    ├── TestGateFailed           the plugin's own tests failed or timed out
    ├── PluginLoadError          the release could not be imported or verified
    │   ├── PluginImportError    syntax / import / import-time error, with file and line
    │   ├── EntryPointError      the entry object is missing or not a Plugin
    │   │   └── PluginNameMismatch   Plugin("x") configured under another name
    │   ├── ReleaseModified      the release on disk differs from what was staged
    │   ├── OnLoadFailed         an ``on_load`` callback raised
    │   └── HealthCheckFailed    ``health_check`` returned False or raised
    ├── MountError               a prefix or name clashes with the host or another plugin
    ├── CanaryFailed             a canary release was rolled back (its errors, or by hand)
    ├── StateError               the state store could not be read or written
    ├── WebhookRejected          a webhook request is refused (carries the HTTP status)
    └── BadInput                 the command line names something that does not exist
"""

from __future__ import annotations

import re

_PASSWORD_IN_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*://[^/@:?#]*):[^/@?#]*@")
_PASSWORD_PARAM = re.compile(r"(password=)[^&\s]*", re.IGNORECASE)


def redact_url(url: str) -> str:
    """``url`` with any password (``user:pw@`` or ``password=``) replaced by ``***``.

    Every message and log line that names a URL (a repository, the state
    database) goes through this.
    """
    return _PASSWORD_PARAM.sub(r"\1***", _PASSWORD_IN_URL.sub(r"\1:***@", url))


class GitplugError(Exception):
    """Base of every error gitplug raises on purpose.

    ``str(error)`` is a complete, user-facing message; ``exit_code`` is what
    the CLI exits with.
    """

    exit_code: int = 1

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class ConfigError(GitplugError):
    """The configuration is invalid. Carries the file, line and key at fault."""

    exit_code = 2

    def __init__(
        self,
        message: str,
        *,
        file: str | None = None,
        line: int | None = None,
        key: str | None = None,
    ) -> None:
        self.file = file
        self.line = line
        self.key = key
        where = ""
        if file is not None:
            where = file if line is None else f"{file}:{line}"
        if key is not None:
            where = f"{where}: {key}" if where else key
        super().__init__(f"{where}: {message}" if where else message)
        self.reason = message


class UnknownPlugin(GitplugError):
    """A plugin name that the configuration does not define."""

    exit_code = 2

    def __init__(self, name: str, known: list[str] | None = None) -> None:
        self.plugin = name
        hint = f" Known plugins: {', '.join(sorted(known))}." if known else ""
        super().__init__(
            f"no plugin named {name!r} in the configuration.{hint} "
            "Add it under 'plugins:' in deploy.yaml."
        )


class SourceError(GitplugError):
    """Base for git errors. Names the plugin, the repository URL and the ref."""

    def __init__(self, message: str, *, plugin: str, url: str, ref: str | None = None) -> None:
        self.plugin = plugin
        self.url = url
        self.ref = ref
        super().__init__(message)


class FetchError(SourceError):
    """The repository could not be reached, read or fetched."""


class RefNotFound(SourceError):
    """The ref resolves to no commit in the repository."""


class StagingError(GitplugError):
    """A commit could not be written into a release directory."""

    def __init__(self, message: str, *, plugin: str, commit: str | None = None) -> None:
        self.plugin = plugin
        self.commit = commit
        super().__init__(message)


class SignatureRefused(GitplugError):
    """A commit or tag lacks a valid signature by an allowed key (README, "Signed commits").

    ``signer`` is the signing key's fingerprint when the object carries a
    signature at all (an untrusted or forged one), else None.
    """

    def __init__(self, message: str, *, plugin: str, commit: str | None = None,
                 signer: str | None = None) -> None:
        self.plugin = plugin
        self.commit = commit
        self.signer = signer
        super().__init__(message)


class UnsafeTree(StagingError):
    """The commit's tree would write outside its release; names the path."""

    def __init__(self, message: str, *, plugin: str, commit: str | None, path: str) -> None:
        self.path = path
        super().__init__(message, plugin=plugin, commit=commit)


class RequirementsNotMet(GitplugError):
    """A release asks for distributions this host's environment does not have (or that
    cannot be checked); one line per requirement in the message."""

    def __init__(self, message: str, *, plugin: str, commit: str | None, problems: list[str]) -> None:
        self.plugin = plugin
        self.commit = commit
        self.problems = problems
        super().__init__(message)


class TestGateFailed(GitplugError):
    """The plugin's tests failed, timed out or could not be started."""

    __test__ = False  # not a pytest test class

    def __init__(
        self,
        message: str,
        *,
        plugin: str,
        commit: str | None,
        log_path: str | None = None,
        timed_out: bool = False,
        returncode: int | None = None,
    ) -> None:
        self.plugin = plugin
        self.commit = commit
        self.log_path = log_path
        self.timed_out = timed_out
        self.returncode = returncode
        super().__init__(message)


class PluginLoadError(GitplugError):
    """A release could not be loaded; the live release is unchanged.

    ``file`` and ``line`` point into the release when the fault is in its code.
    """

    def __init__(
        self,
        message: str,
        *,
        plugin: str,
        release: str | None = None,
        file: str | None = None,
        line: int | None = None,
    ) -> None:
        self.plugin = plugin
        self.release = release
        self.file = file
        self.line = line
        super().__init__(message)


class PluginImportError(PluginLoadError):
    """A module of the release has a syntax error or failed to import."""


class ReleaseModified(PluginLoadError):
    """The release's files differ from its manifest: something changed them after staging."""


class EntryPointError(PluginLoadError):
    """The ``entry`` names no object, or the object is not a :class:`gitplug.Plugin`."""


class PluginNameMismatch(EntryPointError):
    """The release creates ``Plugin(declared)`` but is configured under another name.

    Refused: served under the configured name, the plugin's own
    ``url_for("<declared>.x")`` would build another plugin's URLs.
    """

    def __init__(self, message: str, *, plugin: str, declared: str, release: str | None = None) -> None:
        self.declared = declared
        super().__init__(message, plugin=plugin, release=release)


class OnLoadFailed(PluginLoadError):
    """An ``on_load`` callback raised."""


class HealthCheckFailed(PluginLoadError):
    """The ``health_check`` returned a false value or raised."""


class MountError(GitplugError):
    """A plugin name or URL prefix clashes with the host or another plugin."""

    exit_code = 2


class CanaryFailed(GitplugError):
    """A canary release was rolled back: it erred too often, or someone aborted it.

    Sent with ``deploy_failed``; the deploy record holds both sides' figures
    (README, "Canary releases").
    """

    def __init__(self, message: str, *, plugin: str, commit: str | None = None) -> None:
        super().__init__(message)
        self.plugin = plugin
        self.commit = commit


class StateError(GitplugError):
    """The state store could not be read or written."""



class WebhookRejected(GitplugError):
    """A webhook request is refused; ``status`` is the HTTP status to answer with."""

    def __init__(self, status: int, message: str) -> None:
        self.status = status
        super().__init__(message)


class BadInput(GitplugError):
    """The command line names something that does not exist (exit status 2)."""

    exit_code = 2
