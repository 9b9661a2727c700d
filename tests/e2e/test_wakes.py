"""The filter wakes when its core says something is due, not on a fixed 100 ms tick (both builds).

Each host asks its driver when it next needs a tick (``Driver::next_wake``: a fetch coming due, a
backoff or a lease ending, a token copy's end, a paused request's deadline, the next gauge report)
and sleeps until then, never longer than the core's ceiling of 1 s (``MAX_WAKE_INTERVAL_MS``).
Every tick logs ``tick; next tick in <ms> ms`` at debug level (``src/wasm/root.rs``,
``src/native/plugin.rs``), which these tests count. With 2 workers the wasm build runs 4 VMs (two
on the main thread, one per worker), each with its own tick; the dynamic module one per filter
configuration. The old fixed tick came 10 times a second per VM.
"""

from __future__ import annotations

import re
import time

from envoy import filter_log, wait_until
from helpers import one_profile, token_schedule

TICK = re.compile(filter_log("debug") + r"tick; next tick in (\d+) ms")


def ticks(e) -> list[int]:
    """The period each tick logged so far asked for, in ms, in log order."""
    return [int(m.group(1)) for m in map(TICK.search, e.log_lines()) if m]


def test_an_idle_filter_wakes_for_its_refreshes_and_at_most_once_a_second(
        envoy_factory, token_server, upstream, filter_host, record_property):
    # A 6 s token: refreshed 4 s after each token request, usable for 5 s (helpers.token_schedule):
    # a second for the refresh to land, however loaded the machine.
    lifetime = 6
    refresh_s, usable_s = token_schedule(lifetime)
    token_server.set_expires_in(lifetime)
    e = envoy_factory.start(one_profile(), component_log_level="wasm:debug")
    assert token_server.wait_for_count(1, 5.0), "no token request at start-up"
    # The token has landed (fetch_ok is counted after the cache write): a request sent between the
    # token request and its answer would wait, and `waited` is judged over the whole run.
    assert wait_until(lambda: e.filter_stat("default.fetch_ok", 0) >= 1, 5.0), "the first token did not land"
    assert e.request("/v1/first").status == 200
    vms = 4 if filter_host == "wasm" else 1
    # Idle but for one request a second (the hit path: no driver, no tick).
    window = 8.0
    before, start = len(ticks(e)), time.monotonic()
    requests_before = token_server.count()
    statuses = []
    while time.monotonic() - start < window:
        statuses.append(e.request("/v1/idle").status)
        time.sleep(1.0)
    periods = ticks(e)[before:]
    elapsed = time.monotonic() - start
    token_times = [r.time for r in token_server.requests]
    gaps = [round(b - a, 3) for a, b in zip(token_times, token_times[1:])]
    per_vm_per_s = len(periods) / vms / elapsed
    record_property("ticks_per_vm_per_s", round(per_vm_per_s, 2))
    print(f"\n{len(periods)} ticks in {elapsed:.1f} s on {vms} VMs: {per_vm_per_s:.2f} per VM per second; "
          f"periods asked (ms) {sorted(periods)}; token requests {token_server.count()}, gaps {gaps} s")

    assert statuses and set(statuses) == {200}, statuses
    # Once a second (the gauges, the ceiling) plus a few wakes for each refresh (the main thread's
    # at the refresh time, a copy's end): about 1.5 per VM per second; 10 with a fixed 100 ms tick.
    assert per_vm_per_s <= 2.5, f"{per_vm_per_s:.2f} ticks per VM per second: {sorted(periods)}"
    assert all(1 <= p <= 1000 for p in periods), f"a period outside 1..1000 ms: {sorted(periods)}"
    # The refreshes still come on time, woken for: one per refresh_s, each before the token's
    # usable end (never two VMs, never a refresh that waited for expiry).
    assert token_server.count() - requests_before >= int(window / usable_s), gaps
    assert all(refresh_s - 0.2 <= g < usable_s for g in gaps), (
        f"token request gaps {gaps} s outside [{refresh_s - 0.2}, {usable_s}) (refresh {refresh_s} s)")
    assert e.filter_stat("default.waited", 0) == 0, "a request waited: a refresh came too late"


def test_a_paused_request_is_settled_by_its_deadline_while_the_filter_sleeps(
        envoy_factory, token_server, upstream, filter_host, record_property):
    # The IdP never answers within max_wait_ms: the paused request is failed at its deadline (a
    # wake of its own), not a second or more later.
    token_server.set_delay(5.0)
    e = envoy_factory.start(one_profile(timeout_ms=4000, max_wait_ms=1500), component_log_level="wasm:debug")
    assert token_server.wait_for_count(1, 5.0), "no token request at start-up"
    sent = time.monotonic()
    r = e.request("/v1/paused", timeout=10)
    took = time.monotonic() - sent
    record_property("paused_reply_after_s", round(took, 3))
    print(f"\npaused request answered {r.status} after {took:.3f} s (max_wait_ms 1.5 s)")
    assert r.status == 503, r.text
    # The deadline is 1.5 s after it paused; a host that only woke at its ceiling could answer up
    # to 1 s later. Slack for a loaded machine: 0.6 s.
    assert 1.5 <= took < 1.85, f"answered after {took:.3f} s"
    assert wait_until(lambda: e.filter_stat("default.failed_requests", 0) >= 1, 3.0)
