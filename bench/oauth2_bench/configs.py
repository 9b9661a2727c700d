"""The Envoy bootstraps of the benchmark: one per cell (the Envoy under test) and the native
upstream. Every cell's Envoy has the same routes; only its HTTP filters differ."""

from __future__ import annotations

import json
from typing import Any

from .common import CLIENT_ID, CLIENT_SECRET, EXCHANGE_CELLS, REFRESH_AHEAD_RATIO, TOKEN_URL, UPSTREAM_TOKEN_REGEX

from envoy import bootstrap_dict, direct_route, route, static_cluster, wasm_filter  # noqa: E402

DYNMOD_FILTER_TYPE = "type.googleapis.com/envoy.extensions.filters.http.dynamic_modules.v3.DynamicModuleFilter"
FILTER_CONFIG_TYPE = "type.googleapis.com/envoy.config.route.v3.FilterConfig"
STRING_VALUE_TYPE = "type.googleapis.com/google.protobuf.StringValue"
# The name of the oauth2-cc filter entry in the per-route cell: typed_per_filter_config is keyed by it.
PER_ROUTE_FILTER_NAME = "oauth2_cc"
NATIVE_SECRET = {"name": "client-secret", "generic_secret": {"secret": {"inline_string": CLIENT_SECRET}}}


def native_filter() -> dict:
    """Envoy's credential_injector with the oauth2 credential (client_credentials). The client
    secret is an SDS secret: referenced by name, defined in static_resources.secrets."""
    return {
        "name": "envoy.filters.http.credential_injector",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.credential_injector.v3.CredentialInjector",
            "credential": {
                "name": "envoy.http.injected_credentials.oauth2",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.http.injected_credentials.oauth2.v3.OAuth2",
                    "token_endpoint": {"cluster": "idp", "uri": TOKEN_URL, "timeout": "3s"},
                    "client_credentials": {"client_id": CLIENT_ID, "client_secret": {"name": "client-secret"}},
                    "token_fetch_retry_interval": "1s",
                },
            },
        },
    }


EXCHANGE_GRANT = "urn:ietf:params:oauth:grant-type:token-exchange"


def oauth2cc_config(refresh: bool, match_nothing: bool = False, purge: bool = True, exchange: bool = False) -> dict:
    """``exchange``: a token-exchange profile (the caller's `Authorization` bearer exchanged, the
    documented defaults otherwise) instead of client credentials."""
    profile: dict[str, Any] = {
        "cluster": "idp",
        "token_url": TOKEN_URL,
        "client_id": CLIENT_ID,
        "client_secret": {"env": "BENCH_CLIENT_SECRET"},
    }
    if exchange:
        profile.update(grant_type=EXCHANGE_GRANT, token_exchange={})
    if refresh:
        profile["refresh"] = {"ahead_ratio": REFRESH_AHEAD_RATIO}
    if not purge:
        profile["purge_on_status"] = []
    prefix = "/never-matched/" if match_nothing else "/"
    return {"profiles": {"default": profile}, "routes": [{"match": {"path_prefix": prefix}, "profile": "default"}]}


def dynamic_module_filter(module_name: str, filter_name: str, filter_config: str) -> dict:
    """``envoy.filters.http.dynamic_modules``: Envoy loads ``lib<module_name>.so`` from
    ``ENVOY_DYNAMIC_MODULES_SEARCH_PATH`` and hands ``filter_config`` (a StringValue) to the
    module's filter named ``filter_name``."""
    return {
        "name": "envoy.filters.http.dynamic_modules",
        "typed_config": {
            "@type": DYNMOD_FILTER_TYPE,
            "dynamic_module_config": {"name": module_name},
            "filter_name": filter_name,
            "filter_config": {"@type": STRING_VALUE_TYPE, "value": filter_config},
        },
    }


def per_route_enable() -> dict:
    """typed_per_filter_config value that enables a filter disabled on the HCM: a FilterConfig
    whose ``config`` is present but empty (Envoy 1.40 refuses a FilterConfig with no config and
    ``disabled: false``; an empty config means "enabled, no per-route settings")."""
    return {PER_ROUTE_FILTER_NAME: {"@type": FILTER_CONFIG_TYPE, "config": {}}}


def _routes(config: str) -> list[dict]:
    routes = [
        direct_route(path="/direct", body="ok"),
        route("/echo", "echo"),
        route("/up/", "upstream"),
    ]
    if config == "perroute":
        # /echo (the injection check) enables the filter; the measured routes do not.
        routes[1]["typed_per_filter_config"] = per_route_enable()
    return routes


def under_test_bootstrap(config: str, *, token_server: Any, upstream_port: int, echo_port: int,
                         wasm_file: str, floor_wasm_files: dict[str, str], modules: dict[str, str]) -> dict:
    """``floor_wasm_files``: proxy-wasm floor cell key -> its module file; ``modules``:
    dynamic-module cell key -> the module name (``lib<name>.so``)."""
    common: dict[str, Any] = dict(
        listener_port=0,
        admin_port=0,
        token_clusters={"idp": token_server},
        upstream_port=upstream_port,
        extra_clusters=[static_cluster("echo", "127.0.0.1", echo_port)],
        routes=_routes(config),
    )
    if config in ("none", "none_subject"):
        return bootstrap_dict(None, wasm=False, **common)
    if config == "native":
        b = bootstrap_dict(None, wasm=False, extra_http_filters=[native_filter()], **common)
        b["static_resources"]["secrets"] = [NATIVE_SECRET]
        return b
    if config in floor_wasm_files:
        return bootstrap_dict("", wasm=True, wasm_file=floor_wasm_files[config], **common)
    if config in ("floor_native", "floor_native_fdm"):
        f = dynamic_module_filter(modules[config], "floor", "")
        return bootstrap_dict(None, wasm=False, extra_http_filters=[f], **common)
    if config in ("dynmod", "dynmod_exchange"):
        plugin = oauth2cc_config(refresh=False, exchange=config in EXCHANGE_CELLS)
        f = dynamic_module_filter(modules[config], "oauth2_cc", json.dumps(plugin))
        return bootstrap_dict(None, wasm=False, extra_http_filters=[f], **common)
    if config == "perroute":
        f = wasm_filter(oauth2cc_config(refresh=False), env={"BENCH_CLIENT_SECRET": CLIENT_SECRET},
                        reload_base_interval="1s", wasm_file=wasm_file)
        f["name"] = PER_ROUTE_FILTER_NAME
        f["disabled"] = True
        return bootstrap_dict(None, wasm=False, extra_http_filters=[f], **common)
    return bootstrap_dict(
        oauth2cc_config(refresh=config == "oauth2cc_refresh", match_nothing=config == "oauth2cc_nomatch",
                        purge=config != "oauth2cc_nopurge", exchange=config in EXCHANGE_CELLS),
        wasm=True,
        wasm_file=wasm_file,
        env={"BENCH_CLIENT_SECRET": CLIENT_SECRET},
        reload_base_interval="1s",
        **common,
    )


def upstream_bootstrap() -> dict:
    """The native upstream: direct_response only. /up/auth demands a bearer token (401 without)."""
    ok = {"status": 200, "body": {"inline_string": "ok"}}
    routes = [
        {"match": {"prefix": "/up/auth",
                   "headers": [{"name": "authorization", "string_match": {"safe_regex": {"regex": UPSTREAM_TOKEN_REGEX}}}]},
         "direct_response": ok},
        {"match": {"prefix": "/up/auth"}, "direct_response": {"status": 401, "body": {"inline_string": "no"}}},
        {"match": {"prefix": "/up/open"}, "direct_response": ok},
    ]
    return bootstrap_dict(None, wasm=False, listener_port=0, admin_port=0, routes=routes)
