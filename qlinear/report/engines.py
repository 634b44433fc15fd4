"""Run a model with qlinear or onnxruntime and fetch any value, intermediate ones too.

qlinear's Session returns any value by name. onnxruntime only returns graph
outputs, so the ORT runner adds the requested values as outputs of a copy of the
model (types from shape inference).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import onnx
from onnx import helper

from qlinear.data import model_inputs
from qlinear.runtime.session import TensorInfo

ENGINES = ("qlinear", "onnxruntime")


class Runner:
    """One model on one engine, able to return `extra` intermediate values."""

    def __init__(
        self,
        model: onnx.ModelProto,
        engine: str = "qlinear",
        extra: Sequence[str] = (),
        threads: int | None = None,
    ) -> None:
        if engine not in ENGINES:
            raise ValueError(f"unknown engine {engine!r}; choose one of {', '.join(ENGINES)}")
        self.engine = engine
        self.output_names = [o.name for o in model.graph.output]
        if engine == "qlinear":
            from qlinear import Session

            # Compare the graphs as given: per-layer matching needs their own tensors, and
            # comparing before/after optimization is done on two files explicitly.
            self._session = Session(model, num_threads=threads, optimize=False)
            self.inputs: list[TensorInfo] = self._session.get_inputs()
        else:
            import onnxruntime as ort

            options = ort.SessionOptions()
            options.log_severity_level = 3
            if threads:
                options.intra_op_num_threads = threads
                options.inter_op_num_threads = 1
            exposed = expose_outputs(model, extra)
            self._session = ort.InferenceSession(
                exposed.SerializeToString(), options, providers=["CPUExecutionProvider"]
            )
            self.inputs = model_inputs(model)

    def run(self, names: Sequence[str], feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Values by name (deduplicated) for one batch of feeds."""
        unique = list(dict.fromkeys(names))
        fetch = [n for n in unique if n not in feeds]  # ORT cannot return a graph input
        values = self._session.run(fetch, dict(feeds)) if fetch else []
        result = dict(zip(fetch, (np.asarray(v) for v in values), strict=True))
        return {n: result[n] if n in result else np.asarray(feeds[n]) for n in unique}


def expose_outputs(model: onnx.ModelProto, names: Sequence[str]) -> onnx.ModelProto:
    """A copy of `model` whose graph outputs also include `names`."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    present = {o.name for o in copy.graph.output} | {i.name for i in copy.graph.input}
    wanted = [n for n in dict.fromkeys(names) if n not in present]
    if not wanted:
        return copy
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False).graph.value_info
    except Exception:
        inferred = []
    types = {vi.name: vi for vi in inferred}
    for name in wanted:
        vi = types.get(name)
        if vi is not None and vi.type.tensor_type.elem_type:
            out = onnx.ValueInfoProto()
            out.CopyFrom(vi)
            del out.type.tensor_type.shape.dim[:]
            out.type.tensor_type.ClearField("shape")
            copy.graph.output.append(out)
        else:
            copy.graph.output.append(helper.make_tensor_value_info(name, 0, None))
    return copy
