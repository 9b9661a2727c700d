"""The token-exchange harness on real Envoy, without oauth2-cc: Envoy's ``jwt_authn`` in front
(``envoy.jwt_authn_filter`` with the ``ExchangeServer``'s JWKS) and the isolation load driver
(``isolation.drive_isolation``) against a stand-in exchanger written in Lua, so that both are known
to work, and the driver known to catch a wrong token, before the filter's tests rely on them."""

from __future__ import annotations

import pytest

from envoy import JWT_AUTHN_FILTER, JWT_PAYLOAD_KEY, jwt_authn_filter, lua_filter
from exchange_server import ISSUER, SUBJECT_AUDIENCE, ExchangeServer
from isolation import drive_isolation

pytestmark = pytest.mark.host_agnostic

# Copies the verified payload's sub (dynamic metadata) into a header the echo upstream shows.
SHOW_VERIFIED_SUB = f"""
function envoy_on_request(handle)
  local md = handle:streamInfo():dynamicMetadata():get("{JWT_AUTHN_FILTER}")
  if md ~= nil and md["{JWT_PAYLOAD_KEY}"] ~= nil then
    handle:headers():replace("x-verified-sub", md["{JWT_PAYLOAD_KEY}"]["sub"])
  end
end
"""


def test_jwt_authn_before_the_filter_refuses_bad_subject_tokens(envoy_factory, exchange_server: ExchangeServer,
                                                                 upstream):
    authn = jwt_authn_filter(exchange_server.jwks(), issuer=ISSUER, audiences=[SUBJECT_AUDIENCE], prefix="/api")
    e = envoy_factory.start(wasm=False, before_http_filters=[authn], extra_http_filters=[lua_filter(SHOW_VERIFIED_SUB)])
    (listeners,) = [c for c in e.config_dump()["configs"] if c["@type"].endswith("ListenersConfigDump")]
    hcm = listeners["static_listeners"][0]["listener"]["filter_chains"][0]["filters"][0]["typed_config"]
    chain = [f["name"] for f in hcm["http_filters"]]
    assert chain == [JWT_AUTHN_FILTER, "envoy.filters.http.lua", "envoy.filters.http.router"]

    good = exchange_server.mint_subject("alice", exp_in=300)
    r = e.request("/api/x", {"Authorization": f"Bearer {good}"})
    assert r.status == 200, r
    seen = r.json()["headers"]
    assert seen["authorization"] == f"Bearer {good}"  # forward: true keeps the token for the exchange
    assert seen["x-verified-sub"] == "alice"  # payload_in_metadata: the subject another filter reads

    bad = {
        "no token": {},
        "foreign key": {"Authorization": f"Bearer {exchange_server.mint_foreign('alice')}"},
        # beyond jwt_authn's default 60 s clock skew
        "expired": {"Authorization": f"Bearer {exchange_server.mint_subject('alice', exp_in=-120)}"},
        "other issuer": {"Authorization": f"Bearer {exchange_server.mint_subject('alice', iss='https://x.test')}"},
        "garbage": {"Authorization": "Bearer not.a.jwt"},
    }
    got = {name: e.request("/api/x", h).status for name, h in bad.items()}
    assert got == {name: 401 for name in bad}, got
    wrong_aud = e.request("/api/x", {"Authorization": f"Bearer {exchange_server.mint_subject('a', aud='other')}"})
    assert wrong_aud.status == 403, wrong_aud
    assert upstream.count() == 1, [r.summary() for r in upstream.requests]
    # outside the rule's prefix jwt_authn requires nothing: no metadata, the header untouched
    r = e.request("/open", {"Authorization": "Bearer anything"})
    assert r.status == 200 and "x-verified-sub" not in r.json()["headers"]


# A stand-in for an exchanging filter, per request and without a cache: on /iso it exchanges the
# bearer token at the ExchangeServer (cluster "idp") and sends the result upstream; on /plain it
# does nothing (the subject token goes upstream); on /mix it exchanges the token of the request
# before it on the same worker, as a cache keyed wrongly would.
EXCHANGER = """
local previous = nil
local function exchange(handle, subject)
  local body = "grant_type=urn%3Aietf%3Aparams%3Aoauth%3Agrant-type%3Atoken-exchange" ..
    "&subject_token_type=urn%3Aietf%3Aparams%3Aoauth%3Atoken-type%3Aaccess_token&subject_token=" .. subject
  local headers, answer = handle:httpCall("idp", {
    [":method"] = "POST", [":path"] = "/oauth2/token", [":authority"] = "idp",
    ["content-type"] = "application/x-www-form-urlencoded",
    ["authorization"] = "Basic c3ZjLWE6czNjcmV0"}, body, 10000)
  return string.match(answer or "", '"access_token":"([^"]+)"')
end

function envoy_on_request(handle)
  local path = handle:headers():get(":path")
  if string.sub(path, 1, 6) == "/plain" then return end
  local subject = string.match(handle:headers():get("authorization") or "", "^Bearer (.+)$")
  local use = subject
  if string.sub(path, 1, 4) == "/mix" and previous ~= nil then use = previous end
  previous = subject
  local token = exchange(handle, use)
  if token == nil then
    handle:respond({[":status"] = "502"}, "exchange failed")
    return
  end
  handle:headers():replace("authorization", "Bearer " .. token)
end
"""


@pytest.mark.cpu_heavy
def test_isolation_driver_judges_every_request(envoy_factory, exchange_server: ExchangeServer, upstream):
    e = envoy_factory.start(wasm=False, extra_http_filters=[lua_filter(EXCHANGER)], token_clusters={"idp": exchange_server})
    report = drive_isolation(e.port, exchange_server, subjects=1000, per_subject=2, concurrency=64)
    print(f"\nstand-in exchanger: {report.summary()}")
    report.assert_isolated()
    assert set(report.exchange_counts.values()) == {2}, report.summary()  # no cache: an exchange per request
    assert upstream.count() >= 2000, upstream.count()

    # The driver catches the subject token going upstream unexchanged...
    plain = drive_isolation(e.port, exchange_server, subjects=40, per_subject=2, path_prefix="/plain",
                            subject_prefix="plain-")
    print(f"no exchange: {plain.summary()}")
    assert len(plain.wrong) == 80 and all("the subject token itself" in w for w in plain.wrong), plain.wrong[:3]
    assert set(plain.exchange_counts.values()) == {0}
    # ...and a token exchanged for another subject.
    mixed = drive_isolation(e.port, exchange_server, subjects=40, per_subject=2, path_prefix="/mix",
                            subject_prefix="mix-", concurrency=8)
    print(f"previous request's subject: {mixed.summary()}")
    assert mixed.wrong and all("not for mix-" in w for w in mixed.wrong), mixed.wrong[:3]
