"""`make run`: the demo IdP, an echo upstream and real Envoy with oauth2-cc, until Ctrl-C.

The demo IdP issues a new token per request (`tok-1`, `tok-2`, ...) that lives 60 s,
so you can watch the filter refresh it in the background at 80% of its life.
"""

from __future__ import annotations

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

PORTS = {"Envoy listener": 10000, "Envoy admin": 9901, "demo IdP": 9101, "echo upstream": 9102}


def port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def main() -> int:
    busy = [f"{name} ({port})" for name, port in PORTS.items() if not port_free(port)]
    if busy:
        print(f"ports in use: {', '.join(busy)}; stop what uses them and retry", file=sys.stderr)
        return 1
    idp = TokenServer(port=9101, expires_in=60).start()
    upstream = EchoUpstream(port=9102).start()
    (ROOT / "build").mkdir(exist_ok=True)
    log = open(ROOT / "build" / "demo-envoy.log", "w")
    envoy = subprocess.Popen(
        [envoy_bin(), "-c", str(ROOT / "envoy" / "demo.yaml"), "--concurrency", "2", "-l", "info",
         "--disable-hot-restart"],
        cwd=ROOT, stderr=log, start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if envoy.poll() is not None:
                print("Envoy exited; see build/demo-envoy.log", file=sys.stderr)
                return 1
            try:
                with urllib.request.urlopen("http://127.0.0.1:9901/ready", timeout=1) as r:
                    if r.read().strip() == b"LIVE":
                        break
            except OSError:
                time.sleep(0.2)
        print("oauth2-cc demo is up. Try:\n")
        print("  curl -s http://127.0.0.1:10000/anything | python3 -m json.tool   # authorization: Bearer tok-N")
        print("  curl -s http://127.0.0.1:10000/public/x | python3 -m json.tool   # no token on /public/")
        print("  curl -s http://127.0.0.1:9901/stats | grep oauth2_cc              # the filter's metrics\n")
        print("Envoy log: build/demo-envoy.log. Ctrl-C stops everything.")
        signal.sigwait({signal.SIGINT, signal.SIGTERM})
        return 0
    finally:
        envoy.terminate()
        try:
            envoy.wait(5)
        except subprocess.TimeoutExpired:
            envoy.kill()
        idp.stop()
        upstream.stop()
        print("\nstopped Envoy, the demo IdP and the echo upstream.")


if __name__ == "__main__":
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    sys.exit(main())
