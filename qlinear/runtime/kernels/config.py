"""Numba flags, thread count and CPU-feature-based kernel selection, in one place.

Every numba function in `qlinear.runtime.kernels` takes its flags from here so that
caching, fastmath and parallelism are decided once. Integer paths never use fastmath:
results must be bit-exact.

Kernel selection: the VNNI micro-kernel asks LLVM for `vpdpbusd`, which aborts the
whole process on a CPU without AVX512-VNNI. `host_has_vnni()` reads the host features
from llvmlite *before* anything is compiled; the intrinsic in `vnni.py` only emits
the instruction when this says yes (otherwise it emits plain vector IR), and the
kernels only run the VNNI micro-kernel when `use_vnni()` is true.

Environment: ``QLINEAR_KERNELS=portable`` forces the portable (plain numba loop)
micro-kernel; ``QLINEAR_KERNELS=vnni`` insists on VNNI (error if the CPU lacks it);
unset or ``auto`` picks VNNI when available.
"""

from __future__ import annotations

import functools
import os
import threading

import numba
from llvmlite import binding as llvm

#: Flags for integer kernels: cached on disk, no fastmath (bit-exact), nogil.
JIT = {"cache": True, "fastmath": False, "nogil": True}
#: Same, parallel over prange loops (both cores).
JIT_PARALLEL = {**JIT, "parallel": True}

KERNEL_CHOICES = ("auto", "vnni", "portable")


@functools.cache
def host_cpu_features() -> frozenset[str]:
    """Enabled features of the host CPU as LLVM names them (e.g. 'avx512vnni')."""
    flat = llvm.get_host_cpu_features().flatten()
    return frozenset(f[1:] for f in flat.split(",") if f.startswith("+"))


def host_has_vnni() -> bool:
    """True when the CPU executes 512-bit vpdpbusd (AVX512-VNNI)."""
    feats = host_cpu_features()
    return "avx512vnni" in feats and "avx512bw" in feats and "avx512f" in feats


def kernel_choice(override: str | None = None) -> str:
    """The requested micro-kernel family: explicit override, else $QLINEAR_KERNELS, else auto."""
    raw = override or _environ_get("QLINEAR_KERNELS") or "auto"
    return _parse_choice(raw)


def _environ_get(name: str) -> str | None:
    """os.environ.get without its cost for an unset name (0.7 us: it raises and catches a
    KeyError), which every convolution call paid. CPython's os.environ keeps its
    encoded mapping in `_data`; any other platform takes the plain lookup."""
    data = getattr(os.environ, "_data", None)
    if isinstance(data, dict) and os.name == "posix":
        raw = data.get(name.encode())
        return None if raw is None else raw.decode()
    return os.environ.get(name)


@functools.lru_cache(maxsize=16)
def _parse_choice(raw: str) -> str:
    choice = raw.strip().lower()
    if choice not in KERNEL_CHOICES:
        raise ValueError(f"QLINEAR_KERNELS must be one of {KERNEL_CHOICES}, got {choice!r}")
    return choice


def use_vnni(override: str | None = None) -> bool:
    """Whether to run the VNNI micro-kernel (decided from CPU features, never by trying)."""
    choice = kernel_choice(override)
    if choice == "portable":
        return False
    if choice == "vnni" and not host_has_vnni():
        raise RuntimeError("QLINEAR_KERNELS=vnni but this CPU has no AVX512-VNNI")
    return host_has_vnni()


def host_has_vbmi() -> bool:
    """True when the CPU executes 512-bit vpermi2b (AVX512-VBMI): the byte table lookup."""
    feats = host_cpu_features()
    return "avx512vbmi" in feats and "avx512bw" in feats and "avx512f" in feats


def use_vbmi(override: str | None = None) -> bool:
    """Whether to run the VBMI byte-lookup kernel (``portable`` forces the scalar loop;
    ``vnni`` says nothing about VBMI, so it still follows the CPU)."""
    return kernel_choice(override) != "portable" and host_has_vbmi()


_local = threading.local()


def set_num_threads(n: int) -> None:
    """Use n threads for the calling thread's parallel kernels (0 = all numba threads)."""
    limit = numba.config.NUMBA_NUM_THREADS
    count = limit if n <= 0 else max(1, min(n, limit))
    if getattr(_local, "threads", None) != count:
        numba.set_num_threads(count)
        _local.threads = count


def num_threads() -> int:
    """The calling thread's kernel thread count (numba's, read once per thread: asking
    numba costs ~2 us, a fifth of a small convolution)."""
    count = getattr(_local, "threads", None)
    if count is None:
        count = _local.threads = numba.get_num_threads()
    return count
