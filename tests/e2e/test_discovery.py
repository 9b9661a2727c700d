"""Discovery: a profile gives `issuer`; at start-up the filter reads the OpenID Connect or
RFC 8414 metadata through the profile's cluster and uses its token_endpoint."""

from __future__ import annotations

import plugin_config as pc

ISSUER = "http://idp.test/realms/acme"


def metadata_handler(server, *, oidc: bool = True, issuer: str = ISSUER, methods=None):
    """Serves the metadata document at one location, and tokens at /realms/acme/protocol/token."""
    document = {"issuer": issuer, "token_endpoint": "http://idp.test/realms/acme/protocol/token"}
    if methods is not None:
        document["token_endpoint_auth_methods_supported"] = methods
    metadata_path = (
        "/realms/acme/.well-known/openid-configuration" if oidc
        else "/.well-known/oauth-authorization-server/realms/acme"
    )

    def handle(rec):
        if rec.method == "GET" and rec.path == metadata_path:
            return 200, {"content-type": "application/json"}, document
        if rec.method == "POST" and rec.path == "/realms/acme/protocol/token":
            return 200, {"content-type": "application/json"}, server.token_body()
        return 404, {}, b"not found"

    return handle


def discovery_config(**extra):
    profile = pc.profile(token_url=None, issuer=ISSUER, **extra)
    return {"profiles": {"default": profile}, "routes": [{"match": {}, "profile": "default"}]}


def test_oidc_discovery_finds_the_token_endpoint(envoy_factory, token_server, upstream):
    token_server.set_handler(metadata_handler(token_server, methods=["client_secret_basic", "private_key_jwt"]))
    e = envoy_factory.start(discovery_config())
    r = e.request("/x")
    assert r.status == 200
    assert r.json()["headers"]["authorization"] == "Bearer tok-1"
    paths = [(q.method, q.path) for q in token_server.requests]
    assert paths == [("GET", "/realms/acme/.well-known/openid-configuration"),
                     ("POST", "/realms/acme/protocol/token")], paths
    assert token_server.requests[1].basic_auth() == (pc.DEFAULT_CLIENT_ID, pc.DEFAULT_CLIENT_SECRET)
    e.wait_log(r"discovered token endpoint http://idp.test/realms/acme/protocol/token")


def test_rfc8414_location_is_tried_when_oidc_is_absent(envoy_factory, token_server, upstream):
    token_server.set_handler(metadata_handler(token_server, oidc=False))
    e = envoy_factory.start(discovery_config())
    assert e.request("/x").json()["headers"]["authorization"] == "Bearer tok-1"
    paths = [q.path for q in token_server.requests]
    assert paths == ["/realms/acme/.well-known/openid-configuration",
                     "/.well-known/oauth-authorization-server/realms/acme",
                     "/realms/acme/protocol/token"], paths


def test_unadvertised_auth_method_is_refused(envoy_factory, token_server, upstream):
    token_server.set_handler(metadata_handler(token_server, methods=["private_key_jwt"]))
    e = envoy_factory.start(discovery_config())
    r = e.request("/x")
    assert r.status == 503
    assert upstream.requests == []
    methods = [q.method for q in token_server.requests]
    assert set(methods) <= {"GET"}, f"a token request with an unadvertised method: {methods}"
    e.wait_log(r"does not list auth_method client_secret_basic")


def test_issuer_mismatch_is_refused(envoy_factory, token_server, upstream):
    token_server.set_handler(metadata_handler(token_server, issuer="http://evil.test/"))
    e = envoy_factory.start(discovery_config())
    assert e.request("/x").status == 503
    e.wait_log(r"names issuer \"http://evil.test/\", not the configured one")
