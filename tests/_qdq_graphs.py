"""Tiny hand-built QDQ graphs for the pass tests (shared helpers, not a test module)."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from qlinear import Session

MS = "com.microsoft"


class G:
    """A graph under construction: initializers and nodes with fresh names."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.n = 0

    def name(self, base: str) -> str:
        self.n += 1
        return f"{base}{self.n}"

    def const(self, array, base: str = "c") -> str:
        name = self.name(base)
        self.inits.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def op(self, op_type: str, *inputs: str, domain: str = "", **attrs) -> str:
        out = self.name(op_type.lower())
        self.nodes.append(helper.make_node(op_type, list(inputs), [out], domain=domain, **attrs))
        return out

    def q(self, x: str, scale: float, zp: int, dtype=np.uint8) -> str:
        return self.op("QuantizeLinear", x, self.const(np.float32(scale)),
                       self.const(np.array(zp, dtype)))

    def dq(self, x: str, scale, zp, dtype=np.uint8, axis: int | None = None) -> str:
        kw = {} if axis is None else {"axis": axis}
        return self.op("DequantizeLinear", x, self.const(np.asarray(scale, np.float32)),
                       self.const(np.asarray(zp, dtype)), **kw)

    def qdq(self, x: str, scale: float, zp: int, dtype=np.uint8) -> str:
        return self.dq(self.q(x, scale, zp, dtype), scale, zp, dtype)

    def weight(self, w: np.ndarray, axis: int = 0, dtype=np.int8) -> str:
        """DQ of a per-channel symmetric int8 weight along `axis`."""
        red = tuple(i for i in range(w.ndim) if i != axis)
        scale = (np.abs(w).max(axis=red) / 127).astype(np.float32) + 1e-6
        shape = [1] * w.ndim
        shape[axis] = -1
        q = np.clip(np.rint(w / scale.reshape(shape)), -127, 127).astype(dtype)
        return self.dq(self.const(q, "w"), scale, np.zeros(scale.shape, dtype), dtype, axis)

    def model(self, inputs: dict[str, tuple], outputs: list[str], opset: int = 19):
        ins = [helper.make_tensor_value_info(k, TensorProto.FLOAT, s) for k, s in inputs.items()]
        outs = [helper.make_tensor_value_info(o, TensorProto.UNDEFINED, None) for o in outputs]
        graph = helper.make_graph(self.nodes, "g", ins, outs, self.inits)
        opsets = [helper.make_opsetid("", opset), helper.make_opsetid(MS, 1)]
        return helper.make_model(graph, opset_imports=opsets)


def ops(model: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in model.graph.node]


def run(model: onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    return Session(model, optimize=False).run(None, feeds)


def ort_run(model: onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(model.SerializeToString(), so,
                                providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)
