"""Numba kernels. Each fast kernel sits beside a readable reference with the same signature.

- ``ternary``: int8 activations x ternary weights -> exact int32 accumulators, and the
  fused ``linear`` that dequantizes in the store.
- ``ops``: the float32 steps between the matmuls (LayerNorm, GELU, quantizers, attention).
- ``fused``: a linear layer and the step after it (GELU or residual + LayerNorm, then the
  quantizer) in one pass over whole output rows.

The jitted functions are private (``_name``) and run as plain Python under
``NUMBA_DISABLE_JIT=1``; the public wrappers check dtypes and shapes first.
"""

from tinyvit158.kernels.fused import linear_add_norm_quantize, linear_gelu_quantize
from tinyvit158.kernels.ops import (
    attention,
    attention_quantize,
    attention_ref,
    float_linear,
    gelu,
    gelu_quantize,
    layernorm,
    layernorm_quantize,
    quantize_rows,
)
from tinyvit158.kernels.ternary import (
    PATHS,
    PreparedTernary,
    cpu_has_vnni,
    kernel_path,
    linear,
    linear_ref,
    matmul,
    matmul_ref,
)

__all__ = [
    "PATHS",
    "PreparedTernary",
    "cpu_has_vnni",
    "kernel_path",
    "attention",
    "attention_quantize",
    "attention_ref",
    "float_linear",
    "gelu",
    "gelu_quantize",
    "layernorm",
    "layernorm_quantize",
    "linear",
    "linear_add_norm_quantize",
    "linear_gelu_quantize",
    "linear_ref",
    "matmul",
    "matmul_ref",
    "quantize_rows",
]
