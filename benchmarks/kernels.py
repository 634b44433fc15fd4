"""qlinear int8 kernels vs onnxruntime, side by side, same inputs, 2 threads.

    python benchmarks/kernels.py [--portable] [--rows gemm|conv|all] [--repeat N]

Every (row, engine) is timed in its own subprocess, engines alternated, so the two
never hold live thread pools at once. ORT sessions use intra_op_num_threads=2; numba
uses 2 threads. Reported: median ms, GOPS (2*MACs/time), ratio qlinear/ORT (>1 means
qlinear is faster). GEMM rows are QLinearMatMul (B constant, per-tensor), conv rows are
QLinearConv (W constant, per-channel scales; NCHW), "nhwc" rows com.microsoft.QLinearConv
channels_last=1 (what optimized CNN graphs run), including MobileNetV2's pointwise convs
("MBv2 1x1 A->B @H": narrow outputs, small K). "s8" rows use int8 activations/outputs.
The last line is the first-call time in a fresh process with a warm on-disk numba cache.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import numpy as np

THREADS = 2


def gemm_rows() -> list[dict]:
    shapes = [("GEMM 1024^3", 1024, 1024, 1024)]
    for k, n in [(384, 384), (384, 1536), (1536, 384), (768, 768), (768, 3072), (3072, 768)]:
        shapes.append((f"BERT/MiniLM M=128 K={k} N={n}", 128, k, n))
    shapes.append(("ViT-S qkv M=197 K=384 N=1152", 197, 384, 1152))
    shapes.append(("head M=1 K=1280 N=1000", 1, 1280, 1000))
    rows = []
    for name, m, k, n in shapes:
        for act in ("u8", "s8"):
            rows.append(dict(kind="gemm", name=name, m=m, k=k, n=n, act=act))
    return rows


def conv_rows() -> list[dict]:
    shapes = [
        ("R50 3x3 64->64 @56", 64, 64, 56, 3, 1, 1),
        ("R50 1x1 256->64 @56", 256, 64, 56, 1, 1, 1),
        ("R50 3x3 512->512 @7", 512, 512, 7, 3, 1, 1),
        ("R50 3x3 128->128 s2 @56", 128, 128, 56, 3, 2, 1),
        ("R50 1x1 512->1024 s2 @28", 512, 1024, 28, 1, 2, 1),
        ("MBv2 dw3x3 32 @112", 32, 32, 112, 3, 1, 32),
        ("MBv2 dw3x3 144 @56", 144, 144, 56, 3, 1, 144),
        ("MBv2 dw3x3 144 s2 @56", 144, 144, 56, 3, 2, 144),
        ("MBv2 dw3x3 960 @7", 960, 960, 7, 3, 1, 960),
    ]
    rows = []
    for name, cin, cout, hw, k, s, g in shapes:
        for act in ("u8", "s8"):
            rows.append(
                dict(
                    kind="conv",
                    name=name,
                    cin=cin,
                    cout=cout,
                    hw=hw,
                    k=k,
                    stride=s,
                    group=g,
                    act=act,
                )
            )
    return rows


#: MobileNetV2 (224x224) pointwise convolutions: narrow outputs and small K.
MBV2_POINTWISE = [
    (32, 16, 112), (16, 96, 112), (96, 24, 56), (24, 144, 56), (144, 24, 56), (144, 32, 28),
    (32, 192, 28), (192, 32, 28), (64, 384, 14), (384, 64, 14), (96, 576, 14), (576, 96, 14),
    (160, 960, 7), (960, 160, 7), (320, 1280, 7),
]


def nhwc_rows() -> list[dict]:
    """The convolutions optimized CNN graphs run: com.microsoft.QLinearConv channels_last=1."""
    rows = [dict(r, kind="conv", layout="nhwc", name=r["name"] + " nhwc")
            for r in conv_rows() if r["act"] == "u8"]
    for cin, cout, hw in MBV2_POINTWISE:
        rows.append(dict(kind="conv", layout="nhwc", name=f"MBv2 1x1 {cin}->{cout} @{hw}",
                         cin=cin, cout=cout, hw=hw, k=1, stride=1, group=1, act="u8"))
    # network stems: three input channels (the image), stride 2
    rows.append(dict(kind="conv", layout="nhwc", name="MBv2 stem 3x3 s2 3->32 @224",
                     cin=3, cout=32, hw=224, k=3, stride=2, group=1, act="u8"))
    rows.append(dict(kind="conv", layout="nhwc", name="R18 stem 7x7 s2 3->64 @224",
                     cin=3, cout=64, hw=224, k=7, stride=2, group=1, act="u8"))
    return rows


def macs(row: dict) -> int:
    if row["kind"] == "gemm":
        return row["m"] * row["k"] * row["n"]
    oh = (row["hw"] + 2 * (row["k"] // 2) - row["k"]) // row["stride"] + 1
    return oh * oh * row["cout"] * (row["cin"] // row["group"]) * row["k"] ** 2


def build(row: dict):
    """(onnx model, feeds, node, consts): deterministic inputs for both engines."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    act = np.uint8 if row["act"] == "u8" else np.int8
    tt = TensorProto.UINT8 if act == np.uint8 else TensorProto.INT8
    info = np.iinfo(act)
    if row["kind"] == "gemm":
        m, k, n = row["m"], row["k"], row["n"]
        x = rng.integers(info.min, info.max + 1, (m, k)).astype(act)
        w = rng.integers(-128, 128, (k, n)).astype(np.int8)
        consts = [
            np.float32(0.02),
            act(3),
            w,
            np.float32(0.01),
            np.int8(0),
            np.float32(0.5),
            act(5),
        ]
        op, attrs, out_shape = "QLinearMatMul", {}, [m, n]
    else:
        cin, cout, hw, kk, s, g = (row[f] for f in ("cin", "cout", "hw", "k", "stride", "group"))
        x = rng.integers(info.min, info.max + 1, (1, cin, hw, hw)).astype(act)
        if row.get("layout") == "nhwc":
            x = np.ascontiguousarray(x.transpose(0, 2, 3, 1))
        w = rng.integers(-128, 128, (cout, cin // g, kk, kk)).astype(np.int8)
        consts = [
            np.float32(0.02),
            act(3),
            w,
            rng.uniform(0.001, 0.02, cout).astype(np.float32),
            np.zeros(cout, np.int8),
            np.float32(0.5),
            act(5),
            rng.integers(-1000, 1000, cout).astype(np.int32),
        ]
        p = kk // 2
        op = "QLinearConv"
        attrs = dict(kernel_shape=[kk, kk], strides=[s, s], pads=[p, p, p, p], group=g)
        out_shape = None
    names = ["x"] + [f"c{i}" for i in range(len(consts))]
    domain = ""
    if row.get("layout") == "nhwc":
        domain, attrs = "com.microsoft", dict(attrs, channels_last=1)
    node = helper.make_node(op, names, ["y"], domain=domain, **attrs)
    graph = helper.make_graph(
        [node],
        "bench",
        [helper.make_tensor_value_info("x", tt, list(x.shape))],
        [helper.make_tensor_value_info("y", tt, out_shape)],
        [numpy_helper.from_array(np.asarray(c), f"c{i}") for i, c in enumerate(consts)],
    )
    opsets = [helper.make_opsetid("", 13), helper.make_opsetid("com.microsoft", 1)]
    model = helper.make_model(graph, opset_imports=opsets, ir_version=9)
    return model, {"x": x}, node, {i + 1: np.asarray(c) for i, c in enumerate(consts)}


def time_calls(fn, min_time: float = 0.4, min_runs: int = 7, max_runs: int = 200) -> float:
    fn()
    fn()
    times = []
    start = time.perf_counter()
    while len(times) < max_runs and (
        len(times) < min_runs or time.perf_counter() - start < min_time
    ):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def worker(engine: str, row: dict) -> dict:
    model, feeds, node, consts = build(row)
    if engine == "ort":
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads = THREADS
        so.inter_op_num_threads = 1
        sess = ort.InferenceSession(
            model.SerializeToString(), so, providers=["CPUExecutionProvider"]
        )
        out = sess.run(None, feeds)[0]
        t = time_calls(lambda: sess.run(None, feeds))
    else:
        from qlinear.runtime.kernels import config
        from qlinear.runtime.registry import NodeSpec, lookup

        config.set_num_threads(THREADS)
        version = 1 if node.domain else 13
        spec = NodeSpec(node, version, consts=consts, num_threads=THREADS)
        kernel = lookup(node.domain, node.op_type, version)(spec)
        args = [feeds["x"]] + [consts[i] for i in range(1, len(consts) + 1)]
        out = kernel(*args)
        t = time_calls(lambda: kernel(*args))
    return {"t": t, "checksum": int(np.asarray(out, np.int64).sum())}


def first_call() -> dict:
    """Fresh process, warm cache: time of the first GEMM and conv calls, and cache misses."""
    t0 = time.perf_counter()
    from qlinear.runtime.kernels import conv, gemm
    from qlinear.runtime.registry import NodeSpec, lookup

    t_import = time.perf_counter() - t0
    res = {"import_s": t_import}
    for row in (gemm_rows()[0], conv_rows()[0], conv_rows()[-2]):
        _, feeds, node, consts = build(
            dict(row, m=64, k=64, n=64) if row["kind"] == "gemm" else dict(row, hw=8)
        )
        kernel = lookup("", node.op_type, 13)(NodeSpec(node, 13, consts=consts))
        t = time.perf_counter()
        kernel(feeds["x"], *[consts[i] for i in range(1, len(consts) + 1)])
        res[f"first_{row['kind']}{'_dw' if row.get('group', 1) > 1 else ''}_s"] = (
            time.perf_counter() - t
        )
    misses = 0
    for mod in (gemm, conv):
        for name in dir(mod):
            disp = getattr(mod, name)
            if hasattr(disp, "stats") and hasattr(disp.stats, "cache_misses"):
                misses += sum(disp.stats.cache_misses.values())
    res["cache_misses"] = misses
    return res


def _spawn(args: list[str], env: dict) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, *args], env=env, capture_output=True, text=True, check=False
    )
    if out.returncode != 0:
        raise RuntimeError(f"worker {args} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--portable", action="store_true", help="time the portable kernels")
    ap.add_argument("--rows", default="all", choices=["gemm", "conv", "nhwc", "all"])
    ap.add_argument("--filter", default="", help="only rows whose name contains this")
    ap.add_argument("--repeat", type=int, default=1, help="alternating rounds per row")
    ap.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    ap.add_argument("--first-call", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker[0], json.loads(args.worker[1]))))
        return
    if args.first_call:
        print(json.dumps(first_call()))
        return
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_CORETYPE"}
    env["NUMBA_NUM_THREADS"] = str(THREADS)
    env["OMP_NUM_THREADS"] = str(THREADS)
    env["QLINEAR_KERNELS"] = "portable" if args.portable else "auto"
    rows = (
        (gemm_rows() if args.rows in ("gemm", "all") else [])
        + (conv_rows() if args.rows in ("conv", "all") else [])
        + (nhwc_rows() if args.rows in ("nhwc", "all") else [])
    )
    rows = [r for r in rows if args.filter in r["name"]]
    print(
        f"{'row':34s} {'act':3s} {'ORT ms':>8s} {'ql ms':>8s} {'ORT GOPS':>9s} "
        f"{'ql GOPS':>8s} {'ratio':>6s}"
    )
    uint8_ratio: dict[str, float] = {}
    for row in rows:
        t_ort, t_ql = [], []
        for rnd in range(args.repeat):
            order = ("ort", "ql") if rnd % 2 == 0 else ("ql", "ort")
            for engine in order:
                r = _spawn(["--worker", engine, json.dumps(row)], env)
                (t_ort if engine == "ort" else t_ql).append(r["t"])
        to, tq = statistics.median(t_ort), statistics.median(t_ql)
        ops = 2 * macs(row)
        ratio = to / tq
        note = ""
        if row["act"] == "u8":
            uint8_ratio[row["name"]] = tq
        elif row["name"] in uint8_ratio:
            note = f"  s8/u8 time {tq / uint8_ratio[row['name']]:.2f}"
        print(
            f"{row['name']:34s} {row['act']:3s} {to * 1e3:8.3f} {tq * 1e3:8.3f} "
            f"{ops / to / 1e9:9.1f} {ops / tq / 1e9:8.1f} {ratio:6.2f}{note}",
            flush=True,
        )
    _spawn(["--first-call"], env)  # make sure the on-disk cache is warm
    fc = _spawn(["--first-call"], env)
    print(
        "first call, warm cache (second fresh process): "
        + ", ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in fc.items())
    )


if __name__ == "__main__":
    main()
