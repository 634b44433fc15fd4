"""`qlinear demo`: the whole pipeline on the bundled example model, no files needed.

float model (built in code) -> quantize (calibrated on synthetic data) -> optimize
(fused integer ops) -> run on qlinear's int8 kernels -> accuracy against the float
model on held-out inputs. Every file is written to `--out` so the user can open it.
"""

from __future__ import annotations

import argparse
import io
import time
from pathlib import Path

import numpy as np


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="run the whole pipeline on a bundled example model")
    p.add_argument("--model", default="resnet", help="zoo model: resnet, mobilenet_v2, bert, vit")
    p.add_argument("--out", default="qlinear-demo", help="folder for the demo's ONNX files")
    p.add_argument("--eval-batch", type=int, default=64, help="held-out inputs to score on")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from qlinear import Session, optimize, quantize, save_model, zoo
    from qlinear.passes import fusion_counts
    from qlinear.report.metrics import ErrorStats, format_db, is_classifier

    out = Path(args.out)
    name = args.model
    model = zoo.build(name, "small")
    float_path = save_model(model, out / f"{name}_float.onnx")
    print(
        f"1. built zoo model {name!r} (small): {len(model.graph.node)} nodes, "
        f"{zoo.count_params(model):,} parameters -> {float_path}"
    )

    calibration = zoo.calibration_batches(name, model, n=16, batch=8, seed=0)
    start = time.perf_counter()
    qdq = quantize(model, calibration)
    qdq_path = save_model(qdq, out / f"{name}_qdq.onnx")
    print(
        f"2. quantized (static, 16x8 calibration samples) in "
        f"{time.perf_counter() - start:.1f} s -> {qdq_path}"
    )

    fused = optimize(qdq)
    fused_path = save_model(fused, out / f"{name}_int8.onnx")
    counts = fusion_counts(qdq, fused)
    print(
        f"3. optimized: {counts['fused']} of {counts['linear']} Conv/MatMul/Gemm fused into "
        f"integer ops, {counts['left_float']} left float -> {fused_path}"
    )

    feeds = zoo.example_inputs(name, model, batch=args.eval_batch, seed=1)
    _save_npz(out / "calib.npz", {k: np.concatenate([b[k] for b in calibration]) for k in feeds})
    _save_npz(out / "eval.npz", feeds)
    float_session = Session(float_path)
    int8_session = Session(fused_path, optimize=False)
    expected = float_session.run(None, feeds)
    int8_session.run(None, feeds)  # first call loads compiled kernels from the disk cache
    t_float = _median_ms(float_session, feeds)
    t_int8 = _median_ms(int8_session, feeds)
    got = int8_session.run(None, feeds)
    print(
        f"4. ran {args.eval_batch} held-out inputs: float {t_float:.1f} ms, "
        f"int8 {t_int8:.1f} ms per batch; ops in onnx.reference: "
        f"{', '.join(int8_session.fallback_ops) or 'none'}"
    )
    for info, ref, test in zip(int8_session.get_outputs(), expected, got, strict=True):
        stats = ErrorStats().update(ref, test, classifier=is_classifier(ref))
        line = (
            f"   {info.name}: SQNR {format_db(stats.sqnr_db)} dB, "
            f"cosine {stats.cosine:.5f}, max abs error {stats.max_abs:.4g}"
        )
        if stats.top1_total:
            line += f", top-1 agreement {stats.top1_hits / stats.top1_total:.1%}"
        print(line)
    print(
        f"next: qlinear compare {float_path} {qdq_path} --data {out / 'eval.npz'} "
        f"--report {out / 'report'}"
    )
    return 0


def _save_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Data in the format every command's --calib/--data takes (arrays keyed by input name)."""
    from qlinear.onnx_io import atomic_write

    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    atomic_write(path, buffer.getvalue())


def _median_ms(session: object, feeds: dict[str, np.ndarray], runs: int = 5) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        session.run(None, feeds)  # type: ignore[attr-defined]
        times.append(time.perf_counter() - start)
    return float(np.median(times) * 1e3)
