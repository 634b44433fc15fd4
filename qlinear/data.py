"""The dataset format every command that takes data shares (compare, bench, calibration).

DATA is an ``.npz`` file, a folder of ``.npz`` files (read one at a time, in sorted
name order), a mapping of arrays, or an in-memory iterable of such mappings. Each
array is keyed by a model input name and holds samples stacked along its first
axis; all arrays of one file hold the same number of samples. ``iter_batches``
re-cuts the samples into feed dicts of the batch the model accepts: the input's
fixed first dimension if it has one, else ``batch_size`` (default 1).

Validation happens before any model runs, with errors that name the input:
unknown or missing names, per-sample shapes that contradict the model's fixed
dims, and dtypes. A dtype is converted only when numpy calls the cast *safe*
(lossless: int32 -> int64, float16 -> float32, uint8 -> int32, ...); anything else,
notably float64 -> float32, is an error so a silent precision change can never
creep into an accuracy comparison.

With a fixed model batch the trailing samples that do not fill a whole batch are
dropped (``Batches.dropped`` says how many); a dynamic batch ends with a short batch.
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import helper

from qlinear.errors import InputError
from qlinear.runtime.session import TensorInfo

Feeds = dict[str, np.ndarray]
DataLike = str | os.PathLike | Mapping[str, Any] | Iterable[Mapping[str, Any]]
InputsLike = Sequence[TensorInfo] | Any  # a TensorInfo list, a Session, a model


class DataError(InputError):
    """The dataset cannot feed the model: wrong names, shapes, dtypes, or no samples."""


@dataclass(frozen=True)
class _Chunk:
    """One file (or one in-memory mapping) of stacked samples, opened lazily."""

    source: str
    path: Path | None = None
    arrays: Mapping[str, Any] | None = None

    def load(self) -> dict[str, np.ndarray]:
        if self.arrays is not None:
            return {k: np.asarray(v) for k, v in self.arrays.items()}
        assert self.path is not None
        try:
            with np.load(self.path, allow_pickle=False) as npz:
                return {k: npz[k] for k in npz.files}
        except (OSError, ValueError, zipfile.BadZipFile) as exc:
            raise DataError(f"{self.source}: not a readable .npz file: {exc}") from None

    def header(self) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        """Shapes and dtypes without reading the data (for counting and early checks)."""
        if self.arrays is not None:
            return {k: (np.shape(v), np.asarray(v).dtype) for k, v in self.arrays.items()}
        assert self.path is not None
        return _npz_header(self.path, self.source)


def _npz_header(path: Path, source: str) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    result = {}
    try:
        with zipfile.ZipFile(path) as zf:
            for name in zf.namelist():
                if not name.endswith(".npy"):
                    continue
                with zf.open(name) as f:
                    version = np.lib.format.read_magic(f)
                    if version == (1, 0):
                        shape, _, dtype = np.lib.format.read_array_header_1_0(f)
                    else:
                        shape, _, dtype = np.lib.format.read_array_header_2_0(f)
                result[name[:-4]] = (tuple(shape), np.dtype(dtype))
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise DataError(f"{source}: not a readable .npz file: {exc}") from None
    return result


def _chunks(data: DataLike) -> tuple[list[_Chunk] | Iterable[Mapping[str, Any]], bool]:
    """The data as chunks; second item says whether the list is known up front (sized)."""
    if isinstance(data, (str, os.PathLike)):
        path = Path(data)
        if path.is_dir():
            files = sorted(p for p in path.iterdir() if p.suffix == ".npz" and p.is_file())
            if not files:
                raise DataError(f"data folder {str(path)!r} holds no .npz files")
            return [_Chunk(str(p), path=p) for p in files], True
        if path.is_file():
            return [_Chunk(str(path), path=path)], True
        raise DataError(f"data {str(path)!r} does not exist (expected an .npz file or a folder)")
    if isinstance(data, Mapping):
        return [_Chunk("data", arrays=data)], True
    if isinstance(data, Sequence):
        return [_Chunk(f"data[{i}]", arrays=m) for i, m in enumerate(data)], True
    if isinstance(data, Iterable):
        return data, False
    raise TypeError(f"data must be a path, a mapping or an iterable of mappings, not {data!r}")


def model_inputs(model: InputsLike) -> list[TensorInfo]:
    """The inputs a model needs fed, from a Session, a model (path/proto) or a TensorInfo list."""
    if hasattr(model, "get_inputs"):
        return list(model.get_inputs())
    if isinstance(model, Sequence) and all(isinstance(i, TensorInfo) for i in model):
        return list(model)
    from qlinear.onnx_io import load_model

    proto = load_model(model)
    consts = {t.name for t in proto.graph.initializer}
    return [_info(vi) for vi in proto.graph.input if vi.name not in consts]


def _info(vi: onnx.ValueInfoProto) -> TensorInfo:
    t = vi.type.tensor_type
    dtype = None
    if t.elem_type:
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(t.elem_type))
    shape = None
    if t.HasField("shape"):
        shape = tuple(
            d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in t.shape.dim
        )
    return TensorInfo(vi.name, dtype, shape)


def batch_of(inputs: Sequence[TensorInfo], batch_size: int | None = None) -> int:
    """The batch every feed must have: a fixed first dim of the model, else batch_size or 1."""
    fixed = {i.name: i.shape[0] for i in inputs if i.shape and isinstance(i.shape[0], int)}
    values = set(fixed.values())
    if len(values) > 1:
        raise DataError(f"model inputs have different fixed batch sizes: {fixed}")
    if values:
        (batch,) = values
        if batch_size is not None and batch_size != batch:
            raise DataError(
                f"model has a fixed batch of {batch} (input {next(iter(fixed))!r}); "
                f"cannot run batches of {batch_size}"
            )
        return batch
    if batch_size is not None and batch_size < 1:
        raise DataError(f"batch size must be at least 1, got {batch_size}")
    return batch_size or 1


class Batches:
    """Iterable of feed dicts; ``len()`` works when the data's size is known up front."""

    def __init__(
        self,
        data: DataLike,
        inputs: InputsLike,
        batch_size: int | None = None,
        max_batches: int | None = None,
    ) -> None:
        self.inputs = model_inputs(inputs)
        self.batch = batch_of(self.inputs, batch_size)
        self.fixed = any(i.shape and isinstance(i.shape[0], int) for i in self.inputs)
        self.max_batches = max_batches
        self.dropped = 0
        self._chunks, sized = _chunks(data)
        self._samples: int | None = None
        if sized:
            self._samples = 0
            for chunk in self._chunks:  # type: ignore[union-attr]
                header = chunk.header()
                self._samples += _check_chunk(
                    chunk.source, {k: v[0] for k, v in header.items()},
                    {k: v[1] for k, v in header.items()}, self.inputs,
                )  # fmt: skip
            if self._samples == 0:
                raise DataError("data holds no samples")
            if self.fixed and self._samples < self.batch:
                raise DataError(
                    f"data holds {self._samples} sample(s) but the model needs batches "
                    f"of {self.batch}"
                )

    @property
    def samples(self) -> int | None:
        """Samples in the data (None for an unsized iterable)."""
        return self._samples

    def __len__(self) -> int:
        if self._samples is None:
            raise TypeError("the number of batches of an unsized iterable is unknown")
        full, rest = divmod(self._samples, self.batch)
        count = full + (1 if rest and not self.fixed else 0)
        return count if self.max_batches is None else min(count, self.max_batches)

    def __iter__(self) -> Iterator[Feeds]:
        self.dropped = 0
        names = [i.name for i in self.inputs]
        pending: dict[str, list[np.ndarray]] = {n: [] for n in names}
        have = 0
        emitted = 0
        seen_any = False
        for index, item in enumerate(self._chunks):
            chunk = item if isinstance(item, _Chunk) else _Chunk(f"data[{index}]", arrays=item)
            arrays = chunk.load()
            if self._samples is None:
                _check_chunk(
                    chunk.source, {k: v.shape for k, v in arrays.items()},
                    {k: v.dtype for k, v in arrays.items()}, self.inputs,
                )  # fmt: skip
            arrays = {i.name: _cast(arrays[i.name], i, chunk.source) for i in self.inputs}
            count = len(arrays[names[0]]) if names else 0
            seen_any = seen_any or count > 0
            start = 0
            while start < count:
                take = min(self.batch - have, count - start)
                for n in names:
                    pending[n].append(arrays[n][start : start + take])
                have += take
                start += take
                if have == self.batch:
                    yield _concat(pending)
                    emitted += 1
                    if self.max_batches is not None and emitted >= self.max_batches:
                        return
                    pending = {n: [] for n in names}
                    have = 0
        if not seen_any:
            raise DataError("data holds no samples")
        if have:
            if self.fixed:
                self.dropped = have
                if emitted == 0:
                    raise DataError(
                        f"data holds {have} sample(s) but the model needs batches of {self.batch}"
                    )
            else:
                yield _concat(pending)


def iter_batches(
    data: DataLike,
    model_or_session_inputs: InputsLike,
    batch_size: int | None = None,
    max_batches: int | None = None,
) -> Batches:
    """Feed dicts for the model cut from `data`; validates names, shapes and dtypes first."""
    return Batches(data, model_or_session_inputs, batch_size, max_batches)


def _concat(parts: dict[str, list[np.ndarray]]) -> Feeds:
    return {
        n: (p[0] if len(p) == 1 else np.concatenate(p, axis=0)).copy() for n, p in parts.items()
    }


def _check_chunk(
    source: str,
    shapes: Mapping[str, tuple[int, ...]],
    dtypes: Mapping[str, np.dtype],
    inputs: Sequence[TensorInfo],
) -> int:
    """Validate one chunk against the model inputs; returns its number of samples."""
    expected = {i.name: i for i in inputs}
    for name in shapes:
        if name not in expected:
            raise DataError(
                f"{source}: array {name!r} is not a model input; model inputs are: "
                + ", ".join(expected)
            )
    missing = [n for n in expected if n not in shapes]
    if missing:
        raise DataError(f"{source}: missing input(s) {', '.join(map(repr, missing))}")
    counts = set()
    for name, info in expected.items():
        shape = tuple(shapes[name])
        if not shape:
            raise DataError(
                f"{source}: array {name!r} is a scalar; samples must be stacked along axis 0"
            )
        counts.add(shape[0])
        if info.shape is not None:
            want = info.shape[1:]
            got = shape[1:]
            if len(want) != len(got) or any(
                isinstance(w, int) and w != g for w, g in zip(want, got, strict=True)
            ):
                pretty = ", ".join("?" if not isinstance(d, int) else str(d) for d in info.shape)
                raise DataError(
                    f"{source}: input {name!r} has samples of shape {got} (array {shape}), "
                    f"but the model expects ({pretty}) with samples along axis 0"
                )
        _check_dtype(name, np.dtype(dtypes[name]), info.dtype, source)
    if len(counts) > 1:
        raise DataError(
            f"{source}: arrays hold different numbers of samples: "
            + ", ".join(f"{n}={shapes[n][0]}" for n in expected)
        )
    return counts.pop() if counts else 0


def _check_dtype(name: str, got: np.dtype, want: np.dtype | None, source: str) -> None:
    if want is None or got == want:
        return
    if not np.can_cast(got, want, casting="safe"):
        raise DataError(
            f"{source}: input {name!r} has dtype {got}, but the model expects {want} "
            f"(only lossless casts are applied; convert with .astype(np.{want}))"
        )


def _cast(array: np.ndarray, info: TensorInfo, source: str) -> np.ndarray:
    if info.dtype is None or array.dtype == info.dtype:
        return array
    _check_dtype(info.name, array.dtype, info.dtype, source)
    return array.astype(info.dtype)
