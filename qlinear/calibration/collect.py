"""Run a float model batch by batch and fold each requested tensor into its statistics.

Memory stays bounded by one batch's activations plus fixed-size statistics per
tensor: values are requested from `qlinear.Session` as extra outputs, summarised,
and dropped before the next batch. A tqdm bar with ETA goes to stderr.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from qlinear.calibration.stats import ChannelStats, TensorStats
from qlinear.errors import InputError, QlinearError


def collect(
    session: Any,
    batches: Iterable[Mapping[str, np.ndarray]],
    tensors: Sequence[str],
    *,
    channel_tensors: Mapping[str, int] | Sequence[str] = (),
    num_bins: int = 2048,
    progress: bool = True,
    total: int | None = None,
) -> tuple[dict[str, TensorStats], dict[str, ChannelStats]]:
    """Histogram stats of `tensors` and per-channel stats of `channel_tensors`.

    `channel_tensors` maps a tensor to its channel axis (a plain list means the last
    axis). `session` is a qlinear.Session over the float model. Raises InputError for an
    empty dataset or a batch the model cannot take (the message names the batch).
    """
    from tqdm import tqdm

    names = list(dict.fromkeys(list(tensors) + list(channel_tensors)))
    stats = {n: TensorStats(num_bins) for n in tensors}
    axes = (
        dict(channel_tensors)
        if isinstance(channel_tensors, Mapping)
        else dict.fromkeys(channel_tensors, -1)
    )
    channels = {n: ChannelStats() for n in axes}
    if total is None and hasattr(batches, "__len__"):
        try:
            total = len(batches)  # type: ignore[arg-type]
        except TypeError:
            total = None
    bar = tqdm(total=total, desc="calibrating", unit="batch", file=sys.stderr, disable=not progress)
    seen = 0
    try:
        for index, feeds in enumerate(batches):
            if not isinstance(feeds, Mapping):
                raise InputError(
                    f"calibration batch {index} is a {type(feeds).__name__}, expected a dict "
                    "of input name -> array"
                )
            try:
                values = session.run(names, feeds) if names else []
            except InputError as exc:
                raise InputError(f"calibration batch {index}: {exc}") from None
            for name, value in zip(names, values, strict=True):
                if name in stats:
                    stats[name].update(value)
                if name in channels and np.ndim(value) >= 1:
                    channels[name].update(value, axes[name])
            del values
            seen += 1
            bar.update(1)
    finally:
        bar.close()
    if seen == 0:
        raise InputError("calibration data is empty: no batches to calibrate on")
    return stats, channels


def check_reiterable(data: Any, what: str) -> None:
    """Two passes over a one-shot iterator would silently see no data the second time."""
    if iter(data) is data:
        raise QlinearError(
            f"{what} needs to read the calibration data more than once; pass a list, a "
            "dataset path, or a callable returning a fresh iterable, not a one-shot iterator"
        )
