"""hello: the example gitplug plugin.

A small but complete plugin: pages rendered from the plugin's own templates,
a form that uses the host's session and ``flash``, a JSON API, an app-wide
template filter, versioned static files and the three life-cycle hooks.

gitplug imports this package from a release directory under a namespace of
its own (two releases can be loaded at once), so modules refer to each other
with relative imports (``from . import greetings``) or by the package's own
name (``from hello import greetings``); both resolve inside the release.
"""

from __future__ import annotations

from gitplug import Plugin, current_plugin

from . import greetings, stats

__version__ = "1.0.0"

#: The entry object gitplug loads (``entry: hello:plugin`` is the default).
#: ``templates/`` and ``static/`` beside this file are picked up automatically.
plugin = Plugin("hello", __name__)


@plugin.on_load
def start_stats() -> None:
    """Runs on the new release before it goes live: acquire resources here.

    Never at import time: a release that fails to load is thrown away
    without its ``on_unload`` running, so nothing opened at import is closed.
    """
    stats.start()
    current_plugin.logger.info(
        "hello %s loading as release %s", __version__, current_plugin.release_id
    )


@plugin.health_check
def healthy() -> bool:
    """Runs before the swap: a bad ``GREETING`` in the configuration aborts the deploy."""
    greetings.greeting_from_config(current_plugin.config)  # raises InvalidConfig
    return stats.is_running()


@plugin.on_unload
def stop_stats() -> None:
    """Runs after the release's last in-flight request: release resources here."""
    final = stats.stop()
    current_plugin.logger.info(
        "hello release %s unloaded after serving %d greeting(s)",
        current_plugin.release_id,
        final.greetings,
    )


# Registering routes: importing the modules runs their decorators. These
# imports come after `plugin` exists because the modules import it.
from . import api, filters, views  # noqa: E402,F401
