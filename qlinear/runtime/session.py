"""`Session`: plans an ONNX graph once, then runs it with native kernels.

Mirrors onnxruntime's InferenceSession so users can swap one for the other.
Planning (topological order, constant folding, feed signatures, kernel choice
and weight packing inside each kernel factory, value lifetimes) happens in the
constructor; `run` only validates feeds and calls kernels.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from qlinear.errors import (
    InputError,
    InvalidModelError,
    QlinearError,
    UnsupportedOpError,
)
from qlinear.onnx_io import ModelLike, load_model
from qlinear.runtime.fallback import reference_kernel
from qlinear.runtime.native_chain import plan_chains
from qlinear.runtime.registry import Kernel, NodeSpec, lookup, normalize_domain
from qlinear.runtime.step_fusion import fuse_steps

#: Ops whose output differs between calls with the same inputs: never folded at plan time.
_NONDETERMINISTIC = {
    "RandomNormal",
    "RandomNormalLike",
    "RandomUniform",
    "RandomUniformLike",
    "Multinomial",
    "Bernoulli",
    "Dropout",
}

Shape = tuple[int | str | None, ...]


class NodeExecutionError(QlinearError, RuntimeError):
    """A node failed while running; the message names the node and its input shapes."""


@dataclass(frozen=True)
class TensorInfo:
    """A graph input or output: name, numpy dtype and shape (str/None for free dims)."""

    name: str
    dtype: np.dtype | None
    shape: Shape | None

    @property
    def type(self) -> str:
        """The onnxruntime-style type string, e.g. 'tensor(float)'."""
        if self.dtype is None:
            return "unknown"
        elem = helper.np_dtype_to_tensor_dtype(self.dtype)
        return f"tensor({_ORT_TYPE_NAMES.get(elem, onnx.TensorProto.DataType.Name(elem).lower())})"


_ORT_TYPE_NAMES = {onnx.TensorProto.FLOAT: "float", onnx.TensorProto.DOUBLE: "double"}


@dataclass(frozen=True)
class NodeTime:
    """Wall time of one node in a profiled run."""

    node: str
    op_type: str
    seconds: float


@dataclass
class _Step:
    spec: NodeSpec
    kernel: Kernel
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    release: tuple[str, ...] = ()
    fallback: bool = False


class Session:
    """Run an ONNX model with qlinear's kernels.

    model: a path, bytes or onnx.ModelProto (not modified).
    num_threads: intra-op threads for the parallel kernels (None: all cores).
    optimize: rewrite the graph first (BatchNorm folds, QDQ -> fused integer ops).
    """

    def __init__(
        self,
        model: ModelLike,
        *,
        num_threads: int | None = None,
        optimize: bool = True,
        _fold_overridable: bool = True,
        _fuse_steps: bool = True,
        _chains: bool = True,
    ) -> None:
        source = str(model) if isinstance(model, (str, os.PathLike)) else "model"
        proto = load_model(model)
        if optimize and _fold_overridable:
            proto = _optimized(proto)
        self._model = proto
        self._num_threads = num_threads
        graph = proto.graph
        self._opsets = {normalize_domain(o.domain): o.version for o in proto.opset_import}
        if "" not in self._opsets:
            self._opsets[""] = 1 if proto.ir_version < 3 else onnx.defs.onnx_opset_version()
        self._consts: dict[str, np.ndarray] = _initializers(graph, source)
        self._inputs = [_tensor_info(vi) for vi in graph.input if vi.name not in self._consts]
        # Old IR versions list initializers among inputs: they may be fed to override.
        self._overridable = {vi.name for vi in graph.input if vi.name in self._consts}
        # Constants are folded through overridable initializers for speed; a run that
        # overrides one uses a second plan without those folds, built on first need.
        self._fold_overridable = _fold_overridable
        self._unfolded: Session | None = None
        # Plan-time step fusions drop intermediate values; a run that asks for one of
        # them (per-layer compare) uses a second plan without step fusions.
        self._fuse_steps = _fuse_steps
        # Runs of native-only steps replay as one native call (native_chain).
        self._chains = _chains
        self._fused_away: set[str] = set()
        self._unfused: Session | None = None
        self._outputs = [_tensor_info(vi) for vi in graph.output]
        self._output_names = {o.name for o in self._outputs}
        self._value_types = inferred_types(proto)
        self.fallback_ops: list[str] = []
        self._steps: list[_Step] = []
        self._flat_steps: list[_Step] = []
        self._plan(graph)

    # -- public API -------------------------------------------------------------------

    def get_inputs(self) -> list[TensorInfo]:
        return list(self._inputs)

    def get_outputs(self) -> list[TensorInfo]:
        return list(self._outputs)

    def get_modelmeta(self) -> onnx.ModelProto:
        return self._model

    def run(
        self,
        output_names: Sequence[str] | None,
        feeds: Mapping[str, Any],
        run_options: Any = None,
    ) -> list[np.ndarray]:
        """Outputs named by `output_names` (all graph outputs if None), in that order."""
        return self._execute(output_names, feeds, None)

    def run_profiled(
        self, output_names: Sequence[str] | None, feeds: Mapping[str, Any]
    ) -> tuple[list[np.ndarray], list[NodeTime]]:
        """Like `run`, also returning each executed node's wall time (for `bench --profile`)."""
        times: list[NodeTime] = []
        outputs = self._execute(output_names, feeds, times)
        return outputs, times

    @property
    def value_names(self) -> list[str]:
        """Every value a run can return: inputs, constants, node outputs (per-layer compare)."""
        return sorted(self._producible)

    def _execute(
        self,
        output_names: Sequence[str] | None,
        feeds: Mapping[str, Any],
        times: list[NodeTime] | None,
    ) -> list[np.ndarray]:
        if self._fold_overridable and self._overridable.intersection(feeds):
            if self._unfolded is None:
                self._unfolded = Session(
                    self._model,
                    num_threads=self._num_threads,
                    optimize=False,
                    _fold_overridable=False,
                    _chains=self._chains,
                )
            return self._unfolded._execute(output_names, feeds, times)
        names = [o.name for o in self._outputs] if not output_names else list(output_names)
        if self._fused_away and self._fused_away.intersection(names):
            if self._unfused is None:
                self._unfused = Session(
                    self._model,
                    num_threads=self._num_threads,
                    optimize=False,
                    _fold_overridable=self._fold_overridable,
                    _fuse_steps=False,
                )
            return self._unfused._execute(output_names, feeds, times)
        for name in names:
            if name not in self._producible:
                raise InputError(
                    f"unknown output {name!r}; model outputs are: "
                    + ", ".join(o.name for o in self._outputs)
                )
        env = dict(self._consts)
        env.update(self._check_feeds(feeds))
        if self._num_threads:
            from qlinear.runtime.kernels import config

            config.set_num_threads(self._num_threads)
        keep = set(names)
        clock = time.perf_counter
        with np.errstate(all="ignore"):  # ONNX defines inf/nan results (x/0, sqrt(-1))
            self._run_steps(env, keep, times, clock)
        return [env[n] for n in names]

    def _run_steps(
        self, env: dict[str, np.ndarray], keep: set[str], times: list[NodeTime] | None, clock: Any
    ) -> None:
        # a profiled run times every node: chains run as their steps
        _run_plan(self._flat_steps if times is not None else self._steps, env, keep, times, clock)

    # -- planning ---------------------------------------------------------------------

    def _plan(self, graph: onnx.GraphProto) -> None:
        known = set(self._consts) | {i.name for i in self._inputs} | {""}
        order = _topological_order(graph, known)
        functions = list(self._model.functions)
        steps: list[_Step] = []
        for node in order:
            opset = self._opsets.get(normalize_domain(node.domain))
            if opset is None:
                if any(f.name == node.op_type and f.domain == node.domain for f in functions):
                    opset = 1
                else:
                    raise InvalidModelError(
                        f"node {node.name!r} ({node.op_type}) uses domain {node.domain!r}, "
                        "which the model does not import"
                    )
            spec = NodeSpec(
                proto=node,
                opset=opset,
                consts={i: self._consts[n] for i, n in enumerate(node.input) if n in self._consts},
                input_shapes=[self._value_types.get(n, (None, None))[1] for n in node.input],
                input_dtypes=[self._value_types.get(n, (None, None))[0] for n in node.input],
                num_threads=self._num_threads or 0,
            )
            kernel, fallback = self._choose_kernel(spec, functions)
            step = _Step(spec, kernel, tuple(node.input), tuple(node.output), fallback=fallback)
            if self._foldable(node):
                self._fold(step)
                continue
            steps.append(step)
        self.fallback_ops = sorted({s.spec.op_type for s in steps if s.fallback})
        node_outputs = {o for s in steps for o in s.outputs if o}
        self._producible = set(self._consts) | {i.name for i in self._inputs} | node_outputs
        if self._fuse_steps:
            steps = fuse_steps(steps, self._value_types, self._output_names)
            self._fused_away = node_outputs - {o for s in steps for o in s.outputs if o}
        missing = [o.name for o in self._outputs if o.name not in self._producible]
        if missing:
            raise InvalidModelError(f"graph outputs {missing} are produced by no node")
        self._steps = self._flat_steps = steps
        self._plan_lifetimes()
        if self._fuse_steps and self._chains:
            self._steps, hidden = plan_chains(
                steps, self._output_names, self._consts,
                lambda inner, env, keep: _run_plan(inner, env, keep, None, time.perf_counter),
                lambda chain, first: _Step(first.spec, chain, chain.inputs, chain.outputs))
            self._fused_away |= hidden
            self._plan_lifetimes()

    def _choose_kernel(
        self, spec: NodeSpec, functions: list[onnx.FunctionProto]
    ) -> tuple[Kernel, bool]:
        has_subgraph = any(
            a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
            for a in spec.proto.attribute
        )
        factory = None if has_subgraph else lookup(spec.domain, spec.op_type, spec.opset)
        if factory is not None:
            try:
                return factory(spec), False
            except QlinearError:
                raise
            except NotImplementedError:
                pass  # this attribute combination has no native kernel: fall back
            except Exception as exc:
                raise InvalidModelError(
                    f"{spec.describe()}: cannot be planned: {type(exc).__name__}: {exc}"
                ) from exc
        kernel = reference_kernel(spec, self._opsets, functions)
        if kernel is None:
            raise UnsupportedOpError(
                f"{spec.describe()}: op {spec.op_type!r} (domain {spec.domain or 'ai.onnx'!r}, "
                f"opset {spec.opset}) has no qlinear kernel and no onnx.reference implementation"
            )
        return kernel, True

    def _foldable(self, node: onnx.NodeProto) -> bool:
        fixed = self._fold_overridable
        return (
            node.op_type not in _NONDETERMINISTIC
            and all(
                n == "" or (n in self._consts and (fixed or n not in self._overridable))
                for n in node.input
            )
            and not any(o in self._output_names for o in node.output)
        )

    def _fold(self, step: _Step) -> None:
        args = [self._consts[n] if n else None for n in step.inputs]
        try:
            result = step.kernel(*args)
        except Exception as exc:
            raise InvalidModelError(
                "constant folding failed: " + _failure_message(step.spec, args, exc)
            ) from exc
        if isinstance(result, np.ndarray) or np.isscalar(result):
            result = (result,)
        for name, value in zip(step.outputs, result, strict=False):
            if name and value is not None:
                self._consts[name] = np.asarray(value)

    def _plan_lifetimes(self) -> None:
        last_use: dict[str, int] = {}
        for index, step in enumerate(self._steps):
            for name in step.inputs:
                if name:
                    last_use[name] = index
        outputs = {o.name for o in self._outputs}
        releases: dict[int, list[str]] = {}
        for name, index in last_use.items():
            if name not in outputs and name not in self._consts:
                releases.setdefault(index, []).append(name)
        for index, step in enumerate(self._steps):
            step.release = tuple(releases.get(index, ()))

    # -- feeds ------------------------------------------------------------------------

    def _check_feeds(self, feeds: Mapping[str, Any]) -> dict[str, np.ndarray]:
        if not isinstance(feeds, Mapping):
            raise InputError(
                f"feeds must be a dict of input name -> array, got {type(feeds).__name__}"
            )
        expected = {i.name: i for i in self._inputs}
        checked: dict[str, np.ndarray] = {}
        for name, value in feeds.items():
            info = expected.get(name)
            if info is None:
                if name in self._overridable:
                    checked[name] = np.asarray(value)
                    continue
                raise InputError(
                    f"unknown input {name!r}; model inputs are: "
                    + ", ".join(i.name for i in self._inputs)
                )
            checked[name] = _check_feed(info, value)
        missing = [n for n in expected if n not in checked]
        if missing:
            raise InputError(f"missing input(s) {', '.join(map(repr, missing))}")
        return checked


def _run_plan(
    steps: Sequence[_Step],
    env: dict[str, np.ndarray],
    keep: set[str],
    times: list[NodeTime] | None,
    clock: Any,
) -> None:
    """Run the plan. The per-node Python here is what a batch-1 run of a small model
    spends between kernels, so the common single-output case takes the short path."""
    ndarray = np.ndarray
    for step in steps:
        args = [env[n] if n else None for n in step.inputs]
        start = clock() if times is not None else 0.0
        try:
            result = step.kernel(*args)
        except QlinearError:
            raise
        except Exception as exc:
            raise NodeExecutionError(_failure_message(step.spec, args, exc)) from exc
        if times is not None:
            times.append(NodeTime(step.spec.name, step.spec.op_type, clock() - start))
        outputs = step.outputs
        if type(result) is ndarray and len(outputs) == 1:
            if outputs[0]:
                env[outputs[0]] = result
        else:
            if isinstance(result, ndarray) or np.isscalar(result):
                result = (result,)
            for name, value in zip(outputs, result, strict=False):
                if name:
                    env[name] = value if isinstance(value, ndarray) else np.asarray(value)
        for name in step.release:
            if name not in keep:
                env.pop(name, None)


def _optimized(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model after qlinear's graph rewrites; structural errors are reported first."""
    from qlinear.passes import optimize as optimize_graph

    graph = model.graph
    known = {t.name for t in graph.initializer} | {i.name for i in graph.input} | {""}
    known |= {t.values.name for t in graph.sparse_initializer}
    _topological_order(graph, known)  # dangling inputs and cycles: clear errors, not the IR's
    try:
        return optimize_graph(model)
    except QlinearError:
        raise
    except Exception as exc:
        raise InvalidModelError(
            f"the graph optimizer failed ({type(exc).__name__}: {exc}); "
            "Session(..., optimize=False) runs the model as it is"
        ) from exc


def _check_feed(info: TensorInfo, value: Any) -> np.ndarray:
    array = value if isinstance(value, np.ndarray) else np.asarray(value)
    if info.dtype is not None and array.dtype != info.dtype:
        raise InputError(
            f"input {info.name!r} has dtype {array.dtype}, but the model expects {info.dtype}"
        )
    if info.shape is not None:
        shape_ok = array.ndim == len(info.shape) and all(
            not isinstance(d, int) or d == s for d, s in zip(info.shape, array.shape, strict=True)
        )
        if not shape_ok:
            want = "(" + ", ".join("?" if d is None else str(d) for d in info.shape) + ")"
            raise InputError(
                f"input {info.name!r} has shape {tuple(array.shape)}, but the model expects {want}"
            )
    return array


def _failure_message(spec: NodeSpec, args: list[Any], exc: Exception) -> str:
    shapes = ", ".join(
        "None" if a is None else f"{getattr(a, 'dtype', type(a).__name__)}{list(np.shape(a))}"
        for a in args
    )
    return f"{spec.describe()} failed on inputs [{shapes}]: {type(exc).__name__}: {exc}"


def _initializers(graph: onnx.GraphProto, source: str) -> dict[str, np.ndarray]:
    consts: dict[str, np.ndarray] = {}
    for tensor in graph.initializer:
        try:
            consts[tensor.name] = numpy_helper.to_array(tensor)
        except Exception as exc:
            raise InvalidModelError(
                f"{source}: initializer {tensor.name!r} cannot be read: {exc}"
            ) from None
    for sparse in graph.sparse_initializer:
        dense = numpy_helper.to_array(sparse.values)
        out = np.zeros(tuple(sparse.dims), dtype=dense.dtype)
        idx = numpy_helper.to_array(sparse.indices)
        if idx.ndim == 1:
            out.reshape(-1)[idx] = dense
        else:
            out[tuple(idx.T)] = dense
        consts[sparse.values.name] = out
    return consts


def _elem_dtype(elem_type: int) -> np.dtype | None:
    if elem_type == onnx.TensorProto.UNDEFINED:
        return None
    try:
        return np.dtype(helper.tensor_dtype_to_np_dtype(elem_type))
    except (KeyError, TypeError, ValueError):
        return None


def _type_of(type_proto: onnx.TypeProto) -> tuple[np.dtype | None, Shape | None]:
    if not type_proto.HasField("tensor_type"):
        return None, None
    tensor = type_proto.tensor_type
    dtype = _elem_dtype(tensor.elem_type)
    if not tensor.HasField("shape"):
        return dtype, None
    dims: list[int | str | None] = []
    for d in tensor.shape.dim:
        if d.HasField("dim_value"):
            dims.append(d.dim_value)
        elif d.HasField("dim_param"):
            dims.append(d.dim_param)
        else:
            dims.append(None)
    return dtype, tuple(dims)


def _tensor_info(vi: onnx.ValueInfoProto) -> TensorInfo:
    dtype, shape = _type_of(vi.type)
    return TensorInfo(vi.name, dtype, shape)


def inferred_types(model: onnx.ModelProto) -> dict[str, tuple[np.dtype | None, Shape | None]]:
    """Static dtypes/shapes of values, where ONNX shape inference can tell (best effort)."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    except Exception:
        inferred = model
    graph = inferred.graph
    return {
        vi.name: _type_of(vi.type)
        for vi in list(graph.input) + list(graph.value_info) + list(graph.output)
    }


def _topological_order(graph: onnx.GraphProto, known: set[str]) -> list[onnx.NodeProto]:
    """Nodes in an order where each runs after its producers; clear errors for bad graphs."""
    producers: dict[str, int] = {}
    for index, node in enumerate(graph.node):
        for out in node.output:
            if out:
                if out in producers or out in known - {""}:
                    raise InvalidModelError(
                        f"value {out!r} is produced twice (node {node.name!r} ({node.op_type}))"
                    )
                producers[out] = index
    outer = _outer_scope_names(graph)
    waiting: dict[int, int] = {}
    consumers: dict[int, list[int]] = {}
    ready: list[int] = []
    for index, node in enumerate(graph.node):
        deps = set()
        for name in list(node.input) + sorted(outer.get(index, ())):
            if name in known:
                continue
            if name not in producers:
                raise InvalidModelError(
                    f"node {node.name!r} ({node.op_type}) reads {name!r}, which is neither a "
                    "graph input, an initializer nor the output of any node"
                )
            deps.add(producers[name])
        waiting[index] = len(deps)
        for dep in deps:
            consumers.setdefault(dep, []).append(index)
        if not deps:
            ready.append(index)
    order: list[int] = []
    ready.reverse()
    while ready:
        index = ready.pop()
        order.append(index)
        for consumer in reversed(consumers.get(index, [])):
            waiting[consumer] -= 1
            if waiting[consumer] == 0:
                ready.append(consumer)
    if len(order) != len(graph.node):
        stuck = [graph.node[i] for i in range(len(graph.node)) if waiting[i] > 0]
        raise InvalidModelError(
            "graph has a cycle through node(s) "
            + ", ".join(f"{n.name!r} ({n.op_type})" for n in stuck[:5])
        )
    return [graph.node[i] for i in order]


def _outer_scope_names(graph: onnx.GraphProto) -> dict[int, set[str]]:
    """Values a node's subgraphs read from the enclosing graph (they are dependencies too)."""
    result: dict[int, set[str]] = {}
    for index, node in enumerate(graph.node):
        for attr in node.attribute:
            subgraphs = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)
            for sub in subgraphs:
                result.setdefault(index, set()).update(_free_names(sub))
    return result


def _free_names(graph: onnx.GraphProto) -> set[str]:
    defined = {i.name for i in graph.input} | {t.name for t in graph.initializer}
    used: set[str] = set()
    for node in graph.node:
        used.update(n for n in node.input if n)
        for attr in node.attribute:
            subs = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)
            for sub in subs:
                used.update(_free_names(sub))
        defined.update(node.output)
    used.update(o.name for o in graph.output)
    return used - defined
