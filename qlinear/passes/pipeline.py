"""The optimizer's ordered pass list, in one place, and `optimize(model)`.

Order matters: float folds first (BatchNorm, per-channel Mul) so the weights are final;
then exact Q/DQ folds and integer data movement, so that node units are as large as
possible; then the QLinear fusions (Conv/MatMul/Gemm before elementwise, table lookups
for the elementwise chains no QLinear op covers, int8->float last so it only sees
products whose output is not quantized; then chains of 8-bit elementwise ops of one tensor
collapse into one lookup). The whole list runs to
a fixed point, with dead nodes removed after every step; running it again on its
own output changes nothing.
"""

from __future__ import annotations

import onnx
import onnx_ir as ir
from onnx_ir import passes
from onnx_ir.passes import common

from qlinear.onnx_io import ModelLike, load_model
from qlinear.passes._infra import ExplainLog
from qlinear.passes.fold_batchnorm import FoldBatchNormPass
from qlinear.passes.fold_scale import FoldScalePass
from qlinear.passes.fuse_int8_float import FuseInt8FloatPass
from qlinear.passes.fuse_integer_lookup import FuseIntegerLookupPass
from qlinear.passes.fuse_qlinear import FuseQLinearPass
from qlinear.passes.fuse_qlinear_elementwise import FuseQLinearElementwisePass
from qlinear.passes.fuse_table_lookup import FuseTableLookupPass
from qlinear.passes.layout import LayoutPass
from qlinear.passes.qdq_fold import CancelDQQPass, IntegerDataMovementPass

#: Maximum pass-list iterations before giving up on reaching a fixed point.
MAX_STEPS = 8
#: Memory format of convolutions and pools after `optimize` (see `LayoutPass`).
DEFAULT_LAYOUT = "nhwc"


def float_passes(log: ExplainLog | None = None) -> list[passes.PassBase]:
    """Folds that are exact on a float graph (run before quantization, too)."""
    return [FoldBatchNormPass(log), FoldScalePass(log)]


def quantized_passes(log: ExplainLog | None = None) -> list[passes.PassBase]:
    """Q/DQ folds and the QLinear fusions, in order."""
    return [
        CancelDQQPass(log),
        IntegerDataMovementPass(log),
        FuseQLinearPass(log),
        FuseQLinearElementwisePass(log),
        FuseTableLookupPass(log),
        FuseIntegerLookupPass(log),
        FuseInt8FloatPass(log),
    ]


def default_passes(log: ExplainLog | None = None) -> list[passes.PassBase]:
    return [*float_passes(log), *quantized_passes(log), common.RemoveUnusedNodesPass()]


def layout_passes(
    layout: str = DEFAULT_LAYOUT, log: ExplainLog | None = None, *, custom_ops: bool = False
) -> list[passes.PassBase]:
    """Last, once the fused operators are final: the NHWC layout pass (none for "nchw")."""
    if layout not in ("nchw", "nhwc"):
        raise ValueError(f"layout must be 'nchw' or 'nhwc', got {layout!r}")
    if layout == "nchw":
        return []
    return [LayoutPass(log, custom_ops=custom_ops), common.RemoveUnusedNodesPass()]


def run_passes(model: ir.Model, pass_list: list[passes.PassBase]) -> bool:
    """Run `pass_list` to a fixed point on `model` in place; True if anything changed."""
    manager = passes.PassManager(pass_list, steps=MAX_STEPS, early_stop=True)
    result = manager(model)
    common.TopologicalSortPass()(model)
    return result.modified


def _to_ir(model: ModelLike) -> ir.Model:
    proto = load_model(model)
    try:
        proto = onnx.shape_inference.infer_shapes(proto)
    except Exception:  # noqa: BLE001 - shapes are a help, not a requirement
        pass
    return ir.from_proto(proto)


def optimize(
    model: ModelLike,
    *,
    log: ExplainLog | None = None,
    layout: str = DEFAULT_LAYOUT,
    custom_ops: bool = False,
) -> onnx.ModelProto:
    """QDQ (or float) model => fused QLinear/int8 model; the input is never modified.

    layout: "nhwc" runs convolutions and pools channels-last, "nchw" leaves them.
    custom_ops: allow qlinear-only operators (ai.qlinear.ConvInteger channels-last for
    dynamic quantization); the result then no longer loads in onnxruntime.
    """
    ir_model = _to_ir(model)
    run_passes(ir_model, default_passes(log))
    tail = layout_passes(layout, log, custom_ops=custom_ops)
    if tail:
        run_passes(ir_model, tail)
    return ir.to_proto(ir_model)


def fold_float(model: ModelLike) -> onnx.ModelProto:
    """Only the float pre-passes (BatchNorm and per-channel Mul folding), e.g. before
    quantizing with a tool that does not fold them."""
    ir_model = _to_ir(model)
    run_passes(ir_model, [*float_passes(), common.RemoveUnusedNodesPass()])
    return ir.to_proto(ir_model)
