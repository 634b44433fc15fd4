"""The shared dataset format: files, folders, in-memory feeds, batching and validation."""

from __future__ import annotations

import numpy as np
import pytest

from qlinear.data import DataError, iter_batches
from qlinear.runtime.session import TensorInfo

F32 = np.dtype(np.float32)
I64 = np.dtype(np.int64)
DYNAMIC = [TensorInfo("x", F32, ("N", 3)), TensorInfo("ids", I64, ("N", 2))]
FIXED = [TensorInfo("x", F32, (4, 3))]


def _arrays(n: int, start: int = 0) -> dict[str, np.ndarray]:
    x = np.arange(start * 3, (start + n) * 3, dtype=np.float32).reshape(n, 3)
    return {"x": x, "ids": np.arange(start * 2, (start + n) * 2, dtype=np.int64).reshape(n, 2)}


def test_npz_file_dynamic_batch(tmp_path):
    np.savez(tmp_path / "d.npz", **_arrays(5))
    batches = iter_batches(tmp_path / "d.npz", DYNAMIC, batch_size=2)
    assert len(batches) == 3 and batches.samples == 5
    got = list(batches)
    assert [b["x"].shape[0] for b in got] == [2, 2, 1]
    np.testing.assert_array_equal(np.concatenate([b["x"] for b in got]), _arrays(5)["x"])


def test_default_batch_is_one(tmp_path):
    np.savez(tmp_path / "d.npz", **_arrays(3))
    assert [b["x"].shape for b in iter_batches(tmp_path / "d.npz", DYNAMIC)] == [(1, 3)] * 3


def test_folder_is_read_in_sorted_order_and_batches_cross_files(tmp_path):
    np.savez(tmp_path / "b.npz", **_arrays(3, start=3))
    np.savez(tmp_path / "a.npz", **_arrays(3, start=0))
    (tmp_path / "notes.txt").write_text("ignored")
    batches = iter_batches(tmp_path, [TensorInfo("x", F32, (4, 3)), DYNAMIC[1]])
    assert batches.batch == 4 and len(batches) == 1
    (only,) = list(batches)
    np.testing.assert_array_equal(only["x"], _arrays(6)["x"][:4])
    assert batches.dropped == 2  # a fixed batch drops the incomplete tail


def test_in_memory_feed_dicts_and_generators():
    chunks = [_arrays(2), _arrays(2, start=2)]
    assert len(iter_batches(chunks, DYNAMIC, batch_size=4)) == 1
    gen = iter_batches((c for c in chunks), DYNAMIC, batch_size=3)
    with pytest.raises(TypeError):
        len(gen)
    assert [b["x"].shape[0] for b in gen] == [3, 1]


def test_max_batches_and_session_inputs(tmp_path):
    class FakeSession:
        def get_inputs(self):
            return DYNAMIC

    batches = iter_batches(_arrays(10), FakeSession(), batch_size=2, max_batches=2)
    assert len(batches) == 2 and len(list(batches)) == 2


def test_lossless_cast_is_applied():
    data = {"x": _arrays(2)["x"].astype(np.float16), "ids": _arrays(2)["ids"].astype(np.int32)}
    (batch,) = list(iter_batches(data, DYNAMIC, batch_size=2))
    assert batch["x"].dtype == F32 and batch["ids"].dtype == I64


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({**_arrays(2), "y": np.zeros((2, 3), np.float32)}, "'y' is not a model input"),
        ({"x": _arrays(2)["x"]}, "missing input(s) 'ids'"),
        ({**_arrays(2), "x": np.zeros((2, 4), np.float32)}, "input 'x' has samples of shape"),
        ({**_arrays(2), "x": np.zeros((2, 3), np.float64)}, "dtype float64, but the model"),
        ({**_arrays(2), "ids": np.zeros((2, 2), np.float32)}, "dtype float32, but the model"),
        ({**_arrays(2), "ids": np.zeros((3, 2), np.int64)}, "different numbers of samples"),
        ({"x": np.zeros((0, 3), np.float32), "ids": np.zeros((0, 2), np.int64)}, "no samples"),
    ],
)
def test_bad_data_gives_one_clear_error(data, message):
    with pytest.raises(DataError) as info:
        iter_batches(data, DYNAMIC)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_bad_paths_and_too_few_samples(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        iter_batches(tmp_path / "missing.npz", DYNAMIC)
    with pytest.raises(DataError, match="no .npz files"):
        iter_batches(tmp_path, DYNAMIC)
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(DataError, match="not a readable .npz"):
        iter_batches(tmp_path / "bad.npz", DYNAMIC)
    with pytest.raises(DataError, match="needs batches of 4"):
        iter_batches({"x": np.zeros((3, 3), np.float32)}, FIXED)
    with pytest.raises(DataError, match="fixed batch of 4"):
        iter_batches({"x": np.zeros((8, 3), np.float32)}, FIXED, batch_size=2)


def test_unsized_iterable_is_validated_while_iterating():
    bad = iter_batches(iter([{"x": np.zeros((1, 3), np.float64)}]), [TensorInfo("x", F32, None)])
    with pytest.raises(DataError, match="float64"):
        list(bad)
