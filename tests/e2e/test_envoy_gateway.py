"""deploy/envoy-gateway/ without a cluster: every manifest against the real CRDs of the Envoy
Gateway versions it names (openAPIV3Schema and CEL rules, crd_check.py; the CRDs are vendored in
tests/fixtures/envoy-gateway), the cross-references between its objects, and what Envoy Gateway
renders from them run on real Envoy for both builds.

The rendering follows Envoy Gateway v1.9.0's translator (internal/xds/translator/wasm.go and
dynamicmodule.go, internal/gatewayapi/envoyextensionpolicy.go for the names; the EnvoyProxy's
``bootstrap`` of type Merge is a protobuf merge, internal/xds/bootstrap/util.go): the filter in
the connection manager, disabled, enabled on the policy's routes by an empty ``FilterConfig``.
Only the module's source differs: Envoy Gateway serves the wasm from its own server and fetches
a Remote module itself; here both are local files.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from conftest import check_native_file, check_wasm_file
from crd_check import Crd
from envoy import (DYNAMIC_MODULE_FILTER_TYPE, REPO_ROOT, STRING_VALUE_TYPE, WASM_FILTER_TYPE, Envoy,
                   bootstrap_dict, http_connection_manager, request, route, start_bootstrap, wait_until)
from shipped import DEPLOY_DIR, ENVOY_VERSION, load_yaml_docs, point_cluster, walk

EG_DIR = DEPLOY_DIR / "envoy-gateway"
CRD_DIR = REPO_ROOT / "tests" / "fixtures" / "envoy-gateway"
WASM_YAML = EG_DIR / "wasm.yaml"
NATIVE_YAML = EG_DIR / "dynamic-module.yaml"
# The Envoy Gateway versions each manifest names (its header and docs/deploy.md), with vendored CRDs.
NAMED_VERSIONS = {WASM_YAML: ("v1.6.7", "v1.9.0"), NATIVE_YAML: ("v1.9.0",)}
CONTROLLER_NAMESPACE = "envoy-gateway-system"  # where the default deploy mode runs the proxies
FILTER_CONFIG_TYPE = "type.googleapis.com/envoy.config.route.v3.FilterConfig"
SECRET = "eg-partner-secret"


def rel(p: Path) -> str:
    return str(p.relative_to(REPO_ROOT))


def crds(version: str) -> dict[str, Crd]:
    out = {}
    for path in sorted((CRD_DIR / version).glob("*.yaml.gz")):
        crd = Crd.load(path)
        out[crd.kind] = crd
    return out


CRDS = {v: crds(v) for v in sorted({v for vs in NAMED_VERSIONS.values() for v in vs} | {"v1.6.7"})}


def docs(path: Path) -> list[dict]:
    return load_yaml_docs(path)


def only(path: Path, kind: str) -> dict:
    (doc,) = [d for d in docs(path) if d["kind"] == kind]
    return doc


# --------------------------------------------------------------------------- #
# Against the CRDs
# --------------------------------------------------------------------------- #

CASES = [(path, v) for path, versions in NAMED_VERSIONS.items() for v in versions]


@pytest.mark.parametrize("path,version", CASES, ids=[f"{p.name}-{v}" for p, v in CASES])
def test_manifest_matches_the_crds_of_the_versions_it_names(path, version):
    evaluated = 0
    for doc in docs(path):
        report = CRDS[version][doc["kind"]].check(doc)
        assert not report.errors, f"{rel(path)} {doc['kind']} against Envoy Gateway {version}:\n" + "\n".join(report.errors)
        # Every CEL rule on the way to a field the manifest sets ran: none needed a function
        # celpy lacks (crd_check supplies the Kubernetes string functions the CRDs call).
        assert not report.not_evaluated, report.not_evaluated
        evaluated += len(report.evaluated)
    print(f"{rel(path)} on Envoy Gateway {version}: {evaluated} CEL rules evaluated, all true")
    assert evaluated > 10


def test_dynamic_modules_are_unknown_to_envoy_gateway_1_6():
    """Why dynamic-module.yaml names 1.9 only: 1.6 has neither EnvoyProxy.dynamicModules nor
    EnvoyExtensionPolicy.dynamicModule, and strict field validation refuses both."""
    errors = [e for d in docs(NATIVE_YAML) for e in CRDS["v1.6.7"][d["kind"]].check(d).errors]
    assert any("'dynamicModules' was unexpected" in e for e in errors), errors
    assert any("'dynamicModule' was unexpected" in e for e in errors), errors


def _broken(path: Path, kind: str, change) -> dict:
    doc = copy.deepcopy(only(path, kind))
    change(doc["spec"])
    return doc


BROKEN = {
    # CEL (EnvoyExtensionPolicySpec): exactly one of targetRef and targetRefs
    "targetRef and targetRefs": (WASM_YAML, "EnvoyExtensionPolicy",
                                 lambda s: s.update(targetRef=s["targetRefs"][0]), "either targetRef or targetRefs"),
    # CEL (WasmCodeSource): the source a type names must be set
    "wasm code type HTTP without http": (WASM_YAML, "EnvoyExtensionPolicy",
                                         lambda s: s["wasm"][0]["code"].update(type="HTTP"), "http"),
    # CEL (ProxyBootstrap): Merge takes a value, not JSON patches
    "bootstrap Merge without value": (WASM_YAML, "EnvoyProxy",
                                      lambda s: s["bootstrap"].pop("value"), "bootstrap"),
    # CEL (DynamicModuleSource), with the schema default type: Local
    "dynamic module Local without local": (NATIVE_YAML, "EnvoyProxy",
                                           lambda s: s["dynamicModules"][0].update(source={}), "local"),
    # schema: a misspelt field
    "misspelt field": (WASM_YAML, "EnvoyExtensionPolicy",
                       lambda s: s["wasm"][0].update(failopen=False), "'failopen' was unexpected"),
    # schema: the sha256 pattern
    "short sha256": (NATIVE_YAML, "EnvoyProxy",
                     lambda s: s["dynamicModules"][0]["source"]["remote"].update(sha256="abc"), "sha256"),
}


@pytest.mark.parametrize("case", list(BROKEN), ids=list(BROKEN))
def test_the_crd_check_refuses_what_the_api_server_refuses(case):
    path, kind, change, expect = BROKEN[case]
    report = CRDS["v1.9.0"][kind].check(_broken(path, kind, change))
    assert any(expect.lower() in e.lower() for e in report.errors), (case, report.errors)


def test_every_cel_rule_of_the_vendored_crds_compiles():
    """celpy parses every rule the vendored CRDs carry; the ones that cannot run on create are
    the transition rules (oldSelf), listed here."""
    import celpy

    rules = {(v, r["rule"]) for v, by_kind in CRDS.items() for crd in by_kind.values()
             for _, k, val in walk(crd.schemas) if k == "x-kubernetes-validations" for r in val}
    env = celpy.Environment()
    for _, rule in rules:
        env.compile(rule)
    transition = sorted({r for _, r in rules if "oldSelf" in r})
    print(f"{len(rules)} rules (version, text) compiled; transition rules (not run on create): {transition}")
    assert len(rules) > 100


# --------------------------------------------------------------------------- #
# Between the objects
# --------------------------------------------------------------------------- #

MANIFESTS = [WASM_YAML, NATIVE_YAML]


def env_refs(config: Any) -> set[str]:
    return {v["env"] for _, _, v in walk(config) if isinstance(v, dict) and set(v) == {"env"}}


def bootstrap_merge(path: Path) -> dict:
    proxy = only(path, "EnvoyProxy")
    assert proxy["spec"]["bootstrap"]["type"] == "Merge"
    return yaml.safe_load(proxy["spec"]["bootstrap"]["value"])


def plugin_configs(path: Path) -> list[dict]:
    spec = only(path, "EnvoyExtensionPolicy")["spec"]
    return [e["config"] for e in spec.get("wasm", []) + spec.get("dynamicModule", [])]


@pytest.mark.parametrize("path", MANIFESTS, ids=[p.name for p in MANIFESTS])
def test_objects_reference_each_other(path):
    gateway, proxy = only(path, "Gateway"), only(path, "EnvoyProxy")
    route_, policy = only(path, "HTTPRoute"), only(path, "EnvoyExtensionPolicy")
    ns = gateway["metadata"]["namespace"]
    # A Gateway's parametersRef is local: the EnvoyProxy must be in the Gateway's namespace.
    assert gateway["spec"]["infrastructure"]["parametersRef"] == {
        "group": "gateway.envoyproxy.io", "kind": "EnvoyProxy", "name": proxy["metadata"]["name"]}
    assert proxy["metadata"]["namespace"] == ns
    assert [p["name"] for p in route_["spec"]["parentRefs"]] == [gateway["metadata"]["name"]]
    assert policy["metadata"]["namespace"] == route_["metadata"]["namespace"] == ns
    assert policy["spec"]["targetRefs"] == [
        {"group": "gateway.networking.k8s.io", "kind": "HTTPRoute", "name": route_["metadata"]["name"]}]
    # The clusters the profiles name are the bootstrap's, and verify the IdP.
    clusters = {c["name"]: c for c in bootstrap_merge(path)["static_resources"]["clusters"]}
    for config in plugin_configs(path):
        for name, profile in config["profiles"].items():
            assert profile["cluster"] in clusters, f"profile {name}: no bootstrap cluster {profile['cluster']}"
            tls = clusters[profile["cluster"]]["transport_socket"]["typed_config"]["common_tls_context"]
            assert tls["validation_context"]["trusted_ca"], "the IdP must be verified"
    for w in policy["spec"].get("wasm", []):
        assert w["failOpen"] is False, "failOpen must be false, written out"
        assert set(w["env"]["hostKeys"]) >= env_refs(w["config"])
    for dm in policy["spec"].get("dynamicModule", []):
        assert dm["name"] in {m["name"] for m in proxy["spec"]["dynamicModules"]}, "not in the allowlist"


@pytest.mark.parametrize("path", MANIFESTS, ids=[p.name for p in MANIFESTS])
def test_secrets_reach_the_envoy_container_in_either_deploy_mode(path):
    """The secret is a secretKeyRef in the Envoy container's env, which resolves in the proxy
    pod's namespace: envoy-gateway-system in the default deploy mode (the proxies run in the
    controller's namespace, internal/infrastructure/kubernetes/proxy_infra.go GetResourceNamespace),
    the Gateway's namespace in gateway-namespace mode. The header must say both."""
    container = only(path, "EnvoyProxy")["spec"]["provider"]["kubernetes"]["envoyDeployment"]["container"]
    env = {e["name"]: e for e in container["env"]}
    needed = set().union(*(env_refs(c) for c in plugin_configs(path)))
    assert needed and needed <= set(env), (needed, set(env))
    header = path.read_text().split("\napiVersion:", 1)[0]
    gateway_ns = only(path, "Gateway")["metadata"]["namespace"]
    for name in needed:
        ref = env[name]["valueFrom"]["secretKeyRef"]
        assert "value" not in env[name]
        for ns in (CONTROLLER_NAMESPACE, gateway_ns):
            assert f"kubectl -n {ns} create secret generic {ref['name']} --from-literal={ref['key']}=" in header, \
                f"{rel(path)} must say to create Secret {ref['name']} in {ns}"


def test_dynamic_module_runs_on_an_envoy_it_was_built_for():
    """The module loads in the Envoy minor it was built for and the next; Envoy Gateway 1.9 ships
    Envoy 1.39, so the EnvoyProxy pins the proxy image."""
    container = only(NATIVE_YAML, "EnvoyProxy")["spec"]["provider"]["kubernetes"]["envoyDeployment"]["container"]
    m = re.fullmatch(r"docker\.io/envoyproxy/envoy:distroless-v(\d+)\.(\d+)\.\d+", container["image"])
    assert m, container["image"]
    built = tuple(int(x) for x in ENVOY_VERSION.split(".")[:2])
    assert (int(m[1]), int(m[2])) in (built, (built[0], built[1] + 1)), (container["image"], ENVOY_VERSION)


# --------------------------------------------------------------------------- #
# What Envoy Gateway renders, on real Envoy
# --------------------------------------------------------------------------- #


def policy_config_name(policy: dict) -> str:
    return f"envoyextensionpolicy/{policy['metadata']['namespace']}/{policy['metadata']['name']}"


def rendered_filter(path: Path, code_file: str) -> dict:
    """The connection manager's filter Envoy Gateway makes from the policy's first extension."""
    policy = only(path, "EnvoyExtensionPolicy")
    if "wasm" in policy["spec"]:
        w = policy["spec"]["wasm"][0]
        name = f"{policy_config_name(policy)}/wasm/0"
        vm = {"vm_id": name, "runtime": "envoy.wasm.runtime.v8", "code": {"local": {"filename": code_file}},
              "environment_variables": {"host_env_keys": w["env"]["hostKeys"]}}
        config = {"name": w.get("name", name), "root_id": w["rootID"], "vm_config": vm, "fail_open": w["failOpen"],
                  "configuration": {"@type": STRING_VALUE_TYPE, "value": json.dumps(w["config"])}}
        return {"name": f"envoy.filters.http.wasm/{name}", "disabled": True,
                "typed_config": {"@type": WASM_FILTER_TYPE, "config": config}}
    dm = policy["spec"]["dynamicModule"][0]
    (entry,) = [m for m in only(path, "EnvoyProxy")["spec"]["dynamicModules"] if m["name"] == dm["name"]]
    name = f"{policy_config_name(policy)}/dynamic-module/0"
    return {"name": f"envoy.filters.http.dynamic_modules/{name}", "disabled": True, "typed_config": {
        "@type": DYNAMIC_MODULE_FILTER_TYPE,
        "dynamic_module_config": {"do_not_close": entry.get("doNotClose", False),
                                  "load_globally": entry.get("loadGlobally", False),
                                  "module": {"local": {"filename": code_file}}},
        "filter_name": dm.get("filterName", ""),
        "filter_config": {"@type": STRING_VALUE_TYPE, "value": json.dumps(dm["config"])}}}


def proto_merge(dst: Any, src: Any) -> Any:
    """protobuf Merge on the YAML form: messages merged field by field, repeated fields appended."""
    if isinstance(dst, dict) and isinstance(src, dict):
        for k, v in src.items():
            dst[k] = proto_merge(dst[k], v) if k in dst else copy.deepcopy(v)
        return dst
    if isinstance(dst, list) and isinstance(src, list):
        return dst + copy.deepcopy(src)
    return copy.deepcopy(src)


def rendered_bootstrap(path: Path, code_file: str, upstream_port: int) -> dict:
    flt = rendered_filter(path, code_file)
    r = route("/", "upstream")
    r["typed_per_filter_config"] = {flt["name"]: {"@type": FILTER_CONFIG_TYPE, "config": {}}}
    b = bootstrap_dict(None, wasm=False, listener_port=0, admin_port=0, upstream_port=upstream_port, routes=[r])
    http_connection_manager(b)["http_filters"].insert(0, flt)
    return proto_merge(b, bootstrap_merge(path))


@pytest.fixture
def manifest(filter_host) -> Path:
    return WASM_YAML if filter_host == "wasm" else NATIVE_YAML


def test_rendered_configuration_validates(envoy_factory, filter_host, manifest, upstream, tmp_path):
    """The whole merge (the token cluster with TLS to idp.example.com through the system roots,
    the stats tags) and the filter with the policy's configuration: Envoy accepts them."""
    code = check_wasm_file() if filter_host == "wasm" else check_native_file()
    b = rendered_bootstrap(manifest, code, upstream.port)
    e = Envoy(json.dumps(b, indent=2), tmp_path, name="eg-validate", env={"PARTNER_CLIENT_SECRET": "validate-dummy"})
    rc, out = e.validate()
    assert rc == 0, f"Envoy refused what Envoy Gateway renders from {rel(manifest)}:\n{out[-4000:]}"


def test_rendered_configuration_injects_and_labels_metrics(envoy_factory, filter_host, manifest, token_server,
                                                           upstream, monkeypatch):
    """On real Envoy: the route the policy targets gets the token, and the EnvoyProxy's stats tags
    turn the profile and the reason into labels under the build's metric names."""
    monkeypatch.setenv("PARTNER_CLIENT_SECRET", SECRET)
    code = check_wasm_file() if filter_host == "wasm" else check_native_file()
    b = rendered_bootstrap(manifest, code, upstream.port)
    (idp,) = [c for c in b["static_resources"]["clusters"] if c["name"] == "oauth2_cc_idp"]
    point_cluster(idp, "127.0.0.1", token_server.port).pop("transport_socket")
    e = start_bootstrap(envoy_factory, b, f"eg-{filter_host}")
    r = request(e.port, "/v1/x")
    assert r.status == 200, r.text
    assert r.json()["headers"]["authorization"] == "Bearer tok-1"
    assert token_server.last().basic_auth() == ("gateway", SECRET)
    prefix = e.prometheus_prefix
    assert wait_until(lambda: f'{prefix}oauth2_cc_fetch_ok{{oauth2_cc_profile="partner"}} 1' in e.prometheus(), 5), \
        [line for line in e.prometheus().splitlines() if "oauth2_cc" in line]
    text = e.prometheus()
    assert f'{prefix}oauth2_cc_fetch_failed{{oauth2_cc_reason="invalid_client",oauth2_cc_profile="partner"}} 0' in text, \
        [line for line in text.splitlines() if "fetch_failed" in line]
