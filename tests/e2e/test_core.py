"""Core behaviour of oauth2-cc on real Envoy (2 workers): client authentication on the wire,
token request shape, caching under load, expiry and refresh, injection, route matching and the
failure reply.

Note: the filter fetches a token for every profile as soon as it is configured (each VM's root
``on_tick`` claims the fetch lease when the cache has no usable token), so the token server sees
one request at startup even before any client request arrives.
"""

from __future__ import annotations

import base64
import threading
import time
import urllib.parse

import pytest

import plugin_config as pc
from envoy import FILTER_LOG, filter_log, request_many
from helpers import assert_failure_reply, one_profile

ODD_ID = "svc:a+b"
ODD_SECRET = "p@ss:w%rd +/&=?"


def token_requests(token_server, n: int = 1, timeout: float = 5.0):
    assert token_server.wait_for_count(n, timeout), f"token server saw {token_server.count()} < {n} requests"
    return token_server.requests


# --------------------------------------------------------------------------- #
# Client authentication (RFC 6749 section 2.3.1)
# --------------------------------------------------------------------------- #


def test_client_secret_basic_form_encodes_id_and_secret(envoy_factory, token_server, upstream):
    e = envoy_factory.start(one_profile(client_id=ODD_ID, client_secret=ODD_SECRET, auth_method="client_secret_basic"))
    r = e.request("/v1/x")
    assert r.status == 200, r.text
    rec = token_requests(token_server)[0]
    credentials = urllib.parse.quote_plus(ODD_ID) + ":" + urllib.parse.quote_plus(ODD_SECRET)
    # "svc%3Aa%2Bb:p%40ss%3Aw%25rd+%2B%2F%26%3D%3F"
    expected = "Basic " + base64.b64encode(credentials.encode()).decode()
    assert rec.header("authorization") == expected
    assert rec.basic_auth() == (ODD_ID, ODD_SECRET)
    assert rec.method == "POST" and rec.path == "/oauth2/token"
    assert rec.header("content-type") == "application/x-www-form-urlencoded"
    assert rec.form_multi == {"grant_type": ["client_credentials"]}  # no client_secret in the body
    assert upstream.count() == 1
    assert upstream.last().header("authorization") == "Bearer tok-1"
    assert token_server.count() == 1


def test_client_secret_post_sends_credentials_in_body(envoy_factory, token_server, upstream):
    e = envoy_factory.start(one_profile(client_id=ODD_ID, client_secret=ODD_SECRET, auth_method="client_secret_post"))
    r = e.request("/v1/x")
    assert r.status == 200, r.text
    rec = token_requests(token_server)[0]
    assert rec.header("authorization") is None
    assert rec.form_multi == {
        "grant_type": ["client_credentials"],
        "client_id": [ODD_ID],
        "client_secret": [ODD_SECRET],
    }
    assert upstream.last().header("authorization") == "Bearer tok-1"
    assert token_server.count() == 1


# --------------------------------------------------------------------------- #
# One fetch for many requests
# --------------------------------------------------------------------------- #


def test_cold_cache_200_parallel_requests_one_token_request(envoy_factory, token_server, upstream):
    # Slow IdP: the startup fetch is still in flight when the burst arrives, so requests on both
    # workers must pause and be resumed when the token lands (cold cache).
    token_server.set_delay(0.5)
    e = envoy_factory.start(one_profile())
    t0 = time.monotonic()
    responses = request_many(e.port, 200, "/v1/burst", workers=20)
    elapsed = time.monotonic() - t0
    statuses = [r.status for r in responses]
    assert statuses == [200] * 200, {s: statuses.count(s) for s in set(statuses)}
    assert upstream.count() == 200
    assert set(upstream.authorizations()) == {"Bearer tok-1"}
    assert token_server.count() == 1, [r.summary() for r in token_server.requests]
    # the burst did wait for the slow IdP: at least the first requests were paused, not failed
    first_upstream = min(r.time for r in upstream.requests)
    waited = first_upstream - token_server.requests[0].time
    assert waited >= 0.45, f"first upstream request {waited:.3f} s after the token request (IdP answers after 0.5 s)"
    assert elapsed < 30, f"200 requests took {elapsed:.1f} s"


# --------------------------------------------------------------------------- #
# Lifetime: refresh before expiry, never inject an expired token
# --------------------------------------------------------------------------- #


def test_short_lived_token_is_replaced_and_never_sent_expired(envoy_factory, token_server, upstream):
    lifetime = 3
    token_server.set_expires_in(lifetime)
    issued_at: dict[str, float] = {}
    lock = threading.Lock()

    def handler(rec):
        token = token_server.next_token()
        with lock:
            issued_at[token] = rec.time  # monotonic, when the token request reached the IdP
        return 200, {"Content-Type": "application/json"}, token_server.token_body(token)

    token_server.set_handler(handler)
    e = envoy_factory.start(one_profile())

    first = e.request("/v1/a")
    assert first.status == 200, first.text
    token_a = upstream.last().header("authorization")
    assert token_a and token_a.startswith("Bearer tok-"), token_a
    t0 = time.monotonic()
    # keep traffic flowing across the refresh and the first token's expiry
    statuses = []
    while time.monotonic() - t0 < 4.0:
        statuses.append(e.request("/v1/b").status)
        time.sleep(0.05)
    last = e.request("/v1/c")
    assert last.status == 200, last.text
    token_b = upstream.last().header("authorization")
    assert token_b != token_a, token_b
    assert statuses == [200] * len(statuses), statuses

    with lock:
        issued = dict(issued_at)
    late = []
    for rec in upstream.requests:
        token = rec.header("authorization").removeprefix("Bearer ")
        assert token in issued, f"upstream got a token the IdP never issued: {token!r}"
        if not issued[token] + lifetime > rec.time:
            late.append(f"{token} issued at {issued[token]:.3f}, used at {rec.time:.3f}")
    assert late == [], "tokens reached the upstream after their expiry:\n" + "\n".join(late)

    # refreshes are spaced by the refresh schedule, not a storm: 80% of the usable life, which is
    # the 3 s lifetime less the 1 s margin whole-second `exp` stamps need (1.6 s); a refresh is
    # never early, it can only be late
    times = [r.time for r in token_server.requests]
    assert len(times) >= 2, times
    gaps = [b - a for a, b in zip(times, times[1:])]
    scheduled = 0.8 * (lifetime - 1.0)
    assert all(g >= scheduled - 0.05 for g in gaps), f"gaps {gaps}, scheduled every {scheduled} s"


# --------------------------------------------------------------------------- #
# Token request shape
# --------------------------------------------------------------------------- #


def test_get_method_puts_parameters_in_query(envoy_factory, token_server, upstream):
    e = envoy_factory.start(one_profile(method="GET", scopes=["read"]))
    assert e.request("/v1/x").status == 200
    rec = token_requests(token_server)[0]
    assert rec.method == "GET"
    assert rec.path == "/oauth2/token"
    assert rec.query_multi == {"grant_type": ["client_credentials"], "scope": ["read"]}
    assert rec.body == b""
    assert rec.header("content-type") is None
    assert rec.header("content-length") in (None, "0")
    assert rec.basic_auth() == (pc.DEFAULT_CLIENT_ID, pc.DEFAULT_CLIENT_SECRET)
    assert upstream.last().header("authorization") == "Bearer tok-1"


def test_custom_token_request_headers(envoy_factory, token_server, upstream):
    e = envoy_factory.start(one_profile(token_request_headers={"X-Api-Key": "k1"}))
    assert e.request("/v1/x").status == 200
    rec = token_requests(token_server)[0]
    assert rec.header("x-api-key") == "k1"
    assert rec.header_values("x-api-key") == ["k1"]
    assert rec.header("accept") == "application/json"
    assert upstream.last().header("authorization") == "Bearer tok-1"


def test_params_override_scopes_and_add_parameters(envoy_factory, token_server, upstream):
    e = envoy_factory.start(one_profile(scopes=["a", "b"], params={"scope": "custom-scope", "tenant": "t1"}))
    assert e.request("/v1/x").status == 200
    rec = token_requests(token_server)[0]
    assert rec.form_multi["scope"] == ["custom-scope"]
    assert rec.form_multi["tenant"] == ["t1"]
    assert rec.form_multi["grant_type"] == ["client_credentials"]
    assert upstream.last().header("authorization") == "Bearer tok-1"


def test_nested_token_and_ttl_fields(envoy_factory, token_server, upstream):
    token_server.set_response(200, {"data": {"token": "nested-1", "ttl": 60}})
    e = envoy_factory.start(one_profile(token_field="data.token", expires_in_field="data.ttl"))
    r = e.request("/v1/x")
    assert r.status == 200, r.text
    assert upstream.last().header("authorization") == "Bearer nested-1"
    e.wait_log(FILTER_LOG + r".*token fetched in \d+ ms, lifetime 60 s")
    assert token_server.count() == 1


# --------------------------------------------------------------------------- #
# Injection
# --------------------------------------------------------------------------- #


def test_raw_token_without_prefix(envoy_factory, token_server, upstream):
    e = envoy_factory.start(one_profile(inject={"prefix": ""}))
    assert e.request("/v1/x").status == 200
    assert upstream.last().header("authorization") == "tok-1"


def test_custom_header_leaves_client_authorization_alone(envoy_factory, token_server, upstream):
    e = envoy_factory.start(one_profile(inject={"header": "x-upstream-token", "prefix": "Token "}))
    r = e.request("/v1/x", headers={"Authorization": "Basic Y2xpZW50OnB3"})
    assert r.status == 200, r.text
    rec = upstream.last()
    assert rec.header_values("x-upstream-token") == ["Token tok-1"]
    assert rec.header_values("authorization") == ["Basic Y2xpZW50OnB3"]


def test_client_authorization_is_overwritten_by_default(envoy_factory, token_server, upstream):
    e = envoy_factory.start(one_profile())
    r = e.request("/v1/x", headers={"Authorization": "Bearer client-supplied"})
    assert r.status == 200, r.text
    assert upstream.last().header_values("authorization") == ["Bearer tok-1"]


def test_keep_existing_keeps_client_authorization(envoy_factory, token_server, upstream):
    e = envoy_factory.start(one_profile(inject={"keep_existing": True}))
    r = e.request("/v1/x", headers={"Authorization": "Bearer client-supplied"})
    assert r.status == 200, r.text
    assert upstream.last().header_values("authorization") == ["Bearer client-supplied"]
    # The filter prefetches at startup, so the token server may have seen that one request, but
    # the kept header caused no fetch of its own.
    assert token_server.count() <= 1
    # a request without the header still gets the token
    assert e.request("/v1/y").status == 200
    assert upstream.last().header_values("authorization") == ["Bearer tok-1"]
    assert token_server.count() == 1


# --------------------------------------------------------------------------- #
# Routes
# --------------------------------------------------------------------------- #


def test_non_matching_route_passes_through_without_token(envoy_factory, token_server, upstream):
    config = pc.config(routes=[{"match": {"path_prefix": "/api/"}, "profile": "default"}])
    e = envoy_factory.start(config)
    r = e.request("/public/x")
    assert r.status == 200, r.text
    assert upstream.last().path == "/public/x"
    assert upstream.last().header("authorization") is None
    r = e.request("/api/x")
    assert r.status == 200, r.text
    assert upstream.last().header("authorization") == "Bearer tok-1"


# --------------------------------------------------------------------------- #
# Failures: the failure reply, nothing upstream, a warning naming the reason
# --------------------------------------------------------------------------- #

FAILURES = {
    "status_500": (500, {"error_text": "boom"}, r"token endpoint answered status 500 \[http_status\]"),
    "invalid_json": (200, b"{not json", r"answered 200 with a body that is not a JSON object \[bad_body\]"),
    "invalid_client": (400, {"error": "invalid_client"}, r'answered 400 with OAuth error \\?"invalid_client\\?" \[invalid_client\]'),
    "no_access_token": (200, {"token_type": "Bearer", "expires_in": 60},
                        r'no non-empty string at \\?"access_token\\?" \[missing_token\]'),
}


@pytest.mark.parametrize("case", list(FAILURES))
def test_token_failure_reply(envoy_factory, token_server, upstream, case):
    status, body, reason = FAILURES[case]
    token_server.set_response(status, body, headers={"Content-Type": "application/json"})
    e = envoy_factory.start(one_profile())
    # the startup fetch fails; a client request is failed (fast, or after its own attempt)
    r = e.request("/v1/x")
    assert_failure_reply(r)
    assert token_server.count() >= 1
    m = e.wait_log(filter_log("warning") + r"profile \\?\"default\\?\": token request failed: .*" + reason)
    assert m
    r2 = e.request("/v1/y")
    assert_failure_reply(r2)
    assert upstream.count() == 0
    assert e.critical_wasm_lines() == []


def test_on_failure_status(envoy_factory, token_server, upstream):
    token_server.set_response(500, {"error_text": "boom"})
    e = envoy_factory.start(pc.config(on_failure={"status": 502}))
    r = e.request("/v1/x")
    assert_failure_reply(r, 502)
    assert upstream.count() == 0
