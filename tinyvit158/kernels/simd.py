"""512-bit vectors for Numba: the few AVX-512 operations the fast kernels are built from.

Numba has no vector types. ``zmm`` (16 x int32), ``zmmf`` (16 x float32) and ``zmmd``
(8 x float64) are Numba types whose LLVM representation is a vector, so a jitted function can hold them in named
local variables that LLVM keeps in zmm registers. Each intrinsic below emits one or two
LLVM instructions; they are the whole vocabulary of the micro-kernels in ``vnni.py`` and
of ``ops.attention``. Loads and stores take an array and an element index and do no
bounds checks: the callers guarantee the 16 (or 64 byte) lanes lie inside the array.
"""

from __future__ import annotations

import math

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic, models, register_model

from tinyvit158.constants import EXP32_INV_LN2, EXP32_LN2_HI, EXP32_LN2_LO, EXP32_MIN, EXP32_P

_I32 = ir.IntType(32)
_V16 = ir.VectorType(_I32, 16)  # one zmm of int32 lanes
_V64B = ir.VectorType(ir.IntType(8), 64)  # the same zmm as 64 bytes


class _Zmm(types.Type):
    """A 512-bit vector of 16 int32 lanes, held in a register. (Module-level classes, not a
    factory: Numba's cache pickles types by reference and must find them again.)"""

    def __init__(self):
        super().__init__(name="zmm_i32x16")


_LLVM_TYPES: dict[type, ir.VectorType] = {}  # each vector type's LLVM representation


class _VectorModel(models.PrimitiveModel):
    def __init__(self, dmm, fe_type):
        super().__init__(dmm, fe_type, _LLVM_TYPES[type(fe_type)])


def _vector_type(cls, vecty):
    """The instance of a vector type class, its data model registered as ``vecty``."""
    _LLVM_TYPES[cls] = vecty
    register_model(cls)(_VectorModel)
    return cls()


zmm = _vector_type(_Zmm, _V16)  # 16 int32 lanes


def _element_ptr(context, builder, arrty, arr, index):
    """Pointer to element ``index`` of a contiguous 1-D array (no bounds check)."""
    data = context.make_array(arrty)(context, builder, arr).data
    return builder.gep(data, [index])


# The operations every vector type has, made per type (``_vzero``, ``_fload``, ``_dfma``, ...).


def _zero_of(vty):
    @intrinsic
    def zero(typingctx):
        def codegen(context, builder, sig, args):
            return ir.Constant(_LLVM_TYPES[type(vty)], None)

        return vty(), codegen

    return zero


def _load_of(vty, align):
    """Lanes of an array from element ``index`` (``align``: the element size, or 1)."""

    @intrinsic
    def load(typingctx, arr, index):
        def codegen(context, builder, sig, args):
            ptr = _element_ptr(context, builder, sig.args[0], args[0], args[1])
            return builder.load(builder.bitcast(ptr, _LLVM_TYPES[type(vty)].as_pointer()), align=align)

        return vty(arr, index), codegen

    return load


def _store_of(vty, align):
    """Store the lanes into an array from element ``index``."""

    @intrinsic
    def store(typingctx, arr, index, vec):
        def codegen(context, builder, sig, args):
            ptr = _element_ptr(context, builder, sig.args[0], args[0], args[1])
            builder.store(args[2], builder.bitcast(ptr, _LLVM_TYPES[type(vty)].as_pointer()), align=align)
            return context.get_dummy_value()

        return types.void(arr, index, vty), codegen

    return store


def _fma_of(vty, llvm_name):
    """``a * b + c`` lane by lane, one rounding (``vfmadd``)."""

    @intrinsic
    def fma(typingctx, a, b, c):
        def codegen(context, builder, sig, args):
            return _call(builder, llvm_name, _LLVM_TYPES[type(vty)], args)

        return vty(vty, vty, vty), codegen

    return fma


def _call(builder, name, ret, args, fastmath=()):
    fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ret, [a.type for a in args]), name)
    return builder.call(fn, args, fastmath=fastmath)


_vzero = _zero_of(zmm)
_vload = _load_of(zmm, 1)  # 64 bytes of a uint8 array from byte ``index`` (unaligned)
_vstore = _store_of(zmm, 4)  # 16 int32 lanes into an int32 array


@intrinsic
def _vload_u2(typingctx, arr, index):
    """16 bytes of a uint8 array from byte ``index``, each holding four 2-bit codes, spread
    to 16 int32 lanes of four bytes: lane i = c0 | c1 << 8 | c2 << 16 | c3 << 24 where byte
    i = c0 | c1 << 2 | c2 << 4 | c3 << 6 (``vpmovzxbd``, then shifts and masks)."""

    def codegen(context, builder, sig, args):
        ptr = _element_ptr(context, builder, sig.args[0], args[0], args[1])
        v16b = builder.load(builder.bitcast(ptr, ir.VectorType(ir.IntType(8), 16).as_pointer()), align=1)
        b = builder.zext(v16b, _V16)
        out = builder.and_(b, _splat(builder, ir.Constant(_I32, 0x3), _V16))
        for shift, mask in ((6, 0x300), (12, 0x30000), (18, 0x3000000)):
            moved = builder.shl(b, _splat(builder, ir.Constant(_I32, shift), _V16))
            out = builder.or_(out, builder.and_(moved, _splat(builder, ir.Constant(_I32, mask), _V16)))
        return out

    return zmm(arr, index), codegen


@intrinsic
def _vbroadcast4(typingctx, arr, index):
    """The 4 bytes of an int8 array at byte ``index``, as one int32 copied to all 16 lanes."""

    def codegen(context, builder, sig, args):
        ptr = _element_ptr(context, builder, sig.args[0], args[0], args[1])
        word = builder.load(builder.bitcast(ptr, _I32.as_pointer()), align=1)
        vec = builder.insert_element(ir.Constant(_V16, None), word, ir.Constant(_I32, 0))
        return builder.shuffle_vector(vec, ir.Constant(_V16, None), ir.Constant(_V16, None))  # splat lane 0

    return zmm(arr, index), codegen


@intrinsic
def _dpbusd(typingctx, acc, u8, s8):
    """``acc[i] += sum_{j<4} u8[4i+j] * s8[4i+j]`` (unsigned x signed bytes, exact int32)."""

    def codegen(context, builder, sig, args):
        fnty = ir.FunctionType(_V16, [_V16, _V64B, _V64B])
        fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.x86.avx512.vpdpbusd.512")
        return builder.call(fn, [args[0], builder.bitcast(args[1], _V64B), builder.bitcast(args[2], _V64B)])

    return zmm(zmm, zmm, zmm), codegen


@intrinsic
def _vhsum(typingctx, a):
    """The sum of the 16 int32 lanes (exact)."""

    def codegen(context, builder, sig, args):
        return _call(builder, "llvm.vector.reduce.add.v16i32", _I32, args)

    return types.int32(zmm), codegen


_F32 = ir.FloatType()
_V16F = ir.VectorType(_F32, 16)


def _splat(builder, value, vecty):
    """``value`` copied to every lane of ``vecty``."""
    vec = builder.insert_element(ir.Constant(vecty, None), value, ir.Constant(_I32, 0))
    mask = ir.Constant(ir.VectorType(_I32, vecty.count), None)  # all lanes take lane 0
    return builder.shuffle_vector(vec, ir.Constant(vecty, None), mask)


@intrinsic
def _dequant_store(typingctx, out, out_index, acc, xsum, s, scale, n_index, bias, has_bias, accumulate):
    """``out[out_index + i] (+)= float32(acc[i] - xsum) * s * scale[n_index + i] (+ bias[n_index + i])``
    for 16 lanes: the reference's float32 operations, in its order, as vector instructions;
    ``accumulate`` adds the result to what ``out`` holds (a residual connection, in place)."""

    def codegen(context, builder, sig, args):
        out_a, out_i, acc_v, xsum_v, s_v, scale_a, n_i, bias_a, has_b, acc_b = args
        w = xsum_v.type.width
        xs = xsum_v if w == 32 else builder.sext(xsum_v, _I32) if w < 32 else builder.trunc(xsum_v, _I32)
        v = builder.sub(acc_v, _splat(builder, xs, _V16))
        f = builder.fmul(builder.sitofp(v, _V16F), _splat(builder, s_v, _V16F))
        sc_ptr = _element_ptr(context, builder, sig.args[5], scale_a, n_i)
        f = builder.fmul(f, builder.load(builder.bitcast(sc_ptr, _V16F.as_pointer()), align=4))
        b_ptr = _element_ptr(context, builder, sig.args[7], bias_a, n_i)
        fb = builder.fadd(f, builder.load(builder.bitcast(b_ptr, _V16F.as_pointer()), align=4))
        res = builder.select(has_b, fb, f)
        o_ptr = builder.bitcast(_element_ptr(context, builder, sig.args[0], out_a, out_i), _V16F.as_pointer())
        res = builder.select(acc_b, builder.fadd(builder.load(o_ptr, align=4), res), res)
        builder.store(res, o_ptr, align=4)
        return context.get_dummy_value()

    return types.void(out, out_index, zmm, xsum, s, scale, n_index, bias, has_bias, accumulate), codegen


# -- float32 vectors ------------------------------------------------------------------------


class _Zmmf(types.Type):
    """A 512-bit vector of 16 float32 lanes, held in a register."""

    def __init__(self):
        super().__init__(name="zmm_f32x16")


zmmf = _vector_type(_Zmmf, _V16F)  # 16 float32 lanes
_fzero = _zero_of(zmmf)
_fload = _load_of(zmmf, 4)
_fstore = _store_of(zmmf, 4)
_ffma = _fma_of(zmmf, "llvm.fma.v16f32")


def _splat_of(vty, scalar):
    """A ``scalar`` (a Numba type) copied to every lane."""

    @intrinsic
    def splat(typingctx, value):
        def codegen(context, builder, sig, args):
            return _splat(builder, args[0], _LLVM_TYPES[type(vty)])

        return vty(scalar), codegen

    return splat


def _binary(name: str, vty=zmmf):
    """An intrinsic applying one LLVM float instruction lane by lane (one rounding each)."""

    @intrinsic
    def op(typingctx, a, b):
        def codegen(context, builder, sig, args):
            return getattr(builder, name)(args[0], args[1])

        return vty(vty, vty), codegen

    return op


def _lanewise_of(vty, llvm_name: str):
    """An LLVM intrinsic of two vectors, lane by lane (``llvm.maxnum``, ``llvm.minnum``)."""

    @intrinsic
    def op(typingctx, a, b):
        def codegen(context, builder, sig, args):
            return _call(builder, llvm_name, _LLVM_TYPES[type(vty)], args)

        return vty(vty, vty), codegen

    return op


def _hmax_of(vty, scalar, llvm_name: str):
    """The largest lane (exact in any order; the lanes hold no NaN)."""

    @intrinsic
    def hmax(typingctx, a):
        def codegen(context, builder, sig, args):
            return _call(builder, llvm_name, context.get_value_type(scalar), args, fastmath=("nnan",))

        return scalar(vty), codegen

    return hmax


_fsplat = _splat_of(zmmf, types.float32)
_fadd = _binary("fadd")
_fsub = _binary("fsub")
_fmul = _binary("fmul")
_fmax = _lanewise_of(zmmf, "llvm.maxnum.v16f32")
_fmin = _lanewise_of(zmmf, "llvm.minnum.v16f32")
_fhmax = _hmax_of(zmmf, types.float32, "llvm.vector.reduce.fmax.v16f32")


@intrinsic
def _fabs(typingctx, a):
    """Lane-wise absolute value."""

    def codegen(context, builder, sig, args):
        return _call(builder, "llvm.fabs.v16f32", _V16F, args)

    return zmmf(zmmf), codegen


_fdiv = _binary("fdiv")


@intrinsic
def _fbcast(typingctx, arr, index):
    """``arr[index]`` (float32) copied to 16 lanes: one ``vbroadcastss`` from memory. (As
    ``_fsplat(arr[index])`` Numba adds a negative-index test per load: in the attention
    loops that tripled the instructions per fused multiply-add.)"""

    def codegen(context, builder, sig, args):
        ptr = _element_ptr(context, builder, sig.args[0], args[0], args[1])
        return _splat(builder, builder.load(ptr, align=4), _V16F)

    return zmmf(arr, index), codegen


@intrinsic
def _fload_i8(typingctx, arr, index):
    """16 int8 values from element ``index``, converted to 16 float32 lanes (exact)."""

    def codegen(context, builder, sig, args):
        ptr = _element_ptr(context, builder, sig.args[0], args[0], args[1])
        v = builder.load(builder.bitcast(ptr, ir.VectorType(ir.IntType(8), 16).as_pointer()), align=1)
        return builder.sitofp(v, _V16F)

    return zmmf(arr, index), codegen


@intrinsic
def _ftoi(typingctx, a):
    """16 float32 lanes holding whole numbers, as 16 int32 lanes (exact below 2**31)."""

    def codegen(context, builder, sig, args):
        return builder.fptosi(args[0], _V16)

    return zmm(zmmf), codegen


def _quantize_store_of(op: str, offset: bool = False):
    """The 16-lane quantizing store with ``op`` (``fdiv``: v / s; ``fmul``: v * (1 / s));
    ``offset`` stores each code plus 128 as an unsigned byte (its sign bit flipped)."""

    @intrinsic
    def quantize_store(typingctx, q, index, v, s_v, qmax_v):
        def codegen(context, builder, sig, args):
            return _quantize_codegen(context, builder, sig, args, op, offset)

        return types.void(q, index, zmmf, zmmf, zmmf), codegen

    return quantize_store


def _quantize_codegen(context, builder, sig, args, op, offset=False):
    """``q[index + i] = int8(clamp(rint(v[i] op s), -qmax, qmax))`` for 16 lanes: IEEE
    division (or product), round half to even (``llvm.rint``, as ``np.rint``), clamp,
    then exact conversion: the scalar quantizer's operations, 16 at a time (LLVM kept
    that loop at 8 lanes)."""
    q_a, q_i, v, s, qm = args
    r = _call(builder, "llvm.rint.v16f32", _V16F, [getattr(builder, op)(v, s)])
    r = _call(builder, "llvm.maxnum.v16f32", _V16F, [r, builder.fneg(qm)])
    r = _call(builder, "llvm.minnum.v16f32", _V16F, [r, qm])
    codes = builder.trunc(builder.fptosi(r, _V16), ir.VectorType(ir.IntType(8), 16))
    if offset:
        codes = builder.xor(codes, _splat(builder, ir.Constant(ir.IntType(8), 0x80), ir.VectorType(ir.IntType(8), 16)))
    ptr = _element_ptr(context, builder, sig.args[0], q_a, q_i)
    builder.store(codes, builder.bitcast(ptr, ir.VectorType(ir.IntType(8), 16).as_pointer()), align=1)
    return context.get_dummy_value()


_fquantize_store = _quantize_store_of("fdiv")  # v / s: the activation quantizer
_fquantize_mul_store = _quantize_store_of("fmul")  # v * (qmax / absmax): the int8 attention's
_fquantize_mul_store_u8 = _quantize_store_of("fmul", offset=True)  # the same, as code + 128 (its q)


# -- float64 vectors (attention: ``ops._attention``) ------------------------------------------

_F64 = ir.DoubleType()
_V8D = ir.VectorType(_F64, 8)
_V8F = ir.VectorType(_F32, 8)


class _Zmmd(types.Type):
    """A 512-bit vector of 8 float64 lanes, held in a register. (LLVM's own vectorizer
    stops at 256 bits on this CPU: 4 lanes, half the speed.)"""

    def __init__(self):
        super().__init__(name="zmm_f64x8")


zmmd = _vector_type(_Zmmd, _V8D)  # 8 float64 lanes
_dzero = _zero_of(zmmd)
_dload = _load_of(zmmd, 8)
_dstore = _store_of(zmmd, 8)
_dfma = _fma_of(zmmd, "llvm.fma.v8f64")


@intrinsic
def _dbcast(typingctx, arr, index):
    """``arr[index]`` (float64) copied to 8 lanes."""

    def codegen(context, builder, sig, args):
        ptr = _element_ptr(context, builder, sig.args[0], args[0], args[1])
        return _splat(builder, builder.load(ptr, align=8), _V8D)

    return zmmd(arr, index), codegen


@intrinsic
def _dbcast32(typingctx, arr, index):
    """``arr[index]`` (float32, widened exactly to float64) copied to 8 lanes."""

    def codegen(context, builder, sig, args):
        ptr = _element_ptr(context, builder, sig.args[0], args[0], args[1])
        return _splat(builder, builder.fpext(builder.load(ptr, align=4), _F64), _V8D)

    return zmmd(arr, index), codegen


@intrinsic
def _dload32(typingctx, arr, index):
    """8 float32 elements of ``arr`` from ``index``, each widened exactly to float64."""

    def codegen(context, builder, sig, args):
        ptr = _element_ptr(context, builder, sig.args[0], args[0], args[1])
        return builder.fpext(builder.load(builder.bitcast(ptr, _V8F.as_pointer()), align=4), _V8D)

    return zmmd(arr, index), codegen


@intrinsic
def _dstore32(typingctx, arr, index, vec):
    """Store 8 float64 lanes, each rounded once to float32, into a float32 array from ``index``."""

    def codegen(context, builder, sig, args):
        ptr = _element_ptr(context, builder, sig.args[0], args[0], args[1])
        builder.store(builder.fptrunc(args[2], _V8F), builder.bitcast(ptr, _V8F.as_pointer()), align=4)
        return context.get_dummy_value()

    return types.void(arr, index, zmmd), codegen


_dsplat = _splat_of(zmmd, types.float64)
_dadd = _binary("fadd", zmmd)
_dsub = _binary("fsub", zmmd)
_dmul = _binary("fmul", zmmd)
_dmax = _lanewise_of(zmmd, "llvm.maxnum.v8f64")
_dhmax = _hmax_of(zmmd, types.float64, "llvm.vector.reduce.fmax.v8f64")


@intrinsic
def _dhsum(typingctx, a):
    """The sum of the 8 lanes, added in lane order (an ordered reduction: the same on every run)."""

    def codegen(context, builder, sig, args):
        return _call(builder, "llvm.vector.reduce.fadd.v8f64", _F64, [ir.Constant(_F64, -0.0), args[0]])

    return types.float64(zmmd), codegen


# exp(x) for x <= 0 in float64: ``ops._exp64_inplace`` (the float attention's softmax)
_INV_LN2_64 = 1.4426950408889634
_LN2_HI_64 = 6.93147180369123816490e-01  # ln 2 split so that n * _LN2_HI_64 is exact (fdlibm)
_LN2_LO_64 = 1.90821492927058770002e-10
_INV_FACT = tuple(1.0 / math.factorial(k) for k in range(13, -1, -1))  # 1/13!, ..., 1/1!, 1/0!


_V8I64 = ir.VectorType(ir.IntType(64), 8)


@intrinsic
def _dexp(typingctx, v):
    """exp of 8 float64 lanes x <= 0: ``ops._exp64_inplace``'s operations lane by lane, each
    rounded as written (no fused multiply-adds), so the same bits: x = max(x, -708);
    k = floor(x / ln2 + 1/2); r = (x - k HI) - k LO; Taylor to degree 13 by Horner; times 2**k
    built from its exponent bits."""

    def codegen(context, builder, sig, args):
        def c(value):
            return _splat(builder, ir.Constant(_F64, value), _V8D)

        x = _call(builder, "llvm.maxnum.v8f64", _V8D, [args[0], c(-708.0)])
        k = _call(builder, "llvm.floor.v8f64", _V8D, [builder.fadd(builder.fmul(x, c(_INV_LN2_64)), c(0.5))])
        r = builder.fsub(builder.fsub(x, builder.fmul(k, c(_LN2_HI_64))), builder.fmul(k, c(_LN2_LO_64)))
        p = c(_INV_FACT[0])
        for coef in _INV_FACT[1:]:
            p = builder.fadd(builder.fmul(p, r), c(coef))
        e = builder.add(builder.fptosi(k, _V8I64), _splat(builder, ir.Constant(ir.IntType(64), 1023), _V8I64))
        pow2 = builder.bitcast(builder.shl(e, _splat(builder, ir.Constant(ir.IntType(64), 52), _V8I64)), _V8D)
        return builder.fmul(p, pow2)

    return zmmd(zmmd), codegen


# -- the int8 attention's float32 softmax (``qattn``): every operation IEEE, in a fixed order ------
# exp(x) for x <= 0 in float32 (Cephes expf): x = k ln2 + r, |r| <= ln2 / 2, exp(r) = 1 + r +
# r^2 P(r): the constants are ``constants.py``'s.


def _exp32_codegen(builder, x):
    """The lanes of ``_fexp``: see there."""

    def c(v):
        return _splat(builder, ir.Constant(_F32, v), _V16F)

    x = _call(builder, "llvm.maxnum.v16f32", _V16F, [x, c(EXP32_MIN)])
    k = _call(builder, "llvm.floor.v16f32", _V16F, [builder.fadd(builder.fmul(x, c(EXP32_INV_LN2)), c(0.5))])
    r = builder.fsub(builder.fsub(x, builder.fmul(k, c(EXP32_LN2_HI))), builder.fmul(k, c(EXP32_LN2_LO)))
    p = c(EXP32_P[0])
    for coef in EXP32_P[1:]:
        p = builder.fadd(builder.fmul(p, r), c(coef))
    y = builder.fadd(builder.fadd(builder.fmul(p, builder.fmul(r, r)), r), c(1.0))
    e = builder.add(builder.fptosi(k, _V16), _splat(builder, ir.Constant(_I32, 127), _V16))
    pow2 = builder.bitcast(builder.shl(e, _splat(builder, ir.Constant(_I32, 23), _V16)), _V16F)
    return builder.fmul(y, pow2)


@intrinsic
def _fexp(typingctx, v):
    """exp of 16 float32 lanes x <= 0, each operation rounded as written (no fused
    multiply-adds): x = max(x, -87); k = floor(x / ln2 + 1/2); r = (x - k HI) - k LO;
    p = Horner(EXP32_P, r); y = (p r^2 + r) + 1; times 2**k. ``qattn.exp32`` is the same in
    NumPy, ``train/model.exp32`` in PyTorch."""

    def codegen(context, builder, sig, args):
        return _exp32_codegen(builder, args[0])

    return zmmf(zmmf), codegen


@intrinsic
def _fhsum_tree(typingctx, a):
    """The sum of 16 float32 lanes in a fixed tree: lanes i + (i + 8), then i + (i + 4),
    i + (i + 2), i + (i + 1) (what ``qattn.lane_sum`` does in NumPy)."""

    def codegen(context, builder, sig, args):
        v = args[0]
        for half in (8, 4, 2, 1):
            lo = builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(_I32, half), list(range(half))))
            hi = builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(_I32, half), list(range(half, 2 * half))))
            v = builder.fadd(lo, hi)
        return builder.extract_element(v, ir.Constant(_I32, 0))

    return types.float32(zmmf), codegen


@intrinsic
def _fprob_store(typingctx, out, index, e, inv, mult, levels):
    """``out[index + i] = uint8(min(rint(e[i] * inv * M), L))`` for 16 lanes (float32
    products in that order, round half to even): the int8 attention's probability codes."""

    def codegen(context, builder, sig, args):
        out_a, out_i, ev, inv_s, mv, lv = args
        p = builder.fmul(builder.fmul(ev, _splat(builder, inv_s, _V16F)), _splat(builder, mv, _V16F))
        p = _call(builder, "llvm.rint.v16f32", _V16F, [p])
        p = _call(builder, "llvm.minnum.v16f32", _V16F, [p, _splat(builder, lv, _V16F)])
        codes = builder.fptoui(p, ir.VectorType(ir.IntType(8), 16))
        ptr = _element_ptr(context, builder, sig.args[0], out_a, out_i)
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
        r = _call(builder, "llvm.rint.v16f32", _V16F, [builder.fmul(v_v, inv_v)])
        r = _call(builder, "llvm.maxnum.v16f32", _V16F, [r, builder.fneg(qm)])
        r = _call(builder, "llvm.minnum.v16f32", _V16F, [r, qm])
        ints = builder.fptosi(r, _V16)
        codes = builder.trunc(ints, ir.VectorType(ir.IntType(8), 16))
        words = builder.bitcast(codes, ir.VectorType(_I32, 4))
        i64 = ir.IntType(64)
        for g in range(4):
            at = builder.add(q_i, builder.mul(st, ir.Constant(i64, g)))
            ptr = builder.bitcast(_element_ptr(context, builder, sig.args[0], q_a, at), _I32.as_pointer())
            builder.store(builder.extract_element(words, ir.Constant(_I32, g)), ptr, align=1)
        return _call(builder, "llvm.vector.reduce.add.v16i32", _I32, [ints])

    return types.int32(q, types.intp, types.intp, zmmf, zmmf, zmmf), codegen


@intrinsic
def _fscores(typingctx, acc, corr, scale, k_index):
    """``float32(acc[i] - corr[k_index + i]) * scale[k_index + i]`` for 16 lanes (as
    ``_fscores_store``, in a register)."""

    def codegen(context, builder, sig, args):
        acc_v, corr_a, scale_a, k_i = args
        cptr = builder.bitcast(_element_ptr(context, builder, sig.args[1], corr_a, k_i), _V16.as_pointer())
        sptr = builder.bitcast(_element_ptr(context, builder, sig.args[2], scale_a, k_i), _V16F.as_pointer())
        v = builder.sitofp(builder.sub(acc_v, builder.load(cptr, align=4)), _V16F)
        return builder.fmul(v, builder.load(sptr, align=4))

    return zmmf(zmm, corr, scale, k_index), codegen


@intrinsic
def _fmask(typingctx, v, valid, value):
    """``v`` with lanes ``valid`` .. 15 set to ``value``."""

    def codegen(context, builder, sig, args):
        vec, n, val = args
        lanes = ir.Constant(_V16, list(range(16)))
        keep = builder.icmp_signed("<", lanes, _splat(builder, builder.trunc(n, _I32), _V16))
        return builder.select(keep, vec, _splat(builder, val, _V16F))

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
            r = _call(builder, "llvm.rint.v16f32", _V16F, [builder.fmul(v, inv_v)])
            r = _call(builder, "llvm.maxnum.v16f32", _V16F, [r, builder.fneg(qm)])
            r = _call(builder, "llvm.minnum.v16f32", _V16F, [r, qm])
            codes.append(builder.trunc(builder.fptosi(r, _V16), v16b))
        lo = builder.shuffle_vector(codes[0], codes[1], ir.Constant(ir.VectorType(_I32, 32), list(range(32))))
        hi = builder.shuffle_vector(codes[2], codes[3], ir.Constant(ir.VectorType(_I32, 32), list(range(32))))
        order = [16 * t + c for c in range(16) for t in range(4)]  # byte 4c + t <- token t, channel c
        out = builder.shuffle_vector(lo, hi, ir.Constant(ir.VectorType(_I32, 64), order))
        ptr = _element_ptr(context, builder, sig.args[0], d_a, d_i)
        builder.store(out, builder.bitcast(ptr, _V64B.as_pointer()), align=1)
        return context.get_dummy_value()

    return types.void(dst, index, zmmf, zmmf, zmmf, zmmf, zmmf, zmmf), codegen
