"""The native floor module (bench/floor-native, bench cell (fd)) on real Envoy.

It proves our own declarations of Envoy 1.40's dynamic-module ABI: Envoy loads the module (ABI
``v0.2.0`` matched), resolves every event hook it looks up at load, runs the request-headers hook
on each worker, and the header the module sets reaches the upstream. ``make bench-floor-native``
builds the module; the test fails (not skips) when it is missing under E2E_REQUIRE_WASM=1.
"""

from __future__ import annotations

import os

import pytest

from envoy import FLOOR_NATIVE, native_filter

pytestmark = pytest.mark.host_agnostic


@pytest.fixture
def floor_module() -> str:
    path = os.environ.get("FLOOR_NATIVE_SO") or str(FLOOR_NATIVE)
    if not os.path.isfile(path):
        msg = f"native floor module not found at {path}: run `make bench-floor-native`"
        if os.environ.get("E2E_REQUIRE_WASM", "") not in ("", "0", "false", "no"):
            pytest.fail(msg)
        pytest.skip(msg)
    return path


def floor_filter(path: str) -> dict:
    return native_filter("", module_file=path, module_name="floor_native", filter_name="floor",
                         http_filter_name="floor_native")


def test_floor_module_sets_the_header_on_every_request(envoy_factory, upstream, floor_module):
    e = envoy_factory.start(wasm=False, extra_http_filters=[floor_filter(floor_module)], concurrency=2)
    assert "Dynamic module ABI version v0.2.0 matched" in e.log(), e.log_tail(40)
    n = 40
    statuses = [e.request("/floor", headers={"authorization": "Bearer from-client"}).status for _ in range(n)]
    assert statuses == [200] * n, statuses
    seen = upstream.authorizations()
    # The module replaces what the client sent (set, not add): one value, the module's.
    assert seen == ["Bearer tok-0"] * n, seen[:5]
    assert all(r.header_values("authorization") == ["Bearer tok-0"] for r in upstream.requests)


def test_without_the_floor_module_the_client_header_passes(envoy_factory, upstream):
    """Control: the same bootstrap without the module leaves the client's header alone."""
    e = envoy_factory.start(wasm=False, concurrency=2)
    assert e.request("/floor", headers={"authorization": "Bearer from-client"}).status == 200
    assert upstream.authorizations() == ["Bearer from-client"]
