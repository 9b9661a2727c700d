"""RFC 7523 JWT client authentication and the JWT-bearer grant on real Envoy (2 workers).

The token server is a strict fake IdP: its handler (``AssertionChecker``) verifies every assertion
the filter sends with the matching *public* key (PyJWT), checks the JOSE header and every claim
(``iss``, ``sub``, ``aud``, ``iat``, ``exp`` - ``iat``, ``nbf``, ``jti`` unique across the test),
the form parameters around it (``client_assertion_type``, ``client_id``, ``grant_type``), and
answers a token only for a valid assertion - anything else gets ``401 invalid_client``. Each test
then asserts that the upstream received ``Bearer <that token>``.

Also: 100 refreshes carry 100 distinct ``jti`` values, custom header fields and claims, a list
``aud`` and ``nbf``, the JWT-bearer grant, a key from the VM environment, keys Envoy must refuse
at load (the log names the field), and no key, secret or assertion in Envoy's log (at info with
the filter's own logs at debug: at Envoy-wide debug, Envoy itself prints the listener config and
the upstream request headers). Last, a reload that changes jwt.subject of a JWT-bearer profile
fetches a token for the new subject (the cache key covers the grant's claims).

Requires PyJWT and cryptography (tests/e2e/requirements.txt).

Keys: tests/fixtures/keys/ (test-only keys).
"""

from __future__ import annotations

import json
import re
import statistics
import threading
import time
from pathlib import Path
from typing import Any

import jwt as pyjwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

import plugin_config as pc
from envoy import FILTER_LOG, FILTER_REFUSED

KEYS = Path(__file__).resolve().parents[1] / "fixtures" / "keys"

CLIENT_ID = pc.DEFAULT_CLIENT_ID  # "svc-a"
TOKEN_URL = pc.DEFAULT_TOKEN_URL  # "http://idp.test/oauth2/token": the default "aud"
CLIENT_ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
JWT_BEARER_GRANT = "urn:ietf:params:oauth:grant-type:jwt-bearer"
# 64 bytes: long enough for HS256 (32), HS384 (48) and HS512 (64)
HS_SECRET = "hs-secret-0123456789abcdefghijklmnopqrstuvwxyz-ABCDEFGHIJKLMNOPQ"
assert len(HS_SECRET) == 64

# the filter's jti: 128 random bits, base64url without padding (src/core/assertion/mod.rs)
JTI_RE = re.compile(r"^[A-Za-z0-9_-]{22}$")
FETCHED_RE = re.compile(FILTER_LOG + r'profile \\?"(?P<profile>[\w.-]+)\\?": token fetched in (?P<ms>\d+) ms')
MAX_SKEW_S = 3  # iat vs. the test's clock (same machine)


def key(name: str) -> str:
    return (KEYS / name).read_text()


def pem_body_lines(pem: str) -> list[str]:
    """The base64 lines of a PEM (what would show if the key leaked into a log)."""
    return [line for line in pem.splitlines() if line and not line.startswith("-----")]


def jwt_config(jwt: dict | None = None, *, profile_name: str = "default", **fields: Any) -> dict:
    """A plugin configuration with one profile using JWT client authentication.
    Default: private_key_jwt, no client_secret (``client_secret=...`` adds one)."""
    fields.setdefault("auth_method", "private_key_jwt")
    fields.setdefault("client_secret", None)
    if jwt is not None:
        fields["jwt"] = jwt
    return pc.config(profiles={profile_name: pc.profile(**fields)})


# --------------------------------------------------------------------------- #
# The strict fake IdP
# --------------------------------------------------------------------------- #


class Reject(Exception):
    pass


class AssertionChecker:
    """TokenServer handler: verifies the assertion(s) of each token request.

    mode "client": client authentication (private_key_jwt / client_secret_jwt): the body has
    ``client_assertion_type`` + ``client_assertion`` and (send_client_id) ``client_id``.
    mode "grant": the JWT-bearer grant: ``grant_type`` = jwt-bearer + ``assertion``; the client
    authenticates with ``grant_client_auth`` ("client_secret_basic", "none" or "private_key_jwt").

    Every assertion: signature with ``verify_key`` and exactly ``alg``; header == {alg, typ: JWT}
    plus ``header_extra``; claims exactly {iss, sub, aud, iat, exp, jti} (+ nbf, + ``claims_extra``)
    with iss/sub/aud as expected, exp - iat == lifetime, iat within MAX_SKEW_S of now, nbf == iat,
    jti of the filter's shape and never seen before (a replay is refused, as an IdP would).
    """

    def __init__(self, token_server, *, verify_key: Any, alg: str, lifetime: int = 60,
                 iss: str = CLIENT_ID, sub: str = CLIENT_ID, aud: Any = TOKEN_URL,
                 header_extra: dict | None = None, claims_extra: dict | None = None,
                 nbf: bool = False, mode: str = "client", send_client_id: bool = True,
                 grant_client_auth: str | None = None, client_secret: str | None = None):
        self.ts = token_server
        self.verify_key = verify_key
        self.alg = alg
        self.lifetime = lifetime
        self.iss, self.sub, self.aud = iss, sub, aud
        self.header_extra = dict(header_extra or {})
        self.claims_extra = dict(claims_extra or {})
        self.nbf = nbf
        self.mode = mode
        self.send_client_id = send_client_id
        self.grant_client_auth = grant_client_auth
        self.client_secret = client_secret
        self.lock = threading.Lock()
        self.jtis: set[str] = set()
        self.verified: list[dict] = []  # {"raw", "header", "claims", "t", "kind"}
        self.rejections: list[str] = []
        self.granted: list[str] = []  # tokens handed out, in order
        self.token_claims: dict[str, list[dict]] = {}  # token -> claims of the assertion(s) it answered

    # -- one assertion ----------------------------------------------------
    def verify(self, raw: str, kind: str) -> dict:
        if not raw or raw.count(".") != 2:
            raise Reject(f"{kind}: not a compact JWS: {raw[:40]!r}")
        now = time.time()
        try:
            header = pyjwt.get_unverified_header(raw)
            claims = pyjwt.decode(
                raw,
                self.verify_key,
                algorithms=[self.alg],  # exactly this algorithm: no alg confusion
                options={"verify_aud": False, "require": ["iss", "sub", "aud", "iat", "exp", "jti"]},
                leeway=MAX_SKEW_S,
            )
        except pyjwt.PyJWTError as e:
            raise Reject(f"{kind}: verification failed: {type(e).__name__}: {e}") from None
        want_header = {"alg": self.alg, "typ": "JWT", **self.header_extra}
        if header != want_header:
            raise Reject(f"{kind}: header {header} != {want_header}")
        want_names = {"iss", "sub", "aud", "iat", "exp", "jti"} | set(self.claims_extra)
        if self.nbf:
            want_names.add("nbf")
        if set(claims) != want_names:
            raise Reject(f"{kind}: claim names {sorted(claims)} != {sorted(want_names)}")
        checks = [
            ("iss", claims["iss"] == self.iss, claims["iss"]),
            ("sub", claims["sub"] == self.sub, claims["sub"]),
            ("aud", claims["aud"] == self.aud, claims["aud"]),
            ("iat/exp integers", all(type(claims[c]) is int for c in ("iat", "exp")), (claims["iat"], claims["exp"])),
            ("exp - iat", claims["exp"] - claims["iat"] == self.lifetime, claims["exp"] - claims["iat"]),
            ("iat ~ now", abs(now - claims["iat"]) <= MAX_SKEW_S, now - claims["iat"]),
            ("jti shape", isinstance(claims["jti"], str) and bool(JTI_RE.match(claims["jti"])), claims["jti"]),
        ]
        if self.nbf:
            checks.append(("nbf == iat", claims["nbf"] == claims["iat"], claims["nbf"]))
        for name, value in self.claims_extra.items():
            checks.append((name, claims[name] == value, claims[name]))
        bad = [f"{name} (got {got!r})" for name, ok, got in checks if not ok]
        if bad:
            raise Reject(f"{kind}: bad claims: {', '.join(bad)}")
        with self.lock:
            if claims["jti"] in self.jtis:
                raise Reject(f"{kind}: replayed jti {claims['jti']}")
            self.jtis.add(claims["jti"])
        return {"raw": raw, "header": header, "claims": claims, "t": now, "kind": kind}

    # -- one token request -------------------------------------------------
    def check_request(self, rec) -> list[dict]:
        if rec.method != "POST" or rec.path != "/oauth2/token":
            raise Reject(f"unexpected {rec.method} {rec.path}")
        if rec.header("content-type") != "application/x-www-form-urlencoded":
            raise Reject(f"content-type {rec.header('content-type')!r}")
        f = rec.form_multi
        one = {k: v[0] for k, v in f.items() if len(v) == 1}
        if any(len(v) != 1 for v in f.values()):
            raise Reject(f"repeated parameters: {sorted(f)}")
        out = []
        if self.mode == "client":
            want = {"grant_type", "client_assertion_type", "client_assertion"} | ({"client_id"} if self.send_client_id else set())
            if set(one) != want:
                raise Reject(f"parameters {sorted(one)} != {sorted(want)}")
            if one["grant_type"] != "client_credentials":
                raise Reject(f"grant_type {one['grant_type']!r}")
            if self.send_client_id and one["client_id"] != CLIENT_ID:
                raise Reject(f"client_id {one['client_id']!r}")
            if rec.header("authorization") is not None:
                raise Reject("an Authorization header next to a client assertion")
        else:
            if one.get("grant_type") != JWT_BEARER_GRANT:
                raise Reject(f"grant_type {one.get('grant_type')!r}")
            want = {"grant_type", "assertion"}
            if self.grant_client_auth == "client_secret_basic":
                if rec.basic_auth() != (CLIENT_ID, self.client_secret):
                    raise Reject(f"basic auth {rec.header('authorization')!r}")
            elif self.grant_client_auth == "none":
                want |= {"client_id"}
                if rec.header("authorization") is not None:
                    raise Reject("an Authorization header with auth_method none")
            elif self.grant_client_auth == "private_key_jwt":
                want |= {"client_id", "client_assertion_type", "client_assertion"}
            if set(one) != want:
                raise Reject(f"parameters {sorted(one)} != {sorted(want)}")
            if "client_id" in want and one["client_id"] != CLIENT_ID:
                raise Reject(f"client_id {one['client_id']!r}")
            out.append(self.verify(one["assertion"], "assertion"))
        if "client_assertion" in one:
            if one["client_assertion_type"] != CLIENT_ASSERTION_TYPE:
                raise Reject(f"client_assertion_type {one['client_assertion_type']!r}")
            out.append(self.verify(one["client_assertion"], "client_assertion"))
        return out

    def __call__(self, rec):
        try:
            verified = self.check_request(rec)
        except Reject as e:
            with self.lock:
                self.rejections.append(str(e))
            return 401, {"Content-Type": "application/json"}, {"error": "invalid_client", "error_description": str(e)[:200]}
        token = self.ts.next_token()
        with self.lock:
            self.verified.extend(verified)
            self.granted.append(token)
            self.token_claims[token] = [a["claims"] for a in verified]
        return 200, {"Content-Type": "application/json", "Cache-Control": "no-store"}, self.ts.token_body(token)

    # -- for the tests -----------------------------------------------------
    def wait_answered(self, n: int, timeout: float) -> bool:
        """Until ``n`` token requests were answered (granted or refused); False on timeout."""
        deadline = time.monotonic() + timeout
        while True:
            with self.lock:
                if len(self.granted) + len(self.rejections) >= n:
                    return True
            if time.monotonic() > deadline:
                return False
            time.sleep(0.01)

    def assertions(self) -> list[dict]:
        with self.lock:
            return list(self.verified)

    def assert_clean(self):
        with self.lock:
            assert self.rejections == [], self.rejections


def fetch_times_ms(envoy, profile: str = "default") -> list[int]:
    return [int(m["ms"]) for line in envoy.log_lines() if (m := FETCHED_RE.search(line)) and m["profile"] == profile]


def get_ok(envoy, upstream, checker, path: str = "/v1/x"):
    """One client request: 200, and the upstream got ``Bearer <the token the checker granted>``."""
    r = envoy.request(path)
    assert r.status == 200, (r.status, r.text, checker.rejections)
    assert checker.granted, "no token was granted"
    rec = upstream.last()
    assert rec.path == path
    assert rec.header_values("authorization") == [f"Bearer {checker.granted[-1]}"], (rec.header_list, checker.granted)
    return r


# --------------------------------------------------------------------------- #
# One test per algorithm family: the IdP verifies with the public key
# --------------------------------------------------------------------------- #

# alg -> (private key file given to the filter, public key file the IdP verifies with)
PRIVATE_KEY_JWT = {
    "RS256": ("rsa_pkcs8.pem", "rsa_public.pem"),
    "PS256": ("rsa_pkcs1.pem", "rsa_public.pem"),  # PKCS#1 "RSA PRIVATE KEY" input too
    "ES256": ("ec_p256_sec1.pem", "ec_p256_public.pem"),  # SEC1 "EC PRIVATE KEY" input too
    "ES384": ("ec_p384_pkcs8.pem", "ec_p384_public.pem"),
    "EdDSA": ("ed25519_pkcs8.pem", "ed25519_public.pem"),
}


@pytest.mark.parametrize("alg", list(PRIVATE_KEY_JWT))
def test_private_key_jwt_verified_by_idp(envoy_factory, token_server, upstream, alg):
    private, public = PRIVATE_KEY_JWT[alg]
    checker = AssertionChecker(token_server, verify_key=key(public), alg=alg)
    token_server.set_handler(checker)
    e = envoy_factory.start(jwt_config({"algorithm": alg, "private_key": key(private)}))
    get_ok(e, upstream, checker)
    checker.assert_clean()
    [a] = checker.assertions()  # exactly one token request (the startup fetch), one assertion
    assert a["kind"] == "client_assertion"
    assert a["claims"]["iss"] == a["claims"]["sub"] == CLIENT_ID
    assert a["claims"]["aud"] == TOKEN_URL
    assert a["claims"]["exp"] - a["claims"]["iat"] == 60
    assert a["header"]["alg"] == alg
    assert token_server.count() == 1
    # a second request reuses the cached token: no new assertion
    get_ok(e, upstream, checker, "/v1/y")
    assert token_server.count() == 1


def test_client_secret_jwt_hs256_verified_by_idp(envoy_factory, token_server, upstream):
    checker = AssertionChecker(token_server, verify_key=HS_SECRET, alg="HS256", lifetime=60)
    token_server.set_handler(checker)
    # no jwt block at all: client_secret_jwt defaults to HS256 over the client secret, 60 s
    e = envoy_factory.start(jwt_config(auth_method="client_secret_jwt", client_secret=HS_SECRET))
    get_ok(e, upstream, checker)
    checker.assert_clean()
    [a] = checker.assertions()
    assert a["header"] == {"alg": "HS256", "typ": "JWT"}
    assert token_server.count() == 1
    # the secret itself is never on the wire: no Basic header, no client_secret parameter
    rec = token_server.requests[0]
    assert rec.header("authorization") is None
    assert "client_secret" not in rec.form_multi
    assert HS_SECRET not in rec.body.decode()


def test_client_secret_jwt_hs512_with_options(envoy_factory, token_server, upstream):
    checker = AssertionChecker(token_server, verify_key=HS_SECRET, alg="HS512", lifetime=30, send_client_id=False)
    token_server.set_handler(checker)
    e = envoy_factory.start(jwt_config({"algorithm": "HS512", "lifetime_s": 30, "send_client_id": False},
                         auth_method="client_secret_jwt", client_secret=HS_SECRET))
    get_ok(e, upstream, checker)
    checker.assert_clean()
    assert "client_id" not in token_server.requests[0].form_multi


def test_wrong_key_is_refused_by_idp_and_nothing_reaches_upstream(envoy_factory, token_server, upstream):
    """Negative control for the checker: the filter signs ES256 with a key the IdP does not know.
    The IdP answers 401 invalid_client; the client gets the failure reply, the upstream nothing."""
    other = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    checker = AssertionChecker(token_server, verify_key=key("ec_p256_public.pem"), alg="ES256")
    token_server.set_handler(checker)
    e = envoy_factory.start(jwt_config({"algorithm": "ES256", "private_key": other}))
    r = e.request("/v1/x")
    assert r.status == 503, r.text
    assert r.json() == {"error": "token_unavailable", "profile": "default"}
    assert upstream.count() == 0
    assert checker.granted == []
    assert checker.rejections and all("InvalidSignatureError" in x for x in checker.rejections), checker.rejections
    e.wait_log(r"token request failed: .*invalid_client")
    # invalid_client is a configuration fault: no retry storm. An absence window, not a wait for a
    # state: the next attempt is 30-60 s away (the max_ms ceiling); a retry loop would show in it.
    time.sleep(0.5)
    assert token_server.count() == 1, [x.summary() for x in token_server.requests]


# --------------------------------------------------------------------------- #
# 100 fetches: 100 distinct jti, exact lifetime
# --------------------------------------------------------------------------- #


def test_100_fetches_carry_100_distinct_jti(envoy_factory, token_server, upstream, record_property):
    """Tokens that live 1 s and ``refresh.ahead_ratio`` 0.01: a refresh is due 10 ms after each
    fetch was sent, so the root contexts (woken for it, on each of the 4 VMs) refetch continuously, one at a
    time under the fetch lease. Requests keep flowing meanwhile and always get a granted token."""
    token_server.set_expires_in(1)
    checker = AssertionChecker(token_server, verify_key=key("rsa_public.pem"), alg="RS256", lifetime=30)
    token_server.set_handler(checker)
    e = envoy_factory.start(jwt_config({"algorithm": "RS256", "private_key": key("rsa_pkcs8.pem"), "lifetime_s": 30},
                         refresh={"ahead_ratio": 0.01}))
    stop = threading.Event()
    results: list[tuple[int, str | None]] = []

    def traffic():
        while not stop.is_set():
            r = e.request("/v1/x")
            results.append((r.status, upstream.last().header("authorization") if r.status == 200 else r.text))
            stop.wait(0.02)

    t = threading.Thread(target=traffic, daemon=True)
    t0 = time.monotonic()
    t.start()
    try:
        assert checker.wait_answered(100, timeout=40), f"only {token_server.count()} token requests in 40 s"
    finally:
        stop.set()
        t.join(10)
    elapsed = time.monotonic() - t0
    checker.assert_clean()
    assertions = checker.assertions()
    assert len(assertions) >= 100, f"{len(assertions)} assertions in {elapsed:.1f} s"
    jtis = [a["claims"]["jti"] for a in assertions]
    assert len(set(jtis)) == len(jtis), f"a jti was reused: {len(set(jtis))} distinct of {len(jtis)}"
    lifetimes = sorted({a["claims"]["exp"] - a["claims"]["iat"] for a in assertions})
    assert lifetimes == [30], f"exp - iat values: {lifetimes}"
    # each fetch signed anew: 100 different signatures, never one reused assertion
    distinct = len({a["raw"] for a in assertions})
    assert distinct == len(assertions), f"{distinct} distinct assertions of {len(assertions)}"
    # traffic: every request got a token the IdP granted (no failure during the refreshes)
    granted = {f"Bearer {tok}" for tok in checker.granted}
    assert results and all(s == 200 for s, _ in results), [x for x in results if x[0] != 200][:5]
    foreign = sorted({auth for _, auth in results if auth not in granted})
    assert foreign == [], f"tokens the IdP never granted: {foreign[:5]}"
    assert len({auth for _, auth in results}) > 1, "the token was never replaced"

    e.wait_log(r"token fetched in")
    deadline = time.monotonic() + 5
    while len(times := fetch_times_ms(e)) < len(checker.granted) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(times) >= 100, len(times)
    summary = (f"{len(assertions)} RS256 fetches in {elapsed:.1f} s; 'token fetched in' (sign + callout): "
               f"median {statistics.median(times)} ms, p90 {sorted(times)[int(len(times) * 0.9)]} ms, max {max(times)} ms")
    record_property("rs256_fetch_ms", summary)
    print(summary)


# --------------------------------------------------------------------------- #
# Header fields, claims, audience list, nbf
# --------------------------------------------------------------------------- #


def test_kid_custom_header_and_claims_audience_list_nbf(envoy_factory, token_server, upstream):
    auds = ["https://idp.example/", TOKEN_URL]
    checker = AssertionChecker(
        token_server, verify_key=key("ec_p256_public.pem"), alg="ES256", lifetime=45,
        iss="issuer-x", aud=auds, nbf=True,
        header_extra={"kid": "k1", "typ": "client-authentication+jwt", "x5t": "dGh1bWI"},
        claims_extra={"tenant": "t1", "roles": ["a", "b"], "n": 7},
    )
    token_server.set_handler(checker)
    e = envoy_factory.start(jwt_config({
        "algorithm": "ES256", "private_key": key("ec_p256_pkcs8.pem"), "kid": "k1",
        "headers": {"typ": "client-authentication+jwt", "x5t": "dGh1bWI"},
        "claims": {"tenant": "t1", "roles": ["a", "b"], "n": 7},
        "audience": auds, "issuer": "issuer-x", "lifetime_s": 45, "include_nbf": True,
    }))
    get_ok(e, upstream, checker)
    checker.assert_clean()
    [a] = checker.assertions()
    assert a["header"] == {"alg": "ES256", "typ": "client-authentication+jwt", "kid": "k1", "x5t": "dGh1bWI"}
    c = a["claims"]
    assert c["tenant"] == "t1" and c["aud"] == auds and c["nbf"] == c["iat"]
    assert c["iss"] == "issuer-x" and c["sub"] == CLIENT_ID  # sub still defaults to client_id
    assert c["exp"] - c["iat"] == 45


def test_audience_string_without_nbf(envoy_factory, token_server, upstream):
    checker = AssertionChecker(token_server, verify_key=key("ed25519_public.pem"), alg="EdDSA",
                               aud="https://idp.example/issuer")
    token_server.set_handler(checker)
    e = envoy_factory.start(jwt_config({"algorithm": "EdDSA", "private_key": key("ed25519_pkcs8.pem"),
                          "audience": "https://idp.example/issuer"}))
    get_ok(e, upstream, checker)
    checker.assert_clean()
    [a] = checker.assertions()
    assert "nbf" not in a["claims"] and "kid" not in a["header"]


# --------------------------------------------------------------------------- #
# JWT-bearer grant (RFC 7523 section 2.1)
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("client_auth", ["client_secret_basic", "none", "private_key_jwt"])
def test_jwt_bearer_grant(envoy_factory, token_server, upstream, client_auth):
    checker = AssertionChecker(
        token_server, verify_key=key("rsa_public.pem"), alg="RS256", sub="user-42",
        mode="grant", grant_client_auth=client_auth, client_secret=pc.DEFAULT_CLIENT_SECRET,
    )
    token_server.set_handler(checker)
    fields: dict[str, Any] = {"grant_type": JWT_BEARER_GRANT, "auth_method": client_auth}
    fields["client_secret"] = pc.DEFAULT_CLIENT_SECRET if client_auth == "client_secret_basic" else None
    e = envoy_factory.start(jwt_config({"algorithm": "RS256", "private_key": key("rsa_pkcs8.pem"), "subject": "user-42"}, **fields))
    get_ok(e, upstream, checker)
    checker.assert_clean()
    got = checker.assertions()
    kinds = sorted(a["kind"] for a in got)
    if client_auth == "private_key_jwt":
        # both assertions are built from the same jwt settings, each with its own jti
        assert kinds == ["assertion", "client_assertion"]
        assert got[0]["claims"]["jti"] != got[1]["claims"]["jti"]
    else:
        assert kinds == ["assertion"]
    for a in got:
        assert a["claims"]["sub"] == "user-42" and a["claims"]["iss"] == CLIENT_ID
    assert token_server.count() == 1


# --------------------------------------------------------------------------- #
# Key from the VM environment
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("form", ["multiline", "escaped_newlines"])
def test_private_key_from_environment(envoy_factory, token_server, upstream, form):
    pem = key("ec_p384_pkcs8.pem")
    # "escaped_newlines": a PEM squeezed onto one line with literal \n (documented as accepted)
    value = pem if form == "multiline" else pem.strip().replace("\n", "\\n")
    checker = AssertionChecker(token_server, verify_key=key("ec_p384_public.pem"), alg="ES384")
    token_server.set_handler(checker)
    e = envoy_factory.start(jwt_config({"algorithm": "ES384", "private_key": {"env": "SIGNING_KEY"}}),
              env={"SIGNING_KEY": value})
    get_ok(e, upstream, checker)
    checker.assert_clean()
    assert len(checker.assertions()) == 1, f"{len(checker.assertions())} assertions"
    # the key is in the environment only (the VM's, or Envoy's for the dynamic module), not in the
    # plugin configuration Envoy holds
    filt = json.loads(e.config_text)["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0][
        "typed_config"]["http_filters"][0]["typed_config"]
    if envoy_factory.filter_host == "native":
        configuration = filt["filter_config"]["value"]
        assert e.env == {"SIGNING_KEY": value}
    else:
        plugin = filt["config"]
        configuration = plugin["configuration"]["value"]
        assert plugin["vm_config"]["environment_variables"]["key_values"] == {"SIGNING_KEY": value}
    assert json.loads(configuration)["profiles"]["default"]["jwt"]["private_key"] == {"env": "SIGNING_KEY"}
    # (the messages name the leaked PEM lines by index: a key's lines are not printed)
    lines = pem_body_lines(pem)
    in_config = [i for i, line in enumerate(lines) if line in configuration]
    assert in_config == [], f"PEM body lines {in_config} of {len(lines)} in the plugin configuration"
    log = e.log()
    in_log = [i for i, line in enumerate(lines) if line in log]
    assert in_log == [], f"PEM body lines {in_log} of {len(lines)} in Envoy's log"


# --------------------------------------------------------------------------- #
# Refused at load
# --------------------------------------------------------------------------- #

LOAD_REFUSALS = {
    "malformed_key": (
        {"jwt": {"algorithm": "RS256", "private_key": "-----BEGIN PRIVATE KEY-----\nbm90IGEga2V5IGF0IGFsbA==\n-----END PRIVATE KEY-----\n"}},
        "profiles.default.jwt.private_key", "bm90IGEga2V5IGF0IGFsbA", "the PKCS#8 private key is malformed",
    ),
    "rsa_key_with_es256": (
        {"jwt": {"algorithm": "ES256", "private_key": key("rsa_pkcs8.pem")}},
        "profiles.default.jwt.private_key", pem_body_lines(key("rsa_pkcs8.pem"))[1],
        "an RSA key cannot sign ES256",
    ),
    "hs256_secret_31_bytes": (
        {"auth_method": "client_secret_jwt", "client_secret": HS_SECRET[:31]},
        "profiles.default.client_secret", HS_SECRET[:31], "too short for HS256: it needs at least 32 bytes",
    ),
    "hs384_secret_47_bytes": (
        {"auth_method": "client_secret_jwt", "client_secret": HS_SECRET[:47], "jwt": {"algorithm": "HS384"}},
        "profiles.default.client_secret", HS_SECRET[:47], "too short for HS384: it needs at least 48 bytes",
    ),
    "env_key_missing": (
        {"jwt": {"algorithm": "RS256", "private_key": {"env": "NOT_SET_ANYWHERE"}}},
        "profiles.default.jwt.private_key", None, "environment variable \"NOT_SET_ANYWHERE\" is not set",
    ),
}


@pytest.mark.parametrize("case", list(LOAD_REFUSALS))
def test_refused_at_load_names_the_field(envoy_factory, case):
    fields, field, secret, reason = LOAD_REFUSALS[case]
    fields = dict(fields)
    fields.setdefault("auth_method", "private_key_jwt")
    fields.setdefault("client_secret", None)
    config = pc.config(profiles={"default": pc.profile(**fields)})
    rc, out = envoy_factory.validate(config)
    assert rc != 0, out[-2000:]
    m = re.search(r"configuration rejected: " + re.escape(field) + ": (.*)", out)
    assert m, out[-3000:]
    assert reason in m.group(1), m.group(1)
    assert FILTER_REFUSED[envoy_factory.filter_host] in out, out[-2000:]
    if secret:
        assert secret not in out


def test_refused_at_startup_in_serve_mode(envoy_factory):
    fields, field, secret, _ = LOAD_REFUSALS["rsa_key_with_es256"]
    e = envoy_factory.start(jwt_config(fields["jwt"]), expect_ready=False)
    rc = e.wait_exit(30)
    assert rc != 0
    log = e.log()
    m = re.search(r"configuration rejected: " + re.escape(field) + ": (.*)", log)
    assert m, e.log_tail(60)
    assert "RSA key cannot sign ES256" in m.group(1), m.group(1)
    assert secret not in log and "PRIVATE KEY-----" not in log


# --------------------------------------------------------------------------- #
# Nothing secret in the log
# --------------------------------------------------------------------------- #


def test_no_key_secret_or_assertion_in_log(envoy_factory, token_server, upstream, make_token_server):
    """Two profiles (private_key_jwt RS256 with the key inline; client_secret_jwt HS256 with the
    secret inline), tokens of 1 s so several assertions are signed, the filter's own logs at debug.
    Neither key material, the client secret, any assertion (or a piece of one) nor any token may
    appear in the log."""
    idp2 = make_token_server(expires_in=1)
    token_server.set_expires_in(1)
    rs = AssertionChecker(token_server, verify_key=key("rsa_public.pem"), alg="RS256")
    hs = AssertionChecker(idp2, verify_key=HS_SECRET, alg="HS256")
    token_server.set_handler(rs)
    idp2.set_handler(hs)
    pem = key("rsa_pkcs8.pem")
    config = pc.config(
        profiles={
            "rs": pc.profile(cluster="idp", auth_method="private_key_jwt", client_secret=None,
                             jwt={"algorithm": "RS256", "private_key": pem}),
            "hs": pc.profile(cluster="idp2", auth_method="client_secret_jwt", client_secret=HS_SECRET),
        },
        routes=[pc.match_route("rs", path_prefix="/rs/"), pc.match_route("hs", path_prefix="/hs/")],
    )
    e = envoy_factory.start(config, token_clusters={"idp": token_server, "idp2": idp2},
                            component_log_level="wasm:debug")
    for i in range(3):
        assert e.request(f"/rs/{i}").status == 200
        assert e.request(f"/hs/{i}").status == 200
    # 1 s tokens are refreshed in the background: wait for three signed assertions per profile.
    assert rs.wait_answered(3, 8) and hs.wait_answered(3, 8)
    e.wait_log(r'profile \\?"hs\\?": token fetched in')
    e.stop()
    rs.assert_clean()
    hs.assert_clean()
    log = e.log()
    assert any("token fetched in" in line for line in e.filter_lines())  # the filter did log
    assertions = rs.assertions() + hs.assertions()
    assert len(assertions) >= 6, f"{len(assertions)} assertions (RS {len(rs.assertions())}, HS {len(hs.assertions())})"
    needles: dict[str, str] = {"client secret": HS_SECRET, "PEM armour": "PRIVATE KEY-----"}
    for i, line in enumerate(pem_body_lines(pem)):
        needles[f"key line {i}"] = line
    for i, a in enumerate(assertions):
        head, payload, sig = a["raw"].split(".")
        needles[f"assertion {i}"] = a["raw"]
        needles[f"assertion {i} payload"] = payload[:40]
        needles[f"assertion {i} signature"] = sig[:40]
        needles[f"assertion {i} jti"] = a["claims"]["jti"]
    for tok in rs.granted + hs.granted:
        needles[f"token {tok}"] = f"Bearer {tok}"
    leaks = [f"{what}: {line[:160]}" for line in log.splitlines() for what, n in needles.items() if n in line]
    assert leaks == [], "\n".join(leaks[:20])


# --------------------------------------------------------------------------- #
# Configuration reload (same vm_id): a token for another subject is never reused
# --------------------------------------------------------------------------- #


def lds_envoy(envoy_factory, tmp_path, plugin_config: dict):
    """An Envoy whose listener comes from a file (LDS), so the plugin configuration can be changed
    in place: ``(envoy, update(plugin_config))``. Registered with the factory (stopped and checked
    for wasm failures after the test like any other)."""
    from envoy import Envoy

    boot = json.loads(envoy_factory.config_text(plugin_config))
    listener = boot["static_resources"].pop("listeners")[0]
    lds = tmp_path / "lds.json"

    def write(lst):
        tmp = lds.with_suffix(".tmp")
        tmp.write_text(json.dumps({"resources": [{"@type": "type.googleapis.com/envoy.config.listener.v3.Listener", **lst}]}))
        tmp.rename(lds)  # a move: what Envoy's file watch reacts to

    write(listener)
    boot["dynamic_resources"] = {"lds_config": {"resource_api_version": "V3", "path_config_source": {"path": str(lds)}}}
    boot["node"] = {"id": "test", "cluster": "test"}
    e = Envoy(json.dumps(boot), tmp_path / "lds", concurrency=2, name="lds")
    e.allow_critical = False
    e.expect_running = True
    envoy_factory.envoys.append(e)
    e.start()
    e.wait_ready(30)
    e.wait_log(r"lds: add/update listener")

    def update(new_config: dict):
        before = len(re.findall(r"lds: add/update listener", e.log()))
        configured_re = FILTER_LOG + r"configured \d+ profile"
        configured = len(re.findall(configured_re, e.log()))
        new = json.loads(json.dumps(listener))
        filt = new["filter_chains"][0]["filters"][0]["typed_config"]["http_filters"][0]["typed_config"]
        if "filter_config" in filt:  # the dynamic module: one configuration per listener
            filt["filter_config"]["value"] = json.dumps(new_config)
            configurations = 1
        else:  # proxy-wasm: configured on the 4 VMs (2 main, 2 workers)
            filt["config"]["configuration"]["value"] = json.dumps(new_config)
            configurations = 4
        write(new)
        deadline = time.monotonic() + 10
        # the listener is replaced and the new plugin configured
        while (len(re.findall(r"lds: add/update listener", e.log())) <= before
               or len(re.findall(configured_re, e.log())) < configured + configurations):
            assert time.monotonic() < deadline, e.log_tail(40)
            time.sleep(0.05)

    return e, update


def test_reload_with_new_jwt_bearer_subject_fetches_a_new_token(envoy_factory, token_server, upstream, tmp_path):
    checker = AssertionChecker(token_server, verify_key=key("rsa_public.pem"), alg="RS256", sub="user-42",
                               mode="grant", grant_client_auth="client_secret_basic",
                               client_secret=pc.DEFAULT_CLIENT_SECRET)
    token_server.set_handler(checker)

    def config(subject):
        return jwt_config({"algorithm": "RS256", "private_key": key("rsa_pkcs8.pem"), "subject": subject},
                          grant_type=JWT_BEARER_GRANT, auth_method="client_secret_basic",
                          client_secret=pc.DEFAULT_CLIENT_SECRET)

    e, update = lds_envoy(envoy_factory, tmp_path, config("user-42"))
    get_ok(e, upstream, checker, "/before")
    old_token = checker.granted[-1]
    assert checker.token_claims[old_token][0]["sub"] == "user-42"

    checker.sub = "user-43"
    update(config("user-43"))
    r = e.request("/after")
    assert r.status == 200, r.text
    token = upstream.last().header("authorization").removeprefix("Bearer ")
    checker.assert_clean()
    subs = [c["sub"] for c in checker.token_claims.get(token, [])]
    assert subs == ["user-43"], (
        f"after the reload the upstream got {token!r}, issued for subject(s) {subs}; "
        f"token requests seen: {token_server.count()}")
