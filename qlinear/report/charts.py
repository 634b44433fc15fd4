"""PNG charts for the compare report (matplotlib, Agg backend, nothing shown on screen)."""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from qlinear.onnx_io import atomic_write
from qlinear.report.compare import LayerResult

#: Where "exact" (infinite SQNR) points are drawn, above every finite value.
_EXACT_MARGIN_DB = 10.0


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:  # type: ignore[no-untyped-def]
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    _pyplot().close(fig)
    atomic_write(path, buffer.getvalue())
    return path


def _short(name: str, width: int = 28) -> str:
    return name if len(name) <= width else "…" + name[-(width - 1) :]


def sqnr_chart(layers: Sequence[LayerResult], path: Path) -> Path:
    """Own and accumulated SQNR of every matched tensor, in graph order."""
    plt = _pyplot()
    ordered = sorted(layers, key=lambda r: r.match.position)
    own = np.array([r.own.sqnr_db for r in ordered], dtype=float)
    acc = np.array([r.accumulated.sqnr_db for r in ordered], dtype=float)
    finite = np.concatenate([own[np.isfinite(own)], acc[np.isfinite(acc)]])
    top = (finite.max() if finite.size else 0.0) + _EXACT_MARGIN_DB
    x = np.arange(len(ordered))
    fig, ax = plt.subplots(figsize=(max(6.0, min(18.0, 0.25 * len(ordered) + 4)), 4.2))
    for series, label, style in ((acc, "accumulated", "-o"), (own, "own (float inputs)", "--s")):
        shown = np.where(np.isposinf(series), top, series)
        ax.plot(x, shown, style, markersize=3.5, linewidth=1.2, label=label)
    if np.isposinf(own).any() or np.isposinf(acc).any():
        ax.axhline(top, color="grey", linewidth=0.6, linestyle=":")
        ax.text(0, top, " exact", va="bottom", fontsize=7, color="grey")
    ax.set_xlabel("tensor (graph order)")
    ax.set_ylabel("SQNR (dB), higher is better")
    ax.set_title("Per-layer SQNR: model B vs model A")
    if len(ordered) <= 60:
        ax.set_xticks(x)
        ax.set_xticklabels([_short(r.name) for r in ordered], rotation=90, fontsize=6)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def histogram_chart(layers: Sequence[LayerResult], path: Path) -> Path:
    """Float vs dequantized value histograms of the given (worst) layers."""
    plt = _pyplot()
    count = max(1, len(layers))
    cols = min(2, count)
    rows = math.ceil(count / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 3.2 * rows), squeeze=False)
    for ax, layer in zip(axes.flat, layers, strict=False):
        ref, test = layer.float_sample, layer.quant_sample
        values = np.concatenate([ref, test])
        values = values[np.isfinite(values)]
        lo, hi = (float(values.min()), float(values.max())) if values.size else (0.0, 1.0)
        bins = np.linspace(lo, hi if hi > lo else lo + 1.0, 80)
        ax.hist(ref, bins=bins, histtype="step", label="float (A)", linewidth=1.2)
        ax.hist(test, bins=bins, histtype="step", label="dequantized (B)", linewidth=1.2)
        ax.set_yscale("log")
        ax.set_title(
            f"{_short(layer.name, 40)}\nown {_db(layer.own.sqnr_db)}, "
            f"accumulated {_db(layer.accumulated.sqnr_db)}",
            fontsize=8,
        )
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(layers) :]:
        ax.axis("off")
    fig.tight_layout()
    return _save(fig, path)


def _db(value: float) -> str:
    return "exact" if math.isinf(value) and value > 0 else f"{value:.1f} dB"
