"""ResNet- and MobileNetV2-style CNNs with realistic weight and activation scales.

Convs use He init; every conv is followed by a real BatchNormalization node (the
quantizer folds them) whose running stats track the activations, so values stay
O(1) through depth instead of blowing up or collapsing.
"""

from __future__ import annotations

import numpy as np
import onnx

from ._builder import GraphBuilder, batch_dim, pick_config

_RESNET = {
    "small": {"image_size": 32, "stem": 8, "widths": (8, 16, 32), "blocks": (1, 1, 1),
              "num_classes": 10},
    "realistic": {"image_size": 224, "stem": 64, "widths": (64, 128, 256, 512),
                  "blocks": (2, 2, 2, 2), "num_classes": 1000},
}  # fmt: skip

# MobileNetV2 inverted-residual settings: (expansion t, channels c, repeats n, stride s).
_MOBILENET = {
    "small": {"image_size": 32, "stem": 8, "last": 64, "num_classes": 10,
              "settings": ((1, 8, 1, 1), (4, 16, 2, 2), (4, 24, 2, 2))},
    "realistic": {"image_size": 224, "stem": 32, "last": 1280, "num_classes": 1000,
                  "settings": ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2),
                               (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))},
}  # fmt: skip


def _image_input(b: GraphBuilder, batch: int | None, image_size: int) -> str:
    # Normalised images: roughly zero mean, unit variance per channel.
    return b.input(
        "pixel_values",
        (batch_dim(batch), 3, image_size, image_size),
        moments=(np.zeros(3), np.ones(3)),
    )


def _basic_block(b: GraphBuilder, x: str, width: int, stride: int) -> str:
    out = b.relu(b.bn(b.conv(x, width, 3, stride, name="conv1"), name="bn1"))
    out = b.bn(b.conv(out, width, 3, 1, name="conv2"), name="bn2")
    shortcut = x
    if stride != 1 or b.shapes[x][1] != width:
        shortcut = b.conv(x, width, 1, stride, pad=0, name="downsample.0")
        shortcut = b.bn(shortcut, name="downsample.1")
    return b.relu(b.add(out, shortcut))


def resnet(
    size: str = "small",
    *,
    seed: int = 0,
    opset: int = 17,
    batch: int | None = None,
    image_size: int | None = None,
    num_classes: int | None = None,
) -> onnx.ModelProto:
    """ResNet with basic blocks; ``"realistic"`` is the ResNet-18 layout at 224x224.

    Stem Conv7x7/2 + BN + Relu + MaxPool3x3/2, stages of basic blocks (1x1 stride-2
    projection shortcuts), GlobalAveragePool, Flatten, Gemm head. Input
    ``pixel_values`` [N, 3, H, W], output ``logits`` [N, classes].
    """
    cfg = pick_config(_RESNET, size, "resnet")
    image_size = image_size or cfg["image_size"]
    num_classes = num_classes or cfg["num_classes"]
    name = "resnet18" if size == "realistic" else "resnet_small"
    b = GraphBuilder(name, seed=seed, opset=opset)
    x = _image_input(b, batch, image_size)
    x = b.relu(b.bn(b.conv(x, cfg["stem"], 7, 2, pad=3, name="conv1"), name="bn1"))
    x = b.maxpool(x, 3, 2, 1)
    for stage, (width, blocks) in enumerate(zip(cfg["widths"], cfg["blocks"], strict=True)):
        for i in range(blocks):
            with b.scope(f"layer{stage + 1}.{i}"):
                x = _basic_block(b, x, width, 2 if stage > 0 and i == 0 else 1)
    x = b.flatten(b.global_avgpool(x))
    b.output(b.gemm(x, num_classes, name="fc"), "logits")
    return b.build(
        doc=f"ResNet-style CNN ({size}), seeded random weights (seed={seed}).",
        metadata={"model": "resnet", "size": size, "seed": seed, "image_size": image_size},
    )


def _inverted_residual(b: GraphBuilder, x: str, t: int, cout: int, stride: int) -> str:
    cin = b.shapes[x][1]
    assert isinstance(cin, int)
    hidden = cin * t
    h = x
    if t != 1:
        h = b.relu6(b.bn(b.conv(h, hidden, 1, name="expand"), name="expand_bn"))
    h = b.relu6(b.bn(b.conv(h, hidden, 3, stride, groups=hidden, name="dw"), name="dw_bn"))
    h = b.bn(b.conv(h, cout, 1, name="project"), name="project_bn")
    return b.add(h, x) if stride == 1 and cin == cout else h


def mobilenet_v2(
    size: str = "small",
    *,
    seed: int = 0,
    opset: int = 17,
    batch: int | None = None,
    image_size: int | None = None,
    num_classes: int | None = None,
) -> onnx.ModelProto:
    """MobileNetV2; ``"realistic"`` is MobileNetV2-1.0 at 224x224 (3.5M parameters).

    Inverted residuals: 1x1 expand + BN + Clip(0,6), depthwise 3x3 (group=C) + BN +
    Clip(0,6), 1x1 project + BN, residual Add when shapes match; final 1x1 conv,
    GlobalAveragePool, Flatten, Gemm head. Input ``pixel_values``, output ``logits``.
    """
    cfg = pick_config(_MOBILENET, size, "mobilenet_v2")
    image_size = image_size or cfg["image_size"]
    num_classes = num_classes or cfg["num_classes"]
    name = "mobilenet_v2" if size == "realistic" else "mobilenet_v2_small"
    b = GraphBuilder(name, seed=seed, opset=opset)
    x = _image_input(b, batch, image_size)
    with b.scope("features.0"):
        x = b.relu6(b.bn(b.conv(x, cfg["stem"], 3, 2)))
    index = 1
    for t, c, n, s in cfg["settings"]:
        for i in range(n):
            with b.scope(f"features.{index}"):
                x = _inverted_residual(b, x, t, c, s if i == 0 else 1)
            index += 1
    with b.scope(f"features.{index}"):
        x = b.relu6(b.bn(b.conv(x, cfg["last"], 1)))
    x = b.flatten(b.global_avgpool(x))
    b.output(b.gemm(x, num_classes, name="classifier"), "logits")
    return b.build(
        doc=f"MobileNetV2-style CNN ({size}), seeded random weights (seed={seed}).",
        metadata={"model": "mobilenet_v2", "size": size, "seed": seed, "image_size": image_size},
    )
