"""Work-claiming parallelism for the kernels, with helper threads that never leave
native code between jobs (what ORT's thread pool does).

Why not numba ``prange``: its OpenMP layer splits the range statically and ends with a
barrier, so every call waits until *every* thread has been scheduled. On a loaded
machine (2 cores shared by several processes) a sleeping worker is woken only at the
next scheduler tick, and each parallel call then costs ~4 ms; measured here a
128x384x384 GEMM took 12 ms with prange on 2 threads vs 0.19 ms on 1 thread, while
ORT kept 0.1 ms.

Why not Python threads that call the kernel: a helper that returns to Python for each
job has to win the GIL back (a futex wake-up) and go through numba's dispatcher, so it
started 20-50 us late; inside a model run it rarely joined at all (whole ResNet-18 at
batch 1: 1.36x from the second core, BERT 1.1x).

So each kernel gets a *launcher*, compiled once per argument types: it writes a pointer
to its argument tuple and to a per-kernel trampoline into a shared job block, opens
slots for the helpers, runs the kernel itself, then takes back the unclaimed slots and
waits only for helpers that actually joined. Helpers poll the job block in a nopython
loop (no GIL), join a job by claiming a slot, call the trampoline, and return to Python
only to sleep after ~1-2 ms without work. Tasks inside a job are claimed from an atomic
counter, so the caller never waits for a helper to wake up.

A kernel written for this takes `counters` (int64[2]: next task, tasks done) first and
loops ``while True: t = claim(counters); if t >= ntasks: break; ...; finish(counters)``.
Tasks must write disjoint outputs. A kernel that raises on any thread makes `run_tasks`
run it again alone, so the exception (which numba keeps in native code) reaches the
caller. When a joined helper is seen descheduled (another process holds the other
core), calls run on the caller alone for a short while (BACKOFF_SECONDS).
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import hashlib
import inspect
import os
import threading
from collections.abc import Iterator
from time import monotonic as _monotonic
from typing import Any

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.core.caching import FunctionCache, IndexDataCacheFile
from numba.extending import intrinsic

from qlinear.runtime.kernels import config
from qlinear.runtime.kernels.config import JIT

#: Below this many multiply-adds (~5 us on one core) a call runs on the calling thread
#: only: publishing a job and sharing cache lines costs about as much as it saves.
SERIAL_WORK = 1 << 21

#: How long an idle helper polls for the next job before it sleeps, in CPU cycle-counter
#: ticks (~1-2 ms). ORT's pool spins the same way; without it a helper woken by the OS
#: often starts only after the whole call is over.
SPIN_TICKS = 3_000_000

# The job block: one int64 per cache line, so a helper polling GEN does not share a line
# with the words the caller writes.
_LINE = 8
GEN, SLOTS, LEFT, FN, ARG, STOP, FAILED, YIELD, WAITED, RAN = (i * _LINE for i in range(10))

#: Polls between two sched_yield calls of an idle helper, and ticks a caller spins for
#: its helpers before it starts yielding. When the machine is oversubscribed a helper
#: may share a core with the caller (or with the thread it waits for): a pure spin then
#: holds the core for a whole scheduler slice. Measured here with one busy process
#: beside BERT at batch 1: 21.6 ms with pure spinning vs 11.7 ms on one thread.
YIELD_EVERY = 64
WAIT_SPIN_TICKS = 30_000

#: A caller that waited longer than this (cycle-counter ticks, ~0.8 ms at 2.6 GHz) for a helper
#: that had joined saw it descheduled mid-task: another process holds the other core.
#: The next calls then run on the calling thread alone for BACKOFF_SECONDS before the
#: helpers are tried again. Measured here with the other core busy: a 4 MB lookup took
#: 2.5 ms on two threads against 1.3 ms on one.
LONG_WAIT_TICKS = 2_000_000
BACKOFF_SECONDS = 0.02


def _element_ptr(context, builder, aryty, aryv, idx_v, idx_ty):
    ary = context.make_array(aryty)(context, builder, aryv)
    return builder.gep(ary.data, [context.cast(builder, idx_v, idx_ty, types.int64)])


def _atomic_rmw(op: str):
    @intrinsic
    def rmw(typingctx, arr, index, value):
        def codegen(context, builder, sig, args):
            ptr = _element_ptr(context, builder, sig.args[0], args[0], args[1], sig.args[1])
            val = context.cast(builder, args[2], sig.args[2], types.int64)
            return builder.atomic_rmw(op, ptr, val, "seq_cst")

        return types.int64(arr, index, value), codegen

    return rmw


_atomic_add = _atomic_rmw("add")
_atomic_exchange = _atomic_rmw("xchg")


@intrinsic
def _atomic_load(typingctx, arr, index):
    def codegen(context, builder, sig, args):
        ptr = _element_ptr(context, builder, sig.args[0], args[0], args[1], sig.args[1])
        return builder.load_atomic(ptr, "seq_cst", 8)

    return types.int64(arr, index), codegen


@intrinsic
def _atomic_store(typingctx, arr, index, value):
    def codegen(context, builder, sig, args):
        ptr = _element_ptr(context, builder, sig.args[0], args[0], args[1], sig.args[1])
        val = context.cast(builder, args[2], sig.args[2], types.int64)
        builder.store_atomic(val, ptr, "seq_cst", 8)
        return context.get_dummy_value()

    return types.none(arr, index, value), codegen


@intrinsic
def _compare_exchange(typingctx, arr, index, expected, value):
    """Store `value` if the element equals `expected`; returns the element seen."""

    def codegen(context, builder, sig, args):
        ptr = _element_ptr(context, builder, sig.args[0], args[0], args[1], sig.args[1])
        old = context.cast(builder, args[2], sig.args[2], types.int64)
        new = context.cast(builder, args[3], sig.args[3], types.int64)
        return builder.extract_value(builder.cmpxchg(ptr, old, new, "seq_cst", "seq_cst"), 0)

    return types.int64(arr, index, expected, value), codegen


def _call_llvm(builder, name: str, restype):
    fnty = ir.FunctionType(restype, [])
    return builder.call(cgutils.get_or_insert_function(builder.module, fnty, name), [])


_X86 = any(f.startswith("sse2") for f in config.host_cpu_features())


@intrinsic
def _cpu_relax(typingctx):
    """x86 `pause` in a polling loop (frees the pipeline for the sibling hyperthread)."""

    def codegen(context, builder, sig, args):
        if _X86:
            _call_llvm(builder, "llvm.x86.sse2.pause", ir.VoidType())
        return context.get_dummy_value()

    return types.none(), codegen


@intrinsic
def _ticks(typingctx):
    """The CPU cycle counter (only differences matter)."""

    def codegen(context, builder, sig, args):
        return _call_llvm(builder, "llvm.readcyclecounter", ir.IntType(64))

    return types.int64(), codegen


@intrinsic
def _call_void(typingctx, fn):
    """Call `int f(void)` at address fn (sched_yield; its address is a run-time value,
    so the compiled code stays cacheable)."""

    def codegen(context, builder, sig, args):
        callee = builder.inttoptr(args[0], ir.FunctionType(ir.IntType(32), []).as_pointer())
        builder.call(callee, [])
        return context.get_dummy_value()

    return types.none(types.int64), codegen


@njit(inline="always", **JIT)
def _yield_cpu(job):
    fn = job[YIELD]
    if fn != 0:
        _call_void(fn)


_VOIDP = ir.IntType(8).as_pointer()
_I32 = ir.IntType(32)
_TRAMPOLINE = ir.FunctionType(_I32, [_VOIDP])  # returns 1 if the kernel raised


@intrinsic
def _call_trampoline(typingctx, fn, arg):
    def codegen(context, builder, sig, args):
        callee = builder.inttoptr(args[0], _TRAMPOLINE.as_pointer())
        failed = builder.call(callee, [builder.inttoptr(args[1], _VOIDP)])
        return builder.sext(failed, ir.IntType(64))

    return types.int64(types.int64, types.int64), codegen


@intrinsic
def _address_of(typingctx, tup):
    """Address of a copy of `tup` in the caller's stack frame (alive until it returns)."""

    def codegen(context, builder, sig, args):
        return builder.ptrtoint(cgutils.alloca_once_value(builder, args[0]), ir.IntType(64))

    return types.int64(tup), codegen


@intrinsic
def _trampoline(typingctx, kernel, tup):
    """Address of `int32 f(args*)` that calls kernel(*args) and returns 1 if it raised
    (linked into the launcher)."""
    ksig = typingctx.resolve_function_type(kernel, tuple(tup.types), {})
    if ksig is None:
        return None

    def codegen(context, builder, sig, args):
        cres = kernel.dispatcher.overloads[tuple(ksig.args)]
        fndesc = cres.fndesc
        module = builder.module
        name = "qlinear.task." + fndesc.mangled_name
        fn = cgutils.get_or_insert_function(module, _TRAMPOLINE, name)
        if fn.is_declaration:
            fn.linkage = "internal"
            b = ir.IRBuilder(fn.append_basic_block("entry"))
            packed = b.load(b.bitcast(fn.args[0], context.get_value_type(tup).as_pointer()))
            items = [b.extract_value(packed, i) for i in range(len(tup))]
            context.add_linking_libs([cres.library])
            callee = context.declare_function(module, fndesc)
            status, _ = context.call_conv.call_function(
                b, callee, fndesc.restype, fndesc.argtypes, items
            )
            b.ret(b.zext(status.is_error, _I32))
        return builder.ptrtoint(fn, ir.IntType(64))

    return types.int64(kernel, tup), codegen


@njit(inline="always", **JIT)
def claim(counters: np.ndarray) -> int:
    """The next unclaimed task index (may be >= the task count: then stop)."""
    return _atomic_add(counters, 0, 1)


@njit(inline="always", **JIT)
def finish(counters: np.ndarray) -> None:
    """Mark one claimed task as done."""
    _atomic_add(counters, 1, 1)


@njit(inline="always", **JIT)
def _publish_and_run(job, fn, argp, helpers):
    """Open `helpers` slots on a job, run it here too, and return once every helper
    that joined has left (so the argument tuple may go out of scope). Returns how many
    threads saw the kernel raise."""
    job[FN] = fn
    job[ARG] = argp
    job[LEFT] = 0
    job[FAILED] = 0
    _atomic_store(job, SLOTS, helpers)
    _atomic_add(job, GEN, 1)
    start = _ticks()
    failed = _call_trampoline(fn, argp)
    job[RAN] = _ticks() - start
    joined = helpers - _atomic_exchange(job, SLOTS, 0)
    job[WAITED] = 0
    if joined:
        since = _ticks()
        while _atomic_load(job, LEFT) < joined:
            if _ticks() - since > WAIT_SPIN_TICKS:
                _yield_cpu(job)
            else:
                _cpu_relax()
        job[WAITED] = _ticks() - since
    return failed + _atomic_load(job, FAILED)


@njit(**JIT)
def _helper_loop(job: np.ndarray, spin_ticks: int, seen: int) -> int:
    """Join jobs newer than generation `seen` until stopped (returns -1) or idle for
    `spin_ticks` (returns the last generation seen, to pass back in after a sleep: the
    job that woke a sleeping helper is newer, so the helper joins it)."""
    idle_since = _ticks()
    polls = 0
    while True:
        gen = _atomic_load(job, GEN)
        if gen != seen:
            seen = gen
            while True:
                slots = _atomic_load(job, SLOTS)
                if slots <= 0:
                    break
                if _compare_exchange(job, SLOTS, slots, slots - 1) == slots:
                    # Joined: the caller cannot return before LEFT counts us out, so
                    # FN/ARG (read after the claim) stay valid while we run.
                    if _call_trampoline(job[FN], job[ARG]) != 0:
                        _atomic_add(job, FAILED, 1)
                    _atomic_add(job, LEFT, 1)
                    break
            idle_since = _ticks()
        elif _atomic_load(job, STOP) != 0:
            return -1
        elif _ticks() - idle_since > spin_ticks:
            return seen
        else:
            polls += 1
            if polls % YIELD_EVERY == 0:
                _yield_cpu(job)
            else:
                _cpu_relax()


class _LauncherCache(FunctionCache):
    """Disk cache of one kernel's launcher.

    numba keys a closure's cache entry on the pickled closure cells; a dispatcher pickles
    with a per-process id, so every process would miss and recompile. Here the key names
    the kernel instead, and its file's stamp invalidates the entry with the kernel's own.
    """

    def __init__(self, py_func: Any, kernel: Any) -> None:
        self._kernel_func = kernel.py_func
        super().__init__(py_func)
        source = inspect.getfile(self._kernel_func)
        st = os.stat(source)
        stamp = (self._impl.locator.get_source_stamp(), (st.st_mtime, st.st_size))
        name = f"{self._kernel_func.__module__}.{self._kernel_func.__qualname__}"
        self._cache_file = IndexDataCacheFile(
            cache_path=self._cache_path,
            filename_base=f"{self._impl.filename_base}.{name}",
            source_stamp=stamp,
        )

    def _index_key(self, sig: Any, codegen: Any) -> tuple:
        kernel = self._kernel_func
        digest = hashlib.sha256(self._py_func.__code__.co_code + kernel.__code__.co_code)
        name = (kernel.__module__, kernel.__qualname__, digest.hexdigest())
        return (sig, codegen.magic_tuple(), name)


def _make_launcher(kernel: Any) -> Any:
    def launch(job, helpers, args):
        fn = _trampoline(kernel, args)
        return _publish_and_run(job, fn, _address_of(args), helpers)

    launcher = njit(**{**JIT, "cache": False})(launch)
    if JIT["cache"]:
        launcher._cache = _LauncherCache(launcher.py_func, kernel)
    return launcher


_job = np.zeros(10 * _LINE, np.int64)
_launchers: dict[Any, Any] = {}


def _sched_yield_address() -> int:
    try:
        return ctypes.cast(ctypes.CDLL(None).sched_yield, ctypes.c_void_p).value or 0
    except (OSError, AttributeError, TypeError):  # no libc symbol table (Windows): spin only
        return 0


_job[YIELD] = _sched_yield_address()
_pool_lock = threading.Lock()  # one job at a time; a second caller runs alone
_record_lock = threading.Lock()
_start_lock = threading.Lock()
_wake = threading.Condition()
_threads: list[threading.Thread] = []
_sleeping = 0
_stopping = False
_backoff_until = 0.0  # time.monotonic() before which calls run on the caller alone


def _helper_main() -> None:
    global _sleeping
    seen = -1  # a new helper joins the job that is running now
    while not _stopping:
        seen = _helper_loop(_job, SPIN_TICKS, seen)
        if seen < 0:
            return
        with _wake:
            if _stopping:
                return
            _sleeping += 1
            _wake.wait()


def _wake_helpers(count: int) -> None:
    global _sleeping
    if len(_threads) < count:
        with _start_lock:
            while len(_threads) < count:
                thread = threading.Thread(target=_helper_main, name="qlinear-int8", daemon=True)
                thread.start()
                _threads.append(thread)
    if _sleeping:
        with _wake:
            _sleeping = 0
            _wake.notify_all()


@atexit.register
def _stop_helpers() -> None:
    """Let helpers leave their loop before the interpreter tears down: a daemon thread
    killed inside a numba call can hold the allocator's lock the exit path then waits on
    (seen once: a benchmark process hung at exit in garbage collection)."""
    global _stopping
    _stopping = True
    _job[STOP] = 1
    with _wake:
        _wake.notify_all()
    for thread in list(_threads):
        thread.join(timeout=1.0)


def _forget_helpers_in_child() -> None:
    """A forked child has no helper threads (and maybe a held lock): start afresh."""
    global _pool_lock, _start_lock, _wake, _sleeping, _record_lock, _recording
    _threads.clear()
    _sleeping = 0
    _pool_lock, _start_lock, _wake = threading.Lock(), threading.Lock(), threading.Condition()
    _record_lock, _recording = threading.Lock(), None
    _job[:] = 0
    _job[YIELD] = _sched_yield_address()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_helpers_in_child)


def _waited_for_a_descheduled_helper(ntasks: int, threads: int) -> bool:
    """The caller waited long, and much longer than one task takes (long tasks alone
    make a legitimate wait: a 1024^3 GEMM's last task can take a millisecond)."""
    waited = int(_job[WAITED])
    if waited <= LONG_WAIT_TICKS:
        return False
    per_task = int(_job[RAN]) * threads // max(ntasks, 1)
    return waited > 3 * per_task


class Recording:
    """The kernel calls one thread makes while it is active (`record_calls`): a run of
    steps that only launch kernels then replays natively (kernels.program)."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, int, int, tuple]] = []
        self.complete = True  # false once something ran native work outside run_tasks
        self.active = True  # false when another thread was recording: nothing recorded


_recording: Recording | None = None
_recording_thread = 0


@contextlib.contextmanager
def record_calls() -> Iterator[Recording]:
    """Record this thread's `run_tasks` calls (kernel, task count, work, arguments);
    the calls still run. One recording at a time per process (others run unrecorded)."""
    global _recording, _recording_thread
    rec = Recording()
    with _record_lock:  # held only to claim the slot: the caller's code may record again
        busy = _recording is not None
        if not busy:
            _recording, _recording_thread = rec, threading.get_ident()
    if busy:
        rec.complete = rec.active = False
        yield rec
        return
    try:
        yield rec
    finally:
        with _record_lock:
            _recording, _recording_thread = None, 0


def recording() -> bool:
    """True when this thread's kernel calls are being recorded: per-thread reused
    scratch must then be private to the recorded calls."""
    return _recording is not None and _recording_thread == threading.get_ident()


def unrecorded() -> None:
    """Mark the recording incomplete: the caller did native work outside run_tasks, so a
    replay of the recorded calls alone would not reproduce it."""
    if _recording is not None and _recording_thread == threading.get_ident():
        _recording.complete = False


def run_tasks(kernel: Any, ntasks: int, work: int, *args: Any) -> None:
    """kernel(counters, *args) on the calling thread plus helpers; returns when all are done.

    `work` (multiply-adds) decides whether helpers are worth it; the thread count is the
    calling thread's (config.set_num_threads), so sessions keep their num_threads.
    This runs once per kernel call (52 times in a MobileNetV2 run), so it is kept lean.
    """
    global _backoff_until
    if _recording is not None and _recording_thread == threading.get_ident():
        _recording.calls.append((kernel, ntasks, work, args))
    counters = np.zeros(2, np.int64)
    if work < SERIAL_WORK or ntasks < 2:
        kernel(counters, *args)
        return
    threads = config.num_threads()
    if threads < 2 or (_backoff_until and _monotonic() < _backoff_until):
        kernel(counters, *args)
        return
    if not _pool_lock.acquire(blocking=False):  # another thread's job: run alone
        kernel(counters, *args)
        return
    try:
        helpers = (threads if threads < ntasks else ntasks) - 1
        if _sleeping or len(_threads) < helpers:
            _wake_helpers(helpers)
        launcher = _launchers.get(kernel)
        if launcher is None:
            launcher = _launchers[kernel] = _make_launcher(kernel)
        failed = launcher(_job, helpers, (counters, *args))
        if _job[WAITED] > LONG_WAIT_TICKS and _waited_for_a_descheduled_helper(ntasks, threads):
            _backoff_until = _monotonic() + BACKOFF_SECONDS
    finally:
        _pool_lock.release()
    if failed:
        # The exception object stayed in native code: run alone to raise it here.
        kernel(np.zeros(2, np.int64), *args)
        raise RuntimeError(f"{kernel.__name__} failed on a helper thread")
