"""A hostile client cannot stop token injection.

Envoy with two workers and ``failure_policy: FAIL_RELOAD`` (the README's advice). Every request-side
input the filter reads — header matchers (``routes[].match.headers``), the ``keep_existing`` header,
``:authority``, ``:path``, ``:method``, and the route name and route metadata strings — is sent
non-UTF-8 bytes, obs-text (``\\x80``-``\\xff``), 16 KiB values and 100 repeats, many times, on raw
sockets so that nothing re-encodes them. The filter must answer each request as its rules say, log no
``critical`` wasm line and no VM failure, and ordinary requests sent right after on the same routes
must get their token.

What Envoy 1.40 itself refuses (400 before any filter runs) is listed in ``CODEC_REJECTS`` and
checked: any non-host byte in ``:authority``, raw non-ASCII in ``:path``, unknown, lower-case or
non-token methods. So ``:authority`` gets 16 KiB and repeats, ``:path`` 16 KiB and percent-encoded
non-UTF-8, ``:method`` PURGE. Route names and metadata come from Envoy's configuration, not the
client; Envoy accepts a configuration file with raw ``\\xff\\xfe`` bytes in a route name or a
metadata string but turns each invalid byte into a space (checked by hand: the filter logged
profile ``"p  "`` for ``p\\xff\\xfe``), so only long non-ASCII UTF-8 values reach the filter there.

The IdP side: a 429 whose ``Retry-After`` is not UTF-8 must not break the filter, and a 429 whose
``Retry-After`` is an HTTP-date (RFC 9110 §10.2.3) must be honoured like delta-seconds.
"""

from __future__ import annotations

import email.utils
import math
import re
import time


import plugin_config as pc
from envoy import Response, bootstrap_dict, http_connection_manager, raw_request, route, start_bootstrap
from servers import json_body, token_by_scope

# Envoy's own wasm failures (besides the harness's `critical` check, in conftest).
VM_FAILURE = re.compile(r"Uncaught RuntimeError|unreachable|VM failed|panicked at|Plugin configured to fail closed")

PROFILES = ("default", "tenant", "billing", "keep", "named", "md")
LONG_NAME = "route-\u00fc\u00ff-" + "\u00e9" * 8192  # 16 KiB of non-ASCII UTF-8
LONG_METADATA = "\u00fc\u0000\u00ff" + "\u00e9" * 8192  # names no profile: the failure reply by design

# Values a client can put in a header: non-UTF-8, obs-text, Latin-1, 16 KiB.
HOSTILE_VALUES: dict[str, bytes] = {
    "ff_fe": b"\xff\xfe",
    "80_81": b"\x80\x81",
    "obs_text_all": bytes(range(0x80, 0x100)),
    "latin1": b"caf\xe9 acme",
    "broken_utf8": b"acme\xc3\x28",
    "acme_then_ff": b"acme\xff",
    "long_ascii_16k": b"a" * 16384,
    "long_obs_16k": b"\xfe" * 16384,
}


def hostile_config() -> dict:
    """One profile per input; every plugin route tests one input, so an ordinary request reads
    them all (x-tenant, x-needs-token, :authority, :method, :path, route name, route metadata)."""
    profiles = {name: pc.profile(scopes=[name], backoff={"base_ms": 200, "max_ms": 1000}) for name in PROFILES}
    profiles["keep"]["inject"] = {"keep_existing": True}
    routes = [
        {"match": {"headers": [{"name": "x-tenant", "value": "acme"}]}, "profile": "tenant"},
        {"match": {"headers": [{"name": "x-needs-token"}]}, "profile": "tenant"},
        {"match": {"authority": "*.billing.internal"}, "profile": "billing"},
        {"match": {"method": "PURGE"}, "profile": "billing"},
        {"match": {"path_prefix": "/keep/"}, "profile": "keep"},
        {"match": {"route_name": LONG_NAME}, "profile": "named"},
        {"match": {"path_exact": "/exact\u00e9"}, "profile": "named"},
        {"match": {}, "profile": "default"},
    ]
    return pc.config(profiles=profiles, routes=routes, route_metadata=True)


def envoy_routes() -> list[dict]:
    return [
        route("/md/", name="md-route", profile="md"),
        route("/mdlong/", name="mdlong-route", profile=LONG_METADATA),
        route("/named/", name=LONG_NAME),
        route("/", name="catch-all"),
    ]


def start_envoy(envoy_factory, token_server, upstream):
    boot = bootstrap_dict(
        hostile_config(), listener_port=0, admin_port=0, token_clusters={"idp": token_server},
        upstream_port=upstream.port, routes=envoy_routes(), wasm_file=envoy_factory_wasm(),
    )
    hcm = http_connection_manager(boot)
    # room for 100 repeats of a 16 KiB header: Envoy's defaults are 100 headers and 60 KiB
    hcm["common_http_protocol_options"] = {"max_headers_count": 400}
    hcm["max_request_headers_kb"] = 2048
    return start_bootstrap(envoy_factory, boot, "hostile")


def envoy_factory_wasm() -> str:
    from conftest import check_wasm_file

    return check_wasm_file()


def vm_failures(e) -> list[str]:
    return [line for line in e.log_lines() if VM_FAILURE.search(line)]


def bearer_for(upstream_rec) -> str | None:
    return upstream_rec.header("authorization")


# --------------------------------------------------------------------------- #
# The barrage
# --------------------------------------------------------------------------- #


def hostile_requests() -> list[tuple[str, dict, str | None]]:
    """(label, raw_request kwargs, profile the request must get a token of; None: the client's own
    Authorization must reach the upstream untouched (keep_existing))."""
    out: list[tuple[str, dict, str | None]] = []
    for tag, v in HOSTILE_VALUES.items():
        out += [
            (f"x-tenant {tag}", {"headers": [("x-tenant", v)]}, "default"),
            (f"x-tenant {tag} x100", {"headers": [("x-tenant", v)] * 100}, "default"),
            (f"x-needs-token {tag}", {"headers": [("x-needs-token", v)]}, "tenant"),
            (f"x-needs-token {tag} x100", {"headers": [("x-needs-token", v)] * 100}, "tenant"),
            (f"keep_existing authorization {tag}", {"target": b"/keep/x", "headers": [("authorization", v)]}, None),
            (f"keep_existing authorization {tag} x100",
             {"target": b"/keep/x", "headers": [("authorization", v)] * 100}, None),
            (f"other header {tag} x100 on /named/", {"target": b"/named/x", "headers": [("x-junk", v)] * 100},
             "named"),
            (f"other header {tag} on /md/", {"target": b"/md/x", "headers": [("x-junk", v)]}, "md"),
        ]
    host = b"h" * 16384
    out += [
        # :authority: Envoy refuses any byte outside the host grammar (see CODEC_REJECTS)
        (":authority 16 KiB", {"host": host}, "default"),
        (":authority 16 KiB .billing.internal", {"host": host + b".billing.internal"}, "billing"),
        (":authority 16 KiB with port", {"host": host + b":99999"}, "default"),
        (":path 16 KiB", {"target": b"/" + b"p" * 16384}, "default"),
        (":path percent-encoded non-UTF-8", {"target": b"/%ff%fe/%80?q=%ff"}, "default"),
        (":path /exact as Latin-1 percent-encoded", {"target": b"/exact%e9"}, "default"),
        (":path 16 KiB on /keep/ with a 16 KiB obs-text Authorization",
         {"target": b"/keep/" + b"k" * 16384, "headers": [("authorization", b"\xfe" * 16384)]}, None),
        (":method PURGE", {"method": b"PURGE"}, "billing"),
        (":authority x100", {"host": b"a.billing.internal", "headers": [("host", b"a.billing.internal")] * 99},
         "*"),
    ]
    return out


# Refused by Envoy itself (400) before any filter runs; checked by the test, so the list stays true.
CODEC_REJECTS: dict[str, dict] = {
    ":path raw \\xff\\xfe": {"target": b"/\xff\xfe"},
    ":method raw \\xff": {"method": b"G\xffT"},
    ":method 16 KiB": {"method": b"X" * 16384},
    ":method lower-case purge": {"method": b"purge"},
    **{f":authority {tag}": {"host": v} for tag, v in HOSTILE_VALUES.items() if tag != "long_ascii_16k"},
    ":authority DEL": {"host": b"a\x7fb"},
    ":method extension token": {"method": b"XHOSTILE"},  # Envoy 1.40 knows a fixed set of methods
}


def check_token(label, r, upstream, profile) -> str | None:
    """None when the reply is what the rules say, else a line for the failure message."""
    if r.status != 200:
        return f"{label}: status {r.status} body {r.body[:120]!r}"
    echo = r.json()
    auth = echo["headers"].get("authorization")
    if profile == "*":  # Envoy decides which Host counts: any of the filter's tokens will do
        return None if (auth or "").startswith("Bearer tok-") else f"{label}: upstream got {auth!r}"
    if profile is None:
        return None if auth is not None and not auth.startswith("Bearer tok-") else f"{label}: upstream got {auth!r}"
    if not (auth or "").startswith(f"Bearer tok-{profile}-"):
        return f"{label}: upstream got Authorization {auth!r}, wanted a token of profile {profile!r}"
    return None


def ordinary_requests() -> list[tuple[str, dict, str]]:
    return [
        ("GET /", {}, "default"),
        ("x-tenant: acme", {"headers": [("x-tenant", b"acme")]}, "tenant"),
        ("x-needs-token: 1", {"headers": [("x-needs-token", b"1")]}, "tenant"),
        ("Host: a.billing.internal", {"host": b"a.billing.internal"}, "billing"),
        ("PURGE /", {"method": b"PURGE"}, "billing"),
        ("/keep/ without Authorization", {"target": b"/keep/x"}, "keep"),
        ("/named/ (route name match)", {"target": b"/named/x"}, "named"),
        ("/md/ (route metadata)", {"target": b"/md/x"}, "md"),
    ]


def run_ordinary(e, upstream, rounds: int = 3) -> list[str]:
    bad = []
    for _ in range(rounds):
        for label, kw, profile in ordinary_requests():
            problem = check_token(label, raw_request(e.port, **kw), upstream, profile)
            if problem:
                bad.append(problem)
    return bad


def test_hostile_request_inputs_never_stop_injection(envoy_factory, token_server, upstream):
    token_by_scope(token_server)
    e = start_envoy(envoy_factory, token_server, upstream)
    assert run_ordinary(e, upstream, rounds=1) == [], "ordinary requests failed before any hostile one"

    for label, kw in CODEC_REJECTS.items():
        r = raw_request(e.port, **kw)
        assert r.status in (0, 400), f"{label}: Envoy's codec answered {r.status} (expected to refuse it)"

    wrong: list[str] = []
    repeats = 4  # fresh connection each: both workers see each input
    for _ in range(repeats):
        for label, kw, profile in hostile_requests():
            r = raw_request(e.port, **kw)
            problem = check_token(label, r, upstream, profile)
            if problem:
                wrong.append(problem)
        # the route metadata names no profile: the failure reply by design, never sent upstream
        r = raw_request(e.port, target=b"/mdlong/x")
        if r.status != 503 or b"token_unavailable" not in r.body:
            wrong.append(f"/mdlong/ (16 KiB metadata profile): {r.status} {r.body[:120]!r}")
    failures = vm_failures(e)
    after = run_ordinary(e, upstream)
    report = (
        f"{len(wrong)} hostile request(s) not answered as the rules say (first 15):\n  " + "\n  ".join(wrong[:15])
        + f"\nVM failures in Envoy's log ({len(failures)}, first 5):\n  " + "\n  ".join(f[:300] for f in failures[:5])
        + f"\nordinary requests after the barrage that got no token ({len(after)}, first 10):\n  "
        + "\n  ".join(after[:10])
    )
    assert not failures and not after and not wrong, report


# --------------------------------------------------------------------------- #
# The IdP side: Retry-After
# --------------------------------------------------------------------------- #


def one_profile_config(**fields) -> dict:
    fields.setdefault("backoff", {"base_ms": 200, "max_ms": 400})
    return pc.config(profiles={"default": pc.profile(**fields)})


def request_until_token(e, seconds: float) -> Response:
    """Requests every 50 ms until one gets 200 or ``seconds`` pass; the last reply (status 0 when
    the last request got no reply within 3 s)."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            r = e.request("/x", timeout=3)
        except OSError as exc:  # socket.timeout included
            r = Response(0, {}, repr(exc).encode())
        if r.status == 200 or time.monotonic() > deadline:
            return r
        time.sleep(0.05)


def test_non_utf8_retry_after_is_harmless(envoy_factory, token_server, upstream):
    """A 429 whose Retry-After is not UTF-8 (the server writes it as Latin-1 bytes 0xff 0xfe):
    the filter treats it as absent (its own backoff), and the next token request succeeds."""
    token_server.fail_next(3, status=429, body={"error": "slow_down"}, headers={"Retry-After": "\xff\xfe"})
    e = envoy_factory.start(one_profile_config())
    r = request_until_token(e, 10)
    failures = vm_failures(e)
    assert r.status == 200 and not failures, (
        f"last reply {r.status} {r.body[:100]!r}; token requests {token_server.count()}; VM failures:\n"
        + "\n".join(f[:300] for f in failures[:5]))
    assert upstream.last().header("authorization") == f"Bearer {token_server.last_token()}"


def test_retry_after_http_date_is_honoured(envoy_factory, token_server, upstream):
    """RFC 9110 §10.2.3: Retry-After is delta-seconds or an HTTP-date. With a date at least 3 s ahead
    the next token request must not come before it (the configured backoff alone is 0.1-0.2 s)."""
    stamp: dict[str, float] = {}

    def handler(rec):
        if "until" not in stamp:
            until = math.ceil(time.time()) + 3  # whole seconds: an HTTP-date has no fraction
            stamp["until"], stamp["answered"] = until, time.time()
            date = email.utils.formatdate(until, usegmt=True)
            stamp["date"] = date
            return 429, {"Retry-After": date, "Content-Type": "application/json"}, json_body({"error": "slow_down"})
        stamp.setdefault("next", time.time())
        return 200, {"Content-Type": "application/json"}, json_body(token_server.token_body())

    token_server.set_handler(handler)
    e = envoy_factory.start(one_profile_config())
    r = request_until_token(e, 12)  # requests keep asking for a token while the filter backs off
    assert "answered" in stamp, "the IdP never saw a token request"
    gap = stamp.get("next", math.inf) - stamp["answered"]
    ahead = stamp["until"] - stamp["answered"]
    print(f"Retry-After: {stamp['date']} ({ahead:.2f} s ahead); next token request {gap:.2f} s after the 429")
    # the HTTP-date is >= 3 s ahead of the answer; 0.25 s of slack for the two clocks' readings
    assert gap >= ahead - 0.25, (
        f"next token request {gap:.2f} s after a 429 with Retry-After {stamp['date']!r}, "
        f"which was {ahead:.2f} s ahead: the HTTP-date form was not honoured")
    assert r.status == 200, f"no token {gap:.2f} s after the 429: {r.status} {r.body[:100]!r}"
    assert not vm_failures(e)
