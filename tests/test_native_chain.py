"""Chains of native-only steps replayed as one native call (runtime/native_chain.py,
kernels/program.py).

The first run of a chain records its kernel calls and checks the replay on other inputs;
later runs replay it. Every test here runs the session at least twice, so the replay
(not the recording run) produces the compared outputs.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest
from _replay_kernels import add_one
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import helper, numpy_helper

from qlinear import Session
from qlinear.runtime.kernels import parallel
from qlinear.runtime.kernels.parallel import run_tasks
from qlinear.runtime.native_chain import Chain, plan_chains
from qlinear.runtime.session import NodeExecutionError

MS = "com.microsoft"


def _conv(rng, name, x, y, c_in, c_out, group, k, stride, pad, dilation, dtype, relu_zp):
    """A channels-last QLinearConv node and its constants (per-channel weight scales)."""
    consts = {
        f"{name}_w": rng.integers(-40, 41, (c_out, c_in // group, k, k)).astype(np.int8),
        f"{name}_ws": rng.uniform(0.002, 0.02, c_out).astype(np.float32),
        f"{name}_wz": np.zeros(c_out, np.int8),
        f"{name}_b": rng.integers(-300, 300, c_out).astype(np.int32),
    }
    node = helper.make_node(
        "QLinearConv",
        [x, "s", "z", f"{name}_w", f"{name}_ws", f"{name}_wz", "s", "z", f"{name}_b"],
        [y], domain=MS, channels_last=1, kernel_shape=[k, k], strides=[stride, stride],
        pads=[pad] * 4, dilations=[dilation, dilation], group=group)
    return node, consts


def _cnn(seed, dtype, c, k, stride, pad, dilation, group, pool):
    """x -> conv kxk -> conv 1x1 -> add(conv1, conv2) -> [max pool] -> y: a residual
    block in the optimizer's channels-last form."""
    rng = np.random.default_rng(seed)
    zp = np.array(3 if dtype == np.uint8 else -2, dtype)
    consts = {"s": np.float32(0.05), "z": zp}
    n1, c1 = _conv(rng, "a", "x", "h1", c, c, group, k, stride, pad, dilation, dtype, zp)
    n2, c2 = _conv(rng, "b", "h1", "h2", c, c, 1, 1, 1, 0, 1, dtype, zp)
    consts |= c1 | c2
    nodes = [n1, n2, helper.make_node("QLinearAdd", ["h1", "s", "z", "h2", "s", "z", "s", "z"],
                                      ["h3" if pool else "y"], domain=MS)]
    if pool:
        nodes.append(helper.make_node("NhwcMaxPool", ["h3"], ["y"], domain=MS,
                                      kernel_shape=[2, 2], strides=[2, 2]))
    et = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", et, ["n", "h", "w", "c"])],
        [helper.make_tensor_value_info("y", et, None)],
        [numpy_helper.from_array(np.asarray(v), k) for k, v in consts.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                   helper.make_opsetid(MS, 1)])


def _chains(session: Session) -> list[Chain]:
    return [s.kernel for s in session._steps if isinstance(s.kernel, Chain)]


def _ints(rng, dtype, shape):
    info = np.iinfo(dtype)
    return rng.integers(info.min, info.max, shape, dtype=dtype, endpoint=True)


@settings(max_examples=20, deadline=None)
@given(
    dtype=st.sampled_from([np.uint8, np.int8]),
    c=st.sampled_from([4, 8, 16, 20]),
    k=st.sampled_from([1, 3, 5]),
    stride=st.integers(1, 2),
    pad=st.integers(0, 2),
    dilation=st.integers(1, 2),
    depthwise=st.booleans(),
    pool=st.booleans(),
    batch=st.integers(1, 2),
    hw=st.integers(6, 13),
    seed=st.integers(0, 1000),
)
def test_a_replayed_chain_is_bit_exact_with_the_steps(dtype, c, k, stride, pad, dilation,
                                                      depthwise, pool, batch, hw, seed):
    model = _cnn(seed, dtype, c, k, stride, pad, dilation, c if depthwise else 1, pool)
    chained = Session(model, optimize=False, num_threads=2)
    plain = Session(model, optimize=False, num_threads=2, _chains=False)
    (chain,) = _chains(chained)
    rng = np.random.default_rng(seed)
    hw += (k - 1) * dilation  # a non-empty output, 2x2 poolable
    for _ in range(3):  # the recording run, then replays on new inputs
        x = _ints(rng, dtype, (batch, hw, hw, c))
        np.testing.assert_array_equal(chained.run(None, {"x": x})[0],
                                      plain.run(None, {"x": x})[0])
    assert chain.replayed.rejected == {}
    assert len(chain.replayed.programs) == 1


def test_each_input_shape_gets_its_own_program():
    model = _cnn(1, np.uint8, 8, 3, 1, 1, 1, 1, False)
    chained, plain = Session(model, optimize=False), Session(model, optimize=False, _chains=False)
    rng = np.random.default_rng(0)
    for shape in [(1, 9, 9, 8), (2, 7, 11, 8), (1, 9, 9, 8), (2, 7, 11, 8)]:
        x = _ints(rng, np.uint8, shape)
        np.testing.assert_array_equal(chained.run(None, {"x": x})[0], plain.run(None, {"x": x})[0])
    (chain,) = _chains(chained)
    assert len(chain.replayed.programs) == 2


def test_a_value_inside_a_chain_can_still_be_fetched():
    model = _cnn(2, np.uint8, 8, 3, 1, 1, 1, 1, True)
    chained, plain = Session(model, optimize=False), Session(model, optimize=False, _chains=False)
    x = _ints(np.random.default_rng(1), np.uint8, (1, 8, 8, 8))
    for _ in range(2):
        got = chained.run(["h2", "y"], {"x": x})
        want = plain.run(["h2", "y"], {"x": x})
        for g, w in zip(got, want, strict=True):
            np.testing.assert_array_equal(g, w)
    assert "h2" in chained.value_names


def test_a_profiled_run_times_every_node_of_a_chain():
    model = _cnn(3, np.uint8, 8, 3, 1, 1, 1, 1, True)
    session = Session(model, optimize=False)
    x = _ints(np.random.default_rng(2), np.uint8, (1, 8, 8, 8))
    session.run(None, {"x": x})
    _, times = session.run_profiled(None, {"x": x})
    assert [t.op_type for t in times] == ["QLinearConv", "QLinearConv", "QLinearAdd",
                                          "NhwcMaxPool"]


def test_concurrent_runs_of_one_session_agree():
    model = _cnn(4, np.int8, 16, 3, 1, 1, 1, 16, True)
    session, plain = Session(model, optimize=False), Session(model, optimize=False, _chains=False)
    rng = np.random.default_rng(3)
    xs = [_ints(rng, np.int8, (1, 12, 12, 16)) for _ in range(4)]
    want = [plain.run(None, {"x": x})[0] for x in xs]
    errors: list[str] = []

    def worker(i: int) -> None:
        for r in range(30):
            j = (i + r) % len(xs)
            if not np.array_equal(session.run(None, {"x": xs[j]})[0], want[j]):
                errors.append(f"thread {i} round {r}")

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


def test_a_bad_input_still_names_the_node():
    model = _cnn(5, np.uint8, 8, 3, 1, 1, 1, 1, False)
    session = Session(model, optimize=False)
    x = _ints(np.random.default_rng(4), np.uint8, (1, 8, 8, 8))
    session.run(None, {"x": x})
    with pytest.raises(NodeExecutionError, match="QLinearConv"):
        session.run(None, {"x": x[..., :5]})  # 5 channels for 8-channel weights


# ------------------------------------------------------------------ the check


def _native_step(x):
    out = np.empty_like(x)
    run_tasks(add_one, 1, 1, x.reshape(-1), out.reshape(-1))
    return out


def _numpy_step(x):
    return x * 2  # computes in numpy: a replay would not reproduce it


def _unrecorded_step(x):
    parallel.unrecorded()
    return x * 2


class _Step:
    def __init__(self, kernel, inputs, outputs):
        self.kernel, self.inputs, self.outputs, self.spec = kernel, inputs, outputs, None


def _run_steps(steps, env, keep):
    for s in steps:
        env[s.outputs[0]] = s.kernel(*[env[n] for n in s.inputs])


def _chain(second):
    _native_step.replayable = True
    second.replayable = True
    steps = [_Step(_native_step, ("x",), ("a",)), _Step(second, ("a",), ("y",))]
    planned, hidden = plan_chains(steps, {"y"}, {}, _run_steps, lambda c, first: c)
    (chain,) = planned
    assert hidden == {"a"}
    return chain


@pytest.mark.parametrize("second, reason", [
    (_native_step, None),
    (_numpy_step, "differs"),
    (_unrecorded_step, "outside run_tasks"),
])
def test_a_step_that_is_not_really_replayable_is_caught(second, reason):
    chain = _chain(second)
    x = np.arange(10, dtype=np.uint8)
    want = x + 2 if second is _native_step else (x + 1) * 2
    for _ in range(3):
        np.testing.assert_array_equal(chain(x)[0], want)
        x = x + 3
        want = x + 2 if second is _native_step else (x + 1) * 2
    rejected = list(chain.replayed.rejected.values())
    if reason is None:
        assert rejected == []
    else:
        assert len(rejected) == 1 and reason in rejected[0]


@pytest.mark.parametrize("name", ["mobilenet_v2", "resnet"])
def test_an_optimized_cnn_runs_as_one_native_chain_from_its_float_input(name):
    """Quantize (fused channels-last), convolutions, adds, pooling, the head GEMM and the
    final dequantize: every step of the optimized zoo CNN is in one chain, and its replay
    equals the step-by-step plan on new inputs."""
    from qlinear import optimize, quantize, zoo

    model = zoo.build(name, "small")
    qdq = quantize(model, zoo.calibration_batches(name, model, n=2, batch=2))
    int8 = optimize(qdq)
    chained = Session(int8, optimize=False)
    plain = Session(int8, optimize=False, _chains=False)
    (chain,) = _chains(chained)
    assert len(chained._steps) == 1 and chain.inputs == (chained.get_inputs()[0].name,)
    for seed in range(3):
        feeds = zoo.example_inputs(name, model, batch=2, seed=seed)
        np.testing.assert_array_equal(chained.run(None, feeds)[0], plain.run(None, feeds)[0])
    assert len(chain.replayed.programs) == 1 and chain.replayed.rejected == {}
