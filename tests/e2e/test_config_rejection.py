"""Envoy refuses a plugin configuration the filter rejects, and its log names the JSON path of
the bad field after "configuration rejected" — with either build.

``envoy --mode validate`` loads the filter and has it parse its configuration (Envoy 1.40): the
wasm module's on_configure, the dynamic module's on_http_filter_config_new. A configuration the
filter refuses fails validation with exit code 1 ("Unable to create Wasm plugin oauth2_cc",
"Failed to initialize dynamic module"); one case is also started in serve mode to show Envoy
refuses it at startup too.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest

import plugin_config as pc
from envoy import FILTER_REFUSED as REFUSED
from envoy import filter_log


def edit(path: list, value=None, *, delete: bool = False):
    """A config edit: set (or delete) the field at ``path`` in a copy of the sample."""

    def apply(config: dict) -> dict:
        node = config
        for key in path[:-1]:
            node = node[key]
        if delete:
            del node[path[-1]]
        else:
            node[path[-1]] = value
        return config

    return apply


P = ["profiles", "default"]
KEYS = Path(__file__).resolve().parents[1] / "fixtures" / "keys"
JWT_BEARER_GRANT = "urn:ietf:params:oauth:grant-type:jwt-bearer"
TOKEN_EXCHANGE_GRANT = "urn:ietf:params:oauth:grant-type:token-exchange"


def exchange(**token_exchange):
    """A config edit: make the sample's profile a token exchange with these settings."""
    return profile_fields(grant_type=TOKEN_EXCHANGE_GRANT, token_exchange=token_exchange)


def profile_fields(**fields):
    """A config edit: set fields of the sample's profile; None removes one."""

    def apply(config: dict) -> dict:
        profile = config["profiles"]["default"]
        for name, value in fields.items():
            if value is None:
                profile.pop(name, None)
            else:
                profile[name] = value
        return config

    return apply


def ec_key_jwt() -> dict:
    return {"algorithm": "ES256", "private_key": (KEYS / "ec_p256_pkcs8.pem").read_text()}


# RFC 6749 §2.3.1: GET puts every parameter in the URL, so it is refused with these
GET_IN_QUERY = r"profiles\.default\.method: GET would put the credentials of {} in the URL"

# id -> (edit of the sample config, or a raw configuration string; regex the rejection line must match)
CASES = {
    "unknown_auth_method": (
        edit(P + ["auth_method"], "magic"),
        r"profiles\.default\.auth_method: unknown variant `magic`",
    ),
    # serde reports a missing field at the enclosing object; the field is named in the message
    "missing_token_url": (
        edit(P + ["token_url"], delete=True),
        r"profiles\.default\.token_url: is required",
    ),
    "route_unknown_profile": (
        edit(["routes", 0, "profile"], "nope"),
        r"routes\[0\]\.profile: no profile is named \\?\"nope\\?\"",
    ),
    "bad_url": (
        edit(P + ["token_url"], "idp/token"),
        r"profiles\.default\.token_url: ",
    ),
    "bad_url_scheme": (
        edit(P + ["token_url"], "ftp://idp.test/token"),
        r"profiles\.default\.token_url: ",
    ),
    "negative_ttl": (
        edit(P + ["refresh"], {"default_ttl_s": -5}),
        r"profiles\.default\.refresh\.default_ttl_s: ",
    ),
    "zero_ttl": (
        edit(P + ["refresh"], {"default_ttl_s": 0}),
        r"profiles\.default\.refresh\.default_ttl_s: must be from 1 second to a year",
    ),
    "unknown_field": (
        edit(P + ["tokne_url"], "http://idp.test/t"),
        r"profiles\.default\.tokne_url: unknown field `tokne_url`",
    ),
    "unknown_top_level_field": (
        edit(["rotues"], []),
        r"rotues: unknown field `rotues`",
    ),
    "missing_secret_for_basic": (
        lambda c: edit(P + ["client_secret"], delete=True)(edit(P + ["auth_method"], "client_secret_basic")(c)),
        r"profiles\.default\.client_secret: is required with auth_method client_secret_basic",
    ),
    "env_secret_not_set": (
        edit(P + ["client_secret"], {"env": "OAUTH2_CC_NOT_SET"}),
        r"profiles\.default\.client_secret: environment variable \\?\"OAUTH2_CC_NOT_SET\\?\" is not set",
    ),
    "ahead_ratio_1_5": (
        edit(P + ["refresh"], {"ahead_ratio": 1.5}),
        r"profiles\.default\.refresh\.ahead_ratio: must be greater than 0 and at most 1",
    ),
    "timeout_ms_0": (
        edit(P + ["timeout_ms"], 0),
        r"profiles\.default\.timeout_ms: must be greater than 0",
    ),
    "bad_inject_header": (
        edit(P + ["inject"], {"header": "bad header"}),
        r"profiles\.default\.inject\.header: not a header name the filter may set",
    ),
    "inject_pseudo_header": (
        edit(P + ["inject"], {"header": ":path"}),
        r"profiles\.default\.inject\.header: ",
    ),
    "on_failure_status_200": (
        edit(["on_failure"], {"status": 200}),
        r"on_failure\.status: must be an HTTP error status from 400 to 599",
    ),
    "bad_method": (
        edit(P + ["method"], "PUT"),
        r"profiles\.default\.method: unknown variant `PUT`",
    ),
    "scope_with_space": (
        edit(P + ["scopes"], ["a b"]),
        r"profiles\.default\.scopes\[0\]: ",
    ),
    "secret_with_auth_none": (
        edit(P + ["auth_method"], "none"),
        r"profiles\.default\.client_secret: is not used with auth_method none",
    ),
    "max_paused_requests_0": (
        edit(["max_paused_requests"], 0),
        r"max_paused_requests: must be from 1 to 1000000",
    ),
    "header_value_newline": (
        edit(P + ["token_request_headers"], {"x-api-key": "a\nb"}),
        r"profiles\.default\.token_request_headers\.x-api-key: the value contains a control character",
    ),
    # broken JSON text is named by line and column
    "invalid_json_text": (
        "{not json",
        r"configuration rejected: invalid JSON at line 1 column 2: key must be a string",
    ),
    # ... and by the object it broke in, when there is one
    "invalid_json_nested": (
        '{"profiles": {"default": {\n  "cluster": "idp",\n}}}',
        r"configuration rejected: profiles\.default: invalid JSON at line 3 column 1: trailing comma",
    ),
    "trailing_garbage": (
        lambda c: __import__("json").dumps(c) + "\n trailing",
        r"configuration rejected: invalid JSON at line 2 column 2: trailing characters",
    ),
    "get_with_client_secret_post": (
        profile_fields(method="GET", auth_method="client_secret_post"),
        GET_IN_QUERY.format("auth_method client_secret_post"),
    ),
    "get_with_client_secret_jwt": (
        profile_fields(method="GET", auth_method="client_secret_jwt", client_secret="k" * 32),
        GET_IN_QUERY.format("auth_method client_secret_jwt"),
    ),
    "get_with_private_key_jwt": (
        profile_fields(method="GET", auth_method="private_key_jwt", client_secret=None, jwt=ec_key_jwt()),
        GET_IN_QUERY.format("auth_method private_key_jwt"),
    ),
    "get_with_jwt_bearer_grant": (
        profile_fields(method="GET", auth_method="none", client_secret=None, grant_type=JWT_BEARER_GRANT, jwt=ec_key_jwt()),
        GET_IN_QUERY.format("the JWT-bearer grant"),
    ),
    # token exchange (RFC 8693): the grant and its settings come together, each bad field named
    "exchange_grant_without_settings": (
        profile_fields(grant_type=TOKEN_EXCHANGE_GRANT),
        r"profiles\.default\.token_exchange: is required with grant_type urn:ietf:params:oauth:grant-type:token-exchange",
    ),
    "exchange_settings_without_grant": (
        profile_fields(token_exchange={}),
        r"profiles\.default\.token_exchange: is only used with grant_type",
    ),
    "exchange_with_get": (
        lambda c: profile_fields(method="GET")(exchange()(c)),
        r"profiles\.default\.method: a token exchange is POSTed",
    ),
    "exchange_unknown_actor": (
        exchange(actor={"profile": "nope"}),
        r"profiles\.default\.token_exchange\.actor\.profile: no profile is named",
    ),
    "exchange_subject_two_sources": (
        exchange(subject={"header": "x-user-token", "metadata": {"namespace": "a", "key": "b"}}),
        r"profiles\.default\.token_exchange\.subject: give header or metadata, not both",
    ),
    "exchange_in_flight_0": (
        exchange(limits={"max_in_flight": 0}),
        r"profiles\.default\.token_exchange\.limits\.max_in_flight: must be from 1 to 256",
    ),
    "exchange_cache_too_small": (
        exchange(cache={"max_subjects": 64, "max_bytes": 1000}),
        r"profiles\.default\.token_exchange\.cache\.max_bytes: must be from",
    ),
    "exchange_unknown_field": (
        exchange(subjcet={"header": "x"}),
        r"profiles\.default\.token_exchange\.subjcet: unknown field",
    ),
}

REJECTION_LINE = re.compile(filter_log("error") + r"configuration rejected: (?P<msg>.*)$")


def make_config(case):
    spec = CASES[case][0]
    return spec if isinstance(spec, str) else spec(copy.deepcopy(pc.sample()))


def rejection_lines(text: str) -> list[str]:
    return [m.group(0) for m in map(REJECTION_LINE.search, text.splitlines()) if m]


@pytest.mark.parametrize("case", list(CASES))
def test_validate_rejects_bad_config(envoy_factory, case):
    config = make_config(case)
    rc, out = envoy_factory.validate(config, name=f"validate-{case}")
    assert rc != 0, out[-3000:]
    assert REFUSED[envoy_factory.filter_host] in out, out[-3000:]
    lines = rejection_lines(out)
    assert lines, f"no 'configuration rejected' line:\n{out[-3000:]}"
    pattern = CASES[case][1]
    assert any(re.search(pattern, line) for line in lines), f"{pattern!r} not in:\n" + "\n".join(lines)
    # the rejection never echoes the inline secret
    assert pc.DEFAULT_CLIENT_SECRET not in "\n".join(lines)


def test_validate_accepts_the_sample(envoy_factory):
    """Control: the unedited sample passes validation, so the failures above are the edits."""
    rc, out = envoy_factory.validate(pc.sample(), name="validate-sample")
    assert rc == 0, out[-3000:]
    assert rejection_lines(out) == []


# The same profiles with POST, and GET where the credentials stay out of the URL, are valid: the
# refusals above are the method's.
ACCEPTED = {
    "post_with_client_secret_post": profile_fields(method="POST", auth_method="client_secret_post"),
    "post_with_private_key_jwt": profile_fields(auth_method="private_key_jwt", client_secret=None, jwt=ec_key_jwt()),
    "get_with_client_secret_basic": profile_fields(method="GET", auth_method="client_secret_basic"),
    "get_with_tls_client_auth": profile_fields(method="GET", auth_method="tls_client_auth", client_secret=None),
    "get_with_none": profile_fields(method="GET", auth_method="none", client_secret=None),
    "token_exchange_defaults": exchange(),
    "token_exchange_everything": exchange(
        subject={"metadata": {"namespace": "envoy.filters.http.lua", "key": "subject"}},
        requested_token_type="urn:ietf:params:oauth:token-type:jwt",
        actor={"token": "actor-token"},
        missing_subject="pass",
        verified_by_jwt_authn="jwt_payload",
        cache={"max_subjects": 100, "max_bytes": 1 << 20},
        limits={"exchanges_per_second": 5, "burst": 5, "max_in_flight": 2},
    ),
}


@pytest.mark.parametrize("case", list(ACCEPTED))
def test_validate_accepts(envoy_factory, case):
    rc, out = envoy_factory.validate(ACCEPTED[case](pc.sample()), name=f"validate-{case}")
    assert rc == 0, out[-3000:]
    assert rejection_lines(out) == [], rejection_lines(out)


@pytest.mark.parametrize("case", ["timeout_ms_0", "route_unknown_profile"])
def test_serve_mode_refuses_bad_config(envoy_factory, upstream, case):
    e = envoy_factory.start(make_config(case), expect_ready=False)
    rc = e.wait_exit(30)
    assert rc != 0
    lines = rejection_lines(e.log())
    assert any(re.search(CASES[case][1], line) for line in lines), e.log_tail(40)
    if envoy_factory.filter_host == "wasm":
        critical = e.critical_wasm_lines()
        assert any("Plugin oauth2_cc failed to load" in line for line in critical), f"critical wasm lines: {critical}"
    else:
        assert any(REFUSED["native"] in line for line in e.records_at("critical")), e.log_tail(20)
    assert upstream.count() == 0
