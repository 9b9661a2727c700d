"""`make run`: the demo IdP, an echo upstream and real Envoy with oauth2-cc, until Ctrl-C.

The demo IdP issues a new token per request (`tok-1`, `tok-2`, ...) that lives 60 s,
so you can watch the filter refresh it in the background at 80% of its life.

Ports default to those in `envoy/demo.yaml`; `DEMO_LISTENER_PORT`, `DEMO_ADMIN_PORT`,
`DEMO_IDP_PORT` and `DEMO_UPSTREAM_PORT` move them (the configuration is rewritten into
`DEMO_STATE_DIR`, default `build/`, next to Envoy's log); `OAUTH2_CC_WASM` names the
module (default `build/oauth2_cc.wasm`). `DEMO_ENVOY_CONFIG` runs another Envoy
configuration as it is (the tests use it for a configuration the filter refuses).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "e2e"))

from servers import EchoUpstream, TokenServer  # noqa: E402
from envoy import envoy_bin  # noqa: E402

# name -> (environment variable, the port envoy/demo.yaml names)
PORTS = {
    "Envoy listener": ("DEMO_LISTENER_PORT", 10000),
    "Envoy admin": ("DEMO_ADMIN_PORT", 9901),
    "demo IdP": ("DEMO_IDP_PORT", 9101),
    "echo upstream": ("DEMO_UPSTREAM_PORT", 9102),
}
STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}
# Stop signals that arrived while the mask was open (see start_envoy).
stop_requested: list[int] = []


def note_stop(signum, _frame) -> None:
    stop_requested.append(signum)


def ports() -> dict[str, int]:
    return {name: int(os.environ.get(var) or default) for name, (var, default) in PORTS.items()}


def port_free(port: int) -> bool:
    """True when a listener could bind the port now.

    SO_REUSEADDR, as Envoy and the demo servers use it: a socket left in TIME_WAIT by
    the previous run does not count as in use, a listening socket still does.
    """
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def render(text: str, port: dict[str, int], wasm: str | None) -> str:
    """envoy/demo.yaml's text on the given ports (and module path, when given)."""
    for name, (_, default) in PORTS.items():
        # every port in demo.yaml is a `port_value: N` or the IdP's `127.0.0.1:N` in token_url
        text = text.replace(f"port_value: {default}", f"port_value: {port[name]}")
        text = text.replace(f"127.0.0.1:{default}/", f"127.0.0.1:{port[name]}/")
    if wasm:
        text = text.replace("filename: build/oauth2_cc.wasm", f"filename: {wasm}")
    return text


def envoy_config(state: Path, port: dict[str, int]) -> Path:
    """The Envoy configuration to run: `DEMO_ENVOY_CONFIG`, or envoy/demo.yaml on our ports."""
    if os.environ.get("DEMO_ENVOY_CONFIG"):
        return Path(os.environ["DEMO_ENVOY_CONFIG"])
    text = render((ROOT / "envoy" / "demo.yaml").read_text(), port, os.environ.get("OAUTH2_CC_WASM"))
    path = state / "demo-envoy.yaml"
    path.write_text(text)
    return path


def shown(path: Path) -> str:
    """A path as the user types it: relative to the repository when inside it."""
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def why_envoy_failed(log_path: Path) -> list[str]:
    """The lines of Envoy's log that say why it stopped: the filter's `configuration
    rejected: ...`, else Envoy's last error or critical records."""
    try:
        lines = log_path.read_text(errors="replace").splitlines()
    except OSError:
        return []
    rejected = [ln[ln.index("configuration rejected"):] for ln in lines if "configuration rejected" in ln]
    if rejected:
        return rejected
    return [ln for ln in lines if "[error]" in ln or "[critical]" in ln][-5:]


def start_envoy(config: Path, log) -> subprocess.Popen:
    """Envoy in its own session (the terminal's Ctrl-C reaches only us; we stop it).

    This thread blocks SIGINT/SIGTERM for `sigwait`, and a child inherits the mask of
    the thread that forks it: Envoy would then ignore `terminate()` until the kill.
    So the mask is opened around the fork. (Not `preexec_fn`: it is unsafe once
    threads run, and the demo servers already do.) A Ctrl-C in that instant runs
    `note_stop`, and `main` stops as it would after `sigwait`; exec resets the handler
    to the default in Envoy.
    """
    old = signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
    try:
        return subprocess.Popen(
            [envoy_bin(), "-c", str(config), "--concurrency", "2", "-l", "info",
             "--disable-hot-restart"],
            cwd=ROOT, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True,
        )
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def wait_ready(envoy: subprocess.Popen, admin_port: int, timeout: float = 30) -> str:
    """"ready", "exited", "timeout", or "stopped" (Ctrl-C while waiting)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if signal.sigpending() & STOP_SIGNALS:
            return "stopped"
        if envoy.poll() is not None:
            return "exited"
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/ready", timeout=1) as r:
                if r.read().strip() == b"LIVE":
                    return "ready"
        except OSError:
            pass
        time.sleep(0.1)
    return "timeout"


def stop_envoy(envoy: subprocess.Popen) -> None:
    """SIGTERM by PID (Envoy exits in well under a second), SIGKILL if it has not after 5 s."""
    if envoy.poll() is None:
        envoy.terminate()
    try:
        envoy.wait(5)
    except subprocess.TimeoutExpired:
        print("Envoy ignored SIGTERM for 5 s; killed", file=sys.stderr)
        envoy.kill()
        envoy.wait()


def main() -> int:
    port = ports()
    busy = [f"{name} ({p})" for name, p in port.items() if not port_free(p)]
    if busy:
        print(f"ports in use: {', '.join(busy)}; stop what uses them and retry", file=sys.stderr)
        return 1
    state = Path(os.environ.get("DEMO_STATE_DIR") or ROOT / "build")
    state.mkdir(parents=True, exist_ok=True)
    log_path = state / "demo-envoy.log"
    idp = upstream = envoy = None
    try:
        idp = TokenServer(port=port["demo IdP"], expires_in=60).start()
        upstream = EchoUpstream(port=port["echo upstream"]).start()
        with open(log_path, "w") as log:
            envoy = start_envoy(envoy_config(state, port), log)
        outcome = "stopped" if stop_requested else wait_ready(envoy, port["Envoy admin"])
        if outcome == "stopped":
            return 0
        if outcome != "ready":
            what = "did not become ready in 30 s" if outcome == "timeout" else f"exited ({envoy.poll()})"
            print(f"Envoy {what}; full log: {shown(log_path)}", file=sys.stderr)
            for line in why_envoy_failed(log_path):
                print("  " + line, file=sys.stderr)
            return 1
        lp, ap = port["Envoy listener"], port["Envoy admin"]
        print("oauth2-cc demo is up. Try:\n")
        print(f"  curl -s http://127.0.0.1:{lp}/anything | python3 -m json.tool   # authorization: Bearer tok-N")
        print(f"  curl -s http://127.0.0.1:{lp}/public/x | python3 -m json.tool   # no token on /public/")
        print(f"  curl -s http://127.0.0.1:{ap}/stats | grep oauth2_cc              # the filter's metrics\n")
        print(f"Envoy log: {shown(log_path)}. Ctrl-C stops everything.", flush=True)
        if not stop_requested:
            signal.sigwait(STOP_SIGNALS)
        return 0
    finally:
        if envoy is not None:
            stop_envoy(envoy)
        for server in (idp, upstream):
            if server is not None:
                server.stop()
        print("\nstopped Envoy, the demo IdP and the echo upstream.", flush=True)


if __name__ == "__main__":
    # Blocked before any thread starts, so every thread inherits it and the signal waits
    # for `sigwait` in main (a thread with it unblocked would swallow it). The handlers
    # only matter in the instant start_envoy opens the mask.
    for sig in STOP_SIGNALS:
        signal.signal(sig, note_stop)
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    sys.exit(main())
