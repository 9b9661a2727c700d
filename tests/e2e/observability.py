"""The promtool unit tests of deploy/observability/oauth2-cc-alerts.yaml, made from real scrapes.

test_observability.py runs one scenario per build on real Envoy and keeps a trimmed
/stats/prometheus scrape at each checkpoint (deploy/observability/testdata/<build>/<checkpoint>.prom).
``promtool_tests()`` turns those scrapes into oauth2-cc-alerts.test.yaml: every oauth2-cc series of
both builds, one sample per step of TIMELINE (one step is one minute for promtool), and for every
alert the instances and profiles that must fire at each step, from what each checkpoint means.

Time is compressed: a checkpoint is a state the scenario waited for (a 13 s token runs out in
seconds), and the rules see it one minute after the previous one. The lifetime-relative rules
compare token_remaining_s with token_lifetime_s, which does not care about the scale; the windows
and ``for`` durations count steps.

The scenario, per build, on one Envoy with two profiles:
  partner  13 s tokens (usable lifetime 11 s), refreshed from half of it; the IdP answers,
           then fails with 503 until recovered;
  billing  the IdP refuses the client (401 invalid_client) from the start; max_fetches_per_hour 6.
"""

from __future__ import annotations

import re
from pathlib import Path

from envoy import REPO_ROOT

OBS_DIR = REPO_ROOT / "deploy" / "observability"
TESTDATA = OBS_DIR / "testdata"
RULES = OBS_DIR / "oauth2-cc-alerts.yaml"
PROMTOOL_TESTS = OBS_DIR / "oauth2-cc-alerts.test.yaml"
BUILDS = ("wasm", "native")

# The checkpoints, in the order the scenario reaches them:
#   start_1..start_4  partner has its token and 3 injected requests; billing has failed 1, 2, 3, 4+ times
#   budget            billing's hourly budget refused a token request
#   expiring          partner: the IdP fails since "budget"; 1 s left of an 11 s lifetime
#   expired           partner: no token; 2 requests got the failure reply
#   still_down        partner: one more failed token request
#   recovered         partner: the IdP answers again, a new token
CHECKPOINTS = ("start_1", "start_2", "start_3", "start_4", "budget", "expiring", "expired", "still_down", "recovered")
# One checkpoint per minute; still_down is scraped again twice (nothing changes while the IdP is down).
TIMELINE = ("start_1", "start_2", "start_3", "start_4", "budget", "expiring", "expired",
            "still_down", "still_down", "still_down", "recovered")

SAMPLE = re.compile(r"^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(?P<labels>[^}]*)\})?\s+(?P<value>\S+)$")
LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def kept(name: str) -> bool:
    """The families the rules and the dashboard read: the filter's and Envoy's VM reloads."""
    return "oauth2_cc_" in name or name.startswith("envoy_wasm_vm_reload")


def trim(text: str) -> str:
    """The kept families of a scrape (TYPE lines and samples)."""
    out = []
    for line in text.splitlines():
        name = line.split()[2] if line.startswith("# TYPE ") else line.split("{")[0].split(" ")[0]
        if kept(name):
            out.append(line)
    return "\n".join(out) + "\n"


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """(name, sorted labels) -> value, for every kept sample of a scrape."""
    out = {}
    for line in text.splitlines():
        m = SAMPLE.match(line)
        if m and kept(m["name"]):
            labels = tuple(sorted(LABEL.findall(m["labels"] or "")))
            out[(m["name"], labels)] = float(m["value"])
    return out


def families(text: str) -> dict[str, set[str]]:
    """Metric name -> label names, of the kept samples of a scrape."""
    out: dict[str, set[str]] = {}
    for name, labels in samples(text):
        out.setdefault(name, set()).update(k for k, _ in labels)
    return out


def value(scrape: dict, metric: str, profile: str, reason: str | None = None) -> float:
    """A metric of a profile in a parsed scrape of either build (summed over reasons if none given)."""
    total = 0.0
    for (name, labels), v in scrape.items():
        lab = dict(labels)
        if re.fullmatch(rf"(envoy_dynamicmodulescustom_)?oauth2_cc_{metric}", name) and \
                lab.get("oauth2_cc_profile") == profile and (reason is None or lab.get("oauth2_cc_reason") == reason):
            total += v
    return total


def fixture(build: str, checkpoint: str) -> Path:
    return TESTDATA / build / f"{checkpoint}.prom"


def job(build: str) -> str:
    return f"envoy-{build}"


def instance(build: str) -> str:
    return f"{build}-0"


def steps(*names: str) -> list[int]:
    return [i for i, c in enumerate(TIMELINE) if c in names]


def expected_alerts() -> dict[str, dict[int, list[dict]]]:
    """alert -> step -> the alerts (labels and annotations) firing then, for both builds.
    What each checkpoint means decides it (see the module doc and the rules' comments)."""
    partner_down = steps("expiring", "expired", "still_down")
    # no token from "expired" on; firing after 2 minutes of it
    no_fetch = [i for i in steps("expired", "still_down") if i - TIMELINE.index("expired") >= 2]
    out: dict[str, dict[int, list[dict]]] = {name: {} for name in (
        "OAuth2CCTokenExpiringRefreshFailing", "OAuth2CCNoSuccessfulFetch", "OAuth2CCNoTokenSinceStart",
        "OAuth2CCFailureReplies", "OAuth2CCBudgetRefused", "OAuth2CCVmReloaded")}

    def firing(alert: str, at: list[int], quiet: list[int], labels, summary, runbook):
        for i in at:
            out[alert][i] = [{"exp_labels": labels(b), "exp_annotations": {
                "summary": summary(b), "runbook": f"docs/operations.md#{runbook}"}} for b in BUILDS]
        for i in quiet:
            out[alert].setdefault(i, [])

    def inst(profile, severity):
        return lambda b: {"severity": severity, "oauth2_cc_profile": profile, "job": job(b), "instance": instance(b)}

    every = list(range(len(TIMELINE)))
    firing("OAuth2CCTokenExpiringRefreshFailing", partner_down, [i for i in every if i not in partner_down],
           inst("partner", "critical"),
           lambda b: f"oauth2-cc partner on {instance(b)}: under a tenth of the token's lifetime left and token requests fail",
           "oauth2cctokenexpiringrefreshfailing")
    firing("OAuth2CCNoSuccessfulFetch", no_fetch, [i for i in every if i not in no_fetch],
           inst("partner", "critical"),
           lambda b: f"oauth2-cc partner on {instance(b)}: no token for longer than a token lives",
           "oauth2ccnosuccessfulfetch")
    # billing: failures from start_2 on (pending), firing after 2 minutes; the 10 min window keeps them
    firing("OAuth2CCNoTokenSinceStart", list(range(3, len(TIMELINE))), [0, 1, 2],
           inst("billing", "critical"),
           lambda b: f"oauth2-cc billing on {instance(b)}: no token since start-up, token requests fail",
           "oauth2ccnotokensincestart")
    # partner's failure replies at "expired": pending there and a minute later, firing after 2 minutes
    # while the 5 min rate still holds them (later steps depend on the window's edge: not asserted)
    expired = TIMELINE.index("expired")
    firing("OAuth2CCFailureReplies", [expired + 2, expired + 3], list(range(0, expired + 2)),
           lambda b: {"severity": "critical", "oauth2_cc_profile": "partner", "job": job(b)},
           lambda b: f"oauth2-cc partner ({job(b)}): over 1% of requests get the failure reply",
           "oauth2ccfailurereplies")
    budget = TIMELINE.index("budget")
    firing("OAuth2CCBudgetRefused", list(range(budget, len(TIMELINE))), list(range(budget)),
           inst("billing", "warning"),
           lambda b: f"oauth2-cc billing on {instance(b)}: max_fetches_per_hour refused token requests in the last 15 minutes",
           "oauth2ccbudgetrefused")
    # No VM reload in the scenario: quiet at every step (the firing case is VM_RELOAD_TEST).
    firing("OAuth2CCVmReloaded", [], every, None, None, "")
    return out


def series_of(build: str) -> list[dict]:
    """promtool input_series: every kept series of the build's checkpoints, one sample a step."""
    scrapes = {c: samples(fixture(build, c).read_text()) for c in CHECKPOINTS}
    keys = sorted({k for s in scrapes.values() for k in s})
    out = []
    for name, labels in keys:
        lab = dict(labels) | {"job": job(build), "instance": instance(build)}
        text = ",".join(f'{k}="{v}"' for k, v in sorted(lab.items()))
        values = " ".join(_fmt(scrapes[c].get((name, labels))) for c in TIMELINE)
        out.append({"series": f"{name}{{{text}}}", "values": values})
    return out


def _fmt(v: float | None) -> str:
    if v is None:
        return "_"
    return str(int(v)) if v == int(v) else repr(v)


def vm_reload_test() -> dict:
    """The VM-reload alert firing: the series shapes of the real wasm scrape (the plugin named
    oauth2_cc, as envoy/*.yaml name it), with a reload counted at minute 2. The scenario cannot
    crash the filter's VM on purpose, so these values are written, not scraped. Another Envoy
    whose plugins reload but which runs no oauth2-cc must stay quiet."""
    real = samples(fixture("wasm", "start_1").read_text())
    (reload,) = [(n, lab) for n, lab in real if n == "envoy_wasm_vm_reload"]
    (fetch_ok,) = [(n, lab) for n, lab in real if n == "oauth2_cc_fetch_ok" and ("oauth2_cc_profile", "partner") in lab]

    def series(key, inst, values):
        lab = dict(key[1]) | {"job": "envoy-wasm", "instance": inst}
        return {"series": f"{key[0]}{{{','.join(f'{k}={chr(34)}{v}{chr(34)}' for k, v in sorted(lab.items()))}}}",
                "values": values}

    plugin = dict(reload[1])["wasm_plugin"]
    return {"interval": "1m", "input_series": [
        series(reload, "wasm-0", "0 0 1 1"), series(fetch_ok, "wasm-0", "1 1 1 1"),
        series(reload, "other-0", "0 0 1 1")],
        "alert_rule_test": [
            {"eval_time": "1m", "alertname": "OAuth2CCVmReloaded", "exp_alerts": []},
            {"eval_time": "3m", "alertname": "OAuth2CCVmReloaded", "exp_alerts": [{
                "exp_labels": {"severity": "warning", "job": "envoy-wasm", "instance": "wasm-0", "wasm_plugin": plugin},
                "exp_annotations": {
                    "summary": f"wasm plugin {plugin} on wasm-0 (runs oauth2-cc): VM reloaded in the last 30 minutes",
                    "runbook": "docs/operations.md#oauth2ccvmreloaded"}}]}]}


def promtool_tests() -> dict:
    scenario = {"interval": "1m", "input_series": [s for b in BUILDS for s in series_of(b)], "alert_rule_test": [
        {"eval_time": f"{i}m", "alertname": alert, "exp_alerts": alerts}
        for alert, by_step in expected_alerts().items() for i, alerts in sorted(by_step.items())]}
    return {"rule_files": [RULES.name], "evaluation_interval": "1m", "tests": [scenario, vm_reload_test()]}


HEADER = """\
# promtool unit tests for oauth2-cc-alerts.yaml (`make rules`). GENERATED by
# tests/e2e/observability.py from real scrapes of both builds (testdata/<build>/<checkpoint>.prom):
#   UPDATE_OBSERVABILITY_FIXTURE=1 .venv/bin/python -m pytest tests/e2e/test_observability.py
# rewrites the scrapes and this file; test_observability.py fails when this file is stale.
"""
