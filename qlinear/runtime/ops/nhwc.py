"""Channels-last operators the layout pass emits (design §3 Layout).

- ``com.microsoft.QLinearConv`` (``channels_last`` 0 or 1): ORT's contrib form of
  QLinearConv; with ``channels_last=1`` input and output are [N, H, W, C].
- ``com.microsoft.NhwcMaxPool``: int8/uint8 max pooling on [N, H, W, C].
- ``ai.qlinear.ConvInteger`` (``channels_last=1``): int32 NHWC convolution for
  dynamic-quantized graphs. ORT has no such operator: a model containing it only
  runs in qlinear (the layout pass emits it only when asked to, see `LayoutPass`).

``com.microsoft.QLinearGlobalAveragePool`` with ``channels_last=1`` is implemented in
`contrib_qlinear`. Factories pack the weights once; kernels are in
`qlinear.runtime.kernels.nhwc`.
"""

from __future__ import annotations

import numpy as np

from qlinear.runtime.kernels.config import kernel_choice
from qlinear.runtime.kernels.conv import conv, pack_conv_weights, resolve_pads
from qlinear.runtime.kernels.nhwc import conv_nhwc, conv_nhwc_plan, max_pool_nhwc, run_conv_plan
from qlinear.runtime.kernels.patches import conv_patches
from qlinear.runtime.kernels.program import Replayed
from qlinear.runtime.kernels.requant import output_multiplier
from qlinear.runtime.ops.quantized import (
    ConvAttributes,
    PatchWeights,
    _const_multiplier,
    column_vector,
    scalar_zero_point,
)
from qlinear.runtime.registry import MS_DOMAIN, Kernel, NodeSpec, register

#: Domain of qlinear's own operators (no ORT implementation).
QLINEAR_DOMAIN = "ai.qlinear"

_INT8 = (np.dtype(np.uint8), np.dtype(np.int8))


def _nchw_shape(x: np.ndarray) -> tuple[int, ...]:
    return (x.shape[0], x.shape[-1], *x.shape[1:-1])


class _PackedConv:
    """Weights packed once (constant W and zero point) or per call."""

    def __init__(self, spec: NodeSpec, w_index: int, zp_index: int) -> None:
        w = spec.const(w_index)
        self.attrs = ConvAttributes(spec, None if w is None else w.shape)
        zp_known = not spec.has_input(zp_index) or spec.const(zp_index) is not None
        self._cached = self._pack(w, spec.const(zp_index)) if w is not None and zp_known else None

    def _pack(self, w: np.ndarray, zp: np.ndarray | None):
        if w.dtype not in _INT8:
            raise TypeError(f"W must be uint8 or int8, got {w.dtype}")
        zp_vec = column_vector(zp, w.shape[0], "w_zero_point", np.int32)
        return pack_conv_weights(w, zp_vec, self.attrs.group)

    @property
    def constant(self) -> bool:
        return self._cached is not None

    def get(self, w: np.ndarray, zp: np.ndarray | None):
        return self._cached if self._cached is not None else self._pack(w, zp)


def _check_x(x: np.ndarray) -> None:
    if x.dtype not in _INT8:
        raise TypeError(f"x must be uint8 or int8, got {x.dtype}")
    if x.ndim != 4:
        raise ValueError(f"channels-last convolution is 2-D only, got input rank {x.ndim}")


@register("QLinearConv", domain=MS_DOMAIN, since=1)
def _ms_qlinear_conv(spec: NodeSpec) -> Kernel:
    """Requantized convolution, NHWC when channels_last=1 (else ONNX QLinearConv's NCHW)."""
    weights = _PackedConv(spec, 3, 5)
    channels_last = bool(spec.attr("channels_last", 0))
    w_const = spec.const(3)
    n_out = None if w_const is None else w_const.shape[0]
    # plan-time constants: multipliers and bias are the same for every call
    mult_const = _const_multiplier(spec, 1, 4, 6, n_out)
    bias_const = spec.const(8) if spec.has_input(8) else None
    b32_const = (None if bias_const is None or n_out is None
                 else column_vector(bias_const, n_out, "B", np.int32))
    patches = PatchWeights(spec, 3, 5, channels_last=channels_last)
    # Every parameter constant (the optimizer's output): the plan depends on the input
    # shape only, kept here so a call skips the parameter checks and the memo key.
    constant = (channels_last and weights.constant and mult_const is not None
                and (not spec.has_input(8) or b32_const is not None)
                and spec.const(2) is not None and spec.const(7) is not None)
    plans: dict[tuple, Replayed] = {}

    def run(x: np.ndarray, x_scale: np.ndarray, x_zp: np.ndarray, w: np.ndarray,
            w_scale: np.ndarray, w_zp: np.ndarray, y_scale: np.ndarray, y_zp: np.ndarray,
            bias: np.ndarray | None = None) -> np.ndarray:
        if constant:
            replay = plans.get((x.shape, x.dtype, kernel_choice()))
            if replay is not None:
                return replay(x)[0]
        if x.dtype not in _INT8:
            raise TypeError(f"x must be uint8 or int8, got {x.dtype}")
        packed = weights.get(w, w_zp)
        c_out = packed.c_out
        mult = mult_const if mult_const is not None else output_multiplier(
            x_scale, column_vector(w_scale, c_out, "w_scale", np.float32), y_scale, c_out)
        if bias is None:
            b32 = None
        elif b32_const is not None:
            b32 = b32_const
        else:
            b32 = column_vector(bias, c_out, "B", np.int32)
        out_dtype = np.asarray(y_zp).dtype
        if channels_last:
            _check_x(x)
        nchw = x.shape if not channels_last else _nchw_shape(x)
        strides, dilations, begin, end = weights.attrs.resolve(nchw, w.shape)
        patch = patches.get(nchw[2:], strides, dilations, begin, end, weights.attrs.group)
        if patch is not None:
            return conv_patches(x, scalar_zero_point(x_zp, "x_zero_point"), patch,
                                patches.kernel, channels_last, out_dtype=out_dtype, bias=b32,
                                mult=mult, y_zp=scalar_zero_point(y_zp, "y_zero_point"))
        if not channels_last:
            return conv(x, scalar_zero_point(x_zp, "x_zero_point"), packed, strides, dilations,
                        begin, end, out_dtype=out_dtype, bias=b32, mult=mult,
                        y_zp=scalar_zero_point(y_zp, "y_zero_point"))
        plan = conv_nhwc_plan(x, scalar_zero_point(x_zp, "x_zero_point"), packed, strides,
                              dilations, begin, end, out_dtype=out_dtype, bias=b32, mult=mult,
                              y_zp=scalar_zero_point(y_zp, "y_zero_point"))
        if constant:
            if len(plans) > 16:
                plans.clear()
            # replayed natively after this call (kernels.program): no per-call launch
            replay = plans[(x.shape, x.dtype, kernel_choice())] = Replayed(
                lambda x: (run_conv_plan(plan, x, c_out),), fixed=True)
            return replay(x)[0]
        return run_conv_plan(plan, x, c_out)

    # constant parameters: every call is one planned run of native tasks (native_chain)
    run.replayable = constant
    return run


@register("ConvInteger", domain=QLINEAR_DOMAIN, since=1)
def _conv_integer_nhwc(spec: NodeSpec) -> Kernel:
    """int32 convolution of (x - x_zp) and (w - w_zp) on [N, H, W, C] (channels_last=1)."""
    if not spec.attr("channels_last", 0):
        raise ValueError(f"{spec.describe()}: ai.qlinear.ConvInteger needs channels_last=1")
    weights = _PackedConv(spec, 1, 3)

    def run(x: np.ndarray, w: np.ndarray, x_zp: np.ndarray | None = None,
            w_zp: np.ndarray | None = None) -> np.ndarray:
        _check_x(x)
        packed = weights.get(w, w_zp)
        strides, dilations, begin, end = weights.attrs.resolve(_nchw_shape(x), w.shape)
        return conv_nhwc(x, scalar_zero_point(x_zp, "x_zero_point"), packed, strides, dilations,
                         begin, end, out_dtype=np.int32)

    return run


@register("NhwcMaxPool", domain=MS_DOMAIN, since=1)
def _nhwc_max_pool(spec: NodeSpec) -> Kernel:
    """2-D max pooling on [N, H, W, C]; padding never wins (ONNX MaxPool semantics)."""
    kernel = tuple(int(k) for k in spec.attr("kernel_shape"))
    if len(kernel) != 2:
        raise ValueError(f"{spec.describe()}: NhwcMaxPool is 2-D only")
    strides = tuple(int(s) for s in (spec.attr("strides") or (1, 1)))
    dilations = tuple(int(d) for d in (spec.attr("dilations") or (1, 1)))
    auto_pad = spec.attr("auto_pad", "NOTSET")
    pads = spec.attr("pads")
    ceil_mode = bool(spec.attr("ceil_mode", 0))

    def run(x: np.ndarray) -> np.ndarray:
        if x.ndim != 4:
            raise ValueError(f"NhwcMaxPool wants a rank-4 input, got {x.shape}")
        begin, end = resolve_pads(auto_pad, x.shape[1:3], kernel, strides, dilations,
                                  None if pads is None else tuple(pads))
        return max_pool_nhwc(x, kernel, strides, dilations, begin, end, ceil_mode)

    run.replayable = True  # one run of native tasks per call (native_chain)
    return run
