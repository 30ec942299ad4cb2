"""Discovery (README, "Discovery"): plugins found in a repository's directories.

Through real ``gitplug serve`` processes and a real repository: the
directories under ``plugins/*`` that hold a package deploy (trigger
``discover``); a directory added, renamed and removed follows with a webhook
(the push's fetch scans the repository) and with the entry's polls; an
explicit ``plugins:`` entry of the same name wins; a clashing prefix or an
invalid directory name is refused with a clear error while the rest deploy;
``gitplug status`` says what was discovered, and from where. The faults of
docs/FAULTS.md: two directories of one name, a prefix on ``api_prefix``, a
repository that cannot be fetched, a corrupt ``discovered.json``.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import os
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


def write_config(tmp_path: Path, repo: GitRepo, *, poll: float, plugins: dict[str, object],
                 entries: tuple[dict[str, object], ...] = ({"path": "plugins/*"},)) -> Path:
    config = tmp_path / "deploy.yaml"
    config.write_text(yaml.safe_dump({
        "data_dir": "data", "poll_interval": 3600,
        "admin_token": "${GITPLUG_ADMIN_TOKEN}", "webhook": {"secret": "${GITPLUG_WEBHOOK_SECRET}"},
        "discover": [{"repo": repo.url, "ref": "main", "test": False, "poll_interval": poll,
                      "config": {"WHO": "{name}"}, **entry} for entry in entries],
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


# -- faults (docs/FAULTS.md, "Configuration": the discover rows) ---------------------------------

ENV = clean_env(GITPLUG_ADMIN_TOKEN=TOKEN, GITPLUG_WEBHOOK_SECRET=SECRET)


def add_at(repo: GitRepo, directory: str, version: str = "v1") -> None:
    """A plugin package in ``directory``, named after the directory."""
    name = directory.rsplit("/", 1)[-1]
    repo.write(f"{directory}/{name}/__init__.py", PLUGIN_SOURCE.format(name=name, version=version))


def logged(server: Server, message: str) -> list[str]:
    """The lines of the server's log that hold ``message``."""
    return [line for line in server.log().splitlines() if message in line]


def test_two_directories_of_one_name_are_both_refused_while_the_rest_deploy(tmp_path: Path) -> None:
    """One entry finding a name twice, and two entries finding one name: neither deploys, not even
    the deploy already running when the second turned up (an error, logged once while nothing
    about it changes); an explicit entry of that name wins silently."""
    repo = GitRepo(tmp_path / "plugins-repo")
    for directory in ("teams/red/twin", "teams/blue/twin",  # 'teams/*/*' finds twin twice
                      "teams/red/shop", "teams/blue/shop",  # twice too, but listed under plugins:
                      "teams/red/solo", "extra/pair"):
        add_at(repo, directory)
    repo.commit("two of some names")
    gate = tmp_path / "gate-open"  # the gate of the plugins of extra/* waits for this file
    config = write_config(tmp_path, repo, poll=1, entries=(
        {"path": "teams/*/*"},
        {"path": "extra/*", "test": f"sh -c 'while [ ! -e {gate} ]; do sleep 0.05; done'", "test_timeout": 60},
    ), plugins={"shop": {"repo": repo.url, "path": "teams/red/shop", "test": False}})
    twin = (f"gitplug: discover 'teams/*/*' in {repo.url}: 2 directories are called 'twin'"
            " (teams/blue/twin, teams/red/twin); none of them is deployed. Rename all but one.")
    pair = (f"gitplug: discovered plugin 'pair' is found twice ({repo.url} teams/red/pair and {repo.url}"
            " extra/pair); neither is deployed. Rename one directory, or list the one you want under plugins:")

    def once(message: str) -> bool:
        lines = logged(server, message)
        assert len(lines) == 1 and " ERROR " in lines[0], lines
        return True

    with contextlib.ExitStack() as cleanup:
        server = cleanup.enter_context(Server(config, env=ENV))
        cleanup.callback(gate.touch)  # first on the way out: no gate left waiting for a stopping server
        within(10, lambda: body_of(server, "/solo/") == "200 solo v1", what="solo discovered")
        wait_for(lambda: logged(server, twin), timeout=30, what="the refusal of twin")
        wait_for(lambda: "plugin pair: staged release" in server.log(), timeout=10, what="pair's deploy in its gate")
        # A second pair, in the other entry's directories: refused while the first one's deploy runs.
        add_at(repo, "teams/red/pair")
        repo.commit("a second pair")
        wait_for(lambda: logged(server, pair), timeout=15, what="the refusal of pair")
        gate.touch()
        wait_for(lambda: "plugin pair: removed from the configuration during deploy of" in server.log(),
                 timeout=15, what="the end of pair's deploy")
        assert server.get("/pair/").startswith("404 ") and server.get("/twin/").startswith("404 ")
        assert body_of(server, "/shop/") == "200 shop v1"
        assert once(twin) and once(pair)  # twin's refusal stood when pair's came: not logged again
        assert "called 'shop'" not in server.log()  # the explicit shop wins, silently
        plugins = status(config)
        assert set(plugins) == {"shop", "solo"}, plugins
        assert plugins["shop"]["discovered_from"] is None

        # Renamed as the errors say, one name at a time: each deploys once one directory of it is
        # left, and the refusal that stands is not logged again.
        repo.remove("teams/blue/twin")
        repo.commit("one twin")
        within(10, lambda: body_of(server, "/twin/") == "200 twin v1", what="twin deployed")
        assert server.get("/pair/").startswith("404 ") and once(pair)
        repo.remove("extra/pair")
        repo.commit("one pair")
        within(10, lambda: body_of(server, "/pair/") == "200 pair v1", what="pair deployed")
        plugins = status(config)
        assert plugins["twin"]["discovered_from"] == {"repo": repo.url, "path": "teams/*/*"}
        assert plugins["pair"]["discovered_from"] == {"repo": repo.url, "path": "teams/*/*"}
        assert once(twin) and once(pair)
    assert "Traceback" not in server.log(), server.log()


def test_a_discovered_prefix_on_the_api_prefix_is_refused_and_the_api_keeps_it(tmp_path: Path) -> None:
    """A directory called ``_gitplug`` would take gitplug's own URLs: it is refused, the rest deploy,
    and the webhook (under api_prefix) still works."""
    repo = GitRepo(tmp_path / "plugins-repo")
    add_at(repo, "plugins/_gitplug")
    add_at(repo, "plugins/blog")
    repo.commit("_gitplug and blog")
    config = write_config(tmp_path, repo, poll=3600, plugins={})
    error = (f"gitplug: discovered plugin '_gitplug' ({repo.url} plugins/_gitplug): url_prefix '/_gitplug'"
             " clashes with api_prefix '/_gitplug'; it is not deployed. Set url_prefix in the discover entry,"
             " or rename the directory")
    with Server(config, env=ENV) as server:
        within(10, lambda: body_of(server, "/blog/") == "200 blog v1", what="blog discovered")
        wait_for(lambda: logged(server, error), timeout=30, what="the refusal of _gitplug")
        # gitplug's URLs stay gitplug's: a webhook is taken, its fetch scans, and a new directory deploys.
        add_at(repo, "plugins/wiki")
        repo.commit("wiki")
        assert hook(server, repo)["queued"] == ["blog"]
        within(5, lambda: body_of(server, "/wiki/") == "200 wiki v1", what="wiki discovered")
        assert set(status(config)) == {"blog", "wiki"}
        lines = logged(server, error)
        assert len(lines) == 1 and " ERROR " in lines[0], lines  # once: the second scan changed nothing of it
    assert "Traceback" not in server.log(), server.log()


def test_a_scan_whose_fetch_fails_changes_nothing(tmp_path: Path) -> None:
    """The discover repository gone: each scan warns (entry and cause); the plugins found before keep
    serving and discovered.json is untouched; once the repository is back, scans apply again."""
    repo = GitRepo(tmp_path / "plugins-repo")
    add_at(repo, "plugins/alpha")
    alpha = repo.commit("alpha")
    url = repo.url
    config = write_config(tmp_path, repo, poll=1, plugins={})
    record = tmp_path / "data" / "discovered.json"
    warning = (f"WARNING gitplug.services: gitplug: discover 'plugins/*' in {url}: the scan failed, the plugins"
               f" found before stay: could not fetch {url}: no git repository there.")
    with Server(config, env=ENV) as server:
        within(10, lambda: body_of(server, "/alpha/") == "200 alpha v1", what="alpha discovered")
        before = record.read_bytes()
        moved = repo.path.rename(tmp_path / "elsewhere")
        # Two failed scans: the first one's effects, had it any, were applied before the second (one queue).
        wait_for(lambda: len(logged(server, warning)) >= 2, timeout=15, what="two failed scans")
        assert body_of(server, "/alpha/") == "200 alpha v1"
        assert record.read_bytes() == before
        plugins = status(config)
        # Still the discovered alpha at its commit: not removed (behind once its own poll fails to fetch too).
        assert plugins["alpha"]["discovered_from"] == {"repo": url, "path": "plugins/*"}
        assert plugins["alpha"]["state"] in ("live", "behind") and plugins["alpha"]["live_commit"] == alpha, plugins
        assert "removed ['alpha']" not in server.log() and "plugin alpha: removed" not in server.log()

        # Back, with a new directory: the next poll's scan finds it.
        add_at(GitRepo(moved), "plugins/beta")
        GitRepo(moved).commit("beta")
        moved.rename(repo.path)
        within(10, lambda: body_of(server, "/beta/") == "200 beta v1", what="beta found once the repository is back")
        assert body_of(server, "/alpha/") == "200 alpha v1"
    assert "Traceback" not in server.log(), server.log()


def test_an_unreadable_discovered_json_is_scanned_anew(tmp_path: Path) -> None:
    """``<data_dir>/discovered.json`` corrupt: a starting server warns and serves what its first scan
    finds; a running one keeps serving the discovered plugins and scans at once (not at the next
    poll, an hour away), which writes the file anew."""
    repo = GitRepo(tmp_path / "plugins-repo")
    add_at(repo, "plugins/alpha")
    repo.commit("alpha")
    config = write_config(tmp_path, repo, poll=3600, plugins={})
    record = tmp_path / "data" / "discovered.json"
    key = f"{repo.url} plugins/*"

    def scanned() -> bool:
        try:
            return bool(json.loads(record.read_text())["entries"][key]["found"] == {"alpha": "plugins/alpha"})
        except (ValueError, KeyError, TypeError):
            return False

    with Server(config, env=ENV) as server:
        within(10, lambda: body_of(server, "/alpha/") == "200 alpha v1", what="alpha discovered")
    text = record.read_text()
    record.write_text(text[: len(text) // 2])  # cut short, as by a disk fault
    with pytest.raises(ValueError) as caught:
        json.loads(record.read_text())
    cause = str(caught.value)
    with Server(config, env=ENV) as server:
        within(10, lambda: body_of(server, "/alpha/") == "200 alpha v1", what="alpha found by the first scan")
        assert len(logged(server, f"WARNING gitplug.deploy.discovery: ignoring an unreadable {record} ({cause}):"
                                  " discovery runs again")) >= 1, server.log()
        assert scanned()

        # Garbled while serving: the control loop (about four times a second) ignores it and has every
        # entry scanned; a scan still running from the start may find it first. Either way a warning
        # names the file and the cause, alpha serves throughout, and the file is written anew.
        for garbled, why in (("{", "Expecting property name enclosed in double quotes"),
                             (json.dumps({"format": 1, "entries": {key: "alpha"}}), "not a record of discover scans")):
            replacement = record.with_name("garbled.tmp")
            replacement.write_text(garbled)
            os.replace(replacement, record)  # whole, as a reader must see it
            answers: list[str] = []

            def rewritten(why: str = why, answers: list[str] = answers) -> bool:
                answers.append(body_of(server, "/alpha/"))
                return bool(logged(server, f"an unreadable {record} ({why}")) and scanned()

            wait_for(rewritten, timeout=15, what=f"{garbled!r} seen and written anew by a scan")
            lines = logged(server, f"an unreadable {record} ({why}")
            assert all(" WARNING " in line for line in lines) and any(
                "the discovered plugins keep running; discovery runs again" in line
                or "with what discover 'plugins/*' in" in line for line in lines), lines
            assert set(answers) == {"200 alpha v1"}, answers
        assert body_of(server, "/alpha/") == "200 alpha v1"
        assert status(config)["alpha"]["state"] == "live"
    assert "Traceback" not in server.log(), server.log()
