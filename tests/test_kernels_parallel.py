"""The work-claiming pool (qlinear/runtime/kernels/parallel.py): every task runs once,
helpers really join from native code, concurrent callers stay correct, and a launcher
compiled in one process is loaded from the disk cache by the next."""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from numba import njit

from qlinear.runtime.kernels import config, parallel
from qlinear.runtime.kernels.parallel import claim, finish, run_tasks

BIG = parallel.SERIAL_WORK  # enough declared work to use the helpers


@njit(cache=True, nogil=True)
def _count_tasks(counters, ntasks, hits):
    while True:
        t = claim(counters)
        if t >= ntasks:
            break
        hits[t] += 1
        finish(counters)


@njit(cache=True, nogil=True)
def _rendezvous(counters, ntasks, flags, budget):
    """Task 0 waits (bounded) for task 1 to start: it sees it only when another thread
    runs task 1 at the same time."""
    while True:
        t = claim(counters)
        if t >= ntasks:
            break
        if t == 1:
            flags[1] = 1
        else:
            for _ in range(budget):
                if flags[1] == 1:
                    flags[0] = 1
                    break
        finish(counters)


@pytest.fixture
def two_threads():
    before = config.num_threads()
    config.set_num_threads(2)
    yield
    config.set_num_threads(before)


@pytest.mark.parametrize("ntasks", [1, 2, 3, 17, 1000])
def test_every_task_runs_exactly_once(two_threads, ntasks: int) -> None:
    for _ in range(50):
        hits = np.zeros(ntasks, np.int64)
        run_tasks(_count_tasks, ntasks, BIG, np.int64(ntasks), hits)
        assert (hits == 1).all()


def test_a_helper_runs_tasks_alongside_the_caller(two_threads) -> None:
    if config.num_threads() < 2:
        pytest.skip("numba has a single thread here")
    # a cold numba cache compiles the helper loop first (seconds): keep asking until then
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        flags = np.zeros(2, np.int64)
        run_tasks(_rendezvous, 2, BIG, np.int64(2), flags, np.int64(2_000_000))
        if flags[0]:
            return
    pytest.fail("task 1 never ran while task 0 was running: no helper joined")


def test_concurrent_callers_each_get_all_their_tasks(two_threads) -> None:
    errors: list[str] = []

    def worker() -> None:
        config.set_num_threads(2)
        for _ in range(200):
            hits = np.zeros(64, np.int64)
            run_tasks(_count_tasks, 64, BIG, np.int64(64), hits)
            if not (hits == 1).all():
                errors.append(str(hits))

    threads = [threading.Thread(target=worker) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors


_SECOND_PROCESS = """
import numpy as np
from qlinear.runtime.kernels import config, parallel
from qlinear.runtime.kernels.parallel import run_tasks
from test_kernels_parallel import BIG, _count_tasks
config.set_num_threads(2)
hits = np.zeros(8, np.int64)
run_tasks(_count_tasks, 8, BIG, np.int64(8), hits)
assert (hits == 1).all()
stats = parallel._launchers[_count_tasks].stats
print(sum(stats.cache_hits.values()), sum(stats.cache_misses.values()))
"""


def test_a_second_process_loads_the_launcher_from_the_disk_cache(tmp_path) -> None:
    import os

    env = {**os.environ, "PYTHONPATH": os.path.dirname(__file__), "NUMBA_NUM_THREADS": "2"}
    runs = [
        subprocess.run([sys.executable, "-c", _SECOND_PROCESS], env=env, check=True,
                       capture_output=True, text=True).stdout.split()
        for _ in range(2)
    ]
    hits, misses = map(int, runs[1])
    assert (hits, misses) == (1, 0), runs


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="needs fork")
def test_a_forked_child_runs_its_tasks(two_threads) -> None:
    import os

    hits = np.zeros(64, np.int64)
    run_tasks(_count_tasks, 64, BIG, np.int64(64), hits)  # helpers exist in the parent
    pid = os.fork()
    if pid == 0:  # child: no helper threads; every task must still run once
        child = np.zeros(64, np.int64)
        run_tasks(_count_tasks, 64, BIG, np.int64(64), child)
        os._exit(0 if (child == 1).all() else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


@njit(cache=True, nogil=True)
def _divide_by_tasks(counters, ntasks, divisors, out):
    while True:
        t = claim(counters)
        if t >= ntasks:
            break
        out[t] = 100 // divisors[t]  # numba raises ZeroDivisionError for 0
        finish(counters)


def test_an_error_inside_a_pooled_kernel_reaches_the_caller(two_threads) -> None:
    divisors = np.ones(64, np.int64)
    divisors[37] = 0
    with pytest.raises(ZeroDivisionError):
        run_tasks(_divide_by_tasks, 64, BIG, np.int64(64), divisors, np.zeros(64, np.int64))
    out = np.zeros(64, np.int64)
    run_tasks(_divide_by_tasks, 64, BIG, np.int64(64), np.ones(64, np.int64), out)
    assert (out == 100).all()  # the pool is usable after the error


@njit(cache=True, nogil=True)
def _slow_second_task(counters, ntasks, spins, out):
    while True:
        t = claim(counters)
        if t >= ntasks:
            break
        s = 0.0
        for i in range(spins if t == 1 else 1):
            s += np.sqrt(i)
        out[t] = s
        finish(counters)


def test_a_long_wait_for_a_helper_backs_off_to_the_caller_alone(two_threads, monkeypatch):
    """A caller that waited long for a joined helper runs the next calls alone."""
    if config.num_threads() < 2:
        pytest.skip("numba has a single thread here")
    monkeypatch.setattr(parallel, "LONG_WAIT_TICKS", 1000)
    monkeypatch.setattr(parallel, "BACKOFF_SECONDS", 30.0)
    monkeypatch.setattr(parallel, "_backoff_until", 0.0)
    deadline = time.monotonic() + 60
    while parallel._backoff_until == 0.0 and time.monotonic() < deadline:
        run_tasks(_slow_second_task, 2, BIG, np.int64(2), np.int64(300_000), np.zeros(2))
    assert parallel._backoff_until > time.monotonic(), "no helper ever ran the slow task"
    for _ in range(5):  # backing off: nothing runs beside the caller
        flags = np.zeros(2, np.int64)
        run_tasks(_rendezvous, 2, BIG, np.int64(2), flags, np.int64(200_000))
        assert flags[0] == 0


def test_a_sleeping_helper_joins_the_call_that_wakes_it(two_threads) -> None:
    """Calls longer than a helper's idle spin used to run alone forever: the woken helper
    took the job that woke it for already seen, then went back to sleep before the next."""
    if config.num_threads() < 2:
        pytest.skip("numba has a single thread here")
    flags = np.zeros(2, np.int64)
    run_tasks(_rendezvous, 2, BIG, np.int64(2), flags, np.int64(2_000_000))  # helpers up
    joined = 0
    for _ in range(5):
        time.sleep(0.02)  # well past the idle spin: the helper is asleep in Python
        assert parallel._sleeping >= 1 or parallel._backoff_until > time.monotonic()
        flags = np.zeros(2, np.int64)
        run_tasks(_rendezvous, 2, BIG, np.int64(2), flags, np.int64(20_000_000))
        joined += int(flags[0])
    assert joined >= 3
