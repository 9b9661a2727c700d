"""docs/capacity.md and tools/capacity_cases.json are tools/capacity.py's output (the script's
refresh rule is checked against the core's by src/core/capacity_rule.rs, a cargo test)."""

from __future__ import annotations

import re
import sys

from envoy import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / "tools"))
import capacity  # noqa: E402

DOC = REPO_ROOT / "docs" / "capacity.md"
BLOCK = re.compile(r"<!-- capacity:begin[^>]*-->\n(.*?)<!-- capacity:end -->", re.S)


def test_doc_tables_are_the_scripts_output():
    m = BLOCK.search(DOC.read_text())
    assert m, "docs/capacity.md has no capacity:begin/end block"
    assert m.group(1) == capacity.tables(), "docs/capacity.md is stale: paste `python3 tools/capacity.py`"


def test_cases_file_is_the_scripts_output():
    assert capacity.CASES_PATH.read_text() == capacity.cases_text(), "run `python3 tools/capacity.py --cases`"


def test_issue_figures():
    """The figures the docs quote: 5,000 sidecars x 3 one-hour profiles at 0.8 -> 18,750 an hour;
    3 gateway replicas -> 11.25; a 3 s token is usable for 2 s (a whole-second margin) and
    refreshed at 1.6 s (src/core/cache.rs's unit test has the same figures)."""
    assert capacity.requests_per_hour(5000, 3, 3600, 0.8) == 18_750
    assert capacity.requests_per_hour(3, 3, 3600, 0.8) == 11.25
    assert capacity.token_times(0, 3, None, 0.8, 5) == (1_600, 2_000)
    assert capacity.budget_floor(3600) == 2 and capacity.budget_floor(300) == 15
