"""`qlinear run MODEL --input name=file.npy`: run a model, print or save its outputs."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from qlinear.cli._feeds import parse_inputs


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="run a model on given inputs")
    p.add_argument("model", help="path to an .onnx model")
    p.add_argument(
        "--input",
        "-i",
        action="append",
        metavar="NAME=FILE.npy",
        help="an input tensor (repeatable), or one .npz holding all inputs by name",
    )
    p.add_argument("--output-dir", "-o", help="save each output as NAME.npy in this folder")
    p.add_argument("--threads", type=int, default=None, help="intra-op threads")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from qlinear import Session

    session = Session(args.model, num_threads=args.threads)
    feeds = parse_inputs(args.input)
    start = time.perf_counter()
    outputs = session.run(None, feeds)
    elapsed = time.perf_counter() - start
    names = [o.name for o in session.get_outputs()]
    if args.output_dir:
        folder = Path(args.output_dir)
        folder.mkdir(parents=True, exist_ok=True)
        for name, value in zip(names, outputs, strict=True):
            np.save(folder / f"{_safe(name)}.npy", value)
    for name, value in zip(names, outputs, strict=True):
        print(f"{name}: {value.dtype}{list(value.shape)} {_summary(value)}")
    print(f"ran in {elapsed * 1e3:.1f} ms")
    if session.fallback_ops:
        print("ops run by onnx.reference (slow): " + ", ".join(session.fallback_ops))
    return 0


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def _summary(value: np.ndarray) -> str:
    if value.size <= 8:
        return np.array2string(value.reshape(-1), precision=5, separator=", ")
    if value.dtype.kind in "fiu":
        v = value.astype(np.float64)
        return f"min={v.min():.5g} max={v.max():.5g} mean={v.mean():.5g}"
    return ""
