"""What a cache hit on a token-exchange profile costs Envoy next to a client-credentials hit, in
instructions per request under Callgrind: the wasm build, 1 worker, the direct-response route, 300
keep-alive requests carrying the same bytes (`Authorization: Bearer <a 310-byte subject token>`),
each profile in two Envoys, alternating. The counts are raw (the filter's 100 ms tick included),
so compare the rows with each other; `make bench` is the calibrated view.

    .venv/bin/python bench/exchange_hit.py . build/oauth2_cc.wasm   # about 2 minutes
"""
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(sys.argv[1])
WASM = sys.argv[2]
sys.path.insert(0, str(REPO / "tests/e2e"))
sys.path.insert(0, str(REPO / "bench"))
from envoy import bootstrap_dict, direct_route  # noqa: E402
from exchange_server import ExchangeServer  # noqa: E402
from oauth2_bench.callgrind import CallgrindEnvoy, KeepAlive, totals  # noqa: E402

REQUESTS, WARMUP = 300, 50


def plugin_config(kind: str) -> dict:
    """One profile on every route: client credentials ("cc") or token exchange ("ex")."""
    p = {"cluster": "idp", "token_url": "http://idp.test/oauth2/token", "client_id": "svc-a", "client_secret": "s3cret"}
    if kind == "ex":
        p.update(grant_type="urn:ietf:params:oauth:grant-type:token-exchange", token_exchange={})
    return {"profiles": {"default": p}, "routes": [{"match": {"path_prefix": "/"}, "profile": "default"}]}


def measure(kind: str, server: ExchangeServer, headers: dict, work: Path) -> str:
    b = bootstrap_dict(plugin_config(kind), wasm=True, wasm_file=WASM, listener_port=0, admin_port=0,
                       token_clusters={"idp": server}, routes=[direct_route(path="/direct", body="ok")])
    b["stats_flush_on_admin"] = True  # no stats-flush timer inside a window
    e = CallgrindEnvoy(json.dumps(b), work, concurrency=1, log_level="warning", name=f"{kind}-{time.monotonic_ns()}")
    try:
        e.start()
        e.wait_ready(timeout=300)
        client = KeepAlive(e.listener_port())
        deadline = time.monotonic() + 60
        while client.get("/direct", 1, headers) and time.monotonic() < deadline:
            time.sleep(0.2)  # pacing: the first requests wait for the first token
        bad = client.get("/direct", WARMUP, headers)
        e.instrument_on()
        bad += client.get("/direct", REQUESTS, headers)
        dump, _ = e.stop_and_dump(f"{kind}-window")
        client.close()
        return f"{kind}: {totals(dump) / REQUESTS:,.0f} instructions per request (raw), other statuses {sorted(set(bad))}"
    finally:
        e.stop()


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="exchange-hit-"))
    server = ExchangeServer().start()
    try:
        subject = server.mint_subject("alice")
        print(f"subject token: {len(subject)} bytes")
        for kind in ("cc", "ex", "cc", "ex"):
            print(measure(kind, server, {"Authorization": f"Bearer {subject}"}, work), flush=True)
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
