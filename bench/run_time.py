"""`make bench-time` / `make bench-smoke`: the entry point of the wall-clock view of the bench
(wrk against pinned Envoys, judged quiet or noisy; `make bench` counts instructions instead).

The harness is the package ``bench/oauth2_bench`` (see its ``__init__`` for the modules and
``cli.DOC`` or ``--help`` for usage); this file only runs its ``main``.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from oauth2_bench.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
