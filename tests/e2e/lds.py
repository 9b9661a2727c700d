"""Reloads under traffic, for the tests that make them (either build).

``LdsEnvoy`` is an Envoy whose listener comes from a file (filesystem LDS), so the filter's
configuration can be replaced while it serves; ``Traffic`` is client threads sending requests back
to back on fresh connections, recording what each request carried to the upstream.
"""

from __future__ import annotations

import json
import re
import threading
import time

import plugin_config as pc
from envoy import FILTER_LOG, request, wait_until

LISTENER_TYPE = "type.googleapis.com/envoy.config.listener.v3.Listener"
LISTENER_UPDATED = re.compile(r"lds: add/update listener")
CONFIGURED = re.compile(FILTER_LOG + r"configured \d+ profile")


def scoped_config(scope: str, max_wait_ms: int = 6000, extra_routes: int = 0) -> dict:
    """One profile whose scope (part of the cache key) is ``scope``; ``extra_routes`` unused route
    entries change the configuration without changing the key."""
    routes = [pc.match_route("default", path_prefix=f"/unused-{i}/") for i in range(extra_routes)]
    routes.append(pc.match_route("default"))
    return pc.config(profiles={"default": pc.profile(scopes=[scope], max_wait_ms=max_wait_ms)}, routes=routes)


class LdsEnvoy:
    """An Envoy (two workers) whose listener comes from a file, so its filter configuration can be
    replaced."""

    def __init__(self, envoy_factory, tmp_path, config: dict, node_id: str = "lds"):
        self.native = envoy_factory.filter_host == "native"
        boot = json.loads(envoy_factory.config_text(config))
        self.listener = boot["static_resources"].pop("listeners")[0]
        self.lds = tmp_path / "lds" / "listeners.json"
        self.lds.parent.mkdir(parents=True, exist_ok=True)
        self.write(config)
        boot["dynamic_resources"] = {"lds_config": {"resource_api_version": "V3", "path_config_source": {
            "path": str(self.lds), "watched_directory": {"path": str(self.lds.parent)}}}}
        boot["node"] = {"id": node_id, "cluster": node_id}
        e = envoy_factory._new(json.dumps(boot), "lds", 2, None, None, ())
        e.allow_critical = False
        e.expect_running = True
        envoy_factory.envoys.append(e)
        e.start()
        e.wait_ready(30)
        e.wait_log(LISTENER_UPDATED.pattern)
        self.envoy = e
        # A configuration is logged once by the dynamic module, once per VM by proxy-wasm
        # (two on the main thread, one per worker).
        self.configured_per_reload = 1 if self.native else 4

    def write(self, config: dict):
        new = json.loads(json.dumps(self.listener))
        filt = new["filter_chains"][0]["filters"][0]["typed_config"]["http_filters"][0]["typed_config"]
        value = filt["filter_config"] if self.native else filt["config"]["configuration"]
        value["value"] = json.dumps(config)
        tmp = self.lds.with_name("listeners.tmp")
        tmp.write_text(json.dumps({"resources": [{"@type": LISTENER_TYPE, **new}]}))
        tmp.rename(self.lds)  # atomic: Envoy never reads half a file

    def reload(self, config: dict, timeout: float = 15):
        """Push ``config``; return once the listener was replaced and every VM configured it."""
        e = self.envoy
        updates = len(LISTENER_UPDATED.findall(e.log()))
        configured = len(CONFIGURED.findall(e.log()))
        self.write(config)
        deadline = time.monotonic() + timeout
        while (len(LISTENER_UPDATED.findall(e.log())) <= updates
               or len(CONFIGURED.findall(e.log())) < configured + self.configured_per_reload):
            assert time.monotonic() < deadline, f"reload not applied in {timeout} s\n{e.log_tail(40)}"
            time.sleep(0.05)

    def threads(self) -> int:
        """Envoy's thread count (``Threads`` in /proc/<pid>/status)."""
        with open(f"/proc/{self.envoy.pid}/status") as f:
            return int(next(line.split()[1] for line in f if line.startswith("Threads:")))

    def vm_stats(self) -> dict:
        """proxy-wasm's VM counters (created, active): whether a reload made VMs or kept them."""
        return {k.rsplit(".", 1)[-1]: v for k, v in self.envoy.stats(filter=r"^wasm\.envoy\.wasm\.runtime").items()}


class Traffic:
    """Client threads sending requests back to back, each on a fresh connection (so each reaches
    the newest listener); records (start time, status, Authorization the upstream saw)."""

    def __init__(self, port: int, threads: int = 4, pause: float = 0.005):
        self.port, self.pause = port, pause
        self.results: list[tuple[float, int, str | None]] = []
        self.durations: list[tuple[float, float]] = []  # (start time, seconds to the answer)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]

    def _run(self):
        while not self._stop.is_set():
            t = time.monotonic()
            try:
                r = request(self.port, "/work", timeout=10)
                res = (t, r.status, r.json()["headers"].get("authorization") if r.status == 200 else None)
            except (OSError, ValueError) as exc:
                res = (t, 0, repr(exc))
            with self._lock:
                self.results.append(res)
                self.durations.append((t, time.monotonic() - t))
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
        """The answered requests that started at or after ``t0``."""
        with self._lock:
            return [r for r in self.results if r[0] >= t0]

    def answered_since(self, t0: float, at_least: int = 4, timeout: float = 10.0) -> list[tuple[float, int, str | None]]:
        """The answered requests that started at or after ``t0``, once there are ``at_least`` of them
        (or the timeout passed): a loaded machine may answer none in a fixed window."""
        wait_until(lambda: len(self.since(t0)) >= at_least, timeout, interval=0.05)
        return self.since(t0)

    def longest_since(self, t0: float) -> float:
        """The longest time to an answer of a request that started at or after ``t0`` (seconds)."""
        with self._lock:
            return max((d for t, d in self.durations if t >= t0), default=0.0)
