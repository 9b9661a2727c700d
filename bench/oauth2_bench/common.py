"""Paths, the benchmark's cells and their labels, shared by every module of the harness."""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "bench"
# The e2e helpers (Envoy process control, bootstrap builders, token servers) are the bench's too.
if str(ROOT / "tests" / "e2e") not in sys.path:
    sys.path.insert(0, str(ROOT / "tests" / "e2e"))

WRK_LUA = BENCH / "wrk_report.lua"
DEFAULT_OUT = ROOT / "build" / "bench" / "results.json"
# The wall-clock view (`make bench-time`) writes its own page; BENCHMARKS.md is `make bench`'s.
DEFAULT_MD = ROOT / "docs" / "benchmarks-time.md"
DEFAULT_CHART = BENCH / "time-chart.png"
DEFAULT_FLOOR_WASM = BENCH / "floor" / "target" / "wasm32-wasip1" / "release" / "floor_injector.wasm"
# The floor's build-time variants (`make bench-floor` builds each into its own target dir).
FLOOR_WASM_VARIANTS = {
    "floor_fm0": BENCH / "floor" / "target" / "fm0" / "wasm32-wasip1" / "release" / "floor_injector.wasm",
    "floor_fm": BENCH / "floor" / "target" / "fm" / "wasm32-wasip1" / "release" / "floor_injector.wasm",
}
# The native floor module (bench/floor-native, built by its own cargo project) and the oauth2-cc
# dynamic module (`make build`). Cells using them are skipped, with the reason printed, when absent.
FLOOR_NATIVE_DIR = BENCH / "floor-native"
DEFAULT_FLOOR_NATIVE = FLOOR_NATIVE_DIR / "target" / "release" / "libfloor_native.so"
# The native floor's `read-headers` build, cell (fdm) (`make bench-floor-native`).
DEFAULT_FLOOR_NATIVE_FDM = FLOOR_NATIVE_DIR / "target" / "fdm" / "release" / "libfloor_native.so"
DEFAULT_DYNMOD = ROOT / "build" / "liboauth2_cc.so"
CLK_TCK = os.sysconf("SC_CLK_TCK")

TOKEN_URL = "http://idp.test/oauth2/token"
CLIENT_ID = "svc-a"
CLIENT_SECRET = "s3cret"
TOKEN_REGEX = "^Bearer tok-[0-9]+$"
# What the upstream route accepts: a client-credentials token, or one exchanged for the bench's
# caller (tests/e2e/exchange_server.py names exchanged tokens ex-<subject>-<n>).
UPSTREAM_TOKEN_REGEX = "^Bearer (tok-[0-9]+|ex-bench-caller-[0-9]+)$"
# The caller whose token the exchange cells exchange, sent on every request of those cells.
EXCHANGE_SUBJECT = "bench-caller"

# key, label, description. Order = the order within each round.
CONFIGS = [
    ("none", "(a)", "no filter"),
    ("native", "(b)", "Envoy credential_injector, oauth2"),
    # The cheapest proxy-wasm module that writes a header (bench/floor): what Envoy's wasm filter
    # and V8 charge any proxy-wasm filter for this job, before the filter's own logic.
    ("floor", "(f)", "floor: minimal proxy-wasm module writing a fixed header (bench/floor)"),
    # The same job as a dynamic module (bench/floor-native): the floor of any native module.
    ("floor_native", "(fd)", "native floor: do-nothing dynamic module setting one header (bench/floor-native)"),
    ("oauth2cc", "(c)", "oauth2-cc, cache hit"),
    # What (b) does: no response-side work (the native injector does not react to an upstream 401).
    ("oauth2cc_nopurge", "(c0)", "oauth2-cc, cache hit, purge_on_status [] (no response-side work, as (b))"),
    ("dynmod", "(d)", "oauth2-cc dynamic module (build/liboauth2_cc.so), cache hit"),
    ("oauth2cc_refresh", "(c')", "oauth2-cc, 6 s token, background refresh every 3 s"),
    # The same wasm module with no route matching: what the proxy-wasm plumbing (V8 calls per
    # stream) costs before the filter does any work of its own.
    ("oauth2cc_nomatch", "(w)", "oauth2-cc loaded, no route matches (proxy-wasm plumbing only)"),
    # The filter disabled on the HTTP connection manager and enabled per route elsewhere; the
    # measured route does not enable it, so Envoy never calls the filter there.
    ("perroute", "(p)", "oauth2-cc disabled on the HCM, measured route without the per-route enable"),
]
# Cells of the instruction-count bench only (`make bench`): the floors with the reads a token
# filter makes, the cheapest way each ABI allows.
FLOOR_VARIANT_CONFIGS = [
    ("floor_native_fdm", "(fdm)", "native floor reading `:authority` and `:status`, setting one header "
     "(bench/floor-native, feature read-headers)"),
    ("floor_fm", "(fm)", "proxy-wasm floor reading `:authority` and `:status`, writing one header "
     "(bench/floor, feature read-status)"),
    ("floor_fm0", "(fm0)", "proxy-wasm floor reading `:authority`, writing one header (bench/floor, feature "
     "read-authority)"),
]
# Cells of the instruction-count bench only: a hit on a token-exchange profile (RFC 8693), each
# request carrying its caller's subject token (`Authorization: Bearer <a JWS>`), and what Envoy alone
# pays for that header.
EXCHANGE_CONFIGS = [
    ("none_subject", "(a')", "no filter, the request carrying a subject token (`Authorization`, an ES256 JWS)"),
    ("dynmod_exchange", "(dx)", "oauth2-cc dynamic module, token-exchange profile, cache hit for the caller's subject"),
    ("oauth2cc_exchange", "(cx)", "oauth2-cc, token-exchange profile, cache hit for the caller's subject"),
]
EXCHANGE_CELLS = tuple(k for k, _, _ in EXCHANGE_CONFIGS)
# Each exchange cell and the client-credentials cell and no-filter cell it is compared with.
EXCHANGE_PAIRS = {"dynmod_exchange": "dynmod", "oauth2cc_exchange": "oauth2cc", "none_subject": "none"}
LABEL = {k: lab for k, lab, _ in CONFIGS + FLOOR_VARIANT_CONFIGS + EXCHANGE_CONFIGS}
DESC = {k: d for k, _, d in CONFIGS + FLOOR_VARIANT_CONFIGS + EXCHANGE_CONFIGS}
ROUTES = ["direct", "upstream"]
RQ_STAT = "http.ingress_http.downstream_rq_total"
WASM_INJECTED = "wasmcustom.oauth2_cc.default.injected"
INJECTED_STAT = {
    "native": "http.ingress_http.credential_injector.injected",
    "oauth2cc": WASM_INJECTED,
    "oauth2cc_nopurge": WASM_INJECTED,
    "oauth2cc_refresh": WASM_INJECTED,
    "oauth2cc_exchange": WASM_INJECTED,
}
# Cells whose measured route must leave the filter's counter alone (the filter never runs there).
ZERO_INJECTED_STAT = {"perroute": WASM_INJECTED}
STEADY_EXPIRES_IN = 3600
REFRESH_EXPIRES_IN = 6
REFRESH_AHEAD_RATIO = 0.5

# Cells whose measured routes carry no token (their upstream route is /up/open).
NO_TOKEN = ("none", "none_subject", "oauth2cc_nomatch", "perroute")
# Cells that must make no token request while measured (a cache hit throughout).
CACHE_HIT = ("native", "oauth2cc", "oauth2cc_nopurge", "dynmod", "dynmod_exchange", "oauth2cc_exchange")
FLOOR_TOKEN = "Bearer tok-0"  # what bench/floor and bench/floor-native write
FLOORS = ("floor", "floor_native", "floor_native_fdm", "floor_fm", "floor_fm0")


def path_of(config: str, route_kind: str) -> str:
    if route_kind == "direct":
        return "/direct"
    return "/up/open" if config in NO_TOKEN else "/up/auth"


class BenchError(RuntimeError):
    pass


def module_name(so: str) -> str:
    """``lib<name>.so`` -> ``<name>``: how DynamicModuleConfig.name finds the file."""
    m = re.fullmatch(r"lib(.+)\.so", Path(so).name)
    if not m:
        raise BenchError(f"{so}: a dynamic module's file must be named lib<name>.so")
    return m.group(1)
