"""Terminal tables for compare results: aligned columns, worst layers first."""

from __future__ import annotations

from collections.abc import Sequence

from qlinear.report.compare import CompareResult
from qlinear.report.metrics import format_db
from qlinear.report.suggest import suggest


def table(headers: Sequence[str], rows: Sequence[Sequence[str]], right: Sequence[bool]) -> str:
    """An aligned plain-text table; `right` says which columns are right-aligned (numbers)."""
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        parts = [
            c.rjust(w) if r else c.ljust(w) for c, w, r in zip(cells, widths, right, strict=True)
        ]
        return "  ".join(parts).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(headers), rule] + [line(r) for r in rows])


def _ellipsize(name: str, width: int = 48) -> str:
    return name if len(name) <= width else "…" + name[-(width - 1) :]


def render(result: CompareResult, layers: int = 15) -> str:
    """The compare summary: outputs, worst layers (own vs accumulated), suggestions."""
    out = [
        f"A: {result.model_a} ({result.engines[0]})",
        f"B: {result.model_b} ({result.engines[1]})",
        f"{result.samples} samples in {result.batches} batches",
        "",
        "Outputs",
    ]
    rows = [
        [
            o.name,
            format_db(o.stats.sqnr_db),
            f"{o.stats.cosine:.6f}",
            f"{o.stats.max_abs:.4g}",
            "-" if o.stats.top1 is None else f"{o.stats.top1:.1%}",
        ]
        for o in result.outputs
    ]
    out.append(
        table(
            ["output", "SQNR dB", "cosine", "max abs err", "top-1 agree"],
            rows,
            [False, True, True, True, True],
        )
    )
    if result.layers:
        worst = result.worst_layers(layers)
        out += ["", f"Layers, worst own error first ({len(worst)} of {len(result.layers)})"]
        rows = [
            [
                _ellipsize(r.name),
                r.match.op_b,
                format_db(r.own.sqnr_db),
                format_db(r.accumulated.sqnr_db),
                f"{r.accumulated.cosine:.5f}",
            ]
            for r in worst
        ]
        out.append(
            table(
                ["tensor", "op (B)", "own dB", "accum dB", "cosine"],
                rows,
                [False, False, True, True, True],
            )
        )
        if result.unmatched:
            out.append(f"({result.unmatched} tensors of B had no counterpart in A)")
    tips = suggest(result)
    if tips:
        out += ["", "Suggestions"]
        out += [f"- {_ellipsize(s.tensor)} ({s.op_type}): {s.action}: {s.reason}" for s in tips]
    return "\n".join(out)
