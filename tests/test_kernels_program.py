"""Recorded kernel calls replayed natively (kernels/program.py): the program itself,
and the ops that replay their per-shape plans (QLinearMatMul's GemmCall, the NHWC
QLinearConv)."""

from __future__ import annotations

import numpy as np
from _replay_kernels import add_one
from hypothesis import given, settings
from hypothesis import strategies as st
from numba import njit
from onnx import helper

from qlinear.runtime.kernels import parallel
from qlinear.runtime.kernels.config import JIT
from qlinear.runtime.kernels.parallel import claim, run_tasks
from qlinear.runtime.kernels.program import NativeProgram, Replayed
from qlinear.runtime.registry import NodeSpec, lookup


@njit(**JIT)
def _fails(counters, flag):  # pragma: no cover
    while True:
        t = claim(counters)
        if t >= 1:
            break
        if flag[0] != 0:
            raise ValueError("flagged")


def test_a_replay_whose_kernel_raises_reports_it():
    flag = np.zeros(1, np.int64)
    program = NativeProgram([(_fails, 1, 1, (flag,))], [np.zeros(1, np.uint8)])
    assert program.run((np.zeros(1, np.uint8),))
    flag[0] = 1
    assert not program.run((np.zeros(1, np.uint8),))


def test_outputs_and_inputs_are_patched_to_each_replays_arrays():
    x = np.arange(64, dtype=np.uint8)
    out = np.empty_like(x)
    with parallel.record_calls() as rec:
        run_tasks(add_one, 1, 1, x, out)
    program = NativeProgram(rec.calls, [x, out])
    x2, out2 = np.full(64, 7, np.uint8), np.zeros(64, np.uint8)
    assert program.run((x2, out2))
    np.testing.assert_array_equal(out2, 8)
    np.testing.assert_array_equal(out, x + 1)  # the recorded output is left alone


def test_a_replayed_function_falls_back_for_other_layouts_and_inner_calls_record():
    def plus_one(x):
        out = np.empty(x.size, np.uint8)
        run_tasks(add_one, 1, 1, np.ascontiguousarray(x).reshape(-1), out)
        return (out,)

    inner = Replayed(plus_one)
    outer = Replayed(lambda x: inner(x))
    x = np.arange(12, dtype=np.uint8)
    for _ in range(3):
        np.testing.assert_array_equal(outer(x)[0], x + 1)
        x = x * 3
    # the outer recording saw the inner kernel (the inner instance ran its function)
    assert len(outer.programs) == 1 and outer.rejected == {}
    strided = np.arange(24, dtype=np.uint8)[::2]
    np.testing.assert_array_equal(outer(strided)[0], strided + 1)


def _matmul_op(k, n, act, w_zp, rng):
    w = rng.integers(-128, 128, (k, n)).astype(np.int8)
    consts = {1: np.float32(0.02), 2: act(3 if act == np.uint8 else -3), 3: w,
              4: np.float32(0.01), 5: np.int8(w_zp), 6: np.float32(0.3),
              7: act(5 if act == np.uint8 else -1)}
    node = helper.make_node("QLinearMatMul", ["a"] + [f"c{i}" for i in range(1, 8)], ["y"])
    op = lookup("", "QLinearMatMul", 13)(NodeSpec(node, 13, consts=consts))
    return op, [consts[i] for i in range(1, 8)]


@settings(max_examples=25, deadline=None)
@given(m=st.integers(1, 40), k=st.integers(1, 70), n=st.integers(1, 80),
       act=st.sampled_from([np.uint8, np.int8]), w_zp=st.sampled_from([0, 0, 7]),
       seed=st.integers(0, 1000))
def test_a_replayed_qlinear_matmul_is_bit_exact(m, k, n, act, w_zp, seed):
    """Second and later calls replay the GemmCall's program (K % 4 != 0 and weight zero
    points take the recorded-incomplete path); every call equals a fresh op's first."""
    rng = np.random.default_rng(seed)
    op, params = _matmul_op(k, n, act, w_zp, rng)
    info = np.iinfo(act)
    for _ in range(3):
        a = rng.integers(info.min, info.max, (m, k), endpoint=True).astype(act)
        fresh, fresh_params = _matmul_op(k, n, act, w_zp, np.random.default_rng(seed))
        np.testing.assert_array_equal(op(a, *params), fresh(a, *fresh_params))
    (call,) = op._calls.values()
    assert call.replayed.rejected == {} or k % 4 or w_zp
    if k % 4 == 0 and not w_zp:
        assert len(call.replayed.programs) == 1


def _qlinear_conv_op(c_in, c_out, group, k, stride, pad, act, rng):
    consts = {1: np.float32(0.03), 2: act(4 if act == np.uint8 else -4),
              3: rng.integers(-60, 61, (c_out, c_in // group, k, k)).astype(np.int8),
              4: rng.uniform(0.002, 0.02, c_out).astype(np.float32),
              5: np.zeros(c_out, np.int8), 6: np.float32(0.4),
              7: act(9 if act == np.uint8 else 2),
              8: rng.integers(-400, 400, c_out).astype(np.int32)}
    node = helper.make_node("QLinearConv", ["x"] + [f"c{i}" for i in range(1, 9)], ["y"],
                            kernel_shape=[k, k], strides=[stride, stride], pads=[pad] * 4,
                            group=group)
    op = lookup("", "QLinearConv", 10)(NodeSpec(node, 10, consts=consts))
    return op, [consts[i] for i in range(1, 9)]


@settings(max_examples=20, deadline=None)
@given(kind=st.sampled_from(["dense", "grouped", "depthwise", "multiplier"]),
       c=st.sampled_from([4, 16, 32]), k=st.sampled_from([1, 3]), stride=st.integers(1, 2),
       pad=st.integers(0, 1), hw=st.integers(3, 20), act=st.sampled_from([np.uint8, np.int8]),
       seed=st.integers(0, 1000))
def test_a_replayed_nchw_qlinear_conv_is_bit_exact(kind, c, k, stride, pad, hw, act, seed):
    """The NCHW QLinearConv with constant parameters replays its per-shape program; every
    call equals a fresh op's first (paths that copy in numpy stay unreplayed)."""
    group, c_out = {"dense": (1, c), "grouped": (2, c), "depthwise": (c, c),
                    "multiplier": (c, 2 * c)}[kind]
    hw = max(hw, k)
    rng = np.random.default_rng(seed)
    op, params = _qlinear_conv_op(c, c_out, group, k, stride, pad, act, rng)
    info = np.iinfo(act)
    for _ in range(3):
        x = rng.integers(info.min, info.max, (1, c, hw, hw), endpoint=True).astype(act)
        fresh, fresh_params = _qlinear_conv_op(c, c_out, group, k, stride, pad, act,
                                               np.random.default_rng(seed))
        np.testing.assert_array_equal(op(x, *params), fresh(x, *fresh_params))


def test_recording_while_another_thread_records_does_not_hold_the_lock(monkeypatch):
    """Regression: a thread that found another one recording kept the recording lock
    while its own code ran, so a nested record_calls (a Replayed checking its program)
    blocked on that lock for ever. A session run from three threads hung in CI."""
    import threading

    monkeypatch.setattr(parallel, "_record_lock", threading.Lock())  # a hang holds only this
    monkeypatch.setattr(parallel, "_recording", parallel.Recording())  # another thread's
    monkeypatch.setattr(parallel, "_recording_thread", -1)
    seen: list[bool] = []

    def nested() -> None:
        with parallel.record_calls() as outer, parallel.record_calls() as inner:
            seen.extend([outer.active, inner.active])

    t = threading.Thread(target=nested, daemon=True)
    t.start()
    t.join(timeout=10)
    assert not t.is_alive()
    assert seen == [False, False]
