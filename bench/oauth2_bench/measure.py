"""The run: start the token servers, the native upstream and one Envoy per cell; check that each
injects what it should; then interleaved rounds of measured cells, with only the Envoy under test
running while it is measured and the machine probed before and after each round."""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from . import machine
from .common import (CACHE_HIT, CLIENT_SECRET, CLK_TCK, CONFIGS, FLOORS, INJECTED_STAT, LABEL, REFRESH_AHEAD_RATIO,
                     REFRESH_EXPIRES_IN, ROOT, ROUTES, RQ_STAT, STEADY_EXPIRES_IN, TOKEN_REGEX, ZERO_INJECTED_STAT,
                     BenchError, module_name, path_of)
from .configs import NATIVE_SECRET, native_filter, oauth2cc_config, under_test_bootstrap, upstream_bootstrap
from .processes import (PinnedEnvoy, Processes, core_ticks, counters, finish_profile, proc_cpu_ticks, run_wrk,
                        start_profile, vm_rss_kib)
from .report import fmt
from .stats import summarize

from envoy import Envoy, request  # noqa: E402
from servers import EchoUpstream, TokenServer  # noqa: E402

# Cells whose /echo sample must carry no Authorization header.
NO_TOKEN_ON_ECHO = ("none", "oauth2cc_nomatch")
DYNAMIC_MODULE_CELLS = ("floor_native", "dynmod")


def cal_txt(c: dict) -> str:
    return f"{c['wall_s'] * 1e3:.0f} ms, {100 * c['cpu_s'] / c['wall_s']:.0f}% of it on the CPU"


class Bench:
    def __init__(self, args: argparse.Namespace, procs: Processes):
        self.args = args
        self.procs = procs
        self.work = ROOT / "build" / "bench" / "work"
        self.envoys: dict[str, PinnedEnvoy] = {}
        self.token_servers: dict[str, TokenServer] = {}
        self.upstream: PinnedEnvoy | None = None
        self.echo: EchoUpstream | None = None
        self.failures: list[str] = []
        # Dynamic-module cells run only when their module exists; otherwise the reason is kept.
        self.modules: dict[str, str] = {}
        self.skipped: dict[str, str] = {}
        for key, so, how in (("floor_native", args.floor_native, "bench/floor-native"),
                             ("dynmod", args.dynmod, "make build")):
            if so and os.path.isfile(so):
                self.modules[key] = so
            else:
                self.skipped[key] = f"no module at {so or 'bench/floor-native/target/*/lib*.so'} ({how} builds it)"
        self.cells = [k for k, _, _ in CONFIGS if k not in self.skipped]
        self.core = int(args.envoy_cpu.split(",")[0].split("-")[0]) if args.envoy_cpu is not None else None

    # -- start -------------------------------------------------------------
    def start(self):
        a = self.args
        if self.work.exists():
            shutil.rmtree(self.work)
        self.work.mkdir(parents=True)
        self.echo = EchoUpstream().start()
        self.procs.servers.append(self.echo)
        for key in self.cells:
            ts = TokenServer(expires_in=REFRESH_EXPIRES_IN if key == "oauth2cc_refresh" else STEADY_EXPIRES_IN)
            self.procs.servers.append(ts.start())
            self.token_servers[key] = ts
        self.upstream = PinnedEnvoy(json.dumps(upstream_bootstrap(), indent=1), self.work, concurrency=1,
                                    log_level="warning", name="upstream", cpus=a.load_cpu)
        self._start_envoy(self.upstream)
        up_port = self.upstream.listener_port()
        names = {k: module_name(so) for k, so in self.modules.items()}
        for key in self.cells:
            b = under_test_bootstrap(key, token_server=self.token_servers[key], upstream_port=up_port,
                                     echo_port=self.echo.port, wasm_file=a.wasm, floor_wasm_files={"floor": a.floor_wasm},
                                     modules=names)
            env = None
            if key in self.modules:
                env = {"ENVOY_DYNAMIC_MODULES_SEARCH_PATH": str(Path(self.modules[key]).parent),
                       "BENCH_CLIENT_SECRET": CLIENT_SECRET}
            e = PinnedEnvoy(json.dumps(b, indent=1), self.work, concurrency=a.concurrency, log_level="info",
                            name=f"envoy-{key}", cpus=a.envoy_cpu, env=env)
            self._start_envoy(e)
            self.envoys[key] = e
            comm = Path(f"/proc/{e.pid}/comm").read_text().strip()
            if comm != "envoy":
                raise BenchError(f"PID {e.pid} of {e.name} is {comm!r}, not envoy (taskset did not exec?)")
        # the upstream's answers are what prove injection on the upstream route
        port = self.upstream.listener_port()
        checks = [(request(port, "/up/auth").status, 401),
                  (request(port, "/up/auth", {"authorization": "Bearer tok-7"}).status, 200),
                  (request(port, "/up/open").status, 200)]
        if any(got != want for got, want in checks):
            raise BenchError(f"native upstream misbehaves: {checks}")

    def _start_envoy(self, e: PinnedEnvoy):
        self.procs.envoys.append(e)
        e.start()
        e.wait_ready(timeout=90)

    # -- correctness -------------------------------------------------------
    def _echo_problem(self, key: str, got: str | None) -> str | None:
        ts = self.token_servers[key]
        if key in NO_TOKEN_ON_ECHO:
            return None if got is None else f"no token expected, yet the upstream got authorization {got!r}"
        if got is None:
            return "the upstream got no authorization header"
        if key in FLOORS:
            return None if re.match(TOKEN_REGEX, got) else f"authorization {got!r} does not match {TOKEN_REGEX}"
        if not got.startswith("Bearer ") or got[7:] not in ts.issued_tokens():
            return f"authorization {got!r} is not a bearer token this config's IdP issued"
        return None

    def check_injection(self, when: str, wait: float = 0.0) -> dict[str, str]:
        """A sample request through /echo of each Envoy under test: (a) and (w) must carry no
        Authorization, the others ``Bearer <a token their token server issued>`` (the floors a
        fixed ``Bearer tok-<n>``; (p) enables the filter on /echo). Retries for ``wait`` seconds
        (the prefetch). Returns config -> the header seen."""
        seen: dict[str, str] = {}
        for key, e in self.envoys.items():
            deadline = time.monotonic() + wait
            while True:
                problem, got = None, None
                try:
                    r = e.request("/echo", timeout=5)
                    if r.status != 200:
                        problem = f"/echo answered {r.status}: {r.text[:200]}"
                    else:
                        got = r.json()["headers"].get("authorization")
                        problem = self._echo_problem(key, got)
                except OSError as ex:
                    problem = f"/echo failed: {ex!r}"
                if problem is None or time.monotonic() >= deadline:
                    break
                time.sleep(0.2)
            if problem:
                self.fail(f"{when}: {key}: {problem}", e)
            seen[key] = "none" if got is None else got
        return seen

    def fail(self, msg: str, e: Envoy | None = None):
        self.failures.append(msg)
        print(f"FAIL: {msg}", file=sys.stderr)
        if e is not None:
            print(f"--- last lines of {e.log_path} ---\n{e.log_tail(40)}\n---", file=sys.stderr)

    # -- one measured cell -------------------------------------------------
    def measure(self, key: str, route_kind: str, rnd: int) -> dict:
        a = self.args
        e = self.envoys[key]
        ts = self.token_servers[key]
        self.procs.only_running(e, list(self.envoys.values()))
        url = f"http://127.0.0.1:{e.listener_port()}{path_of(key, route_kind)}"
        if a.warmup > 0:
            run_wrk(self.procs, url, a.warmup, a)
        stat = INJECTED_STAT.get(key) or ZERO_INJECTED_STAT.get(key) or (a.dynmod_stat if key == "dynmod" else None)
        names = [RQ_STAT] + ([stat] if stat else [])
        c0 = counters(e, names)
        tok0 = ts.count()
        k0 = core_ticks(self.core) if self.core is not None else None
        cpu0, t0 = proc_cpu_ticks(e.pid), time.monotonic()
        profiler = None
        if key in a.perf and route_kind == "direct" and rnd == a.rounds:
            profiler = start_profile(e.pid, a.duration, self.work / f"perf-{key}.data", a.load_cpu)
        w = run_wrk(self.procs, url, a.duration, a)
        profile = finish_profile(profiler) if profiler else None
        cpu1, t1 = proc_cpu_ticks(e.pid), time.monotonic()
        k1 = core_ticks(self.core) if self.core is not None else None
        tok1 = ts.count()
        time.sleep(1.5)  # oauth2-cc adds its counters to Envoy's on its tick, at most 1 s apart
        c1 = counters(e, names)

        served = c1[RQ_STAT] - c0[RQ_STAT]
        window_s = t1 - t0
        cpu_ticks = cpu1 - cpu0
        cell: dict[str, Any] = {
            "config": key, "route": route_kind, "round": rnd, "url_path": path_of(key, route_kind),
            "requests": w["requests"], "served": served,
            "rps": w["requests"] / (w["duration_us"] / 1e6) if w["duration_us"] else 0.0,
            "p50_ms": w["p50_us"] / 1e3, "p90_ms": w["p90_us"] / 1e3, "p99_ms": w["p99_us"] / 1e3,
            "p999_ms": w["p999_us"] / 1e3, "max_ms": w["lat_max_us"] / 1e3, "mean_ms": w["lat_mean_us"] / 1e3,
            "cpu_us_per_req": (cpu_ticks * 1e6 / CLK_TCK / served) if served > 0 else None,
            "envoy_cpu_pct": 100.0 * cpu_ticks / CLK_TCK / window_s,
            "window_s": window_s,
            "token_requests": tok1 - tok0,
            "errors": {k: w[k] for k in ("connect_errors", "read_errors", "write_errors", "status_errors",
                                         "timeouts")},
        }
        if k0 is not None and k1 is not None:
            busy = k1["busy"] - k0["busy"]
            cell["core_other_pct"] = max(0.0, 100.0 * (busy - cpu_ticks) / CLK_TCK / window_s)
            cell["core_steal_pct"] = 100.0 * (k1["steal"] - k0["steal"]) / CLK_TCK / window_s
        if stat:
            inj = c1[stat] - c0[stat]
            cell["injected"] = inj
            cell["injected_ratio"] = inj / served if served else 0.0
        if profile is not None:
            cell["profile_dso_pct"] = profile
        self._judge_cell(cell, w, key, route_kind, served)
        if cell["problems"]:
            self.fail(f"round {rnd} {key}/{route_kind}: " + "; ".join(cell["problems"]), e)
            cell["wrk_output"] = w["text"]
        print(f"  {LABEL[key]:5} {key:17} {route_kind:8} {cell['rps']:9.0f} req/s  p50 {cell['p50_ms']:6.3f} ms"
              f"  p99 {cell['p99_ms']:6.3f} ms  cpu {fmt(cell['cpu_us_per_req'], 1):>6} µs/req"
              f"  core{self.core}-other {cell.get('core_other_pct', 0):4.0f}%"
              + (f"  refreshes {cell['token_requests']}" if key == "oauth2cc_refresh" else "")
              + ("" if cell["ok"] else "  FAILED"), flush=True)
        return cell

    def _judge_cell(self, cell: dict, w: dict, key: str, route_kind: str, served: int):
        a = self.args
        problems = []
        if w["requests"] == 0 or served == 0:
            problems.append("no request served")
        if w["status_errors"]:
            why = " (401 from the upstream: no token)" if route_kind == "upstream" and path_of(key, "upstream") == "/up/auth" else ""
            problems.append(f"{w['status_errors']} non-2xx responses{why}")
        sock = {k: v for k, v in cell["errors"].items() if k != "status_errors" and v}
        if sock:
            problems.append(f"socket errors {sock}")
        if "injected" in cell:
            if key in ZERO_INJECTED_STAT and cell["injected"] != 0:
                problems.append(f"the filter injected {cell['injected']} tokens on a route that does not enable it")
            elif key not in ZERO_INJECTED_STAT and cell["injected_ratio"] < 0.99:
                problems.append(f"filter injected {cell['injected']} tokens for {served} requests")
        if key in CACHE_HIT and cell["token_requests"]:
            problems.append(f"{cell['token_requests']} token requests during a cache-hit run")
        if key == "oauth2cc_refresh" and a.duration >= 4 and cell["token_requests"] == 0:
            problems.append("no background refresh during the window")
        cell["problems"] = problems
        cell["ok"] = not problems

    # -- everything --------------------------------------------------------
    def run(self, machine_start: dict) -> dict:
        a = self.args
        started = _dt.datetime.now(_dt.timezone.utc)
        for key, why in self.skipped.items():
            print(f"skipping {LABEL[key]} {key}: {why}", flush=True)
        self.start()
        envoys = list(self.envoys.values())
        print("envoys ready: " + ", ".join(f"{k} pid {e.pid}" for k, e in self.envoys.items())
              + f"; upstream pid {self.upstream.pid}", flush=True)
        rss_start = {k: vm_rss_kib(e.pid) for k, e in self.envoys.items()}
        injected_start = self.check_injection("start", wait=30)
        if self.failures:
            raise BenchError("token not injected at start: " + "; ".join(self.failures))
        if a.initial_warmup > 0 and not a.smoke:
            print(f"warm-up: {a.initial_warmup} s per cell", flush=True)
            for key in self.cells:
                self.procs.only_running(self.envoys[key], envoys)
                for rk in ROUTES:
                    run_wrk(self.procs, f"http://127.0.0.1:{self.envoys[key].listener_port()}{path_of(key, rk)}",
                            a.initial_warmup, a)
        cells, rounds = [], []
        probe = machine.RoundProbe(self.core)
        for rnd in range(1, a.rounds + 1):
            self.procs.only_running(None, envoys)  # the calibration loop alone on the core
            before = probe.begin()
            print(f"round {rnd}/{a.rounds} (calibration {cal_txt(before)})", flush=True)
            for rk in ROUTES:
                for key in self.cells:
                    cells.append(self.measure(key, rk, rnd))
            self.procs.only_running(None, envoys)
            after = probe.end()
            rounds.append({"round": rnd, "calibration_before": before, **after})
            print(f"  calibration after {cal_txt(after['calibration_after'])}, steal "
                  f"{fmt(after['steal_fraction'] and 100 * after['steal_fraction'], 2)}%", flush=True)
        self.procs.resume_all()
        time.sleep(1.0)  # resumed Envoys catch up on their timers (a refresh may be due)
        injected_end = self.check_injection("end", wait=10)
        rss_end = {k: vm_rss_kib(e.pid) for k, e in self.envoys.items()}
        self._final_checks()
        finished = _dt.datetime.now(_dt.timezone.utc)
        verdicts = machine.judge(machine_start, rounds, cells)
        return {
            "schema": 2,
            "mode": "smoke" if a.smoke else "full",
            "started": started.isoformat(timespec="seconds"),
            "finished": finished.isoformat(timespec="seconds"),
            "params": {"rounds": a.rounds, "duration_s": a.duration, "warmup_s": a.warmup,
                       "initial_warmup_s": 0 if a.smoke else a.initial_warmup, "connections": a.connections,
                       "threads": a.threads, "concurrency": a.concurrency, "envoy_cpu": a.envoy_cpu,
                       "load_cpu": a.load_cpu, "refresh_expires_in_s": REFRESH_EXPIRES_IN,
                       "refresh_ahead_ratio": REFRESH_AHEAD_RATIO},
            "env": machine.environment(a),
            "configs": [{"key": k, "label": lab, "description": d} for k, lab, d in CONFIGS if k in self.cells],
            "skipped": self.skipped,
            "native_filter": native_filter(),
            "native_secret": {**NATIVE_SECRET, "generic_secret": {"secret": {"inline_string": "<client secret>"}}},
            "oauth2cc_config": {"steady": oauth2cc_config(False), "refresh": oauth2cc_config(True)},
            "wasm": {"path": a.wasm, "bytes": os.path.getsize(a.wasm)},
            "modules": {k: {"path": so, "bytes": os.path.getsize(so)} for k, so in self.modules.items()},
            "rss_kib": {"after_ready": rss_start, "after_runs": rss_end},
            "injection_check": {"start": injected_start, "end": injected_end,
                                "refresh_token_requests_total": self.token_servers["oauth2cc_refresh"].count()},
            "cells": cells,
            "summary": summarize(cells),
            "failures": self.failures,
            "machine": {"start": machine_start, "rounds": rounds, "verdicts": verdicts,
                        "quiet": machine.quiet(verdicts)},
            "profiles": {c["config"]: {"dso_pct": c["profile_dso_pct"], "cpu_us_per_req": c["cpu_us_per_req"]}
                         for c in cells if c.get("profile_dso_pct")},
        }

    def _final_checks(self):
        refresh_tokens = self.token_servers["oauth2cc_refresh"].count()
        if refresh_tokens < 2:
            self.fail(f"oauth2cc_refresh: the IdP saw {refresh_tokens} token request(s) in the whole run;"
                      " background refresh did not happen", self.envoys["oauth2cc_refresh"])
        for key, e in list(self.envoys.items()) + [("upstream", self.upstream)]:
            if not e.running():
                self.fail(f"{key}: Envoy exited during the run", e)
            crit = e.critical_wasm_lines()
            if crit:
                self.fail(f"{key}: critical wasm log lines: {crit[:3]}", e)

