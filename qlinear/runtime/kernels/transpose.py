"""Moving a few channels last (NCHW -> NHWC of an image): numpy's strided copy is slow.

numpy's transpose copy of a [B, 3, H, W] image to [B, H, W, 3] walks the output in
order and gathers 3-byte groups from three planes: 164 us for one 224x224 image here.
Reading each plane once in order and scattering into the interleaved output is 5x
faster. For many channels numpy's blocked copy is as fast, so this path is only for
small C (the network input, before the first convolution).
"""

from __future__ import annotations

import numpy as np
from numba import njit

from qlinear.runtime.kernels.config import JIT
from qlinear.runtime.kernels.parallel import claim, finish, run_tasks

#: Channel counts up to this go through `channels_last_small`.
SMALL_C = 16


#: Positions per task: a few 4 KiB pages of every plane.
_SPAN = 1 << 14
#: Work units per element moved (a strided scatter, as conv.BYTE_WORK).
_ELEMENT_WORK = 32


@njit(inline="always", **JIT)
def span_task(t, per_image, span, size):  # pragma: no cover
    """(image, first, end position) of task t of a planes -> channels-last kernel that
    splits each image's `size` positions into spans."""
    b = t // per_image
    lo = (t - b * per_image) * span
    return b, lo, min(size, lo + span)


@njit(**JIT)
def _planes_to_last(counters, x, out, span):  # pragma: no cover
    nb, c_n, size = x.shape
    per_image = (size + span - 1) // span
    while True:
        t = claim(counters)
        if t >= nb * per_image:
            break
        b, lo, hi = span_task(t, per_image, span, size)
        dst = out[b, lo:hi]
        for c in range(c_n):
            plane = x[b, c, lo:hi]
            for s in range(hi - lo):  # from 0: no negative-index handling in the loop
                dst[s, c] = plane[s]
        finish(counters)


def channels_last_small(x: np.ndarray) -> np.ndarray:
    """[B, C, *spatial] -> [B, *spatial, C] for small C (any dtype), as a new array."""
    b, c = x.shape[:2]
    spatial = x.shape[2:]
    size = int(np.prod(spatial)) if spatial else 1
    src = np.ascontiguousarray(x).reshape(b, c, size)
    out = np.empty((b, size, c), x.dtype)
    tasks = b * max(1, -(-size // _SPAN))
    run_tasks(_planes_to_last, tasks, src.size * _ELEMENT_WORK, src, out, np.int64(_SPAN))
    return out.reshape((b, *spatial, c))
