"""qlinear.quantize vs onnxruntime.quantization.quantize_static on zoo models.

Same seeded synthetic calibration data, comparable settings (QDQ, per-channel
symmetric int8 weights, asymmetric uint8 activations); both QDQ models are evaluated
with onnxruntime so the engine is identical. Each quantizer runs in its own
subprocess so its wall time and peak RSS are its own.

    python benchmarks/quantizer_accuracy.py [--size small|realistic] [--models resnet,bert]
        [--calib-batches 16] [--batch 4] [--tools] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

MODELS = ("resnet", "mobilenet_v2", "bert", "vit")
CLASSIFIERS = {"resnet", "mobilenet_v2", "vit"}


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _worker(args: argparse.Namespace) -> None:
    """Quantize one model with one tool; print a JSON line with time and memory."""
    import onnx

    from qlinear import zoo

    model = onnx.load(args.model_path)
    calib = zoo.calibration_batches(args.name, model, n=args.calib_batches, batch=args.batch)
    # import each tool before the clock and the memory baseline start (imports are not work)
    if args.tool == "ort":
        import onnxruntime.quantization  # noqa: F401
    else:
        import qlinear.quantizer  # noqa: F401
        import qlinear.runtime  # noqa: F401
    del model
    base = _rss_mb()
    start = time.perf_counter()
    if args.tool == "ort":
        from onnxruntime.quantization import (
            CalibrationDataReader,
            QuantFormat,
            QuantType,
            quantize_static,
        )

        class Reader(CalibrationDataReader):
            def __init__(self) -> None:
                self.it = iter(calib)

            def get_next(self):  # noqa: ANN202
                return next(self.it, None)

        quantize_static(
            args.model_path,
            args.out,
            Reader(),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
        )
    else:
        from qlinear.quantizer import (
            QuantConfig,
            SensitivityConfig,
            SmoothQuantConfig,
            quantize,
        )

        config = QuantConfig(progress=False)
        if args.tool == "qlinear+tools":
            config = QuantConfig(
                progress=False,
                bias_correction=True,
                smoothquant=SmoothQuantConfig(0.5) if args.name in ("bert", "vit") else None,
            )
        elif args.tool == "qlinear+keep2":
            config = QuantConfig(
                progress=False,
                bias_correction=True,
                sensitivity=SensitivityConfig(keep_float=2, batches=2),
            )
        onnx.save(quantize(args.model_path, calib, config), args.out)
    elapsed = time.perf_counter() - start
    print(json.dumps({"seconds": elapsed, "peak_mb": _rss_mb() - base}))


def _metrics(float_out: list[np.ndarray], q_out: list[np.ndarray], classifier: bool) -> dict:
    a = np.concatenate([o.reshape(-1).astype(np.float64) for o in float_out])
    b = np.concatenate([o.reshape(-1).astype(np.float64) for o in q_out])
    noise = np.sum((a - b) ** 2)
    result = {
        "sqnr_db": float(10 * np.log10(np.sum(a**2) / max(noise, 1e-30))),
        "cosine": float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-30)),
    }
    if classifier:
        result["top1"] = float(np.mean(np.argmax(float_out[0], -1) == np.argmax(q_out[0], -1)))
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", default="small")
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--calib-batches", type=int, default=16)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--eval-batch", type=int, default=64)
    p.add_argument(
        "--tools",
        action="store_true",
        help="also run qlinear with bias correction + SmoothQuant, and keeping 2 layers float",
    )
    p.add_argument("--json")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--tool", help=argparse.SUPPRESS)
    p.add_argument("--name", help=argparse.SUPPRESS)
    p.add_argument("--model-path", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        _worker(args)
        return

    import onnx
    import onnxruntime as ort

    from qlinear import zoo

    tools = ["qlinear", "ort"] + (["qlinear+tools", "qlinear+keep2"] if args.tools else [])
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            model = zoo.build(name, args.size)
            path = os.path.join(tmp, f"{name}.onnx")
            onnx.save(model, path)
            feeds = zoo.example_inputs(name, model, batch=args.eval_batch, seed=123)
            opts = ort.SessionOptions()
            opts.log_severity_level = 3
            ref = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
            float_out = ref.run(None, feeds)
            for tool in tools:
                out = os.path.join(tmp, f"{name}.{tool}.onnx")
                cmd = [
                    sys.executable,
                    __file__,
                    "--worker",
                    "--tool",
                    tool,
                    "--name",
                    name,
                    "--model-path",
                    path,
                    "--out",
                    out,
                    "--calib-batches",
                    str(args.calib_batches),
                    "--batch",
                    str(args.batch),
                ]
                proc = subprocess.run(cmd, capture_output=True, text=True)  # noqa: S603
                if proc.returncode:
                    print(f"{name} {tool} failed:\n{proc.stderr[-2000:]}", file=sys.stderr)
                    continue
                info = json.loads(proc.stdout.strip().splitlines()[-1])
                sess = ort.InferenceSession(out, opts, providers=["CPUExecutionProvider"])
                row = {
                    "model": name,
                    "tool": tool,
                    **info,
                    **_metrics(float_out, sess.run(None, feeds), name in CLASSIFIERS),
                }
                rows.append(row)
                print(_fmt(row), flush=True)
    print()
    print(_table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


def _fmt(row: dict) -> str:
    top1 = f"{row['top1']:.3f}" if "top1" in row else "-"
    return (
        f"| {row['model']:<12} | {row['tool']:<13} | {row['sqnr_db']:6.2f} | "
        f"{row['cosine']:.5f} | {top1:>5} | {row['seconds']:6.2f} | {row['peak_mb']:7.1f} |"
    )


def _table(rows: list[dict]) -> str:
    head = (
        "| model        | quantizer     | SQNR dB | cosine  | top-1 | time s | peak MB |\n"
        "|--------------|---------------|--------|---------|-------|--------|---------|"
    )
    return "\n".join([head] + [_fmt(r) for r in rows])


if __name__ == "__main__":
    main()
