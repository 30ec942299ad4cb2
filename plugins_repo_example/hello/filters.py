"""Template filters.

``app_template_filter`` registrations are app-wide: while this release is
live the host's templates can use the filter too, and it disappears with the
release. Prefix the name with the plugin's so it cannot clash with another
plugin (the host's own filters always win a clash).
"""

from __future__ import annotations

from . import plugin


@plugin.app_template_filter("hello_duration")
def duration(seconds: float) -> str:
    """``3725`` -> ``"1 h 2 min"``; ``42.5`` -> ``"42 s"``."""
    total = int(seconds)
    if total < 60:
        return f"{total} s"
    minutes, secs = divmod(total, 60)
    if minutes < 60:
        return f"{minutes} min {secs} s" if secs else f"{minutes} min"
    hours, minutes = divmod(minutes, 60)
    if hours < 24:
        return f"{hours} h {minutes} min" if minutes else f"{hours} h"
    days, hours = divmod(hours, 24)
    return f"{days} d {hours} h" if hours else f"{days} d"
