"""The goals of the instruction-count bench, judged on the run's figures: each row shows today's
value against the goal and, when it is missed, by how much."""

from __future__ import annotations

from .common import LABEL, ROUTES

# (cell, reference, bound in instructions per request, "abs" for |difference| <= bound, text)
INSTR_GOALS = [
    ("dynmod", "floor_native_fdm", 500, "", "(d) ≤ (fdm) + 500"),
    ("oauth2cc", "floor_fm", 2000, "", "(c) ≤ (fm) + 2,000"),
    ("oauth2cc_nopurge", "floor_fm0", 2000, "", "(c0) ≤ (fm0) + 2,000"),
    ("perroute", "none", 300, "abs", "(p) within 300 of (a)"),
]
MIB = 1024
# (cell, reference, bound MiB, text): Envoy RSS at 2 workers.
MEMORY_GOALS = [
    ("oauth2cc", "floor", 8.0, "Envoy RSS at 2 workers: wasm (c) ≤ its floor (f) + 8 MiB"),
    ("dynmod", "none", 5.0, "Envoy RSS at 2 workers: dynamic module (d) ≤ no filter (a) + 5 MiB"),
]
SIZE_GOALS = [(600 * 1024, "`oauth2_cc.wasm` ≤ 600 KiB, every feature kept"), (512 * 1024, "… stretch: ≤ 512 KiB")]


def judge(value: float, bound: float, absolute: bool, unit: str, fmt: str) -> str:
    shown = format(value, fmt) + unit
    over = (abs(value) if absolute else value) - bound
    if over <= 0:
        return f"{shown}: met"
    return f"{shown}: **missed by {format(over, fmt)}{unit}**"


def instr_cell(summ: dict, rk: str, key: str, ref: str, bound: float, how: str) -> str:
    if key not in summ[rk] or ref not in summ[rk]:
        return "not measured"
    d = summ[rk][key]["mean"] - summ[rk][ref]["mean"]
    return judge(d, bound, how == "abs", "", "+,.0f")


def goals_markdown(res: dict) -> list[str]:
    summ = res["summary"]
    L = ["## Goals", "",
         "Instructions per request (Callgrind, mean of the runs): the difference to the reference cell, against "
         "the goal's bound; \"missed by\" is how far over the bound it is.", "",
         "| goal | direct route | upstream route |", "| --- | --- | --- |"]
    for key, ref, bound, how, text in INSTR_GOALS:
        L.append(f"| {text} | " + " | ".join(instr_cell(summ, rk, key, ref, bound, how) for rk in ROUTES) + " |")
    mem = res.get("memory") or {}
    for key, ref, bound, text in MEMORY_GOALS:
        a, b = mem.get(key, {}).get("2", {}).get("rss_kib"), mem.get(ref, {}).get("2", {}).get("rss_kib")
        v = judge((a - b) / MIB, bound, False, " MiB", "+.1f") if a and b else "not measured"
        L.append(f"| {text} ({LABEL[key]} − {LABEL[ref]}) | {v} | |")
    wasm = res["files"].get("wasm")
    for bound, text in SIZE_GOALS:
        v = judge(wasm["bytes"] / 1024, bound / 1024, False, " KiB", ",.1f") if wasm else "not measured"
        L.append(f"| {text} | {v} | |")
    return L + ["", "Where the differences come from: \"Where the instructions go\" below (the hooks and callbacks of "
                 "the dynamic modules, the calls into the VM and host calls of the wasm cells); the memory goal: "
                 "\"Memory and size\"; why the RSS and the module's size are over their goals: "
                 "[docs/memory.md](docs/memory.md), \"What cannot be cut, and why\".", ""]
