"""Numba kernels for elementwise ops that numpy has no ufunc for (erf, exact Gelu).

numpy has no erf, and libm's erf called from a numba loop is scalar (~10 ns/element:
4 ms for a BERT 128x3072 Gelu). For float32 data we evaluate erf in float64 with
branch-free polynomials only, so LLVM vectorizes the loop (a table of per-interval
coefficients was correctly rounded too but its gathers kept the loop scalar, 5 ns/elt):

- |x| < 1: the Maclaurin series x·P(x²), 13 terms (truncation < 1e-11 relative);
- 1 <= |x| < 6: erf = 1 - exp(-x²)·erfcx(|x|), erfcx (= e^{x²} erfc x, entire and
  slowly varying) by a degree-20 Chebyshev fit on [1, 6] made at import time (relative
  error ~1e-11), exp by Cody-Waite reduction, a degree-10 Taylor polynomial and an
  exact power of two built from six selects;
- |x| >= 6: ±1 (erfc(6) ~ 2e-17, below half a float32 ulp of 1).

Total error ~1e-11 before the one rounding to float32, so the result is the correctly
rounded float32 erf except at rare ties (max relative error 2^-24 ~ 6e-8; tests assert
it). float64 inputs keep libm's erf. Large arrays are split over the shared
work-sharing pool (`parallel.run_tasks`). The public wrappers take any float array and
return a new array of the same dtype.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit
from numpy.polynomial import chebyshev

from qlinear.runtime.kernels.parallel import claim, finish, run_tasks

_INV_SQRT2 = 1.0 / math.sqrt(2.0)
_SPLIT, _LIMIT = 1.0, 6.0
#: Elements per claimed task.
_CHUNK = 1 << 14
_LOG2E = 1.4426950408889634
_LN2_HI = 0.6931471803691238  # ln 2 with the low 32 bits zero: k*_LN2_HI is exact
_LN2_LO = 1.9082149292705877e-10


def _maclaurin() -> np.ndarray:
    """erf(x) = x * sum_n c_n (x^2)^n, c_n = 2/sqrt(pi) (-1)^n / (n! (2n+1))."""
    return np.array([2.0 / math.sqrt(math.pi) * (-1.0) ** n / (math.factorial(n) * (2 * n + 1))
                     for n in range(_SERIES_TERMS)])


#: Constant trip counts matter: LLVM unrolls them, which leaves the element loop
#: innermost and vectorizable (a loop bound read from an array size kept it scalar).
_CHEB_DEGREE = 20
_SERIES_TERMS = 13  # truncation < 1e-11 relative for |x| < 1
_EXP_TERMS = 11  # |r| <= ln2/2: truncation < 3e-13


def _erfcx_chebyshev(degree: int = _CHEB_DEGREE) -> np.ndarray:
    """Chebyshev coefficients of erfcx(a) = e^{a^2} erfc(a) on [_SPLIT, _LIMIT]."""
    nodes = np.cos(np.pi * (np.arange(4000) + 0.5) / 4000)
    a = (nodes * (_LIMIT - _SPLIT) + (_LIMIT + _SPLIT)) / 2
    f = np.array([math.erfc(v) * math.exp(v * v) for v in a])
    return chebyshev.chebfit(nodes, f, degree)


_U_SCALE = 2.0 / (_LIMIT - _SPLIT)
_U_SHIFT = (_LIMIT + _SPLIT) / (_LIMIT - _SPLIT)
#: Only FMA contraction (no other fastmath: NaN checks must survive).
_FLOAT_JIT = {"cache": True, "nogil": True, "fastmath": {"contract"}}

_SERIES = _maclaurin()
_CHEB = _erfcx_chebyshev()
_EXP_TAYLOR = np.array([1.0 / math.factorial(n) for n in range(_EXP_TERMS)])


@njit(inline="always", **_FLOAT_JIT)
def _erf64(x, series, cheb, exp_taylor):  # pragma: no cover - compiled
    """erf(x) in float64 to ~1e-12, branch-free (selects only) so loops vectorize."""
    a = abs(x)
    a = a if a < _LIMIT else _LIMIT  # also NaN -> _LIMIT; the caller restores NaN
    # small |x|: Maclaurin
    s = a * a
    p = series[_SERIES_TERMS - 1]
    for n in range(_SERIES_TERMS - 2, -1, -1):
        p = p * s + series[n]
    small = a * p
    # large |x|: 1 - exp(-a^2) * erfcx(a)
    b = a if a > _SPLIT else _SPLIT
    y = -b * b
    kf = np.floor(y * _LOG2E + 0.5)
    r = (y - kf * _LN2_HI) - kf * _LN2_LO
    e = exp_taylor[_EXP_TERMS - 1]
    for n in range(_EXP_TERMS - 2, -1, -1):
        e = e * r + exp_taylor[n]
    m = np.int64(-kf)  # 2^kf = prod over the bits of m of 2^-(2^bit), exact
    e = e * (0.5 if m & 1 else 1.0)
    e = e * (0.25 if m & 2 else 1.0)
    e = e * (0.0625 if m & 4 else 1.0)
    e = e * (0.00390625 if m & 8 else 1.0)
    e = e * (1.52587890625e-05 if m & 16 else 1.0)
    e = e * (2.3283064365386963e-10 if m & 32 else 1.0)
    u = b * _U_SCALE - _U_SHIFT  # maps [_SPLIT, _LIMIT] to [-1, 1] without a division
    u2 = 2.0 * u
    b1 = 0.0
    b2 = 0.0
    for k in range(_CHEB_DEGREE, 0, -1):
        t = cheb[k] + u2 * b1 - b2
        b2 = b1
        b1 = t
    erfcx = cheb[0] + u * b1 - b2
    large = 1.0 - e * erfcx
    large = large if a < _LIMIT else 1.0
    v = small if a < _SPLIT else large
    return math.copysign(v, x)  # erf(-0) = -0


@njit(**_FLOAT_JIT)
def _erf_f32(counters, x, series, cheb, exp_taylor, out):  # pragma: no cover - compiled
    n = x.size
    ntasks = (n + _CHUNK - 1) // _CHUNK
    while True:
        t = claim(counters)
        if t >= ntasks:
            break
        xs = x[t * _CHUNK : min(n, (t + 1) * _CHUNK)]  # slices: loops from 0 vectorize
        os = out[t * _CHUNK : min(n, (t + 1) * _CHUNK)]
        for i in range(xs.size):
            v = np.float64(xs[i])
            r = _erf64(v, series, cheb, exp_taylor)
            os[i] = r if v == v else v
        finish(counters)


@njit(**_FLOAT_JIT)
def _gelu_f32(counters, x, series, cheb, exp_taylor, out):  # pragma: no cover - compiled
    n = x.size
    ntasks = (n + _CHUNK - 1) // _CHUNK
    while True:
        t = claim(counters)
        if t >= ntasks:
            break
        xs = x[t * _CHUNK : min(n, (t + 1) * _CHUNK)]
        os = out[t * _CHUNK : min(n, (t + 1) * _CHUNK)]
        for i in range(xs.size):
            v = np.float64(xs[i])
            r = 0.5 * v * (1.0 + _erf64(v * _INV_SQRT2, series, cheb, exp_taylor))
            os[i] = r if v == v else v
        finish(counters)


@njit(cache=True)
def _erf_flat(x, out):  # pragma: no cover - compiled
    for i in range(x.size):
        out[i] = math.erf(x[i])


@njit(cache=True)
def _gelu_flat(x, out):  # pragma: no cover - compiled
    for i in range(x.size):
        v = x[i]
        out[i] = 0.5 * v * (1.0 + math.erf(v * _INV_SQRT2))


def _apply(flat_kernel, pooled_kernel, x: np.ndarray) -> np.ndarray:
    """float32 (and narrower) via the table kernel on the pool; float64 via libm."""
    if x.dtype == np.float64:
        work = np.ascontiguousarray(x)
        out = np.empty(work.shape, np.float64)
        flat_kernel(work.reshape(-1), out.reshape(-1))
        return out
    # float16, bfloat16, ...: compute in float32, round once at the end
    work = np.ascontiguousarray(x, dtype=np.float32)
    out = np.empty(work.shape, np.float32)
    n = work.size
    run_tasks(pooled_kernel, max(1, -(-n // _CHUNK)), n * 32, work.reshape(-1), _SERIES,
              _CHEB, _EXP_TAYLOR, out.reshape(-1))
    return out if out.dtype == x.dtype else out.astype(x.dtype)


def erf(x: np.ndarray) -> np.ndarray:
    """Elementwise error function in x's dtype (float32: correctly rounded up to ties)."""
    return _apply(_erf_flat, _erf_f32, x)


def gelu_exact(x: np.ndarray) -> np.ndarray:
    """Gelu with the exact erf formulation, 0.5·x·(1 + erf(x/√2)), in x's dtype."""
    return _apply(_gelu_flat, _gelu_f32, x)
