"""The ``--report DIR`` output: report.md, report.json and the PNG charts it links."""

from __future__ import annotations

import json
from pathlib import Path

from qlinear.onnx_io import atomic_write
from qlinear.report.charts import histogram_chart, sqnr_chart
from qlinear.report.compare import CompareResult
from qlinear.report.metrics import format_db
from qlinear.report.suggest import suggest

SQNR_PNG = "sqnr_per_layer.png"
HIST_PNG = "worst_layers_hist.png"


def _md_table(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in rows]
    return "\n".join(lines)


def write_report(result: CompareResult, folder: str | Path, worst: int = 4) -> Path:
    """Write the report into `folder` (created); every file is written atomically."""
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    parts = [
        "# qlinear compare report",
        "",
        f"- **A** (reference): `{result.model_a}` on {result.engines[0]}",
        f"- **B** (candidate): `{result.model_b}` on {result.engines[1]}",
        f"- data: {result.samples} samples in {result.batches} batches",
        "",
        "## Outputs",
        "",
        _md_table(
            ["output", "SQNR (dB)", "cosine", "max abs error", "top-1 agreement"],
            [
                [
                    f"`{o.name}`",
                    format_db(o.stats.sqnr_db),
                    f"{o.stats.cosine:.6f}",
                    f"{o.stats.max_abs:.4g}",
                    "-" if o.stats.top1 is None else f"{o.stats.top1:.1%}",
                ]
                for o in result.outputs
            ],
        ),
        "",
    ]
    if result.layers:
        sqnr_chart(result.layers, out / SQNR_PNG)
        worst_layers = [r for r in result.worst_layers(worst) if r.float_sample.size]
        parts += [
            "## Per-layer SQNR",
            "",
            "*Own*: B's layer run on A's (float) inputs — the error the layer adds by "
            "itself. *Accumulated*: B's full run at that tensor — everything upstream "
            "included. A layer whose own SQNR is low is the one to fix; one whose "
            "accumulated SQNR is low but own is high inherits its error.",
            "",
            f"![per-layer SQNR]({SQNR_PNG})",
            "",
            _md_table(
                ["#", "tensor", "op (A → B)", "own (dB)", "accumulated (dB)", "max/p99.9"],
                [
                    [
                        str(r.match.position),
                        f"`{r.name}`",
                        f"{r.match.op_a} → {r.match.op_b}",
                        format_db(r.own.sqnr_db),
                        format_db(r.accumulated.sqnr_db),
                        f"{r.outlier_ratio:.2f}",
                    ]
                    for r in result.worst_layers()
                ],
            ),
            "",
        ]
        if worst_layers:
            histogram_chart(worst_layers, out / HIST_PNG)
            parts += [
                f"## Worst {len(worst_layers)} layers: float vs dequantized values",
                "",
                f"![worst layer histograms]({HIST_PNG})",
                "",
            ]
    tips = suggest(result)
    parts += ["## Suggestions", ""]
    if tips:
        parts += [f"- `{s.tensor}` ({s.op_type}): **{s.action}** — {s.reason}." for s in tips]
    else:
        parts.append("No rule fired for the worst layers.")
    parts.append("")
    atomic_write(out / "report.json", json.dumps(result.to_dict(), indent=2).encode())
    path = out / "report.md"
    atomic_write(path, "\n".join(parts).encode())
    return path
