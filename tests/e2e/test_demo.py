"""`make run`'s first hour: the demo (demo/run.py) stops at once on Ctrl-C, starts again
right after, and shows why Envoy refused a bad configuration.

The demo runs as `make run` runs it, on free ports (`DEMO_*_PORT`) with its state in
the test's tmp_path; SIGINT is what a terminal's Ctrl-C sends it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from envoy import REPO_ROOT, free_port

DEMO = REPO_ROOT / "demo" / "run.py"
UP_LINE = "Ctrl-C stops everything"


def children(pid: int) -> list[int]:
    """The PIDs whose parent is `pid` (the demo's only child process is Envoy)."""
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            # pid (comm) state ppid ...: comm may hold spaces, so split after the last ')'
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(entry.name))
    return out


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


class Demo:
    """demo/run.py in its own session; `stop()` kills whatever it left (after the test judged it)."""

    def __init__(self, env: dict[str, str]):
        self.out: list[str] = []
        self.proc = subprocess.Popen(
            [sys.executable, str(DEMO)], cwd=REPO_ROOT, env=env, stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
        )

    def wait_up(self, timeout: float = 60) -> bool:
        """Read its output until it says it is up (True) or it exits (False)."""
        deadline = time.monotonic() + timeout
        assert self.proc.stdout is not None
        for line in self.proc.stdout:  # bounded by the demo's own 30 s readiness wait
            self.out.append(line)
            if UP_LINE in line:
                return True
            if time.monotonic() > deadline:
                break
        return False

    def output(self) -> str:
        return "".join(self.out)

    def stop(self):
        for pid in [*children(self.proc.pid), self.proc.pid]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait()


@pytest.fixture
def demo_env(wasm_file, tmp_path) -> dict[str, str]:
    env = dict(os.environ, DEMO_STATE_DIR=str(tmp_path), OAUTH2_CC_WASM=wasm_file, PYTHONUNBUFFERED="1")
    for var in ("DEMO_LISTENER_PORT", "DEMO_ADMIN_PORT", "DEMO_IDP_PORT", "DEMO_UPSTREAM_PORT"):
        env[var] = str(free_port())
    return env


def run_until_up(env: dict[str, str]) -> Demo:
    demo = Demo(env)
    if not demo.wait_up():
        demo.stop()
        pytest.fail(f"demo did not come up (exit {demo.proc.returncode}):\n{demo.output()}")
    return demo


def test_demo_stops_within_2s_of_ctrl_c_and_starts_again_at_once(demo_env):
    for run in ("first", "second"):  # the second start reuses the ports at once (TIME_WAIT)
        demo = run_until_up(demo_env)
        try:
            url = f"http://127.0.0.1:{demo_env['DEMO_LISTENER_PORT']}/anything"
            with urllib.request.urlopen(url, timeout=10) as r:
                auth = r.status, json.load(r)["headers"].get("authorization")
            assert auth == (200, "Bearer tok-1"), f"{run} run: (status, authorization) = {auth}"
            started = children(demo.proc.pid)
            assert len(started) == 1, f"{run} run: demo children {started}, expected Envoy alone"
            t0 = time.monotonic()
            demo.proc.send_signal(signal.SIGINT)
            try:
                code = demo.proc.wait(10)
            except subprocess.TimeoutExpired:
                code = None
            took = time.monotonic() - t0
            rest, _ = demo.proc.communicate(timeout=5) if code is not None else ("", None)
            demo.out.append(rest or "")
            survivors = [pid for pid in started if alive(pid)]
            print(f"{run} run: stopped in {took:.3f} s, exit {code}, survivors {survivors}")
            assert code == 0 and took < 2.0 and not survivors, (
                f"{run} run: exit {code} after {took:.3f} s (bound 2 s), Envoy PIDs {started} "
                f"still alive: {survivors}\n{demo.output()}"
            )
            assert "stopped Envoy" in demo.output(), demo.output()
            assert "killed" not in demo.output(), f"{run} run: Envoy needed SIGKILL\n{demo.output()}"
        finally:
            demo.stop()


def test_demo_shows_why_envoy_refused_the_configuration(demo_env, tmp_path):
    # the demo's own configuration on the test's ports, with a token_url the filter refuses
    sys.path.insert(0, str(DEMO.parent))
    try:
        import run as demo_run
    finally:
        sys.path.remove(str(DEMO.parent))
    ports = {name: int(demo_env[var]) for name, (var, _) in demo_run.PORTS.items()}
    good = demo_run.render((REPO_ROOT / "envoy" / "demo.yaml").read_text(), ports, demo_env["OAUTH2_CC_WASM"])
    token_url = f'"token_url": "http://127.0.0.1:{ports["demo IdP"]}/oauth2/token"'
    assert token_url in good, f"{token_url} not in the rendered demo configuration:\n{good}"
    bad = tmp_path / "bad-demo.yaml"
    bad.write_text(good.replace(token_url, '"token_url": "idp.example/token"'))
    demo = Demo(dict(demo_env, DEMO_ENVOY_CONFIG=str(bad)))
    try:
        up = demo.wait_up()
        code = demo.proc.wait(30)
    finally:
        demo.stop()
    out = demo.output()
    print(out)
    assert not up and code == 1, f"up {up}, exit {code}; expected Envoy to refuse the configuration:\n{out}"
    assert "configuration rejected: profiles.demo.token_url" in out, out
