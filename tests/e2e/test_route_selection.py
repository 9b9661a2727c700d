"""Profile selection by Envoy itself: route name (xds.route_name) and route metadata
(filter_metadata.oauth2_cc: profile / disabled), next to the plugin's own matchers."""

from __future__ import annotations

import plugin_config as pc
from envoy import route


def two_profiles(make_token_server, **top):
    billing = make_token_server()
    reports = make_token_server()
    # Distinct tokens, so the upstream tells which profile a request got.
    billing.set_response(200, {"access_token": "billing-token", "token_type": "Bearer", "expires_in": 3600})
    reports.set_response(200, {"access_token": "reports-token", "token_type": "Bearer", "expires_in": 3600})
    config = {
        "profiles": {
            "billing": pc.profile(cluster="idp_billing", client_id="billing-client"),
            "reports": pc.profile(cluster="idp_reports", client_id="reports-client"),
        },
        **top,
    }
    return config, billing, reports, {"idp_billing": billing, "idp_reports": reports}


def test_route_name_selects_the_profile(envoy_factory, make_token_server, upstream):
    config, billing, reports, clusters = two_profiles(
        make_token_server,
        routes=[{"match": {"route_name": "billing-route"}, "profile": "billing"},
                {"match": {"route_name": "reports-route"}, "profile": "reports"}],
    )
    e = envoy_factory.start(config, token_clusters=clusters, routes=[
        route("/billing/", name="billing-route"),
        route("/reports/", name="reports-route"),
        route("/", name="other-route"),
    ])
    assert e.request("/billing/x").json()["headers"]["authorization"] == "Bearer billing-token"
    assert e.request("/reports/x").json()["headers"]["authorization"] == "Bearer reports-token"
    assert "authorization" not in e.request("/other").json()["headers"]
    assert billing.requests[0].basic_auth()[0] == "billing-client"
    assert reports.requests[0].basic_auth()[0] == "reports-client"


def test_route_metadata_selects_the_profile(envoy_factory, make_token_server, upstream):
    config, billing, reports, clusters = two_profiles(
        make_token_server, route_metadata=True,
        routes=[{"match": {}, "profile": "billing"}],  # the plugin's default for routes without metadata
    )
    e = envoy_factory.start(config, token_clusters=clusters, routes=[
        route("/reports/", profile="reports"),
        route("/plain/"),
    ])
    assert e.request("/reports/x").json()["headers"]["authorization"] == "Bearer reports-token"
    assert e.request("/plain/x").json()["headers"]["authorization"] == "Bearer billing-token"


def test_route_metadata_disabled_opts_out(envoy_factory, make_token_server, upstream):
    config, billing, _, clusters = two_profiles(
        make_token_server, route_metadata=True, routes=[{"match": {}, "profile": "billing"}],
    )
    e = envoy_factory.start(config, token_clusters=clusters, routes=[
        route("/health", metadata={"disabled": True}),
        route("/"),
    ])
    r = e.request("/health", headers={"authorization": "Bearer client-own"})
    assert r.status == 200
    assert r.json()["headers"]["authorization"] == "Bearer client-own", "opted-out routes are untouched"
    assert e.request("/api").json()["headers"]["authorization"] == "Bearer billing-token"


def test_route_metadata_naming_an_unknown_profile_fails_closed(envoy_factory, make_token_server, upstream):
    config, _, _, clusters = two_profiles(make_token_server, route_metadata=True)
    e = envoy_factory.start(config, token_clusters=clusters, routes=[route("/", profile="typo")])
    r = e.request("/x")
    assert r.status == 503
    assert upstream.requests == []
    e.wait_log(r'route metadata names profile "typo"')


def test_route_metadata_is_ignored_unless_enabled(envoy_factory, make_token_server, upstream):
    config, billing, reports, clusters = two_profiles(make_token_server, routes=[{"match": {}, "profile": "billing"}])
    e = envoy_factory.start(config, token_clusters=clusters, routes=[route("/", profile="reports")])
    assert e.request("/x").json()["headers"]["authorization"] == "Bearer billing-token"
