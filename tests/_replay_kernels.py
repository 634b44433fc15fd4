"""A minimal run_tasks kernel for the replay tests (test_native_chain, test_kernels_program)."""

from __future__ import annotations

from numba import njit

from qlinear.runtime.kernels.config import JIT
from qlinear.runtime.kernels.parallel import claim


@njit(**JIT)
def add_one(counters, x, out):  # pragma: no cover
    """out = x + 1 as one task."""
    while True:
        t = claim(counters)
        if t >= 1:
            break
        for i in range(x.shape[0]):
            out[i] = x[i] + 1
