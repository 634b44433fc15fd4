"""`qlinear optimize IN.onnx OUT.onnx [--explain]`: fuse a QDQ model into QLinear ops."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("optimize", help="rewrite a QDQ model into fused QLinear/int8 operators")
    p.add_argument("model", help="input .onnx model (QDQ or float)")
    p.add_argument("output", help="where to write the optimized .onnx model")
    p.add_argument(
        "--explain", action="store_true", help="print per node unit which rule fired or why not"
    )
    p.add_argument(
        "--layout",
        choices=("nhwc", "nchw"),
        default="nhwc",
        help="run convolutions and pools channels-last (default) or leave them NCHW",
    )
    p.add_argument(
        "--custom-ops",
        action="store_true",
        help="allow qlinear-only ops (the output then no longer loads in onnxruntime)",
    )
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from qlinear.onnx_io import check_output_path, load_model, save_model
    from qlinear.passes import explain, fusion_counts

    check_output_path(args.output, args.model)
    original = load_model(args.model)
    optimized, lines = explain(original, layout=args.layout, custom_ops=args.custom_ops)
    save_model(optimized, args.output, source=args.model)
    if args.explain:
        for line in lines:
            print(line)
    counts = fusion_counts(original, optimized)
    print(
        f"wrote {args.output}: {counts['fused']} of {counts['linear']} Conv/MatMul/Gemm fused, "
        f"{counts['left_float']} left float"
    )
    return 0
