"""`quantize(model, calibration_data, config)`: float ONNX + data -> QDQ ONNX.

Pipeline: prepare (float pre-passes) -> [SmoothQuant] -> one streaming calibration
pass (histograms per candidate tensor) -> plan -> [bias correction] ->
[sensitivity: keep the worst layers float] -> emit Q/DQ. The output opset is the
model's own (at least 13), or 21 when int4/int16 or blockwise weights are asked for.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np
import onnx

from qlinear.calibration import ChannelStats, TensorStats, collect, compute_range
from qlinear.calibration.collect import check_reiterable
from qlinear.errors import QlinearError
from qlinear.onnx_io import ModelLike, load_model
from qlinear.quant import QuantParams, choose_qparams
from qlinear.quantizer.config import QuantConfig
from qlinear.quantizer.plan import (
    GraphIndex,
    Plan,
    additive_mask_tensors,
    candidate_tensors,
    make_plan,
)
from qlinear.quantizer.prepare import prepare
from qlinear.quantizer.static import WeightOptions, emit_static

CalibrationData = (
    str | os.PathLike | Iterable[Mapping[str, np.ndarray]] | Callable[[], Iterable[Any]]
)


def quantize(
    model: ModelLike,
    calibration_data: CalibrationData | None = None,
    config: QuantConfig | None = None,
    *,
    batch_size: int | None = None,
    statistics: Mapping[str, TensorStats] | None = None,
) -> onnx.ModelProto:
    """Quantize `model` (path, bytes or ModelProto; never modified) and return QDQ ONNX.

    `calibration_data`: an iterable of feed dicts (input name -> array), a callable
    returning one (needed when SmoothQuant/sensitivity read the data twice), or a
    dataset path in qlinear.data's format (cut into `batch_size` batches). Not needed
    for ``mode="dynamic"``, nor when `statistics` (from `calibrate` on shards, merged
    with ``qlinear.calibration.merge_all``) are given.
    """
    config = config or QuantConfig()
    source = load_model(model)
    float_model = prepare(
        source, opset=21 if config.needs_opset21 else None, fold_bn=config.fold_batchnorm
    )
    if config.mode == "dynamic":
        from qlinear.quantizer.dynamic import quantize_dynamic

        return quantize_dynamic(float_model, config, _weight_options(config))
    if statistics is not None:
        return _from_statistics(float_model, statistics, config)
    if calibration_data is None:
        raise ValueError("static quantization needs calibration_data (or use mode='dynamic')")
    from qlinear.runtime import Session

    data = _data_source(calibration_data, float_model, batch_size)
    if config.smoothquant is not None:
        from qlinear.quantizer.smoothquant import smooth

        _check_reiterable(calibration_data, "SmoothQuant")
        float_model = smooth(float_model, data, config)
    if config.sensitivity is not None:
        _check_reiterable(calibration_data, "sensitivity analysis")

    index = GraphIndex(float_model)
    session = Session(float_model, optimize=False)
    channel_axes = _bias_inputs(index) if config.bias_correction else {}
    stats, channels = collect(
        session,
        data(),
        candidate_tensors(index),
        channel_tensors=channel_axes,
        num_bins=config.num_bins,
        progress=config.progress,
    )
    state = _State(config, stats, additive_mask_tensors(index))
    plan = state.plan(index)
    if config.bias_correction:
        from qlinear.quantizer.bias_correction import correct_biases

        float_model = correct_biases(float_model, plan, channels, _weight_options(config))
        index = GraphIndex(float_model)
        plan = state.plan(index)
    if config.sensitivity is not None:
        from qlinear.quantizer.sensitivity import choose_float_nodes

        keep = choose_float_nodes(float_model, index, state, data, config.sensitivity)
        state.extra_excluded.update(keep)
        plan = state.plan(index)
    return emit_static(float_model, plan, state.params(plan), _weight_options(config))


def calibrate(
    model: ModelLike,
    calibration_data: CalibrationData,
    config: QuantConfig | None = None,
    *,
    batch_size: int | None = None,
) -> dict[str, TensorStats]:
    """Statistics of one data shard; merge shards with `merge_all`, pass as `statistics`."""
    from qlinear.runtime import Session

    config = config or QuantConfig()
    float_model = prepare(
        load_model(model),
        opset=21 if config.needs_opset21 else None,
        fold_bn=config.fold_batchnorm,
    )
    data = _data_source(calibration_data, float_model, batch_size)
    index = GraphIndex(float_model)
    stats, _ = collect(
        Session(float_model, optimize=False),
        data(),
        candidate_tensors(index),
        num_bins=config.num_bins,
        progress=config.progress,
    )
    return stats


def _from_statistics(
    float_model: onnx.ModelProto, statistics: Mapping[str, TensorStats], config: QuantConfig
) -> onnx.ModelProto:
    if config.smoothquant or config.bias_correction or config.sensitivity:
        raise QlinearError(
            "SmoothQuant, bias correction and sensitivity read the data; pass "
            "calibration_data instead of statistics"
        )
    index = GraphIndex(float_model)
    state = _State(config, statistics, additive_mask_tensors(index))
    plan = state.plan(index)
    return emit_static(float_model, plan, state.params(plan), _weight_options(config))


class _State:
    """Calibration results + options -> plans and activation parameters (re-plannable)."""

    def __init__(
        self,
        config: QuantConfig,
        stats: Mapping[str, TensorStats],
        masks: Iterable[str] = (),
    ) -> None:
        self.config = config
        self.stats = stats
        self.masks = set(masks)
        self.extra_excluded: set[str] = set()
        self._cache: dict[str, QuantParams] = {}

    def float_tensor(self, name: str) -> bool:
        s = self.stats.get(name)
        return (
            name in self.config.keep_float_tensors
            or name in self.masks
            or s is None
            or s.count == 0
            or s.has_sentinels
            or s.nonfinite > 0
        )

    def excluded(self, node: onnx.NodeProto) -> bool:
        c = self.config
        return (
            node.name in c.exclude_nodes
            or node.op_type in c.exclude_op_types
            or node.name in self.extra_excluded
        )

    def plan(self, index: GraphIndex, only_nodes: Iterable[str] | None = None) -> Plan:
        return make_plan(
            index,
            excluded=self.excluded,
            float_tensor=self.float_tensor,
            quantize_constant_operands=self.config.quantize_constant_operands,
            float_residual_adds=self.config.float_residual_adds,
            only_nodes=only_nodes,
        )

    def act_params(self, root: str) -> QuantParams:
        if root not in self._cache:
            c = self.config
            lo, hi = compute_range(
                self.stats[root],
                c.calibration,
                c.activation_dtype,
                symmetric=c.activation_symmetric,
                percentile=c.percentile,
            )
            self._cache[root] = choose_qparams(
                lo, hi, c.activation_dtype, symmetric=c.activation_symmetric
            )
        return self._cache[root]

    def params(self, plan: Plan) -> dict[str, QuantParams]:
        return {name: self.act_params(root) for name, root in plan.activations.items()}

    def weight_options(self) -> WeightOptions:
        return _weight_options(self.config)


def _weight_options(config: QuantConfig) -> WeightOptions:
    return WeightOptions(
        dtype=config.weight_dtype,
        granularity=config.weight_granularity,
        symmetric=config.weight_symmetric,
        block_size=config.block_size,
        activation_dtype=config.activation_dtype,
        activation_symmetric=config.activation_symmetric,
    )


def _bias_inputs(index: GraphIndex) -> dict[str, int]:
    """Inputs of Conv/Gemm/MatMul whose per-channel means bias correction needs -> channel axis."""
    axes: dict[str, int] = {}
    for node in index.nodes:
        if node.op_type == "Conv" and index.activation(node.input[0]):
            axes.setdefault(node.input[0], 1)
        elif node.op_type in ("Gemm", "MatMul") and index.activation(node.input[0]):
            axes.setdefault(node.input[0], -1)
    return axes


def _check_reiterable(data: CalibrationData, what: str) -> None:
    if not callable(data) and not isinstance(data, (str, os.PathLike)):
        check_reiterable(data, what)


def _data_source(
    data: CalibrationData, model: onnx.ModelProto, batch_size: int | None
) -> Callable[[], Iterable[Mapping[str, np.ndarray]]]:
    """A zero-argument callable giving the batches (a fresh iterator per call if it can)."""
    if isinstance(data, (str, os.PathLike)):
        from qlinear.data import iter_batches

        batches = iter_batches(data, model, batch_size)
        return lambda: batches
    if isinstance(data, Mapping):
        raise QlinearError(
            "calibration_data is a single dict; pass a list of feed dicts (one per batch)"
        )
    if callable(data):
        return data  # type: ignore[return-value]
    if not isinstance(data, Iterable):
        raise TypeError(
            f"calibration_data must be an iterable of feed dicts, got {type(data).__name__}"
        )
    return lambda: data  # type: ignore[return-value]


__all__ = ["CalibrationData", "ChannelStats", "calibrate", "quantize"]
