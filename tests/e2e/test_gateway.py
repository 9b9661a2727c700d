"""The egress-gateway pattern on real Envoy: the shipped envoy/egress-sidecar.yaml (no filter, no
secret) in front of the shipped envoy/egress-gateway.yaml (oauth2-cc and the credentials).

What a mesh operator relies on, each shown end to end through both Envoys:
* the upstream gets the gateway's token; a sidecar holds no filter and no secret;
* the application's own Authorization is overwritten by the gateway (kept with keep_existing);
* N sidecars x M requests cause one token request per gateway replica, not per sidecar;
* the gateway's failure reply (503 {"error":"token_unavailable"}) reaches the client unchanged.

The shipped files run as shipped except what a loopback test must change (shipped.localize):
ports chosen by the kernel, the wasm under test, clusters pointed at the loopback servers, and
the TLS origination to the partner and the IdP dropped (the test servers speak plain HTTP).
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import pytest

from conftest import check_wasm_file
from envoy import Envoy, request, wait_until
from shipped import ENVOY_DIR, cluster, load_yaml, localize, plugin_configuration, wasm_plugin_configs

# The shipped egress configurations load the wasm build.
pytestmark = pytest.mark.wasm_only

GATEWAY_YAML = ENVOY_DIR / "egress-gateway.yaml"
SIDECAR_YAML = ENVOY_DIR / "egress-sidecar.yaml"
PARTNER_HOST = "api.partner.example"
SECRET_ENV = "PARTNER_CLIENT_SECRET"
SECRET = "gateway-only-secret"
FAILURE_BODY = {"error": "token_unavailable", "profile": "partner"}


def _start(envoy_factory, bootstrap: dict, name: str, concurrency: int = 2) -> Envoy:
    """Start a bootstrap as one of this test's Envoys (stopped and checked by conftest)."""
    e = Envoy(json.dumps(bootstrap, indent=2), envoy_factory.tmp_path / name, concurrency=concurrency, name=name)
    e.allow_critical = False
    e.expect_running = True
    envoy_factory.envoys.append(e)
    e.start()
    e.wait_ready(60)
    return e


def _plain(bootstrap: dict, *names: str) -> dict:
    for name in names:
        cluster(bootstrap, name).pop("transport_socket", None)
    return bootstrap


def start_gateway(envoy_factory, token_server, upstream, name: str = "gateway", **inject) -> Envoy:
    """The shipped gateway; ``inject`` overrides the profile's ``inject`` settings."""
    b = localize(load_yaml(GATEWAY_YAML), wasm=check_wasm_file(),
                 clusters={"idp": ("127.0.0.1", token_server.port), "partner_api": ("127.0.0.1", upstream.port)})
    _plain(b, "idp", "partner_api")
    if inject:
        (plugin,) = wasm_plugin_configs(b)
        conf = plugin_configuration(plugin)
        conf["profiles"]["partner"]["inject"] = inject
        plugin["configuration"]["value"] = json.dumps(conf)
    return _start(envoy_factory, b, name)


def start_sidecar(envoy_factory, gateways: list[Envoy], name: str) -> Envoy:
    """The shipped sidecar, its egress_gateway cluster holding every gateway replica."""
    b = localize(load_yaml(SIDECAR_YAML), wasm="unused")
    c = cluster(b, "egress_gateway")
    c["type"] = "STATIC"
    c.pop("dns_lookup_family", None)
    c["load_assignment"]["endpoints"] = [{"lb_endpoints": [
        {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": g.port}}}}
        for g in gateways]}]
    return _start(envoy_factory, b, name, concurrency=1)


def call(sidecar: Envoy, path: str = "/v1/orders", headers: dict | None = None):
    return request(sidecar.port, path, headers, host=PARTNER_HOST)


@pytest.fixture
def gateway_env(monkeypatch):
    """The secret in the gateway's process environment (host_env_keys), as a Kubernetes Secret
    mounted as an env var puts it there. Sidecars started in the same test inherit it too, so
    "no secret in the sidecar" is checked on what the sidecar is configured with."""
    monkeypatch.setenv(SECRET_ENV, SECRET)


def test_sidecar_has_no_filter_and_no_secret():
    b = load_yaml(SIDECAR_YAML)
    text = SIDECAR_YAML.read_text()
    assert not wasm_plugin_configs(b), "the sidecar must not run oauth2-cc"
    assert "wasm" not in json.dumps(b), "no wasm anywhere in the sidecar's configuration"
    assert SECRET_ENV not in text and "client_secret" not in text
    gw = wasm_plugin_configs(load_yaml(GATEWAY_YAML))
    assert len(gw) == 1 and gw[0]["vm_config"]["environment_variables"] == {"host_env_keys": [SECRET_ENV]}


def test_upstream_gets_gateways_token_and_client_authorization_is_overwritten(
        envoy_factory, token_server, upstream, gateway_env):
    gateway = start_gateway(envoy_factory, token_server, upstream)
    sidecar = start_sidecar(envoy_factory, [gateway], "sidecar")
    r = call(sidecar, headers={"Authorization": "Bearer app-own-token"})
    assert r.status == 200, r.text
    seen = upstream.last()
    assert seen.header_values("authorization") == ["Bearer tok-1"], seen.header_list
    assert seen.header("host") == PARTNER_HOST
    r = call(sidecar)
    assert r.status == 200 and upstream.last().header_values("authorization") == ["Bearer tok-1"]
    # The gateway authenticated with the secret from its own environment.
    assert token_server.count() == 1
    assert token_server.last().basic_auth() == ("egress-gateway", SECRET)
    # The sidecar's configuration (what /config_dump shows) never holds the secret.
    assert SECRET not in sidecar.admin_get("/config_dump")[1]
    # The gateway is not an open proxy: another Host gets no token and no upstream.
    n = upstream.count()
    r = request(gateway.port, "/v1/orders", host="elsewhere.example")
    assert r.status == 404 and upstream.count() == n, (r.status, upstream.count())


def test_keep_existing_keeps_the_applications_authorization(envoy_factory, token_server, upstream, gateway_env):
    gateway = start_gateway(envoy_factory, token_server, upstream, keep_existing=True)
    sidecar = start_sidecar(envoy_factory, [gateway], "sidecar")
    r = call(sidecar, headers={"Authorization": "Bearer app-own-token"})
    assert r.status == 200, r.text
    assert upstream.last().header_values("authorization") == ["Bearer app-own-token"]
    r = call(sidecar)
    assert r.status == 200 and upstream.last().header_values("authorization") == ["Bearer tok-1"]


SIDECARS, REQUESTS_PER_SIDECAR, GATEWAYS = 3, 20, 2


def test_many_sidecars_one_token_request_per_gateway(envoy_factory, token_server, upstream, gateway_env):
    """3 sidecars x 20 concurrent requests each, through 2 gateway replicas: 2 token requests
    (each replica fetches its token once at start-up), none caused by the traffic."""
    gateways = [start_gateway(envoy_factory, token_server, upstream, name=f"gateway{i}") for i in range(GATEWAYS)]
    sidecars = [start_sidecar(envoy_factory, gateways, f"sidecar{i}") for i in range(SIDECARS)]
    assert token_server.wait_for_count(GATEWAYS, 10), f"start-up fetches: {token_server.count()}"

    def burst(sc: Envoy) -> list[int]:
        with ThreadPoolExecutor(max_workers=5) as ex:
            return [r.status for r in ex.map(lambda _: call(sc), range(REQUESTS_PER_SIDECAR))]

    with ThreadPoolExecutor(max_workers=SIDECARS) as ex:
        statuses = [s for batch in ex.map(burst, sidecars) for s in batch]
    total = SIDECARS * REQUESTS_PER_SIDECAR
    assert statuses == [200] * total, f"statuses: {sorted(set(statuses))}"
    auths = [a for a in upstream.authorizations()]
    assert len(auths) == total
    issued = {f"Bearer {t}" for t in token_server.issued_tokens()}
    assert set(auths) <= issued and len(set(auths)) == GATEWAYS, (set(auths), issued)
    assert token_server.count() == GATEWAYS, (
        f"{SIDECARS} sidecars x {REQUESTS_PER_SIDECAR} requests through {GATEWAYS} gateways: "
        f"{token_server.count()} token requests, expected {GATEWAYS}")
    for g in gateways:
        assert g.stat("wasmcustom.oauth2_cc.partner.fetch_ok") == 1, g.name
        # Round robin spreads the sidecars' calls over both replicas (injections flush on the tick).
        assert wait_until(lambda: g.stat("wasmcustom.oauth2_cc.partner.injected") > 0, 5), g.name
    for sc in sidecars:
        assert not [k for k in sc.stats() if "wasm" in k], f"{sc.name} runs wasm"


def test_gateway_failure_reply_reaches_the_client_unchanged(envoy_factory, token_server, upstream, gateway_env):
    token_server.set_response(401, {"error": "invalid_client", "error_description": "nope"})
    gateway = start_gateway(envoy_factory, token_server, upstream)
    sidecar = start_sidecar(envoy_factory, [gateway], "sidecar")
    assert token_server.wait_for_count(1, 10)
    direct = request(gateway.port, "/v1/orders", host=PARTNER_HOST)
    via = call(sidecar, headers={"Authorization": "Bearer app-own-token"})
    assert direct.status == 503 and direct.json() == FAILURE_BODY, (direct.status, direct.text)
    assert (via.status, via.body, via.headers.get("content-type")) == (
        direct.status, direct.body, direct.headers.get("content-type")), (via, direct)
    assert upstream.count() == 0, "no request may reach the partner without the gateway's token"
    assert gateway.stat("wasmcustom.oauth2_cc.partner.failed_requests") >= 2
