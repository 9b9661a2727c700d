"""Both builds count the same traffic the same way: one request path (the core's), one place
that says what each request adds to which counter.

One Envoy per build (2 workers), one traffic mix: hits, a profile that keeps the client's own
header (kept and not), a route naming an unknown profile, a profile whose IdP refuses the client,
and an upstream 401 that purges the token and makes the next request fetch a new one. Every
non-zero counter of the filter is compared with one expected table, the same for both builds.
"""

from __future__ import annotations

import plugin_config as pc
from envoy import route, wait_until

# The counters this traffic must leave, per profile, in either build (all others stay 0, except
# fetch_failed.invalid_client of `broken`, whose retries depend on timing).
EXPECTED = {
    "good.fetch_ok": 2,
    "good.injected": 7,
    "good.purged": 1,
    "keep.fetch_ok": 1,
    "keep.injected": 2,
    "broken.failed_requests": 3,
}


# Gauges, not counters: the main thread sets them once a second, so whether a slow run has set
# them yet by the time the counters are read is timing, not what the traffic did.
GAUGES = ("token_remaining_s", "token_lifetime_s")


def counters(e) -> dict[str, int]:
    prefix = e.filter_stat_prefix + "."
    out = {}
    for name, value in e.stats(filter=f"^{prefix}").items():
        short = name[len(prefix):]
        if short.endswith(GAUGES) or not isinstance(value, int) or value == 0:
            continue
        out[short] = value
    return out


def test_both_builds_count_the_same_traffic_the_same_way(envoy_factory, make_token_server, upstream):
    good, keep, broken = make_token_server(), make_token_server(), make_token_server()
    broken.set_response(400, {"error": "invalid_client"})
    config = pc.config(
        profiles={
            "good": pc.profile(cluster="idp_good"),
            "keep": pc.profile(cluster="idp_keep", inject={"keep_existing": True}),
            "broken": pc.profile(cluster="idp_broken"),
        },
        routes=[
            {"match": {"path_prefix": "/good"}, "profile": "good"},
            {"match": {"path_prefix": "/keep"}, "profile": "keep"},
            {"match": {"path_prefix": "/broken"}, "profile": "broken"},
        ],
        route_metadata=True,
    )
    e = envoy_factory.start(
        config,
        token_clusters={"idp_good": good, "idp_keep": keep, "idp_broken": broken},
        routes=[route("/unknown/", profile="typo"), route("/")],
    )
    assert good.wait_for_count(1, 10) and keep.wait_for_count(1, 10) and broken.wait_for_count(1, 10)
    assert wait_until(lambda: e.filter_stat("broken.fetch_failed.invalid_client") >= 1, 10)
    assert wait_until(lambda: e.filter_stat("good.fetch_ok") == 1 and e.filter_stat("keep.fetch_ok") == 1, 10)

    for _ in range(5):
        r = e.request("/good/x")
        assert r.status == 200 and r.json()["headers"]["authorization"] == "Bearer tok-1", r.text
    for _ in range(3):
        r = e.request("/keep/x", headers={"authorization": "Bearer own"})
        assert r.status == 200 and r.json()["headers"]["authorization"] == "Bearer own", r.text
    for _ in range(2):
        r = e.request("/keep/x")
        assert r.status == 200 and r.json()["headers"]["authorization"].startswith("Bearer tok-"), r.text
    for _ in range(2):
        assert e.request("/unknown/x").status == 503
    for _ in range(3):
        assert e.request("/broken/x").status == 503
    # The upstream rejects the token once: it is purged, and the next request gets a new one.
    upstream.fail_next(1, 401)
    assert e.request("/good/x").status == 401
    assert wait_until(lambda: e.filter_stat("good.purged") == 1, 5)
    r = e.request("/good/x")
    assert r.status == 200 and r.json()["headers"]["authorization"] == "Bearer tok-2", r.text

    # `injected` is counted in each worker and flushed on its tick.
    wait_until(lambda: {k: v for k, v in counters(e).items() if k in EXPECTED} == EXPECTED, 5)
    got = counters(e)
    print("counters:", got)
    assert got.pop("broken.fetch_failed.invalid_client", 0) >= 1
    # A request that waited for the new token may or may not have: a worker that had not yet
    # dropped its copy of the purged token would not have asked.
    waited = got.pop("good.waited", 0)
    assert waited <= 1, waited
    # A request to `broken` that came while a retry was in flight waited for it, then failed.
    assert got.pop("broken.waited", 0) <= 3
    assert got == EXPECTED
