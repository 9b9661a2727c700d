"""Envoy under Callgrind: the process, the measured window, and the dump files.

An Envoy runs under ``valgrind --tool=callgrind --instr-atstart=no``: it starts and warms up with
instrumentation off (no cost counted, and about ten times faster than with it on), then
``callgrind_control -i on`` switches counting on around exactly N keep-alive requests, and
``callgrind_control --dump`` writes the counts and zeroes them. Total instructions (Ir) / N is the
cost of a request. Instructions do not depend on the machine's load: two runs agree to a fraction
of a percent where wall-clock time on a shared VM varies by a third.

What is not per request: timers keep firing during the window (the filter's tick, Envoy's
own). Their cost grows with the window's wall time, which does depend on the load, so each cell
also counts an idle window (instrumentation on, no request) and ``Background`` takes them off:

* the filter's timer calls are counted, not guessed from time: in the idle window, the entries
  into the filter's timer code (a dynamic module's scheduled-event hook and the callback that
  posts the event; for proxy-wasm, calls
  from Envoy into code V8 generated that cost at least ``TICK_ENTRY_MIN_IR`` each: a tick, not a
  buffer allocation) name the functions; in each counted window, the inclusive cost of the calls
  to those functions is taken off exactly;
* the rest of the idle window (Envoy's own timers) as a rate, times the window's duration.

Both the raw and the corrected figures are kept.
"""

from __future__ import annotations

import http.client
import os
import re
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

from .common import BenchError

from envoy import Envoy  # noqa: E402

VALGRIND = ["valgrind", "--tool=callgrind", "--instr-atstart=no"]
# A valgrind Envoy starts ~10x slower than a native one; V8 compiling a module takes longest.
READY_TIMEOUT_S = 300.0
# vgdb (what callgrind_control runs) talks to the process through FIFOs valgrind polls; it answers
# within a second on an idle machine and within tens of seconds on a busy one.
CONTROL_TIMEOUT_S = 120.0


def tools_missing() -> list[str]:
    return [t for t in ("valgrind", "vgdb", "callgrind_annotate") if not shutil.which(t)]


class CallgrindEnvoy(Envoy):
    """tests/e2e's Envoy, run under Callgrind with instrumentation off; the dumps are written to
    ``<tmpdir>/<name>.callgrind.<pid>.<part>``."""

    def __init__(self, *args, extra_valgrind: list[str] | None = None, **kw):
        super().__init__(*args, **kw)
        self.extra_valgrind = list(extra_valgrind or [])
        self.dumps: list[Path] = []

    @property
    def out_base(self) -> Path:
        return self.tmpdir / f"{self.name}.callgrind"

    def command(self, mode: str = "serve") -> list[str]:
        cmd = super().command(mode)
        if mode != "serve":
            return cmd
        return VALGRIND + [f"--callgrind-out-file={self.out_base}.%p"] + self.extra_valgrind + cmd

    def control(self, *commands: str):
        """Callgrind monitor commands (``instrumentation on``, ``dump <label>``, ``zero``), in
        order, through one ``vgdb`` call (what ``callgrind_control`` does, one command a call);
        raises when one is refused or the process is gone."""
        args = ["vgdb", f"--pid={self.pid}"]
        for i, c in enumerate(commands):
            args += (["-c"] if i else []) + c.split()
        p = subprocess.run(args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           text=True, timeout=CONTROL_TIMEOUT_S)
        if p.returncode != 0 or "error" in p.stdout.lower() or "not recognised" in p.stdout:
            raise BenchError(f"vgdb {' '.join(args[1:])} failed: {p.stdout.strip()}")

    def instrument_on(self) -> float:
        """Switches counting on; when (time.monotonic(), the middle of the vgdb call)."""
        t0 = time.monotonic()
        self.control("instrumentation on")
        return (t0 + time.monotonic()) / 2

    def stop_and_dump(self, label: str) -> tuple[Path, float]:
        """Instrumentation off, then a dump of the counts since the last dump or zero (which zeroes
        them): the new file, and when counting stopped (the middle of the vgdb call)."""
        before = set(self._parts())
        t0 = time.monotonic()
        self.control("instrumentation off", f"dump {label}")
        stopped = (t0 + time.monotonic()) / 2
        new = sorted(set(self._parts()) - before, key=lambda p: int(p.name.rsplit(".", 1)[1]))
        if not new:
            raise BenchError(f"{self.name}: callgrind_control --dump wrote no file next to {self.out_base}")
        self.dumps.append(new[-1])
        return new[-1], stopped

    def _parts(self) -> list[Path]:
        return [p for p in self.tmpdir.glob(f"{self.out_base.name}.{self.pid}.*") if p.name.rsplit(".", 1)[1].isdigit()]


def totals(path: Path) -> int:
    """The ``totals:`` (or ``summary:``) Ir of a Callgrind dump."""
    found = None
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if line.startswith(("totals:", "summary:")):
                found = int(line.split()[1])
    if found is None:
        raise BenchError(f"{path}: no totals line")
    return found


class KeepAlive:
    """One HTTP/1.1 keep-alive connection, sequential requests: the same bytes every time, so a
    window's count does not depend on how a load generator interleaves connections."""

    def __init__(self, port: int, timeout: float = 60):
        self.port = port
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)

    def get(self, path: str, n: int, headers: Mapping[str, str] | None = None) -> list[int]:
        """``n`` GETs of ``path``; the statuses that were not 200 (empty when all were)."""
        bad = []
        for _ in range(n):
            self.conn.request("GET", path, headers=dict(headers or {}))
            r = self.conn.getresponse()
            r.read()
            if r.status != 200:
                bad.append(r.status)
        return bad

    def close(self):
        self.conn.close()


@dataclass
class Window:
    """One counted window: ``requests`` requests on one connection; ``wall_s`` is how long
    counting was on."""

    label: str
    requests: int
    ir: int
    wall_s: float
    dump: str
    background_ir: float = 0.0
    failed_statuses: list[int] = field(default_factory=list)

    @property
    def ir_per_request(self) -> float:
        return (self.ir - self.background_ir) / self.requests

    @property
    def raw_ir_per_request(self) -> float:
        return self.ir / self.requests


def measure_requests(e: CallgrindEnvoy, client: KeepAlive, path: str, n: int, label: str,
                     headers: Mapping[str, str] | None = None) -> Window:
    # Counting starts from zero: every window ends with a dump, and nothing is counted between.
    t0 = e.instrument_on()
    bad = client.get(path, n, headers)
    dump, t1 = e.stop_and_dump(label)
    return Window(label, n, totals(dump), t1 - t0, str(dump), failed_statuses=bad)


def measure_idle(e: CallgrindEnvoy, seconds: float, label: str) -> Window:
    """Instructions while no request arrives: the timers' rate. ``requests`` is 1, so that the
    per-request properties read as the window's total."""
    t0 = e.instrument_on()
    time.sleep(seconds)
    dump, t1 = e.stop_and_dump(label)
    return Window(label, 1, totals(dump), t1 - t0, str(dump))


# A call from Envoy into V8-generated code that costs at least this much in an idle window is a
# timer entry (the filter's tick: ~30,000 instructions with oauth2-cc); Envoy's other calls into a
# VM while idle allocate a buffer for a host call's answer (~1,000-3,000), inside a tick.
TICK_ENTRY_MIN_IR = 8_000
# A dynamic module's timer: the module's own thread posts an event (the callback) and Envoy's main
# thread calls the hook for it (the tick).
MODULE_TIMER_CALLS = ("envoy_dynamic_module_callback_http_filter_config_scheduler_commit",
                      "envoy_dynamic_module_on_http_filter_config_scheduled")


def generated_code(ob: str, fn: str, maps: list[tuple[int, int, str]]) -> bool:
    """Code in no file: what V8 compiled at run time."""
    if ob not in ("", "???"):
        return False
    try:
        addr = int(fn, 16)
    except ValueError:
        return True
    return not any(lo <= addr < hi for lo, hi, _ in maps)


@dataclass
class Background:
    """What the idle window says about the timers (see the module's docstring)."""

    entries: list[tuple[str, str]]  # (object, function) of the timer entries
    ticks_idle: int
    tick_ir_idle: int
    rest_ir_per_s: float

    @classmethod
    def from_idle(cls, idle: Window, maps: list[tuple[int, int, str]]) -> "Background":
        prof = parse(Path(idle.dump))
        entries = set()
        for (caller_ob, ob, fn), _ in prof.calls_from.items():
            per_call = prof.call_ir[(ob, fn)] / max(1, prof.calls[(ob, fn)])
            from_envoy = not generated_code(caller_ob, "", maps) if caller_ob not in ("", "???") else False
            if fn in MODULE_TIMER_CALLS or (generated_code(ob, fn, maps) and from_envoy and per_call >= TICK_ENTRY_MIN_IR):
                entries.add((ob, fn))
        tick_ir = sum(prof.call_ir[k] for k in entries)
        return cls(sorted(entries), sum(prof.calls[k] for k in entries), tick_ir,
                   (prof.total - tick_ir) / idle.wall_s)

    def apply(self, w: Window) -> dict:
        """Sets ``w.background_ir``; what was found in the window."""
        prof = parse(Path(w.dump))
        ticks = sum(prof.calls.get(k, 0) for k in self.entries)
        tick_ir = sum(prof.call_ir.get(k, 0) for k in self.entries)
        w.background_ir = tick_ir + self.rest_ir_per_s * w.wall_s
        return {"timer_calls": ticks, "timer_ir": tick_ir, "rest_ir": self.rest_ir_per_s * w.wall_s}


def executable_maps(pid: int) -> list[tuple[int, int, str]]:
    """(start, end, file) of the process's file-backed executable mappings: what tells code of a
    binary that Callgrind could not name (a section without symbols) from code generated at run
    time (V8's compiled wasm), which Callgrind shows alike, as an address in object ``???``."""
    out = []
    try:
        for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
            f = line.split(maxsplit=5)
            if len(f) == 6 and "x" in f[1] and f[5].startswith("/"):
                lo, hi = f[0].split("-")
                out.append((int(lo, 16), int(hi, 16), f[5]))
    except OSError:
        pass
    return out


def clean_dumps(directory: Path):
    for p in directory.glob("*.callgrind.*"):
        try:
            os.unlink(p)
        except OSError:
            pass


# ---------------------------------------------------------------------------------------------
# The dump format, for the profiles: self cost per (object, function) and calls per callee.
# ---------------------------------------------------------------------------------------------

_NAME = re.compile(r"^\((\d+)\)(?: (.*))?$")


@dataclass
class Profile:
    """A parsed Callgrind dump (one event, Ir)."""

    total: int
    self_ir: dict[tuple[str, str], int]  # (object, function) -> Ir spent in that function itself
    calls: dict[tuple[str, str], int]  # (callee object, callee function) -> number of calls
    call_ir: dict[tuple[str, str], int]  # (callee object, callee function) -> inclusive Ir of those calls
    calls_from: dict[tuple[str, str, str], int] = field(default_factory=dict)  # (caller ob, callee ob, callee fn)


def parse(path: Path) -> Profile:
    """Reads a dump written with Callgrind's default compression (names as ``(id) name`` once,
    then ``(id)``). Calls are counted per call site and summed per callee; their inclusive cost
    is what the callee and everything it called cost."""
    names: dict[str, dict[str, str]] = {"ob": {}, "fn": {}}
    ob = fn = cob = cfn = ""
    self_ir: dict[tuple[str, str], int] = {}
    calls: dict[tuple[str, str], int] = {}
    call_ir: dict[tuple[str, str], int] = {}
    calls_from: dict[tuple[str, str, str], int] = {}
    total = 0
    pending_call = 0

    def name(kind: str, text: str) -> str:
        m = _NAME.match(text)
        if not m:
            return text
        if m.group(2) is not None:
            names[kind][m.group(1)] = m.group(2)
        return names[kind].get(m.group(1), text)

    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            line = line.rstrip("\n")
            if not line:
                continue
            c = line[0]
            if c.isdigit() or c in "+-*":
                parts = line.split()
                ir = int(parts[1]) if len(parts) > 1 else 0
                if pending_call:
                    key = (cob or ob, cfn)
                    calls[key] = calls.get(key, 0) + pending_call
                    call_ir[key] = call_ir.get(key, 0) + ir
                    k3 = (ob, cob or ob, cfn)
                    calls_from[k3] = calls_from.get(k3, 0) + pending_call
                    pending_call = 0
                    cob = ""
                else:
                    self_ir[(ob, fn)] = self_ir.get((ob, fn), 0) + ir
                continue
            key, _, value = line.partition("=")
            if key == "ob":
                ob = name("ob", value)
            elif key == "fn":
                fn = name("fn", value)
                cob = ""
            elif key == "cob":
                cob = name("ob", value)
            elif key == "cfn":
                cfn = name("fn", value)
            elif key == "calls":
                pending_call = int(value.split()[0])
            elif line.startswith("totals:"):
                total = int(line.split()[1])
    return Profile(total, self_ir, calls, call_ir, calls_from)
