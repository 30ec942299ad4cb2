"""Keys gitplug sets in the WSGI environ of every request.

In a module of their own so that every runtime module can read them without
importing the module that sets them (no import cycle inside the runtime).
"""

from __future__ import annotations

from typing import Final

__all__ = ["ENVIRON_RELEASE", "ENVIRON_SNAPSHOT"]

#: The :class:`~gitplug.runtime.snapshot.Snapshot` a request is pinned to.
ENVIRON_SNAPSHOT: Final = "gitplug.snapshot"
#: The :class:`~gitplug.runtime.loaded.LoadedRelease` serving a plugin request.
ENVIRON_RELEASE: Final = "gitplug.release"
