"""Import first in a benchmark script: fixes the thread counts of torch / numba (`--threads N`, default 2) through
the environment, before either starts its pool."""

import os
import sys

THREADS = sys.argv[sys.argv.index("--threads") + 1] if "--threads" in sys.argv else str(min(2, os.cpu_count() or 1))
for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
    os.environ.setdefault(_var, THREADS)
