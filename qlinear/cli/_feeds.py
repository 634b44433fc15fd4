"""Reading input tensors given on the command line."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from qlinear.errors import InputError


def parse_inputs(items: list[str] | None) -> dict[str, np.ndarray]:
    """`name=file.npy` pairs, or a bare `.npz` whose arrays are keyed by input name."""
    feeds: dict[str, np.ndarray] = {}
    for item in items or []:
        if "=" in item:
            name, _, file = item.partition("=")
            feeds[name] = _load_npy(Path(file), name)
        elif item.endswith(".npz"):
            with np.load(item, allow_pickle=False) as data:
                feeds.update({k: data[k] for k in data.files})
        else:
            raise InputError(f"--input {item!r}: expected NAME=FILE.npy or FILE.npz")
    return feeds


def _load_npy(path: Path, name: str) -> np.ndarray:
    if not path.is_file():
        raise InputError(f"input {name!r}: file {str(path)!r} does not exist")
    try:
        return np.load(path, allow_pickle=False)
    except ValueError as exc:
        raise InputError(f"input {name!r}: {str(path)!r} is not a .npy array: {exc}") from None
