"""Zero cost where no token is needed: the filter `disabled: true` on the HTTP connection manager
and enabled per route with `typed_per_filter_config` (envoy.config.route.v3.FilterConfig with an
empty `config`). On a route that does not enable it, Envoy leaves the filter out of the request's
filter chain: no token, no counter moves, and Envoy's own trace of the chain (`decode headers
called: filter=<name>`) never names it. On a route that enables it, the token is injected.

The filter block comes from ``oauth2_cc_filter`` only, so a dynamic-module variant of these tests
needs a second branch there and in ``injected_stat``, nothing else.
"""

from __future__ import annotations

import json
import re
from typing import Any, Mapping

import plugin_config as pc
from conftest import check_wasm_file
from envoy import Envoy, route, wait_until, wasm_filter
from shipped import ENVOY_DIR, load_yaml, localize

FILTER_NAME = "oauth2_cc"  # the http_filters entry's name: typed_per_filter_config is keyed by it
FILTER_CONFIG_TYPE = "type.googleapis.com/envoy.config.route.v3.FilterConfig"


def oauth2_cc_filter(plugin_config: Mapping[str, Any], *, disabled: bool = True,
                     env: Mapping[str, str] | None = None) -> dict:
    """The oauth2-cc http_filters entry named FILTER_NAME, off on the HCM unless ``disabled`` is
    False. The one place that builds the filter block (today: the proxy-wasm build)."""
    f = wasm_filter(plugin_config, env=env, wasm_file=check_wasm_file(), reload_base_interval="1s")
    f["name"] = FILTER_NAME
    if disabled:
        f["disabled"] = True
    return f


def injected_stat(profile: str = "default") -> str:
    """The filter's `injected` counter for ``profile`` as Envoy's /stats names it."""
    return f"wasmcustom.oauth2_cc.{profile}.injected"


def enabled_here() -> dict:
    """typed_per_filter_config that enables the filter on one route. Envoy 1.40 refuses a
    FilterConfig with neither `config` nor `disabled: true`; an empty `config` means "enabled"."""
    return {FILTER_NAME: {"@type": FILTER_CONFIG_TYPE, "config": {}}}


def chain_by_path(e: Envoy) -> dict[str, list[set[str]]]:
    """From Envoy's `http` trace: request path -> the filters the filter manager called, one set
    per stream."""
    path_of: dict[str, str] = {}
    called: dict[str, set[str]] = {}
    for rec in e.log_records():
        sid = re.search(r'"StreamId":"(\d+)"', rec)
        if not sid:
            continue
        if "request headers complete" in rec:
            p = re.search(r"':path', '([^']*)'", rec)
            if p:
                path_of[sid.group(1)] = p.group(1)
        m = re.search(r"(?:decode|encode) headers called: filter=(\S*)", rec)
        if m:
            called.setdefault(sid.group(1), set()).add(m.group(1))
    out: dict[str, list[set[str]]] = {}
    for sid, path in path_of.items():
        out.setdefault(path, []).append(called.get(sid, set()))
    return out


def traced(e: Envoy, *paths: str) -> dict[str, list[set[str]]]:
    """chain_by_path once the trace shows every one of ``paths`` (Envoy writes it as it goes)."""

    def ready():
        c = chain_by_path(e)
        return c if all(c.get(p) for p in paths) else None

    return wait_until(ready, timeout=10) or chain_by_path(e)


def start_per_route(envoy_factory, config: dict):
    routes = [route("/api/", name="api"), route("/", name="open")]
    routes[0]["typed_per_filter_config"] = enabled_here()
    return envoy_factory.start(pc.sample(), wasm=False, routes=routes,
                               extra_http_filters=[oauth2_cc_filter(config)],
                               component_log_level="http:trace")


def test_route_without_the_enable_never_runs_the_filter(envoy_factory, token_server, upstream):
    # The plugin's own route table would inject on every path: only Envoy keeps it off /open/.
    e = start_per_route(envoy_factory, pc.sample())
    r = e.request("/api/x")
    assert r.status == 200, r.text
    assert r.json()["headers"].get("authorization") == "Bearer tok-1", r.json()["headers"]
    before = wait_until(lambda: e.stat(injected_stat()), timeout=5)
    assert before == 1, f"injected after one /api/ request: {before}"

    for i in range(5):
        r = e.request(f"/open/{i}", headers={"x-n": str(i)})
        assert r.status == 200, r.text
        assert "authorization" not in r.json()["headers"], f"/open/{i} got a token: {r.json()['headers']}"
    r = e.request("/api/y")  # a last enabled request: its trace lines come after the others'
    assert r.json()["headers"].get("authorization") == "Bearer tok-1"

    chains = traced(e, "/api/y", "/open/4")
    assert chains, f"no http trace of the requests:\n{e.log_tail(40)}"
    open_chains = [chains.get(f"/open/{i}") for i in range(5)]
    assert all(c and all(FILTER_NAME not in s for s in c) for c in open_chains), \
        f"Envoy called {FILTER_NAME} on a route that does not enable it: {open_chains}"
    assert all(c and any("envoy.filters.http.router" in s for s in c) for c in open_chains), open_chains
    # The control: the same trace does name the filter where it is enabled.
    assert all(FILTER_NAME in s for s in chains["/api/x"] + chains["/api/y"]), chains
    after = wait_until(lambda: (v := e.stat(injected_stat())) >= 2 and v, timeout=5)
    assert after == 2, f"injected counter {after} after 2 enabled and 5 not-enabled requests"
    assert token_server.count() == 1, token_server.count()
    assert len(upstream.requests) == 7


def test_shipped_per_route_config(envoy_factory, token_server, upstream, tmp_path):
    """envoy/per-route.yaml as shipped (ports, wasm and clusters pointed at this test's servers):
    /api/ gets the token, every other path none, and Envoy never calls the filter for them."""
    b = localize(load_yaml(ENVOY_DIR / "per-route.yaml"), wasm=check_wasm_file(),
                 clusters={"demo_idp": ("127.0.0.1", token_server.port), "upstream": ("127.0.0.1", upstream.port)})
    e = Envoy(json.dumps(b), tmp_path / "per-route", concurrency=2, name="per-route",
              component_log_level="http:trace")
    e.allow_critical = False
    e.expect_running = True
    envoy_factory.envoys.append(e)
    e.start()
    e.wait_ready(30)
    r = e.request("/api/orders")
    assert r.status == 200 and r.json()["headers"].get("authorization") == "Bearer tok-1", r.text
    r = e.request("/public/x")
    assert r.status == 200 and "authorization" not in r.json()["headers"], r.text
    assert token_server.last().basic_auth() == ("demo-client", "demo-secret")
    chains = traced(e, "/api/orders", "/public/x")
    assert chains and all(FILTER_NAME not in s for s in chains["/public/x"]), chains
    assert all(FILTER_NAME in s for s in chains["/api/orders"]), chains
    injected = wait_until(lambda: e.stat(injected_stat("demo")), timeout=5)
    assert injected == 1, f"injected counter {injected} after one /api/ and one /public/ request"
