"""Envoy's resident memory per cell and worker count (`make bench`, not under Callgrind).

RSS is not a time measure: it does not depend on how busy the machine is. Each cell's Envoy is
started natively with 1, 2, 4 and 8 workers, sent requests over several keep-alive connections
(so that the kernel spreads them over the workers and every worker's filter instance has served
some), and its VmRSS read once the requests are done.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

from .callgrind import KeepAlive
from .common import LABEL, path_of
from .instr import CellRunner
from .processes import vm_rss_kib

MEMORY_CELLS = ["none", "floor", "oauth2cc", "floor_native", "dynmod"]
WORKERS = [1, 2, 4, 8]
CONNECTIONS_PER_WORKER = 4


def measure_rss(runner: CellRunner, key: str, workers: int, requests: int) -> dict:
    e, _ = runner.start(key, f"rss-{key}-{workers}w", concurrency=workers, callgrind=False)
    try:
        conns = CONNECTIONS_PER_WORKER * workers
        per_conn = max(1, requests // conns)
        path = path_of(key, "direct")

        def drive(_: int) -> list[int]:
            c = KeepAlive(e.listener_port())
            try:
                return c.get(path, per_conn)
            finally:
                c.close()

        with ThreadPoolExecutor(max_workers=min(conns, 16)) as ex:
            bad = [s for statuses in ex.map(drive, range(conns)) for s in statuses]
        time.sleep(0.5)
        rss = vm_rss_kib(e.pid)
    finally:
        e.stop(grace=10)
    return {"rss_kib": rss, "requests": per_conn * conns, "failed": len(bad)}


def measure_all(runner: CellRunner, cells: list[str], requests: int = 1000) -> dict:
    """cell -> {workers (as text, for JSON): {"rss_kib", "requests", "failed"}}"""
    out: dict[str, dict] = {}
    for key in cells:
        out[key] = {}
        for w in WORKERS:
            r = measure_rss(runner, key, w, requests)
            out[key][str(w)] = r
            print(f"  RSS of {LABEL[key]} {key}, {w} worker(s): {r['rss_kib'] / 1024:.1f} MiB"
                  + (f"  ({r['failed']} requests failed)" if r["failed"] else ""), flush=True)
    return out
