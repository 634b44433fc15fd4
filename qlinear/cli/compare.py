"""`qlinear compare A.onnx B.onnx --data DATA`: how far is B from A, per output and layer."""

from __future__ import annotations

import argparse
import json
import sys


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "compare",
        help="compare two models (float vs quantized) on the same data",
        description="Run A (reference) and B on the same inputs; report SQNR, cosine, max "
        "error and top-1 agreement per output, and per layer the error each layer adds on "
        "its own vs the error accumulated up to it.",
    )
    p.add_argument("model_a", metavar="A.onnx", help="reference model (usually float)")
    p.add_argument("model_b", metavar="B.onnx", help="candidate model (QDQ or optimized)")
    p.add_argument("--data", required=True, help=".npz file or folder of them, keyed by input")
    p.add_argument("--report", metavar="DIR", help="write report.md, report.json and PNGs here")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    p.add_argument("--batch-size", type=int, default=None, help="batch for dynamic-batch models")
    p.add_argument("--max-batches", type=int, default=None, help="stop after N batches")
    p.add_argument("--layers", type=int, default=15, help="layers shown in the table")
    p.add_argument("--no-layers", action="store_true", help="compare outputs only (faster)")
    p.add_argument("--engine-a", choices=("qlinear", "onnxruntime"), default="qlinear")
    p.add_argument("--engine-b", choices=("qlinear", "onnxruntime"), default="qlinear")
    p.add_argument("--threads", type=int, default=None, help="intra-op threads")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from qlinear.report import compare, write_report
    from qlinear.report.text import render

    if args.max_batches is not None and args.max_batches < 1:
        raise ValueError("--max-batches must be at least 1")
    result = compare(
        args.model_a,
        args.model_b,
        args.data,
        batch_size=args.batch_size,
        max_batches=args.max_batches,
        per_layer=not args.no_layers,
        engine_a=args.engine_a,
        engine_b=args.engine_b,
        threads=args.threads,
        progress=not args.quiet and not args.json,
    )
    if args.report:
        path = write_report(result, args.report)
        if not args.json:
            print(f"report written to {path}", file=sys.stderr)
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
    else:
        print(render(result, layers=args.layers))
    return 0
