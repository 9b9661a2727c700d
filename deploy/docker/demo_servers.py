"""The demo IdP and echo upstream of deploy/docker/docker-compose.yml.

They are the end-to-end tests' servers (tests/e2e/servers.py): the IdP issues tok-1, tok-2, ...
that live --expires-in seconds (it checks no credentials: a demo); the echo upstream answers
every request with a JSON echo of it, so you can see the injected Authorization header.

    python deploy/docker/demo_servers.py idp --port 9101
    python deploy/docker/demo_servers.py echo --port 9102

Prints one line "<role> listening on <host>:<port>" once it serves (port 0: the kernel picks).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

E2E_DIR = Path(os.environ.get("OAUTH2_CC_E2E_DIR") or Path(__file__).resolve().parents[2] / "tests" / "e2e")
sys.path.insert(0, str(E2E_DIR))

from servers import EchoUpstream, TokenServer  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("role", choices=["idp", "echo"])
    p.add_argument("--host", default="0.0.0.0")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--expires-in", type=int, default=60, help="token lifetime in seconds (idp)")
    args = p.parse_args(argv)
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    if args.role == "idp":
        server = TokenServer(host=args.host, port=args.port, expires_in=args.expires_in).start()
    else:
        server = EchoUpstream(host=args.host, port=args.port).start()
    print(f"{args.role} listening on {server.host}:{server.port}", flush=True)
    try:
        signal.sigwait({signal.SIGINT, signal.SIGTERM})
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
