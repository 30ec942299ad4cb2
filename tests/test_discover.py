"""Discovery (README, "Discovery"): plugins found in a repository's directories.

Through real ``gitplug serve`` processes and a real repository: the
directories under ``plugins/*`` that hold a package deploy (trigger
``discover``); a directory added, renamed and removed follows with a webhook
(the push's fetch scans the repository) and with the entry's polls; an
explicit ``plugins:`` entry of the same name wins; a clashing prefix or an
invalid directory name is refused with a clear error while the rest deploy;
``gitplug status`` says what was discovered, and from where.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import shutil
import uuid
from pathlib import Path

import pytest
import yaml

from gitrepo import GitRepo
from serverproc import PLUGIN_SOURCE, Server, clean_env, cli_json, request, run_cli, wait_for, within

TOKEN = "admin-" + uuid.uuid4().hex
SECRET = "hook-" + uuid.uuid4().hex


def add(repo: GitRepo, directory: str, name: str, version: str = "v1") -> None:
    repo.write(f"plugins/{directory}/{name}/__init__.py", PLUGIN_SOURCE.format(name=name, version=version))


def body_of(server: Server, path: str) -> str:
    return server.get(path).rsplit(" ", 1)[0]  # without the sha


def hook(server: Server, repo: GitRepo) -> dict[str, object]:
    body = json.dumps({"ref": "refs/heads/main", "after": repo.head,
                       "repository": {"clone_url": repo.url, "default_branch": "main"}}).encode()
    signature = hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
    status, text = request("POST", f"{server.base}/_gitplug/webhook", body=body, headers={
        "Content-Type": "application/json", "X-GitHub-Event": "push",
        "X-GitHub-Delivery": str(uuid.uuid4()), "X-Hub-Signature-256": f"sha256={signature}"})
    assert status in (200, 202), text
    return dict(json.loads(text))


def status(config: Path) -> dict[str, dict[str, object]]:
    env = clean_env(GITPLUG_ADMIN_TOKEN=TOKEN, GITPLUG_WEBHOOK_SECRET=SECRET)
    return {p["name"]: p for p in cli_json("status", "-c", config, env=env)["plugins"]}


def write_config(tmp_path: Path, repo: GitRepo, *, poll: float, plugins: dict[str, object]) -> Path:
    config = tmp_path / "deploy.yaml"
    config.write_text(yaml.safe_dump({
        "data_dir": "data", "poll_interval": 3600,
        "admin_token": "${GITPLUG_ADMIN_TOKEN}", "webhook": {"secret": "${GITPLUG_WEBHOOK_SECRET}"},
        "discover": [{"repo": repo.url, "ref": "main", "path": "plugins/*", "test": False,
                      "poll_interval": poll, "config": {"WHO": "{name}"}}],
        "plugins": plugins,
    }, sort_keys=False))
    return config


def test_directories_become_plugins_and_follow_pushes_with_webhooks(tmp_path: Path) -> None:
    repo = GitRepo(tmp_path / "plugins-repo")
    add(repo, "blog", "blog")
    add(repo, "shop", "shop")  # listed explicitly below: that entry wins
    add(repo, "store", "store")  # its prefix /store is the explicit shop's: refused
    add(repo, "bad.name", "bad")  # not a plugin name: refused
    repo.write("plugins/notes/README.md", "no package here: not a plugin\n")
    repo.commit("blog, shop, store")
    config = write_config(tmp_path, repo, poll=3600, plugins={
        "shop": {"repo": repo.url, "path": "plugins/shop", "url_prefix": "/store", "test": False}})
    env = clean_env(GITPLUG_ADMIN_TOKEN=TOKEN, GITPLUG_WEBHOOK_SECRET=SECRET)
    checked = run_cli("check-config", "-c", config, env=env)
    assert checked.returncode == 0, checked.stderr
    assert f"discover plugins/* in {repo.url} @ main -> /{{name}}" in checked.stdout
    with Server(config, env=env) as server:
        # The first scan (a second after the start) deploys what it finds.
        within(10, lambda: body_of(server, "/blog/") == "200 blog v1", what="blog discovered")
        within(10, lambda: body_of(server, "/store/") == "200 shop v1", what="the explicit shop")
        wait_for(lambda: "'store'" in server.log() and "bad.name" in server.log(), timeout=30,
                 what="the refusals in the log")
        log = server.log()
        assert ("discovered plugin 'store' (" in log and "url_prefix '/store' clashes with url_prefix '/store'"
                " of plugin 'shop'; it is not deployed" in log)
        assert "directory 'plugins/bad.name' is not a valid plugin name" in log
        plugins = status(config)
        assert set(plugins) == {"shop", "blog"}
        assert plugins["blog"]["discovered_from"] == {"repo": repo.url, "path": "plugins/*"}
        assert plugins["shop"]["discovered_from"] is None
        assert plugins["blog"]["last_deploy"]["trigger"] == "discover"  # type: ignore[index]

        # A new directory, pushed: the webhook's deploys fetch, the fetch scans, wiki deploys.
        add(repo, "wiki", "wiki")
        repo.commit("wiki")
        assert sorted(hook(server, repo)["queued"]) == ["blog", "shop"]  # type: ignore[arg-type]
        within(5, lambda: body_of(server, "/wiki/") == "200 wiki v1", what="wiki discovered")

        # Renamed: wiki is removed (stopped, shown as removed), wiki2 deploys at /wiki2.
        repo.remove("plugins/wiki")
        add(repo, "wiki2", "wiki2")
        repo.remove("plugins/blog")
        repo.commit("rename wiki, drop blog")
        hook(server, repo)
        within(5, lambda: body_of(server, "/wiki2/") == "200 wiki2 v1", what="wiki2 discovered")
        within(5, lambda: server.get("/wiki/").startswith("404 "), what="wiki stopped")
        within(5, lambda: server.get("/blog/").startswith("404 "), what="blog stopped")
        plugins = status(config)
        assert (plugins["wiki"]["state"], plugins["blog"]["state"]) == ("removed", "removed"), plugins
        assert plugins["wiki2"]["state"] == "live"
        history = cli_json("history", "blog", "-c", config, env=env)
        assert (history[0]["trigger"], history[0]["result"]) == ("discover", "skipped")
        assert history[0]["error"].startswith("removed: plugins/blog/ is no longer in")

        # Back again: blog deploys once more.
        add(repo, "blog", "blog", "v2")
        repo.commit("blog is back")
        hook(server, repo)
        within(5, lambda: body_of(server, "/blog/") == "200 blog v2", what="blog back")
        assert status(config)["blog"]["state"] == "live"
    assert "Traceback" not in server.log(), server.log()


def test_polls_find_new_directories_without_a_webhook(tmp_path: Path) -> None:
    repo = GitRepo(tmp_path / "plugins-repo")
    add(repo, "alpha", "alpha")
    repo.commit("alpha")
    config = write_config(tmp_path, repo, poll=1, plugins={})
    with Server(config, env=clean_env(GITPLUG_ADMIN_TOKEN=TOKEN, GITPLUG_WEBHOOK_SECRET=SECRET)) as server:
        within(10, lambda: body_of(server, "/alpha/") == "200 alpha v1", what="alpha discovered")
        add(repo, "beta", "beta")
        repo.commit("beta")
        within(10, lambda: body_of(server, "/beta/") == "200 beta v1", what="beta found by a poll")
        repo.remove("plugins/alpha")
        repo.commit("alpha gone")
        within(10, lambda: server.get("/alpha/").startswith("404 "), what="alpha removed by a poll")


@pytest.mark.parametrize(("entry", "message"), [
    ({"path": "plugins/*"}, "deploy.yaml:3: discover.0.repo: missing; expected the repository to look in"),
    ({"repo": "/r", "path": "../*"}, "discover.0.path: expected a directory inside the repository such as"
                                     " 'plugins/*' (no empty, '.' or '..' components"),
    ({"repo": "/r", "path": "p/*", "url_prefix": "/same"},
     "discover.0.url_prefix: expected a prefix holding {name}, such as '/{name}'"),
    ({"repo": "/r", "path": "p/*", "colour": "red"}, "discover.0.colour: unknown key 'colour'"),
])
def test_check_config_refuses_bad_discover_entries(tmp_path: Path, entry: dict[str, str], message: str) -> None:
    config = tmp_path / "deploy.yaml"
    config.write_text(yaml.safe_dump({"data_dir": "data", "discover": [entry]}, sort_keys=False))
    proc = run_cli("check-config", "-c", config)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr


def test_serve_dev_takes_a_directory_of_plugins(tmp_path: Path) -> None:
    root = tmp_path / "workspace"
    for name in ("one", "two"):
        (root / name / name).mkdir(parents=True)
        (root / name / name / "__init__.py").write_text(PLUGIN_SOURCE.replace(
            '" + current_plugin.commit[:12]', '"').format(name=name, version="dev"))
    (root / "docs").mkdir()  # no package: not a plugin
    config = tmp_path / "deploy.yaml"
    config.write_text("data_dir: data\nplugins: {}\n")
    with Server(config, extra=["--dev", str(root)]) as server:
        within(2, lambda: server.get("/one/") == "200 one dev " and server.get("/two/") == "200 two dev ",
               what="both plugins of the directory")
        (root / "three" / "three").mkdir(parents=True)
        (root / "three" / "three" / "__init__.py").write_text(PLUGIN_SOURCE.replace(
            '" + current_plugin.commit[:12]', '"').format(name="three", version="dev"))
        within(2, lambda: server.get("/three/") == "200 three dev ", what="a plugin added to the directory")
        shutil.rmtree(root / "two")
        within(2, lambda: server.get("/two/").startswith("404 "), what="a removed plugin stopped")
        assert server.get("/one/") == "200 one dev "
    assert "Traceback" not in server.log(), server.log()
