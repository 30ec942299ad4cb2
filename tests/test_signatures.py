"""Signed commits (README, "Signed commits"): the ``signature`` stage, end to end.

Real keys (ssh-keygen, a GPG key in a temporary GNUPGHOME), commits and tags
signed by the ``git`` command, the whole pipeline deploying into a host app:
a commit signed by an allowed key deploys and history names its signer; an
unsigned one, one signed by another key and a forged one fail at
``signature`` while the live release keeps serving; so do commits by an
OpenPGP key that expired since it signed (gpg's EXPKEYSIG) or was revoked
(REVKEYSIG); mode ``tag`` deploys a tag signed with an allowed SSH or OpenPGP
key and refuses an unsigned, lightweight or other key's one; a rollback keeps
the verdict of the first deploy; the configuration refuses what cannot work.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest
from flask import Flask

from gitplug import GitPlug
from gitplug.config import config_from_mapping
from gitplug.errors import ConfigError
from gitplug.state import DeployResult
from serverproc import run_cli
from signing import DAY, GitWorkTree, GpgKey, SshKey, require_tools

PLUGIN = '''
from gitplug import Plugin, current_plugin

plugin = Plugin("hello", __name__)

@plugin.route("/")
def index():
    from hello.version import VERSION
    return f"{VERSION}@{current_plugin.commit[:7]}"
'''


@pytest.fixture(autouse=True)
def _tools() -> None:
    require_tools("git", "ssh-keygen")


def write_version(repo: GitWorkTree, version: str) -> None:
    repo.write("hello/__init__.py", PLUGIN)
    repo.write("hello/version.py", f'VERSION = "{version}"\n')


def make_app(
    make_gp: Callable[[Flask], GitPlug], tmp_path: Path, repo: GitWorkTree, verify: dict[str, object], **plugin: object
) -> tuple[Flask, GitPlug]:
    app = Flask("host")
    app.config["TESTING"] = True
    app.config["GITPLUG"] = {
        "data_dir": str(tmp_path / "data"),
        "verify": verify,
        "plugins": {"hello": {"repo": repo.url, "ref": "main", "test": False, **plugin}},
    }
    return app, make_gp(app)


def served(app: Flask) -> str:
    with app.test_client() as client:
        response = client.get("/hello/", buffered=True)
        return f"{response.status_code} {response.get_data(as_text=True)}"


def test_ssh_signed_commits_deploy_and_others_fail_at_signature(
    make_gp: Callable[[Flask], GitPlug], tmp_path: Path
) -> None:
    alice = SshKey.make(tmp_path / "keys" / "alice", "alice@example.com")
    mallory = SshKey.make(tmp_path / "keys" / "mallory", "mallory@example.com")
    allowed = tmp_path / "allowed_signers"
    allowed.write_text("# the release team\n" + alice.allowed_line())
    repo = GitWorkTree.init(tmp_path / "repo")
    write_version(repo, "v1")
    v1 = repo.commit("v1", sign=alice)
    app, gp = make_app(make_gp, tmp_path, repo, {"mode": "head", "allowed_signers": str(allowed)})

    record = gp.deploy("hello")
    assert record.result == DeployResult.LIVE, record
    assert served(app) == f"200 v1@{v1[:7]}"
    assert record.signer == f"alice@example.com (ssh ED25519 {alice.fingerprint})"
    assert gp.store.history("hello")[0].to_json()["signer"] == record.signer

    write_version(repo, "v2")
    unsigned = repo.commit("v2 unsigned")
    record = gp.deploy("hello")
    assert (record.result, record.stage.value) == (DeployResult.FAILED, "signature"), record
    assert f"commit {unsigned[:12]}: not signed" in record.error
    assert "git commit -S" in record.error and "live release keeps serving" in record.error
    assert record.signer is None
    assert served(app) == f"200 v1@{v1[:7]}"
    assert gp.deployer.releases.get("hello", unsigned) is None  # refused before anything was staged

    write_version(repo, "v3")
    repo.commit("v3 by mallory", sign=mallory)
    record = gp.deploy("hello")
    assert (record.result, record.stage.value) == (DeployResult.FAILED, "signature"), record
    assert f"signed with SSH key ED25519 {mallory.fingerprint}, which is not in allowed_signers" in record.error
    assert f"add it to allowed_signers ({allowed})" in record.error
    assert served(app) == f"200 v1@{v1[:7]}"

    write_version(repo, "v4")
    v4 = repo.commit("v4", sign=alice)
    forged = repo.forge(v4, "v4, with a message alice never signed")
    record = gp.deploy("hello")
    assert (record.commit, record.result, record.stage.value) == (forged, DeployResult.FAILED, "signature"), record
    assert "does not match the content (forged or altered)" in record.error
    assert served(app) == f"200 v1@{v1[:7]}"

    # Background triggers fail the same way and never retry a refused commit.
    assert forged in gp.store.failed_commits("hello")

    repo.git("update-ref", "refs/heads/main", v4)
    record = gp.deploy("hello")
    assert record.result == DeployResult.LIVE, record
    assert served(app) == f"200 v4@{v4[:7]}"

    # A rollback keeps the verdict of v1's first deploy: even with alice's key
    # gone from allowed_signers since, v1 comes back, recorded as alice's.
    allowed.write_text(mallory.allowed_line())
    record = gp.rollback("hello", v1)
    assert record.result == DeployResult.LIVE, record
    assert record.signer == f"alice@example.com (ssh ED25519 {alice.fingerprint})"
    assert served(app) == f"200 v1@{v1[:7]}"
    # A fresh deploy checks again: alice is no longer allowed.
    gp.resume("hello")
    record = gp.store.history("hello")[0]
    assert (record.result, record.stage.value) == (DeployResult.FAILED, "signature"), record
    assert alice.fingerprint in record.error


def test_gpg_signed_commits(make_gp: Callable[[Flask], GitPlug], tmp_path: Path) -> None:
    require_tools("gpg", "gpgconf")
    repo = GitWorkTree.init(tmp_path / "repo")
    with GpgKey.make(tmp_path / "gpg-rel", "Release Team <release@example.com>") as release, \
            GpgKey.make(tmp_path / "gpg-eve", "Eve <eve@example.com>") as eve:
        write_version(repo, "v1")
        v1 = repo.commit("v1", sign=release)
        app, gp = make_app(make_gp, tmp_path, repo, {"gpg_keys": [str(release.public_file)]})
        record = gp.deploy("hello")
        assert record.result == DeployResult.LIVE, record
        assert record.signer == f"Release Team <release@example.com> (gpg {release.fingerprint})"
        assert served(app) == f"200 v1@{v1[:7]}"

        write_version(repo, "v2")
        repo.commit("v2 by eve", sign=eve)
        record = gp.deploy("hello")
        assert (record.result, record.stage.value) == (DeployResult.FAILED, "signature"), record
        assert f"signed with OpenPGP key {eve.fingerprint}, which is not among verify.gpg_keys" in record.error
        assert served(app) == f"200 v1@{v1[:7]}"

        write_version(repo, "v3")
        v3 = repo.commit("v3", sign=release)
        forged = repo.forge(v3, "v3 altered")
        record = gp.deploy("hello")
        assert (record.commit, record.stage.value) == (forged, "signature"), record
        assert "does not match the content" in record.error and release.fingerprint in record.error
        assert record.signer is None

        # An SSH-signed commit with only gpg_keys configured: refused, and says why.
        alice = SshKey.make(tmp_path / "keys" / "alice", "alice@example.com")
        write_version(repo, "v4")
        repo.commit("v4 ssh", sign=alice)
        record = gp.deploy("hello")
        assert record.stage.value == "signature", record
        assert "no allowed_signers file" in record.error or alice.fingerprint in record.error
        assert served(app) == f"200 v1@{v1[:7]}"


def test_tag_mode_deploys_signed_tags_only(make_gp: Callable[[Flask], GitPlug], tmp_path: Path) -> None:
    alice = SshKey.make(tmp_path / "keys" / "alice", "alice@example.com")
    allowed = tmp_path / "allowed_signers"
    allowed.write_text(alice.allowed_line())
    repo = GitWorkTree.init(tmp_path / "repo")
    write_version(repo, "v1")
    v1 = repo.commit("v1")  # the commit itself is not signed: tag mode does not ask
    repo.tag("v1.0", sign=alice)
    write_version(repo, "v2")
    v2 = repo.commit("v2")
    repo.tag("v2.0")  # annotated, unsigned
    write_version(repo, "v3")
    repo.commit("v3")
    repo.tag("v3.0", annotated=False)
    app, gp = make_app(make_gp, tmp_path, repo, {"mode": "tag", "allowed_signers": str(allowed)}, ref="v1.0")

    record = gp.deploy("hello")
    assert record.result == DeployResult.LIVE, record
    assert record.signer == f"alice@example.com (ssh ED25519 {alice.fingerprint})"
    assert served(app) == f"200 v1@{v1[:7]}"

    record = gp.deploy("hello", ref="v2.0")
    assert (record.result, record.stage.value) == (DeployResult.FAILED, "signature"), record
    assert f"tag v2.0 of commit {v2[:12]}: not signed" in record.error and "git tag -s" in record.error
    record = gp.deploy("hello", ref="v3.0")
    assert (record.result, record.stage.value) == (DeployResult.FAILED, "signature"), record
    assert "lightweight tag carries no signature" in record.error
    # A branch in tag mode: the commit must be named by a signed tag.
    record = gp.deploy("hello", ref="main")
    assert (record.result, record.stage.value) == (DeployResult.FAILED, "signature"), record
    assert "lightweight tag carries no signature" in record.error
    write_version(repo, "v4")
    v4 = repo.commit("v4")
    record = gp.deploy("hello", ref="main")
    assert (record.result, record.stage.value) == (DeployResult.FAILED, "signature"), record
    assert f"no tag names commit {v4[:12]}" in record.error
    assert served(app) == f"200 v1@{v1[:7]}"

    repo.tag("v4.0", sign=alice)  # main's tip, now tagged and signed
    record = gp.deploy("hello", ref="main")
    assert record.result == DeployResult.LIVE, record
    assert served(app) == f"200 v4@{v4[:7]}"


def test_the_configuration_refuses_what_cannot_verify(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    secret_key = tmp_path / "secret.asc"
    secret_key.write_text("-----BEGIN PGP PRIVATE KEY BLOCK-----\nxx\n")
    bad_signers = tmp_path / "allowed_signers"
    bad_signers.write_text("alice@example.com\n")

    def problems(default: object, **plugin: object) -> str:
        with pytest.raises(ConfigError) as caught:
            config_from_mapping({"verify": default, "plugins": {"p": {"repo": str(tmp_path), **plugin}}},
                                base_dir=tmp_path)
        return str(caught.value)

    assert "verify.mode: expected head" in problems({"mode": "commit", "allowed_signers": str(bad_signers)})
    assert "allowed_signers" in problems({"mode": "head", "allowed_signers": str(bad_signers)})
    assert "no file at" in problems({"allowed_signers": "missing"})
    assert "holds a secret key" in problems({"gpg_keys": [str(secret_key)]})
    assert "give allowed_signers" in problems({"mode": "head"})
    assert "plugins.p.verify.mode" in problems(None, verify={"mode": "both"})
    # A plugin may opt out of the default; discovered ones inherit it.
    alice = SshKey.make(tmp_path / "alice", "alice@example.com")
    (tmp_path / "ok_signers").write_text(alice.allowed_line())
    config = config_from_mapping({"verify": {"allowed_signers": "ok_signers"},
                                  "plugins": {"p": {"repo": str(tmp_path)},
                                              "q": {"repo": str(tmp_path), "verify": False}}},
                                 base_dir=tmp_path)
    assert config.plugins["p"].verify is not None and config.plugins["p"].verify.mode == "head"
    assert config.plugins["q"].verify is None
    # Without the tools, the configuration (and so the server) is refused, saying what to install.
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    text = problems({"allowed_signers": "ok_signers", "gpg_keys": [str(tmp_path / "k.asc")]})
    assert "needs the `ssh-keygen` command" in text and "apt-get install openssh-client" in text
    assert "needs the `git` command" in text


def test_check_config_names_file_and_line(tmp_path: Path) -> None:
    alice = SshKey.make(tmp_path / "alice", "alice@example.com")
    (tmp_path / "allowed_signers").write_text(alice.allowed_line())
    config = tmp_path / "deploy.yaml"
    config.write_text(
        "plugins:\n"
        "  hello:\n"
        f"    repo: {tmp_path}\n"
        "    verify:\n"
        "      mode: tag\n"
        "      allowed_signers: allowed_signers\n"
    )
    proc = run_cli("check-config", "-c", config)
    assert proc.returncode == 0, proc.stderr
    assert f"signed tags only: allowed_signers {tmp_path / 'allowed_signers'}" in proc.stdout

    config.write_text(config.read_text().replace("allowed_signers: allowed_signers", "allowed_signers: nope"))
    proc = run_cli("check-config", "-c", config)
    assert proc.returncode == 2, proc.stdout
    assert proc.stderr.startswith(f"Error: {config}:6: plugins.hello.verify.allowed_signers: no file at "), proc.stderr
    assert "Traceback" not in proc.stderr


def test_serve_refuses_to_start_without_the_tools_verify_needs(tmp_path: Path) -> None:
    """gpg missing from PATH (git and ssh-keygen there): `gitplug serve` exits, saying what to install."""
    import shutil
    import subprocess
    import sys

    tools = tmp_path / "bin"
    tools.mkdir()
    for tool in ("git", "ssh-keygen"):
        (tools / tool).symlink_to(shutil.which(tool) or tool)
    key = tmp_path / "release.asc"
    key.write_text("-----BEGIN PGP PUBLIC KEY BLOCK-----\n\nxx\n-----END PGP PUBLIC KEY BLOCK-----\n")
    config = tmp_path / "deploy.yaml"
    config.write_text(f"verify:\n  gpg_keys: [{key}]\nplugins:\n  hello:\n    repo: {tmp_path}\n")
    proc = subprocess.run(
        [sys.executable, "-c", "from gitplug.cli import main; main()", "serve", "-c", str(config), "--port", "0"],
        env={"PATH": str(tools), "HOME": str(tmp_path), "LC_ALL": "C.UTF-8"}, capture_output=True, text=True,
        timeout=120, check=False,
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert (f"{config}:2: verify.gpg_keys: verifying signatures needs the `gpg` command, which is not on PATH: install "
            "it (Debian: apt-get install gnupg)") in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr


def test_gpg_commit_by_a_key_expired_since_is_refused(make_gp: Callable[[Flask], GitPlug], tmp_path: Path) -> None:
    """Signed while the key was valid, verified after it expired: gpg says EXPKEYSIG; refused.

    gpg judges the key as it is at the check, not when it signed: extending
    the key (and exporting it again into gpg_keys) makes the same commit deploy.
    """
    require_tools("gpg", "gpgconf")
    repo = GitWorkTree.init(tmp_path / "repo")
    with GpgKey.make(tmp_path / "gpg-rel", "Release Team <release@example.com>") as release, \
            GpgKey.make(tmp_path / "gpg-old", "Old Laptop <old@example.com>",
                        created=time.time() - 2 * DAY, expires=DAY) as old:
        write_version(repo, "v1")
        v1 = repo.commit("v1", sign=release)
        app, gp = make_app(make_gp, tmp_path, repo,
                           {"gpg_keys": [str(release.public_file), str(old.public_file)]})
        assert gp.deploy("hello").result == DeployResult.LIVE
        write_version(repo, "v2")
        v2 = repo.commit("v2, signed while the key was valid", sign=old)

        record = gp.deploy("hello")
        assert (record.commit, record.result, record.stage.value) == (v2, DeployResult.FAILED, "signature"), record
        assert f"commit {v2[:12]}: signed with OpenPGP key {old.fingerprint}, which is expired." in record.error
        # It is among gpg_keys already: the way out is to extend it, not to add it.
        assert f"extend it (gpg --quick-set-expire {old.fingerprint} 1y)" in record.error
        assert "add it to verify.gpg_keys" not in record.error
        assert "live release keeps serving" in record.error
        assert record.signer is None
        assert gp.deployer.releases.get("hello", v2) is None
        assert served(app) == f"200 v1@{v1[:7]}"

        old.set_expiry("never")  # the owner extends it; the operator exports it again
        record = gp.deploy("hello")
        assert (record.commit, record.result) == (v2, DeployResult.LIVE), record
        assert record.signer == f"Old Laptop <old@example.com> (gpg {old.fingerprint})"
        assert served(app) == f"200 v2@{v2[:7]}"


def test_gpg_commit_by_a_revoked_key_is_refused(make_gp: Callable[[Flask], GitPlug], tmp_path: Path) -> None:
    """A key revoked after it signed (revocation imported into gpg_keys): gpg says REVKEYSIG; refused."""
    require_tools("gpg", "gpgconf")
    repo = GitWorkTree.init(tmp_path / "repo")
    with GpgKey.make(tmp_path / "gpg-rel", "Release Team <release@example.com>") as release:
        write_version(repo, "v1")
        v1 = repo.commit("v1", sign=release)
        write_version(repo, "v2")
        v2 = repo.commit("v2", sign=release)
        repo.git("update-ref", "refs/heads/main", v1)
        app, gp = make_app(make_gp, tmp_path, repo, {"gpg_keys": [str(release.public_file)]})
        record = gp.deploy("hello")
        assert (record.commit, record.result) == (v1, DeployResult.LIVE), record

        release.revoke()  # stolen: the revocation reaches gpg_keys, then v2 is pushed
        repo.git("update-ref", "refs/heads/main", v2)
        record = gp.deploy("hello")
        assert (record.commit, record.result, record.stage.value) == (v2, DeployResult.FAILED, "signature"), record
        assert f"commit {v2[:12]}: signed with OpenPGP key {release.fingerprint}, which is revoked." in record.error
        assert "A revoked key is refused whatever it signed: sign the commit" in record.error
        assert "add it to verify.gpg_keys" not in record.error
        assert record.signer is None
        assert served(app) == f"200 v1@{v1[:7]}"


def test_tag_mode_with_gpg_signed_tags(make_gp: Callable[[Flask], GitPlug], tmp_path: Path) -> None:
    """Mode tag with OpenPGP: a tag signed by a key of gpg_keys deploys; unsigned or another key's, refused."""
    require_tools("gpg", "gpgconf")
    repo = GitWorkTree.init(tmp_path / "repo")
    with GpgKey.make(tmp_path / "gpg-rel", "Release Team <release@example.com>") as release, \
            GpgKey.make(tmp_path / "gpg-eve", "Eve <eve@example.com>") as eve:
        write_version(repo, "v1")
        v1 = repo.commit("v1")  # unsigned commits: tag mode checks the tag only
        repo.tag("v1.0", sign=release)
        write_version(repo, "v2")
        v2 = repo.commit("v2")
        repo.tag("v2.0")  # annotated, unsigned
        write_version(repo, "v3")
        v3 = repo.commit("v3")
        repo.tag("v3.0", sign=eve)
        app, gp = make_app(make_gp, tmp_path, repo, {"mode": "tag", "gpg_keys": [str(release.public_file)]},
                           ref="v1.0")

        record = gp.deploy("hello")
        assert (record.commit, record.result) == (v1, DeployResult.LIVE), record
        assert record.signer == f"Release Team <release@example.com> (gpg {release.fingerprint})"
        assert served(app) == f"200 v1@{v1[:7]}"

        record = gp.deploy("hello", ref="v2.0")
        assert (record.commit, record.result, record.stage.value) == (v2, DeployResult.FAILED, "signature"), record
        assert f"tag v2.0 of commit {v2[:12]}: not signed" in record.error and "git tag -s" in record.error
        record = gp.deploy("hello", ref="v3.0")
        assert (record.commit, record.result, record.stage.value) == (v3, DeployResult.FAILED, "signature"), record
        assert (f"tag v3.0 of commit {v3[:12]}: signed with OpenPGP key {eve.fingerprint}, which is not among "
                "verify.gpg_keys. If you trust that key, add it to verify.gpg_keys") in record.error
        assert served(app) == f"200 v1@{v1[:7]}"

        # A branch: some tag naming its tip must be signed by a key of gpg_keys; eve's is not enough.
        record = gp.deploy("hello", ref="main")
        assert (record.commit, record.stage.value) == (v3, "signature"), record
        assert eve.fingerprint in record.error
        repo.tag("v3.0-release", sign=release)
        record = gp.deploy("hello", ref="main")
        assert (record.commit, record.result) == (v3, DeployResult.LIVE), record
        assert record.signer == f"Release Team <release@example.com> (gpg {release.fingerprint})"
        assert served(app) == f"200 v3@{v3[:7]}"
