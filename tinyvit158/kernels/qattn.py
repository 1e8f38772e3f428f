"""Fully quantized attention (Q-ViT): integer Q K^T and P V, a float32 softmax whose every
operation is specified, so that any implementation of it computes the same bits.

The rules (``docs/FORMAT.md`` section 7.4 is the format's statement of them; the oracle's
:meth:`~tinyvit158.oracle.Oracle.int8_attention` states them in
float64, the PyTorch twin's ``train/model.int8_attention`` and :func:`attention_int8_ref`
compute them exactly), for one image and head, ``qmax = 2**(attention_bits - 1) - 1``,
``L = 2**attention_prob_bits - 1``, ``M = L / attention_prob_clip`` (clip a power of two
from 1 to 2**-8, so M is exact):

    (qk_norm: q, k = LayerNorm_hd(q), LayerNorm_hd(k), as every LayerNorm: float64, rounded to float32)
    m_q[i] = max(max_d |q[i, d]|, 1e-5);  s_q = m_q / qmax;  q_c = clip(rint(q * (qmax / m_q)), -qmax, qmax)
    s_k[j], k_c likewise per key token
    m_v[d] = max(max_j |v[j, d]|, 1e-5);  s_v = m_v / qmax;  v_c = clip(rint(v * (qmax / m_v)), -qmax, qmax)
      (float32 arithmetic, round half to even: ``quant.quantize_attention``: one division a
       row, then products; v's scale is per channel over the image's tokens, since P V
       sums over tokens)
    acc[i, j] = sum_d q_c[i, d] k_c[j, d]              exact integers (|acc| < 2**24)
    softmax in float32, each operation rounded as written, in this order:
      z[j] = float32(acc[i, j]) * s_k[j];  m = max_j z[j];  c = s_q[i] * float32(1 / sqrt(hd))
      e[j] = exp32((z[j] - m) * c)          (:func:`exp32`: a fixed float32 polynomial)
      S = lane_sum(e)                       (16 lanes: lane l adds e[l], e[l + 16], ... in
                                             turn, then lanes are added as a fixed tree)
      p_c[i, j] = min(rint(e[j] * (1 / S) * M), L)  unsigned, 0..L (round half to even)
    out[i, d] = float32(sum_j p_c[i, j] v_c[j, d] * (s_v[d] / M))       exact sum, float64 product

Why float32 in a fixed order and not float64: float64 makes implementations agree except
at ~1e-16 ties, but costs twice the lanes and a longer exp; a fixed sequence of float32
operations is one function, so the engine, its twins and the reference agree bit for bit
(as the GELU does), at half the cost. The float64 oracle differs from it only where
``p * L`` lies within float32 error of a rounding tie (tests replay those codes).

Kernels. ``vpdpbusd`` multiplies unsigned by signed bytes: P V is a direct fit (p_c >= 0);
for Q K^T the q codes are stored as ``q_c + 128`` (unsigned) and the key's row sum
corrects it: ``sum_d (q_c + 128) k_c = acc + 128 sum_d k_c`` (``vnni.py``'s
identity with the roles of the operands swapped). Keys are laid out as the linear
layers' weights are (16 keys x 4 dims in 64 bytes), values likewise (16 channels x 4
tokens), so a tile is 4 query rows x 16 keys (or channels) in 4 zmm accumulators. The
generic path runs the same kernel with scalar integer loops instead of the tiles (the
``tiles`` argument: ``None`` prunes the VNNI branch at compile time); every other
operation is shared, so the two paths agree bit for bit.
"""

from __future__ import annotations

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic

from tinyvit158.constants import EXP32_INV_LN2, EXP32_LN2_HI, EXP32_LN2_LO, EXP32_MIN, EXP32_P
from tinyvit158.errors import TinyViTError
from tinyvit158.kernels.attention import check_qkv
from tinyvit158.kernels.jit import PYTHON, check_out, codes_out, ijit, jit, job_count, pjit
from tinyvit158.kernels.linear import kernel_path
from tinyvit158.kernels.rowops import layernorm_row, quantize_row, row_absmax
from tinyvit158.kernels.simd import (
    I32,
    V16,
    V16F,
    V64B,
    dpbusd,
    element_ptr,
    fadd,
    fexp,
    fhmax,
    fload,
    fmax,
    fmul,
    fsplat,
    fstore,
    fsub,
    llvm_call,
    quantize_store_of,
    splat_ir,
    vbroadcast4,
    vload,
    vstore,
    vzero,
    zmm,
    zmmf,
)
from tinyvit158.quant import ACT_EPS, code_max, quantize_attention

# -- the int8 attention's own vector operations ----------------------------------------

_fquantize_mul_store = quantize_store_of("fmul")  # v * (qmax / absmax)
_fquantize_mul_store_u8 = quantize_store_of("fmul", offset=True)  # the same, as code + 128 (its q)


@intrinsic
def _fhsum_tree(typingctx, a):
    """The sum of 16 float32 lanes in a fixed tree: lanes i + (i + 8), then i + (i + 4),
    i + (i + 2), i + (i + 1) (what ``qattn.lane_sum`` does in NumPy)."""

    def codegen(context, builder, sig, args):
        v = args[0]
        for half in (8, 4, 2, 1):
            lo = builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(I32, half), list(range(half))))
            hi = builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(I32, half), list(range(half, 2 * half))))
            v = builder.fadd(lo, hi)
        return builder.extract_element(v, ir.Constant(I32, 0))

    return types.float32(zmmf), codegen


@intrinsic
def _fprob_store(typingctx, out, index, e, inv, mult, levels):
    """``out[index + i] = uint8(min(rint(e[i] * inv * M), L))`` for 16 lanes (float32
    products in that order, round half to even): the int8 attention's probability codes."""

    def codegen(context, builder, sig, args):
        out_a, out_i, ev, inv_s, mv, lv = args
        p = builder.fmul(builder.fmul(ev, splat_ir(builder, inv_s, V16F)), splat_ir(builder, mv, V16F))
        p = llvm_call(builder, "llvm.rint.v16f32", V16F, [p])
        p = llvm_call(builder, "llvm.minnum.v16f32", V16F, [p, splat_ir(builder, lv, V16F)])
        codes = builder.fptoui(p, ir.VectorType(ir.IntType(8), 16))
        ptr = element_ptr(context, builder, sig.args[0], out_a, out_i)
        builder.store(codes, builder.bitcast(ptr, ir.VectorType(ir.IntType(8), 16).as_pointer()), align=1)
        return context.get_dummy_value()

    return types.void(out, index, zmmf, types.float32, types.float32, types.float32), codegen


@intrinsic
def _fquantize_mul_scatter4(typingctx, q, index, stride, v, inv, qmax):
    """The codes of 16 lanes (``rint(v * inv)`` clamped to +-qmax, as ``_fquantize_mul_store``)
    stored as four 4-byte groups, group g at ``q[index + g * stride]`` (the int8 attention's
    key layout: 4 dimensions of a key per 64-byte tile row); returns the sum of the 16
    codes (exact int32)."""

    def codegen(context, builder, sig, args):
        q_a, q_i, st, v_v, inv_v, qm = args
        r = llvm_call(builder, "llvm.rint.v16f32", V16F, [builder.fmul(v_v, inv_v)])
        r = llvm_call(builder, "llvm.maxnum.v16f32", V16F, [r, builder.fneg(qm)])
        r = llvm_call(builder, "llvm.minnum.v16f32", V16F, [r, qm])
        ints = builder.fptosi(r, V16)
        codes = builder.trunc(ints, ir.VectorType(ir.IntType(8), 16))
        words = builder.bitcast(codes, ir.VectorType(I32, 4))
        i64 = ir.IntType(64)
        for g in range(4):
            at = builder.add(q_i, builder.mul(st, ir.Constant(i64, g)))
            ptr = builder.bitcast(element_ptr(context, builder, sig.args[0], q_a, at), I32.as_pointer())
            builder.store(builder.extract_element(words, ir.Constant(I32, g)), ptr, align=1)
        return llvm_call(builder, "llvm.vector.reduce.add.v16i32", I32, [ints])

    return types.int32(q, types.intp, types.intp, zmmf, zmmf, zmmf), codegen


@intrinsic
def _fscores(typingctx, acc, corr, scale, k_index):
    """``float32(acc[i] - corr[k_index + i]) * scale[k_index + i]`` for 16 lanes (as
    ``_fscores_store``, in a register)."""

    def codegen(context, builder, sig, args):
        acc_v, corr_a, scale_a, k_i = args
        cptr = builder.bitcast(element_ptr(context, builder, sig.args[1], corr_a, k_i), V16.as_pointer())
        sptr = builder.bitcast(element_ptr(context, builder, sig.args[2], scale_a, k_i), V16F.as_pointer())
        v = builder.sitofp(builder.sub(acc_v, builder.load(cptr, align=4)), V16F)
        return builder.fmul(v, builder.load(sptr, align=4))

    return zmmf(zmm, corr, scale, k_index), codegen


@intrinsic
def _fmask(typingctx, v, valid, value):
    """``v`` with lanes ``valid`` .. 15 set to ``value``."""

    def codegen(context, builder, sig, args):
        vec, n, val = args
        lanes = ir.Constant(V16, list(range(16)))
        keep = builder.icmp_signed("<", lanes, splat_ir(builder, builder.trunc(n, I32), V16))
        return builder.select(keep, vec, splat_ir(builder, val, V16F))

    return zmmf(zmmf, types.intp, types.float32), codegen


@intrinsic
def _fquantize_interleave4(typingctx, dst, index, v0, v1, v2, v3, inv, qmax):
    """Codes of 4 tokens x 16 channels (``rint(v_t * inv)`` clamped to +-qmax, lane-wise
    per channel), stored as 64 bytes channel-major, token-minor: byte 4c + t = code of
    token t, channel c (the int8 attention's value layout; one byte permutation instead of
    64 byte stores)."""

    def codegen(context, builder, sig, args):
        d_a, d_i, *vs, inv_v, qm = args
        v16b = ir.VectorType(ir.IntType(8), 16)
        codes = []
        for v in vs:
            r = llvm_call(builder, "llvm.rint.v16f32", V16F, [builder.fmul(v, inv_v)])
            r = llvm_call(builder, "llvm.maxnum.v16f32", V16F, [r, builder.fneg(qm)])
            r = llvm_call(builder, "llvm.minnum.v16f32", V16F, [r, qm])
            codes.append(builder.trunc(builder.fptosi(r, V16), v16b))
        lo = builder.shuffle_vector(codes[0], codes[1], ir.Constant(ir.VectorType(I32, 32), list(range(32))))
        hi = builder.shuffle_vector(codes[2], codes[3], ir.Constant(ir.VectorType(I32, 32), list(range(32))))
        order = [16 * t + c for c in range(16) for t in range(4)]  # byte 4c + t <- token t, channel c
        out = builder.shuffle_vector(lo, hi, ir.Constant(ir.VectorType(I32, 64), order))
        ptr = element_ptr(context, builder, sig.args[0], d_a, d_i)
        builder.store(out, builder.bitcast(ptr, V64B.as_pointer()), align=1)
        return context.get_dummy_value()

    return types.void(dst, index, zmmf, zmmf, zmmf, zmmf, zmmf, zmmf), codegen


_EPS32 = np.float32(ACT_EPS)


# -- references ------------------------------------------------------------------------------
def qk_accumulate_ref(q_codes: np.ndarray, k_codes: np.ndarray) -> np.ndarray:
    """``q_codes @ k_codes.T`` in int64: (Nq, hd) x (Nk, hd) -> (Nq, Nk)."""
    return q_codes.astype(np.int64) @ k_codes.astype(np.int64).T


def pv_accumulate_ref(p_codes: np.ndarray, v_codes: np.ndarray) -> np.ndarray:
    """``p_codes @ v_codes`` in int64: (Nq, Nk) unsigned x (Nk, hd) -> (Nq, hd)."""
    return p_codes.astype(np.int64) @ v_codes.astype(np.int64)


F32 = np.float32


def exp32(x: np.ndarray) -> np.ndarray:
    """exp of float32 x <= 0 as the kernels compute it (``simd.fexp``), in NumPy
    float32, operation for operation."""
    x = np.maximum(x.astype(F32), F32(EXP32_MIN))
    k = np.floor(x * F32(EXP32_INV_LN2) + F32(0.5))
    r = (x - k * F32(EXP32_LN2_HI)) - k * F32(EXP32_LN2_LO)
    p = np.full_like(r, F32(EXP32_P[0]))
    for c in EXP32_P[1:]:
        p = p * r + F32(c)
    y = (p * (r * r) + r) + F32(1.0)
    return y * ((k.astype(np.int32) + 127) << 23).view(F32)


def lane_sum(e: np.ndarray) -> np.ndarray:
    """Sums over the last axis in the kernels' order: 16 lanes, lane l adding e[l], e[l + 16],
    ... in turn (zeros past the end), then the lanes as a tree (8, 4, 2, 1 apart)."""
    n = e.shape[-1]
    e = np.concatenate([e, np.zeros((*e.shape[:-1], -n % 16), e.dtype)], axis=-1)
    blocks = e.reshape(*e.shape[:-1], -1, 16)
    acc = blocks[..., 0, :]
    for i in range(1, blocks.shape[-2]):
        acc = acc + blocks[..., i, :]
    for half in (8, 4, 2, 1):
        acc = acc[..., :half] + acc[..., half : 2 * half]
    return acc[..., 0]


def probability_codes(
    acc: np.ndarray, s_q: np.ndarray, s_k: np.ndarray, hd: int, levels: int, mult: float
) -> np.ndarray:
    """The probability codes of integer scores ``acc`` (..., Nq, Nk), float32 scales s_q
    (..., Nq) and s_k (..., Nk): the module docstring's float32 softmax, in NumPy
    (``levels``: L, ``mult``: ``M = L / clip``)."""
    z = acc.astype(F32) * s_k[..., None, :]
    c = s_q * F32(hd**-0.5)
    e = exp32((z - z.max(-1, keepdims=True)) * c[..., None])
    inv = F32(1.0) / lane_sum(e)
    return np.minimum(np.rint(e * inv[..., None] * F32(mult)), F32(levels)).astype(np.uint8)


def _layernorm_ref(x: np.ndarray, norm) -> np.ndarray:
    w, b, eps = norm
    xd = x.astype(np.float64)
    mean = xd.mean(-1, keepdims=True)
    var = ((xd - mean) ** 2).mean(-1, keepdims=True)
    return ((xd - mean) / np.sqrt(var + eps) * w + b).astype(np.float32)


def attention_int8_ref(
    qkv: np.ndarray,
    heads: int,
    bits: int = 8,
    prob_bits: int = 8,
    q_norm=None,
    k_norm=None,
    record=None,
    prob_clip: float = 1.0,
) -> np.ndarray:
    """The module docstring's rules in NumPy, from float32 qkv (B, N, 3 dim) -> float32
    (B, N, dim). ``q_norm``/``k_norm``: (weight, bias, eps) of the qk LayerNorms.
    ``record``, a dict, receives the codes (q, k: (B, H, N, hd); v: (B, H, hd, N); p)."""
    qkv = check_qkv(qkv, heads)
    B, N, C3 = qkv.shape
    hd = C3 // 3 // heads
    q, k, v = qkv.reshape(B, N, 3, heads, hd).transpose(2, 0, 3, 1, 4)  # each (B, H, N, hd)
    if q_norm is not None:
        q, k = _layernorm_ref(q, q_norm), _layernorm_ref(k, k_norm)
    qmax = code_max(bits)
    q_c, s_q = quantize_attention(q, qmax)
    k_c, s_k = quantize_attention(k, qmax)
    v_c, s_v = quantize_attention(v.transpose(0, 1, 3, 2), qmax)  # (B, H, hd, N)
    acc = q_c.astype(np.int64) @ k_c.astype(np.int64).transpose(0, 1, 3, 2)  # (B, H, N, N)
    levels = 2**prob_bits - 1
    mult = levels / prob_clip  # exact: prob_clip is a power of two
    p_c = probability_codes(acc, s_q, s_k, hd, levels, mult)
    acc = p_c.astype(np.int64) @ v_c.astype(np.int64).transpose(0, 1, 3, 2)  # (B, H, N, hd)
    out = acc * (s_v.astype(np.float64) / mult)[..., None, :]
    if record is not None:
        record.update(q=q_c, k=k_c, v=v_c, p=p_c)
    return out.astype(np.float32).transpose(0, 2, 1, 3).reshape(B, N, C3 // 3)


# -- layouts and tiles ---------------------------------------------------------------------------
@ijit
def _quantize_slice(x, q, qmax):
    """Codes of a short float32 vector into ``q`` (``quant.quantize_attention``, the same
    float32 operations, 16 lanes a step); returns the scale."""
    fq = np.float32(qmax)
    m = max(row_absmax(x), _EPS32)
    inv = fq / m
    n = x.shape[0]
    n16 = 0 if PYTHON else n - n % 16
    if n16:
        inv_v, qmax_v = fsplat(inv), fsplat(fq)
        for k in range(0, n16, 16):
            _fquantize_mul_store(q, k, fload(x, k), inv_v, qmax_v)
    for k in range(n16, n):
        r = np.rint(x[k] * inv)
        q[k] = np.int8(min(max(r, -fq), fq))
    return m / fq


@ijit
def _key_at(h, j, d, NB, G):
    """Byte of key j, dimension d (head h) in the key layout: per block of 16 keys, per
    group of 4 dimensions, 16 x 4 bytes (key-major), as the linear layers' weights."""
    return ((h * NB + j // 16) * G + d // 4) * 64 + (j % 16) * 4 + d % 4


@ijit
def _value_at(h, j, d, CB, J4):
    """Byte of value token j, channel d (head h): per block of 16 channels, per group of 4
    tokens, 16 x 4 bytes (channel-major)."""
    return ((h * CB + d // 16) * J4 + j // 4) * 64 + (d % 16) * 4 + j % 4


@jit
def _tile4(a, K4, b, block0, nblocks, out, tiles):
    """``out[r, n] = sum_k a[r, k] * B[n, k]`` for 4 rows of unsigned bytes ``a`` (row stride
    K4, a multiple of 4) and every column n of blocks ``block0 ..`` of ``b``, laid out as the
    keys and values are (per block of 16 columns, per group of 4 k, 16 x 4 bytes): a 4 x 16
    register tile per block (``tiles`` not None), or scalar loops. Q K^T (a: offset q codes,
    b: keys) and P V (a: probability codes, b: values) are both this."""
    G = K4 // 4
    if tiles is None:
        for r in range(4):
            for n in range(nblocks * 16):
                base = ((block0 + n // 16) * G) * 64 + (n % 16) * 4
                acc = np.int32(0)
                for k in range(K4):
                    acc += np.int32(a[r * K4 + k]) * np.int32(b[base + (k // 4) * 64 + k % 4])
                out[r * nblocks * 16 + n] = acc
    else:
        stride = nblocks * 16
        blk = 0
        while blk + 1 < nblocks:  # two blocks at a time: each broadcast feeds two products
            a0 = a1 = a2 = a3 = c0 = c1 = c2 = c3 = vzero()
            for g in range(G):
                bv = vload(b, ((block0 + blk) * G + g) * 64)
                bw = vload(b, ((block0 + blk + 1) * G + g) * 64)
                x0, x1 = vbroadcast4(a, 4 * g), vbroadcast4(a, K4 + 4 * g)
                x2, x3 = vbroadcast4(a, 2 * K4 + 4 * g), vbroadcast4(a, 3 * K4 + 4 * g)
                a0, c0 = dpbusd(a0, x0, bv), dpbusd(c0, x0, bw)
                a1, c1 = dpbusd(a1, x1, bv), dpbusd(c1, x1, bw)
                a2, c2 = dpbusd(a2, x2, bv), dpbusd(c2, x2, bw)
                a3, c3 = dpbusd(a3, x3, bv), dpbusd(c3, x3, bw)
            vstore(out, blk * 16, a0)
            vstore(out, stride + blk * 16, a1)
            vstore(out, 2 * stride + blk * 16, a2)
            vstore(out, 3 * stride + blk * 16, a3)
            vstore(out, blk * 16 + 16, c0)
            vstore(out, stride + blk * 16 + 16, c1)
            vstore(out, 2 * stride + blk * 16 + 16, c2)
            vstore(out, 3 * stride + blk * 16 + 16, c3)
            blk += 2
        if blk < nblocks:
            a0 = a1 = a2 = a3 = vzero()
            for g in range(G):
                bv = vload(b, ((block0 + blk) * G + g) * 64)
                a0 = dpbusd(a0, vbroadcast4(a, 4 * g), bv)
                a1 = dpbusd(a1, vbroadcast4(a, K4 + 4 * g), bv)
                a2 = dpbusd(a2, vbroadcast4(a, 2 * K4 + 4 * g), bv)
                a3 = dpbusd(a3, vbroadcast4(a, 3 * K4 + 4 * g), bv)
            vstore(out, blk * 16, a0)
            vstore(out, stride + blk * 16, a1)
            vstore(out, 2 * stride + blk * 16, a2)
            vstore(out, 3 * stride + blk * 16, a3)


def _dims(N: int, hd: int) -> tuple[int, int, int, int]:
    """Padded sizes: head dim to 4 (a dpbusd group) and 16 (a tile), tokens to 4 and 16."""
    return -(-hd // 4) * 4, -(-hd // 16) * 16, -(-N // 4) * 4, -(-N // 16) * 16


# -- accumulators alone (tests: the tiles against the references, any shape) ------------------
@jit
def _qk_all(q_codes, k_codes, hdp4, Np16, tiles):
    Nq, hd = q_codes.shape
    Nk = k_codes.shape[0]
    NB, G = Np16 // 16, hdp4 // 4
    kl = np.zeros(NB * G * 64, dtype=np.int8)
    ksum = np.zeros(Np16, dtype=np.int32)
    for j in range(Nk):
        for d in range(hd):
            kl[_key_at(0, j, d, NB, G)] = k_codes[j, d]
            ksum[j] += 128 * np.int32(k_codes[j, d])
    out = np.empty((Nq, Nk), dtype=np.int32)
    qu = np.full(4 * hdp4, 128, dtype=np.uint8)
    si = np.empty(4 * Np16, dtype=np.int32)
    for i0 in range(0, Nq, 4):
        for r in range(min(4, Nq - i0)):
            for d in range(hd):
                qu[r * hdp4 + d] = np.uint8(np.int32(q_codes[i0 + r, d]) + 128)
        _tile4(qu, hdp4, kl, 0, NB, si, tiles)
        for r in range(min(4, Nq - i0)):
            for j in range(Nk):
                out[i0 + r, j] = si[r * Np16 + j] - ksum[j]
    return out


@jit
def _pv_all(p_codes, v_codes, hdp16, Np4, tiles):
    Nq, Nk = p_codes.shape
    hd = v_codes.shape[1]
    CB, J4 = hdp16 // 16, Np4 // 4
    vl = np.zeros(CB * J4 * 64, dtype=np.int8)
    for j in range(Nk):
        for d in range(hd):
            vl[_value_at(0, j, d, CB, J4)] = v_codes[j, d]
    out = np.empty((Nq, hd), dtype=np.int32)
    pc = np.zeros(4 * Np4, dtype=np.uint8)
    so = np.empty(4 * hdp16, dtype=np.int32)
    for i0 in range(0, Nq, 4):
        for r in range(min(4, Nq - i0)):
            for j in range(Nk):
                pc[r * Np4 + j] = p_codes[i0 + r, j]
        _tile4(pc, Np4, vl, 0, CB, so, tiles)
        for r in range(min(4, Nq - i0)):
            for d in range(hd):
                out[i0 + r, d] = so[r * hdp16 + d]
    return out


def _tiles(path: str | None):
    """The ``tiles`` argument of a path: 0 (VNNI register tiles) or None (scalar loops)."""
    return 0 if (path or kernel_path()) == "vnni" and not PYTHON else None


def qk_accumulate(q_codes: np.ndarray, k_codes: np.ndarray, path: str | None = None) -> np.ndarray:
    """Exact int32 ``q_codes @ k_codes.T`` through the attention's tiles (int8 (Nq, hd) and
    (Nk, hd), codes in [-127, 127]) on the kernel path (default: the current one)."""
    if q_codes.dtype != np.int8 or k_codes.dtype != np.int8 or q_codes.shape[1:] != k_codes.shape[1:]:
        raise TinyViTError(f"qk_accumulate expects int8 (Nq, hd) and (Nk, hd), found {q_codes.shape}, {k_codes.shape}")
    hdp4, _, _, Np16 = _dims(k_codes.shape[0], q_codes.shape[1])
    return _qk_all(np.ascontiguousarray(q_codes), np.ascontiguousarray(k_codes), hdp4, Np16, _tiles(path))


def pv_accumulate(p_codes: np.ndarray, v_codes: np.ndarray, path: str | None = None) -> np.ndarray:
    """Exact int32 ``p_codes @ v_codes`` through the attention's tiles (uint8 (Nq, Nk),
    int8 (Nk, hd)) on the kernel path (default: the current one)."""
    if p_codes.dtype != np.uint8 or v_codes.dtype != np.int8 or p_codes.shape[1] != v_codes.shape[0]:
        raise TinyViTError(f"pv_accumulate expects uint8 (Nq, Nk) and int8 (Nk, hd), found {p_codes.shape}, "
                           f"{v_codes.shape}")  # fmt: skip
    _, hdp16, Np4, _ = _dims(v_codes.shape[0], v_codes.shape[1])
    return _pv_all(np.ascontiguousarray(p_codes), np.ascontiguousarray(v_codes), hdp16, Np4, _tiles(path))


# -- the fused kernel ---------------------------------------------------------------------------
@ijit
def _normed_max(src, norm_w, norm_b, eps, has_norm, tmp):
    """A token's q or k slice (after the qk LayerNorm, into ``tmp``, when ``has_norm``) and
    its largest magnitude, at least 1e-5: what its codes and scale are made from."""
    if has_norm:
        layernorm_row(src, norm_w, norm_b, eps, tmp)
        src = tmp
    return src, max(row_absmax(src), _EPS32)


@ijit
def _norm_quantize(src, norm_w, norm_b, eps, has_norm, tmp, codes, qmax):
    """Codes of one token's q or k slice (after the qk LayerNorm when ``has_norm``); its scale."""
    if has_norm:
        layernorm_row(src, norm_w, norm_b, eps, tmp)
        return _quantize_slice(tmp, codes, qmax)
    return _quantize_slice(src, codes, qmax)


@jit
def _prepare_image(flat, b, N, C, heads, qmax, mult, kn_w, kn_b, eps, has_norm, kl, ksum, sk, vl, sv, tmp, codes,
                   rec_k, rec_v, recording):  # fmt: skip
    """Keys and values of image ``b``, every head: codes in the tile layouts, 128 x each
    key's code sum (the offset's correction), and the scales (float64)."""
    C3, hd = 3 * C, C // heads
    hdp4, hdp16, Np4, Np16 = -(-hd // 4) * 4, -(-hd // 16) * 16, -(-N // 4) * 4, -(-N // 16) * 16
    NB, G, CB, J4 = Np16 // 16, hdp4 // 4, hdp16 // 16, Np4 // 4
    # kl and vl come zeroed, and every image writes the same places: padding keys,
    # dimensions and tokens keep code 0
    fq = np.float32(qmax)
    for h in range(heads):
        for j in range(N):
            base = (b * N + j) * C3 + C + h * hd
            at = _key_at(h, j, 0, NB, G)
            if hd % 16 == 0 and not PYTHON:  # codes straight into the layout, 4 bytes a group
                src, m = _normed_max(flat[base : base + hd], kn_w, kn_b, eps, has_norm, tmp)
                sk[h * Np16 + j] = m / fq
                inv_v, qmax_v = fsplat(fq / m), fsplat(fq)
                total = np.int32(0)
                for c in range(hd // 16):
                    total += _fquantize_mul_scatter4(kl, at + c * 256, 64, fload(src, c * 16), inv_v, qmax_v)
            else:
                sk[h * Np16 + j] = _norm_quantize(flat[base : base + hd], kn_w, kn_b, eps, has_norm, tmp, codes, qmax)
                total = np.int32(0)
                for d in range(hd):
                    total += np.int32(codes[d])
                    kl[at + (d // 4) * 64 + d % 4] = codes[d]
            ksum[h * Np16 + j] = 128 * total
            if recording:
                for d in range(hd):
                    rec_k[b, h, j, d] = kl[at + (d // 4) * 64 + d % 4]
        # v: one scale per channel over the image's tokens (passes along the rows: contiguous)
        vmax = tmp  # (hd,) float32 scratch
        vmax[:] = 0.0
        for j in range(N):
            row = flat[(b * N + j) * C3 + 2 * C + h * hd : (b * N + j) * C3 + 2 * C + (h + 1) * hd]
            for d in range(hd):
                a = abs(row[d])
                vmax[d] = a if a > vmax[d] else vmax[d]
        for d in range(hd):
            m = max(vmax[d], _EPS32)
            sv[h * hdp16 + d] = np.float64(m / fq) / mult  # s_v / M: dequantizes P v in one product
            vmax[d] = fq / m  # now the reciprocal that makes codes
        if hd % 16 == 0 and not PYTHON:  # 4 tokens x 16 channels a store, in the tile layout
            zero, qmax_v = fsplat(np.float32(0.0)), fsplat(fq)
            for g in range(J4):
                r0 = (b * N + 4 * g) * C3 + 2 * C + h * hd  # the group's first token; the rest follow at C3
                for cb in range(CB):
                    o = r0 + 16 * cb
                    v0 = fload(flat, o)
                    v1 = fload(flat, o + C3) if 4 * g + 1 < N else zero
                    v2 = fload(flat, o + 2 * C3) if 4 * g + 2 < N else zero
                    v3 = fload(flat, o + 3 * C3) if 4 * g + 3 < N else zero
                    inv_v = fload(vmax, 16 * cb)
                    _fquantize_interleave4(vl, ((h * CB + cb) * J4 + g) * 64, v0, v1, v2, v3, inv_v, qmax_v)
            if recording:
                for j in range(N):
                    for d in range(hd):
                        rec_v[b, h, d, j] = vl[_value_at(h, j, d, CB, J4)]
            continue
        for j in range(N):
            row = flat[(b * N + j) * C3 + 2 * C + h * hd : (b * N + j) * C3 + 2 * C + (h + 1) * hd]
            for d in range(hd):
                r = np.rint(row[d] * vmax[d])
                r = r if r > -fq else -fq  # selects, not min/max: the loop vectorizes
                codes[d] = np.int8(r if r < fq else fq)
            at = _value_at(h, j, 0, CB, J4)
            for d in range(hd):
                vl[at + (d // 16) * J4 * 64 + (d % 16) * 4] = codes[d]
            if recording:
                rec_v[b, h, :, j] = codes[:hd]


@ijit
def _probability_codes(si, r, Np16, ksum, sk, hoff, N, c, z, pc, Np4, levels, mult):
    """Row r: scores from the offset sums, the float32 softmax (module docstring; 16 lanes a
    step, lanes past N: -inf for the max, 0 for the sum), then the ``min(rint(p * M), L)`` codes."""
    if PYTHON:  # the intrinsics are compiled-only: the NumPy twin of the same operations
        acc = si[r * Np16 : r * Np16 + N] - ksum[hoff : hoff + N]
        pc[r * Np4 : r * Np4 + N] = _codes_np(acc, sk[hoff : hoff + N], c, levels, mult)
        pc[r * Np4 + N : (r + 1) * Np4] = 0
        return
    last = Np16 - 16  # lanes past N: -inf for the max, 0 for the sum
    mv = fsplat(np.float32(-np.inf))
    for jb in range(0, Np16, 16):  # scores, and their row max, in one pass
        v = _fscores(vload(si, r * Np16 + jb), ksum, sk, hoff + jb)
        if jb == last:
            v = _fmask(v, N - last, np.float32(-np.inf))
        fstore(z, jb, v)
        mv = fmax(mv, v)
    m_v, c_v = fsplat(fhmax(mv)), fsplat(c)
    sv = fsplat(np.float32(0.0))
    for jb in range(0, Np16, 16):  # exponentials, and their lane sums, in one pass
        e = fexp(fmul(fsub(fload(z, jb), m_v), c_v))
        if jb == last:
            e = _fmask(e, N - last, np.float32(0.0))
        fstore(z, jb, e)
        sv = fadd(sv, e)
    inv = np.float32(1.0) / _fhsum_tree(sv)
    # 16 codes a store: lanes past N hold e = 0, code 0, as P V needs up to Np4; the last
    # store runs up to 12 bytes into the next row (written after this one) or the slack
    for jb in range(0, Np16, 16):
        _fprob_store(pc, r * Np4 + jb, fload(z, jb), inv, mult, levels)


def _codes_np(acc, sk, c, levels, mult):
    """:func:`_probability_codes` under NUMBA_DISABLE_JIT: :func:`probability_codes` for one row."""
    z = acc.astype(F32) * sk
    e = exp32((z - z.max()) * F32(c))
    inv = F32(1.0) / lane_sum(e)
    return np.minimum(np.rint(e * inv * F32(mult)), F32(levels)).astype(np.uint8)


@pjit
def _attention_int8(qkv, heads, qmax, levels, mult, scale, qn_w, qn_b, kn_w, kn_b, eps, has_norm, out, P, quantize,
                    q, s, rec_q, rec_k, rec_v, rec_p, recording, tiles):  # fmt: skip
    """The module docstring's attention for every image and head; each thread takes an equal
    share of the (image, 4 query rows) units, preparing an image's keys and values when it
    starts one. With ``quantize`` the finished rows become the proj layer's int8 codes ``q``
    and scales ``s`` (``quantize_rows``); else they go to ``out`` (flat (B * N * dim,))."""
    B, N, C3 = qkv.shape
    C = C3 // 3
    hd = C // heads
    hdp4, hdp16, Np4, Np16 = -(-hd // 4) * 4, -(-hd // 16) * 16, -(-N // 4) * 4, -(-N // 16) * 16
    NB, G, CB, J4 = Np16 // 16, hdp4 // 4, hdp16 // 16, Np4 // 4
    flat = qkv.reshape(-1)
    fq = np.float32(qmax)
    quads = (N + 3) // 4
    U = B * quads
    for part in numba.prange(P):
        kl = np.zeros(heads * NB * G * 64, dtype=np.int8)  # zeros stay in the padding (_prepare_image)
        vl = np.zeros(heads * CB * J4 * 64, dtype=np.int8)
        ksum = np.zeros(heads * Np16, dtype=np.int32)
        sk = np.zeros(heads * Np16, dtype=np.float32)  # padding keys: scale 0
        sv = np.empty(heads * hdp16, dtype=np.float64)
        qu = np.empty(4 * hdp4, dtype=np.uint8)
        pc = np.empty(4 * Np4 + 16, dtype=np.uint8)  # + the last row's overrun (_probability_codes)
        si = np.empty(4 * Np16, dtype=np.int32)
        so = np.empty(4 * hdp16, dtype=np.int32)
        z = np.empty(Np16, dtype=np.float32)
        tmp = np.empty(hd, dtype=np.float32)
        codes = np.zeros(hdp4, dtype=np.int8)
        codes_u8 = codes.view(np.uint8)
        sq = np.empty(4, dtype=np.float32)
        ob = np.empty(4 * C, dtype=np.float32)
        b = -1
        for u in range(part * U // P, (part + 1) * U // P):
            if u // quads != b:
                b = u // quads
                _prepare_image(flat, b, N, C, heads, qmax, mult, kn_w, kn_b, eps, has_norm, kl, ksum, sk, vl, sv, tmp,
                               codes, rec_k, rec_v, recording)  # fmt: skip
            i0 = (u % quads) * 4
            rows = min(4, N - i0)
            for h in range(heads):
                if rows < 4 or hd % 16:
                    qu[:] = 128  # code 0 in the padding and in rows past the unit
                for r in range(rows):
                    base = (b * N + i0 + r) * C3 + h * hd
                    if hd % 16 == 0 and not PYTHON:  # codes + 128 straight into the tile's rows
                        src, m = _normed_max(flat[base : base + hd], qn_w, qn_b, eps, has_norm, tmp)
                        sq[r] = m / fq
                        inv_v, qmax_v = fsplat(fq / m), fsplat(fq)
                        for c in range(0, hd, 16):
                            _fquantize_mul_store_u8(qu, r * hdp4 + c, fload(src, c), inv_v, qmax_v)
                    else:
                        sq[r] = _norm_quantize(flat[base : base + hd], qn_w, qn_b, eps, has_norm, tmp, codes, qmax)
                        qrow = qu[r * hdp4 : r * hdp4 + hd]
                        for d in range(hd):
                            qrow[d] = codes_u8[d] ^ 128  # int8 c as unsigned c + 128: its sign bit flipped
                    if recording:
                        for d in range(hd):
                            rec_q[b, h, i0 + r, d] = np.int8(np.int32(qu[r * hdp4 + d]) - 128)
                _tile4(qu, hdp4, kl, h * NB, NB, si, tiles)
                for r in range(rows):
                    _probability_codes(si, r, Np16, ksum, sk, h * Np16, N, sq[r] * scale, z, pc, Np4, levels, mult)
                    if recording:
                        for j in range(N):
                            rec_p[b, h, i0 + r, j] = pc[r * Np4 + j]
                _tile4(pc, Np4, vl, h * CB, CB, so, tiles)
                svh = sv[h * hdp16 : h * hdp16 + hd]
                for r in range(rows):  # slices: indices from 0, so the loop vectorizes
                    orow, srow = ob[r * C + h * hd : r * C + (h + 1) * hd], so[r * hdp16 : r * hdp16 + hd]
                    for d in range(hd):
                        orow[d] = np.float32(np.float64(srow[d]) * svh[d])
            for r in range(rows):
                t = b * N + i0 + r
                if quantize:
                    s[t] = quantize_row(ob[r * C : (r + 1) * C], q[t])
                else:
                    out[t * C : (t + 1) * C] = ob[r * C : (r + 1) * C]


_NO_F32 = np.empty(0, dtype=np.float32)
_NO_CODES = np.empty((0, 0), dtype=np.int8)
_NO_REC = np.empty((0, 0, 0, 0), dtype=np.int8)
_NO_REC_P = np.empty((0, 0, 0, 0), dtype=np.uint8)


class Int8Attention:
    """The quantized attention of one block, bound to its config and qk norms: the engine
    calls it as it calls the float attention (``attention.attention*``).

    Parameters
    ----------
    heads, bits, prob_bits : int
        Heads, code widths of q/k/v and of the probabilities.
    q_norm, k_norm : (weight, bias, eps) or None
        The qk LayerNorms (``qk_norm``), float32 (head_dim,) each.
    prob_clip : float
        The top of the probabilities' code range (``attention_prob_clip``), a power of two.
    """

    def __init__(self, heads: int, bits: int, prob_bits: int, q_norm=None, k_norm=None, prob_clip: float = 1.0):
        self.heads, self.bits, self.prob_bits, self.prob_clip = heads, bits, prob_bits, float(prob_clip)
        self.q_norm, self.k_norm = q_norm, k_norm

    def _args(self, qkv, out, codes, path, record):
        B, N, C3 = qkv.shape
        C = C3 // 3
        if self.q_norm is not None:
            (qw, qb, eps), (kw, kb, _) = self.q_norm, self.k_norm
            norms = (qw, qb, kw, kb, float(eps), True)
        else:
            norms = (_NO_F32, _NO_F32, _NO_F32, _NO_F32, 1e-6, False)
        if record is not None:
            H, hd = self.heads, C // self.heads
            rec = (np.zeros((B, H, N, hd), np.int8), np.zeros((B, H, N, hd), np.int8),
                   np.zeros((B, H, hd, N), np.int8), np.zeros((B, H, N, N), np.uint8), True)  # fmt: skip
            record.update(q=rec[0], k=rec[1], v=rec[2], p=rec[3])
        else:
            rec = (_NO_REC, _NO_REC, _NO_REC, _NO_REC_P, False)
        P = job_count(B * ((N + 3) // 4))
        if codes is None:
            dest = (out.reshape(-1), P, False, _NO_CODES, _NO_F32)
        else:
            dest = (_NO_F32, P, True, *codes)
        scale = np.float32((C // self.heads) ** -0.5)  # in Python: the twins round the same float64 value
        levels = 2**self.prob_bits - 1
        mult = np.float32(levels / self.prob_clip)  # exact: L times a power of two
        args = (qkv, int(self.heads), code_max(self.bits), np.float32(levels), mult, scale, *norms, *dest, *rec)
        return args + (_tiles(path),)

    def bind(self, qkv: np.ndarray, heads: int, out: np.ndarray | None = None, codes=None, record=None):
        """``(kernel, args)`` as ``attention.bind_attention``: into ``out`` or to int8 ``codes``.
        ``record``, a dict, gets arrays that each call fills with its codes: q, k (B, H,
        N, hd), v (B, H, hd, N) (the oracle's layouts) and p (B, H, N, N)."""
        return _attention_int8, self._args(qkv, out, codes, None, record)

    def __call__(self, qkv: np.ndarray, heads: int, out: np.ndarray | None = None, record=None) -> np.ndarray:
        """float32 (B, N, dim) attention output, into ``out`` when given."""
        qkv = check_qkv(qkv, heads)
        B, N, C3 = qkv.shape
        out = check_out(out, (B, N, C3 // 3), np.float32, "out")
        fn, args = self.bind(qkv, heads, out=out, record=record)
        fn(*args)
        return out

    def quantize(self, qkv: np.ndarray, heads: int, out=None, record=None):
        """``quantize_rows(self(qkv))`` in one kernel: the proj layer's int8 codes and scales."""
        qkv = check_qkv(qkv, heads)
        B, N, C3 = qkv.shape
        q, s = codes_out((B * N, C3 // 3), out)
        fn, args = self.bind(qkv, heads, codes=(q, s), record=record)
        fn(*args)
        return q, s

    def reference(self, qkv: np.ndarray, record=None) -> np.ndarray:
        """:func:`attention_int8_ref` with this block's settings."""
        return attention_int8_ref(
            qkv, self.heads, self.bits, self.prob_bits, self.q_norm, self.k_norm, record, self.prob_clip
        )
