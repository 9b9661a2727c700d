"""Self-tests of the RFC 8693 token-exchange server (exchange_server.py): no Envoy, a second or two."""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import jwt as pyjwt
import pytest

from envoy import request
from exchange_server import (
    ACCESS_TOKEN_TYPE,
    ID_TOKEN_TYPE,
    JWT_TOKEN_TYPE,
    REFRESH_TOKEN_TYPE,
    TOKEN_EXCHANGE_GRANT,
    ExchangeServer,
    basic,
    exchange_form,
)
from servers import jws_payload

SVC = basic("svc-a", "s3cret")


def post(server: ExchangeServer, body: str, auth: str | None = SVC) -> tuple[int, dict, dict]:
    headers = {"Content-Type": "application/x-www-form-urlencoded"}
    if auth is not None:
        headers["Authorization"] = auth
    r = request(server.port, "/oauth2/token", headers, method="POST", body=body)
    return r.status, r.headers, r.json()


def exchange(server: ExchangeServer, subject_token: str, auth: str | None = SVC, **params) -> tuple[int, dict]:
    status, _, body = post(server, exchange_form(subject_token, **params), auth)
    return status, body


def test_exchange_answers_per_rfc8693(exchange_server: ExchangeServer):
    tok = exchange_server.mint_subject("alice", exp_in=120)
    claims = jws_payload(tok)
    assert claims["sub"] == "alice" and claims["iss"] == exchange_server.issuer
    assert int(time.time()) + 118 <= claims["exp"] <= int(time.time()) + 120
    status, headers, body = post(exchange_server, exchange_form(tok, audience="https://api.test", scope="read"))
    assert status == 200, body
    assert headers["cache-control"] == "no-store" and headers["content-type"] == "application/json"
    assert body == {"access_token": "ex-alice-1", "issued_token_type": ACCESS_TOKEN_TYPE, "token_type": "Bearer",
                    "expires_in": 3600, "scope": "read"}
    # without a scope asked for, none is answered; a second exchange for alice is her second token
    assert exchange(exchange_server, tok) == (200, {"access_token": "ex-alice-2", "issued_token_type": ACCESS_TOKEN_TYPE,
                                                    "token_type": "Bearer", "expires_in": 3600})
    status, body = exchange(exchange_server, tok, subject_token_type=JWT_TOKEN_TYPE, requested_token_type=JWT_TOKEN_TYPE)
    assert (status, body["issued_token_type"]) == (200, JWT_TOKEN_TYPE)
    assert "refresh_token" not in body
    ex = exchange_server.exchanges()[0]
    assert (ex.subject, ex.client_id, ex.audience, ex.resource, ex.scope, ex.status, ex.access_token) == (
        "alice", "svc-a", ["https://api.test"], [], "read", 200, "ex-alice-1")
    assert exchange_server.exchange_counts() == {"alice": 3}
    assert exchange_server.issued_counts() == {"alice": 3}
    assert exchange_server.subject_of("ex-alice-2") == "alice"
    assert exchange_server.subject_of("ex-a-b-7") == "a-b"
    assert exchange_server.subject_of("tok-1") is None and exchange_server.subject_of(tok) is None


def test_bad_subject_tokens_are_refused(exchange_server: ExchangeServer):
    good = exchange_server.mint_subject("bob")
    cases = {
        "expired": exchange_server.mint_subject("bob", exp_in=-5),
        "foreign key": exchange_server.mint_foreign("bob"),
        "other issuer": exchange_server.mint_subject("bob", iss="https://elsewhere.test"),
        "tampered": good[:-4] + ("AAAA" if not good.endswith("AAAA") else "BBBB"),
        "not a JWS": "opaque-token",
    }
    got = {name: exchange(exchange_server, tok) for name, tok in cases.items()}
    assert {name: (s, b["error"]) for name, (s, b) in got.items()} == {name: (400, "invalid_request") for name in cases}
    exchange_server.set_bad_subject_error("invalid_grant")
    assert exchange(exchange_server, cases["expired"])[1]["error"] == "invalid_grant"
    # request errors (RFC 8693 section 2.1)
    missing_type = f"grant_type={TOKEN_EXCHANGE_GRANT}&subject_token={good}"
    assert post(exchange_server, missing_type)[2]["error"] == "invalid_request"
    assert exchange(exchange_server, good, subject_token_type=ID_TOKEN_TYPE)[1]["error"] == "invalid_request"
    assert exchange(exchange_server, good, actor_token="tok-1")[1]["error"] == "invalid_request"  # no actor_token_type
    assert exchange(exchange_server, good, requested_token_type=REFRESH_TOKEN_TYPE)[1]["error"] == "invalid_request"
    assert exchange(exchange_server, good, scope=["a", "b"])[1]["error"] == "invalid_request"  # repeated
    counts = exchange_server.exchange_counts()
    # only the unsupported requested_token_type is judged after the subject token verified
    assert counts == {None: 10, "bob": 1}, counts
    assert exchange_server.issued_counts() == {}
    assert [e.access_token for e in exchange_server.exchanges()] == [None] * 11


def test_client_authentication(exchange_server: ExchangeServer):
    tok = exchange_server.mint_subject("carol")
    form = exchange_form(tok)
    assert post(exchange_server, form, basic("svc-a", "wrong"))[0] == 401
    status, headers, body = post(exchange_server, form, None)
    assert (status, body["error"], headers["www-authenticate"]) == (401, "invalid_client", 'Basic realm="token"')
    assert post(exchange_server, form + "&client_id=svc-a&client_secret=s3cret", None)[0] == 200  # client_secret_post
    assert post(exchange_server, form + "&client_id=svc-a&client_secret=s3cret")[2]["error"] == "invalid_request"  # two methods
    exchange_server.set_clients({"agent": None})  # a public client
    assert post(exchange_server, form + "&client_id=agent", None)[0] == 200
    exchange_server.set_clients(None)
    assert post(exchange_server, form, None)[0] == 200
    # the client-credentials grant is authenticated the same way, then answered as TokenServer does
    exchange_server.set_clients({"svc-a": "s3cret"})
    assert post(exchange_server, "grant_type=client_credentials", basic("svc-a", "no"))[0] == 401
    assert post(exchange_server, "grant_type=client_credentials")[2]["access_token"] == "tok-1"
    assert post(exchange_server, "grant_type=password")[2] == {"error": "unsupported_grant_type"}
    assert [e.client_id for e in exchange_server.exchanges()] == ["svc-a", "agent", None]


def test_targets_actor_forced_errors_and_expires_in(exchange_server: ExchangeServer):
    s = exchange_server
    tok = s.mint_subject("dave")
    s.refuse_targets(audiences=["https://no.test"], resources=["https://no-res.test/"])
    assert exchange(s, tok, audience="https://no.test")[1]["error"] == "invalid_target"
    assert exchange(s, tok, resource=["https://ok.test/", "https://no-res.test/"])[1]["error"] == "invalid_target"
    assert exchange(s, tok, audience="https://ok.test")[0] == 200
    # an actor token: a client-credentials token of this server, or a subject token it signed
    actor = post(s, "grant_type=client_credentials")[2]["access_token"]
    status, body = exchange(s, tok, actor_token=actor, actor_token_type=ACCESS_TOKEN_TYPE)
    assert status == 200, body
    agent = s.mint_subject("agent-7")
    assert exchange(s, tok, actor_token=agent, actor_token_type=JWT_TOKEN_TYPE)[0] == 200
    assert exchange(s, tok, actor_token="forged", actor_token_type=ACCESS_TOKEN_TYPE)[1]["error"] == "invalid_request"
    assert [(e.actor_token, e.actor) for e in s.exchanges()[3:6]] == [(actor, f"client:{actor}"), (agent, "agent-7"),
                                                                       ("forged", None)]
    # forced errors, after the subject is known (counted for it)
    s.force_error("temporarily_unavailable", status=503)
    assert exchange(s, tok) == (503, {"error": "temporarily_unavailable", "error_description": "forced by the test"})
    s.force_error(None)
    # expires_in: a value, omitted, per call
    s.set_exchange_expires_in(None)
    assert "expires_in" not in exchange(s, tok)[1]
    s.set_exchange_expires_in(lambda ex: 10 * len(ex.audience))
    assert exchange(s, tok, audience=["a", "b"])[1]["expires_in"] == 20
    s.set_granted_scope("narrower")
    assert exchange(s, tok, scope="wide")[1]["scope"] == "narrower"
    assert s.exchange_counts() == {"dave": 10}
    # JWS exchanged tokens carry sub and act
    s.set_issue_jws()
    s.set_exchange_expires_in(60)
    body = exchange(s, tok, actor_token=agent, actor_token_type=JWT_TOKEN_TYPE, audience="https://api.test")[1]
    claims = pyjwt.decode(body["access_token"], s.key.public, algorithms=["ES256"], audience="https://api.test")
    assert (claims["sub"], claims["act"], claims["exp"] - claims["iat"]) == ("dave", {"sub": "agent-7"}, 60)
    assert s.subject_of(body["access_token"]) == "dave"


def test_jwks_verifies_minted_tokens_only(exchange_server: ExchangeServer):
    jwks = json.loads(exchange_server.jwks_json())
    (key,) = jwks["keys"]
    assert (key["kty"], key["crv"], key["alg"], key["kid"]) == ("EC", "P-256", "ES256", "subject-signer")
    public = pyjwt.PyJWK(key).key
    pyjwt.decode(exchange_server.mint_subject("e"), public, algorithms=["ES256"], audience="oauth2-cc-e2e")
    with pytest.raises(pyjwt.InvalidSignatureError):
        pyjwt.decode(exchange_server.mint_foreign("e"), public, algorithms=["ES256"], audience="oauth2-cc-e2e")


def test_delays_and_concurrent_counts(exchange_server: ExchangeServer):
    s = exchange_server
    s.set_exchange_delay(lambda sub: 0.3 if sub == "slow" else 0.0)
    slow = s.mint_subject("slow")
    t0 = time.monotonic()
    done = threading.Event()
    th = threading.Thread(target=lambda: (exchange(s, slow), done.set()), daemon=True)
    th.start()
    fast = exchange(s, s.mint_subject("fast"))
    fast_s = time.monotonic() - t0
    th.join(5)
    slow_s = time.monotonic() - t0
    assert fast[0] == 200 and done.is_set()
    assert slow_s >= 0.3, f"slow subject answered after {slow_s:.3f} s (fast one after {fast_s:.3f} s)"
    s.set_exchange_delay(0)
    subjects = [f"user-{i:03d}" for i in range(50)]
    tokens = {sub: s.mint_subject(sub) for sub in subjects}
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda sub: exchange(s, tokens[sub]), subjects * 4))
    assert all(st == 200 for st, _ in answers)
    assert all(s.subject_of(b["access_token"]) == sub for (_, b), sub in zip(answers, subjects * 4))
    counts = s.issued_counts()
    assert counts == {**{sub: 4 for sub in subjects}, "slow": 1, "fast": 1}, counts
    assert sorted(b["access_token"] for _, b in answers if s.subject_of(b["access_token"]) == "user-007") == [
        f"ex-user-007-{n}" for n in range(1, 5)]
    assert s.wait_for_exchanges(202, timeout=0.1) and not s.wait_for_exchanges(203, timeout=0.1)
    s.reset()
    assert s.exchanges() == [] and s.exchange_counts() == {} and s.issued_counts() == {}
