"""`qlinear demo`: the whole job on the bundled example model, no files needed.

Builds the zoo's small ResNet-style CNN, saves it, runs it with qlinear and prints
what happened. Each later stage of the pipeline (quantize, optimize, compare) is
added here as it lands, so the README's one command always shows the real thing.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="run the pipeline on the bundled example model")
    p.add_argument("--model", default="resnet", help="zoo model: resnet, mobilenet_v2, bert, vit")
    p.add_argument("--out", default="qlinear-demo", help="folder for the demo's ONNX files")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from qlinear import Session, save_model, zoo

    out = Path(args.out)
    model = zoo.build(args.model, "small", batch=1)
    float_path = save_model(model, out / f"{args.model}_float.onnx")
    print(
        f"built zoo model {args.model!r} (small): {len(model.graph.node)} nodes, "
        f"{zoo.count_params(model):,} parameters -> {float_path}"
    )

    feeds = zoo.example_inputs(args.model, model, batch=1, seed=0)
    session = Session(float_path)
    session.run(None, feeds)  # first call: kernels compile or load from the disk cache
    start = time.perf_counter()
    outputs = session.run(None, feeds)
    elapsed = time.perf_counter() - start
    for info, value in zip(session.get_outputs(), outputs, strict=True):
        print(f"  {info.name}: {value.dtype}{list(value.shape)}" + _top(value))
    print(
        f"qlinear float run: {elapsed * 1e3:.2f} ms; "
        f"ops in onnx.reference: {', '.join(session.fallback_ops) or 'none'}"
    )
    return 0


def _top(value: np.ndarray, k: int = 3) -> str:
    if value.ndim != 2 or value.dtype.kind != "f":
        return ""
    order = np.argsort(-value[0])[:k]
    return "  top-3 classes " + ", ".join(f"{i} ({value[0, i]:.3f})" for i in order)
