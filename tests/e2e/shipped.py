"""Helpers to load the configurations the repository ships (envoy/*.yaml, deploy/**) and to
turn a shipped Envoy bootstrap into one that runs in a test: kernel-chosen ports, the wasm
under test, certificates made at test time, token clusters pointed at loopback servers.

Used by test_shipped_configs.py and test_mtls.py. Needs PyYAML.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import yaml

from envoy import DYNAMIC_MODULE_FILTER_TYPE, REPO_ROOT, STRING_VALUE_TYPE, WASM_FILTER_TYPE

ENVOY_DIR = REPO_ROOT / "envoy"
DEPLOY_DIR = REPO_ROOT / "deploy"
SCHEMA_PATH = REPO_ROOT / "schema" / "oauth2-cc.schema.json"
CERTS_PREFIX = "envoy/certs/"  # how envoy/mtls.yaml refers to its certificates



def _makefile_var(name: str) -> str:
    m = re.search(rf"^{name}\s*:=\s*(\S+)", (REPO_ROOT / "Makefile").read_text(), re.M)
    if not m:
        raise LookupError(f"{name} not set in the Makefile")
    return m.group(1)


# The wasm `make build` ships (wasm-opt output); envoy/*.yaml refer to it relative to the repo root.
SHIPPED_WASM = _makefile_var("WASM")
SHIPPED_NATIVE = _makefile_var("NATIVE")
ENVOY_VERSION = _makefile_var("ENVOY_VERSION")


def shipped_envoy_configs() -> list[Path]:
    """envoy/*.yaml that load the proxy-wasm build."""
    return [p for p in sorted(ENVOY_DIR.glob("*.yaml")) if DYNAMIC_MODULE_FILTER_TYPE not in p.read_text()]


def shipped_native_configs() -> list[Path]:
    """envoy/*.yaml that load the dynamic-module build."""
    return [p for p in sorted(ENVOY_DIR.glob("*.yaml")) if DYNAMIC_MODULE_FILTER_TYPE in p.read_text()]


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def load_yaml_docs(path: Path) -> list[Any]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def walk(obj: Any) -> Iterator[tuple[Any, Any, Any]]:
    """Every (container, key, value) below obj, depth first."""
    if isinstance(obj, dict):
        for k, v in list(obj.items()):
            yield obj, k, v
            yield from walk(v)
    elif isinstance(obj, list):
        for i, v in enumerate(list(obj)):
            yield obj, i, v
            yield from walk(v)


def wasm_plugin_configs(bootstrap: Mapping[str, Any]) -> list[dict]:
    """The ``config`` (PluginConfig) of every envoy.filters.http.wasm filter in a bootstrap."""
    out = []
    for _, _, v in walk(bootstrap):
        if isinstance(v, dict) and v.get("@type") == WASM_FILTER_TYPE and isinstance(v.get("config"), dict):
            out.append(v["config"])
    return out


def dynamic_module_configs(bootstrap: Mapping[str, Any]) -> list[dict]:
    """Every ``DynamicModuleConfig`` (``dynamic_module_config``) in a bootstrap: the filter's and
    those of its per-route configurations."""
    return [v for _, k, v in walk(bootstrap) if k == "dynamic_module_config" and isinstance(v, dict)]


def plugin_configuration(plugin: Mapping[str, Any]) -> Any:
    """The oauth2-cc JSON of a PluginConfig (configuration is a StringValue)."""
    conf = plugin["configuration"]
    assert conf.get("@type") == STRING_VALUE_TYPE, f"configuration is not a StringValue: {conf.get('@type')}"
    return json.loads(conf["value"])


def cluster(bootstrap: Mapping[str, Any], name: str) -> dict:
    for c in bootstrap["static_resources"]["clusters"]:
        if c["name"] == name:
            return c
    raise KeyError(name)


def rewrite_filenames(obj: Any, fn: Callable[[str], str]) -> Any:
    """Apply fn to every ``filename`` string (DataSource) in obj, in place; returns obj."""
    for container, key, value in walk(obj):
        if key == "filename" and isinstance(value, str):
            container[key] = fn(value)
    return obj


def point_cluster(c: dict, host: str, port: int) -> dict:
    """Make a cluster STATIC with one endpoint host:port (keeps its TLS settings)."""
    c["type"] = "STATIC"
    c.pop("dns_lookup_family", None)
    c["load_assignment"] = {
        "cluster_name": c["name"],
        "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {
            "socket_address": {"address": host, "port_value": int(port)}}}}]}],
    }
    return c


def localize(
    bootstrap: Mapping[str, Any],
    *,
    wasm: str,
    certs_dir: Path | None = None,
    clusters: Mapping[str, tuple[str, int]] | None = None,
    listener_port: int = 0,
    admin_port: int = 0,
    listener_address: str = "127.0.0.1",
) -> dict:
    """A copy of a shipped bootstrap that runs here: listener and admin on 127.0.0.1 and
    kernel-chosen ports (0), the wasm path replaced, ``envoy/certs/...`` files taken from
    certs_dir, and the named clusters pointed at (host, port)."""
    b = copy.deepcopy(dict(bootstrap))
    b["admin"]["address"] = {"socket_address": {"address": "127.0.0.1", "port_value": admin_port}}
    for listener in b["static_resources"]["listeners"]:
        listener["address"] = {"socket_address": {"address": listener_address, "port_value": listener_port}}
    for plugin in wasm_plugin_configs(b):
        plugin["vm_config"]["code"] = {"local": {"filename": str(wasm)}}
    if certs_dir is not None:
        rewrite_filenames(
            b, lambda f: str(Path(certs_dir) / f[len(CERTS_PREFIX):]) if f.startswith(CERTS_PREFIX) else f
        )
    for name, (host, port) in (clusters or {}).items():
        point_cluster(cluster(b, name), host, port)
    return b
