"""Per zoo CNN: operators run channels-last and Transposes left after `optimize(layout="nhwc")`.

Quantizes each zoo CNN to QDQ with onnxruntime's quantize_static (as fusion_counts.py
does), optimizes with ``layout="nhwc"`` and counts NHWC operators and Transposes
(the pass's boundary cost; ideally one, after the input QuantizeLinear).
Usage: python scripts/layout_counts.py [--size small|realistic]
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

import onnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.e2e import qdq_model  # noqa: E402
from qlinear.passes import optimize  # noqa: E402

CNNS = ("resnet", "mobilenet_v2")
_NHWC_OPS = {
    ("com.microsoft", "QLinearConv"),
    ("com.microsoft", "NhwcMaxPool"),
    ("com.microsoft", "QLinearGlobalAveragePool"),
    ("ai.qlinear", "ConvInteger"),
}


def layout_counts(model: onnx.ModelProto) -> dict[str, int]:
    """Channels-last operators, ONNX (NCHW) QLinearConv left, and Transposes in `model`."""
    ops = Counter((n.domain, n.op_type) for n in model.graph.node)
    return {
        "nhwc_ops": sum(ops[k] for k in _NHWC_OPS),
        "nchw_convs": ops[("", "QLinearConv")] + ops[("", "ConvInteger")],
        "transposes": ops[("", "Transpose")],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="small")
    args = parser.parse_args()
    print(f"{'model':<14}{'acts':<6}{'nhwc ops':>9}{'nchw convs':>11}{'transposes':>11}")
    for name in CNNS:
        for act in ("uint8", "int8"):
            counts = layout_counts(optimize(qdq_model(name, args.size, act), layout="nhwc"))
            print(
                f"{name:<14}{act:<6}{counts['nhwc_ops']:>9}{counts['nchw_convs']:>11}"
                f"{counts['transposes']:>11}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
