"""deploy/observability/ against real Envoy, both builds.

* The scenario of observability.py runs on each build with the shipped stats tags
  (deploy/observability/stats-tags/envoy.yaml); every checkpoint's scrape must have the same
  metric names and labels as the committed one (testdata/<build>/<checkpoint>.prom), which the
  promtool tests are made from, and the dashboard and the rules may use only names it has.
* oauth2-cc-alerts.test.yaml is what observability.promtool_tests() makes from the committed
  scrapes, and those scrapes show the states the expected alerts rely on.
* Every place that ships stats tags ships the same ones.

``UPDATE_OBSERVABILITY_FIXTURE=1`` rewrites the scrapes and the promtool tests from this run.
"""

from __future__ import annotations

import json
import os
import re
import time

import pytest
import yaml

import observability as obs
from envoy import REPO_ROOT, request, start_bootstrap
from shipped import DEPLOY_DIR, ENVOY_DIR, load_yaml, load_yaml_docs

DASHBOARD = obs.OBS_DIR / "oauth2-cc-dashboard.json"
STATS_TAGS = obs.OBS_DIR / "stats-tags" / "envoy.yaml"
UPDATE = bool(os.environ.get("UPDATE_OBSERVABILITY_FIXTURE"))


def scenario_config() -> dict:
    backoff = {"base_ms": 200, "max_ms": 1000}
    common = {"token_url": "http://idp.test/oauth2/token", "client_id": "gateway", "client_secret": "s3cret",
              "backoff": backoff}
    return {
        "profiles": {
            "partner": {"cluster": "idp_partner", **common, "max_wait_ms": 300, "refresh": {"ahead_ratio": 0.5}},
            "billing": {"cluster": "idp_billing", **common, "max_fetches_per_hour": 6},
        },
        "routes": [{"match": {"path_prefix": "/billing/"}, "profile": "billing"},
                   {"match": {"path_prefix": "/"}, "profile": "partner"}],
    }


class Scenario:
    """Waits for each checkpoint's state on the build's /stats/prometheus and keeps that scrape."""

    def __init__(self, envoy):
        self.envoy = envoy
        self.scrapes: dict[str, str] = {}

    def wait(self, checkpoint: str, state, timeout: float = 30) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            text = self.envoy.prometheus()
            parsed = obs.samples(text)
            if state(lambda *a, **k: obs.value(parsed, *a, **k)):
                self.scrapes[checkpoint] = obs.trim(text)
                return parsed
            if time.monotonic() > deadline:
                raise AssertionError(f"checkpoint {checkpoint} not reached in {timeout} s:\n" + obs.trim(text))
            time.sleep(0.05)


def run_scenario(envoy_factory, filter_host, make_token_server) -> dict[str, str]:
    partner_idp = make_token_server(expires_in=13)
    billing_idp = make_token_server()
    billing_idp.set_response(401, {"error": "invalid_client"})
    boot = json.loads(envoy_factory.config_text(
        scenario_config(), token_clusters={"idp_partner": partner_idp, "idp_billing": billing_idp}))
    boot["stats_config"] = load_yaml(STATS_TAGS)["stats_config"]
    s = Scenario(start_bootstrap(envoy_factory, boot, f"observability-{filter_host}"))
    port = s.envoy.port
    deadline = time.monotonic() + 10
    while partner_idp.count() < 1 and time.monotonic() < deadline:
        time.sleep(0.02)
    for _ in range(3):
        assert request(port, "/v1/x").status == 200
    last = s.wait("start_1", lambda v: v("fetch_ok", "partner") == 1 and v("injected", "partner") == 3
                  and v("token_lifetime_s", "partner") > 0
                  and v("fetch_failed", "billing") >= 1 and v("fetch_ok", "billing") == 0)
    for n in (2, 3, 4):
        before = obs.value(last, "fetch_failed", "billing")
        last = s.wait(f"start_{n}", lambda v, before=before: v("fetch_failed", "billing") > before)
    s.wait("budget", lambda v: v("budget_refused", "billing") >= 1)
    partner_idp.set_response(503, {"error": "temporarily_unavailable"})
    s.wait("expiring", lambda v: v("fetch_failed", "partner", "temporarily_unavailable") >= 1
           and 1 <= v("token_remaining_s", "partner") < 0.1 * v("token_lifetime_s", "partner"))
    # The gauge counts whole seconds: the token may serve for up to another second after it reads 0.
    failure_replies, deadline = 0, time.monotonic() + 10
    while failure_replies < 2 and time.monotonic() < deadline:
        r = request(port, "/v1/x")
        assert r.status in (200, 503), r.text
        failure_replies += r.status == 503 and r.json()["error"] == "token_unavailable"
        time.sleep(0.05 if r.status == 503 else 0.2)
    assert failure_replies == 2, "the token did not run out"
    last = s.wait("expired", lambda v: v("failed_requests", "partner") == 2 and v("token_remaining_s", "partner") == 0)
    before = obs.value(last, "fetch_failed", "partner")
    s.wait("still_down", lambda v: v("fetch_failed", "partner") > before and v("token_remaining_s", "partner") == 0)
    partner_idp.clear_response()
    s.wait("recovered", lambda v: v("fetch_ok", "partner") == 2
           and v("token_remaining_s", "partner") >= 0.5 * v("token_lifetime_s", "partner"))
    return s.scrapes


def test_checkpoint_scrapes_match_the_committed_ones(envoy_factory, filter_host, make_token_server):
    scrapes = run_scenario(envoy_factory, filter_host, make_token_server)
    if UPDATE:
        for checkpoint in obs.CHECKPOINTS:
            obs.fixture(filter_host, checkpoint).parent.mkdir(parents=True, exist_ok=True)
            obs.fixture(filter_host, checkpoint).write_text(scrapes[checkpoint])
        if filter_host == obs.BUILDS[-1] and all(obs.fixture(b, "recovered").exists() for b in obs.BUILDS):
            write_promtool_tests()
    for checkpoint in obs.CHECKPOINTS:
        live = obs.families(scrapes[checkpoint])
        committed = obs.families(obs.fixture(filter_host, checkpoint).read_text())
        assert live == committed, f"{filter_host}/{checkpoint}: names or labels differ from the committed scrape"
    live = obs.families(scrapes["start_1"])
    prefix = "oauth2_cc_" if filter_host == "wasm" else "envoy_dynamicmodulescustom_oauth2_cc_"
    assert {n for n in live if "oauth2_cc" in n} == {prefix + m for m in (
        "fetch_ok", "fetch_failed", "injected", "waited", "failed_requests", "purged", "budget_refused",
        "token_remaining_s", "token_lifetime_s")}, sorted(live)
    assert all("oauth2_cc_profile" in labels for n, labels in live.items() if "oauth2_cc" in n), live
    assert live[prefix + "fetch_failed"] == {"oauth2_cc_profile", "oauth2_cc_reason"}, live
    if filter_host == "wasm":
        assert live["envoy_wasm_vm_reload"] == {"wasm_plugin"}, live


def write_promtool_tests():
    obs.PROMTOOL_TESTS.write_text(obs.HEADER + yaml.safe_dump(obs.promtool_tests(), sort_keys=False, width=200))


# --------------------------------------------------------------------------- #
# Without Envoy: the committed scrapes, the promtool tests, the dashboard
# --------------------------------------------------------------------------- #

PROMQL_NAME = re.compile(r"\b((?:envoy_dynamicmodulescustom_)?oauth2_cc_[a-z0-9_]+|envoy_wasm_[a-z0-9_]+)\b")
NAME_REGEX = re.compile(r'__name__=~"([^"]+)"')
LABELS = {"oauth2_cc_profile", "oauth2_cc_reason"}


def exprs() -> dict[str, list[str]]:
    rules = yaml.safe_load(obs.RULES.read_text())
    dash = json.loads(DASHBOARD.read_text())
    dexprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    dexprs += [v["query"]["query"] for v in dash["templating"]["list"] if isinstance(v.get("query"), dict)]
    return {"rules": [r["expr"] for g in rules["groups"] for r in g["rules"]], "dashboard": dexprs}


@pytest.mark.parametrize("build", obs.BUILDS)
def test_queries_use_only_exported_names(build):
    """Every __name__ regex of the dashboard and the rules matches the metric in the build's real
    scrape; the plain names (the VM-reload rule and panel: wasm build only) are in the wasm scrape."""
    real = set(obs.families(obs.fixture(build, "start_1").read_text()))
    for where, texts in exprs().items():
        for text in texts:
            for pattern in NAME_REGEX.findall(text):
                assert any(re.fullmatch(pattern, n) for n in real), f"{where}: {pattern} matches nothing of {build}"
            if build == "wasm":
                for name in set(PROMQL_NAME.findall(NAME_REGEX.sub("", text))) - LABELS:
                    assert name in real, f"{where} uses {name}, which Envoy does not export"


def test_promtool_tests_are_made_from_the_committed_scrapes():
    committed = yaml.safe_load(obs.PROMTOOL_TESTS.read_text())
    assert committed == json.loads(json.dumps(obs.promtool_tests())), \
        "oauth2-cc-alerts.test.yaml is stale: UPDATE_OBSERVABILITY_FIXTURE=1 (see the module doc)"
    alerts = {r["alert"] for g in yaml.safe_load(obs.RULES.read_text())["groups"] for r in g["rules"]}
    fired = {t["alertname"] for case in committed["tests"] for t in case["alert_rule_test"] if t["exp_alerts"]}
    assert fired == alerts, f"alerts no promtool test fires: {alerts - fired}"


@pytest.mark.parametrize("build", obs.BUILDS)
def test_committed_scrapes_show_what_the_expected_alerts_rely_on(build):
    v = {c: (lambda s: lambda *a, **k: obs.value(s, *a, **k))(obs.samples(obs.fixture(build, c).read_text()))
         for c in obs.CHECKPOINTS}
    assert all(v[c]("fetch_ok", "billing") == 0 for c in obs.CHECKPOINTS), "billing never gets a token"
    failures = [v[c]("fetch_failed", "billing", "invalid_client") for c in obs.CHECKPOINTS[:4]]
    assert failures == sorted(set(failures)) and failures[0] >= 1, failures
    assert v["budget"]("budget_refused", "billing") >= 1 and v["start_4"]("budget_refused", "billing") == 0
    lifetime = v["start_1"]("token_lifetime_s", "partner")
    assert lifetime > 0 and all(v[c]("token_remaining_s", "partner") >= 0.1 * lifetime for c in obs.CHECKPOINTS[:5])
    assert v["budget"]("fetch_failed", "partner") == 0 < v["expiring"]("fetch_failed", "partner")
    assert 1 <= v["expiring"]("token_remaining_s", "partner") < 0.1 * lifetime
    for c in ("expired", "still_down"):
        assert v[c]("token_remaining_s", "partner") == 0 and v[c]("token_lifetime_s", "partner") == lifetime, c
    assert v["still_down"]("fetch_failed", "partner") > v["expired"]("fetch_failed", "partner")
    assert v["expired"]("failed_requests", "partner") == 2 and v["expiring"]("failed_requests", "partner") == 0
    assert v["recovered"]("fetch_ok", "partner") == 2
    assert v["recovered"]("token_remaining_s", "partner") >= 0.5 * v["recovered"]("token_lifetime_s", "partner")


def test_every_shipped_stats_tags_block_is_the_shipped_snippet():
    """Plain Envoy, the Istio sidecar override, the Istio egress gateway, Envoy Gateway: one set."""
    tags = load_yaml(STATS_TAGS)["stats_config"]["stats_tags"]
    found = {}
    found["envoy/egress-gateway.yaml"] = load_yaml(ENVOY_DIR / "egress-gateway.yaml")["stats_config"]["stats_tags"]
    for path in (obs.OBS_DIR / "stats-tags" / "istio.yaml", DEPLOY_DIR / "istio" / "egress-gateway" / "gateway-deployment.yaml"):
        (cm,) = [d for d in load_yaml_docs(path) if d["kind"] == "ConfigMap"]
        found[str(path.relative_to(REPO_ROOT))] = json.loads(cm["data"]["custom_bootstrap.json"])["stats_config"]["stats_tags"]
    for path in sorted((DEPLOY_DIR / "envoy-gateway").glob("*.yaml")):
        (proxy,) = [d for d in load_yaml_docs(path) if d["kind"] == "EnvoyProxy"]
        found[str(path.relative_to(REPO_ROOT))] = yaml.safe_load(proxy["spec"]["bootstrap"]["value"])["stats_config"]["stats_tags"]
    for where, got in found.items():
        assert got == tags, f"{where} ships other stats tags than {STATS_TAGS.relative_to(REPO_ROOT)}"
    patch = load_yaml(obs.OBS_DIR / "stats-tags" / "istio-pod-patch.yaml")["spec"]["template"]["metadata"]["annotations"]
    (cm,) = load_yaml_docs(obs.OBS_DIR / "stats-tags" / "istio.yaml")
    assert patch["sidecar.istio.io/bootstrapOverride"] == cm["metadata"]["name"]
    matcher = yaml.safe_load(patch["proxy.istio.io/config"])["proxyStatsMatcher"]
    for stat in ("wasmcustom.oauth2_cc.p.fetch_ok", "dynamicmodulescustom.oauth2_cc.p.fetch_ok"):
        assert any(stat.startswith(p) for p in matcher["inclusionPrefixes"]), stat
    assert any(re.fullmatch(r, "wasm.orders.oauth2-cc.vm_reload") for r in matcher["inclusionRegexps"])


def test_dashboard_structure():
    dash = json.loads(DASHBOARD.read_text())
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)), ids
    titles = " ".join(p["title"].lower() for p in dash["panels"])
    for topic in ("token remaining", "lifetime", "failures by reason", "injected", "waited", "failed", "budget"):
        assert topic in titles, f"no panel for {topic}"
    for p in dash["panels"]:
        assert p["datasource"]["uid"] == "${datasource}" and p["targets"], p["title"]
        assert all(t["refId"] and t["expr"] for t in p["targets"]), p["title"]
        assert {"x", "y", "w", "h"} <= set(p["gridPos"]), p["title"]
