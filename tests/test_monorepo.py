"""Plugins inside a monorepo (README, "Monorepos: path"), through a real ``gitplug serve``.

One repository, served over git smart HTTP on 127.0.0.1, holds three
plugins under ``plugins/shop``, ``plugins/blog`` and ``plugins/wiki``. Each
release holds its directory only (its package, its ``tests/`` run by the gate,
its ``requirements.txt``, not the root's). A push that touches one directory
deploys that plugin; the others record ``skipped`` with the reason. The
webhook for the repository triggers all three, which share one fetch.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import uuid
from pathlib import Path

import pytest
import yaml

from gitplug.config import load_config
from gitrepo import GitRepo, serve_http
from serverproc import (
    PLUGIN_SOURCE,
    Server,
    clean_env,
    cli_json,
    expected,
    request,
    run_cli,
    wait_for,
    within,
)

TOKEN = "admin-" + uuid.uuid4().hex
SECRET = "hook-" + uuid.uuid4().hex
NAMES = ("shop", "blog", "wiki")


def write_plugin(repo: GitRepo, name: str, version: str) -> None:
    base = f"plugins/{name}"
    repo.write(f"{base}/{name}/__init__.py", PLUGIN_SOURCE.format(name=name, version=version))
    # Relative to the plugin's directory: run by the gate in the release's root.
    repo.write(f"{base}/tests/test_{name}.py",
               f"import {name}\n\ndef test_named():\n    assert {name}.plugin.name == '{name}'\n")
    repo.write(f"{base}/requirements.txt", "flask>=3\n")


def served_at(server: Server, name: str, version: str, sha: str) -> bool:
    return server.get(f"/{name}/") == expected(name, version, sha)


def api_history(server: Server, name: str) -> list[dict[str, object]]:
    status, text = request("GET", f"{server.base}/_gitplug/api/plugins/{name}/history",
                           headers={"Authorization": f"Bearer {TOKEN}"})
    assert status == 200, text
    return list(json.loads(text))


def hook(server: Server, repo_url: str, head: str) -> tuple[int, dict[str, object]]:
    body = json.dumps({"ref": "refs/heads/main", "after": head,
                       "repository": {"clone_url": repo_url, "default_branch": "main"}}).encode()
    signature = hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
    status, text = request("POST", f"{server.base}/_gitplug/webhook", body=body, headers={
        "Content-Type": "application/json", "X-GitHub-Event": "push",
        "X-GitHub-Delivery": str(uuid.uuid4()), "X-Hub-Signature-256": f"sha256={signature}"})
    return status, json.loads(text)


def test_three_plugins_of_one_repository_deploy_per_path_with_one_fetch(tmp_path: Path) -> None:
    repo = GitRepo(tmp_path / "git" / "mono")
    repo.write("README.md", "the monorepo\n")
    repo.write("requirements.txt", "no-such-dist-xyz\n")  # the root's: never a release's
    for name in NAMES:
        write_plugin(repo, name, "v1")
    v1 = repo.commit("three plugins")
    requests: list[str] = []
    with serve_http(tmp_path / "git", log=requests) as base:
        url = f"{base}/mono"
        config = tmp_path / "deploy.yaml"
        config.write_text(yaml.safe_dump({
            "data_dir": "data", "poll_interval": 3600,
            "admin_token": "${GITPLUG_ADMIN_TOKEN}", "webhook": {"secret": "${GITPLUG_WEBHOOK_SECRET}"},
            "plugins": {name: {"repo": url, "path": f"plugins/{name}", "ref": "main",
                               "test": "python -m pytest -q -p no:cacheprovider", "test_timeout": 60}
                        for name in NAMES},
        }, sort_keys=False))
        env = clean_env(GITPLUG_ADMIN_TOKEN=TOKEN, GITPLUG_WEBHOOK_SECRET=SECRET)
        checked = run_cli("check-config", "-c", config, env=env)
        assert checked.returncode == 0 and f"shop: {url} path plugins/shop @ main" in checked.stdout
        with Server(config, env=env) as server:
            # The controller's first polls deploy all three from one mirror.
            for name in NAMES:
                within(30, lambda name=name: served_at(server, name, "v1", v1), what=f"{name} v1")
            mirrors = [p for p in (tmp_path / "data" / "mirrors").iterdir() if p.suffix == ".git"]
            assert len(mirrors) == 1, mirrors
            release = tmp_path / "data" / "releases" / "shop" / v1
            assert sorted(p.name for p in release.iterdir()) == [".gitplug", "requirements.txt", "shop", "tests"]
            (gate_log,) = (tmp_path / "data" / "logs" / "shop").glob("*.log")
            assert "1 passed" in gate_log.read_text()

            # The positive control: what one fetch of a push costs the git server.
            write_plugin(repo, "shop", "v2")
            repo.commit("shop v2")
            before = len(requests)
            status, text = request("POST", f"{server.base}/_gitplug/api/plugins/shop/deploy", body=b"{}",
                                   headers={"Authorization": f"Bearer {TOKEN}",
                                            "Content-Type": "application/json"})
            assert status == 200 and json.loads(text)["result"] == "live", text
            one_fetch = len(requests) - before
            assert one_fetch >= 1

            # A push under plugins/shop only: the webhook triggers all three, with one fetch;
            # shop deploys, blog and wiki record why they did not.
            write_plugin(repo, "shop", "v3")
            v3 = repo.commit("shop v3")
            before = len(requests)
            status, body = hook(server, url, v3)
            assert status == 202 and sorted(body["queued"]) == sorted(NAMES), body  # type: ignore[arg-type]
            within(5, lambda: served_at(server, "shop", "v3", v3), what="shop v3")
            for name in ("blog", "wiki"):
                last = wait_for(lambda name=name: (api_history(server, name)[0]
                                                  if api_history(server, name)[0]["commit"] == v3 else None),
                                timeout=30, what=f"{name}'s record of {v3[:12]}")
                history = api_history(server, name)[0]
                assert (history["result"], history["trigger"]) == ("skipped", "webhook"), history
                assert str(history["error"]).startswith(
                    f"nothing changed under plugins/{name}/ in {v3[:12]}: the live release {v1[:12]}")
                assert served_at(server, name, "v1", v1)
                del last
            assert len(requests) - before == one_fetch, requests[before:]

            # A push under plugins/blog: blog deploys; shop, which serves v3, is skipped.
            write_plugin(repo, "blog", "v2")
            b2 = repo.commit("blog v2")
            status, body = hook(server, url, b2)
            assert status == 202, body
            within(5, lambda: served_at(server, "blog", "v2", b2), what="blog v2")
            wait_for(lambda: api_history(server, "shop")[0]["commit"] == b2, timeout=30, what="shop's record")
            assert api_history(server, "shop")[0]["result"] == "skipped"
            assert served_at(server, "shop", "v3", v3)
        assert "Traceback" not in server.log()

        history = cli_json("history", "wiki", "-c", config, env=env)
        assert [h["result"] for h in history[:3]] == ["skipped", "skipped", "live"], history
        (shop,) = [p for p in cli_json("status", "-c", config, env=env)["plugins"] if p["name"] == "shop"]
        assert (shop["path"], shop["live_commit"]) == ("plugins/shop", v3)


def test_a_path_missing_from_the_commit_fails_at_stage(tmp_path: Path) -> None:
    repo = GitRepo(tmp_path / "mono")
    write_plugin(repo, "shop", "v1")
    sha = repo.commit("only shop")
    config = tmp_path / "deploy.yaml"
    config.write_text(yaml.safe_dump({"data_dir": "data", "plugins": {
        "blog": {"repo": repo.url, "path": "plugins/blog", "test": False}}}))
    proc = run_cli("deploy", "blog", "-c", config)
    assert proc.returncode != 0
    assert (f"plugin 'blog': commit {sha} has no directory 'plugins/blog' (the plugin's path). Fix path in"
            " the configuration, or push a commit that has it.") in proc.stderr
    assert cli_json("history", "blog", "-c", config)[0]["stage"] == "stage"


@pytest.mark.parametrize(("value", "why"), [
    ("/plugins/shop", "relative to the repository's root"),
    ("plugins/../../etc", "no empty, '.' or '..' components"),
    ("plugins/*", "no wildcards here"),
    (".git/hooks", "not inside .git"),
])
def test_check_config_refuses_a_bad_path_with_file_and_line(tmp_path: Path, value: str, why: str) -> None:
    config = tmp_path / "deploy.yaml"
    config.write_text(f"data_dir: data\nplugins:\n  shop:\n    repo: {tmp_path}\n    path: '{value}'\n")
    proc = run_cli("check-config", "-c", config)
    assert proc.returncode == 2, proc.stdout
    assert "deploy.yaml:5: plugins.shop.path: expected a directory inside the repository such as" in proc.stderr
    assert why in proc.stderr and "Traceback" not in proc.stderr
    with pytest.raises(Exception, match="plugins.shop.path"):
        load_config(config)
