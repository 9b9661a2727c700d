"""A token cluster Envoy does not have.

A profile whose ``cluster`` is not defined in Envoy: requests on its route get the failure reply,
each attempt gives one clear error line naming the cluster (and the profile), the failure is
counted as ``<namespace>.oauth2_cc.<profile>.fetch_failed.no_cluster`` (``wasmcustom`` or
``dynamicmodulescustom``, by build), and nothing claims the token endpoint did not answer (no
request was ever sent to it). Other profiles keep working.
(The ``method: GET`` refusals of item 5 are tested elsewhere.)
"""

from __future__ import annotations

import json
import re
import time

import plugin_config as pc
from envoy import FILTER_LOG, route

GHOST = "ghost-cluster"
MISLEADING = "no response from the token endpoint"


def test_unknown_token_cluster_is_one_clear_error(envoy_factory, token_server, upstream):
    config = pc.config(
        profiles={
            "good": pc.profile(),
            "ghost": pc.profile(cluster=GHOST, backoff={"base_ms": 200, "max_ms": 400}),
        },
        routes=[pc.match_route("ghost", path_prefix="/ghost"), pc.match_route("good")],
    )
    e = envoy_factory.start(config, token_clusters={"idp": token_server},
                            routes=[route("/", "upstream")])
    stat = f"{e.filter_stat_prefix}.ghost.fetch_failed.no_cluster"
    deadline = time.monotonic() + 10
    replies = []
    while time.monotonic() < deadline:
        replies.append(e.request("/ghost"))
        if e.stat(stat) >= 3:
            break
        time.sleep(0.2)
    good = e.request("/")
    # The dynamic module defines every reason at load (0 until it happens); the wasm build only
    # the reasons that happened.
    stats = {k: v for k, v in e.stats(filter="oauth2_cc.ghost.fetch_failed").items() if v}
    attempts = stats.get(stat, 0)
    lines = [r.split("\n", 1)[0] for r in e.log_records()
             if re.search(FILTER_LOG, r) and ("[warning]" in r or "[error]" in r) and "ghost" in r]
    misleading = [line for line in e.log_lines() if MISLEADING in line]
    print(f"\nfetch_failed stats: {json.dumps(stats)}\nfilter warn/error lines for the profile ({len(lines)}):\n  "
          + "\n  ".join(line[:220] for line in lines[:6]))

    assert all(r.status == 503 and json.loads(r.body) == {"error": "token_unavailable", "profile": "ghost"}
               for r in replies), [(r.status, r.body[:80]) for r in replies[:5]]
    assert good.status == 200 and good.json()["headers"]["authorization"].startswith("Bearer tok-"), good
    assert attempts >= 1, f"{stat} not counted; fetch_failed stats of the profile: {stats}"
    assert set(stats) == {stat}, f"a failure counted under another reason: {stats}"
    assert not misleading, f"misleading follow-up line(s) ({len(misleading)}), first: {misleading[0][:300]}"
    assert lines and all(GHOST in line for line in lines), (
        f"every warn/error line about the profile must name cluster {GHOST!r}:\n  " + "\n  ".join(lines[:6]))
    assert len(lines) <= attempts, (
        f"{len(lines)} warn/error lines for {attempts} failed attempts: more than one line per attempt")
