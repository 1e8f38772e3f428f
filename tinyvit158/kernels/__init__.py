"""Numba kernels. Each fast kernel sits beside a readable reference with the same signature.

- ``ternary``: int8 activations x ternary weights -> exact int32 accumulators, and the
  fused ``linear`` that dequantizes in the store.
- ``ops``: the float32 steps between the matmuls (LayerNorm, GELU, quantizers, attention).
- ``fused``: fc1, GELU and their codes in one pass over whole output rows (and residual +
  LayerNorm + codes after proj and fc2, as two kernels: measured faster than one pass).

The jitted functions are private (``_name``) and run as plain Python under
``NUMBA_DISABLE_JIT=1``; the public wrappers check dtypes and shapes first.

Threads under contention: between a forward pass's ~40 parallel regions Numba's OpenMP
threads wait at a barrier, spinning ~300,000 iterations by default; beside a busy process
a spinning thread burns the time slices its partner needs (docs/PERFORMANCE.md). So
unless the user chose a wait policy (``GOMP_SPINCOUNT`` or ``OMP_WAIT_POLICY``) the
threads spin 1,000 iterations and then sleep; effective only if set before the first
parallel call in the process.
"""

import os

if "GOMP_SPINCOUNT" not in os.environ and "OMP_WAIT_POLICY" not in os.environ:
    os.environ["GOMP_SPINCOUNT"] = "1000"

from tinyvit158.kernels.fused import linear_add_norm_quantize, linear_gelu_quantize
from tinyvit158.kernels.ops import (
    FloatAttention,
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
from tinyvit158.kernels.qattn import Int8Attention
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


def attention_op(cfg, params: dict, i: int):
    """Block ``i``'s attention kernel object, as the config says (``FloatAttention`` or
    ``Int8Attention``); ``params``: the float tensors by name (the qk norms)."""
    if cfg.attention == "float":
        return FloatAttention()
    norms = [None, None]
    if cfg.qk_norm:
        norms = [(params[f"blocks.{i}.attn.{n}_norm.weight"], params[f"blocks.{i}.attn.{n}_norm.bias"], cfg.norm_eps)
                 for n in "qk"]  # fmt: skip
    return Int8Attention(cfg.heads, cfg.attention_bits, cfg.attention_prob_bits, *norms, cfg.attention_prob_clip)


__all__ = [
    "attention_op",
    "FloatAttention",
    "Int8Attention",
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
