"""Fault matrix: one case per way the token endpoint can fail, on real Envoy (2 workers), with
each build (the wasm module and the dynamic module).

Each fault cell asserts, while the fault is on:

* the client gets the failure reply: 503, ``content-type: application/json`` and exactly
  ``{"error":"token_unavailable","profile":"default"}``;
* the upstream sees nothing;
* ``<namespace>.oauth2_cc.default.fetch_failed.<reason>`` counts the failure, and no other reason
  is counted (``wasmcustom`` or ``dynamicmodulescustom``, Envoy's namespace for each build);
* Envoy's log has a ``warning`` record of the filter (``[wasm]`` or ``[dynamic_modules]``) naming
  the reason text and label;

then the fault clears (the IdP behaves again) and a later request reaches the upstream with a
token the IdP issued after the fault (recovery). The harness fails any test whose Envoy logged a
critical wasm record or a VM failure.

Configuration faults (the six RFC 6749 section 5.2 codes the filter classes as such) also assert
the backoff: every retry waits ``backoff.max_ms / 2 .. max_ms``, so the IdP is never called again
sooner than ``max_ms / 2`` (a transient fault's first retry comes after ``base_ms / 2 .. base_ms``).

Accepted ``expires_in`` shapes (huge, float, numeric string) get a token injected and a sane
``token_remaining_s`` gauge.

Run with ``-s`` to see the exact log record of each cell (lines starting with ``FAULT-LOG``).
"""

from __future__ import annotations

import functools
import json
import re
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import pytest

from envoy import filter_log, free_port
from envoy import wait_until as poll
from helpers import assert_failure_reply
import helpers

PROFILE = "default"
FAILURE_BODY_BYTES = b'{"error":"token_unavailable","profile":"default"}'
BACKOFF = {"base_ms": 100, "max_ms": 400}
MAX_LIFETIME_S = 10 * 365 * 86_400  # token_response::MAX_LIFETIME_S


# --------------------------------------------------------------------------- #
# Helpers
# --------------------------------------------------------------------------- #


one_profile = functools.partial(helpers.one_profile, PROFILE, backoff=BACKOFF)


def failed_counters(e) -> dict[str, int]:
    """Non-zero fetch_failed.<reason> counters of the profile."""
    prefix = f"{e.filter_stat_prefix}.{PROFILE}.fetch_failed."
    stats = e.stats(filter=re.escape(prefix))
    out = {}
    for name, value in stats.items():
        if name.startswith(prefix) and isinstance(value, int) and value > 0:
            out[name.removeprefix(prefix)] = value
    return out


def warning_record(e, text: str, reason: str, timeout: float = 5.0) -> str:
    """The filter's [warning][wasm] record for a failed token request with this text and label."""
    rx = re.compile(
        filter_log("warning") + r"profile \\?\"default\\?\": "
        r"token request failed: " + text + r" \[" + re.escape(reason) + r"\]; next attempt in \d+ ms$"
    )
    line = poll(lambda: next((ln for ln in e.log_lines() if rx.search(ln)), None), timeout)
    assert line, f"no [warning][wasm] record matching {rx.pattern!r}\n" + e.log_tail(40)
    return line


def next_attempts(e, reason: str) -> list[int]:
    """The "next attempt in N ms" of every failure record with this label."""
    rx = re.compile(r"token request failed: .* \[" + re.escape(reason) + r"\]; next attempt in (\d+) ms$")
    return [int(m.group(1)) for ln in e.log_lines() if (m := rx.search(ln))]


def recover(e, token_server, upstream, timeout: float = 6.0) -> str:
    """Poll until a request gets through; the token must be one the IdP issued, after the fault."""
    issued_before = set(token_server.issued_tokens())
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = e.request("/v1/recovered")
        if last.status == 200:
            break
        assert_failure_reply(last)  # while still failing: the failure reply, nothing else
        assert upstream.count() == 0
        time.sleep(0.05)
    assert last is not None and last.status == 200, f"no recovery within {timeout}s: {last}"
    assert upstream.count() == 1
    auth = upstream.last().header_values("authorization")
    token = token_server.last_token()
    assert token and token not in issued_before, (token, issued_before)
    assert auth == [f"Bearer {token}"], auth
    assert poll(lambda: e.filter_stat(f"{PROFILE}.fetch_ok") >= 1, 3), f"fetch_ok {e.filter_stat(f'{PROFILE}.fetch_ok')} after 3 s"
    # (the harness checks this again, over the whole log, once Envoy is stopped)
    assert e.wasm_failure_lines() == []
    return token


def normal(ts) -> None:
    """The token server back to its default behaviour (valid tokens), requests kept."""
    ts.clear_response()
    ts.set_handler(None)
    ts.set_delay(0)
    ts.set_expires_in(3600)


# --------------------------------------------------------------------------- #
# The cells
# --------------------------------------------------------------------------- #


@dataclass
class Cell:
    reason: str  # the fetch_failed label
    text: str  # regex for the reason text in the warning record
    arm: Callable[[Any], None] = lambda ts: None  # put the fault on the token server
    profile: dict = field(default_factory=dict)  # extra profile fields
    config_fault: bool = False


def respond(status: int, body: Any, ctype: str = "application/json", headers: dict | None = None):
    def arm(ts):
        ts.set_response(status, body, headers={"Content-Type": ctype, **(headers or {})})
    return arm


def token(value: Any):
    return respond(200, {"access_token": value, "token_type": "Bearer", "expires_in": 3600})


def expires(value: Any):
    return lambda ts: ts.set_expires_in(value)


OAUTH_CONFIG_FAULTS = {
    "invalid_request": 400,
    "invalid_client": 401,
    "invalid_grant": 400,
    "unauthorized_client": 400,
    "unsupported_grant_type": 400,
    "invalid_scope": 400,
}

CELLS: dict[str, Cell] = {
    # IdP slower than timeout_ms: Envoy's async client times the callout out
    "timeout": Cell(
        "no_response",
        r"token endpoint unreachable: Envoy answered 504 \(upstream request timeout\)",
        lambda ts: ts.set_delay(1.0),
        profile={"timeout_ms": 300},
    ),
    # 5xx from the IdP itself, bodies that are not JSON
    "status_500": Cell("http_status", r"token endpoint answered status 500",
                       respond(500, "Internal Server Error", "text/plain")),
    "status_502": Cell("http_status", r"token endpoint answered status 502",
                       respond(502, "<html><body>Bad Gateway</body></html>", "text/html")),
    "status_503": Cell("http_status", r"token endpoint answered status 503",
                       respond(503, "Service Unavailable", "text/plain")),
    # RFC 6749 section 5.2 configuration faults
    **{
        code: Cell(
            code,
            rf"token endpoint answered {status} with OAuth error \\?\"{code}\\?\"",
            respond(status, {"error": code, "error_description": f"{code} for svc-a"}),
            config_fault=True,
        )
        for code, status in OAUTH_CONFIG_FAULTS.items()
    },
    # an error body with status 200
    "temporarily_unavailable_200": Cell(
        "temporarily_unavailable",
        r"token endpoint answered 200 with OAuth error \\?\"temporarily_unavailable\\?\"",
        respond(200, {"error": "temporarily_unavailable"}),
    ),
    # bodies that are not a JSON object
    "truncated_json": Cell("bad_body", r"token endpoint answered 200 with a body that is not a JSON object",
                           respond(200, '{"access_token": "x"')),
    "text_html": Cell("bad_body", r"token endpoint answered 200 with a body that is not a JSON object",
                      respond(200, "<html><body>Sign in</body></html>", "text/html")),
    # larger than max_response_bytes
    "too_large": Cell(
        "too_large",
        r"token response is larger than 1024 bytes",
        respond(200, json.dumps({"access_token": "tok-big", "token_type": "Bearer", "expires_in": 3600,
                                 "padding": "x" * 4000})),
        profile={"max_response_bytes": 1024},
    ),
    # expires_in that is not a positive number of seconds
    **{
        f"expires_in_{name}": Cell(
            "bad_expires_in",
            r"token response has an invalid \\?\"expires_in\\?\" \(not a positive number of seconds\)",
            expires(value),
        )
        for name, value in {"zero": 0, "negative": -5, "string_soon": "soon"}.items()
    },
    # no token
    "empty_token": Cell("missing_token", r"token response has no non-empty string at \\?\"access_token\\?\"",
                        token("")),
    # tokens that cannot go in a header value
    **{
        f"unsafe_token_{name}": Cell(
            "unsafe_token",
            r"token response holds a token with bytes not allowed in a header value, or too long",
            token(value),
        )
        for name, value in {
            "crlf_header_injection": "a\r\nx-evil: 1",
            "lf_header_injection": "a\nx-evil: 1",
            "nul": "a\u0000b",
            "space": "a b",
            "non_ascii": "t\u00f6ken",
        }.items()
    },
}


def _cell_params():
    return [pytest.param(name, id=name) for name in CELLS]


@pytest.mark.parametrize("name", _cell_params())
def test_fault_cell(envoy_factory, token_server, upstream, name):
    cell = CELLS[name]
    cell.arm(token_server)
    e = envoy_factory.start(one_profile(**cell.profile))

    # the startup fetch (and its retries) fail with the expected reason, and only that reason
    assert poll(lambda: failed_counters(e).get(cell.reason, 0) >= 1), failed_counters(e)
    r = e.request("/v1/x")
    assert_failure_reply(r)
    assert upstream.count() == 0
    line = warning_record(e, cell.text, cell.reason)
    print(f"\nFAULT-LOG {name}: {line}")
    assert set(failed_counters(e)) == {cell.reason}, failed_counters(e)
    assert e.filter_stat(f"{PROFILE}.fetch_ok") == 0
    assert e.filter_stat(f"{PROFILE}.failed_requests") >= 1

    if cell.config_fault:
        # straight to the longest backoff: every retry waits max_ms/2 .. max_ms
        assert token_server.wait_for_count(3, 5), token_server.count()
        delays = next_attempts(e, cell.reason)
        assert delays and all(BACKOFF["max_ms"] // 2 <= d <= BACKOFF["max_ms"] for d in delays), delays
        times = [rec.time for rec in token_server.requests]
        gaps = [b - a for a, b in zip(times, times[1:])]
        assert all(g >= BACKOFF["max_ms"] / 2 / 1000 for g in gaps), gaps
        # and they do come (max_ms, the filter waking for it, plus latency; generous under load)
        assert all(g < BACKOFF["max_ms"] / 1000 + 1.5 for g in gaps), gaps

    assert upstream.count() == 0
    normal(token_server)
    recover(e, token_server, upstream)
    if cell.config_fault:
        # the attempt that recovered was also scheduled max_ms/2 .. max_ms after the last failure
        times = [rec.time for rec in token_server.requests]
        assert all(b - a >= BACKOFF["max_ms"] / 2 / 1000 for a, b in zip(times, times[1:])), times
    # the upstream never saw a header smuggled in through a token
    for rec in upstream.requests:
        assert not [k for k, _ in rec.header_list if k.lower() == "x-evil"], rec.header_list
        assert not any("x-evil" in v.lower() for _, v in rec.header_list), rec.header_list


def test_transient_fault_first_retry_is_quicker_than_config_fault(envoy_factory, token_server, upstream):
    """Contrast for the backoff assertion above: a transient failure's first retry is drawn from
    base_ms/2 .. base_ms (the configuration faults' from max_ms/2 .. max_ms)."""
    token_server.set_response(500, "Internal Server Error", headers={"Content-Type": "text/plain"})
    e = envoy_factory.start(one_profile())
    assert token_server.wait_for_count(2, 5), token_server.count()
    t = [rec.time for rec in token_server.requests[:2]]
    assert t[1] - t[0] >= BACKOFF["base_ms"] / 2 / 1000, t[1] - t[0]
    first = poll(lambda: next_attempts(e, "http_status"))[0]
    assert BACKOFF["base_ms"] // 2 <= first <= BACKOFF["base_ms"] < BACKOFF["max_ms"] // 2, first
    normal(token_server)
    recover(e, token_server, upstream)


def test_idp_refuses_connections(envoy_factory, token_server, make_token_server, upstream):
    """The token cluster points at a closed loopback port: Envoy's own local reply is recognised."""
    port = free_port()  # nothing listens here (yet)
    e = envoy_factory.start(one_profile(), token_clusters={"idp": ("127.0.0.1", port)})
    assert poll(lambda: failed_counters(e).get("no_response", 0) >= 1), failed_counters(e)
    r = e.request("/v1/x")
    assert_failure_reply(r)
    assert upstream.count() == 0
    line = warning_record(
        e,
        r"token endpoint unreachable: Envoy answered 503 \(upstream connect error or disconnect/reset before "
        r"headers\. .*\)",
        "no_response",
    )
    print(f"\nFAULT-LOG refused: {line}")
    assert set(failed_counters(e)) == {"no_response"}, failed_counters(e)
    # the fault clears: an IdP starts listening on that port
    idp = make_token_server(port=port)
    recover(e, idp, upstream)
    assert token_server.count() == 0


# --------------------------------------------------------------------------- #
# Accepted expires_in shapes
# --------------------------------------------------------------------------- #

ACCEPTED = {
    # value sent -> lifetime the filter takes (seconds)
    "huge_1e12": (1e12, MAX_LIFETIME_S),
    "float_59_9": (59.9, 59),
    "numeric_string_120": ("120", 120),
}


@pytest.mark.parametrize("name", list(ACCEPTED))
def test_expires_in_accepted(envoy_factory, token_server, upstream, name):
    value, lifetime = ACCEPTED[name]
    token_server.set_expires_in(value)
    e = envoy_factory.start(one_profile())
    r = e.request("/v1/x")
    assert r.status == 200, r.text
    assert upstream.last().header_values("authorization") == ["Bearer tok-1"]
    line = e.wait_log(filter_log("info") + rf".*token fetched in \d+ ms, lifetime {lifetime} s, usable for [\d.]+ s").string
    print(f"\nFAULT-LOG {name}: {line}")
    assert failed_counters(e) == {}
    assert e.filter_stat(f"{PROFILE}.fetch_ok") == 1
    # the gauge is set once a second by the main-thread VM
    remaining = poll(lambda: e.filter_stat(f"{PROFILE}.token_remaining_s"), 4)
    # usable = lifetime - min(skew 5 s, lifetime / 10), counted from when the request was sent
    assert 0 < remaining <= lifetime, remaining
    assert remaining >= lifetime - 5 - 10, remaining  # (10 s of slack for a loaded machine)
    assert token_server.count() == 1
