"""deploy/istio/egress-gateway/: the Istio form of the egress-gateway pattern that
test_gateway.py runs on plain Envoy. No Kubernetes here: the manifests' kinds, fields and
cross-references are checked (the way test_shipped_configs.py checks deploy/istio/), the
pluginConfig goes through the schema and through the filter on real Envoy, and the stats tags
are the ones deploy/observability/ was written against."""

from __future__ import annotations

import json
import re

from envoy import REPO_ROOT
from shipped import DEPLOY_DIR, load_yaml, load_yaml_docs
from test_shipped_configs import WASMPLUGIN_SPEC_FIELDS, env_refs
from test_gateway import GATEWAY_YAML

EGRESS_DIR = DEPLOY_DIR / "istio" / "egress-gateway"
NETWORKING = EGRESS_DIR / "egress-gateway.yaml"
DEPLOYMENT = EGRESS_DIR / "gateway-deployment.yaml"
PARTNER = "api.partner.example"
API_VERSIONS = {
    "ServiceEntry": "networking.istio.io/v1", "Gateway": "networking.istio.io/v1",
    "DestinationRule": "networking.istio.io/v1", "VirtualService": "networking.istio.io/v1",
    "AuthorizationPolicy": "security.istio.io/v1", "WasmPlugin": "extensions.istio.io/v1alpha1",
    "Namespace": "v1", "ServiceAccount": "v1", "ConfigMap": "v1", "Service": "v1", "Deployment": "apps/v1",
}


def docs() -> list[dict]:
    return [d for p in (NETWORKING, DEPLOYMENT) for d in load_yaml_docs(p)]


def of_kind(kind: str) -> list[dict]:
    return [d for d in docs() if d["kind"] == kind]


def one(kind: str) -> dict:
    (d,) = of_kind(kind)
    return d


def gateway_pod_labels() -> dict:
    return one("Deployment")["spec"]["template"]["metadata"]["labels"]


def service_host() -> str:
    svc = one("Service")
    return f"{svc['metadata']['name']}.{svc['metadata']['namespace']}.svc.cluster.local"


def test_kinds_api_versions_and_namespace():
    kinds = [d["kind"] for d in docs()]
    assert {"Gateway", "VirtualService", "DestinationRule", "ServiceEntry", "WasmPlugin",
            "AuthorizationPolicy", "Deployment", "Service"} <= set(kinds), kinds
    ns = one("Namespace")["metadata"]["name"]
    for d in docs():
        assert d["apiVersion"] == API_VERSIONS[d["kind"]], (d["kind"], d["apiVersion"])
        if d["kind"] != "Namespace":
            assert d["metadata"]["namespace"] == ns, (d["kind"], d["metadata"])


def test_wasmplugin_runs_on_the_egress_gateway_only():
    wp = one("WasmPlugin")
    spec = wp["spec"]
    assert set(spec) <= WASMPLUGIN_SPEC_FIELDS, set(spec) - WASMPLUGIN_SPEC_FIELDS
    assert spec["failStrategy"] == "FAIL_RELOAD"
    assert spec["type"] == "HTTP" and spec["phase"] == "STATS" and spec["url"].startswith("oci://")
    selector = spec["selector"]["matchLabels"]
    assert selector.items() <= gateway_pod_labels().items(), "the plugin must select the gateway's pods"
    assert selector == one("Gateway")["spec"]["selector"], "plugin and Gateway select the same pods"
    # Istio classes gateway listeners as CLIENT (pilot/pkg/model/extensions.go).
    assert [m.get("mode") for m in spec.get("match", [])] in ([], ["CLIENT"], ["CLIENT_AND_SERVER"])
    assert all(r["match"].get("authority") == PARTNER for r in spec["pluginConfig"]["routes"])


def test_secret_reaches_only_the_gateway_from_a_kubernetes_secret():
    spec = one("WasmPlugin")["spec"]
    host_vars = {e["name"] for e in spec["vmConfig"]["env"] if e.get("valueFrom") == "HOST"}
    assert env_refs(spec["pluginConfig"]) and env_refs(spec["pluginConfig"]) <= host_vars
    assert all("value" not in e for e in spec["vmConfig"]["env"])
    pod = one("Deployment")["spec"]["template"]
    assert pod["metadata"]["annotations"]["inject.istio.io/templates"] == "gateway"
    (proxy,) = [c for c in pod["spec"]["containers"] if c["name"] == "istio-proxy"]
    assert proxy["image"] == "auto"
    env = {e["name"]: e for e in proxy["env"]}
    for name in host_vars:
        assert "secretKeyRef" in env[name]["valueFrom"] and "value" not in env[name], env.get(name)
    assert not of_kind("Secret"), "never commit the secret: create it out of band"


def test_token_cluster_is_a_gateway_only_service_entry_with_tls_origination():
    for name, profile in one("WasmPlugin")["spec"]["pluginConfig"]["profiles"].items():
        m = re.fullmatch(r"outbound\|(\d+)\|\|(.+)", profile["cluster"])
        assert m, profile["cluster"]
        port, host = int(m.group(1)), m.group(2)
        assert profile["token_url"].startswith(f"https://{host}/")
        (se,) = [s for s in of_kind("ServiceEntry") if host in s["spec"]["hosts"]]
        assert se["spec"].get("exportTo") == ["."], "sidecars must not get the IdP's cluster"
        assert any(p["number"] == port for p in se["spec"]["ports"])
        _tls_origination(host, port)


def _tls_origination(host: str, port: int):
    (dr,) = [d for d in of_kind("DestinationRule") if d["spec"]["host"] == host]
    (tls,) = [p["tls"] for p in dr["spec"]["trafficPolicy"]["portLevelSettings"] if p["port"]["number"] == port]
    assert tls["mode"] == "SIMPLE" and tls["sni"] == host and host in tls["subjectAltNames"], tls
    assert not tls.get("insecureSkipVerify")


def test_mesh_routes_partner_calls_through_the_gateway_with_mutual_tls():
    gw = one("Gateway")
    (server,) = gw["spec"]["servers"]
    assert PARTNER in server["hosts"] and server["tls"]["mode"] == "ISTIO_MUTUAL"
    svc_ports = {p["port"] for p in one("Service")["spec"]["ports"]}
    assert server["port"]["number"] in svc_ports
    (vs,) = [v for v in of_kind("VirtualService") if PARTNER in v["spec"]["hosts"]]
    assert set(vs["spec"]["gateways"]) == {"mesh", gw["metadata"]["name"]}
    routes = {m["gateways"][0]: (m, r["route"]) for r in vs["spec"]["http"] for m in r["match"]}
    mesh_match, (to_gw,) = routes["mesh"]
    assert mesh_match["port"] == 80 and to_gw["destination"]["host"] == service_host()
    assert to_gw["destination"]["port"]["number"] == server["port"]["number"]
    (dr,) = [d for d in of_kind("DestinationRule") if d["spec"]["host"] == service_host()]
    (subset,) = [s for s in dr["spec"]["subsets"] if s["name"] == to_gw["destination"]["subset"]]
    (tls,) = [p["tls"] for p in subset["trafficPolicy"]["portLevelSettings"]]
    assert tls == {"mode": "ISTIO_MUTUAL", "sni": PARTNER}
    gw_match, (to_partner,) = routes[gw["metadata"]["name"]]
    assert gw_match["port"] == server["port"]["number"]
    assert to_partner["destination"] == {"host": PARTNER, "port": {"number": 443}}
    (se,) = [s for s in of_kind("ServiceEntry") if PARTNER in s["spec"]["hosts"]]
    assert {p["number"] for p in se["spec"]["ports"]} == {80, 443}
    _tls_origination(PARTNER, 443)


def test_only_allowed_callers_reach_the_gateway():
    ap = one("AuthorizationPolicy")
    assert ap["spec"]["selector"]["matchLabels"] == one("WasmPlugin")["spec"]["selector"]["matchLabels"]
    assert ap["spec"]["action"] == "ALLOW"
    for rule in ap["spec"]["rules"]:
        assert all(s["source"].get("namespaces") or s["source"].get("principals") for s in rule["from"])
        assert all(PARTNER in op["operation"]["hosts"] for op in rule["to"])


def test_stats_tags_match_the_ones_observability_expects():
    cm = one("ConfigMap")
    pod = one("Deployment")["spec"]["template"]["spec"]
    (proxy,) = [c for c in pod["containers"] if c["name"] == "istio-proxy"]
    env = {e["name"]: e.get("value") for e in proxy["env"]}
    (mount,) = proxy["volumeMounts"]
    (vol,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    assert vol["configMap"]["name"] == cm["metadata"]["name"]
    (key,) = cm["data"]
    assert env["ISTIO_BOOTSTRAP_OVERRIDE"] == f"{mount['mountPath']}/{key}"
    tags = json.loads(cm["data"][key])["stats_config"]["stats_tags"]
    assert tags == load_yaml(GATEWAY_YAML)["stats_config"]["stats_tags"]


def test_plugin_config_matches_schema_and_is_accepted_by_the_filter(envoy_factory):
    from jsonschema import Draft202012Validator

    config = json.loads(json.dumps(one("WasmPlugin")["spec"]["pluginConfig"]))
    schema = json.loads((REPO_ROOT / "schema" / "oauth2-cc.schema.json").read_text())
    errors = [e.message for e in Draft202012Validator(schema).iter_errors(config)]
    assert not errors, errors
    rc, out = envoy_factory.validate(config, env={"PARTNER_CLIENT_SECRET": "validate-dummy"},
                                     token_clusters={"outbound|443||idp.example.com": envoy_factory.token_server})
    assert rc == 0, f"the filter or Envoy refused the egress gateway's pluginConfig:\n{out[-4000:]}"
