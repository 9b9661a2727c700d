"""Issue 12's goals, judged on the medians of per-round figures on both routes, and the memory
goals on VmRSS after the runs. Each row says "met" or by how much it is missed; a goal whose cells
were not measured says so."""

from __future__ import annotations

from typing import Any

from .common import LABEL

# (numerator/denominator, metric, comparison, bound, text). "abs<=": |value| <= bound.
CPU_GOALS = [
    ("dynmod/floor_native", "cpu_us_added", "<=", 0.2, "(d) Envoy CPU per request within 0.2 µs of the native floor (fd)"),
    ("dynmod/native", "cpu_us_added", "<=", 0.5, "(d) within 0.5 µs of the native injector (b)"),
    ("dynmod/native", "rps", ">=", 0.97, "(d) throughput ≥ 0.97× (b)"),
    ("dynmod/none", "p99_ms_added", "<=", 0.05, "(d) p99 within 0.05 ms of no filter (a)"),
    ("dynmod/native", "cpu_us_added", "<=", 0.0, "(d) stretch: below (b) outright"),
    ("oauth2cc_nopurge/floor", "cpu_us_added", "<=", 0.5,
     "(c0) proxy-wasm, `purge_on_status: []`: within 0.5 µs of the proxy-wasm floor (f)"),
    ("oauth2cc/floor", "cpu_us_added", "<=", 1.0, "(c) proxy-wasm, default purge: within 1 µs of (f)"),
    ("perroute/none", "cpu_us_added", "abs<=", 0.3,
     "(p) a route with the filter disabled on the HCM and not enabled per route: within 0.3 µs of (a)"),
]
MIB = 1024
# (cell, reference, bound MiB, text)
MEMORY_GOALS = [
    ("dynmod", "none", 5.0, "Envoy RSS with the dynamic module (d) within 5 MiB of no filter (a)"),
    ("oauth2cc", "floor", 8.0, "Envoy RSS with the wasm build (c) within 8 MiB of the proxy-wasm floor (f)"),
]


def _unit(metric: str) -> str:
    return "×" if metric == "rps" else (" ms" if metric.startswith("p99") else " µs")


def verdict(value: float | None, op: str, bound: float, unit: str, nd: int = 2) -> str:
    if value is None:
        return "n/a"
    ok = {"<=": value <= bound, ">=": value >= bound, "abs<=": abs(value) <= bound}[op]
    shown = f"{value:+.{nd}f}{unit}" if op == "abs<=" else f"{value:.{nd}f}{unit}"
    if ok:
        return f"{shown} met"
    miss = abs(value) - bound if op == "abs<=" else abs(value - bound)
    return f"{shown} **missed by {miss:.{nd}f}{unit}**"


def _missing(res: dict, key: str) -> str:
    # The reason is listed once, under "Cells not measured in this run".
    return f"n/a: {LABEL.get(key, key)} not measured" if key in res.get("skipped", {}) else "n/a"


def goals_markdown(res: dict) -> list[str]:
    summ = res["summary"]
    present = {c["key"] for c in res["configs"]}
    L = ["## Goals", "",
         "Medians of per-round differences and ratios (paired by round) on each route; \"missed by\" is how far "
         "the median is from the bound. (f) is the cheapest proxy-wasm module that writes a header, (fd) the "
         "cheapest dynamic module that does: a goal a floor misses cannot be met by any module of its kind on "
         "this Envoy.", "",
         "| goal | route `direct` | route `upstream` |", "| --- | --- | --- |"]
    for key, metric, op, bound, text in CPU_GOALS:
        num, den = key.split("/")
        absent = [k for k in (num, den) if k not in present]
        if absent:
            cells = [_missing(res, absent[0])] * 2
        else:
            cells = []
            for rk in ("direct", "upstream"):
                sp = summ["ratios"].get(rk, {}).get(key, {}).get(metric)
                cells.append(verdict(sp["median"] if sp else None, op, bound, _unit(metric)))
        L.append(f"| {text} | " + " | ".join(cells) + " |")
    rss = res["rss_kib"]["after_runs"]
    for cell, ref, bound, text in MEMORY_GOALS:
        absent = [k for k in (cell, ref) if k not in present]
        if absent:
            v = _missing(res, absent[0])
        elif rss.get(cell) and rss.get(ref):
            v = verdict((rss[cell] - rss[ref]) / MIB, "<=", bound, " MiB", 1)
        else:
            v = "n/a"
        L.append(f"| {text} | {v} (VmRSS after the runs) | |")
    rf = summ["refresh"].get("direct", {}).get("p99_ratio")
    if rf:
        ok = abs(rf["median"] - 1) <= 0.10
        L.append(f"| p99 during a background refresh equal to steady state (median (c')/(c) within ±10%) | "
                 f"{rf['median']:.2f}× {'met' if ok else '**missed**'} | |")
    L += ["", _where_the_time_goes(summ, res["params"]["rounds"]), ""]
    return L


def _added(summ: dict, key: str) -> str:
    sp: Any = summ["ratios"].get("direct", {}).get(key, {}).get("cpu_us_added")
    return f"{sp['median']:.2f} µs" if sp else "n/a"


def _where_the_time_goes(summ: dict, rounds: int) -> str:
    return ("Where the time goes, Envoy CPU per request on `direct` (medians of per-round differences): "
            f"the proxy-wasm floor (f) − (a) = {_added(summ, 'floor/none')} (Envoy's wasm filter creating a context "
            "for the stream, calls into V8 and one host call); the native floor (fd) − (a) = "
            f"{_added(summ, 'floor_native/none')}; the native injector (b) − (a) = {_added(summ, 'native/none')}; "
            f"oauth2-cc above its floors: (c) − (f) = {_added(summ, 'oauth2cc/floor')}, of which the 401 purge's "
            f"`:status` read, (c) − (c0), is {_added(summ, 'oauth2cc/oauth2cc_nopurge')}; (d) − (fd) = "
            f"{_added(summ, 'dynmod/floor_native')}. A route that does not enable the filter, (p) − (a) = "
            f"{_added(summ, 'perroute/none')}. {rounds} rounds here.")
