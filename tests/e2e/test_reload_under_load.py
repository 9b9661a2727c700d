"""Reloads under load.

Envoy with two workers reads its listener from a file (filesystem LDS); the test rewrites it
(temporary file + rename) to push a new plugin configuration with the same ``vm_id`` while a steady
stream of requests runs. Ten reloads: five change nothing the token depends on (``max_wait_ms``, an
extra route), five change a profile's ``scopes`` (part of the cache key). No request may be lost
(each gets 200 with a token), a reload that changes the cache key causes exactly one token request
(for the new scope; every VM shares it), the others none: the cache in shared data survives a
reload, as the README promises. The test prints the token requests per reload and Envoy's wasm VM
counters (whether a reload created VMs or kept them).
"""

from __future__ import annotations

import json
import os
import re
import threading
import time

import pytest

import plugin_config as pc
from envoy import Envoy, request
from servers import json_body

LISTENER_TYPE = "type.googleapis.com/envoy.config.listener.v3.Listener"
CONFIGURED = re.compile(r"wasm log .*: configured \d+ profile")
VMS = 4  # --concurrency 2: two VMs on the main thread, one per worker
SETTLE_S = 1.0


def plugin_config(scope: str, max_wait_ms: int = 6000, extra_routes: int = 0) -> dict:
    routes = [pc.match_route("default", path_prefix=f"/unused-{i}/") for i in range(extra_routes)]
    routes.append(pc.match_route("default"))
    return pc.config(profiles={"default": pc.profile(scopes=[scope], max_wait_ms=max_wait_ms)}, routes=routes)


class LdsEnvoy:
    """An Envoy whose listener comes from a file, so its plugin configuration can be replaced."""

    def __init__(self, envoy_factory, tmp_path, config: dict):
        boot = json.loads(envoy_factory.config_text(config))
        self.listener = boot["static_resources"].pop("listeners")[0]
        self.lds = tmp_path / "lds" / "listeners.json"
        self.lds.parent.mkdir(parents=True, exist_ok=True)
        self.write(config)
        boot["dynamic_resources"] = {"lds_config": {"resource_api_version": "V3", "path_config_source": {
            "path": str(self.lds), "watched_directory": {"path": str(self.lds.parent)}}}}
        boot["node"] = {"id": "reload-test", "cluster": "reload-test"}
        e = Envoy(json.dumps(boot), tmp_path / "envoy", concurrency=2, name="lds",
                  log_level=os.environ.get("E2E_ENVOY_LOG_LEVEL", "info"),
                  component_log_level=os.environ.get("E2E_ENVOY_COMPONENT_LOG_LEVEL") or None)
        e.allow_critical = False
        e.expect_running = True
        envoy_factory.envoys.append(e)
        e.start()
        e.wait_ready(30)
        e.wait_log(r"lds: add/update listener")
        self.envoy = e

    def write(self, config: dict):
        new = json.loads(json.dumps(self.listener))
        filt = new["filter_chains"][0]["filters"][0]["typed_config"]["http_filters"][0]
        filt["typed_config"]["config"]["configuration"]["value"] = json.dumps(config)
        tmp = self.lds.with_name("listeners.tmp")
        tmp.write_text(json.dumps({"resources": [{"@type": LISTENER_TYPE, **new}]}))
        tmp.rename(self.lds)  # atomic: Envoy never reads half a file

    def reload(self, config: dict, timeout: float = 15):
        """Push ``config``; return once the listener was replaced and every VM configured it."""
        e = self.envoy
        updates = len(re.findall(r"lds: add/update listener", e.log()))
        configured = len(CONFIGURED.findall(e.log()))
        self.write(config)
        deadline = time.monotonic() + timeout
        while (len(re.findall(r"lds: add/update listener", e.log())) <= updates
               or len(CONFIGURED.findall(e.log())) < configured + VMS):
            assert time.monotonic() < deadline, f"reload not applied in {timeout} s\n{e.log_tail(40)}"
            time.sleep(0.05)

    def vm_stats(self) -> dict:
        return {k.rsplit(".", 1)[-1]: v for k, v in self.envoy.stats(filter=r"^wasm\.envoy\.wasm\.runtime").items()}


class Traffic:
    """Client threads sending requests back to back; records (time, status, Authorization the
    upstream saw) for every request."""

    def __init__(self, port: int, threads: int = 2, pause: float = 0.005):
        self.port, self.pause = port, pause
        self.results: list[tuple[float, int, str | None]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]

    def _run(self):
        while not self._stop.is_set():
            t = time.monotonic()
            try:
                r = request(self.port, "/work", timeout=10)
                auth = r.json()["headers"].get("authorization") if r.status == 200 else None
                res = (t, r.status, auth)
            except (OSError, ValueError) as exc:
                res = (t, 0, repr(exc))
            with self._lock:
                self.results.append(res)
            time.sleep(self.pause)

    def __enter__(self):
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        for t in self._threads:
            t.join(15)

    def since(self, t0: float) -> list[tuple[float, int, str | None]]:
        with self._lock:
            return [r for r in self.results if r[0] >= t0]


# About proxy-wasm's reload with the same vm_id (the VM is kept, on_configure runs again, shared
# data survives): the listener it rewrites is the wasm filter's. test_storms.py reloads both builds
# (the dynamic module's reload is a new filter configuration and driver over the process-wide store).
@pytest.mark.wasm_only
@pytest.mark.parametrize("idp_delay", [0.0, 0.4], ids=["fast_idp", "slow_idp"])
def test_ten_reloads_under_load_lose_nothing_and_fetch_only_on_a_new_cache_key(
        envoy_factory, token_server, upstream, tmp_path, idp_delay):
    """``slow_idp``: each token request takes 0.4 s, so requests after a scope change wait for the
    new token while old and new configurations are both live."""
    lock = threading.Lock()
    counts: dict[str, int] = {}

    def handler(rec):
        scope = rec.form.get("scope", "?")
        with lock:
            counts[scope] = counts.get(scope, 0) + 1
            tok = f"tok-{scope}-{counts[scope]}"
        return 200, [("Content-Type", "application/json")], json_body(
            {"access_token": tok, "token_type": "Bearer", "expires_in": 3600})

    token_server.set_handler(handler)
    token_server.set_delay(idp_delay)
    scope = "s0"
    lds = LdsEnvoy(envoy_factory, tmp_path, plugin_config(scope))
    e = lds.envoy
    assert e.request("/warm").status == 200
    vm_before = lds.vm_stats()
    rows: list[str] = []
    problems: list[str] = []
    with Traffic(e.port) as traffic:
        time.sleep(SETTLE_S)
        for i in range(1, 11):
            changes_key = i % 2 == 0
            if changes_key:
                scope, what = f"s{i}", f"scopes -> [s{i}]"
                config = plugin_config(scope)
            else:
                config = plugin_config(scope, max_wait_ms=6000 + i, extra_routes=i)
                what = f"max_wait_ms -> {6000 + i}, {i} extra route(s)"
            before = token_server.count()
            t0 = time.monotonic()
            lds.reload(config)
            applied = time.monotonic() - t0
            time.sleep(SETTLE_S)
            new = token_server.requests[before:]
            scopes = [r.form.get("scope") for r in new]
            after = [r for r in traffic.since(time.monotonic() - SETTLE_S / 2)]
            tokens = sorted({a for _, _, a in after})
            rows.append(f"reload {i:2d} ({what}): applied in {applied:.2f} s, token requests {len(new)} {scopes}, "
                        f"tokens served in the last {SETTLE_S / 2:.1f} s: {tokens}")
            want = [scope] if changes_key else []
            if scopes != want:
                problems.append(f"reload {i} ({what}): token requests for scopes {scopes}, expected {want}")
            if not tokens or not all(t and t.startswith(f"Bearer tok-{scope}-") for t in tokens):
                problems.append(f"reload {i} ({what}): after it, requests carried {tokens}, expected a {scope} token")
    results = traffic.results
    lost = [r for r in results if r[1] != 200 or not (r[2] or "").startswith("Bearer tok-")]
    vm_after = lds.vm_stats()
    print(f"\n{len(results)} requests during the reloads; wasm VM stats before {vm_before}, after {vm_after}\n"
          + "\n".join(rows))
    assert not lost, f"{len(lost)} of {len(results)} requests lost, first: {lost[:5]}\n" + "\n".join(rows)
    assert not problems, "\n".join(problems) + "\n" + "\n".join(rows)
