"""``gitplug demo``: the walkthrough of the README's "Five minutes with the demo", on this machine alone.

Makes a real git repository from ``plugins_repo_example/`` under the data
directory (two tagged commits, v1.0.0 and v1.1.0), serves the root
``deploy.yaml`` on 127.0.0.1 and prints what to try. Writes nothing outside
the data directory. ``python -m gitplug.demo commit "message"`` and
``python -m gitplug.demo break`` and ``python -m gitplug.demo fix`` commit to
that repository without needing the git command.
"""

from __future__ import annotations

import os
import secrets
import shutil
import sys
from pathlib import Path

import click
from dulwich import porcelain
from dulwich.repo import Repo

from .config import GitplugConfig, load_config, resolve_config_path
from .errors import ConfigError, GitplugError

__all__ = ["run_demo", "demo_repo_path", "commit_all"]

AUTHOR = b"gitplug demo <demo@gitplug.invalid>"


def _example_dir() -> Path:
    for candidate in (Path(__file__).resolve().parent.parent / "plugins_repo_example", Path.cwd() / "plugins_repo_example"):
        if (candidate / "hello" / "__init__.py").is_file():
            return candidate
    raise GitplugError(
        "plugins_repo_example/ not found next to the gitplug package or in the current"
        " directory; run `gitplug demo` from a checkout of the gitplug repository."
    )


def demo_repo_path(config: GitplugConfig) -> Path:
    """The demo plugin's repository: the ``repo`` of plugin ``hello``."""
    plugin = config.plugins.get("hello")
    if plugin is None or "://" in plugin.repo:
        raise ConfigError(
            "the demo needs a plugin named 'hello' whose repo is a local path under the data"
            " directory (see the root deploy.yaml)",
            file=config.source,
        )
    return Path(plugin.repo)


def commit_all(repo_dir: Path, message: str) -> str:
    """Stage every change in ``repo_dir``'s work tree and commit it; return the sha."""
    with Repo(str(repo_dir)) as repo:
        porcelain.add(repo)
        staged = porcelain.status(repo).staged
        if _has_head(repo) and not any(staged.values()):
            raise GitplugError(f"nothing to commit in {repo_dir}: edit a file first")
        sha = porcelain.commit(repo, message=message.encode(), author=AUTHOR, committer=AUTHOR)
    return sha.decode()


def _has_head(repo: Repo) -> bool:
    try:
        repo.head()
    except KeyError:
        return False
    return True


def ensure_demo_repo(repo_dir: Path) -> bool:
    """Create the demo repository (two tagged commits) unless it exists."""
    if (repo_dir / ".git").exists():
        return False
    data_root = repo_dir.parent
    data_root.mkdir(parents=True, exist_ok=True)
    tmp = data_root / f".tmp-{repo_dir.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(
        _example_dir(), tmp, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", ".pytest_cache")
    )
    repo = Repo.init(str(tmp))
    repo.refs.set_symbolic_ref(b"HEAD", b"refs/heads/main")
    repo.close()
    commit_all(tmp, "hello 1.0.0: the example plugin")
    porcelain.tag_create(str(tmp), "v1.0.0", author=AUTHOR, message=b"first release", annotated=True)
    init = tmp / "hello" / "__init__.py"
    init.write_text(init.read_text().replace('__version__ = "1.0.0"', '__version__ = "1.1.0"'))
    commit_all(tmp, "hello 1.1.0: bump the version")
    porcelain.tag_create(str(tmp), "v1.1.0", author=AUTHOR, message=b"second release", annotated=True)
    os.rename(tmp, repo_dir)
    return True


def _demo_secrets(data_dir: Path) -> None:
    """Give the demo an admin token and webhook secret unless the user set them."""
    secret_file = data_dir / "demo" / "secrets"
    saved: dict[str, str] = {}
    if secret_file.is_file():
        for line in secret_file.read_text().splitlines():
            key, _, value = line.partition("=")
            saved[key] = value
    for name in ("GITPLUG_ADMIN_TOKEN", "GITPLUG_WEBHOOK_SECRET"):
        if not os.environ.get(name):
            os.environ[name] = saved.get(name) or secrets.token_urlsafe(18)
    secret_file.parent.mkdir(parents=True, exist_ok=True)
    secret_file.write_text(
        "".join(f"{n}={os.environ[n]}\n" for n in ("GITPLUG_ADMIN_TOKEN", "GITPLUG_WEBHOOK_SECRET"))
    )
    os.chmod(secret_file, 0o600)


def run_demo(*, port: int, config_path: Path | None) -> None:
    path = resolve_config_path(str(config_path) if config_path else None)
    if not path.is_file():
        raise ConfigError(
            f"{path} not found: run `gitplug demo` from the root of the gitplug checkout"
            " (it holds the demo's deploy.yaml), or pass -c FILE.",
            file=str(path),
        )
    # The data dir is needed before the secrets exist: read it without them.
    peek = load_config(path, need_secrets=False)
    _demo_secrets(peek.data_dir)
    config = load_config(path)
    repo_dir = demo_repo_path(config)
    if not str(repo_dir.resolve()).startswith(str(config.data_dir.resolve())):
        raise ConfigError(
            f"the demo repository {repo_dir} must be inside the data directory {config.data_dir}",
            file=config.source,
        )
    created = ensure_demo_repo(repo_dir)
    base = f"http://127.0.0.1:{port}"
    rel_repo = os.path.relpath(repo_dir)
    env = f"export GITPLUG_ADMIN_TOKEN={os.environ['GITPLUG_ADMIN_TOKEN']} GITPLUG_WEBHOOK_SECRET={os.environ['GITPLUG_WEBHOOK_SECRET']}"
    banner = f"""
gitplug demo {'(new repository: tags v1.0.0 and v1.1.0)' if created else ''}
  the plugin      {base}/hello/
  status page     {base}{config.api_prefix}/     token: {os.environ['GITPLUG_ADMIN_TOKEN']}
  its repository  {rel_repo}   (branch main, polled every {config.plugins['hello'].poll_interval:g} s)

In another terminal (same directory), the README's walkthrough:
  {env}
  1. change it:    edit {rel_repo}/hello/templates/index.html, then
                   python -m gitplug.demo commit "my change"     # live within seconds
  2. break it:     python -m gitplug.demo break                 # tests fail; the old release stays
                   gitplug status ; gitplug logs hello
  3. fix it:       python -m gitplug.demo fix                   # reverts the break; live again
  4. roll back:    gitplug rollback hello v1.0.0                # pinned; fetched and tested unless on disk
                   gitplug history hello
  5. follow main:  gitplug resume hello
Ctrl+C stops the server.
"""
    from .serve import run_server

    run_server(config, host="127.0.0.1", port=port, dev=[], banner=banner)


@click.group()
def _cli() -> None:
    """Commit to the demo repository without the git command."""


#: What ``break`` appends to ``hello/report.py`` (and ``fix`` removes).
BREAKAGE = "\n\ndef broken(:\n    pass\n"


def _demo_repo(config_path: str | None) -> Path:
    # Committing needs no secret: read the configuration without them.
    return demo_repo_path(load_config(resolve_config_path(config_path), need_secrets=False))


@_cli.command()
@click.argument("message")
@click.option("-c", "--config", "config_path", default=None)
def commit(message: str, config_path: str | None) -> None:
    """Commit every change in the demo repository."""
    sha = commit_all(_demo_repo(config_path), message)
    click.echo(f"committed {sha[:12]} on main: {message}")


@_cli.command("break")
@click.option("-c", "--config", "config_path", default=None)
def break_(config_path: str | None) -> None:
    """Commit a syntax error in a lazily imported module."""
    repo_dir = _demo_repo(config_path)
    target = repo_dir / "hello" / "report.py"
    text = target.read_text()
    if text.endswith(BREAKAGE):
        raise GitplugError("hello/report.py is broken already; `python -m gitplug.demo fix` reverts it")
    target.write_text(text + BREAKAGE)
    sha = commit_all(repo_dir, "break the report module")
    click.echo(f"committed {sha[:12]}: a syntax error in hello/report.py; watch the old release keep serving")


@_cli.command()
@click.option("-c", "--config", "config_path", default=None)
def fix(config_path: str | None) -> None:
    """Commit the revert of what ``break`` did."""
    repo_dir = _demo_repo(config_path)
    target = repo_dir / "hello" / "report.py"
    text = target.read_text()
    if not text.endswith(BREAKAGE):
        raise GitplugError("hello/report.py is not broken; nothing to fix (`python -m gitplug.demo break` breaks it)")
    target.write_text(text[: -len(BREAKAGE)])
    sha = commit_all(repo_dir, "fix the report module")
    click.echo(f"committed {sha[:12]}: hello/report.py is fixed; the branch deploys again")


if __name__ == "__main__":
    try:
        _cli(prog_name="python -m gitplug.demo")
    except GitplugError as exc:
        click.secho(f"Error: {exc}", fg="red", err=True)
        sys.exit(exc.exit_code)
