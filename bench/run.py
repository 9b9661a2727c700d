"""`make bench`: the entry point of the instruction-count bench (Envoy under Callgrind).

The harness is the package ``bench/oauth2_bench`` (see its ``__init__`` for the modules and
``instr_cli.DOC`` or ``--help`` for usage); this file only runs its ``main``. The wall-clock view
is `bench/run_time.py` (`make bench-time`).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from oauth2_bench.instr_cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
