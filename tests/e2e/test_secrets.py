"""The client secret stays out of logs.

* Inline secret, the filter's Envoy component at ``trace``: no record the filter wrote
  holds the secret, its form-urlencoded form or its Basic credential - through a successful fetch
  and a failed one whose error body echoes the secret back.
* Same scenario with Envoy at ``info``: the whole Envoy log holds none of them.
* ``{"env": ...}`` secret, Envoy at ``debug``: the plugin configuration string never holds the
  secret. What Envoy itself shows is asserted as found on Envoy 1.40: the value sits in
  ``vm_config.environment_variables``, which Envoy prints with the filter config in its debug log
  and in admin ``/config_dump``; nowhere else. The dynamic module reads the variable from Envoy's
  own environment: the value is in no configuration, dump or log line at all.
"""

from __future__ import annotations

import base64
import json
import urllib.parse

import re

import plugin_config as pc
from envoy import FILTER_LOG, filter_log

CLIENT_ID = "svc-a"
SECRET = "S3cr3t-p@ss:w%rd +/&=?-xyzzy"
ENV_NAME = "OAUTH2_SECRET"


def secret_forms(secret: str = SECRET, client_id: str = CLIENT_ID) -> dict[str, str]:
    """Every shape in which the secret travels on the wire."""
    basic = f"{urllib.parse.quote_plus(client_id)}:{urllib.parse.quote_plus(secret)}"
    return {
        "raw": secret,
        "form_urlencoded": urllib.parse.quote_plus(secret),
        "percent_encoded": urllib.parse.quote(secret, safe=""),
        "basic_credential": base64.b64encode(basic.encode()).decode(),
        "basic_credential_unencoded": base64.b64encode(f"{client_id}:{secret}".encode()).decode(),
        "json_escaped": json.dumps(secret)[1:-1],
    }


def leaks(lines, forms: dict[str, str]) -> list[str]:
    return [f"{name}: {line}" for line in lines for name, value in forms.items() if value in line]


def two_profile_config(secret) -> dict:
    """"good" (client_secret_basic) gets a token; "bad" (client_secret_post) gets invalid_client."""
    return pc.config(
        profiles={
            "good": pc.profile(client_id=CLIENT_ID, client_secret=secret, auth_method="client_secret_basic"),
            "bad": pc.profile(client_id=CLIENT_ID, client_secret=secret, auth_method="client_secret_post",
                              token_url="http://idp.test/bad/token"),
        },
        routes=[pc.match_route("good", path_prefix="/good/"), pc.match_route("bad", path_prefix="/bad/")],
    )


def run_scenario(envoy_factory, token_server, upstream, config, **start_kw):
    """A successful fetch and a failing one; returns the stopped Envoy (log flushed)."""

    def handler(rec):
        if rec.path == "/bad/token":
            # a careless IdP that echoes the credentials back
            return 401, {"Content-Type": "application/json"}, {
                "error": "invalid_client",
                "error_description": f"client {CLIENT_ID} with secret {SECRET} is unknown",
            }
        return 200, {"Content-Type": "application/json"}, token_server.token_body()

    token_server.set_handler(handler)
    e = envoy_factory.start(config, **start_kw)
    ok = e.request("/good/x")
    assert ok.status == 200, ok.text
    assert upstream.last().header("authorization") == "Bearer tok-1"
    failed = e.request("/bad/x")
    assert failed.status == 503, failed.text
    assert failed.json() == {"error": "token_unavailable", "profile": "bad"}
    assert leaks([failed.text], secret_forms()) == []
    e.wait_log(FILTER_LOG + r"profile \\?\"bad\\?\": token request failed: .*invalid_client")
    # the secret really went over the wire in both forms
    bad = [r for r in token_server.requests if r.path == "/bad/token"]
    good = [r for r in token_server.requests if r.path == "/oauth2/token"]
    assert bad and bad[0].form["client_secret"] == SECRET
    assert good and good[0].basic_auth() == (CLIENT_ID, SECRET)
    assert upstream.count() == 1
    e.stop()
    return e


def test_filter_logs_hold_no_secret_at_wasm_trace(envoy_factory, token_server, upstream):
    e = run_scenario(envoy_factory, token_server, upstream, two_profile_config(SECRET),
                     log_level="info", component_log_level="wasm:trace")
    filter_lines = e.filter_lines()
    # the level really was trace/debug for the plugin: its debug records are there
    assert any(re.search(filter_log("debug"), line) and "token request sent" in line for line in filter_lines), filter_lines
    assert leaks(filter_lines, secret_forms()) == []


def test_envoy_log_at_info_holds_no_secret(envoy_factory, token_server, upstream):
    e = run_scenario(envoy_factory, token_server, upstream, two_profile_config(SECRET),
                     log_level="info", component_log_level="wasm:info")
    assert leaks(e.log_lines(), secret_forms()) == []


# --------------------------------------------------------------------------- #
# Secret from the VM environment
# --------------------------------------------------------------------------- #


def wasm_plugin_configs(obj):
    """Every wasm PluginConfig (the dict holding "vm_config") found in a JSON tree."""
    if isinstance(obj, dict):
        if "vm_config" in obj and "root_id" in obj:
            yield obj
        for value in obj.values():
            yield from wasm_plugin_configs(value)
    elif isinstance(obj, list):
        for value in obj:
            yield from wasm_plugin_configs(value)


def without_env_values(obj):
    """A copy of a JSON tree with every vm_config.environment_variables removed."""
    if isinstance(obj, dict):
        return {k: without_env_values(v) for k, v in obj.items() if k != "environment_variables"}
    if isinstance(obj, list):
        return [without_env_values(v) for v in obj]
    return obj


def test_env_secret_is_not_in_plugin_configuration(envoy_factory, token_server, upstream):
    config = pc.config(profiles={"default": pc.profile(client_id=CLIENT_ID, client_secret=pc.env_secret(ENV_NAME))})
    forms = secret_forms()
    e = envoy_factory.start(config, env={ENV_NAME: SECRET}, log_level="debug")
    r = e.request("/v1/x")
    assert r.status == 200, r.text
    assert upstream.last().header("authorization") == "Bearer tok-1"
    assert token_server.requests[0].basic_auth() == (CLIENT_ID, SECRET)  # the env value was used
    dump = e.config_dump()
    e.stop()

    if envoy_factory.filter_host == "native":
        # The dynamic module reads {"env": ...} from Envoy's own process environment: the value is
        # in no configuration Envoy holds, so neither /config_dump nor Envoy's debug records of its
        # configuration show it, and the raw secret is in no log line at all.
        assert leaks([e.config_text, json.dumps(dump)], forms) == []
        assert leaks(e.filter_lines(), forms) == []
        assert [line for line in e.log_lines() if SECRET in line] == []
        return

    # 1. the plugin configuration string: in the bootstrap and as Envoy reports it
    boot_plugins = list(wasm_plugin_configs(json.loads(e.config_text)))
    dump_plugins = list(wasm_plugin_configs(dump))
    assert boot_plugins and dump_plugins
    for plugin in boot_plugins + dump_plugins:
        value = plugin["configuration"]["value"]
        assert json.loads(value)["profiles"]["default"]["client_secret"] == {"env": ENV_NAME}
        assert leaks([value], forms) == []

    # 2. admin /config_dump: the value is shown, but only under vm_config.environment_variables
    for plugin in dump_plugins:
        assert plugin["vm_config"]["environment_variables"]["key_values"][ENV_NAME] == SECRET
    assert leaks([json.dumps(without_env_values(dump))], forms) == []

    # 3. the debug log: no filter record holds it ...
    lines = e.log_lines()
    assert leaks(e.filter_lines(), forms) == []
    # ... and Envoy's own records hold the raw value only where they print the filter config with
    # its environment_variables (Envoy's config debug lines), nowhere else
    env_pair = json.dumps({ENV_NAME: SECRET}, separators=(",", ":"))[1:-1]
    raw_lines = [line for line in lines if SECRET in line]
    # found on Envoy 1.40: at debug, Envoy prints the listener / http filter config, env values
    # included - {"env": ...} keeps the secret out of the plugin configuration, not out of this log
    assert raw_lines, "expected Envoy's debug config records to print vm_config.environment_variables"
    for line in raw_lines:
        assert "][debug][config]" in line and env_pair in line, line
        assert SECRET not in line.replace(env_pair, f'"{ENV_NAME}":"<elided>"'), line
    # (the Basic credential does appear in Envoy's own debug record of the callout's request
    # headers - Envoy's logging, not the filter's; it is never in a "wasm log" record)
