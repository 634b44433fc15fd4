"""Native op implementations. Importing this package registers them all."""

from qlinear.runtime.ops import (  # noqa: F401
    contrib,
    elementwise,
    nn,
    quantize,
    quantized,
    tensor,
)
