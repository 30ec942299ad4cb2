"""Nothing leaks across hundreds of load/unload cycles (SPEC 4.5).

One process loads a plugin 500 times (two directories alternately, some
stop/start pairs, some broken releases that fail to load), serving requests
all along. The first releases' module, plugin, function and class must be
garbage afterwards, and ``sys.modules``, the logging registry, the thread
count and the process RSS must not grow.
"""

from __future__ import annotations

import gc
import logging
import sys
import threading
import time
import typing as t
import weakref
from pathlib import Path

import psutil
import pytest
from flask import Flask, render_template_string

from gitplug import GitPlug, PluginLoadError
from pluginfactory import write_files

CYCLES = 500
MEASURE_FROM = 100
MAX_RSS_GROWTH = 5 * 1024 * 1024

LEAKY_INIT = '''
import dataclasses
import functools
import logging
import typing as t

from flask import g, render_template
from gitplug import Plugin, current_plugin

from leaky import helpers
from leaky.sub.deep import DEEP

logger = logging.getLogger(__name__)
logger.debug("importing %s", __name__)
plugin = Plugin("leaky", __name__)
T = t.TypeVar("T")


class Widget:
    """A class whose instances are cached module-wide."""

    instances: list["Widget"] = []

    def __init__(self) -> None:
        Widget.instances.append(self)


@dataclasses.dataclass(frozen=True)
class Point:
    x: int
    y: int


class Box(t.Generic[T]):
    pass


IntBox = Box[int]  # typing caches subscriptions


@functools.lru_cache(maxsize=None)
def cached(n):
    return Point(n, n)


class LeakyError(Exception):
    pass


@plugin.route("/")
def index():
    Widget()
    cached(len(Widget.instances) % 7)
    return render_template("leaky.html", label=helpers.LABEL, deep=DEEP)


@plugin.route("/fail")
def fail():
    raise LeakyError("handled below")


@plugin.errorhandler(LeakyError)
def on_leaky(error):
    return "handled " + type(error).__name__, 409


@plugin.before_app_request
def app_hook():
    g.leaky = current_plugin.release_id


@plugin.app_context_processor
def ctx():
    return {"leaky_label": helpers.LABEL}


@plugin.app_template_filter("leakyfilter")
def leakyfilter(value):
    return f"{value}-{helpers.LABEL}"


@plugin.on_unload
def bye():
    helpers.logger.debug("bye from %s", current_plugin.release_id)
'''


def _leaky(root: Path, label: str, *, broken: bool = False) -> Path:
    files = {
        "leaky/__init__.py": LEAKY_INIT,
        "leaky/helpers.py": f'import logging\nlogger = logging.getLogger(__name__)\nLABEL = "{label}"\n',
        "leaky/sub/__init__.py": "import logging\nlogging.getLogger(__name__)\n",
        "leaky/sub/deep.py": f'import logging\nlog = logging.getLogger(__name__)\nDEEP = "{label}-deep"\n',
        "leaky/templates/leaky.html": "{{ label }} {{ deep }} {{ 'x'|leakyfilter }}\n",
        "leaky/static/leaky.css": f"/* {label} */\n",
    }
    if broken:
        files["leaky/sub/deep.py"] += "raise RuntimeError('broken release')\n"
    return write_files(root, files)


def _rss() -> int:
    return psutil.Process().memory_info().rss


@pytest.fixture(scope="module")
def cycles(tmp_path_factory: pytest.TempPathFactory) -> dict[str, t.Any]:
    """Run the 500 cycles once; the tests below each judge one aspect of it."""
    tmp_path = tmp_path_factory.mktemp("leaks")
    app = Flask("leak_host")
    app.config.update(SECRET_KEY="s")

    @app.route("/")
    def home() -> str:
        return render_template_string("{{ leaky_label|default('-') }} {{ g.leaky|default('-') }}")

    gp = GitPlug(app)
    runtime = gp.runtime
    dirs = [_leaky(tmp_path / "a", "A"), _leaky(tmp_path / "b", "B")]
    broken = _leaky(tmp_path / "broken", "X", broken=True)
    client = app.test_client()
    refs: dict[str, weakref.ref[t.Any]] = {}
    measured: dict[str, t.Any] = {"failures": 0}
    started = time.monotonic()
    try:
        for cycle in range(CYCLES):
            label = "AB"[cycle % 2]
            release = gp.load_directory("leaky", dirs[cycle % 2])
            if cycle < 2:
                module = sys.modules[release.namespace.mangled]
                refs.update(
                    {
                        f"package module #{cycle}": weakref.ref(module),
                        f"submodule #{cycle}": weakref.ref(sys.modules[release.namespace.mangled + ".sub.deep"]),
                        f"plugin #{cycle}": weakref.ref(release.plugin),  # type: ignore[arg-type]
                        f"view function #{cycle}": weakref.ref(module.index),
                        f"class #{cycle}": weakref.ref(module.Widget),
                        f"dataclass #{cycle}": weakref.ref(module.Point),
                        f"generic class #{cycle}": weakref.ref(module.IntBox.__origin__),
                        f"release jinja env #{cycle}": weakref.ref(release.jinja_env),  # type: ignore[arg-type]
                    }
                )
                del module
            del release
            response = client.get("/leaky/", buffered=True)
            assert response.get_data(as_text=True) == f"{label} {label}-deep x-{label}"
            response = client.get("/leaky/fail", buffered=True)
            assert response.status_code == 409
            response = client.get("/", buffered=True)
            assert response.get_data(as_text=True).startswith(f"{label} dir-")
            del response
            if cycle % 50 == 25:
                assert gp.stop("leaky") and gp.start("leaky")
            if cycle % 50 == 40:
                with pytest.raises(PluginLoadError, match="broken release"):
                    gp.load_directory("leaky", broken)
                measured["failures"] += 1
            if cycle + 1 in (MEASURE_FROM, CYCLES):
                assert runtime.wait_idle(30)
                gc.collect()
                tag = "start" if cycle + 1 == MEASURE_FROM else "end"
                measured[f"modules_{tag}"] = len(sys.modules)
                measured[f"loggers_{tag}"] = len(logging.Logger.manager.loggerDict)
                measured[f"threads_{tag}"] = threading.active_count()
                gc.collect()
                measured[f"rss_{tag}"] = _rss()
        measured["elapsed"] = time.monotonic() - started
        assert runtime.wait_idle(30)
        gc.collect()
        measured["alive"] = [name for name, ref in refs.items() if ref() is not None]
        measured["report"] = runtime.report_leaks(all_now=True) if measured["alive"] else []
        measured["rss_growth"] = measured["rss_end"] - measured["rss_start"]
        print(
            f"\n{CYCLES} cycles in {measured['elapsed']:.1f}s"
            f" ({measured['elapsed'] / CYCLES * 1000:.1f} ms/cycle);"
            f" RSS growth cycle {MEASURE_FROM}->{CYCLES}: {measured['rss_growth'] / 1024:.0f} KiB;"
            f" threads {measured['threads_start']}->{measured['threads_end']}"
        )
        return measured
    finally:
        gp.shutdown()


def test_every_cycle_ran(cycles: dict[str, t.Any]) -> None:
    # How long the cycles take is the bench's business (rss_growth_mib_1000).
    assert cycles["failures"] == CYCLES // 50


def test_first_releases_are_garbage(cycles: dict[str, t.Any]) -> None:
    assert not cycles["alive"], f"still reachable after {CYCLES} cycles: {cycles['alive']}; {cycles['report']}"


def test_sys_modules_and_loggers_do_not_grow(cycles: dict[str, t.Any]) -> None:
    assert cycles["modules_end"] == cycles["modules_start"], cycles
    assert cycles["loggers_end"] == cycles["loggers_start"], cycles


def test_threads_do_not_grow(cycles: dict[str, t.Any]) -> None:
    grown = cycles["threads_end"] - cycles["threads_start"]
    assert grown <= 2, f"{grown} more threads after {CYCLES - MEASURE_FROM} more cycles"


def test_rss_growth_under_5_mib(cycles: dict[str, t.Any]) -> None:
    growth = cycles["rss_growth"]
    assert growth < MAX_RSS_GROWTH, f"RSS grew by {growth / 1024 / 1024:.1f} MiB from cycle {MEASURE_FROM} to {CYCLES}"


def test_a_held_function_is_reported_as_a_leak(tmp_path: Path) -> None:
    """The leak check sees any code of the release, not just its package module."""
    from pluginfactory import stamped_plugin

    app = Flask("leak_report_host")
    gp = GitPlug(app)
    try:
        first = gp.load_directory("stampy", stamped_plugin(tmp_path / "a", "A"))
        held = first.view_functions["stampy.index"]
        del first
        gp.load_directory("stampy", stamped_plugin(tmp_path / "b", "B"))
        assert gp.runtime.wait_idle(10)
        findings = gp.runtime.report_leaks(all_now=True)
        assert len(findings) == 1 and "held by function" in findings[0], findings
        del held
        gp.load_directory("stampy", stamped_plugin(tmp_path / "c", "C"))
        assert gp.runtime.wait_idle(10)
        assert gp.runtime.report_leaks(all_now=True) == []
    finally:
        gp.shutdown()
