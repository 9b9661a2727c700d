"""Security properties of oauth2-cc on real Envoy (2 workers).

* A client's own Authorization header, in any case and repeated, is overwritten on a matched
  route: the upstream sees exactly one authorization header, ours; ``inject.keep_existing``
  keeps the client's.
* ``match.authority`` (README): case-insensitive, a trailing dot on the request's host ignored, a
  pattern without a port matches any port, one with a port needs exactly it, ``*.example.com``
  does not match ``example.com``. Hosts that merely contain the pattern get no token.
* The failure reply never carries the IdP's body or a secret.
* Stats names (``/stats``, ``/stats/prometheus``) hold no secret and no token.
* With Envoy at ``info`` and its wasm component at ``trace``, no token and no client assertion
  is in Envoy's log (fetch, refresh, purge after an upstream 401, failures).

Two tests pin down bugs found here and fixed: a port with a leading ``+`` no longer counts as that
port, and an IdP's ``error`` string is logged only when it is a known code (else ``other_error``).
"""

from __future__ import annotations

import base64
import functools
import http.client
import re
import threading
import urllib.parse
from concurrent.futures import ThreadPoolExecutor


import plugin_config as pc
from envoy import filter_log
from envoy import wait_until as poll
import helpers
from helpers import failure_body

one_profile = functools.partial(helpers.one_profile, backoff={"base_ms": 100, "max_ms": 400})


def raw_request(port: int, path: str = "/", headers: list[tuple[str, str]] = (), host: str | None = None):
    """One GET with headers exactly as listed (repeats and case kept): (status, headers, body)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.putrequest("GET", path, skip_host=host is not None)
        if host is not None:
            conn.putheader("Host", host)
        for name, value in headers:
            conn.putheader(name, value)
        conn.endheaders()
        resp = conn.getresponse()
        return resp.status, resp.getheaders(), resp.read()
    finally:
        conn.close()




# --------------------------------------------------------------------------- #
# A client's own Authorization header
# --------------------------------------------------------------------------- #

CLIENT_AUTH_VARIANTS: dict[str, list[tuple[str, str]]] = {
    "lower": [("authorization", "Bearer client-lower")],
    "canonical": [("Authorization", "Bearer client-canonical")],
    "upper": [("AUTHORIZATION", "Bearer client-upper")],
    "two_headers": [("Authorization", "Bearer client-one"), ("Authorization", "Bearer client-two")],
    "two_headers_mixed_case": [("authorization", "Bearer client-a"), ("AUTHORIZATION", "Basic Y2xpZW50OnB3")],
}


def upstream_authorizations(upstream) -> list[str]:
    """The authorization header lines (any case) of the last upstream request, in order."""
    return [v for k, v in upstream.last().header_list if k.lower() == "authorization"]


def test_client_authorization_is_overwritten_in_any_case(envoy_factory, token_server, upstream):
    # "/v1/" is matched (token injected); "/public/" is not: it shows what Envoy alone forwards
    e = envoy_factory.start(one_profile(routes=[pc.match_route(path_prefix="/v1/")]))
    seen, untouched = {}, {}
    for name, headers in CLIENT_AUTH_VARIANTS.items():
        status, _, body = raw_request(e.port, f"/v1/{name}", headers)
        assert status == 200, (name, status, body)
        assert upstream.last().path == f"/v1/{name}"
        seen[name] = upstream_authorizations(upstream)
        status, _, body = raw_request(e.port, f"/public/{name}", headers)
        assert status == 200, (name, status, body)
        untouched[name] = upstream_authorizations(upstream)
    assert seen == {name: ["Bearer tok-1"] for name in CLIENT_AUTH_VARIANTS}
    # the client's header did reach Envoy (Envoy 1.40 folds repeated authorization headers into
    # one comma-joined value, as it does for every inline header)
    assert untouched == {name: [",".join(v for _, v in headers)] for name, headers in CLIENT_AUTH_VARIANTS.items()}
    assert token_server.count() == 1


def test_client_authorization_is_overwritten_on_a_paused_request(envoy_factory, token_server, upstream):
    """Cold cache: the request waits for the token and is resumed from the root context (a
    different code path from the hit path); the client's headers are still replaced."""
    release = threading.Event()

    def held(rec):  # the IdP answers only once the client request is known to be paused
        release.wait(15)
        return 200, {"Content-Type": "application/json"}, token_server.token_body()

    token_server.set_handler(held)
    e = envoy_factory.start(one_profile(timeout_ms=20000))
    headers = CLIENT_AUTH_VARIANTS["two_headers_mixed_case"]
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(raw_request, e.port, "/v1/paused", headers)
        waited = poll(lambda: e.filter_stat("default.waited") >= 1, 10)
        release.set()
        status, _, body = pending.result(15)
    assert waited, "the request did not wait"
    assert status == 200, (status, body)
    assert upstream_authorizations(upstream) == ["Bearer tok-1"]
    assert token_server.count() == 1


def test_keep_existing_keeps_client_authorization_in_any_case(envoy_factory, token_server, upstream):
    e = envoy_factory.start(one_profile(routes=[pc.match_route(path_prefix="/v1/")], inject={"keep_existing": True}))
    kept, untouched = {}, {}
    for name, headers in CLIENT_AUTH_VARIANTS.items():
        status, _, body = raw_request(e.port, f"/v1/{name}", headers)
        assert status == 200, (name, status, body)
        kept[name] = upstream_authorizations(upstream)
        status, _, body = raw_request(e.port, f"/public/{name}", headers)
        assert status == 200, (name, status, body)
        untouched[name] = upstream_authorizations(upstream)
    # exactly what Envoy forwards without the filter (repeated headers comma-joined by Envoy)
    assert kept == untouched
    assert kept == {name: [",".join(v for _, v in headers)] for name, headers in CLIENT_AUTH_VARIANTS.items()}
    # without a client header the token is injected
    status, _, _ = raw_request(e.port, "/v1/none")
    assert status == 200
    assert upstream_authorizations(upstream) == ["Bearer tok-1"]


# --------------------------------------------------------------------------- #
# match.authority: Host variants
# --------------------------------------------------------------------------- #


def authority_outcomes(e, upstream, hosts: list[str]) -> dict[str, bool]:
    """Host -> whether the upstream got our token (every request must reach the upstream)."""
    out = {}
    for host in hosts:
        before = upstream.count()
        status, _, body = raw_request(e.port, "/v1/x", host=host)
        assert status == 200, (host, status, body)
        assert upstream.count() == before + 1
        rec = upstream.last()
        assert rec.header("host") == host, (host, rec.header("host"))
        auth = [v for k, v in rec.header_list if k.lower() == "authorization"]
        assert auth in ([], ["Bearer tok-1"]), (host, auth)
        out[host] = auth == ["Bearer tok-1"]
    return out


def test_authority_pattern_without_port(envoy_factory, token_server, upstream):
    e = envoy_factory.start(one_profile(routes=[{"match": {"authority": "billing.internal"}, "profile": "default"}]))
    expected = {
        "billing.internal": True,
        "BILLING.INTERNAL": True,
        "billing.internal.": True,
        "billing.internal:8080": True,
        "billing.internal.evil.com": False,
        "evil-billing.internal": False,
        "billing.internalx": False,
        # more near misses
        "xbilling.internal": False,
        "a.billing.internal": False,
        "billing.internal..": False,
        "billing.internal.:8080": True,  # trailing dot ignored with a port too
    }
    assert authority_outcomes(e, upstream, list(expected)) == expected


def test_authority_pattern_with_port(envoy_factory, token_server, upstream):
    e = envoy_factory.start(
        one_profile(routes=[{"match": {"authority": "billing.internal:8443"}, "profile": "default"}])
    )
    expected = {
        "billing.internal": False,
        "billing.internal:9999": False,
        "billing.internal:8443": True,
        # more
        "BILLING.INTERNAL:8443": True,
        "billing.internal.:8443": True,
        "billing.internal:84430": False,
        "billing.internal:443": False,
        "evil.billing.internal:8443": False,
    }
    assert authority_outcomes(e, upstream, list(expected)) == expected


def test_authority_port_must_be_digits(envoy_factory, token_server, upstream):
    e = envoy_factory.start(
        one_profile(routes=[{"match": {"authority": "billing.internal:8443"}, "profile": "default"}])
    )
    expected = {"billing.internal:8443": True, "billing.internal:+8443": False}
    assert authority_outcomes(e, upstream, list(expected)) == expected


def test_authority_wildcard_does_not_match_apex(envoy_factory, token_server, upstream):
    e = envoy_factory.start(one_profile(routes=[{"match": {"authority": "*.example.com"}, "profile": "default"}]))
    expected = {
        "example.com": False,
        "api.example.com": True,
        "A.B.EXAMPLE.COM": True,
        "api.example.com.:8080": True,
        "evilexample.com": False,
        "api.example.com.evil.net": False,
        ".example.com": False,
    }
    assert authority_outcomes(e, upstream, list(expected)) == expected


# --------------------------------------------------------------------------- #
# The failure reply
# --------------------------------------------------------------------------- #


def test_failure_reply_never_holds_the_idp_body_or_secret(envoy_factory, token_server, upstream):
    idp_body = {"error": "invalid_client", "error_description": "secret s3cret is wrong"}
    token_server.set_response(400, idp_body, headers={"Content-Type": "application/json", "X-Idp": "s3cret"})
    e = envoy_factory.start(one_profile())  # client_secret is pc.DEFAULT_CLIENT_SECRET == "s3cret"
    assert pc.DEFAULT_CLIENT_SECRET == "s3cret"
    assert token_server.wait_for_count(1), "no token request at start-up"
    for path in ("/v1/a", "/v1/b"):
        status, headers, body = raw_request(e.port, path)
        assert status == 503, (status, body)
        assert body == failure_body(), body
        assert dict((k.lower(), v) for k, v in headers)["content-type"] == "application/json"
        everything = body.decode() + "\n".join(f"{k}: {v}" for k, v in headers)
        for leak in ("s3cret", "is wrong", "error_description", "invalid_client", "X-Idp"):
            assert leak.lower() not in everything.lower(), (leak, everything)
    assert upstream.count() == 0
    e.wait_log(filter_log("warning") + r".*token request failed: .*\[invalid_client\]")
    # the reason goes to the log, the IdP's description does not
    assert [ln for ln in e.log_lines() if "is wrong" in ln] == []


# --------------------------------------------------------------------------- #
# Stats
# --------------------------------------------------------------------------- #

STATS_SECRET = "S3cr3t-stats-Zq9vW"
STATS_TOKEN = "tokSTATSx7Kp2mQ"


def test_stats_hold_no_secret_or_token(envoy_factory, token_server, upstream):
    # "default" gets a distinctive token; "bad" fails with an IdP error that echoes both
    def handler(rec):
        if rec.path == "/bad/token":
            return 401, {"Content-Type": "application/json"}, {
                "error": f"invalid_client {STATS_SECRET} {STATS_TOKEN}",  # a hostile / buggy IdP
                "error_description": STATS_SECRET,
            }
        return 200, {"Content-Type": "application/json"}, {"access_token": STATS_TOKEN, "expires_in": 3600}

    token_server.set_handler(handler)
    config = pc.config(
        profiles={
            "default": pc.profile(client_secret=STATS_SECRET),
            "bad": pc.profile(client_secret=STATS_SECRET, token_url="http://idp.test/bad/token",
                              backoff={"base_ms": 100, "max_ms": 400}),
        },
        routes=[pc.match_route("bad", path_prefix="/bad/"), pc.match_route("default", path_prefix="/")],
    )
    e = envoy_factory.start(config)
    assert e.request("/v1/x").status == 200
    assert upstream.last().header("authorization") == f"Bearer {STATS_TOKEN}"
    assert e.request("/bad/x").status == 503
    assert poll(lambda: e.filter_stat("bad.fetch_failed.other_error") >= 1), e.stats("oauth2_cc")
    assert poll(lambda: e.filter_stat("default.injected") >= 1), e.stats("oauth2_cc")

    basic = base64.b64encode(f"svc-a:{urllib.parse.quote_plus(STATS_SECRET)}".encode()).decode()
    forms = {"secret": STATS_SECRET, "token": STATS_TOKEN, "basic": basic,
             "secret_lower": STATS_SECRET.lower(), "token_lower": STATS_TOKEN.lower()}
    bodies = {
        "/stats": e.admin_get("/stats")[1],
        "/stats/prometheus": e.prometheus(),
        "/stats?format=json": e.admin_get("/stats?format=json")[1],
    }
    for where, text in bodies.items():
        assert "oauth2_cc" in text, where
        found = [f"{where}: {name}" for name, value in forms.items() if value in text]
        assert found == [], found
    # the unknown code became other_error, not a metric named after the IdP's text
    names = [ln.split(":")[0] for ln in bodies["/stats"].splitlines() if "fetch_failed" in ln]
    assert all(re.fullmatch(re.escape(e.filter_stat_prefix) + r"\.(default|bad)\.fetch_failed\.[a-z_]+", n)
               for n in names), names


# --------------------------------------------------------------------------- #
# Logs at wasm:trace
# --------------------------------------------------------------------------- #

HMAC_SECRET = "hmac-secret-for-client-secret-jwt-0123456789abcdef"  # >= 32 bytes for HS256


def test_tokens_and_assertions_never_logged_at_wasm_trace(envoy_factory, token_server, upstream):
    issued: list[str] = []
    assertions: list[str] = []
    unsafe = "unsafeTOKx9\r\nx-evil: 1"

    def handler(rec):
        if rec.form.get("client_assertion"):
            assertions.append(rec.form["client_assertion"])
        n = len(issued) + 1
        if rec.path == "/unsafe/token":
            return 200, {"Content-Type": "application/json"}, {"access_token": unsafe, "expires_in": 60}
        tok = f"tokLOG{n:03d}q7Z" if rec.path != "/jwt/token" else f"jwtTOK{n:03d}k3Y"
        issued.append(tok)
        # refresh_in: a background refresh after 1 s (exercises the refresh path)
        return 200, {"Content-Type": "application/json"}, {"access_token": tok, "expires_in": 60, "refresh_in": 1}

    token_server.set_handler(handler)
    backoff = {"base_ms": 100, "max_ms": 400}
    config = pc.config(
        profiles={
            "default": pc.profile(backoff=backoff),
            "jwt": pc.profile(token_url="http://idp.test/jwt/token", auth_method="client_secret_jwt",
                              client_secret=HMAC_SECRET, backoff=backoff),
            "unsafe": pc.profile(token_url="http://idp.test/unsafe/token", backoff=backoff),
        },
        routes=[pc.match_route("jwt", path_prefix="/jwt/"), pc.match_route("unsafe", path_prefix="/unsafe/"),
                pc.match_route("default", path_prefix="/")],
    )
    e = envoy_factory.start(config, log_level="info", component_log_level="wasm:trace")
    assert e.request("/v1/a").status == 200
    assert e.request("/jwt/a").status == 200
    assert e.request("/unsafe/a").status == 503
    # a purge: the upstream rejects the token, the next request gets a new one
    upstream.fail_next(1, 401)
    assert e.request("/v1/b").status == 401
    assert poll(lambda: e.request("/v1/c").status == 200), f"/v1/c: {e.request('/v1/c').status}"
    # background refreshes (refresh_in 1 s)
    n = len(issued)
    assert poll(lambda: len(issued) >= n + 2, 4), issued
    assert e.request("/v1/d").status == 200
    assert e.request("/jwt/d").status == 200
    e.stop()

    assert len(issued) >= 4 and assertions, (issued, assertions)
    sent = {v.removeprefix("Bearer ") for v in upstream.authorizations() if v}
    assert sent and sent <= set(issued), (sent, issued)
    lines = e.log_lines()
    filter_lines = e.filter_lines()
    # the level really was trace/debug for the plugin, and the paths ran
    for needle in ("token request sent", "dropped it, a new one will be fetched", "[unsafe_token]"):
        level = filter_log("debug") if needle == "token request sent" else ""
        assert any(re.search(level, ln) and needle in ln for ln in filter_lines), (
            f"no filter line with {level} {needle!r} among {len(filter_lines)}:\n" + "\n".join(filter_lines[-30:])
        )
    values = {f"token {t}": t for t in issued}
    values.update({f"assertion #{i}": a for i, a in enumerate(assertions)})
    # an assertion's signature alone is identifying too
    values.update({f"assertion #{i} signature": a.rsplit(".", 1)[1] for i, a in enumerate(assertions)})
    values.update({"unsafe token head": "unsafeTOKx9", "hmac secret": HMAC_SECRET})
    in_filter_lines = [f"{name}: {ln}" for ln in filter_lines for name, v in values.items() if v in ln]
    assert in_filter_lines == []
    in_any_line = [f"{name}: {ln}" for ln in lines for name, v in values.items() if v in ln]
    assert in_any_line == []


def test_idp_error_code_echoing_the_secret_is_not_logged(envoy_factory, token_server, upstream):
    # the careless-IdP model of test_secrets.py, with the echo in `error` instead of error_description
    secret = "S3cr3tEcho-Qw7"
    token_server.set_response(401, {"error": f"invalid_client:{secret}", "error_description": "unknown client"})
    e = envoy_factory.start(one_profile(client_secret=secret))
    assert e.request("/v1/x").status == 503
    assert poll(lambda: e.filter_stat("default.fetch_failed.other_error") >= 1), e.stats("oauth2_cc")
    e.wait_log(filter_log("warning") + r".*token request failed: .*\[other_error\]")
    e.stop()
    assert [ln for ln in e.log_lines() if secret in ln] == []


# --------------------------------------------------------------------------- #
# Header values that are not UTF-8
# --------------------------------------------------------------------------- #


def test_non_utf8_header_values_do_not_kill_the_vm(envoy_factory, token_server, upstream):
    """HTTP allows obs-text (bytes 0x80-0xFF) in a header value, and Envoy forwards it. The SDK's
    ``get_map_value`` unwraps UTF-8, so a filter reading such a value through it panics its VM
    (this test failed that way, on both requests, before the host read bytes: ``critical ...
    panicked at .../proxy-wasm-0.2.5/src/hostcalls.rs``, 503). Envoy itself refuses such bytes in
    the path and in Host (400), so a header matcher and ``inject.keep_existing`` are where a
    client's bytes reach the filter. The harness fails the test on any critical wasm line."""
    config = one_profile(
        routes=[
            {"match": {"path_prefix": "/tenant/", "headers": [{"name": "x-tenant", "value": "acme"}]},
             "profile": "default"},
            {"match": {"path_prefix": "/tenant/"}, "profile": None},
            pc.match_route(path_prefix="/v1/"),
        ],
        inject={"keep_existing": True},
    )
    e = envoy_factory.start(config)
    got = {}
    # a header matcher reads a value that is not UTF-8: it does not match, the next route opts out
    status, _, body = raw_request(e.port, "/tenant/a", headers=[("x-tenant", "ac\xffme")])
    got["matcher"] = (status, upstream.last().header("authorization") if upstream.count() else None)
    # keep_existing reads the client's own header, which is not UTF-8: it is kept
    status, _, body = raw_request(e.port, "/v1/a", headers=[("Authorization", "B \xff")])
    got["keep_existing"] = (status, len(upstream_authorizations(upstream)) if upstream.count() else None)
    # and the VM still serves: a matching request gets its token
    status, _, body = raw_request(e.port, "/tenant/b", headers=[("x-tenant", "acme")])
    got["after"] = (status, upstream.last().header("authorization") if upstream.count() else None)
    assert got == {
        "matcher": (200, None),
        "keep_existing": (200, 1),
        "after": (200, "Bearer tok-1"),
    }, f"(status, what the upstream saw) per request: {got}; wasm failures: {e.wasm_failure_lines()}"
