"""Replaying recorded kernel calls in one native call: a batch-1 CNN without Python
between its convolutions.

Why: at batch 1 a MobileNetV2 convolution's arithmetic takes 10-40 us, and the Python
around it (the session loop, the op, the launch of 34 typed arguments through numba's
dispatcher) took 7-8 us more; 62 such steps were a fifth of the run. onnxruntime's
per-node cost is about 1 us.

How: a run of steps whose kernels only launch `run_tasks` calls is run once with
`parallel.record_calls()`. Each recorded call's argument tuple is stored once, in the
layout numba passes it, into a buffer of its own (arrays *borrowed*: no reference
count, so the kernels neither keep nor free them), beside the address of the kernel's
trampoline (the function the thread pool's helpers call). A replay is one nopython
loop over (trampoline, arguments, task count) that publishes each call to the pool
exactly as `run_tasks` does. The buffers the recorded run allocated for intermediate
values stay with the program and are reused by every replay. The words that point into
the run's inputs and outputs are found by address and patched to the arrays of each
replay, so inputs are read in place and outputs are fresh arrays.

A program is only as right as its recording: `Replayed` checks each new one by
replaying it on other inputs against the normal path, and keeps it only if every output
byte matches. `Replayed` serves a single op's per-shape plan (QLinearMatMul, QLinearConv)
and a session's chain of steps (`runtime.native_chain`).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from qlinear.runtime.kernels import config, parallel
from qlinear.runtime.kernels.config import JIT
from qlinear.runtime.kernels.parallel import (
    LONG_WAIT_TICKS,
    RAN,
    SERIAL_WORK,
    WAITED,
    _call_trampoline,
    _LauncherCache,
    _publish_and_run,
    _trampoline,
)

_I64 = ir.IntType(64)
_COUNTER_STRIDE = 8  # int64 words between two steps' counters: one cache line each


def _plain(ty: types.Type) -> bool:
    """Types whose value is plain data once arrays are borrowed."""
    if isinstance(ty, types.BaseTuple):
        return all(_plain(t) for t in ty.types)
    return isinstance(ty, (types.Array, types.Number, types.Boolean))


def _borrowed(context, builder, ty, value):
    """`value` with every array's meminfo and parent cleared (numba's incref/decref skip
    a null meminfo: such an array is a view whose owner lives elsewhere)."""
    if isinstance(ty, types.Array):
        ary = context.make_array(ty)(context, builder, value=value)
        ary.meminfo = cgutils.get_null_value(ary.meminfo.type)
        ary.parent = cgutils.get_null_value(ary.parent.type)
        return ary._getvalue()
    if isinstance(ty, types.BaseTuple):
        for i, item_ty in enumerate(ty.types):
            item = _borrowed(context, builder, item_ty, builder.extract_value(value, i))
            value = builder.insert_value(value, item, i)
    return value


@intrinsic
def _size_of(typingctx, tup):
    def codegen(context, builder, sig, args):
        return context.get_constant(types.int64, context.get_abi_sizeof(
            context.get_value_type(sig.args[0])))

    return types.int64(tup), codegen


@intrinsic
def _store_borrowed(typingctx, tup, dest):
    """Store `tup` (arrays borrowed) at the start of byte array `dest`."""
    if not _plain(tup):
        return None

    def codegen(context, builder, sig, args):
        tupty = sig.args[0]
        value = _borrowed(context, builder, tupty, args[0])
        data = context.make_array(sig.args[1])(context, builder, args[1]).data
        builder.store(value, builder.bitcast(data, context.get_value_type(tupty).as_pointer()))
        return context.get_dummy_value()

    return types.none(tup, dest), codegen


@intrinsic
def _store_word(typingctx, address, value):
    def codegen(context, builder, sig, args):
        builder.store(args[1], builder.inttoptr(args[0], _I64.as_pointer()))
        return context.get_dummy_value()

    return types.none(types.int64, types.int64), codegen


@intrinsic
def _data_address(typingctx, arr):
    def codegen(context, builder, sig, args):
        data = context.make_array(sig.args[0])(context, builder, args[0]).data
        return builder.ptrtoint(data, _I64)

    return types.int64(arr), codegen


def _make_packer(kernel: Any) -> Any:
    def pack(args, dest):
        size = _size_of(args)
        if size > dest.shape[0]:
            return 0, size
        _store_borrowed(args, dest)
        return _trampoline(kernel, args), size

    packer = njit(**{**JIT, "cache": False})(pack)
    if JIT["cache"]:
        packer._cache = _LauncherCache(packer.py_func, kernel)
    return packer


_packers: dict[Any, Any] = {}


@njit(**JIT)
def _run_program(job, steps, counters, patches, externals, threads, serial):  # pragma: no cover
    """Run every step in order; returns 0, 1 (a helper was seen descheduled: back off),
    or -(i + 1) when step i raised."""
    for p in range(patches.shape[0]):
        _store_word(patches[p, 0], _data_address(externals[patches[p, 1]]) + patches[p, 2])
    backoff = 0
    for i in range(steps.shape[0]):
        counters[i * _COUNTER_STRIDE] = 0
        counters[i * _COUNTER_STRIDE + 1] = 0
        fn = steps[i, 0]
        argp = steps[i, 1]
        ntasks = steps[i, 2]
        helpers = 0
        if not serial and steps[i, 3] != 0 and ntasks >= 2:
            helpers = (threads if threads < ntasks else ntasks) - 1
        if helpers > 0:
            failed = _publish_and_run(job, fn, argp, helpers)
            waited = job[WAITED]
            if waited > LONG_WAIT_TICKS and waited > 3 * (job[RAN] * threads // ntasks):
                serial = True
                backoff = 1
        else:
            failed = _call_trampoline(fn, argp)
        if failed != 0:
            return -(i + 1)
    return backoff


def _internal(args: tuple, ranges: list[tuple[int, int]]) -> list:
    """The arrays of `args` that are not views into one of `ranges` (nested tuples too)."""
    kept = []
    for a in args:
        if isinstance(a, tuple):
            kept += _internal(a, ranges)
        elif isinstance(a, np.ndarray):
            start = a.ctypes.data
            if not any(lo <= start < lo + n for lo, n in ranges):
                kept.append(a)
    return kept


class NativeProgram:
    """Recorded `run_tasks` calls, replayable with other arrays in place of `externals`
    (the recorded run's inputs and outputs, same shapes and dtypes, C-contiguous)."""

    def __init__(self, calls: Sequence[tuple[Any, int, int, tuple]],
                 externals: Sequence[np.ndarray]) -> None:
        for i, a in enumerate(externals):
            if not a.flags.c_contiguous:
                raise ValueError(f"external array {i} is not C-contiguous")
            for b in externals[:i]:
                if np.shares_memory(a, b):
                    raise ValueError("external arrays share memory")
        n = len(calls)
        self.counters = np.zeros(max(n, 1) * _COUNTER_STRIDE, np.int64)
        self.steps = np.zeros((n, 4), np.int64)
        self._args: list[tuple] = []  # keeps every recorded array alive
        self._blobs: list[np.ndarray] = []
        ranges = [(a.ctypes.data, a.nbytes) for a in externals]
        patches: list[tuple[int, int, int]] = []
        for i, (kernel, ntasks, work, args) in enumerate(calls):
            counters = self.counters[i * _COUNTER_STRIDE : i * _COUNTER_STRIDE + 2]
            full = (counters, *args)
            packer = _packers.get(kernel)
            if packer is None:
                packer = _packers[kernel] = _make_packer(kernel)
            blob = np.zeros(1024, np.uint8)
            fn, size = packer(full, blob)
            if fn == 0:
                blob = np.zeros(size, np.uint8)
                fn, size = packer(full, blob)
            words = blob[: size // 8 * 8].view(np.int64)
            for w in range(words.shape[0]):
                value = int(words[w])
                for e, (start, nbytes) in enumerate(ranges):
                    if start <= value < start + nbytes:
                        patches.append((blob.ctypes.data + 8 * w, e, value - start))
            self.steps[i] = (fn, blob.ctypes.data, ntasks, work >= SERIAL_WORK)
            # the run's inputs and outputs are patched before every use: not kept alive
            self._args.append(_internal(full, ranges))
            self._blobs.append(blob)
        self.patches = np.array(patches, np.int64).reshape(-1, 3)
        self.externals = [(a.shape, a.dtype) for a in externals]

    def run(self, externals: tuple[np.ndarray, ...]) -> bool:
        """Replay on `externals` (flat uint8 views of C-contiguous arrays, in the order
        the program was built with). False when a kernel raised: the caller then runs the
        steps normally, which raises the error with its node's name."""
        threads = config.num_threads()
        serial = threads < 2 or (parallel._backoff_until > 0.0
                                 and parallel._monotonic() < parallel._backoff_until)
        lock = parallel._pool_lock
        locked = False
        if not serial:
            locked = lock.acquire(blocking=False)
            serial = not locked
        try:
            if locked and (parallel._sleeping or len(parallel._threads) < threads - 1):
                parallel._wake_helpers(threads - 1)
            status = _run_program(parallel._job, self.steps, self.counters, self.patches,
                                  externals, threads, serial)
        finally:
            if locked:
                lock.release()
        if status > 0:
            parallel._backoff_until = parallel._monotonic() + parallel.BACKOFF_SECONDS
        return status >= 0


#: Input dtypes a new program can be checked with (random values of any bit pattern).
_CHECKABLE = (np.dtype(np.uint8), np.dtype(np.int8), np.dtype(np.float32))

#: Input signatures a `Replayed` keeps programs for (each holds its scratch buffers).
_MAX_SIGNATURES = 8


class Replayed:
    """`fn(*inputs) -> tuple of fresh arrays`, replayed natively per input signature.

    fn must only launch `run_tasks` kernels (any other native work calls
    `parallel.unrecorded`). Per signature (shapes, dtypes, kernel family) the first call
    runs fn while recording, builds a `NativeProgram` and checks it: program and fn run
    on other, random inputs and every output byte must match; otherwise that signature
    keeps calling fn. Calls made while an outer `Replayed` records run fn, so the outer
    recording sees their kernels. Concurrent callers of one instance run fn.
    """

    def __init__(self, fn: Callable[..., tuple], names: Sequence[str] = (), *,
                 fixed: bool = False) -> None:
        """fixed: the caller only ever passes one signature (it keys on it itself), so
        calls skip building the key."""
        self._fn = fn
        self._fixed = fixed
        self._names = tuple(names)
        self._programs: dict[tuple, NativeProgram | None] = {}
        self._lock = threading.Lock()
        #: why the last program of a signature was not kept (tests, debugging)
        self.rejected: dict[tuple, str] = {}

    @property
    def programs(self) -> list[NativeProgram]:
        return [p for p in self._programs.values() if p is not None]

    def __call__(self, *xs: np.ndarray) -> tuple:
        if parallel._recording is not None and parallel.recording():
            return self._fn(*xs)
        key = () if self._fixed else (*((x.shape, x.dtype) for x in xs),
                                       config.kernel_choice())
        program = self._programs.get(key, False)
        if program and self._lock.acquire(blocking=False):
            try:
                if len(xs) == 1 and len(program.externals) == 2:  # one op: no generators
                    x = xs[0]
                    if x.flags.c_contiguous:
                        shape, dtype = program.externals[1]
                        out = np.empty(shape, dtype)
                        if program.run((x.reshape(-1).view(np.uint8),
                                        out.reshape(-1).view(np.uint8))):
                            return (out,)
                elif all(x.flags.c_contiguous for x in xs):
                    outs = tuple(np.empty(shape, dtype)
                                 for shape, dtype in program.externals[len(xs):])
                    if program.run(tuple(a.reshape(-1).view(np.uint8) for a in (*xs, *outs))):
                        return outs
            finally:
                self._lock.release()
        elif program is False and self._lock.acquire(blocking=False):
            try:
                return self._record(key, xs)
            finally:
                self._lock.release()
        return self._fn(*xs)

    def _record(self, key: tuple, xs: Sequence[np.ndarray]) -> tuple:
        with parallel.record_calls() as rec:
            outs = self._fn(*xs)
        if not rec.active:  # another thread was recording: try again on a later call
            return outs
        if len(self._programs) >= _MAX_SIGNATURES:
            self._programs.clear()
        self._programs[key] = None
        reason = _unbuildable(rec, xs, outs)
        if reason is None:
            try:
                program = NativeProgram(rec.calls, [*xs, *outs])
            except (ValueError, TypeError) as exc:  # e.g. an argument numba cannot store
                reason = f"cannot build: {exc}"
            else:
                reason = self._check(program, xs)
                if reason is None:
                    self._programs[key] = program
        if reason is not None:
            self.rejected[key] = reason
        return outs

    def _check(self, program: NativeProgram, xs: Sequence[np.ndarray]) -> str | None:
        """Replay on other inputs and compare with fn's result."""
        rng = np.random.default_rng(len(program.steps))
        others = tuple(_other_values(x, rng) for x in xs)
        with parallel.record_calls():  # inner Replayed calls run their fn: no programs
            expected = self._fn(*others)  # of their own for steps this one replays
        outs = tuple(_poisoned(shape, dtype) for shape, dtype in program.externals[len(xs):])
        if not program.run(tuple(a.reshape(-1).view(np.uint8) for a in (*others, *outs))):
            return "the replay raised"
        for i, (got, want) in enumerate(zip(outs, expected, strict=True)):
            if got.tobytes() != want.tobytes():
                name = self._names[i] if i < len(self._names) else f"output {i}"
                return f"replayed {name!r} differs from the normal run's"
        return None


def _unbuildable(rec: parallel.Recording, xs: Sequence[np.ndarray],
                 outs: Sequence[np.ndarray]) -> str | None:
    if not rec.complete:
        return "native work ran outside run_tasks"
    if not rec.calls:
        return "no kernel calls"
    if not all(isinstance(a, np.ndarray) and a.flags.c_contiguous for a in (*xs, *outs)):
        return "an input or output is not a C-contiguous array"
    if any(x.dtype not in _CHECKABLE for x in xs):
        return "an input dtype the check cannot draw"
    return None


def _other_values(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    if x.dtype.kind == "f":
        return rng.standard_normal(x.shape).astype(x.dtype)
    info = np.iinfo(x.dtype)
    return rng.integers(info.min, info.max, x.shape, dtype=x.dtype, endpoint=True)


def _poisoned(shape: tuple, dtype: np.dtype) -> np.ndarray:
    dtype = np.dtype(dtype)
    if dtype.kind == "f":
        return np.full(shape, np.nan, dtype)
    return np.full(shape, 0xA5, np.uint8).view(dtype) if dtype.itemsize == 1 else np.full(
        shape, -12345, dtype)
