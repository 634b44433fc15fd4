"""A small ONNX graph builder so zoo models read like network definitions.

Building models with raw ``onnx.helper`` calls buries the architecture under name
bookkeeping. :class:`GraphBuilder` names values and parameters the way a torch
export does (``/layer1.0/conv1/Conv_output_0``, ``layer1.0.conv1.weight``), draws
realistically scaled weights from one seeded generator, and tracks shapes plus
per-channel moments of 4-D activations, so BatchNormalization running statistics
match what the model actually sees and activations stay O(1) through depth.

The moment tracking is an approximation (channels and positions treated as
independent, padding and MaxPool handled loosely); it only needs to be good to a
small factor, as a trained network's statistics would be on foreign data.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper

Dim = int | str
Shape = tuple[Dim, ...]
Moments = tuple[np.ndarray, np.ndarray]  # per-channel (mean, variance), channel axis 1

FLOAT = TensorProto.FLOAT
INT64 = TensorProto.INT64

MIN_OPSET, MAX_OPSET = 13, 21

#: Prefix of the metadata_props a zoo model carries (read back by ``qlinear.zoo.data``).
META_PREFIX = "qlinear.zoo."

_erf = np.vectorize(math.erf, otypes=[np.float64])


def _rectified(mean: np.ndarray, var: np.ndarray) -> Moments:
    """Mean and variance of max(0, X) for X ~ N(mean, var), per channel."""
    sd = np.sqrt(np.maximum(var, 1e-12))
    a = mean / sd
    cdf = 0.5 * (1.0 + _erf(a / math.sqrt(2.0)))
    pdf = np.exp(-0.5 * a * a) / math.sqrt(2.0 * math.pi)
    m1 = mean * cdf + sd * pdf
    m2 = (mean * mean + var) * cdf + mean * sd * pdf
    return m1, np.maximum(m2 - m1 * m1, 1e-12)


def _conv_out(size: Dim, k: int, stride: int, pad: int) -> Dim:
    return (size + 2 * pad - k) // stride + 1 if isinstance(size, int) else size


class GraphBuilder:
    """Accumulates nodes and initializers; ``build()`` returns the ModelProto.

    Values are plain strings (ONNX value names). ``shapes`` holds the shape of every
    value a helper produced; ``moments`` the per-channel statistics of conv-path
    activations, which ``bn`` uses for its running mean/var.
    """

    def __init__(self, name: str, *, seed: int = 0, opset: int = 17) -> None:
        if not MIN_OPSET <= opset <= MAX_OPSET:
            raise ValueError(f"opset {opset} not supported; use {MIN_OPSET}..{MAX_OPSET}")
        self.name = name
        self.opset = opset
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        # Initializers are written straight into the final proto: copying a
        # realistic model's weights between messages costs more than drawing them.
        self._model = onnx.ModelProto()
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self.shapes: dict[str, Shape] = {}
        self.moments: dict[str, Moments] = {}
        self._scope: list[str] = []
        self._taken: set[str] = set()
        self._consts: dict[tuple[str, tuple[int, ...], bytes], str] = {}
        self._renames: dict[str, str] = {}
        #: Default std of ``linear`` weights and biases (BERT's initializer_range).
        self.linear_std = 0.02

    # ------------------------------------------------------------------ naming
    @contextlib.contextmanager
    def scope(self, name: str) -> Iterator[None]:
        """Nest parameter and node names under ``name`` (a module path, as in torch)."""
        self._scope.append(name)
        try:
            yield
        finally:
            self._scope.pop()

    def _fresh(self, base: str) -> str:
        name, i = base, 0
        while name in self._taken:
            i += 1
            name = f"{base}_{i}"
        self._taken.add(name)
        return name

    # ------------------------------------------------------------ graph pieces
    def input(
        self, name: str, shape: Shape, dtype: int = FLOAT, moments: Moments | None = None
    ) -> str:
        self._taken.add(name)
        self.inputs.append(helper.make_tensor_value_info(name, dtype, list(shape)))
        self.shapes[name] = tuple(shape)
        if moments is not None:
            self.moments[name] = moments
        return name

    def output(self, value: str, name: str, dtype: int = FLOAT) -> str:
        """Expose ``value`` as graph output ``name``; the value is renamed in ``build()``,
        so later nodes may still consume it under its old name."""
        self._taken.add(name)
        self._renames[value] = name
        self.shapes[name] = self.shapes[value]
        self.outputs.append(helper.make_tensor_value_info(name, dtype, list(self.shapes[name])))
        return name

    def param(self, name: str, array: np.ndarray) -> str:
        """A trainable weight, stored as an initializer named by the current scope."""
        return self._initializer(self._fresh(".".join([*self._scope, name])), array)

    def _initializer(self, name: str, array: np.ndarray) -> str:
        tensor = self._model.graph.initializer.add()
        tensor.name = name
        tensor.data_type = helper.np_dtype_to_tensor_dtype(array.dtype)
        tensor.dims.extend(array.shape)
        tensor.raw_data = np.ascontiguousarray(array, array.dtype.newbyteorder("<")).tobytes()
        return name

    def const(self, value: Any, dtype: type = np.float32) -> str:
        """A small constant (shape, scalar); identical constants share one initializer."""
        array = np.asarray(value, dtype=dtype)
        key = (array.dtype.str, array.shape, array.tobytes())
        if key not in self._consts:
            self._consts[key] = self._initializer(self._fresh(f"const_{len(self._consts)}"), array)
        return self._consts[key]

    def op(self, op_type: str, *inputs: str, shape: Shape | None = None, **attrs: Any) -> str:
        """Append one single-output node; returns its output value name."""
        node_name = self._fresh("/" + "/".join([*self._scope, op_type]))
        out = f"{node_name}_output_0"
        self._taken.add(out)
        self.nodes.append(helper.make_node(op_type, list(inputs), [out], name=node_name, **attrs))
        if shape is not None:
            self.shapes[out] = tuple(shape)
        return out

    def normal(self, shape: Sequence[int], std: float) -> np.ndarray:
        """Seeded N(0, std^2) float32 weights (vectorised: realistic sizes build fast)."""
        return self.rng.standard_normal(tuple(shape), dtype=np.float32) * np.float32(std)

    # ------------------------------------------------------------- CNN layers
    def conv(
        self,
        x: str,
        cout: int,
        k: int,
        stride: int = 1,
        pad: int | None = None,
        groups: int = 1,
        *,
        bias: bool = False,
        std: float | None = None,
        name: str = "conv",
    ) -> str:
        """Conv with He/Kaiming-normal weights (std sqrt(2/fan_in)) unless ``std`` is given."""
        n, cin, h, w = self.shapes[x]
        assert isinstance(cin, int) and cin % groups == 0 and cout % groups == 0
        pad = k // 2 if pad is None else pad
        cin_g = cin // groups
        std = math.sqrt(2.0 / (cin_g * k * k)) if std is None else std
        with self.scope(name):
            weight = self.normal((cout, cin_g, k, k), std)
            inputs = [x, self.param("weight", weight)]
            b = self.normal((cout,), 0.02) if bias else None
            if b is not None:
                inputs.append(self.param("bias", b))
            out = self.op(
                "Conv",
                *inputs,
                shape=(n, cout, _conv_out(h, k, stride, pad), _conv_out(w, k, stride, pad)),
                kernel_shape=[k, k],
                strides=[stride, stride],
                pads=[pad] * 4,
                dilations=[1, 1],
                group=groups,
            )
        if x in self.moments:
            mean, var = self.moments[x]
            wg = weight.astype(np.float64).reshape(groups, cout // groups, cin_g, k * k)
            mean_out = np.einsum("gok,gk->go", wg.sum(-1), mean.reshape(groups, cin_g))
            var_out = np.einsum("gok,gk->go", (wg * wg).sum(-1), var.reshape(groups, cin_g))
            mean_out = mean_out.reshape(cout) + (0.0 if b is None else b)
            self.moments[out] = (mean_out, var_out.reshape(cout))
        return out

    def bn(self, x: str, *, eps: float = 1e-5, name: str = "bn") -> str:
        """BatchNormalization whose running stats track the input's (estimated) moments.

        The running stats are jittered and gamma/beta drawn with a spread, so folded
        per-channel scales differ the way they do in trained networks.
        """
        c = self.shapes[x][1]
        assert isinstance(c, int)
        mean_in, var_in = self.moments.get(x, (np.zeros(c), np.ones(c)))
        rng = self.rng
        running_mean = mean_in + 0.1 * np.sqrt(var_in) * rng.standard_normal(c)
        running_var = var_in * np.exp(0.2 * rng.standard_normal(c))
        gamma = np.exp(0.3 * rng.standard_normal(c))
        beta = 0.25 * rng.standard_normal(c)
        with self.scope(name):
            out = self.op(
                "BatchNormalization",
                x,
                self.param("weight", gamma.astype(np.float32)),
                self.param("bias", beta.astype(np.float32)),
                self.param("running_mean", running_mean.astype(np.float32)),
                self.param("running_var", running_var.astype(np.float32)),
                shape=self.shapes[x],
                epsilon=eps,
            )
        scale = gamma / np.sqrt(running_var + eps)
        self.moments[out] = (scale * (mean_in - running_mean) + beta, scale * scale * var_in)
        return out

    def _rectify(self, x: str, out: str) -> str:
        self.shapes[out] = self.shapes[x]
        if x in self.moments:
            self.moments[out] = _rectified(*self.moments[x])
        return out

    def relu(self, x: str) -> str:
        return self._rectify(x, self.op("Relu", x))

    def relu6(self, x: str) -> str:
        """Clip(0, 6) as exported for ReLU6 (the upper bound is ignored by the moments)."""
        return self._rectify(x, self.op("Clip", x, self.const(0.0), self.const(6.0)))

    def add(self, a: str, b: str) -> str:
        out = self.op("Add", a, b, shape=self.shapes.get(a))
        if a in self.moments and b in self.moments:
            (ma, va), (mb, vb) = self.moments[a], self.moments[b]
            self.moments[out] = (ma + mb, va + vb)
        return out

    def maxpool(self, x: str, k: int, stride: int, pad: int) -> str:
        n, c, h, w = self.shapes[x]
        out = self.op(
            "MaxPool",
            x,
            shape=(n, c, _conv_out(h, k, stride, pad), _conv_out(w, k, stride, pad)),
            kernel_shape=[k, k],
            strides=[stride, stride],
            pads=[pad] * 4,
        )
        if x in self.moments:
            # Max over strongly correlated (smooth) rectified neighbours, as measured on
            # zoo images: the mean moves up ~0.4 sd and the spread grows ~1.4x.
            mean, var = self.moments[x]
            self.moments[out] = (mean + 0.4 * np.sqrt(var), 1.4 * var)
        return out

    def global_avgpool(self, x: str) -> str:
        n, c, _, _ = self.shapes[x]
        return self.op("GlobalAveragePool", x, shape=(n, c, 1, 1))

    def flatten(self, x: str) -> str:
        n, *rest = self.shapes[x]
        return self.op("Flatten", x, shape=(n, math.prod(int(d) for d in rest)), axis=1)

    # ------------------------------------------------------ dense / transformer
    def gemm(self, x: str, nout: int, *, std: float | None = None, name: str = "fc") -> str:
        """2-D Linear exported as Gemm(transB=1), weight [out, in]; std 1/sqrt(fan_in) default."""
        n, nin = self.shapes[x]
        assert isinstance(nin, int)
        std = 1.0 / math.sqrt(nin) if std is None else std
        with self.scope(name):
            w = self.param("weight", self.normal((nout, nin), std))
            b = self.param("bias", self.normal((nout,), 0.02))
            return self.op("Gemm", x, w, b, shape=(n, nout), transB=1)

    def linear(self, x: str, nout: int, *, std: float | None = None, name: str = "dense") -> str:
        """N-D Linear exported as MatMul (weight [in, out]) + Add; std ``linear_std``."""
        *lead, nin = self.shapes[x]
        assert isinstance(nin, int)
        std = self.linear_std if std is None else std
        with self.scope(name):
            w = self.param("weight", self.normal((nin, nout), std))
            b = self.param("bias", self.normal((nout,), std))
            y = self.op("MatMul", x, w, shape=(*lead, nout))
            return self.op("Add", y, b, shape=(*lead, nout))

    def _reduce_mean(self, x: str, shape: Shape) -> str:
        if self.opset >= 18:
            return self.op("ReduceMean", x, self.const([-1], np.int64), shape=shape, keepdims=1)
        return self.op("ReduceMean", x, shape=shape, axes=[-1], keepdims=1)

    def layernorm(self, x: str, *, eps: float = 1e-12, name: str = "LayerNorm") -> str:
        """LayerNormalization (gamma ~ 1); decomposed the way torch exports it below opset 17."""
        shape = self.shapes[x]
        d = shape[-1]
        assert isinstance(d, int)
        with self.scope(name):
            gamma = self.param("weight", 1.0 + self.normal((d,), 0.05))
            beta = self.param("bias", self.normal((d,), 0.02))
            if self.opset >= 17:
                return self.op(
                    "LayerNormalization", x, gamma, beta, shape=shape, axis=-1, epsilon=eps
                )
            reduced = (*shape[:-1], 1)
            centred = self.op("Sub", x, self._reduce_mean(x, reduced), shape=shape)
            sq = self.op("Pow", centred, self.const(2.0), shape=shape)
            var = self.op("Add", self._reduce_mean(sq, reduced), self.const(eps), shape=reduced)
            normed = self.op("Div", centred, self.op("Sqrt", var, shape=reduced), shape=shape)
            return self.op("Add", self.op("Mul", normed, gamma, shape=shape), beta, shape=shape)

    def gelu(self, x: str) -> str:
        """Exact GELU in the Erf form torch exports below opset 20: 0.5*x*(1+erf(x/sqrt2))."""
        shape = self.shapes[x]
        t = self.op("Div", x, self.const(math.sqrt(2.0)), shape=shape)
        t = self.op("Add", self.op("Erf", t, shape=shape), self.const(1.0), shape=shape)
        return self.op("Mul", self.op("Mul", x, t, shape=shape), self.const(0.5), shape=shape)

    def attention(
        self, x: str, heads: int, *, mask: str | None = None, name: str = "attention"
    ) -> str:
        """Multi-head self-attention as HF exports it, up to and including the output dense.

        ``mask`` is an additive [N, 1, 1, S] tensor added to the scaled scores.
        """
        n, s, d = self.shapes[x]
        assert isinstance(d, int) and d % heads == 0
        hd = d // heads
        split_shape = self.const([0, 0, heads, hd], np.int64)

        def heads_of(t: str, perm: list[int]) -> str:
            r = self.op("Reshape", t, split_shape, shape=(n, s, heads, hd))
            out_shape = tuple((n, s, heads, hd)[p] for p in perm)
            return self.op("Transpose", r, shape=out_shape, perm=perm)

        with self.scope(name):
            with self.scope("self"):
                q = heads_of(self.linear(x, d, name="query"), [0, 2, 1, 3])
                k = heads_of(self.linear(x, d, name="key"), [0, 2, 3, 1])
                v = heads_of(self.linear(x, d, name="value"), [0, 2, 1, 3])
                scores = self.op("MatMul", q, k, shape=(n, heads, s, s))
                scores = self.op("Div", scores, self.const(math.sqrt(hd)), shape=(n, heads, s, s))
                if mask is not None:
                    scores = self.op("Add", scores, mask, shape=(n, heads, s, s))
                probs = self.op("Softmax", scores, shape=(n, heads, s, s), axis=-1)
                ctx = self.op("MatMul", probs, v, shape=(n, heads, s, hd))
                ctx = self.op("Transpose", ctx, shape=(n, s, heads, hd), perm=[0, 2, 1, 3])
                ctx = self.op("Reshape", ctx, self.const([0, 0, d], np.int64), shape=(n, s, d))
            return self.linear(ctx, d, name="output.dense")

    # ----------------------------------------------------------------- result
    def build(self, *, doc: str = "", metadata: dict[str, Any] | None = None) -> onnx.ModelProto:
        """The ModelProto (IR 8, or the lowest IR the opset needs: 9 or 10). Call once.

        ``metadata`` is stored as ``qlinear.zoo.<key>`` props so input generators can
        find the image size, sequence length or vocabulary without guessing.
        """
        for node in self.nodes:
            for values in (node.input, node.output):
                for i, v in enumerate(values):
                    values[i] = self._renames.get(v, v)
        self._renames.clear()
        model = self._model
        model.graph.name = self.name
        model.graph.node.extend(self.nodes)
        model.graph.input.extend(self.inputs)
        model.graph.output.extend(self.outputs)
        model.opset_import.append(helper.make_opsetid("", self.opset))
        # IR 8 at least (what ORT and the rest of qlinear expect), more if the opset needs it.
        model.ir_version = max(8, helper.find_min_ir_version_for(list(model.opset_import)))
        model.producer_name = "qlinear.zoo"
        model.doc_string = doc
        if metadata:
            helper.set_model_props(model, {META_PREFIX + k: str(v) for k, v in metadata.items()})
        return model


SIZES = ("small", "realistic")


def pick_config(configs: dict[str, dict[str, Any]], size: str, model: str) -> dict[str, Any]:
    """The config for ``size``, with an error naming the allowed sizes."""
    if size not in configs:
        raise ValueError(f"{model}: unknown size {size!r}; choose one of {sorted(configs)}")
    return dict(configs[size])


def batch_dim(batch: int | None) -> Dim:
    """``None`` keeps the batch dimension symbolic ("N"); an int fixes it."""
    if batch is None:
        return "N"
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    return batch
