"""The webhook over real HTTP: a real ``gitplug serve``, raw sockets, forge-shaped deliveries.

What a unit test of the handler cannot show: that a body over
``webhook.max_body`` is refused from its headers before it is sent, that a
chunked body is counted as it is read, that a client trickling its body is
cut off at the deadline while the server keeps serving, that a server
without a secret refuses without reading, and that a real-sized GitHub push
(thousands of paths, over a megabyte) and a Gitea form delivery deploy.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlencode

import pytest

from gitplug.web.webhook import BODY_DEADLINE_S
from gitrepo import GitRepo
from serverproc import Server, request, write_config, write_version

SECRET = "rotate-me-webhook-secret"


def sign(body: bytes, secret: str = SECRET) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def github_push(repo_url: str, *, commits: int = 1, paths: int = 1) -> bytes:
    """A push event in the shape of GitHub's documentation, ``commits`` x ``paths`` files."""
    after = "9" * 40
    return json.dumps({
        "ref": "refs/heads/main", "before": "0" * 39 + "1", "after": after,
        "repository": {"id": 1, "name": "hello", "full_name": "team/hello",
                       "clone_url": repo_url, "default_branch": "main"},
        "pusher": {"name": "dev", "email": "dev@example.com"},
        "commits": [{"id": f"{i:040x}", "message": f"change {i}", "distinct": True,
                     "added": [f"hello/static/generated/{i:02d}/file{n:05d}.txt"
                               for n in range(paths)],
                     "removed": [], "modified": []} for i in range(commits)],
        "head_commit": {"id": after, "message": "last change"},
    }).encode()


def github_headers(body: bytes, delivery: str) -> dict[str, str]:
    return {"Content-Type": "application/json", "X-GitHub-Event": "push",
            "X-GitHub-Delivery": delivery, "X-Hub-Signature-256": sign(body)}


def raw_exchange(port: int, head: str, body_parts: Iterator[bytes] | None = None,
                 *, timeout: float = 30.0) -> tuple[int, bytes, int]:
    """Send ``head`` and then ``body_parts`` on one connection, as long as the server listens.

    Returns ``(status, response, bytes of body sent)``: the response is read
    while the parts are still being sent, so an answer that comes before the
    body (refused from the headers) is seen as such.
    """
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    sent = [0]
    answered = threading.Event()

    def send_body() -> None:
        try:
            for part in body_parts or ():
                if answered.is_set():
                    return
                sock.sendall(part)
                sent[0] += len(part)
        except OSError:  # the server closed the connection: it has answered
            pass

    try:
        sock.sendall(head.encode("latin-1"))
        sender = threading.Thread(target=send_body, daemon=True)
        sender.start()
        response = b""
        while not _complete(response):
            chunk = sock.recv(65536)
            if not chunk:
                break
            response += chunk
        answered.set()
        sender.join(timeout=10)
        status = int(response.split(b" ", 2)[1]) if response.startswith(b"HTTP/") else 0
        return status, response, sent[0]
    finally:
        answered.set()
        sock.close()


def _complete(response: bytes) -> bool:
    head, sep, body = response.partition(b"\r\n\r\n")
    if not sep:
        return False
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return len(body) >= int(value)
    return False  # no length: read until the server closes


def post_head(path: str, length: int | None, headers: dict[str, str]) -> str:
    lines = [f"POST {path} HTTP/1.1", "Host: 127.0.0.1"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    lines.append(f"Content-Length: {length}" if length is not None else "Transfer-Encoding: chunked")
    return "\r\n".join(lines) + "\r\n\r\n"


@pytest.fixture
def repo(tmp_path: Path) -> GitRepo:
    repo = GitRepo(tmp_path / "hello-repo")
    write_version(repo, "hello", "v1")
    return repo


@pytest.fixture
def server(tmp_path: Path, repo: GitRepo) -> Iterator[Server]:
    """``gitplug serve`` with a secret and ``webhook.max_body: 2MiB``."""
    config = write_config(tmp_path / "deploy.yaml", {"hello": {"repo": repo.url}},
                          webhook={"secret": SECRET, "max_body": "2MiB"})
    with Server(config) as running:
        yield running


def test_a_push_of_thousands_of_paths_deploys(server: Server, repo: GitRepo) -> None:
    # 7 commits of 5,000 paths: about 1.5 MiB, which the old fixed 1 MiB limit refused.
    body = github_push(repo.url, commits=7, paths=5000)
    assert len(body) > 1 << 20
    status, text = request("POST", server.base + "/_gitplug/webhook", body=body,
                           headers=github_headers(body, "big-1"))
    assert status == 202, text
    assert json.loads(text)["queued"] == ["hello"]


def test_a_body_over_max_body_is_refused_from_its_content_length(server: Server) -> None:
    declared = (2 << 20) + 1
    body = b"x" * declared
    parts = (body[i:i + 65536] for i in range(0, declared, 65536))
    status, response, sent = raw_exchange(
        server.port, post_head("/_gitplug/webhook", declared, {"X-GitHub-Event": "push",
                                                              "X-Hub-Signature-256": sign(b"")}),
        parts)
    assert status == 413, response
    assert b"webhook.max_body" in response or b"too_large" in response
    # The same limit on /webhook/<plugin>, also with no body sent at all.
    status, response, _ = raw_exchange(
        server.port, post_head("/_gitplug/webhook/hello", 10 << 20, {"X-GitHub-Event": "push"}))
    assert status == 413, response
    assert server.get("/").startswith("200 ")


def test_a_chunked_body_is_counted_as_it_is_read(server: Server, repo: GitRepo) -> None:
    piece = b"y" * 65536
    chunks = (b"%x\r\n%s\r\n" % (len(piece), piece) for _ in range(64))  # 4 MiB, no length
    status, response, _ = raw_exchange(
        server.port, post_head("/_gitplug/webhook", None, {"X-GitHub-Event": "push",
                                                          "X-Hub-Signature-256": sign(b"")}),
        chunks)
    assert status == 413, response
    # A small chunked delivery is read whole and verified like any other.
    body = github_push(repo.url)
    one = iter([b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)])
    status, response, _ = raw_exchange(
        server.port, post_head("/_gitplug/webhook", None, github_headers(body, "chunked-1")), one)
    assert status == 202, response


def test_a_client_that_trickles_its_body_is_cut_off_at_the_deadline(
    server: Server, repo: GitRepo
) -> None:
    stop = threading.Event()

    def trickle() -> Iterator[bytes]:
        while not stop.wait(0.5):
            yield b"{"

    result: list[tuple[int, bytes, int]] = []
    started = time.monotonic()
    slow = threading.Thread(target=lambda: result.append(raw_exchange(
        server.port, post_head("/_gitplug/webhook", 100_000, {"X-GitHub-Event": "push",
                                                             "X-Hub-Signature-256": sign(b"")}),
        trickle(), timeout=BODY_DEADLINE_S * 4)), daemon=True)
    slow.start()
    try:
        # While it trickles, the server answers others, webhooks included.
        body = github_push(repo.url)
        status, text = request("POST", server.base + "/_gitplug/webhook", body=body,
                               headers=github_headers(body, "meanwhile-1"))
        assert status == 202, text
        slow.join(timeout=BODY_DEADLINE_S * 4)
        assert result, "the server never answered the trickling client"
    finally:
        stop.set()
    status, response, sent = result[0]
    assert status == 408, response
    assert b"did not arrive within" in response
    assert sent < 100_000
    assert time.monotonic() - started >= BODY_DEADLINE_S * 0.9  # it got its whole deadline


def test_a_gitea_form_delivery_deploys(server: Server, repo: GitRepo) -> None:
    payload = json.dumps({"ref": "refs/heads/main", "before": "1" * 40, "after": "2" * 40,
                          "repository": {"id": 3, "name": "hello", "full_name": "team/hello",
                                         "clone_url": repo.url, "default_branch": "main"},
                          "commits": []}).encode()
    body = urlencode({"payload": payload}).encode()
    signature = hmac.new(SECRET.encode(), payload, hashlib.sha256).hexdigest()
    headers = {"Content-Type": "application/x-www-form-urlencoded", "X-Gitea-Event": "push",
               "X-Gitea-Delivery": "gitea-form-1", "X-Gitea-Signature": signature,
               "X-GitHub-Event": "push", "X-Hub-Signature-256": "sha256=" + signature}
    status, text = request("POST", server.base + "/_gitplug/webhook", body=body, headers=headers)
    assert status == 202, text
    assert json.loads(text)["forge"] == "gitea"


def test_without_a_secret_the_webhook_refuses_from_the_headers(
    tmp_path: Path, repo: GitRepo
) -> None:
    config = write_config(tmp_path / "deploy.yaml", {"hello": {"repo": repo.url}})
    with Server(config) as server:
        # No body is ever sent: the answer can only come from the headers.
        status, response, sent = raw_exchange(
            server.port, post_head("/_gitplug/webhook", 5000, {"X-GitHub-Event": "push"}))
        assert (status, sent) == (403, 0), response
        assert b"no secret is configured" in response
