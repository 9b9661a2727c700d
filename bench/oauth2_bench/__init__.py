"""The `make bench` harness as a package; `bench/run.py` is its entry point.

* ``common``: paths, the cells (CONFIGS) and their labels, the bench's error type;
* ``configs``: the Envoy bootstraps of every cell and of the native upstream;
* ``processes``: pinned Envoys, wrk, perf, /proc readers, pausing the idle Envoys;
* ``machine``: is the machine quiet? (load at start, steal, calibration loop, thresholds);
* ``measure``: the run itself (start, injection checks, one measured cell, rounds);
* ``stats``: medians and spreads, per-round ratios and differences;
* ``report``: BENCHMARKS.md and the chart; ``goals``: issue 12's goals table;
* ``cli``: arguments, pre-flight checks, ``main``.
"""
