"""`make help` lists every Makefile target with its one-line `## target: text` description."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest

from envoy import REPO_ROOT


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_help_lists_every_target_with_a_description():
    out = subprocess.run(["make", "-s", "--no-print-directory", "help"], cwd=REPO_ROOT,
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, f"make help: exit {out.returncode}\n{out.stdout}{out.stderr}"
    listed = {}
    for line in out.stdout.splitlines():
        m = re.fullmatch(r"  (\S+) +(.+)", line)
        assert m, f"not a `  target  description` line: {line!r}\n{out.stdout}"
        listed[m.group(1)] = m.group(2)
    rules = set(re.findall(r"^([A-Za-z0-9_-]+):(?!=)", (REPO_ROOT / "Makefile").read_text(), re.M))
    missing = sorted(rules - listed.keys())
    undocumented = sorted(t for t, text in listed.items() if text.startswith("(no description"))
    print(f"{len(listed)} targets listed; rules {sorted(rules)}")
    assert not missing and not undocumented, (
        f"targets not listed: {missing}; without a description: {undocumented}\n{out.stdout}"
    )
    for target in ("run", "test", "lint", "unit", "e2e", "help"):
        assert target in listed, f"{target} not in make help:\n{out.stdout}"
