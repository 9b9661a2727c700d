"""Envoy's resident memory with and without the filter: `make bench-memory`.

For each cell (the benchmark's Envoy configurations, bench/oauth2_bench/configs.py) and each worker
count, one Envoy is started on its own, warmed up, sent a fixed number of keep-alive requests on
the direct-response route (spread over several connections, so every worker serves some), and
then its VmRSS is read from /proc/PID/status once it has stopped moving. Cells run one after
another, so a neighbour's start-up never overlaps a reading.

    .venv/bin/python bench/memory.py                       # cells none, floor, oauth2cc; 1, 2, 4, 8 workers
    .venv/bin/python bench/memory.py --cells oauth2cc --workers 2 --detail
    .venv/bin/python bench/memory.py --wasm /tmp/variant.wasm --cells oauth2cc --workers 2

``--detail`` adds where the memory is: /proc/PID/smaps_rollup (anonymous vs file-backed), the
mappings over 1 MiB resident from /proc/PID/smaps, Envoy's admin /memory (tcmalloc: bytes in use
vs held), and the wasm counters from /stats. ``--json FILE`` writes every figure.
"""

from __future__ import annotations

import argparse
import http.client
import json
import re
import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from oauth2_bench.common import (CLIENT_SECRET, DEFAULT_DYNMOD, DEFAULT_FLOOR_WASM, FLOOR_NATIVE_DIR,  # noqa: E402
                                 ROOT, STEADY_EXPIRES_IN, WASM_INJECTED)
from oauth2_bench.configs import under_test_bootstrap  # noqa: E402

from envoy import Envoy, wasm_path  # noqa: E402
from servers import EchoUpstream, TokenServer  # noqa: E402

MIB = 1024.0
DEFAULT_CELLS = ["none", "floor", "oauth2cc"]
NATIVE_CELLS = {"floor_native": "floor_native", "dynmod": "oauth2_cc"}
WORK = ROOT / "build" / "bench" / "memory"


def vm_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")


def settled_rss_kib(pid: int, timeout: float = 10.0) -> int:
    """VmRSS once two readings 0.5 s apart agree within 64 KiB (background ticks allocate a little)."""
    last = vm_rss_kib(pid)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        time.sleep(0.5)
        now = vm_rss_kib(pid)
        if abs(now - last) <= 64:
            return now
        last = now
    return last


def smaps_rollup(pid: int) -> dict[str, int]:
    out = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        k, _, v = line.partition(":")
        if v.strip().endswith("kB"):
            out[k.strip()] = int(v.split()[0])
    return out


def big_mappings(pid: int, min_kib: int = 1024) -> list[dict]:
    """Every mapping with at least ``min_kib`` resident: range, permissions, path, Rss, Anonymous."""
    maps, cur = [], None
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        head = re.match(r"^([0-9a-f]+)-([0-9a-f]+) (\S+) \S+ \S+ \S+\s*(.*)$", line)
        if head:
            cur = {"size_kib": (int(head.group(2), 16) - int(head.group(1), 16)) // 1024,
                   "perms": head.group(3), "path": head.group(4) or "[anon]"}
            maps.append(cur)
        elif cur is not None and line.startswith(("Rss:", "Anonymous:")):
            cur[line.split(":")[0].lower()] = int(line.split()[1])
    return sorted((m for m in maps if m.get("rss", 0) >= min_kib), key=lambda m: -m["rss"])


def admin_json(e: Envoy, path: str) -> dict:
    _, body = e.admin_get(path)
    return json.loads(body)


def wasm_stats(e: Envoy) -> dict[str, int]:
    _, body = e.admin_get("/stats?filter=" + "^wasm\\.")
    out = {}
    for line in body.splitlines():
        k, sep, v = line.partition(": ")
        if sep and v.strip().isdigit():
            out[k] = int(v)
    return out


class Connections:
    """``n`` keep-alive connections to the listener, used round robin."""

    def __init__(self, port: int, n: int):
        self.conns = [http.client.HTTPConnection("127.0.0.1", port, timeout=10) for _ in range(n)]
        self.i = 0

    def get(self, path: str) -> tuple[int, bytes]:
        c = self.conns[self.i % len(self.conns)]
        self.i += 1
        c.request("GET", path)
        r = c.getresponse()
        return r.status, r.read()

    def close(self):
        for c in self.conns:
            c.close()


def measure_cell(cell: str, workers: int, args: argparse.Namespace) -> dict:
    work = WORK / f"{cell}-{workers}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    servers = [TokenServer(expires_in=STEADY_EXPIRES_IN).start(), EchoUpstream().start()]
    ts, echo = servers
    env = {"BENCH_CLIENT_SECRET": CLIENT_SECRET}
    modules = {}
    if cell in NATIVE_CELLS:
        so = args.dynmod if cell == "dynmod" else args.floor_native
        env["ENVOY_DYNAMIC_MODULES_SEARCH_PATH"] = str(Path(so).parent)
        modules[cell] = re.fullmatch(r"lib(.+)\.so", Path(so).name).group(1)
    boot = under_test_bootstrap(cell, token_server=ts, upstream_port=echo.port, echo_port=echo.port,
                                wasm_file=args.wasm, floor_wasm_files={"floor": args.floor_wasm}, modules=modules)
    e = Envoy(json.dumps(boot, indent=1), work, concurrency=workers, log_level="warning",
              name=f"envoy-{cell}-{workers}", env=env)
    try:
        e.start()
        e.wait_ready(timeout=120)
        rss_ready = settled_rss_kib(e.pid)
        conns = Connections(e.listener_port(), 4 * workers)
        # warm-up: the first requests of each worker (a wasm cell fetches its token on the first)
        deadline = time.monotonic() + 30
        for _ in range(args.warmup):
            status, _ = conns.get("/direct")
            while status != 200 and time.monotonic() < deadline:
                time.sleep(0.05)
                status, _ = conns.get("/direct")
            if status != 200:
                raise RuntimeError(f"{cell}: /direct answered {status}\n{e.log_tail(40)}")
        failed = 0
        for _ in range(args.requests):
            status, _ = conns.get("/direct")
            failed += status != 200
        if failed:
            raise RuntimeError(f"{cell}: {failed} of {args.requests} requests failed\n{e.log_tail(40)}")
        _, body = conns.get("/echo")
        auth = json.loads(body)["headers"].get("authorization")
        conns.close()
        wants_token = cell in ("oauth2cc", "floor", "dynmod", "floor_native")
        if wants_token != bool(auth):
            raise RuntimeError(f"{cell}: /echo carried authorization={auth!r}")
        res = {"cell": cell, "workers": workers, "rss_ready_kib": rss_ready, "rss_kib": settled_rss_kib(e.pid)}
        if cell == "oauth2cc":
            res["injected"] = int(e.admin_get("/stats?filter=" + WASM_INJECTED)[1].split(": ")[-1] or 0)
        if args.detail:
            res["smaps_rollup"] = smaps_rollup(e.pid)
            res["mappings"] = big_mappings(e.pid)
            res["memory"] = admin_json(e, "/memory")
            res["wasm_stats"] = wasm_stats(e)
        return res
    finally:
        e.stop()
        for s in servers:
            s.stop()


def print_detail(r: dict):
    ro = r["smaps_rollup"]
    print(f"    smaps_rollup: Rss {ro['Rss'] / MIB:.1f} MiB = anonymous {ro['Anonymous'] / MIB:.1f}"
          f" + file-backed {(ro['Rss'] - ro['Anonymous']) / MIB:.1f}")
    m = r["memory"]
    print("    tcmalloc (/memory): " + ", ".join(f"{k} {int(v) / 2**20:.1f} MiB" for k, v in m.items()
                                                  if str(v).isdigit()))
    for mp in r["mappings"]:
        print(f"    {mp['rss'] / MIB:7.1f} MiB resident of {mp['size_kib'] / MIB:9.1f} MiB {mp['perms']}"
              f" anon {mp.get('anonymous', 0) / MIB:6.1f}  {mp['path']}")
    print("    " + ", ".join(f"{k} {v}" for k, v in r["wasm_stats"].items() if v))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cells", default=",".join(DEFAULT_CELLS),
                   help="comma-separated: none, floor, oauth2cc, floor_native, dynmod (default %(default)s)")
    p.add_argument("--workers", default="1,2,4,8", help="Envoy --concurrency values (default %(default)s)")
    p.add_argument("--requests", type=int, default=2000, help="measured requests per Envoy (default %(default)s)")
    p.add_argument("--warmup", type=int, default=200, help="requests before the measured ones (default %(default)s)")
    p.add_argument("--repeat", type=int, default=1, help="Envoys per cell and worker count; the median is shown")
    p.add_argument("--wasm", default=wasm_path(), help="the oauth2-cc module (default %(default)s)")
    p.add_argument("--floor-wasm", default=str(DEFAULT_FLOOR_WASM))
    p.add_argument("--dynmod", default=str(DEFAULT_DYNMOD))
    p.add_argument("--floor-native", default=str(FLOOR_NATIVE_DIR / "target" / "release" / "libfloor_native.so"))
    p.add_argument("--detail", action="store_true", help="smaps, tcmalloc and wasm counters per Envoy")
    p.add_argument("--json", help="write every figure to this file")
    args = p.parse_args()
    cells = [c for c in args.cells.split(",") if c]
    workers = [int(w) for w in args.workers.split(",") if w]
    for c in cells:
        f = {"floor": args.floor_wasm, "oauth2cc": args.wasm, "dynmod": args.dynmod,
             "floor_native": args.floor_native}.get(c)
        if f and not Path(f).is_file():
            print(f"{c}: no module at {f}", file=sys.stderr)
            return 2
    print(f"oauth2-cc wasm: {args.wasm} ({Path(args.wasm).stat().st_size} bytes)")
    results = []
    table: dict[str, dict[int, float]] = {}
    for w in workers:
        for c in cells:
            runs = []
            for _ in range(args.repeat):
                r = measure_cell(c, w, args)
                runs.append(r)
                results.append(r)
                print(f"  {c:13} {w} workers: VmRSS {r['rss_kib'] / MIB:6.1f} MiB"
                      f" (after start-up {r['rss_ready_kib'] / MIB:.1f})", flush=True)
                if args.detail:
                    print_detail(r)
            table.setdefault(c, {})[w] = statistics.median(x["rss_kib"] for x in runs) / MIB
    print(f"\nVmRSS MiB after {args.warmup} + {args.requests} requests (median of {args.repeat})\n")
    print("| cell | " + " | ".join(f"{w} workers" for w in workers) + " |")
    print("|---|" + "---:|" * len(workers))
    for c in cells:
        print(f"| {c} | " + " | ".join(f"{table[c][w]:.1f}" for w in workers) + " |")
    if "oauth2cc" in table and "floor" in table:
        print("| oauth2cc - floor | " + " | ".join(f"{table['oauth2cc'][w] - table['floor'][w]:+.1f}"
                                                   for w in workers) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
