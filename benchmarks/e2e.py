"""End-to-end latency: qlinear (optimized int8) vs onnxruntime on the same QDQ model.

For each zoo model at realistic size, batch 1 and 8: the QDQ model (onnxruntime
quantize_static, per-channel int8 weights, uint8 activations, BatchNorm folded first)
runs in onnxruntime; qlinear runs `qlinear.optimize` of it; qlinear fp32 runs the float
model. Every engine is timed alone in its own subprocess (idle spinning ORT threads
skew a shared process 2-4x) and the engines alternate over rounds. Prints medians and
ratios (ORT / qlinear: > 1 means qlinear is faster).

Usage: python benchmarks/e2e.py [--size realistic] [--models resnet,bert] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

MODELS = ("resnet", "mobilenet_v2", "bert", "vit")
CACHE = Path(tempfile.gettempdir()) / "qlinear-e2e"
ENGINES = ("qlinear-int8", "ort-qdq", "qlinear-fp32")
#: Models that also get a "qlinear-nhwc" column (layout="nhwc"; qlinear-int8 is layout="nchw").
CNNS = ("resnet", "mobilenet_v2")


def float_model(name: str, size: str) -> onnx.ModelProto:
    """The zoo model with BatchNorm folded (what a quantization pre-process does)."""
    from qlinear import zoo
    from qlinear.passes import fold_float

    return fold_float(zoo.build(name, size))


def qdq_model(name: str, size: str, activations: str = "uint8") -> onnx.ModelProto:
    """ORT quantize_static QDQ model, cached on disk (calibration is slow at full size)."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    from qlinear import zoo

    CACHE.mkdir(parents=True, exist_ok=True)
    path = CACHE / f"{name}_{size}_{activations}.qdq.onnx"
    if path.exists():
        return onnx.load(str(path))
    fp = float_model(name, size)
    fp_path = CACHE / f"{name}_{size}.float.onnx"
    onnx.save(fp, str(fp_path))
    batches = iter(zoo.calibration_batches(name, fp, n=2 if size != "small" else 4))

    class Reader(CalibrationDataReader):
        def get_next(self):  # noqa: ANN201 - ORT's interface
            return next(batches, None)

    act = QuantType.QUInt8 if activations == "uint8" else QuantType.QInt8
    quantize_static(
        str(fp_path),
        str(path),
        Reader(),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        activation_type=act,
        weight_type=QuantType.QInt8,
    )
    return onnx.load(str(path))


def _worker(engine: str, model_path: str, name: str, batch: int, iters: int) -> None:
    """Runs in its own process: load one engine, warm up, print per-run seconds as JSON."""
    from qlinear import zoo

    model = onnx.load(model_path)
    feeds = zoo.example_inputs(name, model, batch=batch)
    if engine == "ort-qdq":
        import onnxruntime as ort

        sess = ort.InferenceSession(model_path, providers=["CPUExecutionProvider"])
    else:
        from qlinear import Session

        # int8 models are optimized already (with a chosen layout): run them as they are
        sess = Session(model, optimize=engine == "qlinear-fp32")
    for _ in range(2):
        sess.run(None, feeds)
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        sess.run(None, feeds)
        times.append(time.perf_counter() - start)
    print(json.dumps(times))


def _time(engine: str, path: Path, name: str, batch: int, iters: int) -> list[float]:
    cmd = [sys.executable, __file__, "--worker", engine, str(path), name, str(batch), str(iters)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{engine} on {name} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="realistic")
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--worker", nargs=5, metavar=("ENGINE", "MODEL", "NAME", "B", "N"))
    args = parser.parse_args()
    if args.worker:
        engine, path, name, batch, iters = args.worker
        _worker(engine, path, name, int(batch), int(iters))
        return 0

    from qlinear.passes import optimize

    rows = []
    for name in args.models.split(","):
        qdq = qdq_model(name, args.size)
        paths = {
            "ort-qdq": CACHE / f"{name}_{args.size}_uint8.qdq.onnx",
            "qlinear-int8": CACHE / f"{name}_{args.size}_uint8.opt.onnx",
            "qlinear-fp32": CACHE / f"{name}_{args.size}.float.onnx",
        }
        onnx.save(optimize(qdq, layout="nchw"), str(paths["qlinear-int8"]))
        engines = ENGINES
        if name in CNNS:
            paths["qlinear-nhwc"] = CACHE / f"{name}_{args.size}_uint8.nhwc.onnx"
            onnx.save(optimize(qdq, layout="nhwc"), str(paths["qlinear-nhwc"]))
            engines = (*ENGINES, "qlinear-nhwc")
        for batch in (int(b) for b in args.batches.split(",")):
            times: dict[str, list[float]] = {e: [] for e in engines}
            for r in range(args.rounds):
                order = engines if r % 2 == 0 else tuple(reversed(engines))
                for engine in order:
                    times[engine] += _time(engine, paths[engine], name, batch, args.iters)
            med = {e: statistics.median(t) * 1e3 for e, t in times.items()}
            rows.append((name, batch, med))
            _print_row(name, batch, med)
    return 0


def _print_row(name: str, batch: int, med: dict[str, float]) -> None:
    q, o, f = med["qlinear-int8"], med["ort-qdq"], med["qlinear-fp32"]
    n = med.get("qlinear-nhwc")
    layout = f" | nhwc {n:9.2f} ms | nchw/nhwc {q / n:5.2f}x" if n else ""
    print(
        f"{name:<13} b={batch:<2} qlinear-int8 {q:9.2f} ms | ort-qdq {o:9.2f} ms | "
        f"ORT/qlinear {o / q:5.2f}x | qlinear fp32 {f:9.2f} ms | fp32/int8 {f / q:5.2f}x"
        f"{layout}",
        flush=True,
    )


if __name__ == "__main__":
    np.seterr(all="ignore")
    sys.exit(main())
