"""Tests for gitplug.web.webhook: real forge payloads, real HMACs, real configurations."""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import pytest
from flask import Flask, jsonify, request
from werkzeug.datastructures import Headers

from gitplug.config import GitplugConfig, PluginConfig, config_from_mapping
from gitplug.errors import GitplugError, StateError, UnknownPlugin
from gitplug.web.webhook import (
    MAX_BODY,
    PushEvent,
    WebhookRejected,
    WebhookResponse,
    handle_webhook,
    normalise_repo_url,
    parse_push,
    plugins_for_push,
    verify_signature,
)

SECRET = "It's a Secret to Everybody"
SHA1 = "59b20b8d5c6ff8d09518454d4dd8b7a30f095ab5"
SHA0 = "6113728f27ae82c7b1a177c8d03f9e96e0adf246"
ZERO = "0" * 40

# --------------------------------------------------------------------------- payloads
# Trimmed from real deliveries: the fields forges send, with long lists cut short.

GITHUB_REPO = {
    "id": 1296269, "node_id": "MDEwOlJlcG9zaXRvcnkxMjk2MjY5", "name": "hello",
    "full_name": "team/hello", "private": True,
    "owner": {"name": "team", "login": "team", "id": 9919, "type": "Organization"},
    "html_url": "https://github.com/team/hello", "description": "hello plugin",
    "fork": False, "url": "https://github.com/team/hello",
    "git_url": "git://github.com/team/hello.git", "ssh_url": "git@github.com:team/hello.git",
    "clone_url": "https://github.com/team/hello.git", "svn_url": "https://github.com/team/hello",
    "homepage": "https://hello.example.com", "size": 108, "default_branch": "main",
    "master_branch": "main", "organization": "team", "pushed_at": 1718000000,
}
GITHUB_PUSH = {
    "ref": "refs/heads/main", "before": SHA0, "after": SHA1, "base_ref": None,
    "repository": GITHUB_REPO,
    "pusher": {"name": "octocat", "email": "octocat@github.com"},
    "organization": {"login": "team", "id": 9919},
    "sender": {"login": "octocat", "id": 583231, "type": "User"},
    "created": False, "deleted": False, "forced": False,
    "compare": f"https://github.com/team/hello/compare/{SHA0[:12]}...{SHA1[:12]}",
    "commits": [{
        "id": SHA1, "tree_id": "f9d2a07e9488b91af2641b26b9407fe22a451433", "distinct": True,
        "message": "Say hello in French", "timestamp": "2024-06-10T12:00:00+02:00",
        "url": f"https://github.com/team/hello/commit/{SHA1}",
        "author": {"name": "Octo Cat", "email": "octocat@github.com", "username": "octocat"},
        "committer": {"name": "GitHub", "email": "noreply@github.com", "username": "web-flow"},
        "added": [], "removed": [], "modified": ["hello/templates/index.html"],
    }],
    "head_commit": {"id": SHA1, "message": "Say hello in French"},
}
GITHUB_PING = {
    "zen": "Keep it logically awesome.", "hook_id": 109948940,
    "hook": {"type": "Repository", "id": 109948940, "name": "web", "active": True,
             "events": ["push"], "config": {"content_type": "json", "insecure_ssl": "0",
                                            "url": "https://deploy.example.com/_gitplug/webhook"}},
    "repository": GITHUB_REPO, "sender": {"login": "octocat", "id": 583231},
}
GITEA_REPO = {
    "id": 3, "owner": {"id": 2, "login": "team", "username": "team"}, "name": "shop",
    "full_name": "team/shop", "private": True, "fork": False, "mirror": False,
    "html_url": "https://git.example.com/team/shop",
    "ssh_url": "ssh://git@git.example.com:2222/team/shop.git",
    "clone_url": "https://git.example.com/team/shop.git", "original_url": "", "website": "",
    "default_branch": "main", "archived": False,
}
GITEA_PUSH = {
    "ref": "refs/heads/main", "before": SHA0, "after": SHA1,
    "compare_url": f"https://git.example.com/team/shop/compare/{SHA0}...{SHA1}",
    "commits": [{"id": SHA1, "message": "Fix basket total\n", "url":
                 f"https://git.example.com/team/shop/commit/{SHA1}",
                 "author": {"name": "dev", "email": "dev@example.com", "username": "dev"},
                 "committer": {"name": "dev", "email": "dev@example.com", "username": "dev"},
                 "verification": None, "timestamp": "2024-06-10T12:00:00Z",
                 "added": [], "removed": [], "modified": ["shop/views.py"]}],
    "total_commits": 1, "head_commit": {"id": SHA1, "message": "Fix basket total\n"},
    "repository": GITEA_REPO, "pusher": {"id": 1, "login": "dev"},
    "sender": {"id": 1, "login": "dev"},
}
GITLAB_PROJECT = {
    "id": 15, "name": "api", "description": "", "web_url": "https://gitlab.example.com/team/api",
    "avatar_url": None, "git_ssh_url": "git@gitlab.example.com:team/api.git",
    "git_http_url": "https://gitlab.example.com/team/api.git", "namespace": "team",
    "visibility_level": 0, "path_with_namespace": "team/api", "default_branch": "main",
    "ci_config_path": None, "homepage": "https://gitlab.example.com/team/api",
    "url": "git@gitlab.example.com:team/api.git", "ssh_url": "git@gitlab.example.com:team/api.git",
    "http_url": "https://gitlab.example.com/team/api.git",
}
GITLAB_REPOSITORY = {
    "name": "api", "url": "git@gitlab.example.com:team/api.git", "description": "",
    "homepage": "https://gitlab.example.com/team/api",
    "git_http_url": "https://gitlab.example.com/team/api.git",
    "git_ssh_url": "git@gitlab.example.com:team/api.git", "visibility_level": 0,
}
GITLAB_PUSH = {
    "object_kind": "push", "event_name": "push", "before": SHA0, "after": SHA1,
    "ref": "refs/heads/main", "ref_protected": True, "checkout_sha": SHA1,
    "message": None, "user_id": 4, "user_name": "John Smith", "user_username": "jsmith",
    "user_email": "", "user_avatar": "https://gitlab.example.com/uploads/user/avatar/4/a.png",
    "project_id": 15, "project": GITLAB_PROJECT,
    "commits": [{"id": SHA1, "message": "Add /v2/orders\n", "title": "Add /v2/orders",
                 "timestamp": "2024-06-10T12:00:00+00:00",
                 "url": f"https://gitlab.example.com/team/api/-/commit/{SHA1}",
                 "author": {"name": "John Smith", "email": "[REDACTED]"},
                 "added": ["api/orders.py"], "modified": [], "removed": []}],
    "total_commits_count": 1, "push_options": {}, "repository": GITLAB_REPOSITORY,
}
GITLAB_TAG_PUSH = {**GITLAB_PUSH, "object_kind": "tag_push", "event_name": "tag_push",
                   "ref": "refs/tags/v2.1.0", "before": ZERO, "commits": [],
                   "message": "Release 2.1.0", "total_commits_count": 0}
BITBUCKET_REPO = {
    "type": "repository", "full_name": "team/site", "name": "site",
    "uuid": "{6b9ee4c6-7ba9-4a61-9b5c-0c2a1e2b8f6e}", "is_private": True, "scm": "git",
    "links": {"self": {"href": "https://api.bitbucket.org/2.0/repositories/team/site"},
              "html": {"href": "https://bitbucket.org/team/site"},
              "avatar": {"href": "https://bytebucket.org/ravatar/%7B6b9ee4c6%7D?ts=default"}},
    "workspace": {"type": "workspace", "slug": "team", "name": "Team"},
    "project": {"type": "project", "key": "WEB", "name": "Web"},
}


def bitbucket_change(kind: str, name: str, new_hash: str | None) -> dict[str, Any]:
    def side(sha: str) -> dict[str, Any]:
        return {"type": kind, "name": name,
                "target": {"type": "commit", "hash": sha, "message": "Update footer\n",
                           "date": "2024-06-10T12:00:00+00:00"},
                "links": {"html": {"href": f"https://bitbucket.org/team/site/branch/{name}"}}}

    return {"old": side(SHA0), "new": side(new_hash) if new_hash else None,
            "created": False, "forced": False, "closed": new_hash is None, "truncated": False,
            "commits": [{"hash": new_hash, "type": "commit"}] if new_hash else []}


BITBUCKET_PUSH = {
    "push": {"changes": [bitbucket_change("branch", "main", SHA1)]},
    "repository": BITBUCKET_REPO,
    "actor": {"display_name": "Dev One", "type": "user", "nickname": "dev1"},
}


def generic_push(repo: str, ref: str = "refs/heads/release", after: str = SHA1) -> dict[str, Any]:
    return {"repository": {"url": repo}, "ref": ref, "before": SHA0, "after": after}


# --------------------------------------------------------------------------- helpers


def dumps(payload: Any) -> bytes:
    return json.dumps(payload).encode()


def hub(body: bytes, secret: str = SECRET, algo: str = "sha256") -> str:
    return f"{algo}=" + hmac.new(secret.encode(), body, getattr(hashlib, algo)).hexdigest()


def bare(body: bytes, secret: str = SECRET) -> str:
    return hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def github_headers(body: bytes, event: str = "push", **extra: str) -> dict[str, str]:
    return {"Host": "deploy.example.com", "User-Agent": "GitHub-Hookshot/4c3a2e1",
            "Content-Type": "application/json", "Content-Length": str(len(body)),
            "X-GitHub-Delivery": "72d3162e-cc78-11e3-81ab-4c9367dc0958",
            "X-GitHub-Event": event, "X-GitHub-Hook-ID": "109948940",
            "X-GitHub-Hook-Installation-Target-ID": "1296269",
            "X-GitHub-Hook-Installation-Target-Type": "repository",
            "X-Hub-Signature": hub(body, algo="sha1"), "X-Hub-Signature-256": hub(body),
            **extra}


def gitea_headers(body: bytes, **extra: str) -> dict[str, str]:
    # Gitea 1.21 sends its own, Gogs' and GitHub's headers, with sha1 and sha256 signatures.
    delivery = "c5d5a5a4-6b1b-4c1d-9f55-2f3b4a5e6d7c"
    return {"Content-Type": "application/json", "User-Agent": "Go-http-client/1.1",
            "X-Gitea-Delivery": delivery, "X-Gitea-Event": "push", "X-Gitea-Event-Type": "push",
            "X-Gitea-Signature": bare(body), "X-Gogs-Delivery": delivery, "X-Gogs-Event": "push",
            "X-Gogs-Event-Type": "push", "X-Gogs-Signature": bare(body),
            "X-GitHub-Delivery": delivery, "X-GitHub-Event": "push",
            "X-GitHub-Event-Type": "push", "X-Hub-Signature": hub(body, algo="sha1"),
            "X-Hub-Signature-256": hub(body), **extra}


def gitlab_headers(event: str = "Push Hook", token: str = SECRET, **extra: str) -> dict[str, str]:
    return {"Content-Type": "application/json", "User-Agent": "GitLab/16.11.2",
            "X-Gitlab-Event": event, "X-Gitlab-Token": token,
            "X-Gitlab-Instance": "https://gitlab.example.com",
            "X-Gitlab-Webhook-UUID": "0b3c6f0e-9f0a-4d7e-8e1f-1f2e3d4c5b6a",
            "X-Gitlab-Event-UUID": "13792a34-cac6-4fda-95a8-c58e00a3954e",
            "Idempotency-Key": "f5e5f430-f57b-4e6e-9fac-d9128cd7232f", **extra}


def bitbucket_headers(body: bytes, **extra: str) -> dict[str, str]:
    return {"Content-Type": "application/json", "User-Agent": "Bitbucket-Webhooks/2.0",
            "X-Event-Key": "repo:push", "X-Request-UUID": "a3b3f8d2-0c4e-4b7a-9a59-77d1c5a0e2f1",
            "X-Hook-UUID": "9f0c8d7e-6b5a-4c3d-2e1f-0a9b8c7d6e5f", "X-Attempt-Number": "1",
            "X-Hub-Signature": hub(body), **extra}


def generic_headers(body: bytes, delivery: str = "post-receive-1", **extra: str) -> dict[str, str]:
    return {"Content-Type": "application/json", "X-Gitplug-Delivery": delivery,
            "X-Gitplug-Signature": hub(body), **extra}


@pytest.fixture()
def cfg(tmp_path: Path) -> GitplugConfig:
    """Plugins spread over every forge, in every URL spelling a user might write."""
    return config_from_mapping({
        "webhook": {"secret": SECRET},
        "plugins": {
            "hello": {"repo": "git@github.com:team/hello.git", "ref": "main"},
            "hello_v1": {"repo": "https://GitHub.com/Team/Hello/", "ref": "v1.0.0"},
            "hello_frozen": {"repo": "https://github.com/team/hello", "ref": SHA0},
            "shop": {"repo": "ssh://git@git.example.com:2222/team/shop.git", "ref": "main"},
            "api": {"repo": "https://gitlab.example.com/team/api.git"},
            "api_release": {"repo": "git@gitlab.example.com:team/api", "ref": "v2.1.0"},
            "site": {"repo": "git@bitbucket.org:team/site.git", "ref": "refs/heads/main"},
            "local": {"repo": "./repos/local.git", "ref": "release"},
        },
    }, base_dir=tmp_path, environ={})


class Forge:
    """The server's side of the handler: a real set of deliveries and a queue list."""

    def __init__(self, cfg: GitplugConfig, pinned: tuple[str, ...] = ()) -> None:
        self.cfg = cfg
        self.seen: set[str] = set()
        self.queued: list[tuple[str, PushEvent]] = []
        self.pinned = set(pinned)

    def remember(self, delivery: str) -> bool:
        fresh = delivery not in self.seen
        self.seen.add(delivery)
        return fresh

    def queue(self, name: str, event: PushEvent) -> None:
        self.queued.append((name, event))

    def send(self, headers: Mapping[str, str], body: bytes, *, plugin: str | None = None,
             secret: str | None = SECRET, max_body: int = MAX_BODY) -> WebhookResponse:
        return handle_webhook(headers=headers, body=body, secret=secret,
                              plugins=self.cfg.plugins, plugin=plugin,
                              remember_delivery=self.remember, queue_deploy=self.queue,
                              is_pinned=self.pinned.__contains__, max_body=max_body)

    @property
    def names(self) -> list[str]:
        return [name for name, _ in self.queued]


@pytest.fixture()
def forge(cfg: GitplugConfig) -> Forge:
    return Forge(cfg)


# --------------------------------------------------------------------------- each forge


def test_github_push_queues_the_plugin_tracking_the_branch(forge: Forge) -> None:
    body = dumps(GITHUB_PUSH)
    answer = forge.send(github_headers(body), body)
    assert answer.status == 202
    assert answer.body["status"] == "queued" and answer.body["queued"] == ["hello"]
    assert answer.body["forge"] == "github" and answer.body["ref"] == "refs/heads/main"
    assert "hello" in answer.body["message"] and "refs/heads/main" in answer.body["message"]
    name, event = forge.queued[0]
    assert forge.names == ["hello"]
    assert event == PushEvent(
        forge="github", delivery_id="72d3162e-cc78-11e3-81ab-4c9367dc0958",
        repo_urls=("https://github.com/team/hello.git", "git@github.com:team/hello.git",
                   "git://github.com/team/hello.git", "https://github.com/team/hello"),
        ref="refs/heads/main", after=SHA1, is_ping=False, event="push",
        refs=("refs/heads/main",), default_branch="main")
    assert forge.seen == {"72d3162e-cc78-11e3-81ab-4c9367dc0958"}


def test_github_ping_answers_pong_and_does_nothing_else(forge: Forge) -> None:
    body = dumps(GITHUB_PING)
    answer = forge.send(github_headers(body, event="ping"), body)
    assert (answer.status, answer.body["status"]) == (200, "pong")
    assert forge.queued == [] and forge.seen == set()


def test_github_form_encoded_payload_is_read(forge: Forge) -> None:
    # GitHub's default content type: the JSON is the form field "payload", signed as sent.
    body = urlencode({"payload": json.dumps(GITHUB_PUSH)}).encode()
    headers = github_headers(body, **{"Content-Type": "application/x-www-form-urlencoded"})
    assert forge.send(headers, body).status == 202 and forge.names == ["hello"]


def test_gitea_form_encoded_payload_is_verified_over_the_json(forge: Forge) -> None:
    # Gitea (services/webhook/deliver.go) and Forgejo sign the JSON payload, then
    # send it as the form field "payload": the signature is not over the body.
    payload = json.dumps(GITEA_PUSH).encode()
    body = urlencode({"payload": payload}).encode()
    assert body != payload
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    answer = forge.send(gitea_headers(payload, **form), body)
    assert (answer.status, answer.body["queued"]) == (202, ["shop"]), answer.body
    # Forgejo's own header, alone: the same rule.
    forgejo = {"Content-Type": "application/x-www-form-urlencoded", "X-Forgejo-Event": "push",
               "X-Forgejo-Delivery": "f-1", "X-Forgejo-Signature": bare(payload)}
    assert forge.send(forgejo, body).status == 202
    # What Gitea never sends, a signature over the form body, is refused: it proves
    # nothing about the payload the deploy is decided from.
    refused = forge.send(gitea_headers(body, **form), body)
    assert (refused.status, refused.body["status"]) == (401, "unauthorized")
    # A form with the payload twice signs nothing.
    doubled = body + b"&" + body
    assert forge.send(gitea_headers(payload, **form), doubled).status == 401


def test_github_form_signature_is_over_the_raw_body(forge: Forge) -> None:
    # GitHub signs the body as sent, form-encoded or not; a signature over the JSON fails.
    payload = json.dumps(GITHUB_PUSH).encode()
    body = urlencode({"payload": payload}).encode()
    headers = github_headers(payload, **{"Content-Type": "application/x-www-form-urlencoded"})
    assert forge.send(headers, body).status == 401


def test_github_tag_push_matches_the_plugin_tracking_the_tag(forge: Forge) -> None:
    body = dumps({**GITHUB_PUSH, "ref": "refs/tags/v1.0.0", "created": True, "before": ZERO})
    answer = forge.send(github_headers(body), body)
    assert answer.status == 202 and answer.body["queued"] == ["hello_v1"]


def test_github_non_push_event_is_ignored(forge: Forge) -> None:
    body = dumps({"action": "opened", "issue": {"number": 1}, "repository": GITHUB_REPO})
    answer = forge.send(github_headers(body, event="issues"), body)
    assert (answer.status, answer.body["status"]) == (200, "ignored")
    assert "'issues' is not a push" in answer.body["message"] and forge.queued == []


def test_github_branch_deletion_deploys_nothing(forge: Forge) -> None:
    body = dumps({**GITHUB_PUSH, "after": ZERO, "deleted": True, "commits": [],
                  "head_commit": None})
    answer = forge.send(github_headers(body), body)
    assert (answer.status, answer.body["status"]) == (200, "unmatched")
    assert "which this push deleted" in answer.body["message"] and forge.queued == []


def test_gitea_push_with_all_its_headers(forge: Forge) -> None:
    body = dumps(GITEA_PUSH)
    answer = forge.send(gitea_headers(body), body)
    assert answer.status == 202 and answer.body["queued"] == ["shop"]
    assert answer.body["forge"] == "gitea"
    assert forge.queued[0][1].delivery_id == "c5d5a5a4-6b1b-4c1d-9f55-2f3b4a5e6d7c"


@pytest.mark.parametrize("header", ["X-Gitea-Signature", "X-Forgejo-Signature"])
def test_gitea_and_forgejo_bare_hex_signatures(forge: Forge, header: str) -> None:
    body = dumps(GITEA_PUSH)
    event = "X-Forgejo-Event" if "Forgejo" in header else "X-Gitea-Event"
    delivery = event.replace("Event", "Delivery")
    headers = {"Content-Type": "application/json", event: "push", delivery: "d-1",
               header: bare(body)}
    answer = forge.send(headers, body)
    assert answer.status == 202 and answer.body["forge"] == "gitea"
    assert forge.queued[0][1].delivery_id == "d-1"
    wrong = forge.send({**headers, header: bare(body, "other secret")}, body)
    assert wrong.status == 401 and f"{header} does not match" in wrong.body["message"]


def test_gitlab_push_and_tag_push(forge: Forge) -> None:
    body = dumps(GITLAB_PUSH)
    answer = forge.send(gitlab_headers(), body)
    assert answer.status == 202 and answer.body["queued"] == ["api"]
    event = forge.queued[0][1]
    assert event.forge == "gitlab" and event.event == "Push Hook"
    assert event.delivery_id == "f5e5f430-f57b-4e6e-9fac-d9128cd7232f"  # Idempotency-Key first
    assert "https://gitlab.example.com/team/api.git" in event.repo_urls

    tag_body = dumps(GITLAB_TAG_PUSH)
    headers = gitlab_headers("Tag Push Hook", **{"Idempotency-Key": "2nd"})
    answer = forge.send(headers, tag_body)
    assert answer.status == 202 and answer.body["queued"] == ["api_release"]
    assert forge.queued[1][1].ref == "refs/tags/v2.1.0"


def test_gitlab_without_idempotency_key_uses_event_uuid(forge: Forge) -> None:
    headers = gitlab_headers()
    del headers["Idempotency-Key"]
    event = parse_push(headers, dumps(GITLAB_PUSH), "gitlab")
    assert event.delivery_id == "13792a34-cac6-4fda-95a8-c58e00a3954e"


def test_gitlab_token_wrong_or_missing(forge: Forge) -> None:
    body = dumps(GITLAB_PUSH)
    wrong = forge.send(gitlab_headers(token="guess"), body)
    assert wrong.status == 401 and "X-Gitlab-Token does not match" in wrong.body["message"]
    headers = gitlab_headers()
    del headers["X-Gitlab-Token"]
    missing = forge.send(headers, body)
    assert missing.status == 401 and "missing X-Gitlab-Token" in missing.body["message"]
    assert forge.queued == [] and forge.seen == set()


def test_bitbucket_push(forge: Forge) -> None:
    body = dumps(BITBUCKET_PUSH)
    answer = forge.send(bitbucket_headers(body), body)
    assert answer.status == 202 and answer.body["queued"] == ["site"]
    event = forge.queued[0][1]
    assert event.forge == "bitbucket" and event.repo_urls == ("https://bitbucket.org/team/site",)
    assert (event.ref, event.after) == ("refs/heads/main", SHA1)
    assert event.delivery_id == "a3b3f8d2-0c4e-4b7a-9a59-77d1c5a0e2f1"


def test_bitbucket_push_of_several_refs_and_a_deletion(forge: Forge) -> None:
    payload = {**BITBUCKET_PUSH, "push": {"changes": [
        bitbucket_change("branch", "old-feature", None),
        bitbucket_change("tag", "v9", SHA1),
        bitbucket_change("branch", "main", SHA1)]}}
    event = parse_push(bitbucket_headers(b""), dumps(payload), "bitbucket")
    assert event.refs == ("refs/tags/v9", "refs/heads/main")
    assert event.deleted_refs == ("refs/heads/old-feature",)
    assert event.after == SHA1
    body = dumps(payload)
    assert forge.send(bitbucket_headers(body), body).body["queued"] == ["site"]


def test_bitbucket_deleting_the_tracked_branch_deploys_nothing(forge: Forge) -> None:
    body = dumps({**BITBUCKET_PUSH, "push": {"changes": [bitbucket_change("branch", "main",
                                                                          None)]}})
    answer = forge.send(bitbucket_headers(body), body)
    assert answer.status == 200 and "deleted" in answer.body["message"]


def test_bitbucket_server_refs_changed(forge: Forge) -> None:
    payload = {"eventKey": "repo:refs_changed", "date": "2024-06-10T12:00:00+0000",
               "actor": {"name": "dev", "id": 2},
               "repository": {"slug": "site", "name": "site", "project": {"key": "TEAM"},
                              "links": {"clone": [
                                  {"href": "ssh://git@bitbucket.org:7999/team/site.git",
                                   "name": "ssh"},
                                  {"href": "https://bitbucket.org/scm/team/site.git",
                                   "name": "http"}]}},
               "changes": [{"ref": {"id": "refs/heads/main", "displayId": "main",
                                    "type": "BRANCH"}, "refId": "refs/heads/main",
                            "fromHash": SHA0, "toHash": SHA1, "type": "UPDATE"}]}
    headers = {"X-Event-Key": "repo:refs_changed", "X-Request-Id": "bbs-1"}
    event = parse_push(headers, dumps(payload), "bitbucket")
    assert event.refs == ("refs/heads/main",) and event.after == SHA1
    assert event.delivery_id == "bbs-1" and len(event.repo_urls) == 2
    assert parse_push({"X-Event-Key": "diagnostics:ping"}, b"{}", "bitbucket").is_ping


#: Bitbucket Server's documented repo:refs_changed shape (Server 5.x): the repository has
#: its slug, project and id, but no ``links``; older servers send it like that.
BITBUCKET_SERVER_BARE = {
    "eventKey": "repo:refs_changed", "date": "2024-06-10T12:00:00+1000",
    "actor": {"name": "admin", "emailAddress": "admin@example.com", "id": 1,
              "displayName": "Administrator", "active": True, "slug": "admin", "type": "NORMAL"},
    "repository": {"slug": "site", "id": 84, "name": "site", "scmId": "git",
                   "state": "AVAILABLE", "statusMessage": "Available", "forkable": True,
                   "project": {"key": "TEAM", "id": 84, "name": "Team", "public": True,
                               "type": "NORMAL"},
                   "public": False},
    "changes": [{"ref": {"id": "refs/heads/main", "displayId": "main", "type": "BRANCH"},
                 "refId": "refs/heads/main", "fromHash": SHA0, "toHash": SHA1,
                 "type": "UPDATE"}],
}


def bitbucket_server_headers(body: bytes) -> dict[str, str]:
    delivery = hashlib.sha256(body).hexdigest()[:32]  # one id per delivery, as the server does
    return {"Content-Type": "application/json; charset=utf-8", "X-Event-Key": "repo:refs_changed",
            "X-Request-Id": delivery, "X-Hub-Signature": hub(body)}


def test_bitbucket_server_without_links_matches_on_the_ref_where_the_plugin_is_named(
        forge: Forge) -> None:
    body = dumps(BITBUCKET_SERVER_BARE)
    answer = forge.send(bitbucket_server_headers(body), body, plugin="site")
    assert (answer.status, answer.body["queued"]) == (202, ["site"]), answer.body
    # Another ref than the plugin's: nothing to do, and it says why.
    other = dumps({**BITBUCKET_SERVER_BARE, "changes": [
        {**BITBUCKET_SERVER_BARE["changes"][0], "ref": {"id": "refs/heads/dev"},
         "refId": "refs/heads/dev"}]})
    answer = forge.send(bitbucket_server_headers(other), other, plugin="site")
    assert (answer.status, answer.body["status"]) == (200, "unmatched")
    assert "tracks 'refs/heads/main', not refs/heads/dev" in answer.body["message"]
    # Without a plugin in the URL, nothing says which plugins it is for: 400, and how to fix it.
    answer = forge.send(bitbucket_server_headers(body), body)
    assert (answer.status, answer.body["status"]) == (400, "bad_request")
    assert "/webhook/<plugin>" in answer.body["message"] and forge.names == ["site"]


def test_bitbucket_server_naming_another_repository_is_not_matched_on_the_ref(
        forge: Forge) -> None:
    # Where the delivery names its clone URLs, /webhook/<plugin> still checks them.
    payload = {**BITBUCKET_SERVER_BARE, "repository": {
        **BITBUCKET_SERVER_BARE["repository"],
        "links": {"clone": [{"href": "https://bitbucket.example.com/scm/team/other.git",
                             "name": "http"}]}}}
    body = dumps(payload)
    answer = forge.send(bitbucket_server_headers(body), body, plugin="site")
    assert (answer.status, answer.body["status"]) == (200, "unmatched"), answer.body
    assert "plugin 'site' tracks repository bitbucket.org/team/site" in answer.body["message"]
    assert forge.queued == []


def test_generic_push_to_a_local_repository(forge: Forge, tmp_path: Path) -> None:
    body = dumps(generic_push(str(tmp_path / "repos" / "local.git")))
    answer = forge.send(generic_headers(body), body)
    assert answer.status == 202 and answer.body["queued"] == ["local"]
    assert answer.body["forge"] == "generic"
    # file:// and a trailing slash name the same repository.
    body = dumps(generic_push(f"file://{tmp_path}/repos/local.git/"))
    assert forge.send(generic_headers(body, delivery="post-receive-2"), body).status == 202
    assert forge.names == ["local", "local"]


def test_generic_ping_and_plain_string_repository(forge: Forge) -> None:
    assert forge.send(generic_headers(b"", **{"X-Gitplug-Event": "ping"}), b"").body == {
        "status": "pong", "forge": "generic", "event": "ping", "delivery": "post-receive-1",
        "message": "gitplug received the generic ping; push events will deploy matching plugins"}
    body = dumps({"repository": "https://gitlab.example.com/team/api", "ref": "refs/heads/main"})
    assert forge.send(generic_headers(body), body).body["queued"] == ["api"]


def test_flask_request_headers_work_as_given(forge: Forge) -> None:
    # The lead's view passes request.headers (case-insensitive EnvironHeaders) and raw bytes.
    app = Flask(__name__)

    @app.post("/_gitplug/webhook")
    def webhook() -> Any:
        answer = forge.send(request.headers, request.get_data())
        return jsonify(answer.body), answer.status

    body = dumps(GITHUB_PUSH)
    response = app.test_client().post("/_gitplug/webhook", data=body,
                                      headers=Headers(github_headers(body)))
    assert response.status_code == 202 and response.get_json()["queued"] == ["hello"]


# --------------------------------------------------------------------------- signatures


@pytest.mark.parametrize(("headers", "forge_name"), [
    (lambda b: {"X-GitHub-Event": "push", "X-Hub-Signature-256": hub(b)}, "github"),
    (lambda b: {"X-Gitea-Event": "push", "X-Hub-Signature-256": hub(b)}, "gitea"),
    (lambda b: {"X-Gitea-Event": "push", "X-Gitea-Signature": bare(b)}, "gitea"),
    (lambda b: {"X-Forgejo-Event": "push", "X-Forgejo-Signature": bare(b).upper()}, "gitea"),
    (lambda b: {"X-Event-Key": "repo:push", "X-Hub-Signature": hub(b)}, "bitbucket"),
    (lambda b: {"X-Gitlab-Event": "Push Hook", "X-Gitlab-Token": SECRET}, "gitlab"),
    (lambda b: {"X-Gitplug-Signature": hub(b)}, "generic"),
    (lambda b: {"x-gitplug-signature": "SHA256=" + bare(b)}, "generic"),
])
def test_valid_signatures(headers: Any, forge_name: str) -> None:
    body = b'{"ref": "refs/heads/main"}'
    assert verify_signature(headers(body), body, SECRET) == forge_name


@pytest.mark.parametrize(("headers", "message"), [
    ({"X-GitHub-Event": "push", "X-Hub-Signature-256": hub(b"other")},
     "X-Hub-Signature-256 does not match"),
    ({"X-GitHub-Event": "push", "X-Hub-Signature-256": hub(b"{}", "wrong")},
     "X-Hub-Signature-256 does not match"),
    ({"X-GitHub-Event": "push", "X-Hub-Signature-256": bare(b"{}")}, "must be 'sha256=<hex"),
    ({"X-GitHub-Event": "push", "X-Hub-Signature-256": "sha256=zz\u00e9"}, "does not match"),
    ({"X-Gitea-Event": "push", "X-Gitea-Signature": ""}, "X-Gitea-Signature does not match"),
    ({"X-Event-Key": "repo:push", "X-Hub-Signature": hub(b"{}", "wrong")},
     "X-Hub-Signature does not match"),
    ({"X-Gitplug-Signature": "md5=abc"}, "X-Gitplug-Signature must be 'sha256="),
    ({"X-Gitlab-Event": "Push Hook", "X-Gitlab-Token": SECRET + " "}, "X-Gitlab-Token does not"),
    ({"X-Gitlab-Event": "Push Hook", "X-Gitlab-Token": "s\u00e9cret"}, "X-Gitlab-Token does not"),
    ({"X-GitHub-Event": "push"}, "missing signature: expected X-Hub-Signature-256"),
    ({}, "missing signature"),
    ({"X-Gitlab-Event": "Push Hook"}, "missing X-Gitlab-Token"),
])
def test_wrong_and_missing_signatures(headers: dict[str, str], message: str) -> None:
    with pytest.raises(WebhookRejected, match=message) as caught:
        verify_signature(headers, b"{}", SECRET)
    assert caught.value.status == 401 and isinstance(caught.value, GitplugError)


def test_sha1_signature_is_refused_with_advice(forge: Forge) -> None:
    body = dumps(GITHUB_PUSH)
    headers = {"X-GitHub-Event": "push", "X-Hub-Signature": hub(body, algo="sha1")}
    with pytest.raises(WebhookRejected, match="SHA-1 .* configure the webhook to sign with "
                                              "SHA-256"):
        verify_signature(headers, body, SECRET)
    answer = forge.send(headers, body)
    assert answer.status == 401 and "SHA-256" in answer.body["message"]
    # With a sha256 signature beside it (as GitHub and Gitea send), the sha1 one is unused.
    assert verify_signature({**headers, "X-Hub-Signature-256": hub(body)}, body, SECRET)


def test_signature_is_checked_before_anything_else(forge: Forge) -> None:
    body = dumps(GITHUB_PUSH)
    headers = github_headers(body, **{"X-Hub-Signature-256": hub(body, "wrong")})
    for plugin in (None, "hello", "no-such-plugin"):
        answer = forge.send(headers, body, plugin=plugin)
        assert (answer.status, answer.body["status"]) == (401, "unauthorized")
    garbage = b"not json"
    assert forge.send(github_headers(body), garbage).status == 401  # signed another body
    assert forge.queued == [] and forge.seen == set()


@pytest.mark.parametrize("secret", [None, ""])
def test_without_a_secret_everything_is_refused(forge: Forge, secret: str | None) -> None:
    body = dumps(GITHUB_PUSH)
    answer = forge.send(github_headers(body), body, secret=secret)
    assert answer.status == 403 and answer.body["status"] == "refused"
    assert "webhook: {secret: ${GITPLUG_WEBHOOK_SECRET}}" in answer.body["message"]
    assert forge.send({}, b"", secret=secret, plugin="nope").status == 403
    assert forge.queued == [] and forge.seen == set()
    with pytest.raises(WebhookRejected, match="no secret is configured"):
        verify_signature(github_headers(body), body, "")


# --------------------------------------------------------------------------- bad requests


def test_oversize_body_is_413(forge: Forge) -> None:
    big = dumps({**GITHUB_PUSH, "padding": "x" * MAX_BODY})
    answer = forge.send(github_headers(big), big)
    assert answer.status == 413 and answer.body["status"] == "too_large"
    assert str(MAX_BODY) in answer.body["message"]
    # Content-Length alone decides, before any byte is hashed...
    small = dumps(GITHUB_PUSH)
    declared = github_headers(small, **{"Content-Length": str(MAX_BODY + 1)})
    assert forge.send(declared, small).status == 413
    # ...and a body longer than it claims is measured too.
    lying = github_headers(big, **{"Content-Length": "10"})
    assert forge.send(lying, big).status == 413
    assert forge.send(github_headers(small), small, max_body=len(small)).status == 202
    assert forge.send(github_headers(small), small, max_body=len(small) - 1).status == 413


def test_bad_content_length_is_400(forge: Forge) -> None:
    body = dumps(GITHUB_PUSH)
    answer = forge.send(github_headers(body, **{"Content-Length": "-5"}), body)
    assert answer.status == 400 and "Content-Length '-5' is not a number" in answer.body["message"]


@pytest.mark.parametrize(("body", "message"), [
    (b'{"ref": "refs/heads/main", ', "the body is not valid JSON: .* line 1 column 28"),
    (b"[1, 2]", "must be a JSON object, got list"),
    (b"\xff\xfe{}", "not UTF-8"),
    pytest.param(b"[" * 100_000 + b"]" * 100_000, "not valid JSON", id="nested-too-deep"),
    (dumps({**GITHUB_PUSH, "ref": None}), "'ref' must be a full ref .* got nothing"),
    (dumps({**GITHUB_PUSH, "ref": "main"}), "'ref' must be a full ref .* got 'main'"),
    (dumps({k: v for k, v in GITHUB_PUSH.items() if k != "repository"}),
     "names no repository URL .*repository.clone_url"),
    (dumps({**GITHUB_PUSH, "repository": {"id": 1, "clone_url": ""}}), "no repository URL"),
])
def test_malformed_github_body_is_400(forge: Forge, body: bytes, message: str) -> None:
    with pytest.raises(WebhookRejected, match=message):
        parse_push(github_headers(body), body, "github")
    answer = forge.send(github_headers(body), body)
    assert (answer.status, answer.body["status"]) == (400, "bad_request")
    assert forge.queued == [] and forge.seen == set()


@pytest.mark.parametrize(("forge_name", "headers", "body", "message"), [
    ("github", {}, dumps(GITHUB_PUSH), "missing the X-Github-Event header"),
    ("gitlab", {}, dumps(GITLAB_PUSH), "missing the X-Gitlab-Event header"),
    ("bitbucket", {}, dumps(BITBUCKET_PUSH), "missing the X-Event-Key header"),
    ("bitbucket", {"X-Event-Key": "repo:push"}, dumps({**BITBUCKET_PUSH, "push": {}}),
     "no list 'push.changes'"),
    ("bitbucket", {"X-Event-Key": "repo:push"}, dumps({**BITBUCKET_PUSH, "push": {"changes": [
        {"new": {"type": "bookmark", "name": "x"}}]}}), "names no branch or tag"),
    ("bitbucket", {"X-Event-Key": "repo:push"}, dumps({**BITBUCKET_PUSH, "repository": {}}),
     "repository.links.html.href"),
    ("generic", {}, dumps({"ref": "refs/heads/main"}), "names no repository URL .*repository.url"),
    ("generic", {"Content-Type": "application/x-www-form-urlencoded"}, b"ref=main",
     "no 'payload' field"),
    ("sourcehut", {}, b"{}", "unknown forge 'sourcehut'"),
])
def test_malformed_payloads_name_what_is_missing(forge_name: str, headers: dict[str, str],
                                                 body: bytes, message: str) -> None:
    with pytest.raises(WebhookRejected, match=message) as caught:
        parse_push(headers, body, forge_name)
    assert caught.value.status == 400


def test_unknown_plugin_is_404(forge: Forge) -> None:
    body = dumps(GITHUB_PUSH)
    answer = forge.send(github_headers(body), body, plugin="goodbye")
    assert (answer.status, answer.body["status"]) == (404, "unknown_plugin")
    assert "no plugin named 'goodbye'" in answer.body["message"]
    assert "hello" not in answer.body["message"]  # configured names are not listed
    with pytest.raises(UnknownPlugin, match="goodbye"):
        plugins_for_push(parse_push(github_headers(body), body, "github"),
                         forge.cfg.plugins, only="goodbye")


# --------------------------------------------------------------------------- deliveries, pins


def test_repeated_delivery_is_answered_but_queues_nothing(forge: Forge) -> None:
    body = dumps(GITHUB_PUSH)
    first = forge.send(github_headers(body), body)
    again = forge.send(github_headers(body), body)
    assert first.status == 202
    assert (again.status, again.body["status"]) == (200, "duplicate")
    assert "72d3162e-cc78-11e3-81ab-4c9367dc0958" in again.body["message"]
    assert forge.names == ["hello"]
    other = github_headers(body, **{"X-GitHub-Delivery": "a-new-delivery"})
    assert forge.send(other, body).status == 202 and forge.names == ["hello", "hello"]


def test_push_without_delivery_id_is_not_deduplicated(forge: Forge) -> None:
    body = dumps(generic_push("https://gitlab.example.com/team/api", "refs/heads/main"))
    headers = {"X-Gitplug-Signature": hub(body)}
    assert forge.send(headers, body).status == forge.send(headers, body).status == 202
    assert forge.names == ["api", "api"] and forge.seen == set()


def test_pinned_plugins_are_listed_not_queued(cfg: GitplugConfig) -> None:
    pinned_forge = Forge(cfg, pinned=("site",))
    body = dumps(BITBUCKET_PUSH)
    answer = pinned_forge.send(bitbucket_headers(body), body)
    assert (answer.status, answer.body["status"]) == (200, "pinned")
    assert answer.body["queued"] == [] and pinned_forge.queued == []
    assert "gitplug resume site" in answer.body["pinned"]["site"]
    # Pins are per plugin: another plugin of a push still deploys.
    both = config_from_mapping({"plugins": {
        "a": {"repo": "https://bitbucket.org/team/site"},
        "b": {"repo": "https://bitbucket.org/team/site.git"}}}, base_dir="/", environ={})
    mixed = Forge(both, pinned=("a",))
    answer = mixed.send(bitbucket_headers(body), body)
    assert answer.status == 202 and answer.body["queued"] == ["b"]
    assert list(answer.body["pinned"]) == ["a"] and mixed.names == ["b"]


def test_named_plugin_must_match_repo_and_ref(forge: Forge) -> None:
    body = dumps(GITHUB_PUSH)
    answer = forge.send(github_headers(body), body, plugin="hello")
    assert answer.status == 202 and answer.body["queued"] == ["hello"]
    other_repo = forge.send(github_headers(body, **{"X-GitHub-Delivery": "2"}), body,
                            plugin="shop")
    assert (other_repo.status, other_repo.body["status"]) == (200, "unmatched")
    assert ("plugin 'shop' tracks repository git.example.com:2222/team/shop, not the one "
            "pushed") in other_repo.body["message"]
    other_ref = forge.send(github_headers(body, **{"X-GitHub-Delivery": "3"}), body,
                           plugin="hello_v1")
    assert other_ref.status == 200
    assert "plugin 'hello_v1' tracks 'v1.0.0', not refs/heads/main" in other_ref.body["message"]
    assert forge.names == ["hello"]


def test_push_no_plugin_tracks_says_why(forge: Forge) -> None:
    body = dumps({**GITHUB_PUSH, "ref": "refs/heads/dev"})
    answer = forge.send(github_headers(body), body)
    assert (answer.status, answer.body["status"], answer.body["queued"]) == (
        200, "unmatched", [])
    assert "plugin 'hello' tracks 'main', not refs/heads/dev" in answer.body["message"]
    assert "plugin 'hello_frozen' tracks commit 6113728f27ae" in answer.body["message"]
    elsewhere = dumps({**GITHUB_PUSH, "repository": {**GITHUB_REPO, "clone_url":
                                                     "https://github.com/team/other.git",
                                                     "html_url": None, "ssh_url": None,
                                                     "git_url": None, "url": None,
                                                     "svn_url": None}})
    answer = forge.send(github_headers(elsewhere, **{"X-GitHub-Delivery": "9"}), elsewhere)
    assert answer.status == 200
    assert "no plugin's repo: matches the repository pushed (github.com/team/other)" in (
        answer.body["message"])


def test_queue_failure_is_503_not_an_exception(cfg: GitplugConfig) -> None:
    def failing_queue(name: str, event: PushEvent) -> None:
        raise StateError("cannot write /data/state.db: disk full")

    body = dumps(GITHUB_PUSH)
    answer = handle_webhook(headers=github_headers(body), body=body, secret=SECRET,
                            plugins=cfg.plugins, plugin=None, remember_delivery=lambda d: True,
                            queue_deploy=failing_queue)
    assert (answer.status, answer.body["status"]) == (503, "error")
    assert "disk full" in answer.body["message"]


def test_handler_is_fast_on_a_large_push(forge: Forge) -> None:
    commits = [dict(GITHUB_PUSH["commits"][0], id=f"{i:040x}") for i in range(1500)]
    body = dumps({**GITHUB_PUSH, "commits": commits})
    assert 500_000 < len(body) < MAX_BODY
    started = time.perf_counter()
    assert forge.send(github_headers(body), body).status == 202
    assert time.perf_counter() - started < 0.5


# --------------------------------------------------------------------------- tables


@pytest.mark.parametrize(("url", "normal"), [
    ("https://Git.Example.com/team/hello.git/", "git.example.com/team/hello"),
    ("https://git.example.com/team/hello", "git.example.com/team/hello"),
    ("http://git.example.com:80/team/hello.git", "git.example.com/team/hello"),
    ("https://git.example.com:443/team/hello", "git.example.com/team/hello"),
    ("https://git.example.com:8443/team/hello", "git.example.com:8443/team/hello"),
    ("https://deploy:s3cret@git.example.com/team/hello.git", "git.example.com/team/hello"),
    ("git@git.example.com:team/hello.git", "git.example.com/team/hello"),
    ("GIT.example.com:team/hello", "git.example.com/team/hello"),
    ("git@git.example.com:/team/hello.git/", "git.example.com/team/hello"),
    ("ssh://git@git.example.com:22/team/hello", "git.example.com/team/hello"),
    ("ssh://git@git.example.com:2222/team/hello.git", "git.example.com:2222/team/hello"),
    ("SSH://git@git.example.com/team/hello.git", "git.example.com/team/hello"),
    ("git://git.example.com/team/hello.git", "git.example.com/team/hello"),
    ("git://git.example.com:9418/team/hello.git", "git.example.com/team/hello"),
    ("https://[2001:db8::1]:8443/team/hello.git", "[2001:db8::1]:8443/team/hello"),
    ("https://git.example.com/team/Hello.git", "git.example.com/team/Hello"),
    ("  https://git.example.com/team/hello.git\n", "git.example.com/team/hello"),
    ("https://git.example.com/team/hello%20world.git", "git.example.com/team/hello world"),
    # Malformed URLs from a payload are compared as written, never raise.
    ("https://git.example.com:99999/team/hello.git", "git.example.com:99999/team/hello"),
    ("https://user@Git.Example.com:abc/team/hello/", "git.example.com:abc/team/hello"),
    ("https://[::1/team/hello", "[::1/team/hello"),
    ("https://", ""),
])
def test_normalise_repo_url(url: str, normal: str) -> None:
    assert normalise_repo_url(url) == normal


def test_normalise_local_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = tmp_path / "repos" / "hello.git"
    real.mkdir(parents=True)
    (tmp_path / "link").symlink_to(tmp_path / "repos")
    expected = os.path.realpath(real)
    monkeypatch.chdir(tmp_path)
    for spelling in (str(real), f"{real}/", f"file://{real}", f"file://{real}/",
                     "repos/hello.git", "./repos/../repos/hello.git", str(tmp_path / "link" /
                                                                          "hello.git")):
        assert normalise_repo_url(spelling) == expected, spelling
    assert normalise_repo_url(str(tmp_path / "repos" / "hello")) != expected  # .git is kept


def event_for(*refs: str, deleted: tuple[str, ...] = (), default: str | None = None,
              url: str = "https://git.example.com/team/hello.git") -> PushEvent:
    first = (refs + deleted)[0]
    return PushEvent("generic", None, (url,), first, SHA1, False, "push", refs=refs,
                     deleted_refs=deleted, default_branch=default)


def plugin_set(ref: str, repo: str = "git@git.example.com:team/hello") -> dict[str, PluginConfig]:
    return dict(config_from_mapping({"plugins": {"p": {"repo": repo, "ref": ref}}},
                                    base_dir="/", environ={}).plugins)


@pytest.mark.parametrize(("tracked", "pushed", "matches"), [
    ("main", "refs/heads/main", True),
    ("main", "refs/tags/main", True),
    ("main", "refs/heads/dev", False),
    ("main", "refs/heads/feature/main", False),
    ("v1", "refs/tags/v1", True),
    ("v1", "refs/tags/v1.1", False),
    ("feature/login", "refs/heads/feature/login", True),
    ("heads/main", "refs/heads/main", True),
    ("tags/v1", "refs/tags/v1", True),
    ("refs/heads/x", "refs/heads/x", True),
    ("refs/heads/x", "refs/tags/x", False),
    ("refs/tags/v1", "refs/tags/v1", True),
    (SHA1, "refs/heads/main", False),
    ("a" * 64, "refs/heads/main", False),
    ("abc1234", "refs/heads/abc1234", True),  # a short hex name can be a branch
])
def test_ref_matching(tracked: str, pushed: str, matches: bool) -> None:
    names, reason = plugins_for_push(event_for(pushed), plugin_set(tracked))
    assert names == (["p"] if matches else [])
    assert (reason == "") is matches
    if tracked == SHA1:
        assert "tracks commit 59b20b8d5c6f, which no push moves" in reason


def test_ref_matching_head_follows_the_default_branch() -> None:
    plugins = plugin_set("HEAD")
    assert plugins_for_push(event_for("refs/heads/trunk", default="trunk"), plugins)[0] == ["p"]
    assert plugins_for_push(event_for("refs/heads/dev", default="trunk"), plugins)[0] == []
    assert plugins_for_push(event_for("refs/heads/dev"), plugins)[0] == ["p"]  # unknown: any
    assert plugins_for_push(event_for("refs/tags/v1"), plugins)[0] == []


def test_repo_matching_ignores_host_and_owner_case_but_not_local_path_case() -> None:
    event = event_for("refs/heads/main", url="https://GITHUB.com/Team/Hello.git")
    assert plugins_for_push(event, plugin_set("main", "git@github.com:team/hello"))[0] == ["p"]
    local = event_for("refs/heads/main", url="/srv/git/Hello.git")
    assert plugins_for_push(local, plugin_set("main", "/srv/git/hello.git"))[0] == []
    assert plugins_for_push(local, plugin_set("main", "file:///srv/git/Hello.git"))[0] == ["p"]
