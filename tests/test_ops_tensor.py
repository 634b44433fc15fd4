"""Shape and data-movement kernels: attribute vs input forms, clamping, views, constants."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from qlinear.runtime.registry import NodeSpec, lookup

TENSOR_OPS = """Reshape Transpose Flatten Concat Split Slice Gather Squeeze Unsqueeze Shape Expand
Constant ConstantOfShape""".split()
ELEMENTWISE_OPS = """Add Sub Mul Div Pow Sqrt Relu Clip LeakyRelu Sigmoid HardSigmoid HardSwish Tanh
Erf Gelu Equal Where Cast Identity Sum""".split()


def kernel(op: str, inputs: list[str], opset: int, consts=None, n_outputs: int = 1, **attrs):
    node = helper.make_node(op, inputs, [f"y{i}" for i in range(n_outputs)], **attrs)
    factory = lookup("", op, opset)
    assert factory is not None, f"{op} not registered at opset {opset}"
    return factory(NodeSpec(proto=node, opset=opset, consts=consts or {}))


def both_forms(op: str, inputs: list[str], opset: int, values: dict[int, np.ndarray], **attrs):
    """The kernel planned with `values` as runtime inputs and as plan-time constants."""
    return [
        kernel(op, inputs, opset, **attrs),
        kernel(op, inputs, opset, consts=values, **attrs),
    ]


@pytest.mark.parametrize("op", TENSOR_OPS + ELEMENTWISE_OPS)
def test_every_opset_resolves(op) -> None:
    from onnx import defs

    first = min(s.since_version for s in defs.get_all_schemas_with_history() if s.name == op)
    for opset in range(first, defs.onnx_opset_version() + 1):
        assert lookup("", op, opset) is not None, f"{op} opset {opset}"


# --------------------------------------------------------------------------------- Slice


def ort_slice(x, starts, ends, axes, steps):
    ins = [x] + [np.array(v, dtype=np.int64) for v in (starts, ends, axes, steps)]
    names = ["x", "s", "e", "a", "t"]
    node = helper.make_node("Slice", names, ["y"])
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, x.shape)]
        + [helper.make_tensor_value_info(n, TensorProto.INT64, [len(starts)]) for n in names[1:]],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, dict(zip(names, ins, strict=True)))[0]


@st.composite
def slice_cases(draw):
    shape = tuple(draw(st.lists(st.integers(0, 6), min_size=1, max_size=3)))
    axes = draw(st.permutations(range(len(shape))))[: draw(st.integers(1, len(shape)))]
    bound = st.one_of(st.integers(-9, 9), st.sampled_from([2**63 - 1, -(2**63)]))
    starts = [draw(bound) for _ in axes]
    ends = [draw(bound) for _ in axes]
    steps = [draw(st.sampled_from([-3, -2, -1, 1, 2, 3])) for _ in axes]
    axes = [a - len(shape) if draw(st.booleans()) else a for a in axes]
    return shape, starts, ends, axes, steps


@settings(max_examples=60)
@given(case=slice_cases())
def test_slice_matches_ort(case) -> None:
    shape, starts, ends, axes, steps = case
    x = np.arange(int(np.prod(shape)), dtype=np.float32).reshape(shape)
    want = ort_slice(x, starts, ends, axes, steps)
    args = [np.array(v, dtype=np.int64) for v in (starts, ends, axes, steps)]
    consts = dict(enumerate(args, start=1))
    for k in both_forms("Slice", ["x", "s", "e", "a", "t"], 13, consts):
        got = k(x, *args)
        np.testing.assert_array_equal(got, want)
        assert got.shape == want.shape


def test_slice_attribute_form_and_view() -> None:
    x = np.arange(60, dtype=np.float32).reshape(3, 4, 5)
    got = kernel("Slice", ["x"], 9, starts=[1, -3], ends=[1000, -1], axes=[1, 2])(x)
    np.testing.assert_array_equal(got, x[:, 1:, -3:-1])
    assert np.shares_memory(got, x)
    # defaults: axes 0..n-1, steps 1, and an omitted optional input arrives as None
    k = kernel("Slice", ["x", "s", "e", "", "t"], 13)
    s, e, t = (np.array(v, dtype=np.int64) for v in ([2, 3], [0, 0], [-1, -2]))
    np.testing.assert_array_equal(k(x, s, e, None, t), x[2:0:-1, 3:0:-2])


# ---------------------------------------------------------------------- Split / Gather


def test_split_forms() -> None:
    x = np.arange(14, dtype=np.float32).reshape(2, 7)
    parts = kernel("Split", ["x"], 11, n_outputs=2, axis=1, split=[3, 4])(x)
    assert [p.shape for p in parts] == [(2, 3), (2, 4)]
    sizes = np.array([5, 2], dtype=np.int64)
    for k in both_forms("Split", ["x", "s"], 13, {1: sizes}, n_outputs=2, axis=-1):
        np.testing.assert_array_equal(np.concatenate(k(x, sizes), axis=1), x)
    uneven = kernel("Split", ["x"], 18, n_outputs=3, axis=1, num_outputs=3)(x)
    assert [p.shape[1] for p in uneven] == [3, 3, 1]
    legacy_input = kernel("Split", ["x", "s"], 1, n_outputs=2, axis=1)(x, sizes)
    assert [p.shape[1] for p in legacy_input] == [5, 2]
    equal = kernel("Split", ["x"], 13, n_outputs=2, axis=0)(x)
    assert all(np.shares_memory(p, x) for p in equal)


def test_gather_negative_and_scalar_indices() -> None:
    x = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    k = kernel("Gather", ["x", "i"], 13, axis=1)
    idx = np.array([[-1, 0], [1, -3]], dtype=np.int32)
    np.testing.assert_array_equal(k(x, idx), np.take(x, idx % 3, axis=1))
    scalar = k(x, np.array(-1, dtype=np.int64))
    np.testing.assert_array_equal(scalar, x[:, 2])
    assert np.shares_memory(scalar, x)
    with pytest.raises(IndexError):
        k(x, np.array([3], dtype=np.int64))


# --------------------------------------------------------------- Reshape family (views)


@pytest.mark.parametrize(
    ("in_shape", "shape", "allowzero", "want"),
    [
        ((2, 3, 4), [0, -1], 0, (2, 12)),
        ((2, 3, 4), [-1, 0, 2], 0, (4, 3, 2)),
        ((0, 3, 4), [3, 4, 0], 1, (3, 4, 0)),
        ((2, 3, 4), [4, 0, 2], 0, (4, 3, 2)),
    ],
)
def test_reshape(in_shape, shape, allowzero, want) -> None:
    x = np.zeros(in_shape, dtype=np.float32)
    s = np.array(shape, dtype=np.int64)
    for k in both_forms("Reshape", ["x", "s"], 14, {1: s}, allowzero=allowzero):
        out = k(x, s)
        assert out.shape == want
        assert np.shares_memory(out, x) or x.size == 0


def test_reshape_attribute_form_flatten_squeeze_unsqueeze() -> None:
    x = np.arange(24, dtype=np.float32).reshape(1, 2, 1, 12)
    assert kernel("Reshape", ["x"], 1, shape=[4, -1])(x).shape == (4, 6)
    assert kernel("Flatten", ["x"], 13, axis=-1)(x).shape == (2, 12)
    assert kernel("Flatten", ["x"], 13, axis=0)(x).shape == (1, 24)
    assert kernel("Squeeze", ["x"], 11)(x).shape == (2, 12)
    assert kernel("Squeeze", ["x"], 11, axes=[-2])(x).shape == (1, 2, 12)
    axes = np.array([0, -2], dtype=np.int64)
    for k in both_forms("Squeeze", ["x", "a"], 13, {1: axes}):
        out = k(x, axes)
        assert out.shape == (2, 12) and np.shares_memory(out, x)
    assert kernel("Unsqueeze", ["x"], 11, axes=[0, -1])(x).shape == (1, 1, 2, 1, 12, 1)
    axes = np.array([3, 1], dtype=np.int64)
    for k in both_forms("Unsqueeze", ["x", "a"], 13, {1: axes}):
        assert k(x, axes).shape == (1, 1, 2, 1, 1, 12)


# ----------------------------------------------------------------- copying movers


def test_transpose_is_contiguous_and_concat_handles_empty() -> None:
    x = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    out = kernel("Transpose", ["x"], 13)(x)
    assert out.shape == (4, 3, 2) and out.flags.c_contiguous
    np.testing.assert_array_equal(
        kernel("Transpose", ["x"], 13, perm=[1, 0, 2])(x), x.transpose(1, 0, 2)
    )
    empty = np.zeros((2, 0, 4), dtype=np.float32)
    cat = kernel("Concat", ["a", "b", "c"], 13, axis=-2)(x, empty, x)
    np.testing.assert_array_equal(cat, np.concatenate([x, x], axis=1))


def test_expand_is_bidirectional_and_writable() -> None:
    x = np.arange(3, dtype=np.float32).reshape(3, 1)
    shape = np.array([2, 1, 4], dtype=np.int64)
    for k in both_forms("Expand", ["x", "s"], 13, {1: shape}):
        out = k(x, shape)
        np.testing.assert_array_equal(out, np.broadcast_to(x, (2, 3, 4)))
        assert out.flags.writeable and out.flags.c_contiguous
    assert kernel("Expand", ["x", "s"], 13)(x, np.array([1], dtype=np.int64)).shape == (3, 1)


# ------------------------------------------------------------------- shapes/constants


@pytest.mark.parametrize(
    ("attrs", "want"),
    [({}, [3, 4, 5]), ({"start": -2}, [4, 5]), ({"end": -1}, [3, 4]), ({"start": 2, "end": 1}, [])],
)
def test_shape_window(attrs, want) -> None:
    out = kernel("Shape", ["x"], 15, **attrs)(np.zeros((3, 4, 5), np.float32))
    assert out.dtype == np.int64 and out.tolist() == want


@pytest.mark.parametrize(
    ("attr", "value", "want"),
    [
        ("value_float", 1.5, np.array(1.5, np.float32)),
        ("value_floats", [1.0, 2.0], np.array([1, 2], np.float32)),
        ("value_int", 7, np.array(7, np.int64)),
        ("value_ints", [1, -2], np.array([1, -2], np.int64)),
        ("value_string", "hi", np.array("hi", dtype=object)),
        ("value_strings", ["a", "b"], np.array(["a", "b"], dtype=object)),
        (
            "value",
            numpy_helper.from_array(np.eye(2, dtype=np.float16)),
            np.eye(2, dtype=np.float16),
        ),
    ],
)
def test_constant_value_attributes(attr, value, want) -> None:
    got = kernel("Constant", [], 13, **{attr: value})()
    assert got.dtype == want.dtype and got.shape == want.shape
    assert got.tolist() == want.tolist()


def test_constant_sparse_value() -> None:
    values = numpy_helper.from_array(np.array([5.0, 6.0], np.float32), "v")
    indices = numpy_helper.from_array(np.array([1, 5], np.int64), "i")
    sparse = helper.make_sparse_tensor(values, indices, [2, 3])
    got = kernel("Constant", [], 13, sparse_value=sparse)()
    np.testing.assert_array_equal(got, [[0, 5, 0], [0, 0, 6]])


def test_constant_of_shape() -> None:
    shape = np.array([2, 3], dtype=np.int64)
    for k in both_forms("ConstantOfShape", ["s"], 9, {0: shape}):
        out = k(shape)
        assert out.dtype == np.float32 and out.shape == (2, 3) and not out.any()
    fill = numpy_helper.from_array(np.array([7], dtype=np.int32))
    out = kernel("ConstantOfShape", ["s"], 20, value=fill)(np.array([], dtype=np.int64))
    assert out.dtype == np.int32 and out.shape == () and out == 7


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 300),
    shape=st.lists(st.integers(0, 5), min_size=0, max_size=3),
    index_dtype=st.sampled_from([np.uint8, np.int8, np.int16, np.int32, np.int64]),
    seed=st.integers(0, 2**16),
)
def test_gather_from_a_constant_table_equals_numpy_take(n, shape, index_dtype, seed) -> None:
    rng = np.random.default_rng(seed)
    table = rng.integers(-1000, 1000, n).astype(np.int32)
    info = np.iinfo(index_dtype)
    lo, hi = max(-n, int(info.min)), min(n - 1, int(info.max))
    indices = rng.integers(lo, hi + 1, shape).astype(index_dtype)
    run = kernel("Gather", ["t", "i"], 13, consts={0: table}, axis=0)
    np.testing.assert_array_equal(run(table, indices), np.take(table, indices.astype(np.int64)))


def test_gather_from_a_constant_table_names_an_index_out_of_range() -> None:
    table = np.arange(10, dtype=np.float32)
    run = kernel("Gather", ["t", "i"], 13, consts={0: table}, axis=0)
    for bad in (10, -11):
        with pytest.raises(IndexError, match=f"{bad}.*10 entries"):
            run(table, np.array([0, bad, 1], np.int64))


@settings(max_examples=30, deadline=None)
@given(
    shape=st.lists(st.integers(1, 6), min_size=3, max_size=5),
    dtype=st.sampled_from([np.uint8, np.int8, np.float32, np.int64]),
)
def test_transpose_of_channels_to_last_equals_numpy(shape, dtype) -> None:
    x = (np.random.default_rng(len(shape)).normal(size=shape) * 40).astype(dtype)
    perm = (0, *range(2, len(shape)), 1)
    run = kernel("Transpose", ["x"], 13, perm=list(perm))
    y = run(x)
    np.testing.assert_array_equal(y, np.transpose(x, perm))
    assert y.flags.c_contiguous


@pytest.mark.parametrize("shape", [(2, 3, 130, 131), (1, 4, 128, 128), (3, 1, 16385)])
def test_transpose_of_channels_to_last_splits_large_images_exactly(shape) -> None:
    from qlinear.runtime.kernels import config

    x = np.random.default_rng(5).integers(0, 256, shape).astype(np.uint8)
    perm = (0, *range(2, len(shape)), 1)
    run = kernel("Transpose", ["x"], 13, perm=list(perm))
    before = config.num_threads()
    try:
        for threads in (1, 2):
            config.set_num_threads(threads)
            np.testing.assert_array_equal(run(x), np.transpose(x, perm))
    finally:
        config.set_num_threads(before)
