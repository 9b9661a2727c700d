#!/usr/bin/env python3
"""The capacity model of docs/capacity.md: token requests per hour a fleet of Envoys sends the IdP.

    python3 tools/capacity.py            # the tables of docs/capacity.md (Markdown)
    python3 tools/capacity.py --cases    # tools/capacity_cases.json: the refresh rule on sample lifetimes

Every Envoy process keeps one token per profile and asks for a new one at the refresh time of the
current one, so one process and profile send 3600 / refresh_period token requests an hour (plus one
at start-up). The refresh rule lives in ``token_times`` below, a copy of ``token_times`` in
src/core/cache.rs; src/core/capacity_rule.rs runs the Rust function on tools/capacity_cases.json and
fails when the two differ, and tests/e2e/test_capacity.py fails when the doc's tables or the cases
file are not this script's output. Change the rule here, run ``--cases``, paste the tables.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import NamedTuple

REPO_ROOT = Path(__file__).resolve().parents[1]
CASES_PATH = REPO_ROOT / "tools" / "capacity_cases.json"
HOUR_MS = 3_600_000
BUDGET_WINDOW_MS = HOUR_MS  # src/core/cache.rs BUDGET_WINDOW_MS: a fixed window from its first fetch


MIN_MARGIN_MS = 1_000  # src/core/cache.rs MIN_MARGIN_MS


def _round(x: float) -> int:
    """Rust's f64::round for x >= 0: halves away from zero (Python's round() goes to even)."""
    whole = math.floor(x)
    return int(whole) + (1 if x - whole >= 0.5 else 0)


def expiry_margin_ms(lifetime_ms: int, skew_s: int) -> int:
    """src/core/cache.rs expiry_margin_ms: skew_s, at most a tenth of the lifetime, but at least
    MIN_MARGIN_MS unless that would leave nothing."""
    margin = min(skew_s * 1000, lifetime_ms // 10)
    return max(margin, MIN_MARGIN_MS) if lifetime_ms > MIN_MARGIN_MS else margin


def token_times(sent_at_ms: int, lifetime_s: int, refresh_in_s: int | None, ahead_ratio: float,
                skew_s: int) -> tuple[int, int]:
    """(refresh_at_ms, expires_at_ms) of a token whose request was sent at ``sent_at_ms``, as
    src/core/cache.rs ``token_times`` computes them for a token without its own ``exp``: usable
    for the lifetime less the margin; refreshed at ahead_ratio x lifetime (the IdP's refresh_in
    wins), but at least min(1 s, (1 - ahead_ratio) x usable life) before the end. Integer
    milliseconds, rounded as the Rust code rounds."""
    lifetime_ms = lifetime_s * 1000
    expires_at = sent_at_ms + lifetime_ms - expiry_margin_ms(lifetime_ms, skew_s)
    if refresh_in_s is not None:
        refresh_at = sent_at_ms + refresh_in_s * 1000
    else:
        usable_ms = max(expires_at - sent_at_ms, 0)
        lead_ms = min(MIN_MARGIN_MS, _round(float(usable_ms) * (1.0 - ahead_ratio)))
        by_ratio = sent_at_ms + _round(float(lifetime_ms) * ahead_ratio)
        refresh_at = min(by_ratio, max(expires_at - lead_ms, 0))
    return min(refresh_at, expires_at), expires_at


def refresh_period_ms(lifetime_s: int, ahead_ratio: float = 0.8, skew_s: int = 5,
                      refresh_in_s: int | None = None) -> int:
    """Time between two token requests of one process and profile in steady state."""
    return token_times(0, lifetime_s, refresh_in_s, ahead_ratio, skew_s)[0]


def requests_per_hour(processes: int, profiles: int, lifetime_s: int, ahead_ratio: float = 0.8,
                      skew_s: int = 5) -> float:
    """Steady-state token requests per hour of the whole fleet (restarts add one per process and
    profile each)."""
    return processes * profiles * HOUR_MS / refresh_period_ms(lifetime_s, ahead_ratio, skew_s)


def budget_floor(lifetime_s: int, ahead_ratio: float = 0.8, skew_s: int = 5) -> int:
    """The smallest max_fetches_per_hour that never refuses a scheduled refresh: the budget counts
    fetches in a fixed hour from the first one, and fetches P apart fit ceil(3600 s / P) times."""
    return math.ceil(BUDGET_WINDOW_MS / refresh_period_ms(lifetime_s, ahead_ratio, skew_s))


class Scenario(NamedTuple):
    label: str
    processes: int
    profiles: int
    lifetime_s: int
    ahead_ratio: float


SCENARIOS = [
    Scenario("per-sidecar, 5,000 sidecars", 5000, 3, 3600, 0.8),
    Scenario("per-sidecar, 5,000 sidecars", 5000, 3, 3600, 0.5),
    Scenario("per-sidecar, 5,000 sidecars", 5000, 3, 300, 0.8),
    Scenario("per-sidecar, 500 sidecars", 500, 3, 3600, 0.8),
    Scenario("egress gateway, 3 replicas", 3, 3, 3600, 0.8),
    Scenario("egress gateway, 3 replicas", 3, 3, 300, 0.8),
    Scenario("egress gateway, 10 replicas", 10, 3, 300, 0.8),
]
QUOTA_PER_HOUR = 1000  # an IdP quota for one client_id, for the budget table
BUDGET_SCENARIOS = [
    Scenario("per-sidecar, 5,000 sidecars", 5000, 1, 3600, 0.8),
    Scenario("per-sidecar, 500 sidecars", 500, 1, 3600, 0.8),
    Scenario("egress gateway, 3 replicas", 3, 1, 3600, 0.8),
    Scenario("egress gateway, 3 replicas", 3, 1, 300, 0.8),
]


def _duration(seconds: float) -> str:
    if seconds >= 3600 and seconds % 3600 == 0:
        return f"{seconds // 3600:g} h"
    if seconds >= 60:
        return f"{seconds / 60:g} min"
    return f"{seconds:g} s"


def _num(x: float) -> str:
    return f"{x:,.0f}" if x >= 100 else f"{x:,.2f}".rstrip("0").rstrip(".")


def fleet_table() -> str:
    rows = ["| deployment | Envoy processes | profiles | token lifetime | ahead_ratio | one request per process and profile every | token requests / hour |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for s in SCENARIOS:
        period = refresh_period_ms(s.lifetime_s, s.ahead_ratio) / 1000
        rows.append(f"| {s.label} | {s.processes:,} | {s.profiles} | {_duration(s.lifetime_s)} | {s.ahead_ratio:g} "
                    f"| {_duration(period)} | {_num(requests_per_hour(s.processes, s.profiles, s.lifetime_s, s.ahead_ratio))} |")
    return "\n".join(rows)


def budget_table() -> str:
    rows = [f"| deployment (one profile, quota {QUOTA_PER_HOUR:,} / hour) | token lifetime | steady requests / hour "
            "| budget floor per process | largest budget the quota allows per process | fits? |",
            "| --- | ---: | ---: | ---: | ---: | --- |"]
    for s in BUDGET_SCENARIOS:
        floor = budget_floor(s.lifetime_s, s.ahead_ratio)
        allowed = QUOTA_PER_HOUR // (s.processes * s.profiles)
        fits = "yes" if allowed >= floor else "no: the quota is smaller than the fleet's steady need"
        rows.append(f"| {s.label} | {_duration(s.lifetime_s)} | {_num(requests_per_hour(s.processes, s.profiles, s.lifetime_s, s.ahead_ratio))} "
                    f"| {floor} | {allowed} | {fits} |")
    return "\n".join(rows)


def tables() -> str:
    return fleet_table() + "\n\n" + budget_table() + "\n"


# Lifetimes and settings the cases file covers: long, short, tiny tokens, ratios at the bounds,
# an IdP refresh_in inside and past expiry.
CASE_INPUTS = [
    (3600, None, 0.8, 5), (3600, None, 0.5, 5), (3600, None, 1.0, 5), (300, None, 0.8, 5),
    (100, None, 0.8, 5), (30, None, 0.8, 5), (10, None, 0.8, 5), (3, None, 0.8, 5), (2, None, 0.8, 5),
    (1, None, 0.8, 5), (0, None, 0.8, 5), (5, None, 0.95, 5), (11, None, 0.5, 0),
    (86400, None, 0.8, 30), (7, None, 0.33, 5), (3600, 600, 0.8, 5), (100, 300, 0.8, 5),
]


def cases() -> list[dict]:
    out = []
    for lifetime_s, refresh_in_s, ratio, skew_s in CASE_INPUTS:
        refresh_at, expires_at = token_times(1_000, lifetime_s, refresh_in_s, ratio, skew_s)
        out.append({"sent_at_ms": 1_000, "lifetime_s": lifetime_s, "refresh_in_s": refresh_in_s,
                    "ahead_ratio": ratio, "skew_s": skew_s, "refresh_at_ms": refresh_at, "expires_at_ms": expires_at})
    return out


def cases_text() -> str:
    return json.dumps(cases(), indent=1) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", action="store_true", help=f"write {CASES_PATH.relative_to(REPO_ROOT)}")
    args = ap.parse_args()
    if args.cases:
        CASES_PATH.write_text(cases_text())
        print(f"wrote {CASES_PATH.relative_to(REPO_ROOT)}")
    else:
        print(tables(), end="")


if __name__ == "__main__":
    main()
