"""What the web face needs of gitplug, as a protocol.

:class:`~gitplug.extension.GitPlug` satisfies it. The HTTP API, the status
page and the metrics are handed such an object when the extension mounts
them (:func:`gitplug.web.admin.register_admin`); they never import the
extension module, so the web face depends on the pipeline and the store, and
nothing below it depends on the web face.
"""

from __future__ import annotations

import typing as t

if t.TYPE_CHECKING:
    from ..config import GitplugConfig
    from ..deploy.pipeline import Deployer
    from ..runtime.swap import Runtime
    from ..state import DeployRecord, StateStore

__all__ = ["GitplugFacade"]


class GitplugFacade(t.Protocol):
    """The operations and views the web face calls; see :class:`~gitplug.GitPlug`."""

    @property
    def config(self) -> GitplugConfig | None: ...

    @property
    def store(self) -> StateStore: ...

    @property
    def deployer(self) -> Deployer: ...

    @property
    def runtime(self) -> Runtime: ...

    def queue_deploy(self, name: str, trigger: str, *, at: float | None = None) -> None:
        """Queue a background deploy of ``name`` (coalesced; on the controller).

        ``at`` (``time.monotonic()``): when its cause was known, so that the
        plugins one push triggers share one fetch of their repository.
        """

    def status(self, only: str | None = None) -> dict[str, t.Any]: ...

    def history(self, name: str, *, limit: int = 50) -> list[DeployRecord]: ...

    def deploy(self, name: str, ref: str | None = None, wait: bool = True, *,
               trigger: str = "api") -> DeployRecord | None: ...

    def rollback(self, name: str, ref: str, *, trigger: str = "rollback") -> DeployRecord | None: ...

    def resume(self, name: str, *, trigger: str = "api") -> DeployRecord | None: ...

    def promote(self, name: str, *, trigger: str = "api") -> DeployRecord: ...

    def abort(self, name: str, *, trigger: str = "api") -> DeployRecord: ...

    def stop(self, name: str) -> bool: ...

    def start(self, name: str) -> bool: ...
