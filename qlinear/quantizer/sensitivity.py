"""Per-layer sensitivity: which quantized layers hurt the model output most.

Each quantizable compute node is quantized *alone* and the model output's SQNR
against float is measured on a few calibration batches (qlinear.Session); the lower
the SQNR, the more sensitive the layer. The worst ``keep_float`` layers stay float,
or, with ``target_sqnr``, the worst layers are kept float one by one until the fully
quantized model reaches the target.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from itertools import islice
from typing import Any

import numpy as np
import onnx

from qlinear.quantizer.plan import DATA_MOVEMENT, GraphIndex
from qlinear.quantizer.static import emit_static


@dataclass(frozen=True)
class LayerSensitivity:
    node: str
    op_type: str
    sqnr_db: float


def sqnr_db(reference: list[np.ndarray], test: list[np.ndarray]) -> float:
    """Signal-to-quantization-noise ratio over all outputs (inf when identical)."""
    ref = np.concatenate([r.reshape(-1).astype(np.float64) for r in reference])
    err = ref - np.concatenate([t.reshape(-1).astype(np.float64) for t in test])
    noise = float(np.sum(err**2))
    return float("inf") if noise == 0 else float(10 * np.log10(np.sum(ref**2) / noise))


class _Evaluator:
    def __init__(self, float_model: onnx.ModelProto, batches: list[Mapping[str, np.ndarray]]):
        from qlinear.runtime import Session

        self.batches = batches
        session = Session(float_model, optimize=False)
        self.reference = [o for b in batches for o in session.run(None, b)]

    def __call__(self, model: onnx.ModelProto) -> float:
        from qlinear.runtime import Session

        session = Session(model, optimize=False)
        return sqnr_db(self.reference, [o for b in self.batches for o in session.run(None, b)])


def rank_layers(
    float_model: onnx.ModelProto,
    index: GraphIndex,
    state: Any,
    batches: list[Mapping[str, np.ndarray]],
) -> list[LayerSensitivity]:
    """Quantizable compute layers, most sensitive (lowest SQNR) first."""
    evaluate = _Evaluator(float_model, batches)
    full = state.plan(index)
    ops = {n.name: n.op_type for n in index.nodes}
    result = []
    for name in full.nodes:
        if ops[name] in DATA_MOVEMENT and ops[name] != "Gather":
            continue
        plan = state.plan(index, only_nodes=[name])
        model = emit_static(float_model, plan, state.params(plan), state.weight_options())
        result.append(LayerSensitivity(name, ops[name], evaluate(model)))
    return sorted(result, key=lambda r: r.sqnr_db)


def choose_float_nodes(
    float_model: onnx.ModelProto,
    index: GraphIndex,
    state: Any,
    data: Callable[[], Iterable[Mapping[str, np.ndarray]]],
    config: Any,
) -> set[str]:
    """Node names to keep float per `config` (a SensitivityConfig)."""
    batches = list(islice(iter(data()), max(1, config.batches)))
    ranking = rank_layers(float_model, index, state, batches)
    if config.target_sqnr is None:
        return {r.node for r in ranking[: config.keep_float]}
    evaluate = _Evaluator(float_model, batches)
    chosen: set[str] = set()
    for layer in [None, *ranking]:
        if layer is not None:
            chosen.add(layer.node)
        state.extra_excluded.update(chosen)
        plan = state.plan(index)
        state.extra_excluded.difference_update(chosen)
        model = emit_static(float_model, plan, state.params(plan), state.weight_options())
        if evaluate(model) >= config.target_sqnr:
            break
        if config.keep_float and len(chosen) >= config.keep_float:
            break
    return chosen
