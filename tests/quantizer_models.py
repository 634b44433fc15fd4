"""Tiny hand-built float models for quantizer tests (messy-export features on purpose)."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def _const(name: str, value: np.ndarray) -> onnx.NodeProto:
    return helper.make_node(
        "Constant", [], [name], name=f"const_{name}", value=numpy_helper.from_array(value, name)
    )


def messy_attention(
    opset: int = 11, seed: int = 0, mask_value: float = float(np.finfo(np.float32).min)
) -> onnx.ModelProto:
    """Opset-11 one-head attention: weights in Constant nodes, dynamic batch/sequence,
    a float32-lowest additive mask, a Gemm head with bias [1, N]."""
    rng = np.random.default_rng(seed)
    d = 16
    w = {k: (rng.normal(0, 0.3, (d, d))).astype(np.float32) for k in ("q", "k", "v")}
    nodes = [_const(f"W{k}", v) for k, v in w.items()]
    nodes += [
        _const("one", np.array(1.0, np.float32)),
        _const("lowest", np.array(mask_value, np.float32)),
        _const("scale", np.array(1 / np.sqrt(d), np.float32)),
        helper.make_node("MatMul", ["x", "Wq"], ["q"], name="q_proj"),
        helper.make_node("MatMul", ["x", "Wk"], ["k"], name="k_proj"),
        helper.make_node("MatMul", ["x", "Wv"], ["v"], name="v_proj"),
        helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 2, 1], name="k_t"),
        helper.make_node("MatMul", ["q", "kt"], ["scores0"], name="qk"),
        helper.make_node("Mul", ["scores0", "scale"], ["scores"], name="scale_scores"),
        helper.make_node("Cast", ["mask"], ["maskf"], to=TensorProto.FLOAT, name="mask_cast"),
        helper.make_node("Sub", ["one", "maskf"], ["inv"], name="mask_inv"),
        helper.make_node("Mul", ["inv", "lowest"], ["bias0"], name="mask_bias"),
        helper.make_node("Unsqueeze", ["bias0"], ["bias"], axes=[1], name="mask_unsq"),
        helper.make_node("Add", ["scores", "bias"], ["masked"], name="mask_add"),
        helper.make_node("Softmax", ["masked"], ["probs"], axis=2, name="softmax"),
        helper.make_node("MatMul", ["probs", "v"], ["ctx"], name="ctx"),
        helper.make_node("Add", ["ctx", "x"], ["res"], name="residual"),
        helper.make_node("ReduceMean", ["res"], ["pooled"], axes=[1], keepdims=0, name="pool"),
        helper.make_node("Gemm", ["pooled", "Wh", "bh"], ["logits"], transB=1, name="head"),
    ]
    inits = [
        numpy_helper.from_array(rng.normal(0, 0.3, (4, d)).astype(np.float32), "Wh"),
        numpy_helper.from_array(rng.normal(0, 0.1, (1, 4)).astype(np.float32), "bh"),
    ]
    graph = helper.make_graph(
        nodes,
        "messy",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", "S", d]),
            helper.make_tensor_value_info("mask", TensorProto.INT64, ["N", "S"]),
        ],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 4])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 7
    onnx.checker.check_model(model, full_check=True)
    return model


def messy_feeds(n: int, batch: int = 2, seq: int = 6, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        mask = np.ones((batch, seq), np.int64)
        mask[0, seq // 2 :] = 0
        out.append({"x": rng.normal(0, 1, (batch, seq, 16)).astype(np.float32), "mask": mask})
    return out


def conv_net(seed: int = 0, opset: int = 17) -> onnx.ModelProto:
    """Conv -> BN -> Relu -> depthwise Conv -> Clip -> Add -> GAP -> Flatten -> Gemm."""
    rng = np.random.default_rng(seed)
    c = 8
    inits = {
        "W1": rng.normal(0, 0.3, (c, 3, 3, 3)),
        "B1": rng.normal(0, 0.1, (c,)),
        "g": rng.uniform(0.5, 1.5, (c,)),
        "b": rng.normal(0, 0.1, (c,)),
        "m": rng.normal(0, 0.1, (c,)),
        "v": rng.uniform(0.5, 1.5, (c,)),
        "W2": rng.normal(0, 0.3, (c, 1, 3, 3)),
        "W3": rng.normal(0, 0.3, (c, c, 1, 1)),
        "Wfc": rng.normal(0, 0.3, (c, 5)),
        "Bfc": rng.normal(0, 0.1, (5,)),
    }
    # one weight channel of W3 with an offset so asymmetric per-channel differs
    inits["W3"][0] += 0.5
    nodes = [
        helper.make_node("Conv", ["x", "W1", "B1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
        helper.make_node("BatchNormalization", ["c1", "g", "b", "m", "v"], ["bn1"], name="bn1"),
        helper.make_node("Relu", ["bn1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "W2"], ["c2"], pads=[1, 1, 1, 1], group=c, name="dw"),
        helper.make_node("Clip", ["c2", "lo", "hi"], ["r2"], name="clip"),
        helper.make_node("Conv", ["r2", "W3"], ["c3"], name="pw"),
        helper.make_node("Add", ["c3", "r1"], ["a"], name="add"),
        helper.make_node("GlobalAveragePool", ["a"], ["p"], name="gap"),
        helper.make_node("Flatten", ["p"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "Wfc", "Bfc"], ["y"], name="fc"),
    ]
    tensors = [numpy_helper.from_array(v.astype(np.float32), k) for k, v in inits.items()]
    tensors += [
        numpy_helper.from_array(np.array(0.0, np.float32), "lo"),
        numpy_helper.from_array(np.array(6.0, np.float32), "hi"),
    ]
    graph = helper.make_graph(
        nodes,
        "convnet",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5])],
        tensors,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def conv_feeds(n: int, batch: int = 2, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.normal(0, 1, (batch, 3, 8, 8)).astype(np.float32)} for _ in range(n)]


def mlp(seed: int = 0, k: int = 64, n: int = 32) -> onnx.ModelProto:
    """x [N, S, k] -> MatMul W1 [k, n] + b -> Relu -> MatMul W2 [n, 8]: for blockwise/int4."""
    rng = np.random.default_rng(seed)
    inits = [
        numpy_helper.from_array(rng.normal(0, 0.2, (k, n)).astype(np.float32), "W1"),
        numpy_helper.from_array(rng.normal(0, 0.1, (n,)).astype(np.float32), "b1"),
        numpy_helper.from_array(rng.normal(0, 0.2, (n, 8)).astype(np.float32), "W2"),
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "W1"], ["h0"], name="fc1"),
        helper.make_node("Add", ["h0", "b1"], ["h1"], name="fc1_bias"),
        helper.make_node("Relu", ["h1"], ["h"], name="act"),
        helper.make_node("MatMul", ["h", "W2"], ["y"], name="fc2"),
    ]
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", "S", k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", "S", 8])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def mlp_feeds(n: int, k: int = 64, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.normal(0, 1, (2, 4, k)).astype(np.float32)} for _ in range(n)]


def ort_run(model: onnx.ModelProto, feeds: dict, basic: bool = False) -> list[np.ndarray]:
    """Run with onnxruntime; `basic` stops at ORT_ENABLE_BASIC graph optimizations."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if basic:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def sqnr(a: np.ndarray, b: np.ndarray) -> float:
    a = np.asarray(a, np.float64)
    return float(10 * np.log10(np.sum(a**2) / max(np.sum((a - b) ** 2), 1e-30)))
