"""`bench`: qlinear vs onnxruntime latency on the same model and inputs.

Each timing round runs in its own subprocess (``python -m qlinear.bench _worker``)
so the two engines never hold live thread pools at once and neither inherits the
other's warm caches; rounds alternate engines (A, B, A, B, ...) so drift in machine
load hits both. Each worker loads the same inputs from one temporary ``.npz``,
warms up, then times ``runs`` calls. Latency is the median over all timed runs of
all rounds of an engine; the ratio is ORT time / qlinear time (> 1: qlinear faster).
ORT runs with ``intra_op_num_threads=threads`` and ``inter_op_num_threads=1``.
Subprocesses run without ``OPENBLAS_CORETYPE`` so a machine-wide setting does not
skew either engine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from qlinear.data import batch_of, iter_batches, model_inputs
from qlinear.errors import ModelLoadError, QlinearError
from qlinear.runtime.session import TensorInfo

#: Size given to free non-batch dims (e.g. sequence length) when no data is given.
DEFAULT_DIM = 32


@dataclass
class EngineTiming:
    engine: str
    times: list[float] = field(default_factory=list)  # seconds per timed run
    profile: dict[str, float] = field(default_factory=dict)  # op type -> seconds per run
    nodes: dict[str, int] = field(default_factory=dict)  # op type -> node count

    @property
    def median(self) -> float:
        return statistics.median(self.times)

    def quantile(self, q: float) -> float:
        return float(np.quantile(self.times, q))


@dataclass
class BenchResult:
    model: str
    batch: int
    threads: int | None
    runs: int
    rounds: int
    timings: list[EngineTiming]

    def timing(self, engine: str) -> EngineTiming | None:
        return next((t for t in self.timings if t.engine == engine), None)

    @property
    def ratio(self) -> float | None:
        """ORT median / qlinear median: > 1 means qlinear is faster."""
        q, o = self.timing("qlinear"), self.timing("onnxruntime")
        if q is None or o is None or not q.times or not o.times:
            return None
        return o.median / q.median

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "batch": self.batch,
            "threads": self.threads,
            "runs_per_round": self.runs,
            "rounds": self.rounds,
            "engines": {
                t.engine: {
                    "median_ms": t.median * 1e3,
                    "p10_ms": t.quantile(0.1) * 1e3,
                    "p90_ms": t.quantile(0.9) * 1e3,
                    "items_per_s": self.batch / t.median,
                    "runs": len(t.times),
                    **({"profile_ms": _profile_ms(t)} if t.profile else {}),
                }
                for t in self.timings
            },
            "ratio_ort_over_qlinear": self.ratio,
        }


def _profile_ms(t: EngineTiming) -> list[dict[str, Any]]:
    total = sum(t.profile.values()) or 1.0
    return [
        {"op_type": op, "ms": s * 1e3, "percent": 100 * s / total, "nodes": t.nodes.get(op, 0)}
        for op, s in sorted(t.profile.items(), key=lambda kv: -kv[1])
    ]


def make_inputs(
    inputs: Sequence[TensorInfo], batch: int, data: str | None = None, seed: int = 0
) -> dict[str, np.ndarray]:
    """One batch of feeds: the first batch of `data`, else synthetic values of the right type."""
    if data is not None:
        return next(iter(iter_batches(data, inputs, batch)))
    rng = np.random.default_rng(seed)
    feeds = {}
    for info in inputs:
        shape = tuple(
            (batch if i == 0 else DEFAULT_DIM) if not isinstance(d, int) else d
            for i, d in enumerate(info.shape or (batch,))
        )
        dtype = info.dtype or np.dtype(np.float32)
        if dtype.kind == "f":
            feeds[info.name] = rng.standard_normal(shape).astype(dtype)
        elif dtype.kind == "b":
            feeds[info.name] = np.ones(shape, dtype)
        else:  # ids, masks, indices: 1 is valid for all of them
            feeds[info.name] = np.ones(shape, dtype)
    return feeds


def bench(
    model: str | os.PathLike,
    *,
    batch: int | None = None,
    threads: int | None = None,
    runs: int = 20,
    warmup: int = 3,
    rounds: int = 2,
    engines: Sequence[str] = ("qlinear", "onnxruntime"),
    profile: bool = False,
    data: str | None = None,
) -> BenchResult:
    """Time `engines` on `model` in alternating subprocess rounds; medians and ratio."""
    path = Path(model)
    if not path.is_file():
        raise ModelLoadError(f"model file {str(path)!r} does not exist or is not a file")
    if runs < 1 or rounds < 1 or warmup < 0:
        raise ValueError("--runs and --rounds must be at least 1, --warmup at least 0")
    inputs = model_inputs(path)
    batch = batch_of(inputs, batch)
    feeds = make_inputs(inputs, batch, data)
    timings = {e: EngineTiming(e) for e in engines}
    with tempfile.TemporaryDirectory(prefix="qlinear-bench-") as tmp:
        feed_file = Path(tmp) / "inputs.npz"
        np.savez(feed_file, **feeds)
        for round_index in range(rounds):
            for engine in engines:
                report = _run_worker(
                    path, engine, feed_file, threads, runs, warmup,
                    profile=profile and engine == "qlinear" and round_index == 0,
                    out=Path(tmp) / f"{engine}-{round_index}.json",
                )  # fmt: skip
                timings[engine].times.extend(report["times"])
                if report.get("profile"):
                    timings[engine].profile = report["profile"]
                    timings[engine].nodes = report["nodes"]
    return BenchResult(str(path), batch, threads, runs, rounds, list(timings.values()))


def _run_worker(
    model: Path,
    engine: str,
    feeds: Path,
    threads: int | None,
    runs: int,
    warmup: int,
    *,
    profile: bool,
    out: Path,
) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "qlinear.bench", "_worker", str(model), engine, str(feeds)]
    cmd += ["--runs", str(runs), "--warmup", str(warmup), "--out", str(out)]
    if threads:
        cmd += ["--threads", str(threads)]
    if profile:
        cmd.append("--profile")
    env = dict(os.environ)
    env.pop("OPENBLAS_CORETYPE", None)
    # The worker must import this very qlinear, whatever the current directory is.
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode != 0 or not out.is_file():
        lines = [ln for ln in done.stderr.strip().splitlines() if ln.strip()]
        detail = lines[-1] if lines else f"exit code {done.returncode}"
        raise QlinearError(f"{engine} could not run {model.name}: {detail}")
    return json.loads(out.read_text())


def _worker(argv: Sequence[str]) -> int:
    """Inside the subprocess: build one engine's session, warm up, time, write JSON."""
    p = argparse.ArgumentParser(prog="qlinear.bench _worker")
    p.add_argument("model")
    p.add_argument("engine", choices=("qlinear", "onnxruntime"))
    p.add_argument("feeds")
    p.add_argument("--runs", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--profile", action="store_true")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    with np.load(args.feeds) as npz:
        feeds = {k: npz[k] for k in npz.files}
    if args.engine == "qlinear":
        from qlinear import Session

        session: Any = Session(args.model, num_threads=args.threads)
    else:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 3
        if args.threads:
            options.intra_op_num_threads = args.threads
        options.inter_op_num_threads = 1
        session = ort.InferenceSession(args.model, options, providers=["CPUExecutionProvider"])
    for _ in range(args.warmup):
        session.run(None, feeds)
    times = []
    clock = time.perf_counter
    for _ in range(args.runs):
        start = clock()
        session.run(None, feeds)
        times.append(clock() - start)
    report: dict[str, Any] = {"times": times}
    if args.profile and args.engine == "qlinear":
        per_op: dict[str, float] = {}
        nodes: dict[str, set[str]] = {}
        for _ in range(args.runs):
            _, node_times = session.run_profiled(None, feeds)
            for t in node_times:
                per_op[t.op_type] = per_op.get(t.op_type, 0.0) + t.seconds / args.runs
                nodes.setdefault(t.op_type, set()).add(t.node or str(id(t)))
        report["profile"] = per_op
        report["nodes"] = {op: len(v) for op, v in nodes.items()}
    Path(args.out).write_text(json.dumps(report))
    return 0


def render(result: BenchResult) -> str:
    """The side-by-side table, the quoted ratio and (with --profile) time per op type."""
    from qlinear.report.text import table

    lines = [
        f"model {result.model}  batch {result.batch}  threads {result.threads or 'default'}  "
        f"{result.rounds} rounds x {result.runs} runs per engine (alternating subprocesses)",
        "",
    ]
    rows = [
        [
            t.engine,
            f"{t.median * 1e3:.3f}",
            f"{t.quantile(0.1) * 1e3:.3f}",
            f"{t.quantile(0.9) * 1e3:.3f}",
            f"{result.batch / t.median:,.1f}",
        ]
        for t in result.timings
    ]
    headers = ["engine", "median ms", "p10 ms", "p90 ms", "items/s"]
    lines.append(table(headers, rows, [False, True, True, True, True]))
    ratio = result.ratio
    if ratio is not None:
        verdict = "qlinear faster" if ratio > 1 else "onnxruntime faster" if ratio < 1 else "tie"
        lines += ["", f"ratio onnxruntime/qlinear = {ratio:.3g}x ({verdict})"]
    q = result.timing("qlinear")
    if q is not None and q.profile:
        total = sum(q.profile.values()) or 1.0
        lines += ["", f"qlinear time per op type (profiled, {total * 1e3:.3f} ms per run)"]
        prof_rows = [
            [op, str(q.nodes.get(op, 0)), f"{s * 1e3:.3f}", f"{100 * s / total:.1f}%"]
            for op, s in sorted(q.profile.items(), key=lambda kv: -kv[1])
        ]
        lines.append(table(["op type", "nodes", "ms", "share"], prof_rows, [False] + [True] * 3))
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "_worker":
        return _worker(argv[1:])
    print("usage: python -m qlinear.bench _worker ... (use `qlinear bench MODEL`)", file=sys.stderr)
    return 2


__all__ = ["BenchResult", "EngineTiming", "bench", "make_inputs", "render"]

if __name__ == "__main__":
    sys.exit(main())
