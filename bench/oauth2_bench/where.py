"""Where the instructions go (`make bench`): per object for every cell, per symbol for the
dynamic module, and the VM entries and host calls per request for the proxy-wasm cells.

* Objects: the direct window's Callgrind dump, summed per object: the Envoy binary (Envoy and V8,
  stripped, so no function names), libc, a dynamic module's ``.so``, and code in no file, which
  is what V8 compiled at run time: the wasm module's functions and V8's wasm-to-C++ stubs.
  Callgrind shows both the last and code of a binary's sections it could not read as an address
  in object ``???``; the process's executable mappings, read while it ran, tell them apart.
* The dynamic module: the cell (d) again, with a build of the same code whose symbols are kept
  (``make bench-symbols``), so that Callgrind names our functions: the self cost of each of our
  functions (what ``callgrind_annotate`` shows for our object, summed over the files inlined code
  came from), and the calls between Envoy and the module by callee.
* proxy-wasm: Envoy's own wasm tracing (proxy-wasm-cpp-host logs every call into the VM and
  every host call at trace level, ``--component-log-level wasm:trace``), on a native Envoy
  with one worker: the calls of N requests, counted by name, apart from the ticks' calls.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

from .callgrind import KeepAlive, parse
from .common import path_of
from .instr import CellRunner

WASM_TRACE_CELLS = ["floor", "floor_fm0", "floor_fm", "oauth2cc", "oauth2cc_nopurge"]
# Calls into the VM that are not part of a request: timers and the shared-queue wake-ups.
TIMER_ENTRIES = ("proxy_on_tick", "proxy_on_queue_ready")
_TRACE = re.compile(r"^\[[^\]]+\]\[(?P<tid>\d+)\]\[trace\]\[wasm\] \[[^\]]+\] \[(?P<dir>host->vm|host<-vm|vm->host|vm<-host)\] "
                    r"(?:env\.)?(?P<name>[A-Za-z0-9_]+)")


JIT = "code in no file (V8's generated code: wasm functions, stubs; the vDSO)"


def object_name(ob: str, fn: str, maps: list[tuple[int, int, str]]) -> str:
    if ob in ("", "???"):
        try:
            addr = int(fn, 16)
        except ValueError:
            return JIT
        owner = next((path for lo, hi, path in maps if lo <= addr < hi), None)
        if owner is None:
            return JIT
        ob = owner
    name = Path(ob).name
    if name == "envoy":
        return "envoy (Envoy + V8, stripped)"
    if name.startswith(("libc.so", "libc-")):
        return "libc"
    return name


def objects(dump: str, maps: list[tuple[int, int, str]]) -> dict[str, int]:
    out: dict[str, int] = {}
    for (ob, fn), ir in parse(Path(dump)).self_ir.items():
        k = object_name(ob, fn, maps)
        out[k] = out.get(k, 0) + ir
    return out


def objects_per_request(window: dict, idle: dict, maps: list[tuple[int, int, str]]) -> dict[str, float]:
    """A counted window's instructions per request by object, with the timers' share taken off
    in proportion to the idle window's split by object (what the timers ran is what ran idle)."""
    scale = window["background_ir"] / idle["ir"] if idle["ir"] else 0.0
    idle_objects = objects(idle["dump"], maps)
    out = {k: (v - scale * idle_objects.get(k, 0)) / window["requests"] for k, v in objects(window["dump"], maps).items()}
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def object_functions(prof, requests: int, obj_path: str, top: int = 30) -> list[dict]:
    """Self cost per function of ``obj_path``'s object, summed over the source files its inlined
    code came from (``callgrind_annotate`` lists each file:function pair apart)."""
    rows: dict[str, int] = {}
    for (ob, fn), ir in prof.self_ir.items():
        if ob == obj_path:
            rows[fn] = rows.get(fn, 0) + ir
    ranked = sorted(rows.items(), key=lambda kv: -kv[1])[:top]
    return [{"function": fn, "ir_per_request": ir / requests} for fn, ir in ranked]


def module_calls(dump: str, requests: int, obj_path: str) -> dict[str, list[dict]]:
    """Calls per request across the module's boundary: Envoy into the module's hooks, and the
    module into Envoy's callbacks (named: Envoy exports them), with their inclusive cost."""
    prof = parse(Path(dump))
    into, out_of = [], []
    for (caller_ob, callee_ob, fn), n in prof.calls_from.items():
        key = (callee_ob, fn)
        row = {"function": fn, "calls_per_request": n / requests,
               "inclusive_ir_per_call": prof.call_ir.get(key, 0) / max(1, prof.calls.get(key, 0))}
        if callee_ob == obj_path and caller_ob != obj_path and fn.startswith("envoy_dynamic_module_on_"):
            into.append(row)
        elif caller_ob == obj_path and callee_ob != obj_path and fn.startswith("envoy_dynamic_module_callback_"):
            out_of.append(row)
    return {"hooks": sorted(into, key=lambda r: r["function"]), "callbacks": sorted(out_of, key=lambda r: r["function"])}


def module_summary(dump: str, requests: int, so: str) -> dict:
    """A dynamic module's own instructions per request (its object's self cost) and its calls
    across the boundary; the hooks and callbacks are named even in a stripped build (exported)."""
    prof = parse(Path(dump))
    own = sum(ir for (ob, _), ir in prof.self_ir.items() if ob == so)
    return {"self_ir_per_request": own / requests, **module_calls(dump, requests, so)}


def dynmod_profile(runner: CellRunner, so_symbols: str, shipped_ir: float | None) -> dict:
    """Cell (d) with the symbol build, direct route only."""
    r = runner.measure("dynmod", 0, routes=["direct"])
    w = r["direct"]
    prof = parse(Path(w["dump"]))
    ours = sum(ir for (ob, _), ir in prof.self_ir.items() if ob == so_symbols)
    return {"so": so_symbols, "ir_per_request": w["ir_per_request"], "shipped_ir_per_request": shipped_ir,
            "problems": r["problems"], "functions": object_functions(prof, w["requests"], so_symbols),
            "object_ir_per_request": ours / w["requests"],
            "calls": module_calls(w["dump"], w["requests"], so_symbols),
            "objects": objects_per_request(w, r["background"], r.get("maps", []))}


def count_trace(text: str) -> tuple[dict[str, int], dict[str, int], dict[str, int]]:
    """(calls into the VM by name, host calls by name, calls of either kind made inside a timer
    entry) from wasm trace lines. Threads interleave, so nesting is followed per thread."""
    entries: dict[str, int] = {}
    host: dict[str, int] = {}
    timers: dict[str, int] = {}
    stacks: dict[str, list[str]] = {}
    for line in text.splitlines():
        m = _TRACE.match(line)
        if not m:
            continue
        stack = stacks.setdefault(m.group("tid"), [])
        d, name = m.group("dir"), m.group("name")
        if d in ("host<-vm", "vm<-host"):
            if stack:
                stack.pop()
            continue
        in_timer = bool(stack) and stack[0] in TIMER_ENTRIES or (not stack and name in TIMER_ENTRIES)
        bucket = timers if in_timer else (entries if d == "host->vm" else host)
        bucket[name] = bucket.get(name, 0) + 1
        stack.append(name)
    return entries, host, timers


def wasm_calls(runner: CellRunner, key: str, requests: int = 200) -> dict:
    e, _ = runner.start(key, f"trace-{key}", callgrind=False, log_level="info", component_log_level="wasm:trace")
    try:
        c = KeepAlive(e.listener_port())
        path = path_of(key, "direct")
        c.get(path, 20)
        time.sleep(0.3)
        start = e.log_path.stat().st_size
        t0 = time.monotonic()
        bad = c.get(path, requests)
        wall = time.monotonic() - t0
        time.sleep(0.3)
        text = e.log_path.read_bytes()[start:].decode("utf-8", "replace")
        c.close()
    finally:
        e.stop(grace=10)
    entries, host, timers = count_trace(text)
    return {"requests": requests, "failed": len(bad), "wall_s": wall,
            "vm_entries": {k: v / requests for k, v in sorted(entries.items())},
            "host_calls": {k: v / requests for k, v in sorted(host.items())},
            "timer_calls": dict(sorted(timers.items()))}
