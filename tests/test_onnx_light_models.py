"""The light model zoo shipped inside the onnx package runs and matches onnxruntime.

These are old IR-3 models (opset 9) that list their initializers as graph inputs and
build weights with ConstantOfShape: a good test of planning, folding and old opsets.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

import qlinear

ort = pytest.importorskip("onnxruntime")

LIGHT_DIR = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light"
MODELS = sorted(p.name for p in LIGHT_DIR.glob("light_*.onnx"))


def _feeds(session: qlinear.Session, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    feeds = {}
    for info in session.get_inputs():
        shape = [d if isinstance(d, int) else 1 for d in info.shape]
        feeds[info.name] = rng.standard_normal(shape).astype(info.dtype)
    return feeds


def test_light_models_are_present() -> None:
    assert len(MODELS) >= 9


@pytest.mark.parametrize("name", MODELS)
def test_light_model_matches_onnxruntime(name: str) -> None:
    path = LIGHT_DIR / name
    session = qlinear.Session(path)
    feeds = _feeds(session, seed=0)
    ours = session.run(None, feeds)
    del session
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    reference = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    theirs = reference.run(None, feeds)
    for a, b in zip(ours, theirs, strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype
        # Softmax outputs of float32 nets with identical weights; summation order differs.
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5)
