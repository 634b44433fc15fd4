"""`qlinear bench MODEL`: qlinear vs onnxruntime latency and throughput, side by side."""

from __future__ import annotations

import argparse
import json


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench",
        help="time qlinear (and onnxruntime) on a model",
        description="Median latency and throughput of qlinear and onnxruntime on the same "
        "model and inputs. Engines alternate, each round in its own subprocess; the ratio is "
        "onnxruntime time / qlinear time (> 1 means qlinear is faster).",
    )
    p.add_argument("model", help="path to an .onnx model")
    p.add_argument(
        "--vs",
        choices=("onnxruntime", "none"),
        default="onnxruntime",
        help="engine to compare with (default onnxruntime; 'none' times qlinear only)",
    )
    p.add_argument("--batch", type=int, default=None, help="batch size (dynamic-batch models)")
    p.add_argument("--threads", type=int, default=None, help="intra-op threads for both engines")
    p.add_argument("--runs", type=int, default=20, help="timed runs per round")
    p.add_argument("--warmup", type=int, default=3, help="untimed runs before each round")
    p.add_argument("--rounds", type=int, default=2, help="alternating rounds per engine")
    p.add_argument("--data", help="take the inputs from this .npz / folder (first batch)")
    p.add_argument("--profile", action="store_true", help="qlinear time per op type")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from qlinear.bench import bench, render

    engines = ("qlinear",) if args.vs == "none" else ("qlinear", args.vs)
    result = bench(
        args.model,
        batch=args.batch,
        threads=args.threads,
        runs=args.runs,
        warmup=args.warmup,
        rounds=args.rounds,
        engines=engines,
        profile=args.profile,
        data=args.data,
    )
    print(json.dumps(result.to_dict(), indent=2) if args.json else render(result))
    return 0
