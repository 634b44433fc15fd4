"""Numba kernels for elementwise ops that numpy has no ufunc for (erf, exact Gelu).

numpy has no erf; a numba loop over libm's erf is exact and one pass over memory.
The public wrappers take any float array and return a new array of the same dtype.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

_INV_SQRT2 = 1.0 / math.sqrt(2.0)


@njit(cache=True)
def _erf_flat(x, out):  # pragma: no cover - compiled
    for i in range(x.size):
        out[i] = math.erf(x[i])


@njit(cache=True)
def _gelu_flat(x, out):  # pragma: no cover - compiled
    for i in range(x.size):
        v = x[i]
        out[i] = 0.5 * v * (1.0 + math.erf(v * _INV_SQRT2))


def _apply(flat_kernel, x: np.ndarray) -> np.ndarray:
    """Run a flat kernel in float32/float64 and return an array of x's dtype."""
    if x.dtype == np.float32 or x.dtype == np.float64:
        work = np.ascontiguousarray(x)
    else:  # float16, bfloat16, ...: compute in float32, round once at the end
        work = np.ascontiguousarray(x, dtype=np.float32)
    out = np.empty(work.shape, dtype=work.dtype)
    flat_kernel(work.reshape(-1), out.reshape(-1))
    return out if out.dtype == x.dtype else out.astype(x.dtype)


def erf(x: np.ndarray) -> np.ndarray:
    """Elementwise error function (libm accuracy) in x's dtype."""
    return _apply(_erf_flat, x)


def gelu_exact(x: np.ndarray) -> np.ndarray:
    """Gelu with the exact erf formulation, 0.5·x·(1 + erf(x/√2)), in x's dtype."""
    return _apply(_gelu_flat, x)
