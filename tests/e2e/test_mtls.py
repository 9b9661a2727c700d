"""Token endpoint behind mutual TLS (RFC 8705 tls_client_auth), on the shipped envoy/mtls.yaml.

The IdP (a TokenServer over TLS) REQUIRES a client certificate signed by the demo CA. Envoy
runs the shipped envoy/mtls.yaml itself, localized: ports chosen by the kernel, the wasm under
test, certificates made at test time (tls_certs.py) instead of envoy/certs/, and the token
cluster pointed at the loopback IdP. The cluster keeps the shipped SNI and SAN check
(idp.example.com, which the test server certificate carries).
"""

from __future__ import annotations

import json
import ssl
import sys

import pytest

from conftest import SERVERS, check_wasm_file
from envoy import Envoy
from envoy import wait_until
from helpers import assert_failure_reply
from servers import TokenServer
from shipped import ENVOY_DIR, cluster, load_yaml, localize
from tls_certs import CLIENT_CN, make_pki

MTLS_YAML = ENVOY_DIR / "mtls.yaml"
TOKEN_CLUSTER = "idp_mtls"
PROFILE = "partner"


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_pki(tmp_path_factory.mktemp("pki"))


class MtlsTokenServer(TokenServer):
    """A TokenServer over TLS that requires a client certificate signed by the demo CA, and
    records the certificate each connection presented and every failed handshake."""

    def __init__(self, pki, *, rogue: bool = False, **kw):
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        if rogue:
            ctx.load_cert_chain(pki.rogue_server_cert, pki.rogue_server_key)
        else:
            ctx.load_cert_chain(pki.server_cert, pki.server_key)
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(cafile=pki.ca_cert)
        super().__init__(ssl_context=ctx, **kw)
        self.peer_certs: list[dict] = []
        self.handshake_errors: list[str] = []
        self._httpd.handle_error = self._on_handler_error  # a failed handshake raises in setup()

    def _track(self, conn, add: bool):
        if add and isinstance(conn, ssl.SSLSocket):
            with self._lock:
                self.peer_certs.append(conn.getpeercert() or {})
        super()._track(conn, add)

    def _on_handler_error(self, request, client_address):
        exc = sys.exc_info()[1]
        with self._lock:
            self.handshake_errors.append(f"{type(exc).__name__}: {exc}")


@pytest.fixture
def mtls_server(request, pki):
    servers = []

    def make(**kw) -> MtlsTokenServer:
        s = MtlsTokenServer(pki, **kw).start()
        servers.append(s)
        # listed with the other servers in a failing test's report
        request.node.stash.setdefault(SERVERS, {})[f"mtls_idp{len(servers)}"] = s
        return s

    yield make
    for s in servers:
        s.stop()


def start_shipped_mtls(envoy_factory, tmp_path, pki, token_server, upstream, *, name: str,
                       edit=None) -> Envoy:
    """Start envoy/mtls.yaml, localized; ``edit(bootstrap)`` may change it first. The Envoy is
    registered with the factory, so the conftest checks (critical wasm records, died by itself)
    and the failure report apply to it."""
    wasm = check_wasm_file()
    b = localize(
        load_yaml(MTLS_YAML),
        wasm=wasm,
        certs_dir=pki.dir,
        clusters={TOKEN_CLUSTER: ("127.0.0.1", token_server.port), "upstream": ("127.0.0.1", upstream.port)},
    )
    if edit is not None:
        edit(b)
    e = Envoy(json.dumps(b, indent=2), tmp_path / name, concurrency=2, log_level="info", name=name)
    e.allow_critical = False
    e.expect_running = True
    envoy_factory.envoys.append(e)
    e.start()
    e.wait_ready(30)
    return e


def tls_context(b: dict) -> dict:
    return cluster(b, TOKEN_CLUSTER)["transport_socket"]["typed_config"]




def cluster_stats(e: Envoy) -> dict:
    return {k.removeprefix(f"cluster.{TOKEN_CLUSTER}."): v for k, v in e.stats(filter=f"^cluster\\.{TOKEN_CLUSTER}\\.").items()}


def subject_cn(cert: dict) -> str | None:
    for rdn in cert.get("subject", ()):
        for k, v in rdn:
            if k == "commonName":
                return v
    return None


def test_client_certificate_gets_a_token(envoy_factory, tmp_path, pki, mtls_server, upstream):
    idp = mtls_server()
    e = start_shipped_mtls(envoy_factory, tmp_path, pki, idp, upstream, name="mtls")

    r = e.request("/v1/orders")
    assert r.status == 200, r.text
    token = idp.last_token()
    assert token == "tok-1"
    assert r.json()["headers"]["authorization"] == f"Bearer {token}"
    assert upstream.authorizations() == [f"Bearer {token}"]

    # One token request, authenticated by the certificate only: client_id in the body,
    # no secret anywhere, no Authorization header.
    assert idp.count() == 1
    req = idp.last()
    assert req.method == "POST" and req.path == "/oauth2/token"
    assert req.headers.get("host") == "idp.example.com"
    assert req.form.get("grant_type") == "client_credentials"
    assert req.form.get("client_id") == "svc-a"
    assert req.form.get("scope") == "read"
    assert "client_secret" not in req.form
    assert "authorization" not in req.headers
    # ... over a connection that presented the demo client certificate
    cns = [subject_cn(c) for c in idp.peer_certs]
    assert cns and all(cn == CLIENT_CN for cn in cns), f"client certificate CNs {cns}, expected {CLIENT_CN}"
    assert idp.handshake_errors == []

    # The cached token serves the next requests without another fetch.
    for _ in range(3):
        assert e.request("/v1/orders").json()["headers"]["authorization"] == f"Bearer {token}"
    assert idp.count() == 1


def test_without_client_certificate_the_request_fails_closed(envoy_factory, tmp_path, pki, mtls_server,
                                                             upstream):
    idp = mtls_server()

    def drop_client_cert(b):
        del tls_context(b)["common_tls_context"]["tls_certificates"]

    e = start_shipped_mtls(envoy_factory, tmp_path, pki, idp, upstream, name="mtls-nocert",
                           edit=drop_client_cert)
    r = e.request("/v1/orders")
    assert_failure_reply(r, profile=PROFILE)
    assert upstream.count() == 0  # nothing reached the upstream, with or without a token
    assert idp.count() == 0  # no token request got through the TLS layer
    # The IdP refused the handshake for want of a certificate (its handler thread records it).
    assert wait_until(lambda: idp.handshake_errors), "the IdP saw no failed handshake"
    assert any("CERTIFICATE" in err.upper() for err in idp.handshake_errors), idp.handshake_errors

    # Envoy says why. Envoy 1.40 hands a failed connection to the callout as its own local reply
    # (503, "upstream connect error or disconnect/reset before headers. reset reason: remote
    # connection failure"); the filter recognises Envoy's text and reports the endpoint as
    # unreachable (metric reason no_response), not as an IdP that answered 503. Envoy logs no TLS
    # message at info; the token cluster's stats say it was the TLS handshake.
    m = e.wait_log(r'profile "partner": token request failed: (.*)', timeout=5)
    reason = m.group(1)
    assert "token endpoint unreachable: Envoy answered 503 (upstream connect error" in reason, reason
    assert "[no_response]" in reason, reason
    stats = cluster_stats(e)
    assert stats.get("ssl.connection_error", 0) >= 1, stats
    assert stats.get("upstream_cx_connect_fail", 0) >= 1, stats
    assert stats.get("ssl.handshake", 0) == 0, stats


@pytest.mark.parametrize("case", ["rogue_ca", "san_mismatch"])
def test_idp_certificate_is_verified(envoy_factory, tmp_path, pki, mtls_server, upstream, case):
    """The shipped validation_context is effective: a server certificate from another CA, or one
    that does not name the configured host, is refused before any token request is sent."""
    idp = mtls_server(rogue=(case == "rogue_ca"))

    def edit(b):
        if case == "san_mismatch":
            tls_context(b)["common_tls_context"]["validation_context"]["match_typed_subject_alt_names"] = [
                {"san_type": "DNS", "matcher": {"exact": "other-idp.example.com"}}
            ]

    e = start_shipped_mtls(envoy_factory, tmp_path, pki, idp, upstream, name=f"mtls-{case}", edit=edit)
    r = e.request("/v1/orders")
    assert_failure_reply(r, profile=PROFILE)
    assert idp.count() == 0 and upstream.count() == 0
    e.wait_log(r'profile "partner": token request failed', timeout=5)
    # Envoy counts why it refused the server's certificate.
    stat = {"rogue_ca": "ssl.fail_verify_error", "san_mismatch": "ssl.fail_verify_san"}[case]
    stats = cluster_stats(e)
    assert stats.get(stat, 0) >= 1, stats


def test_without_validation_context_any_server_is_trusted(envoy_factory, tmp_path, pki, mtls_server, upstream):
    """Why docs/deploy.md discourages a TLS socket with no validation_context: Envoy then
    accepts ANY server certificate, here one from a CA it was never told about, and hands
    the client's identity and the token request to it."""
    impostor = mtls_server(rogue=True)

    def trust_anything(b):
        del tls_context(b)["common_tls_context"]["validation_context"]

    e = start_shipped_mtls(envoy_factory, tmp_path, pki, impostor, upstream, name="mtls-trust-any",
                           edit=trust_anything)
    r = e.request("/v1/orders")
    assert r.status == 200, r.text
    assert r.json()["headers"]["authorization"] == "Bearer tok-1"  # the impostor's token
    assert impostor.count() == 1
