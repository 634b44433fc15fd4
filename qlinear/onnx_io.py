"""Loading and saving ONNX models: the one place files cross into qlinear.

Loading accepts a path, bytes or a ModelProto and resolves external data only
from inside the model's own folder. Saving is atomic (temporary file + rename),
refuses to overwrite the file a model came from, and switches to external data
when the protobuf would exceed its 2 GB limit.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import onnx
from google.protobuf.message import DecodeError
from onnx import external_data_helper

from qlinear.errors import ExternalDataError, ModelLoadError

ModelLike = str | os.PathLike | bytes | onnx.ModelProto

#: protobuf refuses to serialize messages of 2 GiB or more; stay clear of it.
PROTOBUF_LIMIT = 2**31 - 2**20


def load_model(model: ModelLike, *, base_dir: str | os.PathLike | None = None) -> onnx.ModelProto:
    """Load a model with its external data; never modifies a ModelProto given by the caller.

    `base_dir` is where external data of a bytes/ModelProto model lives (a path's
    own folder is used for paths).
    """
    if isinstance(model, onnx.ModelProto):
        if not _external_tensors(model):
            return model
        proto = onnx.ModelProto()
        proto.CopyFrom(model)
        if base_dir is None:
            raise ExternalDataError(
                "model has tensors stored as external data but no folder was given to load "
                "them from; pass base_dir= or load it from its path"
            )
        _load_external(proto, Path(base_dir), source="model")
        return proto
    if isinstance(model, (bytes, bytearray, memoryview)):
        proto = _parse(bytes(model), source="model bytes")
        if _external_tensors(proto):
            if base_dir is None:
                raise ExternalDataError(
                    "model bytes reference external data but no folder was given; "
                    "pass base_dir= or load the model from its path"
                )
            _load_external(proto, Path(base_dir), source="model bytes")
        return proto
    if isinstance(model, (str, os.PathLike)):
        path = Path(model)
        if not path.is_file():
            raise ModelLoadError(f"model file {str(path)!r} does not exist or is not a file")
        proto = _parse(path.read_bytes(), source=str(path))
        if _external_tensors(proto):
            _load_external(proto, Path(base_dir) if base_dir else path.parent, source=str(path))
        return proto
    raise TypeError(f"expected a path, bytes or onnx.ModelProto, got {type(model).__name__}")


def _parse(data: bytes, source: str) -> onnx.ModelProto:
    if not data:
        raise ModelLoadError(f"{source} is empty, not an ONNX model")
    proto = onnx.ModelProto()
    try:
        proto.ParseFromString(data)
    except (DecodeError, RuntimeError, ValueError) as exc:
        raise ModelLoadError(
            f"{source} is not a valid ONNX model (truncated or not protobuf): {exc}"
        ) from None
    if not proto.HasField("graph") or (not proto.opset_import and proto.ir_version == 0):
        raise ModelLoadError(f"{source} is not a valid ONNX model: it has no graph or opset")
    return proto


def _external_tensors(model: onnx.ModelProto) -> list[onnx.TensorProto]:
    return [
        t
        for t in external_data_helper._get_all_tensors(model)
        if external_data_helper.uses_external_data(t)
    ]


def _load_external(model: onnx.ModelProto, base_dir: Path, source: str) -> None:
    base = base_dir.resolve()
    for tensor in _external_tensors(model):
        info = {e.key: e.value for e in tensor.external_data}
        location = info.get("location", "")
        if not location:
            raise ExternalDataError(
                f"{source}: tensor {tensor.name!r} has external data with no location"
            )
        if os.path.isabs(location) or Path(location).drive:
            raise ExternalDataError(
                f"{source}: tensor {tensor.name!r} points to external data at absolute path "
                f"{location!r}; only files inside the model's folder are allowed"
            )
        target = (base / location).resolve()
        if not target.is_relative_to(base):
            raise ExternalDataError(
                f"{source}: tensor {tensor.name!r} points to external data {location!r}, "
                "which is outside the model's folder"
            )
        if not target.is_file():
            raise ExternalDataError(
                f"{source}: external data file {location!r} for tensor {tensor.name!r} is missing"
            )
        offset = int(info.get("offset", 0) or 0)
        length = info.get("length")
        size = target.stat().st_size
        if offset > size or (length is not None and offset + int(length) > size):
            raise ExternalDataError(
                f"{source}: external data for tensor {tensor.name!r} lies beyond the end of "
                f"{location!r} ({size} bytes)"
            )
    try:
        external_data_helper.load_external_data_for_model(model, str(base))
    except (OSError, ValueError) as exc:
        raise ExternalDataError(f"{source}: could not read external data: {exc}") from None


def check_output_path(output: str | os.PathLike, *inputs: str | os.PathLike) -> Path:
    """Refuse an output path that is one of the input files (we never overwrite user input)."""
    out = Path(output)
    for item in inputs:
        if Path(item).exists() and out.exists() and out.resolve() == Path(item).resolve():
            raise ValueError(f"output {str(out)!r} is the input file; choose another output path")
    return out


def save_model(
    model: onnx.ModelProto,
    path: str | os.PathLike,
    *,
    external_data: bool | None = None,
    source: str | os.PathLike | None = None,
) -> Path:
    """Write `model` to `path` atomically; external data beside it if too big (or asked).

    `source` is the file the model was read from, which is never overwritten.
    """
    out = check_output_path(path, source) if source is not None else Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    if external_data is None:
        external_data = _serialized_size(model) >= PROTOBUF_LIMIT
    if not external_data:
        atomic_write(out, model.SerializeToString())
        return out
    data_name = out.name + ".data"
    copy = onnx.ModelProto()
    copy.CopyFrom(model)  # onnx's converter rewrites tensors in place
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".qlinear-") as tmp:
        tmp_model = Path(tmp) / out.name
        onnx.save_model(
            copy,
            str(tmp_model),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=data_name,
            size_threshold=1024,
        )
        if (Path(tmp) / data_name).exists():
            os.replace(Path(tmp) / data_name, out.parent / data_name)
        os.replace(tmp_model, out)
    return out


def _serialized_size(model: onnx.ModelProto) -> int:
    total = 0
    for tensor in external_data_helper._get_all_tensors(model):
        total += len(tensor.raw_data)
    try:
        return max(total, model.ByteSize())
    except (ValueError, OverflowError):
        return PROTOBUF_LIMIT


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` so readers see the old file or the new one, never half of it."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the usual mode
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
