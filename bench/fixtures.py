"""What the benchmarks run against: staged releases, small plugins, git repositories.

* :func:`stage_example` copies ``plugins_repo_example/`` into release
  directories laid out as the deployer lays them out
  (``<root>/releases/hello/<id>/``), each with its own ``__version__`` so two
  releases really differ;
* :data:`VIEW_SOURCE` is one view function, compiled both into a synthetic
  plugin (:func:`write_synthetic_plugin`) and into a native blueprint
  (:func:`native_blueprint`): the overhead figures compare the same code;
* :func:`init_repo` / :func:`commit_version` make a real git repository of the
  example plugin with dulwich (no ``git`` binary needed);
* :func:`wsgi_call` is the in-process request: one direct WSGI call, body
  consumed and closed, timed with ``perf_counter_ns``.
"""

from __future__ import annotations

import hashlib
import io
import logging
import re
import shutil
import socket
import time
import typing as t
from collections.abc import Iterable
from pathlib import Path

from flask import Blueprint, Flask
from werkzeug.test import EnvironBuilder

if t.TYPE_CHECKING:
    from gitplug import GitPlug

__all__ = [
    "REPO_ROOT",
    "EXAMPLE_DIR",
    "VIEW_SOURCE",
    "VIEW_RULE",
    "stage_example",
    "set_version",
    "write_synthetic_plugin",
    "native_blueprint",
    "overhead_apps",
    "init_repo",
    "commit_version",
    "free_port",
    "environ_for",
    "wsgi_call",
]

logger = logging.getLogger(__name__)

#: The gitplug checkout this bench lives in.
REPO_ROOT = Path(__file__).resolve().parent.parent
#: The example plugin repository (README, "Five minutes with the demo").
EXAMPLE_DIR = REPO_ROOT / "plugins_repo_example"

_IGNORE = shutil.ignore_patterns("__pycache__", "*.pyc", ".pytest_cache", ".git")
_VERSION = re.compile(r'^__version__ = "[^"]*"$', re.MULTILINE)

#: The view both sides of the overhead comparison serve: small, JSON, one URL
#: converter, so routing, view dispatch and response building are all there.
VIEW_SOURCE = '''
def item(n):
    return {"item": n, "ok": True}
'''
#: Its rule, relative to the plugin's prefix or the blueprint's.
VIEW_RULE = "/item/<int:n>"

#: A second view on both sides: it renders a template (30 list items, a
#: filter, a url_for), the common case of a real page.
PAGE_SOURCE = '''
from flask import render_template

def page():
    return render_template("bench_page.html", items=list(range(30)), title="Bench")
'''
PAGE_RULE = "/page"
PAGE_TEMPLATE = (
    "<!doctype html><html><head><title>{{ title }}</title></head><body><h1>{{ title }}</h1>"
    "<ul>{% for i in items %}<li class=\"item-{{ i }}\">{{ i * 2 }} {{ 'x'|upper }}</li>{% endfor %}</ul>"
    "<a href=\"{{ url_for(request.endpoint) }}\">again</a></body></html>"
)

_PLUGIN_INIT = (
    '"""Synthetic bench plugin: a JSON view and a page (bench.fixtures)."""\n'
    "from gitplug import Plugin\n\n"
    'plugin = Plugin("{name}", __name__)\n'
    f"{VIEW_SOURCE}\n"
    f'plugin.add_url_rule("{VIEW_RULE}", view_func=item)\n'
    f"{PAGE_SOURCE}\n"
    f'plugin.add_url_rule("{PAGE_RULE}", view_func=page)\n'
)


def _require_example() -> None:
    if not (EXAMPLE_DIR / "hello" / "__init__.py").is_file():
        from .figures import Unmeasurable

        raise Unmeasurable(
            f"the example plugin is missing ({EXAMPLE_DIR}/hello/__init__.py); run the bench"
            " from a full checkout of the gitplug repository."
        )


def set_version(checkout: Path, version: str) -> None:
    """Rewrite ``__version__`` in ``hello/__init__.py`` of a checkout."""
    init = checkout / "hello" / "__init__.py"
    text, count = _VERSION.subn(f'__version__ = "{version}"', init.read_text())
    if count != 1:
        raise ValueError(f"{init}: expected one `__version__ = \"...\"` line, found {count}")
    init.write_text(text)


def _content_id(directory: Path) -> str:
    digest = hashlib.sha1()
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(directory)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def stage_example(root: Path, versions: Iterable[str]) -> list[Path]:
    """One release directory of the example plugin per version, under ``root/releases/hello``.

    Each directory is named after a hash of its content (40 hex digits, like
    the commit sha the deployer names releases after).
    """
    _require_example()
    out = []
    for version in versions:
        tmp = root / "releases" / "hello" / f".tmp-{version}"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(EXAMPLE_DIR, tmp, ignore=_IGNORE)
        set_version(tmp, version)
        final = tmp.with_name(_content_id(tmp))
        if final.exists():
            shutil.rmtree(tmp)
        else:
            tmp.rename(final)
        out.append(final)
    return out


def write_synthetic_plugin(release_dir: Path, name: str) -> Path:
    """A release holding the one-view plugin package ``benchplug``; returns ``release_dir``.

    Its ``Plugin(...)`` is named ``name``: a release is served only under the
    name it declares.
    """
    package = release_dir / "benchplug"
    (package / "templates").mkdir(parents=True, exist_ok=True)
    (package / "__init__.py").write_text(_PLUGIN_INIT.replace("{name}", name))
    (package / "templates" / "bench_page.html").write_text(PAGE_TEMPLATE)
    return release_dir


_NATIVE_TEMPLATES = Path(__file__).resolve().parent / "_native_templates"


def native_blueprint(name: str = "native") -> Blueprint:
    """A plain Flask blueprint serving the same two views as the synthetic plugin."""
    namespace: dict[str, t.Any] = {"__name__": f"bench_native_{name}"}
    exec(compile(VIEW_SOURCE + PAGE_SOURCE, "<bench view>", "exec"), namespace)  # noqa: S102 - our own constant
    _NATIVE_TEMPLATES.mkdir(exist_ok=True)
    template = _NATIVE_TEMPLATES / "bench_page.html"
    if not template.is_file() or template.read_text() != PAGE_TEMPLATE:
        template.write_text(PAGE_TEMPLATE)
    bp = Blueprint(name, __name__, template_folder=str(_NATIVE_TEMPLATES))
    bp.add_url_rule(VIEW_RULE, view_func=namespace["item"])
    bp.add_url_rule(PAGE_RULE, view_func=namespace["page"])
    return bp


def overhead_apps(release_root: Path) -> tuple[Flask, Flask, GitPlug]:
    """``(plain, host, gitplug)``: the two applications of the per-request figures.

    ``plain`` is a Flask app with :func:`native_blueprint` at ``/native``;
    ``host`` has the same blueprint and gitplug, with the synthetic plugin
    ``plug`` (staged under ``release_root``) live at ``/plug``. Call
    ``gitplug.shutdown()`` when done.
    """
    from gitplug import GitPlug
    from gitplug.runtime.loaded import ReleaseSpec

    plain = Flask("bench_plain")
    plain.register_blueprint(native_blueprint(), url_prefix="/native")
    host = Flask("bench_host")
    host.register_blueprint(native_blueprint(), url_prefix="/native")
    gp = GitPlug(host)
    release = write_synthetic_plugin(release_root / "plug-r1", "plug")
    gp.runtime.swap(ReleaseSpec(name="plug", path=release, release_id="bench-plug-r1", url_prefix="/plug"))
    return plain, host, gp


# --------------------------------------------------------------------------- git


def init_repo(repo_dir: Path, version: str = "1.0.0") -> str:
    """A git repository (branch ``main``) holding the example plugin; returns the first sha."""
    from dulwich.repo import Repo

    _require_example()
    shutil.copytree(EXAMPLE_DIR, repo_dir, ignore=_IGNORE)
    set_version(repo_dir, version)
    repo = Repo.init(str(repo_dir))
    repo.refs.set_symbolic_ref(b"HEAD", b"refs/heads/main")
    repo.close()
    return _commit_all(repo_dir, f"hello {version}")


def commit_version(repo_dir: Path, version: str) -> str:
    """Commit a new ``__version__`` on ``main``; return the sha."""
    set_version(repo_dir, version)
    return _commit_all(repo_dir, f"hello {version}")


def _commit_all(repo_dir: Path, message: str) -> str:
    from gitplug.demo import commit_all

    return commit_all(repo_dir, message)


# --------------------------------------------------------------------------- requests


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def environ_for(path: str, **kwargs: t.Any) -> dict[str, t.Any]:
    """A WSGI environ template for ``GET path`` (copied for every call)."""
    environ = EnvironBuilder(path=path, **kwargs).get_environ()
    environ.pop("wsgi.input", None)
    return environ


def wsgi_call(wsgi_app: t.Callable[..., t.Any], template: dict[str, t.Any]) -> tuple[int, str, bytes]:
    """One in-process request: ``(nanoseconds, status, body)``.

    Timed: the WSGI call, consuming the body and closing the iterable (the
    request ends at ``close()`` for gitplug). Not timed: copying the environ.
    """
    environ = dict(template)
    environ["wsgi.input"] = io.BytesIO()
    status: list[str] = []

    def start_response(s: str, headers: t.Any, exc_info: t.Any = None) -> t.Callable[[bytes], None]:
        status.append(s)
        return lambda data: None

    start = time.perf_counter_ns()
    result = wsgi_app(environ, start_response)
    try:
        body = b"".join(result)
    finally:
        close = getattr(result, "close", None)
        if close is not None:
            close()
    elapsed = time.perf_counter_ns() - start
    return elapsed, status[0] if status else "", body
