"""A model zoo built in code: seeded float ONNX models of realistic scale, no downloads.

Tests, the README example and benchmarks need real architectures (BN to fold,
depthwise convs, attention masks, GELU) with realistic weight and activation
scales, but must not depend on the network. Every builder takes ``size``
("small": milliseconds to run; "realistic": ResNet-18 / MobileNetV2-1.0 / BERT-base
widths / ViT-S/16), ``seed`` and ``opset`` (13..21, default 17), and returns an
``onnx.ModelProto`` that passes ``onnx.checker.check_model(full_check=True)``.

>>> from qlinear import zoo
>>> model = zoo.build("resnet", "small")
>>> feeds = zoo.example_inputs("resnet", model, batch=2)
>>> calib = zoo.calibration_batches("resnet", model, n=4, batch=8)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import onnx
from onnx import helper

from .cnn import mobilenet_v2, resnet
from .data import calibration_batches, example_inputs
from .transformer import bert, vit

#: Zoo model name -> builder ``(size="small", *, seed=0, opset=17, **kw) -> ModelProto``.
MODELS: dict[str, Callable[..., onnx.ModelProto]] = {
    "resnet": resnet,
    "mobilenet_v2": mobilenet_v2,
    "bert": bert,
    "vit": vit,
}


def build(name: str, size: str = "small", **kwargs: Any) -> onnx.ModelProto:
    """Build zoo model ``name`` at ``size``; keyword arguments go to its builder."""
    if name not in MODELS:
        raise ValueError(f"unknown zoo model {name!r}; choose one of {sorted(MODELS)}")
    return MODELS[name](size, **kwargs)


def count_params(model: onnx.ModelProto) -> int:
    """Trainable parameters, counted as torch does: float initializers minus
    BatchNormalization running statistics (buffers) and scalar constants."""
    buffers = {
        name
        for node in model.graph.node
        if node.op_type == "BatchNormalization"
        for name in node.input[3:5]
    }
    total = 0
    for init in model.graph.initializer:
        if init.name in buffers or len(init.dims) == 0:
            continue
        if np.issubdtype(helper.tensor_dtype_to_np_dtype(init.data_type), np.floating):
            total += int(np.prod(init.dims))
    return total


__all__ = [
    "MODELS",
    "bert",
    "build",
    "calibration_batches",
    "count_params",
    "example_inputs",
    "mobilenet_v2",
    "resnet",
    "vit",
]
