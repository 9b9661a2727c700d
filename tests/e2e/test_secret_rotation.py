"""Secrets from files, rotated without a restart (dynamic module), and what the wasm build says.

* A client secret in a Kubernetes-style mount (``secret -> ..data/secret``, ``..data -> ..vN``)
  is swapped under steady traffic: every request gets its token (none lost, Envoy not restarted),
  token requests move to the new secret within the poll period plus one refresh and never go back,
  a swap to an empty file is refused with a log line naming the field while the last good secret
  stays in use, and neither secret is in Envoy's log.
* A ``private_key_jwt`` signing key in a file is swapped the same way: assertions move from the
  old key to the new one (each verified by the token server against the public keys).
* The wasm build has no filesystem: ``{"file": ...}`` is refused at load, naming the field.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import jwt as pyjwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

import plugin_config as pc
from envoy import FILTER_LOG
from test_secrets import leaks, secret_forms

CLIENT_ID = "svc-a"
OLD_SECRET = "old-S3cret-rotation-xyzzy"
NEW_SECRET = "new-S3cret-rotation-plugh"
LIFETIME_S = 2  # a refresh every ~1.6 s, so a rotated secret is used within seconds


@pytest.fixture
def native_only(filter_host):
    if filter_host != "native":
        pytest.skip("the wasm build reads no files: test_file_secrets_are_refused_by_the_wasm_build")


def mount(directory: Path, version: str, files: dict[str, bytes]) -> None:
    """What the kubelet does: write a new version directory, swap ``..data`` to it atomically."""
    (directory / version).mkdir(parents=True)
    for name, content in files.items():
        (directory / version / name).write_bytes(content)
    tmp = directory / "..data_tmp"
    os.symlink(version, tmp)
    os.replace(tmp, directory / "..data")
    for name in files:
        link = directory / name
        if not link.is_symlink():
            os.symlink(f"..data/{name}", link)


class Traffic:
    """Requests in a loop on one thread until stopped; every status is kept."""

    def __init__(self, envoy):
        self.envoy, self.statuses, self.stopping = envoy, [], threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self):
        while not self.stopping.is_set():
            self.statuses.append(self.envoy.request("/x", timeout=10).status)
            time.sleep(0.02)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stopping.set()
        self.thread.join(15)


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return time.monotonic()
        time.sleep(0.05)
    raise AssertionError(f"not within {timeout} s: {what}")


def test_a_rotated_client_secret_is_used_without_a_restart(native_only, envoy_factory, token_server, upstream,
                                                            tmp_path):
    mounted = tmp_path / "secret-mount"
    mount(mounted, "..v1", {"client_secret": OLD_SECRET.encode() + b"\n"})
    token_server.set_expires_in(LIFETIME_S)
    config = pc.config(profiles={"default": pc.profile(
        client_id=CLIENT_ID, client_secret={"file": str(mounted / "client_secret")})})
    e = envoy_factory.start(config)

    def secrets_used():
        return [(r.basic_auth() or ("", ""))[1] for r in token_server.requests]

    with Traffic(e) as traffic:
        wait_for(lambda: secrets_used().count(OLD_SECRET) >= 2, 15, "two token requests with the old secret")
        swapped = time.monotonic()
        mount(mounted, "..v2", {"client_secret": NEW_SECRET.encode()})
        first_new = wait_for(lambda: NEW_SECRET in secrets_used(), 15, "a token request with the new secret")
        # A poll (1 s) and a refresh (~1.6 s of a 2 s token), with slack for a loaded machine.
        print(f"new secret first used {first_new - swapped:.2f} s after the swap")
        assert first_new - swapped < 3 * LIFETIME_S + 1
        wait_for(lambda: secrets_used().count(NEW_SECRET) >= 2, 15, "a second token request with the new secret")

        # An empty secret is refused; the last good one stays in use.
        mount(mounted, "..v3", {"client_secret": b""})
        e.wait_log(FILTER_LOG + r".*secret file changed but is refused.*profiles\.default\.client_secret: is empty")
        used_before = len(secrets_used())
        wait_for(lambda: len(secrets_used()) >= used_before + 2, 15, "two more token requests")
    used = secrets_used()
    print(f"token requests: {len(used)}, requests: {len(traffic.statuses)}")
    first = used.index(NEW_SECRET)
    assert set(used[:first]) == {OLD_SECRET}, used
    assert set(used[first:]) == {NEW_SECRET}, f"went back to another secret after the rotation: {used}"
    assert traffic.statuses and set(traffic.statuses) == {200}, sorted(set(traffic.statuses))
    assert e.proc is not None and e.proc.poll() is None, "Envoy restarted or died"
    e.stop()
    log_lines = e.log().splitlines()
    assert leaks(log_lines, secret_forms(OLD_SECRET, CLIENT_ID) | secret_forms(NEW_SECRET, CLIENT_ID)) == []


def rsa_key() -> tuple[bytes, bytes]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.PEM,
                                           serialization.PublicFormat.SubjectPublicKeyInfo)
    return private, public


def test_a_rotated_signing_key_signs_the_next_assertion(native_only, envoy_factory, token_server, upstream,
                                                        tmp_path):
    (old_private, old_public), (new_private, new_public) = rsa_key(), rsa_key()
    mounted = tmp_path / "key-mount"
    mount(mounted, "..v1", {"key.pem": old_private})
    token_server.set_expires_in(LIFETIME_S)
    signed_by: list[str] = []

    def handler(rec):
        assertion = rec.form.get("client_assertion", "")
        for name, public in (("old", old_public), ("new", new_public)):
            try:
                pyjwt.decode(assertion, public, algorithms=["RS256"], audience=pc.DEFAULT_TOKEN_URL)
            except pyjwt.InvalidTokenError:
                continue
            signed_by.append(name)
            return 200, {"Content-Type": "application/json"}, token_server.token_body()
        signed_by.append("none")
        return 401, {"Content-Type": "application/json"}, {"error": "invalid_client"}

    token_server.set_handler(handler)
    config = pc.config(profiles={"default": pc.profile(
        client_id=CLIENT_ID, client_secret=None, auth_method="private_key_jwt",
        jwt={"algorithm": "RS256", "private_key": {"file": str(mounted / "key.pem")}})})
    e = envoy_factory.start(config)
    with Traffic(e) as traffic:
        wait_for(lambda: signed_by.count("old") >= 2, 15, "two assertions signed with the old key")
        mount(mounted, "..v2", {"key.pem": new_private})
        wait_for(lambda: signed_by.count("new") >= 2, 15, "two assertions signed with the new key")
    print(f"assertions: {signed_by}, requests: {len(traffic.statuses)}")
    first = signed_by.index("new")
    assert set(signed_by[:first]) == {"old"} and set(signed_by[first:]) == {"new"}, signed_by
    assert traffic.statuses and set(traffic.statuses) == {200}, sorted(set(traffic.statuses))
    e.stop()
    pem_lines = [line for line in (old_private + new_private).decode().splitlines() if "-----" not in line]
    assert [line for line in e.log().splitlines() if any(p in line for p in pem_lines)] == []


@pytest.mark.wasm_only
def test_file_secrets_are_refused_by_the_wasm_build(envoy_factory, tmp_path):
    secret = tmp_path / "client_secret"
    secret.write_text(OLD_SECRET)
    config = pc.config(profiles={"default": pc.profile(client_secret={"file": str(secret)})})
    rc, out = envoy_factory.validate(config)
    assert rc != 0, out
    assert "profiles.default.client_secret" in out and "dynamic module only" in out, out
