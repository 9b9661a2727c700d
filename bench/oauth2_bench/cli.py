"""Arguments, pre-flight checks, and ``main``: start check of the machine, the run, the verdicts,
and the report, which is written only from a quiet run (or with ``--force``, with a banner)."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
from pathlib import Path

from . import machine
from .common import (DEFAULT_CHART, DEFAULT_DYNMOD, DEFAULT_FLOOR_WASM, DEFAULT_MD, DEFAULT_OUT, FLOOR_NATIVE_DIR,
                     LABEL, ROOT, ROUTES, BenchError)
from .measure import Bench
from .processes import Processes
from .report import fmt, ratio_txt, write_report

from envoy import EnvoyExited, envoy_bin  # noqa: E402

DOC = """`make bench-time`: Envoy with no filter, with Envoy's own credential_injector (oauth2), with
oauth2-cc (proxy-wasm and dynamic module) and the floors of both module kinds, measured in one
invocation on the same Envoy binary with the same load generator (wrk): the wall-clock view.
`make bench` counts instructions instead (bench/run.py), which a busy machine does not change.

    .venv/bin/python bench/run_time.py                      # 5 interleaved rounds of 10 s per cell
    .venv/bin/python bench/run_time.py --rounds 9 --duration 20
    .venv/bin/python bench/run_time.py --smoke              # each cell once for 2 s; exit 1 on any failure
    .venv/bin/python bench/run_time.py --force              # write the report even from a noisy run (with a banner)
    .venv/bin/python bench/run_time.py --render build/bench/results.json   # redraw the report + chart

docs/benchmarks-time.md is written only when the machine was quiet (bench/oauth2_bench/machine.py judges it);
otherwise the run prints why and exits 1.
"""


def default_floor_native() -> str | None:
    found = sorted(FLOOR_NATIVE_DIR.glob("target/release/lib*.so")) + sorted(
        FLOOR_NATIVE_DIR.glob("target/*/release/lib*.so"))
    return str(found[0]) if found else None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=DOC.split("\n\n")[0], epilog=DOC.split("\n\n", 1)[1],
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
    ap.add_argument("--floor-native", default=default_floor_native(),
                    help="the native floor, a dynamic module lib<name>.so (default: bench/floor-native's cargo "
                    "output); cell (fd) is skipped when absent")
    ap.add_argument("--dynmod", default=os.environ.get("OAUTH2_CC_NATIVE") or str(DEFAULT_DYNMOD),
                    help="the oauth2-cc dynamic module (default $OAUTH2_CC_NATIVE, else build/liboauth2_cc.so); "
                    "cell (d) is skipped when absent")
    ap.add_argument("--dynmod-stat", default="oauth2_cc.default.injected",
                    help="the dynamic module's injected counter (matched as a name suffix)")
    ap.add_argument("--perf", default="auto", help="comma-separated configurations to profile with perf in the "
                    "last round's direct cell; 'auto' (default): none,native,floor,floor_native,oauth2cc_nopurge,"
                    "oauth2cc,dynmod when perf is installed; '' for none")
    ap.add_argument("--smoke", action="store_true",
                    help="each cell once for 2 s; no report; exit 1 if a cell failed or a token was missing")
    ap.add_argument("--force", action="store_true",
                    help="run and write the report even when the machine is not quiet (the report says so)")
    ap.add_argument("--out", type=Path, default=None, help="results JSON (default build/bench/results.json)")
    ap.add_argument("--markdown", type=Path, default=DEFAULT_MD, help="report (default docs/benchmarks-time.md)")
    ap.add_argument("--chart", type=Path, default=DEFAULT_CHART, help="chart (default bench/time-chart.png)")
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
    a.floor_native = str(Path(a.floor_native).resolve()) if a.floor_native else None
    a.dynmod = str(Path(a.dynmod).resolve()) if a.dynmod else None
    if a.perf == "auto":
        a.perf = ("none,native,floor,floor_native,oauth2cc_nopurge,oauth2cc,dynmod"
                  if shutil.which("perf") and not a.smoke else "")
    a.perf = [k for k in a.perf.split(",") if k]
    unknown = [k for k in a.perf if k not in LABEL]
    if unknown:
        ap.error(f"--perf: unknown configuration(s) {unknown}; known: {list(LABEL)}")
    return a


def parse_cpus(spec: str | None) -> list[int]:
    out: list[int] = []
    for part in (spec or "").split(","):
        if not part:
            continue
        lo, _, hi = part.partition("-")
        out += list(range(int(lo), int(hi or lo) + 1))
    return out


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


def _sigterm(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def print_verdicts(verdicts: list[dict]):
    for v in verdicts:
        print(f"  [{'ok' if v['ok'] else 'NOISY'}] {v['text']}")


def check_start(a: argparse.Namespace) -> tuple[dict, bool]:
    """The machine before anything starts: (measurement, go on?)."""
    start = machine.machine_at_start()
    v = machine.judge(start, [], [])[0]
    print("machine at start:")
    print_verdicts([v])
    if v["ok"] or a.smoke or a.force:
        if not v["ok"]:
            print("  the machine is busy; " + ("a smoke run only checks that the harness works" if a.smoke
                                              else "--force: running anyway, the report will say so"))
        return start, True
    print("the machine is busy: a run now would be judged noisy. Stop the other work, or pass --force.",
          file=sys.stderr)
    return start, False


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    if a.render:
        return render_only(a)
    preflight(a)
    start, go = check_start(a)
    if not go:
        return 1
    signal.signal(signal.SIGTERM, _sigterm)
    if a.load_cpu is not None:
        os.sched_setaffinity(0, set(parse_cpus(a.load_cpu)))  # the token servers' threads too
    procs = Processes()
    bench = Bench(a, procs)
    try:
        res = bench.run(start)
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
    print_summary(res)
    rc = report(a, res)
    if res["failures"]:
        print(f"{len(res['failures'])} failure(s):", file=sys.stderr)
        for f in res["failures"]:
            print(f"  {f}", file=sys.stderr)
        return 1
    return rc


def report(a: argparse.Namespace, res: dict) -> int:
    """Print the verdicts; write the report from a quiet full run (or a forced one). Exit code."""
    m = res["machine"]
    print("was the machine quiet?")
    print_verdicts(m["verdicts"])
    if a.smoke:
        print("smoke run: no report (figures of a smoke run are not to be quoted)")
        return 0
    if not m["quiet"] and not a.force:
        print(f"the machine was not quiet: {a.markdown} not written (the results are in "
              f"{a.out}); why: " + "; ".join(v["text"] for v in m["verdicts"] if not v["ok"]), file=sys.stderr)
        return 1
    if not a.no_report:
        write_report(res, a.markdown, a.chart)
        print(f"wrote {a.markdown} and {a.chart}" + ("" if m["quiet"] else " (with a NOISY RUN banner: --force)"))
    return 0


def render_only(a: argparse.Namespace) -> int:
    res = json.loads(a.render.read_text())
    m = res.get("machine")
    if (not m or not m["quiet"]) and not a.force:
        print(f"{a.render}: " + ("the run was judged noisy" if m else "the run was not judged (an older harness)")
              + "; pass --force to render it with a banner", file=sys.stderr)
        return 1
    write_report(res, a.markdown, a.chart)
    print(f"wrote {a.markdown} and {a.chart}")
    return 0


def print_summary(res: dict):
    summ = res["summary"]
    print(f"\nwasm {res['wasm']['bytes']} bytes; VmRSS after runs (MiB): "
          + ", ".join(f"{k} {fmt(v / 1024 if v else None, 1)}" for k, v in res["rss_kib"]["after_runs"].items()))
    for rk in ROUTES:
        r = summ["ratios"][rk]
        line = (f"{rk:8}: oauth2cc/none cpu {ratio_txt(r['oauth2cc/none']['cpu_us_per_req'])} "
                f"rps {ratio_txt(r['oauth2cc/none']['rps'])} | oauth2cc/native cpu "
                f"{ratio_txt(r['oauth2cc/native']['cpu_us_per_req'])} rps {ratio_txt(r['oauth2cc/native']['rps'])}")
        for key, lab in (("dynmod/native", "dynmod-native"), ("perroute/none", "perroute-none")):
            if r[key]["cpu_us_added"]:
                line += f" | {lab} {ratio_txt(r[key]['cpu_us_added'], 2, ' µs')}"
        print(line + f" | refresh p99/steady p99 {ratio_txt(summ['refresh'][rk]['p99_ratio'])}")
