"""Per zoo model: Conv/MatMul/Gemm nodes fused vs left float after `qlinear.optimize`.

Quantizes each zoo model to QDQ twice, with onnxruntime's quantize_static (per-channel
int8 weights; BatchNorm folded first) and with qlinear's own quantizer (defaults), for
uint8 and int8 activations, then optimizes.
Usage: python scripts/fusion_counts.py [--size small|realistic]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import onnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.e2e import MODELS, qdq_model  # noqa: E402
from qlinear.passes import fusion_counts, optimize  # noqa: E402


def _qlinear_qdq(name: str, size: str, activations: str) -> onnx.ModelProto:
    from qlinear import QuantConfig, quantize, zoo

    model = zoo.build(name, size)
    calib = zoo.calibration_batches(name, model, n=4, batch=2)
    return quantize(model, calib, QuantConfig(activation_type=activations))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="small")
    args = parser.parse_args()
    print(f"{'model':<14}{'quantizer':<11}{'acts':<6}{'linear':>8}{'fused':>8}{'float':>8}")
    for name in MODELS:
        for act in ("uint8", "int8"):
            for quantizer, qdq in (
                ("ort", qdq_model(name, args.size, act)),
                ("qlinear", _qlinear_qdq(name, args.size, act)),
            ):
                counts = fusion_counts(qdq, optimize(qdq))
                print(
                    f"{name:<14}{quantizer:<11}{act:<6}{counts['linear']:>8}"
                    f"{counts['fused']:>8}{counts['left_float']:>8}"
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
