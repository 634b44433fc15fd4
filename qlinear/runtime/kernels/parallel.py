"""Work-claiming parallelism for the int8 kernels (what ORT's thread pool does).

Why not numba ``prange``: its OpenMP layer splits the range statically and ends with a
barrier, so every call waits until *every* thread has been scheduled. On a loaded
machine (2 cores shared by several processes) a sleeping worker is woken only at the
next scheduler tick, and each parallel call then costs ~4 ms; measured here a
128x384x384 GEMM took 12 ms with prange on 2 threads vs 0.19 ms on 1 thread, while
ORT kept 0.1 ms. Here the calling thread starts on the tasks at once and helper
threads claim tasks from a shared atomic counter when they get a CPU; the caller
waits only for tasks a helper has actually claimed, never for a helper to wake up.

Helpers are daemon threads that, after a job, poll for the next one for ~1 ms
(SPIN_ITERATIONS) before sleeping, as ORT's pool does: back-to-back calls then start
on both cores within ~15 us instead of after an OS wake-up.

A kernel written for this takes `counters` (int64[2]: next task, tasks done) first and
loops ``while (t := claim(counters)) < ntasks: ...; finish(counters)``. Kernels must
not raise after claiming a task (nopython integer loops here cannot).
"""

from __future__ import annotations

import atexit
import threading
from typing import Any

import numpy as np
from numba import njit, types
from numba.extending import intrinsic

from qlinear.runtime.kernels import config
from qlinear.runtime.kernels.config import JIT

#: Below this many multiply-adds (~20 us on one core) a call runs on the calling thread
#: only: waking a helper costs about as much as it would save.
SERIAL_WORK = 1 << 23


@intrinsic
def _atomic_add(typingctx, arr, index, value):
    sig = types.int64(arr, index, value)

    def codegen(context, builder, signature, args):
        arr_v, idx_v, val_v = args
        ary = context.make_array(signature.args[0])(context, builder, arr_v)
        idx = context.cast(builder, idx_v, signature.args[1], types.int64)
        val = context.cast(builder, val_v, signature.args[2], types.int64)
        ptr = builder.gep(ary.data, [idx])
        return builder.atomic_rmw("add", ptr, val, "seq_cst")

    return sig, codegen


@intrinsic
def _atomic_load(typingctx, arr, index):
    sig = types.int64(arr, index)

    def codegen(context, builder, signature, args):
        arr_v, idx_v = args
        ary = context.make_array(signature.args[0])(context, builder, arr_v)
        idx = context.cast(builder, idx_v, signature.args[1], types.int64)
        ptr = builder.gep(ary.data, [idx])
        return builder.load_atomic(ptr, "seq_cst", 8)

    return sig, codegen


@njit(inline="always", **JIT)
def claim(counters: np.ndarray) -> int:
    """The next unclaimed task index (may be >= the task count: then stop)."""
    return _atomic_add(counters, 0, 1)


@njit(inline="always", **JIT)
def finish(counters: np.ndarray) -> None:
    """Mark one claimed task as done."""
    _atomic_add(counters, 1, 1)


@njit(**JIT)
def _wait_done(counters, ntasks):
    while _atomic_load(counters, 1) < ntasks:
        pass


#: How long an idle helper keeps polling for the next call before it sleeps
#: (iterations of an atomic load, ~1 ms). ORT's pool spins the same way; without it a
#: helper woken by the OS often starts only after the whole call is over.
SPIN_ITERATIONS = 400_000


@njit(**JIT)
def _spin_until_changed(ctrl, seen, iterations):
    """Poll ctrl[0] (nogil) until it differs from `seen` or the budget runs out."""
    for _ in range(iterations):
        v = _atomic_load(ctrl, 0)
        if v != seen:
            return v
    return seen


class _Helper:
    """A daemon thread that runs posted jobs, then spins a little waiting for the next."""

    def __init__(self, ctrl: np.ndarray) -> None:
        self.ctrl = ctrl
        self.job: tuple[int, Any, tuple] | None = None
        self.wake = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="qlinear-int8", daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        seen = 0
        while not _stopping:
            self.wake.wait()
            self.wake.clear()
            while not _stopping:
                job = self.job
                if job is not None and job[0] != seen:
                    seen = job[0]
                    try:
                        job[1](*job[2])
                    except Exception:  # the caller finishes every task itself anyway
                        pass
                    self.job = None
                if _spin_until_changed(self.ctrl, np.int64(seen), SPIN_ITERATIONS) == seen:
                    break


_helpers_list: list[_Helper] = []
_ctrl = np.zeros(1, np.int64)
_lock = threading.Lock()
_stopping = False


@atexit.register
def _stop_helpers() -> None:
    """Let helpers leave their loop before the interpreter tears down: a daemon thread
    killed inside a numba call can hold the allocator's lock the exit path then waits on
    (seen once: a benchmark process hung at exit in garbage collection)."""
    global _stopping
    _stopping = True
    with _lock:
        _ctrl[0] += 1
        helpers = list(_helpers_list)
    for helper in helpers:
        helper.wake.set()
    for helper in helpers:
        helper.thread.join(timeout=1.0)


def _helpers(count: int) -> list[_Helper]:
    with _lock:
        while len(_helpers_list) < count:
            _helpers_list.append(_Helper(_ctrl))
        return _helpers_list[:count]


def run_tasks(kernel: Any, ntasks: int, work: int, *args: Any) -> None:
    """kernel(counters, *args) on the calling thread plus helpers; returns when all are done.

    `work` (multiply-adds) decides whether helpers are worth waking; the thread count
    is numba's (config.set_num_threads), so sessions keep their num_threads. Tasks are
    claimed atomically, so a helper that starts late (or twice) is harmless.
    """
    counters = np.zeros(2, np.int64)
    threads = config.num_threads()
    if threads > 1 and ntasks > 1 and work >= SERIAL_WORK:
        with _lock:
            _ctrl[0] += 1
            gen = int(_ctrl[0])
        job = (gen, kernel, (counters, *args))
        for helper in _helpers(min(threads, ntasks) - 1):
            helper.job = job
            helper.wake.set()
    kernel(counters, *args)
    _wait_done(counters, np.int64(ntasks))
