"""Numba kernels, one module per operation; each fast kernel beside its reference.

- ``linear``: int8 activations x ternary weights -> exact int32 accumulators, the ``linear``
  that dequantizes in the store, fc1 + GELU + codes, the float layers; the kernel path
  (``TINYVIT158_KERNEL``) and the references. Its backends: ``vnni`` (AVX-512 VNNI tiles,
  with the one-pass fc1 kernel), ``avx2`` (the same layout on AVX2) and ``portable``
  (LLVM's portable float32 vectors, any CPU).
- ``rowops``: LayerNorm, GELU and the quantizers that make a layer's input codes.
- ``attention``: the float attention (float64, rounded once); ``qattn``: the int8 attention.
- ``jit``: the JIT flavours and helpers every module shares; ``simd``: the vector vocabulary.

Within a module an underscore means private to it; what another module uses is public.
The jitted functions run as plain Python under ``NUMBA_DISABLE_JIT=1``; the public
wrappers check dtypes and shapes first. Importing the package changes nothing.
"""

from tinyvit158.kernels.attention import FloatAttention, attention, attention_quantize, attention_ref
from tinyvit158.kernels.linear import (
    PATH_FEATURES,
    PATHS,
    PreparedTernary,
    bind_int_linear,
    bind_linear,
    bind_linear_gelu_quantize,
    bind_matmul,
    cpu_has,
    cpu_has_vnni,
    float_linear,
    kernel_path,
    linear,
    linear_gelu_quantize,
    linear_ref,
    matmul,
    matmul_ref,
)
from tinyvit158.kernels.qattn import Int8Attention
from tinyvit158.kernels.rowops import (
    bind_bitlinear_quantize,
    bind_layernorm_quantize,
    gelu,
    gelu_quantize,
    layernorm,
    layernorm_quantize,
    quantize_rows,
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
    "PATH_FEATURES",
    "PATHS",
    "PreparedTernary",
    "attention",
    "attention_quantize",
    "attention_ref",
    "bind_bitlinear_quantize",
    "bind_layernorm_quantize",
    "bind_linear",
    "bind_linear_gelu_quantize",
    "bind_int_linear",
    "bind_matmul",
    "cpu_has",
    "cpu_has_vnni",
    "float_linear",
    "gelu",
    "gelu_quantize",
    "kernel_path",
    "layernorm",
    "layernorm_quantize",
    "linear",
    "linear_gelu_quantize",
    "linear_ref",
    "matmul",
    "matmul_ref",
    "quantize_rows",
]
