"""`compare`: run two models on the same data and measure how far B's values are from A's.

A is the reference (usually the float model), B the candidate (its QDQ or fused
version). Per graph output: SQNR, cosine, max abs error, top-1 agreement for
classifier outputs. Per layer (tensors matched by ``matching``): the accumulated
error (B's full run vs A) and the error the layer adds on its own (``isolate``).
Metrics accumulate over all batches (``metrics.ErrorStats``).
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx

from qlinear.data import DataLike, iter_batches
from qlinear.errors import InputError
from qlinear.onnx_io import ModelLike, load_model
from qlinear.report.engines import Runner
from qlinear.report.isolate import isolate
from qlinear.report.matching import LayerMatch, WeightInfo, build_view, layer_weight, match_layers
from qlinear.report.metrics import ErrorStats, is_classifier, outlier_ratio

#: Values kept per layer for histograms and percentiles (memory stays bounded).
SAMPLE_SIZE = 20_000


@dataclass
class OutputResult:
    name: str
    stats: ErrorStats
    classifier: bool
    shape: tuple[int, ...]


@dataclass
class LayerResult:
    """One matched tensor: accumulated and own error plus statistics for suggestions."""

    match: LayerMatch
    accumulated: ErrorStats = field(default_factory=ErrorStats)
    own: ErrorStats = field(default_factory=ErrorStats)
    shape: tuple[int, ...] = ()
    float_sample: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    quant_sample: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    peak: float = 0.0  # max |float value| over all batches
    weight: WeightInfo | None = None

    @property
    def name(self) -> str:
        return self.match.key

    @property
    def outlier_ratio(self) -> float:
        """max|x| / p99.9(|x|) of the float activation (exact max, sampled percentile)."""
        if self.float_sample.size == 0:
            return 1.0
        sample = np.append(self.float_sample, self.peak)
        return outlier_ratio(sample)

    def add_sample(self, ref: np.ndarray, test: np.ndarray) -> None:
        room = SAMPLE_SIZE - self.float_sample.size
        flat_r = ref.reshape(-1)
        self.peak = max(self.peak, float(np.nanmax(np.abs(flat_r))) if flat_r.size else 0.0)
        if room <= 0 or flat_r.size == 0:
            return
        step = max(1, flat_r.size // room)
        pick = slice(0, room * step, step)
        self.float_sample = np.concatenate([self.float_sample, flat_r[pick].astype(np.float32)])
        self.quant_sample = np.concatenate(
            [self.quant_sample, test.reshape(-1)[pick].astype(np.float32)]
        )


@dataclass
class CompareResult:
    model_a: str
    model_b: str
    engines: tuple[str, str]
    batches: int
    samples: int
    outputs: list[OutputResult]
    layers: list[LayerResult]  # in B's topological order
    unmatched: int = 0  # float tensors of B with no counterpart in A

    def worst_layers(self, count: int | None = None) -> list[LayerResult]:
        """Layers by own SQNR, worst first (ties: accumulated SQNR, then graph order)."""
        ranked = sorted(
            self.layers,
            key=lambda r: (r.own.sqnr_db, r.accumulated.sqnr_db, r.match.position),
        )
        return ranked if count is None else ranked[:count]

    def to_dict(self) -> dict[str, Any]:
        """Machine-readable form with stable keys (non-finite numbers become strings)."""
        from qlinear.report.suggest import suggest

        return {
            "model_a": self.model_a,
            "model_b": self.model_b,
            "engines": {"a": self.engines[0], "b": self.engines[1]},
            "batches": self.batches,
            "samples": self.samples,
            "outputs": [
                {"name": o.name, "shape": list(o.shape), **_stats_dict(o.stats)}
                for o in self.outputs
            ],
            "layers": [_layer_dict(r) for r in self.worst_layers()],
            "unmatched_tensors": self.unmatched,
            "suggestions": [s.to_dict() for s in suggest(self)],
        }


def _num(value: float | None) -> float | str | None:
    if value is None:
        return None
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    if math.isnan(value):
        return "nan"
    return round(value, 6)


def _stats_dict(s: ErrorStats) -> dict[str, Any]:
    return {
        "sqnr_db": _num(s.sqnr_db),
        "exact": s.exact,
        "cosine": _num(s.cosine),
        "max_abs_error": _num(s.max_abs),
        "top1_agreement": _num(s.top1),
        "nonfinite": s.nonfinite,
    }


def _layer_dict(r: LayerResult) -> dict[str, Any]:
    m = r.match
    return {
        "tensor": m.key,
        "tensor_b": m.key_b,
        "value_b": m.b.name,
        "node_b": m.node_b,
        "op_a": m.op_a,
        "op_b": m.op_b,
        "matched_by": m.how,
        "position": m.position,
        "shape": list(r.shape),
        "own": _stats_dict(r.own),
        "accumulated": _stats_dict(r.accumulated),
        "activation_outlier_ratio": _num(r.outlier_ratio),
    }


def compare(
    model_a: ModelLike,
    model_b: ModelLike,
    data: DataLike,
    *,
    batch_size: int | None = None,
    max_batches: int | None = None,
    per_layer: bool = True,
    engine_a: str = "qlinear",
    engine_b: str = "qlinear",
    threads: int | None = None,
    progress: bool = False,
) -> CompareResult:
    """Run A (reference) and B on the same batches; per-output and per-layer errors."""
    proto_a, proto_b = load_model(model_a), load_model(model_b)
    matches = match_layers(proto_a, proto_b) if per_layer else []
    runner_a = Runner(proto_a, engine_a, [m.a.name for m in matches], threads)
    runner_b = Runner(proto_b, engine_b, [m.b.name for m in matches], threads)
    _check_same_inputs(runner_a, runner_b)
    cut_runner: Runner | None = None
    cut_feeds: dict[str, str] = {}
    outputs_a, outputs_b = runner_a.output_names, runner_b.output_names
    if len(outputs_a) != len(outputs_b):
        raise InputError(
            f"models have different numbers of outputs ({len(outputs_a)} vs {len(outputs_b)})"
        )
    out_pairs = (
        list(zip(outputs_a, outputs_a, strict=True))
        if set(outputs_a) == set(outputs_b)
        else list(zip(outputs_a, outputs_b, strict=True))
    )
    out_results = [OutputResult(a, ErrorStats(), False, ()) for a, _ in out_pairs]
    view_b = build_view(proto_b) if matches else None
    layers = [LayerResult(m) for m in matches]
    for layer in layers:
        assert view_b is not None
        layer.weight = layer_weight(view_b, layer.match.key_b)
    batches = iter_batches(data, runner_a.inputs, batch_size, max_batches)
    batch_count = samples = 0
    for feeds in _progress(batches, progress):
        values_a = runner_a.run(list(outputs_a) + [m.a.name for m in matches], feeds)
        values_b = runner_b.run(list(outputs_b) + [m.b.name for m in matches], feeds)
        for result, (name_a, name_b) in zip(out_results, out_pairs, strict=True):
            ref, test = values_a[name_a], values_b[name_b]
            if batch_count == 0:
                result.classifier = is_classifier(ref)
            result.shape = tuple(ref.shape)
            result.stats.update(ref, test, classifier=result.classifier)
        if layers:
            float_values = {m.key: m.a.resolve(values_a[m.a.name]) for m in matches}
            if cut_runner is None:
                # Cut B only where A's value can stand in for B's: a value B holds in
                # another layout (NHWC after the layout pass) has another shape.
                fits = [
                    m
                    for m in matches
                    if float_values[m.key].shape == m.b.resolve(values_b[m.b.name]).shape
                ]
                cut, cut_feeds = isolate(proto_b, fits)
                cut_runner = Runner(cut, engine_b, [m.b.name for m in matches], threads)
            cut_in = dict(feeds)
            for feed, key in cut_feeds.items():
                cut_in[feed] = np.asarray(float_values[key], dtype=np.float32)
            own = cut_runner.run([m.b.name for m in matches], cut_in)
            for layer in layers:
                m = layer.match
                ref = float_values[m.key]
                test = m.b.resolve(values_b[m.b.name])
                if ref.shape != test.shape:
                    continue  # e.g. a layout change the mapping did not describe
                layer.shape = tuple(ref.shape)
                layer.accumulated.update(ref, test)
                layer.own.update(ref, m.b.resolve(own[m.b.name]))
                layer.add_sample(ref, test)
        batch_count += 1
        samples += len(next(iter(feeds.values()))) if feeds else 0
    return CompareResult(
        model_a=_label(model_a, "A"),
        model_b=_label(model_b, "B"),
        engines=(engine_a, engine_b),
        batches=batch_count,
        samples=samples,
        outputs=out_results,
        layers=[r for r in layers if r.shape],
        unmatched=len(view_b.refs) - len(matches) if view_b is not None else 0,
    )


def _check_same_inputs(a: Runner, b: Runner) -> None:
    names_a = {i.name for i in a.inputs}
    names_b = {i.name for i in b.inputs}
    if names_a != names_b:
        raise InputError(
            f"the models take different inputs: A has {sorted(names_a)}, B has {sorted(names_b)}"
        )


def _progress(batches: Any, enabled: bool) -> Any:
    if not enabled or not sys.stderr.isatty():
        return batches
    from tqdm import tqdm

    try:
        total = len(batches)
    except TypeError:
        total = None
    return tqdm(batches, total=total, desc="compare", unit="batch", file=sys.stderr)


def _label(model: ModelLike, default: str) -> str:
    if isinstance(model, onnx.ModelProto):
        return model.graph.name or default
    if isinstance(model, (bytes, bytearray, memoryview)):
        return default
    return str(model)
