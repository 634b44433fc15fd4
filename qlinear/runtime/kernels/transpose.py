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


@njit(**JIT)
def _planes_to_last(counters, x, out):  # pragma: no cover
    nb, c_n, size = x.shape
    while True:
        b = claim(counters)
        if b >= nb:
            break
        for c in range(c_n):
            plane = x[b, c]
            for s in range(size):
                out[b, s, c] = plane[s]
        finish(counters)


def channels_last_small(x: np.ndarray) -> np.ndarray:
    """[B, C, *spatial] -> [B, *spatial, C] for small C (any dtype), as a new array."""
    b, c = x.shape[:2]
    spatial = x.shape[2:]
    size = int(np.prod(spatial)) if spatial else 1
    src = np.ascontiguousarray(x).reshape(b, c, size)
    out = np.empty((b, size, c), x.dtype)
    run_tasks(_planes_to_last, b, src.size * 4, src, out)
    return out.reshape((b, *spatial, c))
