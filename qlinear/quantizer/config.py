"""Quantizer options as frozen dataclasses; the defaults are the accurate choice, no tuning.

Defaults: int8 symmetric per-channel weights, uint8 asymmetric activations calibrated
with the MSE search over a 2048-bin histogram, Relu/Clip absorbed, mask-like tensors
(float32-lowest sentinels) kept float, constant operands of Add/Mul kept float (a
bias add after MatMul stays exact and fuses as a float bias), transformer residual
Adds (read by a layer norm) kept float: the residual stream carries outlier channels.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from qlinear.calibration.methods import METHODS
from qlinear.quant import quant_dtype

WEIGHT_GRANULARITIES = ("per_tensor", "per_channel", "blockwise")
_WEIGHT_TYPES = ("int8", "uint8", "int4", "uint4")
_ACT_TYPES = ("uint8", "int8", "uint16", "int16")


@dataclass(frozen=True)
class SmoothQuantConfig:
    """Migrate activation outliers into MatMul weights: s = amax(X)^a / amax(W)^(1-a)."""

    alpha: float = 0.5


@dataclass(frozen=True)
class SensitivityConfig:
    """Keep the `keep_float` worst layers float, or as many as needed for `target_sqnr` dB."""

    keep_float: int = 0
    target_sqnr: float | None = None
    batches: int = 4


@dataclass(frozen=True)
class QuantConfig:
    """Everything `quantize` can be told; all fields have working defaults."""

    mode: str = "static"  # "static" (calibrated QDQ) or "dynamic"
    weight_type: str = "int8"
    weight_granularity: str = "per_channel"
    weight_symmetric: bool = True
    block_size: int = 32
    activation_type: str = "uint8"
    activation_symmetric: bool = False
    calibration: str = "mse"
    percentile: float = 99.999
    num_bins: int = 2048
    dynamic_per_token: bool = False
    exclude_nodes: tuple[str, ...] = ()
    exclude_op_types: tuple[str, ...] = ()
    keep_float_tensors: tuple[str, ...] = ()
    quantize_constant_operands: bool = False
    float_residual_adds: bool = True
    bias_correction: bool = False
    smoothquant: SmoothQuantConfig | None = None
    sensitivity: SensitivityConfig | None = None
    fold_batchnorm: bool = True
    progress: bool = True

    def __post_init__(self) -> None:
        if self.mode not in ("static", "dynamic"):
            raise ValueError(f"mode must be 'static' or 'dynamic', got {self.mode!r}")
        if self.weight_type not in _WEIGHT_TYPES:
            raise ValueError(
                f"weight_type must be one of {_WEIGHT_TYPES}, got {self.weight_type!r}"
            )
        if self.activation_type not in _ACT_TYPES:
            raise ValueError(
                f"activation_type must be one of {_ACT_TYPES}, got {self.activation_type!r}"
            )
        if self.weight_granularity not in WEIGHT_GRANULARITIES:
            raise ValueError(
                f"weight_granularity must be one of {WEIGHT_GRANULARITIES}, "
                f"got {self.weight_granularity!r}"
            )
        if self.calibration not in METHODS:
            raise ValueError(f"calibration must be one of {METHODS}, got {self.calibration!r}")
        if self.block_size < 2:
            raise ValueError(f"block_size must be at least 2, got {self.block_size}")
        if not 50 < self.percentile <= 100:
            raise ValueError(f"percentile must be in (50, 100], got {self.percentile}")
        if self.smoothquant is not None and not 0 <= self.smoothquant.alpha <= 1:
            raise ValueError(f"smoothquant alpha must be in [0, 1], got {self.smoothquant.alpha}")

    @property
    def weight_dtype(self) -> np.dtype:
        return quant_dtype(self.weight_type).np_dtype

    @property
    def activation_dtype(self) -> np.dtype:
        return quant_dtype(self.activation_type).np_dtype

    @property
    def needs_opset21(self) -> bool:
        """int4, int16 Q/DQ and blocked DequantizeLinear exist in the default domain from 21."""
        return (
            self.weight_granularity == "blockwise"
            or self.weight_type in ("int4", "uint4")
            or self.activation_type in ("int16", "uint16")
            or (self.mode == "dynamic" and self.dynamic_per_token)
        )
