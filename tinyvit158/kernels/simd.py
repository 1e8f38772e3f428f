"""Vectors for Numba: the few vector operations the fast kernels are built from.

Numba has no vector types. ``zmm`` (16 x int32), ``zmmf`` (16 x float32), ``zmmd`` (8 x
float64) and ``ymm`` (8 x int32, AVX2's register) are Numba types whose LLVM
representation is a vector, so a jitted function can hold them in named local variables
that LLVM keeps in registers (a 512-bit one in two ymm registers where the CPU has no
AVX-512). Each intrinsic below emits one or two LLVM instructions; they are the whole
vocabulary of the micro-kernels (``vnni.py``, ``avx2.py``, ``portable.py``) and of
``attention.py``. Only ``dpbusd`` (AVX-512 VNNI) and the ``y*`` int8 products (AVX2) name
x86 instructions; the rest is portable LLVM. Loads and stores take an array and an element
index and do no bounds checks: the callers guarantee the lanes lie inside the array.
"""

from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic, models, register_model

from tinyvit158.constants import (
    EXP32_INV_LN2,
    EXP32_LN2_HI,
    EXP32_LN2_LO,
    EXP32_MIN,
    EXP32_P,
    EXP64_INV_FACT,
    EXP64_INV_LN2,
    EXP64_LN2_HI,
    EXP64_LN2_LO,
)

I32 = ir.IntType(32)
V16 = ir.VectorType(I32, 16)  # one zmm of int32 lanes
V64B = ir.VectorType(ir.IntType(8), 64)  # the same zmm as 64 bytes


class _Zmm(types.Type):
    """A 512-bit vector of 16 int32 lanes, held in a register. (Module-level classes, not a
    factory: Numba's cache pickles types by reference and must find them again.)"""

    def __init__(self):
        super().__init__(name="zmm_i32x16")


LLVM_TYPES: dict[type, ir.VectorType] = {}  # each vector type's LLVM representation


class _VectorModel(models.PrimitiveModel):
    def __init__(self, dmm, fe_type):
        super().__init__(dmm, fe_type, LLVM_TYPES[type(fe_type)])


def _vector_type(cls, vecty):
    """The instance of a vector type class, its data model registered as ``vecty``."""
    LLVM_TYPES[cls] = vecty
    register_model(cls)(_VectorModel)
    return cls()


zmm = _vector_type(_Zmm, V16)  # 16 int32 lanes


def element_ptr(context, builder, arrty, arr, index):
    """Pointer to element ``index`` of a contiguous 1-D array (no bounds check)."""
    data = context.make_array(arrty)(context, builder, arr).data
    return builder.gep(data, [index])


# The operations every vector type has, made per type (``vzero``, ``fload``, ``dfma``, ...).


def _zero_of(vty):
    @intrinsic
    def zero(typingctx):
        def codegen(context, builder, sig, args):
            return ir.Constant(LLVM_TYPES[type(vty)], None)

        return vty(), codegen

    return zero


def _load_of(vty, align):
    """Lanes of an array from element ``index`` (``align``: the element size, or 1)."""

    @intrinsic
    def load(typingctx, arr, index):
        def codegen(context, builder, sig, args):
            ptr = element_ptr(context, builder, sig.args[0], args[0], args[1])
            return builder.load(builder.bitcast(ptr, LLVM_TYPES[type(vty)].as_pointer()), align=align)

        return vty(arr, index), codegen

    return load


def _store_of(vty, align):
    """Store the lanes into an array from element ``index``."""

    @intrinsic
    def store(typingctx, arr, index, vec):
        def codegen(context, builder, sig, args):
            ptr = element_ptr(context, builder, sig.args[0], args[0], args[1])
            builder.store(args[2], builder.bitcast(ptr, LLVM_TYPES[type(vty)].as_pointer()), align=align)
            return context.get_dummy_value()

        return types.void(arr, index, vty), codegen

    return store


def _sub_splat_store_of(vty):
    """Store ``vec - s`` (``s`` a scalar, subtracted from every lane) into an array from
    element ``index``: an int32 tile's exact sums less its row's correction."""

    @intrinsic
    def sub_splat_store(typingctx, arr, index, vec, s):
        def codegen(context, builder, sig, args):
            vecty = LLVM_TYPES[type(vty)]
            splat = splat_ir(builder, as_i32(builder, args[3]), vecty)
            ptr = element_ptr(context, builder, sig.args[0], args[0], args[1])
            builder.store(builder.sub(args[2], splat), builder.bitcast(ptr, vecty.as_pointer()), align=4)
            return context.get_dummy_value()

        return types.void(arr, index, vty, s), codegen

    return sub_splat_store


def _fma_of(vty, llvm_name):
    """``a * b + c`` lane by lane, one rounding (``vfmadd``)."""

    @intrinsic
    def fma(typingctx, a, b, c):
        def codegen(context, builder, sig, args):
            return llvm_call(builder, llvm_name, LLVM_TYPES[type(vty)], args)

        return vty(vty, vty, vty), codegen

    return fma


def llvm_call(builder, name, ret, args, fastmath=()):
    fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ret, [a.type for a in args]), name)
    return builder.call(fn, args, fastmath=fastmath)


vzero = _zero_of(zmm)
vload = _load_of(zmm, 1)  # 64 bytes of a uint8 array from byte ``index`` (unaligned)
vstore = _store_of(zmm, 4)  # 16 int32 lanes into an int32 array
substore = _sub_splat_store_of(zmm)  # 16 int32 lanes less a scalar into an int32 array


@intrinsic
def vload_u2(typingctx, arr, index):
    """16 bytes of a uint8 array from byte ``index``, each holding four 2-bit codes, spread
    to 16 int32 lanes of four bytes: lane i = c0 | c1 << 8 | c2 << 16 | c3 << 24 where byte
    i = c0 | c1 << 2 | c2 << 4 | c3 << 6 (``vpmovzxbd``, then shifts and masks)."""

    def codegen(context, builder, sig, args):
        ptr = element_ptr(context, builder, sig.args[0], args[0], args[1])
        v16b = builder.load(builder.bitcast(ptr, ir.VectorType(ir.IntType(8), 16).as_pointer()), align=1)
        b = builder.zext(v16b, V16)
        out = builder.and_(b, splat_ir(builder, ir.Constant(I32, 0x3), V16))
        for shift, mask in ((6, 0x300), (12, 0x30000), (18, 0x3000000)):
            moved = builder.shl(b, splat_ir(builder, ir.Constant(I32, shift), V16))
            out = builder.or_(out, builder.and_(moved, splat_ir(builder, ir.Constant(I32, mask), V16)))
        return out

    return zmm(arr, index), codegen


@intrinsic
def vbroadcast4(typingctx, arr, index):
    """The 4 bytes of an int8 array at byte ``index``, as one int32 copied to all 16 lanes."""

    def codegen(context, builder, sig, args):
        ptr = element_ptr(context, builder, sig.args[0], args[0], args[1])
        word = builder.load(builder.bitcast(ptr, I32.as_pointer()), align=1)
        vec = builder.insert_element(ir.Constant(V16, None), word, ir.Constant(I32, 0))
        return builder.shuffle_vector(vec, ir.Constant(V16, None), ir.Constant(V16, None))  # splat lane 0

    return zmm(arr, index), codegen


@intrinsic
def dpbusd(typingctx, acc, u8, s8):
    """``acc[i] += sum_{j<4} u8[4i+j] * s8[4i+j]`` (unsigned x signed bytes, exact int32)."""

    def codegen(context, builder, sig, args):
        fnty = ir.FunctionType(V16, [V16, V64B, V64B])
        fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.x86.avx512.vpdpbusd.512")
        return builder.call(fn, [args[0], builder.bitcast(args[1], V64B), builder.bitcast(args[2], V64B)])

    return zmm(zmm, zmm, zmm), codegen


@intrinsic
def vhsum(typingctx, a):
    """The sum of the 16 int32 lanes (exact)."""

    def codegen(context, builder, sig, args):
        return llvm_call(builder, "llvm.vector.reduce.add.v16i32", I32, args)

    return types.int32(zmm), codegen


F32 = ir.FloatType()
V16F = ir.VectorType(F32, 16)


def as_i32(builder, value):
    """An integer scalar as int32 (sign-extended or truncated)."""
    w = value.type.width
    return value if w == 32 else builder.sext(value, I32) if w < 32 else builder.trunc(value, I32)


def splat_ir(builder, value, vecty):
    """``value`` copied to every lane of ``vecty``."""
    vec = builder.insert_element(ir.Constant(vecty, None), value, ir.Constant(I32, 0))
    mask = ir.Constant(ir.VectorType(I32, vecty.count), None)  # all lanes take lane 0
    return builder.shuffle_vector(vec, ir.Constant(vecty, None), mask)


def _dequant_codegen(context, builder, sig, args, ivec, fvec):
    """The lanes of :func:`dequant_store` (``ivec``: the accumulators' int32 vector type,
    ``fvec``: the float32 vector of as many lanes)."""
    out_a, out_i, acc_v, xsum_v, s_v, scale_a, n_i, bias_a, has_b, acc_b = args
    v = builder.sub(acc_v, splat_ir(builder, as_i32(builder, xsum_v), ivec))
    f = builder.fmul(builder.sitofp(v, fvec), splat_ir(builder, s_v, fvec))
    sc_ptr = element_ptr(context, builder, sig.args[5], scale_a, n_i)
    f = builder.fmul(f, builder.load(builder.bitcast(sc_ptr, fvec.as_pointer()), align=4))
    b_ptr = element_ptr(context, builder, sig.args[7], bias_a, n_i)
    fb = builder.fadd(f, builder.load(builder.bitcast(b_ptr, fvec.as_pointer()), align=4))
    res = builder.select(has_b, fb, f)
    o_ptr = builder.bitcast(element_ptr(context, builder, sig.args[0], out_a, out_i), fvec.as_pointer())
    res = builder.select(acc_b, builder.fadd(builder.load(o_ptr, align=4), res), res)
    builder.store(res, o_ptr, align=4)
    return context.get_dummy_value()


@intrinsic
def dequant_store(typingctx, out, out_index, acc, xsum, s, scale, n_index, bias, has_bias, accumulate):
    """``out[out_index + i] (+)= float32(acc[i] - xsum) * s * scale[n_index + i] (+ bias[n_index + i])``
    for 16 lanes: the reference's float32 operations, in its order, as vector instructions;
    ``accumulate`` adds the result to what ``out`` holds (a residual connection, in place)."""

    def codegen(context, builder, sig, args):
        return _dequant_codegen(context, builder, sig, args, V16, V16F)

    return types.void(out, out_index, zmm, xsum, s, scale, n_index, bias, has_bias, accumulate), codegen


# -- 256-bit int8 products (AVX2: vpmaddubsw, vpmaddwd) ---------------------------------------

V8 = ir.VectorType(I32, 8)  # one ymm of int32 lanes
V16S = ir.VectorType(ir.IntType(16), 16)  # the same ymm as int16 lanes
V32B = ir.VectorType(ir.IntType(8), 32)  # the same ymm as bytes


class _Ymm(types.Type):
    """A 256-bit vector held in a register, typed as 8 int32 lanes; the int16 and byte
    views are bitcasts inside the intrinsics that need them."""

    def __init__(self):
        super().__init__(name="ymm_i32x8")


ymm = _vector_type(_Ymm, V8)
yzero = _zero_of(ymm)
yload = _load_of(ymm, 1)  # 32 bytes of a uint8 array from byte ``index`` (unaligned)
ystore = _store_of(ymm, 4)  # 8 int32 lanes into an int32 array
ysubstore = _sub_splat_store_of(ymm)  # 8 int32 lanes less a scalar into an int32 array


@intrinsic
def ybroadcast4(typingctx, arr, index):
    """The 4 bytes of an int8 array at byte ``index``, as one int32 copied to all 8 lanes."""

    def codegen(context, builder, sig, args):
        ptr = element_ptr(context, builder, sig.args[0], args[0], args[1])
        word = builder.load(builder.bitcast(ptr, I32.as_pointer()), align=1)
        return splat_ir(builder, word, V8)

    return ymm(arr, index), codegen


@intrinsic
def ymaddubs16(typingctx, acc16, u8, s8):
    """``acc16 + vpmaddubsw(u8, s8)`` in 16 int16 lanes: lane i gains
    ``u8[2i] s8[2i] + u8[2i + 1] s8[2i + 1]``. ``vpmaddubsw`` saturates each pair sum to
    int16 and the add wraps: the caller bounds both (``kernels/avx2.py`` states how)."""

    def codegen(context, builder, sig, args):
        fnty = ir.FunctionType(V16S, [V32B, V32B])
        fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.x86.avx2.pmadd.ub.sw")
        pairs = builder.call(fn, [builder.bitcast(args[1], V32B), builder.bitcast(args[2], V32B)])
        return builder.bitcast(builder.add(builder.bitcast(args[0], V16S), pairs), V8)

    return ymm(ymm, ymm, ymm), codegen


@intrinsic
def ywiden(typingctx, acc32, acc16):
    """``acc32 + vpmaddwd(acc16, 1)``: int32 lane i gains int16 lanes 2i and 2i + 1 (exact)."""

    def codegen(context, builder, sig, args):
        fnty = ir.FunctionType(V8, [V16S, V16S])
        fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.x86.avx2.pmadd.wd")
        ones = splat_ir(builder, ir.Constant(ir.IntType(16), 1), V16S)
        return builder.add(args[0], builder.call(fn, [builder.bitcast(args[1], V16S), ones]))

    return ymm(ymm, ymm), codegen


@intrinsic
def ydequant_store(typingctx, out, out_index, acc, xsum, s, scale, n_index, bias, has_bias, accumulate):
    """:func:`dequant_store` for 8 lanes: the same float32 operations in the same order."""

    def codegen(context, builder, sig, args):
        return _dequant_codegen(context, builder, sig, args, V8, ir.VectorType(F32, 8))

    return types.void(out, out_index, ymm, xsum, s, scale, n_index, bias, has_bias, accumulate), codegen


# -- float32 vectors ------------------------------------------------------------------------


class _Zmmf(types.Type):
    """A 512-bit vector of 16 float32 lanes, held in a register."""

    def __init__(self):
        super().__init__(name="zmm_f32x16")


zmmf = _vector_type(_Zmmf, V16F)  # 16 float32 lanes
fzero = _zero_of(zmmf)
fload = _load_of(zmmf, 4)
fstore = _store_of(zmmf, 4)
ffma = _fma_of(zmmf, "llvm.fma.v16f32")


def _splat_of(vty, scalar):
    """A ``scalar`` (a Numba type) copied to every lane."""

    @intrinsic
    def splat(typingctx, value):
        def codegen(context, builder, sig, args):
            return splat_ir(builder, args[0], LLVM_TYPES[type(vty)])

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
            return llvm_call(builder, llvm_name, LLVM_TYPES[type(vty)], args)

        return vty(vty, vty), codegen

    return op


def _hmax_of(vty, scalar, llvm_name: str):
    """The largest lane (exact in any order; the lanes hold no NaN)."""

    @intrinsic
    def hmax(typingctx, a):
        def codegen(context, builder, sig, args):
            return llvm_call(builder, llvm_name, context.get_value_type(scalar), args, fastmath=("nnan",))

        return scalar(vty), codegen

    return hmax


fsplat = _splat_of(zmmf, types.float32)
fadd = _binary("fadd")
fsub = _binary("fsub")
fmul = _binary("fmul")
fmax = _lanewise_of(zmmf, "llvm.maxnum.v16f32")
fmin = _lanewise_of(zmmf, "llvm.minnum.v16f32")
fhmax = _hmax_of(zmmf, types.float32, "llvm.vector.reduce.fmax.v16f32")


@intrinsic
def fabs(typingctx, a):
    """Lane-wise absolute value."""

    def codegen(context, builder, sig, args):
        return llvm_call(builder, "llvm.fabs.v16f32", V16F, args)

    return zmmf(zmmf), codegen


fdiv = _binary("fdiv")


@intrinsic
def fbcast(typingctx, arr, index):
    """``arr[index]`` (float32) copied to 16 lanes: one ``vbroadcastss`` from memory. (As
    ``fsplat(arr[index])`` Numba adds a negative-index test per load: in the attention
    loops that tripled the instructions per fused multiply-add.)"""

    def codegen(context, builder, sig, args):
        ptr = element_ptr(context, builder, sig.args[0], args[0], args[1])
        return splat_ir(builder, builder.load(ptr, align=4), V16F)

    return zmmf(arr, index), codegen


@intrinsic
def fload_i8(typingctx, arr, index):
    """16 int8 values from element ``index``, converted to 16 float32 lanes (exact)."""

    def codegen(context, builder, sig, args):
        ptr = element_ptr(context, builder, sig.args[0], args[0], args[1])
        v = builder.load(builder.bitcast(ptr, ir.VectorType(ir.IntType(8), 16).as_pointer()), align=1)
        return builder.sitofp(v, V16F)

    return zmmf(arr, index), codegen


@intrinsic
def ftoi(typingctx, a):
    """16 float32 lanes holding whole numbers, as 16 int32 lanes (exact below 2**31)."""

    def codegen(context, builder, sig, args):
        return builder.fptosi(args[0], V16)

    return zmm(zmmf), codegen


def quantize_store_of(op: str, offset: bool = False):
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
    r = llvm_call(builder, "llvm.rint.v16f32", V16F, [getattr(builder, op)(v, s)])
    r = llvm_call(builder, "llvm.maxnum.v16f32", V16F, [r, builder.fneg(qm)])
    r = llvm_call(builder, "llvm.minnum.v16f32", V16F, [r, qm])
    codes = builder.trunc(builder.fptosi(r, V16), ir.VectorType(ir.IntType(8), 16))
    if offset:
        codes = builder.xor(
            codes, splat_ir(builder, ir.Constant(ir.IntType(8), 0x80), ir.VectorType(ir.IntType(8), 16))
        )
    ptr = element_ptr(context, builder, sig.args[0], q_a, q_i)
    builder.store(codes, builder.bitcast(ptr, ir.VectorType(ir.IntType(8), 16).as_pointer()), align=1)
    return context.get_dummy_value()


fquantize_store = quantize_store_of("fdiv")  # v / s: the activation quantizer


# -- float64 vectors (the float attention: ``attention.py``) ------------------------------------------

_F64 = ir.DoubleType()
_V8D = ir.VectorType(_F64, 8)
_V8F = ir.VectorType(F32, 8)


class _Zmmd(types.Type):
    """A 512-bit vector of 8 float64 lanes, held in a register. (LLVM's own vectorizer
    stops at 256 bits on this CPU: 4 lanes, half the speed.)"""

    def __init__(self):
        super().__init__(name="zmm_f64x8")


zmmd = _vector_type(_Zmmd, _V8D)  # 8 float64 lanes
dzero = _zero_of(zmmd)
dload = _load_of(zmmd, 8)
dstore = _store_of(zmmd, 8)
dfma = _fma_of(zmmd, "llvm.fma.v8f64")


@intrinsic
def dbcast(typingctx, arr, index):
    """``arr[index]`` (float64) copied to 8 lanes."""

    def codegen(context, builder, sig, args):
        ptr = element_ptr(context, builder, sig.args[0], args[0], args[1])
        return splat_ir(builder, builder.load(ptr, align=8), _V8D)

    return zmmd(arr, index), codegen


@intrinsic
def dbcast32(typingctx, arr, index):
    """``arr[index]`` (float32, widened exactly to float64) copied to 8 lanes."""

    def codegen(context, builder, sig, args):
        ptr = element_ptr(context, builder, sig.args[0], args[0], args[1])
        return splat_ir(builder, builder.fpext(builder.load(ptr, align=4), _F64), _V8D)

    return zmmd(arr, index), codegen


@intrinsic
def dload32(typingctx, arr, index):
    """8 float32 elements of ``arr`` from ``index``, each widened exactly to float64."""

    def codegen(context, builder, sig, args):
        ptr = element_ptr(context, builder, sig.args[0], args[0], args[1])
        return builder.fpext(builder.load(builder.bitcast(ptr, _V8F.as_pointer()), align=4), _V8D)

    return zmmd(arr, index), codegen


@intrinsic
def dstore32(typingctx, arr, index, vec):
    """Store 8 float64 lanes, each rounded once to float32, into a float32 array from ``index``."""

    def codegen(context, builder, sig, args):
        ptr = element_ptr(context, builder, sig.args[0], args[0], args[1])
        builder.store(builder.fptrunc(args[2], _V8F), builder.bitcast(ptr, _V8F.as_pointer()), align=4)
        return context.get_dummy_value()

    return types.void(arr, index, zmmd), codegen


dsplat = _splat_of(zmmd, types.float64)
dadd = _binary("fadd", zmmd)
dsub = _binary("fsub", zmmd)
dmul = _binary("fmul", zmmd)
dmax = _lanewise_of(zmmd, "llvm.maxnum.v8f64")
dhmax = _hmax_of(zmmd, types.float64, "llvm.vector.reduce.fmax.v8f64")


@intrinsic
def dhsum(typingctx, a):
    """The sum of the 8 lanes, added in lane order (an ordered reduction: the same on every run)."""

    def codegen(context, builder, sig, args):
        return llvm_call(builder, "llvm.vector.reduce.fadd.v8f64", _F64, [ir.Constant(_F64, -0.0), args[0]])

    return types.float64(zmmd), codegen


_V8I64 = ir.VectorType(ir.IntType(64), 8)


@intrinsic
def dexp(typingctx, v):
    """exp of 8 float64 lanes x <= 0: ``attention._exp64_inplace``'s operations lane by lane, each
    rounded as written (no fused multiply-adds), so the same bits: x = max(x, -708);
    k = floor(x / ln2 + 1/2); r = (x - k HI) - k LO; Taylor to degree 13 by Horner; times 2**k
    built from its exponent bits."""

    def codegen(context, builder, sig, args):
        def c(value):
            return splat_ir(builder, ir.Constant(_F64, value), _V8D)

        x = llvm_call(builder, "llvm.maxnum.v8f64", _V8D, [args[0], c(-708.0)])
        k = llvm_call(builder, "llvm.floor.v8f64", _V8D, [builder.fadd(builder.fmul(x, c(EXP64_INV_LN2)), c(0.5))])
        r = builder.fsub(builder.fsub(x, builder.fmul(k, c(EXP64_LN2_HI))), builder.fmul(k, c(EXP64_LN2_LO)))
        p = c(EXP64_INV_FACT[0])
        for coef in EXP64_INV_FACT[1:]:
            p = builder.fadd(builder.fmul(p, r), c(coef))
        e = builder.add(builder.fptosi(k, _V8I64), splat_ir(builder, ir.Constant(ir.IntType(64), 1023), _V8I64))
        pow2 = builder.bitcast(builder.shl(e, splat_ir(builder, ir.Constant(ir.IntType(64), 52), _V8I64)), _V8D)
        return builder.fmul(p, pow2)

    return zmmd(zmmd), codegen


# -- the int8 attention's float32 softmax (``qattn``): every operation IEEE, in a fixed order ------
# exp(x) for x <= 0 in float32 (Cephes expf): x = k ln2 + r, |r| <= ln2 / 2, exp(r) = 1 + r +
# r^2 P(r): the constants are ``constants.py``'s.


def exp32_codegen(builder, x):
    """The lanes of ``fexp``: see there."""

    def c(v):
        return splat_ir(builder, ir.Constant(F32, v), V16F)

    x = llvm_call(builder, "llvm.maxnum.v16f32", V16F, [x, c(EXP32_MIN)])
    k = llvm_call(builder, "llvm.floor.v16f32", V16F, [builder.fadd(builder.fmul(x, c(EXP32_INV_LN2)), c(0.5))])
    r = builder.fsub(builder.fsub(x, builder.fmul(k, c(EXP32_LN2_HI))), builder.fmul(k, c(EXP32_LN2_LO)))
    p = c(EXP32_P[0])
    for coef in EXP32_P[1:]:
        p = builder.fadd(builder.fmul(p, r), c(coef))
    y = builder.fadd(builder.fadd(builder.fmul(p, builder.fmul(r, r)), r), c(1.0))
    e = builder.add(builder.fptosi(k, V16), splat_ir(builder, ir.Constant(I32, 127), V16))
    pow2 = builder.bitcast(builder.shl(e, splat_ir(builder, ir.Constant(I32, 23), V16)), V16F)
    return builder.fmul(y, pow2)


@intrinsic
def fexp(typingctx, v):
    """exp of 16 float32 lanes x <= 0, each operation rounded as written (no fused
    multiply-adds): x = max(x, -87); k = floor(x / ln2 + 1/2); r = (x - k HI) - k LO;
    p = Horner(EXP32_P, r); y = (p r^2 + r) + 1; times 2**k. ``qattn.exp32`` is the same in
    NumPy, ``train/model.exp32`` in PyTorch."""

    def codegen(context, builder, sig, args):
        return exp32_codegen(builder, args[0])

    return zmmf(zmmf), codegen
