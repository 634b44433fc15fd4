"""Native op implementations. Importing this package registers them all."""

from qlinear.runtime.ops import (  # noqa: F401
    contrib,
    contrib_qlinear,
    elementwise,
    nhwc,
    nn,
    quantize,
    quantized,
    tensor,
)
