"""Per zoo model: Conv/MatMul/Gemm nodes fused vs left float after `qlinear.optimize`.

Quantizes each small zoo model to QDQ with onnxruntime's quantize_static (per-channel
int8 weights, uint8 and int8 activations; BatchNorm folded first), then optimizes.
Usage: python scripts/fusion_counts.py [--size small|realistic]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.e2e import MODELS, qdq_model  # noqa: E402
from qlinear.passes import fusion_counts, optimize  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="small")
    args = parser.parse_args()
    print(f"{'model':<14}{'acts':<6}{'linear':>8}{'fused':>8}{'float':>8}")
    for name in MODELS:
        for act in ("uint8", "int8"):
            qdq = qdq_model(name, args.size, act)
            counts = fusion_counts(qdq, optimize(qdq))
            print(f"{name:<14}{act:<6}{counts['linear']:>8}{counts['fused']:>8}"
                  f"{counts['left_float']:>8}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
