"""The benchmark's judgement of the machine and its goals table (bench/oauth2_bench), without
running a benchmark: a noisy run must be refused, a forced one must carry its banner."""

from __future__ import annotations

import argparse
import sys

from envoy import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / "bench"))

from oauth2_bench import machine  # noqa: E402
from oauth2_bench.cli import report  # noqa: E402
from oauth2_bench.goals import verdict  # noqa: E402
from oauth2_bench.measure import module_name  # noqa: E402
from oauth2_bench.stats import summarize  # noqa: E402

QUIET_START = {"busy": {"cpu0": 0.02, "cpu1": 0.03}, "loadavg": ["0.05", "0.10", "0.20"], "top": []}


def rounds(walls: list[float], steal: float = 0.0, on_cpu: float = 0.995) -> list[dict]:
    return [{"round": i + 1, "calibration_before": {"wall_s": w, "cpu_s": w * on_cpu},
             "calibration_after": {"wall_s": w, "cpu_s": w * on_cpu}, "steal_fraction": steal}
            for i, w in enumerate(walls)]


def cells(none_cpu: list[float], other: float = 1.0) -> list[dict]:
    out = []
    for i, cpu in enumerate(none_cpu):
        for rk in ("direct", "upstream"):
            for key, extra in (("none", 0.0), ("oauth2cc", 2.0)):
                out.append({"config": key, "route": rk, "round": i + 1, "cpu_us_per_req": cpu + extra,
                            "rps": 1e6 / (cpu + extra), "p50_ms": 1.0, "p99_ms": 2.0, "p999_ms": 3.0,
                            "max_ms": 4.0, "core_other_pct": other, "token_requests": 0})
    return out


def failed(verdicts: list[dict]) -> list[str]:
    return [v["name"] for v in verdicts if not v["ok"]]


def test_a_quiet_run_passes_every_check():
    v = machine.judge(QUIET_START, rounds([0.200, 0.201, 0.202]), cells([13.0, 13.2, 13.1]))
    assert machine.quiet(v), [x["text"] for x in v]
    assert {x["name"] for x in v} == {"start_busy", "steal", "calibration_drift", "calibration_wait",
                                      "baseline_spread_direct",
                                      "baseline_spread_upstream", "core_other"}


def test_each_disturbance_is_named():
    busy = {**QUIET_START, "busy": {"cpu0": 0.9, "cpu1": 0.1}, "top": [{"pid": 7, "comm": "rustc", "cpu_pct": 90.0}]}
    assert failed(machine.judge(busy, rounds([0.2] * 3), cells([13.0] * 3))) == ["start_busy"]
    assert failed(machine.judge(QUIET_START, rounds([0.2] * 3, steal=0.05), cells([13.0] * 3))) == ["steal"]
    assert failed(machine.judge(QUIET_START, rounds([0.2, 0.2, 0.25]), cells([13.0] * 3))) == ["calibration_drift"]
    # a neighbour sharing the core the whole run: no drift, but the loop waits half the time
    shared = machine.judge(QUIET_START, rounds([0.4] * 3, on_cpu=0.5), cells([13.0] * 3))
    assert failed(shared) == ["calibration_wait"], [x["text"] for x in shared]
    v = machine.judge(QUIET_START, rounds([0.2] * 3), cells([13.0, 13.1, 38.3]))
    assert failed(v) == ["baseline_spread_direct", "baseline_spread_upstream"], [x["text"] for x in v]
    assert failed(machine.judge(QUIET_START, rounds([0.2] * 3), cells([13.0] * 3, other=40.0))) == ["core_other"]
    # the text shows the judged value and the limit
    text = next(x["text"] for x in v if x["name"] == "baseline_spread_direct")
    assert "38.30" in text and "limit 5.0%" in text, text


def test_what_cannot_be_measured_is_not_quiet():
    v = machine.judge(QUIET_START, rounds([0.2]), cells([13.0]))  # one round: no spread
    assert "baseline_spread_direct" in failed(v), [x["text"] for x in v]


def result(verdicts: list[dict]) -> dict:
    cs = cells([13.0, 13.1, 13.2])
    return {"machine": {"verdicts": verdicts, "quiet": machine.quiet(verdicts)}, "mode": "full",
            "params": {"rounds": 3, "duration_s": 10, "warmup_s": 2, "initial_warmup_s": 3, "connections": 32,
                       "threads": 1, "concurrency": 2, "envoy_cpu": "0", "load_cpu": "1",
                       "refresh_expires_in_s": 6, "refresh_ahead_ratio": 0.5},
            "env": {"cpu_model": "x", "cpus": 2, "threads_per_core": "1", "kernel": "k", "envoy_version": "1.40.0",
                    "wrk_version": "4", "loadavg_at_end": ["0", "0", "0"]},
            "configs": [{"key": "none", "label": "(a)", "description": "no filter"},
                        {"key": "oauth2cc", "label": "(c)", "description": "oauth2-cc"}],
            "skipped": {"dynmod": "no module"}, "failures": [], "summary": summarize(cs), "cells": cs,
            "wasm": {"path": "build/oauth2_cc.wasm", "bytes": 1}, "modules": {},
            "rss_kib": {"after_ready": {}, "after_runs": {"none": 68000, "oauth2cc": 119000}},
            "injection_check": {"start": {}, "end": {}, "refresh_token_requests_total": 3},
            "native_filter": {}, "native_secret": {}, "profiles": {},
            "started": "s", "finished": "f"}


def test_noisy_run_writes_no_report_unless_forced(tmp_path):
    noisy = machine.judge(QUIET_START, rounds([0.2, 0.3]), cells([13.0, 13.1]))
    md = tmp_path / "BENCHMARKS.md"
    args = argparse.Namespace(smoke=False, force=False, no_report=False, markdown=md, chart=None,
                              out=tmp_path / "r.json")
    assert report(args, result(noisy)) == 1
    assert not md.exists()
    args.force = True
    assert report(args, result(noisy)) == 0
    text = md.read_text()
    assert "NOISY RUN" in text and "calibration loop drift" in text, text[:600]
    md.unlink()
    args.force = False
    quiet = machine.judge(QUIET_START, rounds([0.2, 0.2]), cells([13.0, 13.1]))
    assert report(args, result(quiet)) == 0
    text = md.read_text()
    assert "NOISY RUN" not in text and "n/a: (d) not measured" in text, text[:600]


def test_goal_verdicts_say_met_or_by_how_much():
    assert verdict(0.12, "<=", 0.2, " µs") == "0.12 µs met"
    assert verdict(0.45, "<=", 0.2, " µs") == "0.45 µs **missed by 0.25 µs**"
    assert verdict(0.95, ">=", 0.97, "×") == "0.95× **missed by 0.02×**"
    assert verdict(-0.4, "abs<=", 0.3, " µs") == "-0.40 µs **missed by 0.10 µs**"
    assert verdict(None, "<=", 0.2, " µs") == "n/a"


def test_module_name_from_the_file_name():
    assert module_name("/x/liboauth2_cc.so") == "oauth2_cc"
    assert module_name("bench/floor-native/target/release/libfloor_native.so") == "floor_native"
