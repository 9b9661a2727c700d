"""The instruction-count run of `make bench`: every cell's Envoy under Callgrind, one at a time.

For each cell: a fresh token server, an Envoy under Callgrind (1 worker) with that cell's HTTP
filters, a check that it injects what it should (through the echo upstream), a warm-up, then per
route one counted window of N keep-alive requests, and one idle window for the background rate
(see ``callgrind``). The served and injected counters are read around the windows: a cell whose
filter did not inject on every counted request, or that asked the IdP for a token while counted,
is a failure, not a figure.
"""

from __future__ import annotations

import json
import re
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .callgrind import Background, CallgrindEnvoy, KeepAlive, Window, executable_maps, measure_idle, measure_requests
from .common import (CACHE_HIT, CLIENT_SECRET, EXCHANGE_CELLS, EXCHANGE_SUBJECT, FLOORS, INJECTED_STAT, LABEL,
                     ROUTES, RQ_STAT, STEADY_EXPIRES_IN, TOKEN_REGEX, ZERO_INJECTED_STAT, BenchError, module_name, path_of)
from .configs import under_test_bootstrap, upstream_bootstrap
from .processes import Processes, counters

from envoy import Envoy, request  # noqa: E402
from exchange_server import ExchangeServer  # noqa: E402
from servers import EchoUpstream, TokenServer  # noqa: E402

# The cells, in the order they run. Labels and descriptions are in common.CONFIGS and
# common.FLOOR_VARIANT_CONFIGS.
INSTR_CELLS = ["none", "native", "floor_native", "floor_native_fdm", "dynmod", "floor", "floor_fm", "floor_fm0",
               "oauth2cc", "oauth2cc_nopurge", "perroute", *EXCHANGE_CELLS]
DYNAMIC_MODULE_CELLS = ("floor_native", "floor_native_fdm", "dynmod", "dynmod_exchange")
WASM_FLOOR_CELLS = ("floor", "floor_fm", "floor_fm0")
# The floor of each cell's kind (what any module of that kind pays), and the floor that does the
# same reads as the filter (what the goals compare with).
KIND_FLOOR = {"floor_native_fdm": "floor_native", "dynmod": "floor_native", "floor_fm": "floor",
              "floor_fm0": "floor", "oauth2cc": "floor", "oauth2cc_nopurge": "floor", "perroute": "none",
              "dynmod_exchange": "floor_native", "oauth2cc_exchange": "floor"}
MATCHED_FLOOR = {"dynmod": "floor_native_fdm", "oauth2cc": "floor_fm", "oauth2cc_nopurge": "floor_fm0"}
# After the admin API was asked for the counters: its connection's clean-up must not fall into the
# idle window.
ADMIN_SETTLE_S = 0.5
# Cells whose /echo sample must carry no Authorization header.
NO_TOKEN_ON_ECHO = ("none",)


@dataclass
class Params:
    requests: int = 300  # counted requests per route and cell
    warmup: int = 50  # requests per route before counting
    idle_s: float = 2.0  # the idle window: the timers' rate
    runs: int = 2


class Shared:
    """What every cell's Envoy talks to: the echo upstream (injection check) and the native
    upstream Envoy (the upstream route; it answers 200 only to ``Bearer tok-<n>``)."""

    def __init__(self, procs: Processes, work: Path):
        self.procs = procs
        self.work = work
        self.echo = EchoUpstream().start()
        procs.servers.append(self.echo)
        self.upstream = Envoy(json.dumps(upstream_bootstrap(), indent=1), work, concurrency=1,
                              log_level="warning", name="upstream")
        procs.envoys.append(self.upstream)
        self.upstream.start()
        self.upstream.wait_ready(timeout=90)
        port = self.upstream.listener_port()
        checks = [(request(port, "/up/auth").status, 401),
                  (request(port, "/up/auth", {"authorization": "Bearer tok-7"}).status, 200),
                  (request(port, "/up/open").status, 200)]
        if any(got != want for got, want in checks):
            raise BenchError(f"native upstream misbehaves: {checks}")


class CellRunner:
    """Starts one cell's Envoy under Callgrind, checks it, counts its windows, stops it."""

    def __init__(self, shared: Shared, files: dict[str, str], params: Params, valgrind_args: list[str] | None = None):
        self.shared = shared
        self.files = files  # cell key -> module file (wasm or .so); "wasm" -> oauth2-cc's wasm
        self.params = params
        self.valgrind_args = valgrind_args or []
        # What every request of the running cell carries: the exchange cells' subject token.
        self.request_headers: dict[str, str] = {}

    def start(self, key: str, name: str, concurrency: int = 1, callgrind: bool = True,
              log_level: str = "warning", component_log_level: str | None = None) -> tuple[Envoy, TokenServer]:
        sh = self.shared
        if key in EXCHANGE_CELLS:
            ts = ExchangeServer(expires_in=STEADY_EXPIRES_IN).start()
            self.request_headers = {"authorization": f"Bearer {ts.mint_subject(EXCHANGE_SUBJECT)}"}
        else:
            ts = TokenServer(expires_in=STEADY_EXPIRES_IN).start()
            self.request_headers = {}
        sh.procs.servers.append(ts)
        modules = {k: module_name(self.files[k]) for k in DYNAMIC_MODULE_CELLS if k in self.files}
        b = under_test_bootstrap(key, token_server=ts, upstream_port=sh.upstream.listener_port(),
                                 echo_port=sh.echo.port, wasm_file=self.files.get("wasm", ""),
                                 floor_wasm_files={k: self.files[k] for k in WASM_FLOOR_CELLS if k in self.files},
                                 modules=modules)
        env = {"BENCH_CLIENT_SECRET": CLIENT_SECRET}
        if key in DYNAMIC_MODULE_CELLS:
            env["ENVOY_DYNAMIC_MODULES_SEARCH_PATH"] = str(Path(self.files[key]).parent)
        kw: dict[str, Any] = dict(concurrency=concurrency, log_level=log_level, name=name, env=env,
                                  component_log_level=component_log_level)
        cls = CallgrindEnvoy if callgrind else Envoy
        if callgrind:
            kw["extra_valgrind"] = self.valgrind_args
        if callgrind:
            # No stats-flush timer (Envoy flushes when the admin API is asked): a flush every 5 s
            # costs as much as a few requests, and whether it falls into a window is chance.
            b["stats_flush_on_admin"] = True
        e = cls(json.dumps(b, indent=1), sh.work, **kw)
        sh.procs.envoys.append(e)
        e.start()
        e.wait_ready(timeout=300 if callgrind else 90)
        self.check_injection(key, e, ts)
        return e, ts

    def check_injection(self, key: str, e: Envoy, ts: TokenServer, wait: float = 120.0):
        """A request through /echo carries what this cell's filter writes (no token for (a);
        (p) enables the filter on /echo). Retries while the filter fetches its first token."""
        deadline = time.monotonic() + wait
        problem = "not tried"
        while time.monotonic() < deadline:
            try:
                r = e.request("/echo", self.request_headers, timeout=30)
                got = r.json()["headers"].get("authorization") if r.status == 200 else None
                problem = (f"/echo answered {r.status}" if r.status != 200
                           else echo_problem(key, got, ts, self.request_headers.get("authorization")))
            except OSError as ex:
                problem = f"/echo failed: {ex!r}"
            if problem is None:
                return
            time.sleep(0.5)
        raise BenchError(f"{LABEL[key]} {key}: {problem}\n--- {e.log_path} ---\n{e.log_tail(40)}")

    def _judge(self, key: str, out: dict, windows: dict[str, Window], c1: dict, c0: dict, token_requests: int,
               stat: str | None):
        """Every counted request answered 200, counted by Envoy, injected (or, for (p), not), and
        no token request while counting."""
        n = sum(w.requests for w in windows.values())
        for rk, w in windows.items():
            if w.failed_statuses:
                out["problems"].append(f"{rk}: {len(w.failed_statuses)} answers not 200 ({sorted(set(w.failed_statuses))})")
        served = c1[RQ_STAT] - c0[RQ_STAT]
        if served != n:
            out["problems"].append(f"Envoy counted {served} requests, {n} sent while counting")
        if stat:
            injected = c1[stat] - c0[stat]
            want = 0 if key in ZERO_INJECTED_STAT else n
            if injected != want:
                out["problems"].append(f"{stat} moved by {injected}, expected {want}")
        if key in CACHE_HIT and token_requests:
            out["problems"].append(f"{token_requests} token requests during a cache-hit window")

    def measure(self, key: str, run: int, routes: list[str] | None = None) -> dict:
        """One cell, one run: {route: window dict, "idle": ..., "problems": [...]}"""
        p = self.params
        t0 = time.monotonic()
        e, ts = self.start(key, f"{key}-run{run}")
        started_s = time.monotonic() - t0
        out: dict[str, Any] = {"config": key, "run": run, "start_s": started_s, "problems": []}
        try:
            client = KeepAlive(e.listener_port())
            stat = INJECTED_STAT.get(key) or ZERO_INJECTED_STAT.get(key) or (
                "oauth2_cc.default.injected" if key in ("dynmod", "dynmod_exchange") else None)
            names = [RQ_STAT] + ([stat] if stat else [])
            for rk in routes or ROUTES:
                bad = client.get(path_of(key, rk), p.warmup, self.request_headers)
                if bad:
                    out["problems"].append(f"{rk}: warm-up statuses {sorted(set(bad))}")
            c0, tok0 = settled(e, names), ts.count()
            time.sleep(ADMIN_SETTLE_S)
            idle = measure_idle(e, p.idle_s, f"{key}-idle")
            windows: dict[str, Window] = {}
            for rk in routes or ROUTES:
                windows[rk] = measure_requests(e, client, path_of(key, rk), p.requests, f"{key}-{rk}",
                                               self.request_headers)
            c1, tok1 = settled(e, names), ts.count()
            out["maps"] = executable_maps(e.pid)
            self._judge(key, out, windows, c1, c0, tok1 - tok0, stat)
            bg = Background.from_idle(idle, out["maps"])
            for rk, w in windows.items():
                found = bg.apply(w)
                out[rk] = asdict(w) | found | {"ir_per_request": w.ir_per_request,
                                               "raw_ir_per_request": w.raw_ir_per_request}
            out["background"] = asdict(idle) | {"ir_per_s": idle.ir / idle.wall_s, "timer_entries": len(bg.entries),
                                                "timer_calls": bg.ticks_idle, "timer_ir": bg.tick_ir_idle,
                                                "rest_ir_per_s": bg.rest_ir_per_s}
            client.close()
            if not e.running():
                out["problems"].append("Envoy exited")
        finally:
            t_stop = time.monotonic()
            e.stop(grace=60)
            out["stop_s"] = time.monotonic() - t_stop
        out["elapsed_s"] = time.monotonic() - t0
        for pr in out["problems"]:
            print(f"FAIL {LABEL[key]} {key} run {run}: {pr}", file=sys.stderr)
        return out


# The wasm filter adds its injections to Envoy's counter on its tick, which comes at most a second
# apart (the core's MAX_WAKE_INTERVAL_MS) and later under Callgrind: counters count as settled once
# they stayed the same for longer than that.
SETTLE_QUIET_S = 2.0


def settled(e: Envoy, names: list[str], timeout: float = 30.0) -> dict[str, int]:
    """The counters once they stop moving (unchanged for ``SETTLE_QUIET_S``)."""
    last = counters(e, names)
    deadline = time.monotonic() + timeout
    quiet_since = time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.4)
        now = counters(e, names)
        if now != last:
            last, quiet_since = now, time.monotonic()
        elif time.monotonic() - quiet_since >= SETTLE_QUIET_S:
            return now
    return last


def echo_problem(key: str, got: str | None, ts: TokenServer, sent: str | None = None) -> str | None:
    """What is wrong with the ``authorization`` the echo upstream got (None: nothing); ``sent``:
    the one the request carried."""
    if key == "none_subject":
        return None if got == sent else "the subject token did not reach the upstream unchanged"
    if key in EXCHANGE_CELLS:
        subject = ts.subject_of(got[7:]) if got and got.startswith("Bearer ex-") else None
        return None if subject == EXCHANGE_SUBJECT else f"authorization {got!r} is not a token exchanged for the caller"
    if key in NO_TOKEN_ON_ECHO:
        return None if got is None else f"no token expected, yet the upstream got authorization {got!r}"
    if got is None:
        return "the upstream got no authorization header"
    if key in FLOORS:
        return None if re.match(TOKEN_REGEX, got) else f"authorization {got!r} does not match {TOKEN_REGEX}"
    if not got.startswith("Bearer ") or got[7:] not in ts.issued_tokens():
        return f"authorization {got!r} is not a bearer token this cell's IdP issued"
    return None
