"""deploy/observability/ against real Envoy: the metric names the Grafana dashboard and the
Prometheus rules use are the names Envoy exports for the filter, and the promtool fixture
(deploy/observability/testdata/stats_prometheus.txt) is a trimmed real /stats/prometheus scrape.

The scrape comes from the shipped envoy/egress-gateway.yaml (its stats_tags put the profile in
the label oauth2_cc_profile) driven through every counter: a fetch, injections, an upstream 401
that purges, a failed refetch (a request waits, then gets the failure reply) and a refetch the
hourly budget refuses. ``UPDATE_OBSERVABILITY_FIXTURE=1`` rewrites the fixture from this run.
"""

from __future__ import annotations

import json
import os
import re
import time

import pytest
import yaml

from conftest import check_wasm_file
from envoy import REPO_ROOT, request, wait_until
from shipped import load_yaml, localize, plugin_configuration, wasm_plugin_configs
from test_gateway import GATEWAY_YAML, PARTNER_HOST, _plain, _start

# The shipped egress gateway (envoy/egress-gateway.yaml) loads the wasm build.
pytestmark = pytest.mark.wasm_only

OBS_DIR = REPO_ROOT / "deploy" / "observability"
FIXTURE = OBS_DIR / "testdata" / "stats_prometheus.txt"
RULES = OBS_DIR / "oauth2-cc-alerts.yaml"
DASHBOARD = OBS_DIR / "oauth2-cc-dashboard.json"
METRIC_LINE = re.compile(r"^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(?P<labels>[^}]*)\})?\s+(?P<value>\S+)")


def scrape_gateway(envoy_factory, token_server, upstream, monkeypatch) -> str:
    monkeypatch.setenv("PARTNER_CLIENT_SECRET", "observability-secret")
    b = localize(load_yaml(GATEWAY_YAML), wasm=check_wasm_file(),
                 clusters={"idp": ("127.0.0.1", token_server.port), "partner_api": ("127.0.0.1", upstream.port)})
    _plain(b, "idp", "partner_api")
    (plugin,) = wasm_plugin_configs(b)
    conf = plugin_configuration(plugin)
    conf["profiles"]["partner"]["max_fetches_per_hour"] = 2
    plugin["configuration"]["value"] = json.dumps(conf)
    gw = _start(envoy_factory, b, "gateway")

    def stat(name):
        return gw.stat(f"wasmcustom.oauth2_cc.partner.{name}")

    for _ in range(3):
        assert request(gw.port, "/v1/x", host=PARTNER_HOST).status == 200
    upstream.fail_next(1, 401)  # purges the token: the next request needs a new one
    assert request(gw.port, "/v1/x", host=PARTNER_HOST).status == 401
    token_server.set_response(503, {"error": "temporarily_unavailable"})
    r = request(gw.port, "/v1/x", host=PARTNER_HOST)  # waits for fetch 2 (fails), failure reply
    assert r.status == 503 and r.json()["error"] == "token_unavailable", r.text
    # After the backoff the next attempt would be fetch 3: the budget (2 an hour) refuses it.
    deadline = time.monotonic() + 20
    while not stat("budget_refused") and time.monotonic() < deadline:
        request(gw.port, "/v1/x", host=PARTNER_HOST)
        time.sleep(0.3)
    assert wait_until(lambda: all(stat(n) for n in (
        "fetch_ok", "injected", "waited", "failed_requests", "purged", "budget_refused",
        "fetch_failed.temporarily_unavailable")), 5), gw.stats("oauth2_cc")
    return gw.prometheus()


def families(text: str) -> dict[str, set[str]]:
    """Metric name -> label names, of every oauth2-cc sample in a Prometheus text scrape."""
    out: dict[str, set[str]] = {}
    for line in text.splitlines():
        m = METRIC_LINE.match(line)
        if m and ("oauth2_cc" in m["name"] or m["name"] in KEPT_ENVOY_METRICS):
            labels = {kv.split("=", 1)[0] for kv in (m["labels"] or "").split(",") if kv}
            out.setdefault(m["name"], set()).update(labels)
    return out


KEPT_ENVOY_METRICS = ("envoy_server_uptime",)  # Envoy's own series the rules use


def trim(text: str) -> str:
    """The oauth2-cc families of a scrape (TYPE lines and samples) and KEPT_ENVOY_METRICS."""
    keep = [line for line in text.splitlines()
            if "oauth2_cc" in line or any(re.search(rf"\b{n}\b", line) for n in KEPT_ENVOY_METRICS)]
    return "\n".join(keep) + "\n"


PROMQL_NAME = re.compile(r"\b((?:oauth2_cc|envoy)_[a-z0-9_]+)\b")
LABELS = {"oauth2_cc_profile", "oauth2_cc_reason"}


def names_used() -> dict[str, set[str]]:
    """Metric names each shipped file's queries use (rules: expr; dashboard: targets' expr)."""
    rules = yaml.safe_load(RULES.read_text())
    exprs = [r["expr"] for g in rules["groups"] for r in g["rules"]]
    dash = json.loads(DASHBOARD.read_text())
    dexprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    dexprs += [v["query"]["query"] for v in dash["templating"]["list"] if isinstance(v.get("query"), dict)]
    return {
        "rules": {n for e in exprs for n in PROMQL_NAME.findall(e)} - LABELS,
        "dashboard": {n for e in dexprs for n in PROMQL_NAME.findall(e)} - LABELS,
    }


def test_dashboard_and_rules_use_only_exported_metric_names(envoy_factory, token_server, upstream, monkeypatch):
    text = scrape_gateway(envoy_factory, token_server, upstream, monkeypatch)
    live = families(text)
    if os.environ.get("UPDATE_OBSERVABILITY_FIXTURE"):
        FIXTURE.parent.mkdir(parents=True, exist_ok=True)
        FIXTURE.write_text(trim(text))
    assert live, f"no oauth2_cc metric in the scrape:\n{text[:2000]}"
    assert all("oauth2_cc_profile" in labels for n, labels in live.items() if n.startswith("oauth2_cc_")), live
    assert live.get("oauth2_cc_fetch_failed") == {"oauth2_cc_profile", "oauth2_cc_reason"}, live
    for where, names in names_used().items():
        assert names, f"{where} uses no oauth2_cc metric"
        unknown = names - set(live)
        assert not unknown, f"{where} uses metrics Envoy does not export: {sorted(unknown)}; exported: {sorted(live)}"
    # The promtool fixture is this scrape, trimmed (rewrite: UPDATE_OBSERVABILITY_FIXTURE=1).
    assert families(FIXTURE.read_text()) == live, "deploy/observability/testdata is stale"


PROMTOOL_TESTS = OBS_DIR / "oauth2-cc-alerts.test.yaml"
SERIES = re.compile(r"^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)\{(?P<labels>[^}]*)\}$")


def test_promtool_series_are_shaped_like_the_real_scrape():
    """The promtool unit tests feed series with the names and label names of the real scrape
    (plus job and instance, which Prometheus adds), so the rules are tested on what Envoy sends."""
    real = families(FIXTURE.read_text())
    tests = yaml.safe_load(PROMTOOL_TESTS.read_text())
    assert tests["rule_files"] == [RULES.name]
    seen = set()
    for t in tests["tests"]:
        for s in t["input_series"]:
            m = SERIES.match(s["series"])
            assert m, s["series"]
            labels = {kv.split("=", 1)[0] for kv in m["labels"].split(",") if kv} - {"job", "instance"}
            assert m["name"] in real, f"{m['name']} is not in the real scrape"
            assert labels == real[m["name"]], (m["name"], labels, real[m["name"]])
            seen.add(m["name"])
    alerts = {r["alert"] for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]}
    tested = {a["alertname"] for t in tests["tests"] for a in t["alert_rule_test"]}
    assert tested == alerts, f"alerts without a promtool test: {alerts - tested}"


def test_dashboard_structure():
    dash = json.loads(DASHBOARD.read_text())
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)), ids
    titles = " ".join(p["title"].lower() for p in dash["panels"])
    for topic in ("token remaining", "failures by reason", "injected", "waited", "failed", "budget"):
        assert topic in titles, f"no panel for {topic}"
    for p in dash["panels"]:
        assert p["datasource"]["uid"] == "${datasource}" and p["targets"], p["title"]
        assert all(t["refId"] and t["expr"] for t in p["targets"]), p["title"]
        assert {"x", "y", "w", "h"} <= set(p["gridPos"]), p["title"]
