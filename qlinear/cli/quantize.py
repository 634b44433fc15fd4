"""`qlinear quantize IN.onnx OUT.onnx --calib DATA`: float model -> QDQ model."""

from __future__ import annotations

import argparse
import time


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("quantize", help="quantize a float model to QDQ ONNX")
    p.add_argument("model", help="float .onnx model (never modified)")
    p.add_argument("output", help="where to write the quantized .onnx (atomically)")
    p.add_argument("--calib", metavar="DATA",
                   help=".npz or folder of .npz keyed by input name (static mode)")  # fmt: skip
    p.add_argument("--batch-size", type=int, default=None, help="calibration batch size")
    p.add_argument("--mode", choices=("static", "dynamic"), default="static")
    p.add_argument("--method", choices=("minmax", "percentile", "entropy", "mse"), default="mse",
                   help="activation calibration method (default mse)")  # fmt: skip
    p.add_argument("--percentile", type=float, default=99.999)
    p.add_argument("--weight-type", choices=("int8", "uint8", "int4", "uint4"), default="int8")
    p.add_argument("--activation-type", choices=("uint8", "int8", "uint16", "int16"),
                   default="uint8")  # fmt: skip
    p.add_argument("--granularity", choices=("per_tensor", "per_channel", "blockwise"),
                   default="per_channel", help="weight granularity")  # fmt: skip
    p.add_argument("--block-size", type=int, default=32)
    p.add_argument("--weight-asymmetric", action="store_true")
    p.add_argument("--activation-symmetric", action="store_true")
    p.add_argument("--per-token", action="store_true", help="dynamic: per-token activations")
    p.add_argument("--exclude-node", action="append", default=[], metavar="NAME")
    p.add_argument("--exclude-op", action="append", default=[], metavar="OP_TYPE")
    p.add_argument("--keep-float", action="append", default=[], metavar="TENSOR")
    p.add_argument("--bias-correction", action="store_true")
    p.add_argument("--smoothquant", type=float, default=None, metavar="ALPHA")
    p.add_argument("--keep-worst", type=int, default=0, metavar="N",
                   help="keep the N most sensitive layers float")  # fmt: skip
    p.add_argument("--target-sqnr", type=float, default=None, metavar="DB",
                   help="keep sensitive layers float until the output SQNR reaches DB")  # fmt: skip
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from qlinear.onnx_io import check_output_path, save_model
    from qlinear.quantizer import QuantConfig, SensitivityConfig, SmoothQuantConfig, quantize

    check_output_path(args.output, args.model)
    if args.mode == "static" and not args.calib:
        raise ValueError("static quantization needs --calib DATA (or use --mode dynamic)")
    sensitivity = None
    if args.keep_worst or args.target_sqnr is not None:
        sensitivity = SensitivityConfig(keep_float=args.keep_worst, target_sqnr=args.target_sqnr)
    config = QuantConfig(
        mode=args.mode,
        weight_type=args.weight_type,
        weight_granularity=args.granularity,
        weight_symmetric=not args.weight_asymmetric,
        block_size=args.block_size,
        activation_type=args.activation_type,
        activation_symmetric=args.activation_symmetric,
        calibration=args.method,
        percentile=args.percentile,
        dynamic_per_token=args.per_token,
        exclude_nodes=tuple(args.exclude_node),
        exclude_op_types=tuple(args.exclude_op),
        keep_float_tensors=tuple(args.keep_float),
        bias_correction=args.bias_correction,
        smoothquant=None if args.smoothquant is None else SmoothQuantConfig(args.smoothquant),
        sensitivity=sensitivity,
        progress=not args.no_progress,
    )
    start = time.perf_counter()
    model = quantize(args.model, args.calib, config, batch_size=args.batch_size)
    save_model(model, args.output, source=args.model)
    q = sum(n.op_type == "QuantizeLinear" for n in model.graph.node)
    dq = sum(n.op_type == "DequantizeLinear" for n in model.graph.node)
    print(f"wrote {args.output}: {q} QuantizeLinear, {dq} DequantizeLinear "
          f"({time.perf_counter() - start:.1f} s)")  # fmt: skip
    return 0
