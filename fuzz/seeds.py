#!/usr/bin/env python3
"""Writes the seed corpora under fuzz/corpus/<target>/: small real inputs each target starts from.

Configs come from src/core/config/tests.rs and envoy/demo.yaml, token responses from RFC 6749
§5.1/§5.2, cache entries from the encoding in src/core/cache.rs. route_match takes structured
(`arbitrary`) input, so its seeds are picked from a fuzzing run instead (see README.md).
Run from anywhere: python3 fuzz/seeds.py
"""

import json
import pathlib
import struct

FUZZ = pathlib.Path(__file__).resolve().parent
KEYS = FUZZ.parent / "tests" / "fixtures" / "keys"


def write(target: str, name: str, data: bytes) -> None:
    directory = FUZZ / "corpus" / target
    directory.mkdir(parents=True, exist_ok=True)
    (directory / name).write_bytes(data)


def minimal() -> dict:
    return {
        "profiles": {"billing": {"cluster": "idp", "token_url": "https://idp.example.com/oauth2/token",
                                 "client_id": "svc-a", "client_secret": "s3cret"}},
        "routes": [{"match": {"path_prefix": "/"}, "profile": "billing"}],
    }


def config_seeds() -> None:
    write("config_parse", "minimal.json", json.dumps(minimal()).encode())

    full = minimal()
    full["profiles"]["billing"].update({
        # GET: only with client_secret_basic, tls_client_auth or none (the others are refused)
        "auth_method": "client_secret_basic", "scopes": ["read", "write"], "audience": "api",
        "resource": ["https://api.example.com"], "params": {"tenant": "t1"},
        "token_request_headers": {"x-api-key": "k"}, "method": "GET", "timeout_ms": 2000,
        "max_wait_ms": 3000, "token_field": "data.token", "expires_in_field": "data.ttl",
        "inject": {"header": "x-token", "prefix": "", "keep_existing": True},
        "refresh": {"ahead_ratio": 0.5, "default_ttl_s": 600, "skew_s": 10},
        "backoff": {"base_ms": 500, "max_ms": 5000}, "purge_on_status": [401, 403],
    })
    full["routes"] = [
        {"match": {"authority": "*.example.com:8443", "path_exact": "/v1/pay", "method": "post",
                   "headers": [{"name": "x-tenant", "value": "a"}, {"name": "x-flag"}],
                   "route_name": "billing_route"}, "profile": "billing"},
        {"match": {"path_prefix": "/public/"}, "profile": None},
    ]
    full["on_failure"] = {"status": 502}
    full["max_paused_requests"] = 10
    write("config_parse", "every_field.json", json.dumps(full, indent=1).encode())

    demo = minimal()
    demo["profiles"]["billing"]["client_secret"] = {"env": "DEMO_CLIENT_SECRET"}
    write("config_parse", "env_secret.json", json.dumps(demo).encode())

    ec = minimal()
    del ec["profiles"]["billing"]["client_secret"]
    ec["profiles"]["billing"]["auth_method"] = "private_key_jwt"
    ec["profiles"]["billing"]["jwt"] = {"algorithm": "ES256", "private_key": (KEYS / "ec_p256_pkcs8.pem").read_text(),
                                        "kid": "k1", "claims": {"tenant": "t1"}, "include_nbf": True}
    write("config_parse", "private_key_jwt_es256.json", json.dumps(ec).encode())

    hs = minimal()
    hs["profiles"]["billing"]["auth_method"] = "client_secret_jwt"
    hs["profiles"]["billing"]["client_secret"] = "x" * 32
    write("config_parse", "client_secret_jwt.json", json.dumps(hs).encode())

    grant = minimal()
    del grant["profiles"]["billing"]["client_secret"]
    grant["profiles"]["billing"].update({
        "auth_method": "none", "grant_type": "urn:ietf:params:oauth:grant-type:jwt-bearer",
        "jwt": {"algorithm": "EdDSA", "private_key": (KEYS / "ed25519_pkcs8.pem").read_text(), "subject": "user-1"},
    })
    write("config_parse", "jwt_bearer_grant.json", json.dumps(grant).encode())

    discovered = minimal()
    del discovered["profiles"]["billing"]["token_url"]
    discovered["profiles"]["billing"]["issuer"] = "https://idp.example.com/realms/a"
    discovered["route_metadata"] = True
    write("config_parse", "issuer_route_metadata.json", json.dumps(discovered).encode())

    write("config_parse", "bad_unknown_field.json", b'{"profiles":{"b":{"tokne_url":"x"}}}')
    write("config_parse", "bad_trailing.json", b"{} trailing")
    write("config_parse", "bad_not_json.json", b"{not json")


def token_seeds() -> None:
    def response(status: int, body: str) -> bytes:
        return struct.pack("<H", status) + body.encode()

    write("token_response", "rfc6749_5_1.bin", response(200, json.dumps({
        "access_token": "2YotnFZFEjr1zCsicMWpAA", "token_type": "example", "expires_in": 3600,
        "refresh_token": "tGzv3JOkF0XG5Qx2TlKWIA", "example_parameter": "example_value"})))
    write("token_response", "rfc6749_5_2.bin", response(400, '{"error":"invalid_client","error_description":"bad"}'))
    write("token_response", "error_with_200.bin", response(200, '{"error":"invalid_scope"}'))
    write("token_response", "expires_in_string.bin", response(200, '{"access_token":"t","expires_in":"59.9"}'))
    write("token_response", "expires_in_huge.bin", response(200, '{"access_token":"t","expires_in":1e300}'))
    write("token_response", "header_injection.bin", response(200, '{"access_token":"a\\r\\nx-evil: 1"}'))
    write("token_response", "status_503.bin", response(503, "Service Unavailable"))


def entry(generation=0, sent=0, refresh=0, expires=0, holder=0, lease=0, retry=0, budget_start=0, failures=0,
          budget_used=0, last_failure=0, token=b"", version=2) -> bytes:
    """The layout of `Entry::encode` in src/core/cache.rs: version, 8 x u64, 2 x u32, u8, u32 length, token."""
    header = struct.pack("<B8QIIBI", version, generation, sent, refresh, expires, holder, lease, retry,
                         budget_start, failures, budget_used, last_failure, len(token))
    return header + token


def cache_seeds() -> None:
    write("cache_entry", "codec_test.bin", entry(3, 10, 20, 30, 40, 50, 60, 70, 2, 5, 2, b"abc.def"))
    write("cache_entry", "empty.bin", entry())
    write("cache_entry", "failed_transient.bin", entry(failures=1, retry=1_500, last_failure=1))
    write("cache_entry", "leased.bin", entry(1, 0, 80_000, 95_000, 7, 7_000, budget_start=1, budget_used=1,
                                             token=b"tok"))
    write("cache_entry", "max_values.bin", entry(*[2**64 - 1] * 8, 2**32 - 1, 2**32 - 1, 2, b"t" * 40))
    write("cache_entry", "other_version.bin", entry(version=9, token=b"x"))


if __name__ == "__main__":
    config_seeds()
    token_seeds()
    cache_seeds()
