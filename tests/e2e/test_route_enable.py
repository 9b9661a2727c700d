"""Zero cost where no token is needed: the filter disabled on the HTTP connection manager and
enabled only on the routes that need a token (``typed_per_filter_config`` with
``envoy.config.route.v3.FilterConfig``), so other routes do not run it at all.

The native build here; the proxy-wasm variant is ``test_per_route.py``. The plugin configuration
maps every path to the profile, so a request the filter saw would carry a token: a request on a
route without the filter reaching the upstream untouched, and the injection counter counting only
the enabled route's requests, show the filter did not run there.
"""

from __future__ import annotations

import pytest

import plugin_config as pc
from envoy import native_route_enable, route
from envoy import wait_until as poll


@pytest.fixture
def native_only(filter_host):
    if filter_host != "native":
        pytest.skip("the proxy-wasm variant of this pattern is test_per_route.py")


def test_filter_runs_only_on_the_routes_that_enable_it(native_only, envoy_factory, token_server, upstream):
    routes = [route("/public/", "upstream"), native_route_enable(route("/private/", "upstream"))]
    e = envoy_factory.start(pc.sample(), routes=routes, filter_disabled=True)
    assert e.request("/private/a").status == 200
    assert upstream.last().header("authorization") == "Bearer tok-1"
    for i in range(5):
        r = e.request(f"/public/{i}", headers={"authorization": "Bearer from-client"})
        assert r.status == 200, r.text
        assert upstream.last().header("authorization") == "Bearer from-client"
    assert e.request("/private/b").status == 200
    assert upstream.last().header("authorization") == "Bearer tok-1"
    # injected counts the two enabled-route requests only (flushed on the main thread's tick)
    assert poll(lambda: e.filter_stat("default.injected") >= 2, 3), e.stats("oauth2_cc")
    assert e.filter_stat("default.injected") == 2
    assert token_server.count() == 1


def test_disabled_everywhere_means_no_token(native_only, envoy_factory, token_server, upstream):
    """Control: with no route enabling it, the disabled filter injects nothing."""
    e = envoy_factory.start(pc.sample(), routes=[route("/private/", "upstream")], filter_disabled=True)
    assert e.request("/private/a").status == 200
    assert upstream.last().header("authorization") is None
