"""Loading and saving: bad files get clear errors, external data stays inside the model folder,
saving is atomic and never touches the input."""

from __future__ import annotations

import os

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import qlinear
from qlinear import onnx_io
from qlinear.errors import ExternalDataError, ModelLoadError


def _model_with_weight(n: int = 4096) -> onnx.ModelProto:
    w = numpy_helper.from_array(np.arange(n, dtype=np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "w"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [n])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [n])],
        initializer=[w],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _save_external(model: onnx.ModelProto, folder, location: str) -> str:
    path = folder / "model.onnx"
    onnx.save_model(model, path, save_as_external_data=True, location="w.bin", size_threshold=0)
    # Point the tensor elsewhere, as a hostile or broken file would.
    proto = onnx.load(path, load_external_data=False)
    for entry in proto.graph.initializer[0].external_data:
        if entry.key == "location":
            entry.value = location
    path.write_bytes(proto.SerializeToString())
    return str(path)


def test_truncated_model_file_is_a_load_error(tmp_path) -> None:
    data = _model_with_weight().SerializeToString()
    path = tmp_path / "cut.onnx"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError, match="cut.onnx"):
        qlinear.Session(path)


def test_garbage_file_is_a_load_error(tmp_path) -> None:
    path = tmp_path / "junk.onnx"
    path.write_bytes(b"this is not protobuf \xff\xfe" * 10)
    with pytest.raises(ModelLoadError, match="junk.onnx"):
        qlinear.load_model(path)


def test_empty_and_missing_files_are_load_errors(tmp_path) -> None:
    (tmp_path / "empty.onnx").write_bytes(b"")
    with pytest.raises(ModelLoadError, match="empty"):
        qlinear.load_model(tmp_path / "empty.onnx")
    with pytest.raises(ModelLoadError, match="does not exist"):
        qlinear.load_model(tmp_path / "nowhere.onnx")


def test_external_data_inside_the_folder_loads(tmp_path) -> None:
    path = _save_external(_model_with_weight(), tmp_path, "w.bin")
    session = qlinear.Session(path)
    x = np.zeros(4096, np.float32)
    np.testing.assert_array_equal(session.run(None, {"x": x})[0], np.arange(4096, dtype=np.float32))


@pytest.mark.parametrize("location", ["../w.bin", "sub/../../w.bin"])
def test_external_data_escaping_with_dotdot_is_refused(tmp_path, location) -> None:
    inner = tmp_path / "inner"
    inner.mkdir()
    path = _save_external(_model_with_weight(), inner, location)
    (tmp_path / "w.bin").write_bytes((inner / "w.bin").read_bytes())
    with pytest.raises(ExternalDataError, match="outside the model's folder"):
        qlinear.Session(path)


def test_external_data_with_absolute_path_is_refused(tmp_path) -> None:
    target = tmp_path / "w_abs.bin"
    path = _save_external(_model_with_weight(), tmp_path, str(target))
    target.write_bytes((tmp_path / "w.bin").read_bytes())
    with pytest.raises(ExternalDataError, match="absolute path"):
        qlinear.load_model(path)


def test_external_data_through_symlink_out_of_folder_is_refused(tmp_path) -> None:
    inner = tmp_path / "inner"
    inner.mkdir()
    path = _save_external(_model_with_weight(), inner, "link.bin")
    (inner / "w.bin").rename(tmp_path / "outside.bin")
    os.symlink(tmp_path / "outside.bin", inner / "link.bin")
    with pytest.raises(ExternalDataError, match="outside the model's folder"):
        qlinear.load_model(path)


def test_missing_external_file_names_tensor(tmp_path) -> None:
    path = _save_external(_model_with_weight(), tmp_path, "w.bin")
    (tmp_path / "w.bin").unlink()
    with pytest.raises(ExternalDataError, match="tensor 'w'"):
        qlinear.load_model(path)


def test_save_is_atomic_and_loadable(tmp_path) -> None:
    out = onnx_io.save_model(_model_with_weight(), tmp_path / "out.onnx")
    assert [p.name for p in tmp_path.iterdir()] == ["out.onnx"]
    onnx.checker.check_model(onnx.load(out))


def test_failed_save_leaves_previous_file_intact(tmp_path, monkeypatch) -> None:
    out = tmp_path / "out.onnx"
    out.write_bytes(b"previous")

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(onnx_io.os, "fsync", boom)
    with pytest.raises(OSError, match="disk full"):
        onnx_io.save_model(_model_with_weight(), out)
    assert out.read_bytes() == b"previous"
    assert [p.name for p in tmp_path.iterdir()] == ["out.onnx"]


def test_save_refuses_to_overwrite_its_source(tmp_path) -> None:
    src = tmp_path / "in.onnx"
    onnx.save(_model_with_weight(), src)
    before = src.read_bytes()
    with pytest.raises(ValueError, match="is the input file"):
        onnx_io.save_model(_model_with_weight(8), src, source=src)
    assert src.read_bytes() == before


def test_models_over_the_protobuf_limit_are_saved_with_external_data(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(onnx_io, "PROTOBUF_LIMIT", 1024)
    model = _model_with_weight()
    before = model.SerializeToString()
    out = onnx_io.save_model(model, tmp_path / "big.onnx")
    assert (tmp_path / "big.onnx.data").stat().st_size == 4096 * 4
    assert model.SerializeToString() == before, "the caller's model must not be converted"
    session = qlinear.Session(out)
    x = np.ones(4096, np.float32)
    np.testing.assert_array_equal(session.run(None, {"x": x})[0], np.arange(4096) + 1.0)


def test_saved_files_get_the_usual_permissions(tmp_path) -> None:
    mask = os.umask(0o022)
    try:
        out = onnx_io.save_model(_model_with_weight(8), tmp_path / "perm.onnx")
    finally:
        os.umask(mask)
    assert out.stat().st_mode & 0o777 == 0o644
