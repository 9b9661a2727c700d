"""Medians and spreads over rounds, and per-round ratios and differences between cells (paired by
round, so what a round shares cancels)."""

from __future__ import annotations

import statistics
from typing import Any, Callable

from .common import ROUTES

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
    ("dynmod", "native", "(d) / (b) oauth2-cc dynamic module vs native injector"),
    ("dynmod", "none", "(d) / (a) oauth2-cc dynamic module vs no filter"),
    ("dynmod", "floor_native", "(d) / (fd) oauth2-cc dynamic module above the native floor"),
    ("native", "none", "(b) / (a) native injector vs no filter"),
    ("floor", "none", "(f) / (a) proxy-wasm floor vs no filter"),
    ("floor", "native", "(f) / (b) proxy-wasm floor vs native injector"),
    ("floor_native", "native", "(fd) / (b) native floor vs native injector"),
    ("floor_native", "none", "(fd) / (a) native floor vs no filter"),
    ("oauth2cc", "floor", "(c) / (f) oauth2-cc above the proxy-wasm floor"),
    ("oauth2cc_nopurge", "floor", "(c0) / (f) oauth2-cc without 401 purge above the proxy-wasm floor"),
    ("oauth2cc", "oauth2cc_nopurge", "(c) / (c0) the 401 purge's response-side `:status` read"),
    ("oauth2cc_nomatch", "none", "(w) / (a) oauth2-cc loaded, no route matching, vs no filter"),
    ("oauth2cc", "oauth2cc_nomatch", "(c) / (w) the filter's own work on a hit"),
    ("perroute", "none", "(p) / (a) route without the per-route enable vs no filter"),
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
