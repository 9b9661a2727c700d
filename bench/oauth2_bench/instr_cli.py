"""`make bench`: instructions per request under Callgrind, every cell twice, then where they go
and Envoy's memory; writes build/bench/instr.json, BENCHMARKS.md and bench/chart.png."""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from . import memory, where
from .callgrind import tools_missing
from .common import (DEFAULT_DYNMOD, DEFAULT_FLOOR_NATIVE, DEFAULT_FLOOR_NATIVE_FDM, DEFAULT_FLOOR_WASM,
                     FLOOR_WASM_VARIANTS, LABEL, ROOT, ROUTES, BenchError)
from .instr import DYNAMIC_MODULE_CELLS, INSTR_CELLS, CellRunner, Params, Shared
from .instr_report import compare_markdown, summarize, write_report
from .processes import Processes

from envoy import EnvoyExited, envoy_bin  # noqa: E402

DOC = """`make bench`: Envoy 1.40 under Callgrind, instructions per request for every cell on the
direct-response and the upstream route, each cell twice (two Envoy processes); then per object,
per symbol of the dynamic module and per VM entry / host call of the wasm cells; then Envoy's RSS
at 1, 2, 4 and 8 workers. Writes BENCHMARKS.md and bench/chart.png from the run.

    .venv/bin/python bench/run.py                         # everything (make bench)
    .venv/bin/python bench/run.py --cells none,dynmod --runs 1 --no-memory --no-report
    .venv/bin/python bench/run.py --render build/bench/instr.json   # redraw BENCHMARKS.md + chart
    .venv/bin/python bench/run.py --compare a.json b.json          # two runs side by side
"""
DEFAULT_OUT = ROOT / "build" / "bench" / "instr.json"
DEFAULT_MD = ROOT / "BENCHMARKS.md"
DEFAULT_CHART = ROOT / "bench" / "chart.png"
DEFAULT_SYMBOLS = ROOT / "target" / "bench-symbols" / "native" / "liboauth2_cc.so"
# Two runs of a cell whose counts differ by more than this are flagged in the report.
AGREEMENT_PCT = 1.0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=DOC.split("\n\n")[0], epilog=DOC.split("\n\n", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=300, help="counted requests per route and cell (default 300)")
    ap.add_argument("--warmup", type=int, default=50, help="requests per route before counting (default 50)")
    ap.add_argument("--runs", type=int, default=2, help="runs of every cell, each its own Envoy (default 2)")
    ap.add_argument("--cells", default=",".join(INSTR_CELLS), help="comma-separated cells (default: all)")
    ap.add_argument("--rss-requests", type=int, default=1000, help="requests before reading RSS (default 1000)")
    ap.add_argument("--no-memory", action="store_true", help="skip the RSS table")
    ap.add_argument("--no-profiles", action="store_true", help="skip the per-symbol and per-call profiles")
    ap.add_argument("--wasm", default=os.environ.get("OAUTH2_CC_WASM") or str(ROOT / "build" / "oauth2_cc.wasm"))
    ap.add_argument("--dynmod", default=os.environ.get("OAUTH2_CC_NATIVE") or str(DEFAULT_DYNMOD))
    ap.add_argument("--dynmod-symbols", default=str(DEFAULT_SYMBOLS),
                    help="the dynamic module built with symbols (make bench-symbols), for its profile")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--markdown", type=Path, default=DEFAULT_MD)
    ap.add_argument("--chart", type=Path, default=DEFAULT_CHART)
    ap.add_argument("--no-report", action="store_true", help="write the JSON only")
    ap.add_argument("--render", type=Path, metavar="RESULTS_JSON", help="only redraw the report from a JSON")
    ap.add_argument("--compare", type=Path, nargs=2, metavar="RESULTS_JSON",
                    help="print how far apart two runs' figures are, per cell (markdown)")
    a = ap.parse_args(argv)
    a.cells = [c for c in a.cells.split(",") if c]
    unknown = [c for c in a.cells if c not in INSTR_CELLS]
    if unknown:
        ap.error(f"--cells: unknown {unknown}; known: {INSTR_CELLS}")
    if a.requests < 10 or a.runs < 1:
        ap.error("--requests must be at least 10 and --runs at least 1")
    return a


def cell_files(a: argparse.Namespace) -> dict[str, str]:
    return {"wasm": a.wasm, "oauth2cc": a.wasm, "oauth2cc_nopurge": a.wasm, "perroute": a.wasm,
            "oauth2cc_exchange": a.wasm, "dynmod": a.dynmod, "dynmod_exchange": a.dynmod, "floor": str(DEFAULT_FLOOR_WASM),
            "floor_fm": str(FLOOR_WASM_VARIANTS["floor_fm"]), "floor_fm0": str(FLOOR_WASM_VARIANTS["floor_fm0"]),
            "floor_native": str(DEFAULT_FLOOR_NATIVE), "floor_native_fdm": str(DEFAULT_FLOOR_NATIVE_FDM)}


BUILT_BY = {"wasm": "make build", "dynmod": "make build", "floor": "make bench-floor", "floor_fm": "make bench-floor",
            "floor_fm0": "make bench-floor", "floor_native": "make bench-floor-native",
            "floor_native_fdm": "make bench-floor-native"}


def preflight(a: argparse.Namespace, files: dict[str, str]):
    problems = [f"{t} is not installed (apt-get install valgrind)" for t in tools_missing()]
    if not os.path.exists(envoy_bin()):
        problems.append(f"no Envoy at {envoy_bin()} (make tools)")
    for key, how in BUILT_BY.items():
        if (key == "wasm" or key in a.cells) and not os.path.isfile(files[key]):
            problems.append(f"no {key} module at {files[key]} ({how})")
    if problems:
        raise BenchError("; ".join(problems))


def environment() -> dict:
    def out(cmd: list[str]) -> str:
        try:
            return subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                  timeout=60).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            return "?"
    version = out([envoy_bin(), "--version"])
    cpu = "?"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"envoy_version": version.split("version:")[-1].strip() if "version:" in version else version,
            "valgrind": out(["valgrind", "--version"]), "cpu_model": cpu, "cpus": os.cpu_count(),
            "kernel": platform.release(), "loadavg_at_start": os.getloadavg()}


def _sigterm(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def run(a: argparse.Namespace) -> dict:
    files = cell_files(a)
    preflight(a, files)
    params = Params(requests=a.requests, warmup=a.warmup, runs=a.runs)
    started = _dt.datetime.now(_dt.timezone.utc)
    t0 = time.monotonic()
    work = ROOT / "build" / "bench" / "instr-work"
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    procs = Processes()
    res: dict = {"schema": "instr-1", "started": started.isoformat(timespec="seconds"), "env": environment(),
                 "params": {"requests": a.requests, "warmup": a.warmup, "runs": a.runs, "idle_s": params.idle_s, "workers": 1,
                            "agreement_pct": AGREEMENT_PCT, "rss_requests": a.rss_requests},
                 "cells": a.cells, "labels": {k: LABEL[k] for k in a.cells},
                 "files": {k: {"path": os.path.relpath(v, ROOT), "bytes": os.path.getsize(v)}
                           for k, v in files.items() if os.path.isfile(v)},
                 "runs": [], "failures": []}
    try:
        shared = Shared(procs, work)
        runner = CellRunner(shared, files, params)
        # The native Envoys (RSS, wasm call counts) are not under Callgrind and their figures do not
        # depend on what else runs: they run beside the counted cells, one Callgrind Envoy at a time.
        with ThreadPoolExecutor(max_workers=1) as pool:
            native = pool.submit(native_phase, a, runner)
            for rnd in range(1, a.runs + 1):
                print(f"run {rnd}/{a.runs}", flush=True)
                for key in a.cells:
                    res["runs"].append(measure_cell(runner, key, rnd))
                    res["failures"] += [f"{LABEL[key]} {key} run {rnd}: {p}" for p in res["runs"][-1]["problems"]]
            res["summary"] = summarize(res)
            res["phases"] = {"callgrind_cells_s": time.monotonic() - t0}
            res["profiles"] = {}
            if not a.no_profiles:
                res["profiles"]["dynmod"] = dynmod_profile(a, runner, files, res)
            res["phases"]["callgrind_s"] = time.monotonic() - t0
            native_res = native.result()
        res["profiles"]["wasm_calls"] = native_res.get("wasm_calls", {})
        if "memory" in native_res:
            res["memory"] = native_res["memory"]
        res["phases"]["native_s"] = native_res["seconds"]
    finally:
        procs.stop_all()
    res["finished"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    res["elapsed_s"] = time.monotonic() - t0
    res["env"]["loadavg_at_end"] = os.getloadavg()
    return res


def measure_cell(runner: CellRunner, key: str, rnd: int) -> dict:
    r = runner.measure(key, rnd)
    if rnd == 1 and "direct" in r:
        d = r["direct"]
        r["objects_direct"] = where.objects_per_request(d, r["background"], r.get("maps", []))
        if key in DYNAMIC_MODULE_CELLS:
            r["module_direct"] = where.module_summary(d["dump"], d["requests"], os.path.realpath(runner.files[key]))
    print(f"  {LABEL[key]:6} {key:17} " + "  ".join(f"{rk} {r[rk]['ir_per_request']:9,.0f} Ir/req" for rk in ROUTES if rk in r)
          + f"  (start {r['start_s']:.0f} s, cell {r['elapsed_s']:.0f} s)", flush=True)
    return r


def native_phase(a: argparse.Namespace, runner: CellRunner) -> dict:
    t0 = time.monotonic()
    out: dict = {"wasm_calls": {}}
    if not a.no_profiles:
        for key in where.WASM_TRACE_CELLS:
            if key in a.cells:
                out["wasm_calls"][key] = where.wasm_calls(runner, key)
                print(f"  proxy-wasm calls of {LABEL[key]} {key} counted", flush=True)
    if not a.no_memory:
        out["memory"] = memory.measure_all(runner, [c for c in memory.MEMORY_CELLS if c in a.cells], a.rss_requests)
    out["seconds"] = time.monotonic() - t0
    return out


def dynmod_profile(a: argparse.Namespace, runner: CellRunner, files: dict[str, str], res: dict) -> dict:
    if "dynmod" not in a.cells:
        return {"missing": "cell (d) not run"}
    if not os.path.isfile(a.dynmod_symbols):
        return {"missing": f"no symbol build at {a.dynmod_symbols} (make bench-symbols)"}
    print("profile: the dynamic module with symbols", flush=True)
    sym = CellRunner(runner.shared, {**files, "dynmod": a.dynmod_symbols}, runner.params)
    shipped = res["summary"]["direct"].get("dynmod", {}).get("mean")
    return where.dynmod_profile(sym, os.path.realpath(a.dynmod_symbols), shipped)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    if a.compare:
        print(compare_markdown(*(json.loads(p.read_text()) for p in a.compare)))
        return 0
    if a.render:
        res = json.loads(a.render.read_text())
        write_report(res, a.markdown, a.chart)
        print(f"wrote {a.markdown} and {a.chart}")
        return 0
    signal.signal(signal.SIGTERM, _sigterm)
    try:
        res = run(a)
    except KeyboardInterrupt:
        print("interrupted; everything started was stopped", file=sys.stderr)
        return 130
    except (BenchError, EnvoyExited, TimeoutError, OSError) as ex:
        print(f"bench failed: {ex}", file=sys.stderr)
        return 1
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(res, indent=1))
    print(f"wrote {os.path.relpath(a.out, ROOT)} ({res['elapsed_s'] / 60:.1f} min)")
    for line in res["summary"]["disagreements"]:
        print(f"runs disagree: {line}")
    if not a.no_report:
        write_report(res, a.markdown, a.chart)
        print(f"wrote {a.markdown} and {a.chart}")
    if res["failures"]:
        print(f"{len(res['failures'])} failure(s):", file=sys.stderr)
        for f in res["failures"]:
            print(f"  {f}", file=sys.stderr)
        return 1
    return 0
