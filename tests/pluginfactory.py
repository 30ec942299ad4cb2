"""Write plugin packages to disk for tests: small, real, and stamped.

A *stamped* plugin carries one release label in every module, its template
and its static file, so a response can prove it was served by exactly one
complete release.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

MODULES = ("alpha", "beta", "gamma", "delta", "epsilon")

BROKEN_KINDS = ("lazy_syntax", "import_error", "on_load", "health")


#: A plugin module (``<package>/holding.py``) that parks a request until the test
#: lets it go: a view calls ``hold(request.args.get("hold"))``. With no ``hold``
#: argument it returns at once.
HOLD_SOURCE = """
def hold(path):
    import pathlib, time
    if not path:
        return
    pathlib.Path(path + ".in").touch()
    deadline = time.monotonic() + 60
    while not pathlib.Path(path + ".go").exists() and time.monotonic() < deadline:
        time.sleep(0.005)
"""


class Hold:
    """The test's side of :data:`HOLD_SOURCE`: know when a request is inside a
    view, and let it go. Synchronises on the request itself, not on a sleep."""

    def __init__(self, directory: Path, name: str) -> None:
        self.path = directory / f"hold-{name}"

    @property
    def arg(self) -> str:
        return str(self.path)

    def wait_inside(self, timeout: float = 30.0) -> None:
        import time

        deadline = time.monotonic() + timeout
        while not self.path.with_name(self.path.name + ".in").exists():
            assert time.monotonic() < deadline, f"the held request never reached its view ({self.path})"
            time.sleep(0.005)

    def release(self) -> None:
        self.path.with_name(self.path.name + ".go").touch()


def write_files(root: Path, files: dict[str, str]) -> Path:
    for rel, content in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(content).lstrip("\n"))
    return root


def stamped_plugin(root: Path, label: str, *, package: str = "stampy", broken: str | None = None) -> Path:
    """A plugin of 5 modules + a lazily imported one + a template + a static file.

    ``broken`` makes the release fail to load in one of :data:`BROKEN_KINDS`.
    """
    files: dict[str, str] = {}
    for module in MODULES:
        files[f"{package}/{module}.py"] = f'STAMP = "{label}"\n'
    files[f"{package}/__init__.py"] = f'''
        from flask import render_template, request
        from gitplug import Plugin, current_plugin
        from {package} import alpha, beta
        from {package}.gamma import STAMP as GAMMA
        from . import delta
        import {package}.epsilon

        from {package}.holding import hold

        plugin = Plugin("{package}", __name__)

        @plugin.route("/")
        def index():
            from {package}.lazy import STAMP as LAZY
            hold(request.args.get("hold"))
            return render_template(
                "stamp.html",
                modules=[alpha.STAMP, beta.STAMP, GAMMA, delta.STAMP, {package}.epsilon.STAMP, LAZY],
                release=current_plugin.release_id,
            )
    '''
    files[f"{package}/holding.py"] = HOLD_SOURCE
    files[f"{package}/lazy.py"] = f'STAMP = "{label}"\n'
    files[f"{package}/templates/stamp.html"] = (
        "modules={{ modules|join(',') }};template=" + label + ";"
        "static={{ url_for('" + package + ".static', filename='s.txt') }};release={{ release }}"
    )
    files[f"{package}/static/s.txt"] = label
    if broken == "lazy_syntax":
        files[f"{package}/lazy.py"] = f'STAMP = "{label}"\ndef oops(:\n'
    elif broken == "import_error":
        files[f"{package}/gamma.py"] = f'STAMP = "{label}"\nraise RuntimeError("gamma cannot start")\n'
    elif broken == "on_load":
        files[f"{package}/epsilon.py"] = f'''
            STAMP = "{label}"
            from {package} import plugin

            @plugin.on_load
            def connect():
                raise ConnectionError("database unreachable")
        '''
    elif broken == "health":
        files[f"{package}/epsilon.py"] = f'''
            STAMP = "{label}"
            from {package} import plugin

            @plugin.health_check
            def healthy():
                return False
        '''
    elif broken is not None:
        raise ValueError(broken)
    # epsilon is imported by __init__ after plugin exists only in the broken
    # variants; reorder so `plugin` exists before epsilon is imported.
    if broken in ("on_load", "health"):
        init = files[f"{package}/__init__.py"]
        init = init.replace(f"        import {package}.epsilon\n", "")
        init = init.replace(
            f'plugin = Plugin("{package}", __name__)\n',
            f'plugin = Plugin("{package}", __name__)\n        import {package}.epsilon\n',
        )
        files[f"{package}/__init__.py"] = init
    return write_files(root, files)


def parse_stamps(body: str) -> dict[str, str]:
    """``modules=a,b;template=t;...`` -> dict."""
    out = {}
    for part in body.strip().split(";"):
        key, _, value = part.partition("=")
        out[key] = value
    return out
