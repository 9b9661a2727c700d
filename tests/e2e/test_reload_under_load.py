"""Reloads under load.

Envoy with two workers reads its listener from a file (filesystem LDS); the test rewrites it
(temporary file + rename) to push a new plugin configuration with the same ``vm_id`` while a steady
stream of requests runs. Ten reloads: five change nothing the token depends on (``max_wait_ms``, an
extra route), five change a profile's ``scopes`` (part of the cache key). No request may be lost
(each gets 200 with a token), a reload that changes the cache key causes exactly one token request
(for the new scope; every VM shares it), the others none: the cache in shared data survives a
reload, as the README promises. The test prints the token requests per reload and Envoy's wasm VM
counters (whether a reload created VMs or kept them).
"""

from __future__ import annotations

import time

import pytest

from lds import LdsEnvoy, Traffic, scoped_config
from servers import token_by_scope

SETTLE_S = 1.0


# About proxy-wasm's reload with the same vm_id (the VM is kept, on_configure runs again, shared
# data survives): the listener it rewrites is the wasm filter's. test_storms.py reloads both builds
# (the dynamic module's reload is a new filter configuration and driver over the process-wide store).
@pytest.mark.wasm_only
@pytest.mark.parametrize("idp_delay", [0.0, 0.4], ids=["fast_idp", "slow_idp"])
def test_ten_reloads_under_load_lose_nothing_and_fetch_only_on_a_new_cache_key(
        envoy_factory, token_server, upstream, tmp_path, idp_delay):
    """``slow_idp``: each token request takes 0.4 s, so requests after a scope change wait for the
    new token while old and new configurations are both live."""
    token_by_scope(token_server)
    token_server.set_delay(idp_delay)
    scope = "s0"
    lds = LdsEnvoy(envoy_factory, tmp_path, scoped_config(scope), node_id="reload-test")
    e = lds.envoy
    assert e.request("/warm").status == 200
    vm_before = lds.vm_stats()
    rows: list[str] = []
    problems: list[str] = []
    with Traffic(e.port, threads=2) as traffic:
        time.sleep(SETTLE_S)
        for i in range(1, 11):
            changes_key = i % 2 == 0
            if changes_key:
                scope, what = f"s{i}", f"scopes -> [s{i}]"
                config = scoped_config(scope)
            else:
                config = scoped_config(scope, max_wait_ms=6000 + i, extra_routes=i)
                what = f"max_wait_ms -> {6000 + i}, {i} extra route(s)"
            before = token_server.count()
            t0 = time.monotonic()
            lds.reload(config)
            applied = time.monotonic()
            # An absence window for the token requests a reload must not cause.
            time.sleep(SETTLE_S)
            new = token_server.requests[before:]
            scopes = [r.form.get("scope") for r in new]
            # Judged: the requests sent once the new configuration had half the window to take over.
            tokens = sorted({a for _, _, a in traffic.answered_since(applied + SETTLE_S / 2)})
            rows.append(f"reload {i:2d} ({what}): applied in {applied - t0:.2f} s, token requests {len(new)} {scopes}, "
                        f"tokens served from {SETTLE_S / 2:.1f} s after it: {tokens}")
            want = [scope] if changes_key else []
            if scopes != want:
                problems.append(f"reload {i} ({what}): token requests for scopes {scopes}, expected {want}")
            if not tokens or not all(t and t.startswith(f"Bearer tok-{scope}-") for t in tokens):
                problems.append(f"reload {i} ({what}): after it, requests carried {tokens}, expected a {scope} token")
    results = traffic.results
    lost = [r for r in results if r[1] != 200 or not (r[2] or "").startswith("Bearer tok-")]
    vm_after = lds.vm_stats()
    print(f"\n{len(results)} requests during the reloads; wasm VM stats before {vm_before}, after {vm_after}\n"
          + "\n".join(rows))
    assert not lost, f"{len(lost)} of {len(results)} requests lost, first: {lost[:5]}\n" + "\n".join(rows)
    assert not problems, "\n".join(problems) + "\n" + "\n".join(rows)
