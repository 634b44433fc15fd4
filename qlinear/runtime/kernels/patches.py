"""Non-overlapping patch convolutions (ViT patch embedding) as one plain GEMM.

When stride == kernel with no padding and no dilation, every input pixel belongs to
exactly one patch, so im2col is a permutation (one copy, no duplication) and the
convolution is a GEMM with K = C*kh*kw. The implicit-GEMM convolution instead pads
each tap's few channels (3 for RGB) to a 4-byte group and walks kh*kw taps per output
pixel: a third more arithmetic and ten times the loop overhead for a 16x16 patch.
"""

from __future__ import annotations

import numpy as np

from qlinear.runtime.kernels.gemm import PackedWeights, gemm, pack_matrix
from qlinear.runtime.kernels.parallel import unrecorded


def is_patchify(
    kernel: tuple[int, ...],
    strides: tuple[int, ...],
    dilations: tuple[int, ...],
    begin: tuple[int, ...],
    end: tuple[int, ...],
    groups: int,
    spatial: tuple[int, ...],
) -> bool:
    """Whether a 2-D convolution tiles its input into disjoint patches (worth a GEMM)."""
    return (
        len(kernel) == 2
        and groups == 1
        and tuple(strides) == tuple(kernel)
        and all(d == 1 for d in dilations)
        and not any(begin)
        and not any(end)
        and kernel[0] * kernel[1] >= 4
        and all(s % k == 0 for s, k in zip(spatial, kernel, strict=True))
    )


def pack_patch_weights(
    w: np.ndarray, w_zp: np.ndarray, channels_last: bool
) -> PackedWeights:
    """W [N, C, kh, kw] as the K x N matrix whose K order matches `patch_rows`."""
    n = w.shape[0]
    wk = w.transpose(0, 2, 3, 1) if channels_last else w
    return pack_matrix(np.ascontiguousarray(wk.reshape(n, -1).T), w_zp)


def patch_rows(x: np.ndarray, kernel: tuple[int, int], channels_last: bool) -> np.ndarray:
    """[B*OH*OW, K] patches of x (NCHW, K ordered c,a,b; or NHWC, K ordered a,b,c)."""
    kh, kw = kernel
    if channels_last:
        b, h, w, c = x.shape
        oh, ow = h // kh, w // kw
        p = x.reshape(b, oh, kh, ow, kw, c).transpose(0, 1, 3, 2, 4, 5)
    else:
        b, c, h, w = x.shape
        oh, ow = h // kh, w // kw
        p = x.reshape(b, c, oh, kh, ow, kw).transpose(0, 2, 4, 1, 3, 5)
    return np.ascontiguousarray(p).reshape(b * oh * ow, c * kh * kw)


def conv_patches(
    x: np.ndarray,
    x_zp: int,
    packed: PackedWeights,
    kernel: tuple[int, int],
    channels_last: bool,
    *,
    out_dtype: type,
    bias: np.ndarray | None,
    mult: np.ndarray,
    y_zp: int,
) -> np.ndarray:
    """Requantized patch convolution; output NCHW, or NHWC when channels_last."""
    unrecorded()  # patch rows and the NCHW output are numpy copies: not replayable
    b = x.shape[0]
    oh, ow = (x.shape[1:3] if channels_last else x.shape[2:4])
    oh, ow = oh // kernel[0], ow // kernel[1]
    rows = gemm(patch_rows(x, kernel, channels_last), x_zp, packed, out_dtype=out_dtype,
                bias=bias, mult=mult, y_zp=y_zp)
    out = rows.reshape(b, oh, ow, packed.cols)
    return out if channels_last else np.ascontiguousarray(out.transpose(0, 3, 1, 2))
