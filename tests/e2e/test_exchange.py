"""RFC 8693 token exchange on real Envoy (2 workers), against ``ExchangeServer``: per-caller tokens.

Each test judges what the upstream received (the echo) and what the token server was asked
(``ExchangeServer.exchanges()``): the exchange itself, one exchange per subject and a cache hit
after it, expiry capped by the subject token's own ``exp``, the limit refusal (429), the
``jwt_authn``-verified mode (401 for a token jwt_authn did not verify), the refusal of a request
with no subject token, and the isolation of callers (1,000 subjects interleaved at concurrency 64,
every upstream request carrying the token exchanged for its own subject).
"""

from __future__ import annotations

import time
from typing import Any

import pytest

import plugin_config as pc
from envoy import JWT_PAYLOAD_KEY, jwt_authn_filter, lua_filter
from exchange_server import ISSUER, SUBJECT_AUDIENCE, ExchangeServer
from isolation import drive_isolation

EXCHANGE_GRANT = "urn:ietf:params:oauth:grant-type:token-exchange"
ACCESS_TOKEN_TYPE = "urn:ietf:params:oauth:token-type:access_token"
PROFILE = "ex"


def exchange_config(**token_exchange: Any) -> dict:
    """One exchange profile ``ex`` on every route, the ExchangeServer as its IdP (cluster ``idp``);
    ``token_exchange`` adds or replaces fields of its ``token_exchange`` object."""
    te: dict[str, Any] = {"limits": {"exchanges_per_second": 200, "burst": 400, "max_in_flight": 64}}
    te.update(token_exchange)
    profile = pc.profile(grant_type=EXCHANGE_GRANT, token_exchange=te)
    return pc.config(profiles={PROFILE: profile})


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def seen_authorization(r) -> str | None:
    assert r.status == 200, (r.status, r.text)
    return r.json()["headers"].get("authorization")


def reply_error(r) -> tuple[int, str | None]:
    try:
        return r.status, r.json().get("error")
    except ValueError:
        return r.status, None


def test_exchange_then_a_cache_hit_per_subject(envoy_factory, exchange_server: ExchangeServer, upstream):
    e = envoy_factory.start(exchange_config(), token_clusters={"idp": exchange_server})
    alice, bob = exchange_server.mint_subject("alice"), exchange_server.mint_subject("bob")

    assert seen_authorization(e.request("/a", bearer(alice))) == "Bearer ex-alice-1"
    assert seen_authorization(e.request("/b", bearer(bob))) == "Bearer ex-bob-1"
    (first, second) = exchange_server.exchanges()
    assert first.form.get("grant_type") == [EXCHANGE_GRANT], first.form
    assert first.subject_token == alice and first.form.get("subject_token_type") == [ACCESS_TOKEN_TYPE], first.form
    assert first.client_id == pc.DEFAULT_CLIENT_ID and first.status == 200, first
    assert second.subject == "bob"

    # Hits: each subject keeps its own token, on fresh connections (either worker), no new exchange.
    got = [seen_authorization(e.request(f"/{n}", bearer(s))) for n in range(10) for s in (alice, bob)]
    assert got == ["Bearer ex-alice-1", "Bearer ex-bob-1"] * 10, got
    assert exchange_server.exchange_counts() == {"alice": 1, "bob": 1}
    # The subject token never reaches the upstream: the exchanged one replaced it.
    assert not any(alice in str(r.headers) or bob in str(r.headers) for r in upstream.requests)


JWT_TOKEN_TYPE = "urn:ietf:params:oauth:token-type:jwt"


def test_every_rfc8693_parameter_reaches_the_idp_with_the_workloads_token_as_actor(envoy_factory,
                                                                                 exchange_server: ExchangeServer,
                                                                                 upstream):
    """RFC 8693 §2.1 on the wire: the actor is the workload's own client-credentials token (another
    profile of the same configuration), audience, two resources, the scope, requested_token_type,
    and the client authenticated in the body (client_secret_post), not with a Basic header."""
    exchange = pc.profile(
        grant_type=EXCHANGE_GRANT, auth_method="client_secret_post", audience="https://inventory.example.com",
        resource=["https://inventory.example.com/a", "https://inventory.example.com/b"],
        scopes=["inventory:read", "inventory:list"],
        token_exchange={"actor": {"profile": "workload"}, "requested_token_type": JWT_TOKEN_TYPE,
                        "limits": {"exchanges_per_second": 200, "burst": 400, "max_in_flight": 64}})
    config = pc.config(profiles={PROFILE: exchange, "workload": pc.profile()},
                       routes=[{"match": {"path_prefix": "/"}, "profile": PROFILE}])
    e = envoy_factory.start(config, token_clusters={"idp": exchange_server})
    alice = exchange_server.mint_subject("alice")

    assert seen_authorization(e.request("/x", bearer(alice))) == "Bearer ex-alice-1"
    (ex,) = exchange_server.exchanges()
    print("exchange form:", sorted(ex.form))
    workload_tokens = exchange_server.issued_tokens()
    assert ex.actor_token in workload_tokens and ex.actor == f"client:{ex.actor_token}", (ex.actor, workload_tokens)
    assert ex.actor_token_type == ACCESS_TOKEN_TYPE
    assert ex.audience == ["https://inventory.example.com"]
    assert ex.resource == ["https://inventory.example.com/a", "https://inventory.example.com/b"]
    assert ex.scope == "inventory:read inventory:list"
    assert ex.requested_token_type == JWT_TOKEN_TYPE
    assert ex.form.get("client_id") == [pc.DEFAULT_CLIENT_ID] and ex.form.get("client_secret") == ["s3cret"], ex.form
    assert ex.client_id == pc.DEFAULT_CLIENT_ID and ex.status == 200


def test_a_static_actor_token_is_sent_as_configured(envoy_factory, exchange_server: ExchangeServer, upstream):
    agent = exchange_server.mint_subject("agent-7")
    e = envoy_factory.start(exchange_config(actor={"token": agent, "token_type": JWT_TOKEN_TYPE}),
                            token_clusters={"idp": exchange_server})
    assert seen_authorization(e.request("/x", bearer(exchange_server.mint_subject("bob")))) == "Bearer ex-bob-1"
    (ex,) = exchange_server.exchanges()
    assert (ex.actor_token, ex.actor_token_type, ex.actor) == (agent, JWT_TOKEN_TYPE, "agent-7"), ex


# Another filter ahead of oauth2-cc puts the caller's token in the dynamic metadata (here from a
# header the filter does not read), as an authenticating filter would.
SUBJECT_TO_METADATA = """
function envoy_on_request(handle)
  local token = handle:headers():get("x-caller-token")
  if token ~= nil then
    handle:streamInfo():dynamicMetadata():set("example.auth", "subject", token)
  end
end
"""


def test_a_subject_from_dynamic_metadata_is_exchanged(envoy_factory, exchange_server: ExchangeServer, upstream):
    config = exchange_config(subject={"metadata": {"namespace": "example.auth", "key": "subject"}})
    e = envoy_factory.start(config, token_clusters={"idp": exchange_server},
                            before_http_filters=[lua_filter(SUBJECT_TO_METADATA)])
    carol = exchange_server.mint_subject("carol")
    for _ in range(3):
        assert seen_authorization(e.request("/x", {"x-caller-token": carol})) == "Bearer ex-carol-1"
    assert exchange_server.exchange_counts() == {"carol": 1}
    # No metadata (and an Authorization header the profile does not read): no subject.
    r = e.request("/x", bearer(carol))
    assert reply_error(r) == (401, "subject_token_missing"), r


def test_an_upstream_401_purges_only_that_subjects_token(envoy_factory, exchange_server: ExchangeServer, upstream):
    e = envoy_factory.start(exchange_config(), token_clusters={"idp": exchange_server})
    alice, bob = exchange_server.mint_subject("alice"), exchange_server.mint_subject("bob")
    assert seen_authorization(e.request("/x", bearer(alice))) == "Bearer ex-alice-1"
    assert seen_authorization(e.request("/x", bearer(bob))) == "Bearer ex-bob-1"
    upstream.fail_next(1, status=401)
    assert e.request("/x", bearer(alice)).status == 401
    # alice's token is dropped on every worker and exchanged again; bob keeps his.
    got = [seen_authorization(e.request("/x", bearer(s))) for _ in range(4) for s in (alice, bob)]
    assert got == ["Bearer ex-alice-2", "Bearer ex-bob-1"] * 4, got
    assert exchange_server.exchange_counts() == {"alice": 2, "bob": 1}


def test_a_request_with_no_subject_token_is_refused(envoy_factory, exchange_server: ExchangeServer, upstream):
    e = envoy_factory.start(exchange_config(), token_clusters={"idp": exchange_server})
    for headers in ({}, {"Authorization": "Basic c3ZjOng="}, {"Authorization": "Bearer "}):
        r = e.request("/x", headers)
        assert reply_error(r) == (401, "subject_token_missing"), (headers, r)
    assert upstream.count() == 0 and exchange_server.exchanges() == []
    assert e.filter_stat(f"{PROFILE}.subject_missing") == 3


@pytest.mark.parametrize("code", ["invalid_request", "invalid_grant"])
def test_a_subject_token_the_idp_refuses_gets_401_and_other_callers_carry_on(envoy_factory,
                                                                            exchange_server: ExchangeServer,
                                                                            upstream, code):
    """RFC 8693 §2.2.2: an IdP refuses a subject token with invalid_request (some say
    invalid_grant). The caller gets 401, not the 503 of an IdP that is down, and only that subject
    backs off."""
    exchange_server.set_bad_subject_error(code)
    e = envoy_factory.start(exchange_config(), token_clusters={"idp": exchange_server})
    forged = exchange_server.mint_foreign("mallory")
    statuses = [reply_error(e.request("/x", bearer(forged))) for _ in range(3)]
    print(code, statuses)
    assert statuses == [(401, "subject_token_rejected")] * 3, statuses
    assert seen_authorization(e.request("/x", bearer(exchange_server.mint_subject("alice")))) == "Bearer ex-alice-1"
    assert e.filter_stat(f"{PROFILE}.subject_rejected") == 3
    assert e.filter_stat(f"{PROFILE}.fetch_failed.{code}") == 1, "the refused subject backs off: one exchange"
    assert upstream.count() == 1


def test_missing_subject_pass_sends_the_request_on_untouched(envoy_factory, exchange_server: ExchangeServer,
                                                             upstream):
    e = envoy_factory.start(exchange_config(missing_subject="pass"), token_clusters={"idp": exchange_server})
    r = e.request("/x", {"x-other": "1"})
    assert r.status == 200 and "authorization" not in r.json()["headers"], r
    # A subject present is still exchanged.
    assert seen_authorization(e.request("/x", bearer(exchange_server.mint_subject("dave")))) == "Bearer ex-dave-1"
    assert exchange_server.exchange_counts() == {"dave": 1}


def test_expiry_is_capped_by_the_subject_tokens_exp(envoy_factory, exchange_server: ExchangeServer, upstream):
    """The IdP's token lives an hour; the subject token expires in a few seconds: the exchanged
    token is never sent at or after the subject's exp, and an expired subject gets 401 without
    another exchange."""
    e = envoy_factory.start(exchange_config(), token_clusters={"idp": exchange_server})
    exp = int(time.time()) + 4
    alice = exchange_server.mint_subject("alice", exp=exp)
    sent_ok = 0
    refused: list[tuple[int, str | None]] = []
    deadline = exp + 3
    while time.time() < deadline:
        r = e.request("/x", bearer(alice))
        if r.status == 200:
            assert seen_authorization(r).startswith("Bearer ex-alice-"), r
            sent_ok += 1
        else:
            refused.append(reply_error(r))
        time.sleep(0.05)  # pacing the loop
    # Upstream times are monotonic; compare the wall clock through one offset.
    offset = time.time() - time.monotonic()
    late = [r.time + offset - exp for r in upstream.requests if r.time + offset >= exp]
    print(f"subject exp in 4 s: {sent_ok} requests sent with its token, {len(refused)} refused, "
          f"exchanges {exchange_server.exchange_counts()}, late sends {late}")
    assert sent_ok >= 3, "the exchanged token was used while the subject was valid"
    assert late == [], "an exchanged token reached the upstream at or after the subject's exp"
    assert refused and set(refused) == {(401, "subject_token_rejected")}, refused
    exchanges = exchange_server.exchanges()
    assert all(ex.status == 200 for ex in exchanges), [(ex.status, ex.error) for ex in exchanges]
    # Another exchange could not outlive the subject token: it would be spent on a sliver of time.
    assert len(exchanges) == 1, [round(ex.time - exchanges[0].time, 2) for ex in exchanges]


def test_the_exchange_limit_refuses_with_429(envoy_factory, exchange_server: ExchangeServer, upstream):
    config = exchange_config(limits={"exchanges_per_second": 1, "burst": 1, "max_in_flight": 1})
    e = envoy_factory.start(config, token_clusters={"idp": exchange_server})
    alice = exchange_server.mint_subject("alice")
    assert seen_authorization(e.request("/x", bearer(alice))) == "Bearer ex-alice-1"
    others = [exchange_server.mint_subject(f"other-{n}") for n in range(5)]
    replies = [e.request("/x", bearer(t)) for t in others]
    refused = [reply_error(r) for r in replies if r.status != 200]
    print(f"burst 1, 1 per second: {len(refused)} of {len(others)} new subjects refused; "
          f"exchanges {exchange_server.exchange_counts()}")
    assert refused, "a burst beyond the bucket is refused"
    assert set(refused) == {(429, "exchange_limited")}, refused
    assert all(r.headers.get("content-type") == "application/json" for r in replies if r.status == 429)
    # The cached subject is not limited, and the IdP saw no more than the bucket allowed.
    assert seen_authorization(e.request("/x", bearer(alice))) == "Bearer ex-alice-1"
    assert sum(exchange_server.exchange_counts().values()) == 1 + (len(others) - len(refused))
    assert e.filter_stat(f"{PROFILE}.exchange_limited") == len(refused)


def test_jwt_authn_verified_mode_exchanges_only_verified_tokens(envoy_factory, exchange_server: ExchangeServer,
                                                                upstream):
    """jwt_authn requires a token under /api only: a token elsewhere reaches the filter unverified
    (no payload in the metadata) and is refused with 401, never exchanged."""
    authn = jwt_authn_filter(exchange_server.jwks(), issuer=ISSUER, audiences=[SUBJECT_AUDIENCE], prefix="/api")
    config = exchange_config(verified_by_jwt_authn=JWT_PAYLOAD_KEY)
    e = envoy_factory.start(config, token_clusters={"idp": exchange_server}, before_http_filters=[authn])
    alice = exchange_server.mint_subject("alice")
    assert seen_authorization(e.request("/api/x", bearer(alice))) == "Bearer ex-alice-1"
    assert seen_authorization(e.request("/api/y", bearer(alice))) == "Bearer ex-alice-1"

    # Unverified: outside jwt_authn's rule, even a token the IdP would accept; and a forged one.
    r = e.request("/open", bearer(exchange_server.mint_subject("mallory")))
    assert reply_error(r) == (401, "subject_token_unverified"), r
    # A cached subject is not served unverified either.
    r = e.request("/open", bearer(alice))
    assert reply_error(r) == (401, "subject_token_unverified"), r
    # jwt_authn itself refuses a forged token before the filter.
    assert e.request("/api/x", bearer(exchange_server.mint_foreign("alice"))).status == 401
    assert exchange_server.exchange_counts() == {"alice": 1}
    assert e.filter_stat(f"{PROFILE}.subject_unverified") == 2


@pytest.mark.cpu_heavy
def test_1000_interleaved_subjects_each_get_their_own_token(envoy_factory, exchange_server: ExchangeServer,
                                                            upstream):
    config = exchange_config(
        cache={"max_subjects": 8192, "max_bytes": 64 * 1024 * 1024},
        limits={"exchanges_per_second": 5000, "burst": 5000, "max_in_flight": 256},
    )
    e = envoy_factory.start(config, token_clusters={"idp": exchange_server})
    report = drive_isolation(e.port, exchange_server, subjects=1000, per_subject=3, concurrency=64, timeout=60)
    print(report.summary())
    report.assert_isolated()
    assert report.statuses == {200: 3000}, report.summary()
    never = [s for s, n in report.exchange_counts.items() if n == 0]
    assert never == [], f"{len(never)} subjects sent with no exchange"
    # Single flight per subject across both workers; an 8-way set may still evict a few.
    many = {s: n for s, n in report.exchange_counts.items() if n > 1}
    assert len(many) <= 20, f"{len(many)} subjects exchanged more than once: {sorted(many.items())[:10]}"


def test_no_subject_token_digest_or_claim_in_the_filters_logs_stats_or_replies(envoy_factory,
                                                                            exchange_server: ExchangeServer,
                                                                            upstream):
    """With the filter's log at debug: exchanges, hits, a refusal by the IdP (invalid_grant) and the
    429 limit; no line the filter wrote, no stat name and no reply body holds a subject token, its
    SHA-256 (hex or base64url) or its subject claim."""
    import base64
    import hashlib

    config = exchange_config(limits={"exchanges_per_second": 1, "burst": 2, "max_in_flight": 2})
    e = envoy_factory.start(config, token_clusters={"idp": exchange_server})
    e.set_log_level("debug")
    names = ["alice-7f3c", "bob-91d2"]
    tokens = [exchange_server.mint_subject(n) for n in names]
    forged = exchange_server.mint_foreign("carol-5e6b")
    bodies = [e.request("/x", bearer(t)).text for t in tokens * 3 + [forged] + tokens]
    bodies += [e.request("/x", bearer(exchange_server.mint_subject(f"dave-{n}"))).text for n in range(3)]
    statuses = {r for r in (e.request("/x", bearer(t)).status for t in tokens)}
    assert statuses == {200}, statuses
    needles = set(names) | {"carol-5e6b"}
    for token in tokens + [forged]:
        digest = hashlib.sha256(token.encode()).digest()
        needles |= {token, token[-24:], digest.hex(), base64.urlsafe_b64encode(digest).decode().rstrip("=")}
    lines = e.filter_lines()
    stats = " ".join(e.stats(filter="oauth2_cc").keys())
    print(f"{len(lines)} filter log lines, {len(bodies)} replies checked")
    assert lines, "the filter logged at debug"
    for needle in needles:
        assert not any(needle in line for line in lines), needle
        assert needle not in stats, needle
        # Upstream echoes carry the exchanged token, which names its subject: only refusals count.
        assert not any(needle in body for body in bodies if '"error"' in body), needle
