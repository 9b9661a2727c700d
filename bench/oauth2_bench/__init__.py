"""The bench as a package. `make bench` (entry point `bench/run.py`) counts instructions per
request with Callgrind; `make bench-time` (`bench/run_time.py`) is the wall-clock view.

Instruction counts (`make bench`, `make cost`):

* ``callgrind``: Envoy under Callgrind, counted windows, the timers' instructions, dump parsing;
* ``instr``: one cell's run (start, injection check, windows, counters), the cells' floors;
* ``where``: per object, per symbol of the dynamic module, proxy-wasm calls per request;
* ``memory``: Envoy RSS at 1, 2, 4, 8 workers;
* ``instr_report``, ``instr_goals``: BENCHMARKS.md and the chart; ``instr_cli``: arguments, ``main``.

The wall-clock view (`make bench-time`, `make bench-smoke`):

* ``common``: paths, the cells (CONFIGS) and their labels, the bench's error type;
* ``configs``: the Envoy bootstraps of every cell and of the native upstream;
* ``processes``: pinned Envoys, wrk, perf, /proc readers, pausing the idle Envoys;
* ``machine``: is the machine quiet? (load at start, steal, calibration loop, thresholds);
* ``measure``: the run itself (start, injection checks, one measured cell, rounds);
* ``stats``: medians and spreads, per-round ratios and differences;
* ``report``: docs/benchmarks-time.md and its chart; ``goals``: its goals table;
* ``cli``: arguments, pre-flight checks, ``main``.

Shared: ``common`` (cells, labels, paths), ``configs`` (bootstraps), ``processes``.
"""
