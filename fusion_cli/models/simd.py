"""Sixteen float32 lanes as one value in numba kernels: `vec16`, an LLVM `<16 x float>`.

The scan's recurrence steps LANES channels at once. Written as loops over lanes, LLVM vectorised each
state's lane loop but kept the loop over states a real loop, with the states in memory, its index
arithmetic and an aliasing check in every step: ~45 instructions per 16 state updates (2.2 cycles per
update on a Zen 4 core). With the lanes as one value the same step is ~20 vector instructions, the
decays' exp included (1.1 cycles per update, the core's AVX-512 issue rate), and what LLVM does no
longer depends on its loop heuristics.

Only what the kernels use: loads and stores at a flat offset into a C-contiguous float32 array,
a scalar broadcast to every lane (or two scalars, one per half of the lanes), + and * (fused into
FMAs under fast-math), and `vexp`, the same polynomial as `scan_numba._exp32`. numba's public
extension API (`types.Type`, `register_model`, `intrinsic`) with llvmlite's IR builder: nothing to
compile at install time.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic, models, register_model

WIDTH = 16

# float32 exp and log1p (scan_numba's scalar `_exp32` and `_log1p32` use the same): exp by Cody-Waite
# reduction x = k ln2 + r (log2(e), ln2 split in a high and a low part), Cephes' polynomial in r,
# inputs clamped to EXP_RANGE; log1p(v) = 2 atanh(v / (2 + v)) by its series to s^13.
_F = np.float32
EXP_REDUCTION = (_F(1.4426950408889634), _F(0.693359375), _F(-2.12194440e-4))
EXP_POLY = tuple(_F(c) for c in (1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2,
                                 1.6666665459e-1, 5.0000001201e-1))  # fmt: skip
EXP_RANGE = (_F(-87.0), _F(88.0))
LOG1P_SERIES = tuple(_F(1 / k) for k in (3, 5, 7, 9, 11, 13))
_F32 = ir.FloatType()
_I32 = ir.IntType(32)
_VF = ir.VectorType(_F32, WIDTH)
_VI = ir.VectorType(_I32, WIDTH)
_FAST = ("fast",)  # as the kernels' fastmath: lets LLVM fuse a * b + c into one FMA


class Vec16(types.Type):
    """numba type of sixteen float32 lanes (lives in a vector register)."""

    def __init__(self) -> None:
        super().__init__(name="vec16")


vec16 = Vec16()


@register_model(Vec16)
class _Vec16Model(models.PrimitiveModel):
    def __init__(self, dmm: Any, fe_type: Any) -> None:
        super().__init__(dmm, fe_type, _VF)


def _check_array(arr: Any) -> None:
    if not (isinstance(arr, types.Array) and arr.dtype == types.float32 and arr.layout == "C"):
        raise TypeError(f"vec16 loads and stores need a C-contiguous float32 array, got {arr}")


def _lanes_ptr(context: Any, builder: ir.IRBuilder, arrty: Any, arr: Any, offset: Any) -> Any:
    data = context.make_array(arrty)(context, builder, arr).data
    return builder.bitcast(builder.gep(data, [offset]), _VF.as_pointer())


@intrinsic
def vload(typingctx: Any, arr: Any, offset: Any) -> Any:
    """The 16 floats from flat index `offset` of a C-contiguous float32 array (no bounds check)."""
    _check_array(arr)

    def codegen(context: Any, builder: ir.IRBuilder, sig: Any, args: Any) -> Any:
        return builder.load(_lanes_ptr(context, builder, sig.args[0], args[0], args[1]), align=4)

    return vec16(arr, offset), codegen


@intrinsic
def vstore(typingctx: Any, arr: Any, offset: Any, value: Any) -> Any:
    """Write 16 floats at flat index `offset` of a C-contiguous float32 array (no bounds check)."""
    _check_array(arr)

    def codegen(context: Any, builder: ir.IRBuilder, sig: Any, args: Any) -> Any:
        builder.store(args[2], _lanes_ptr(context, builder, sig.args[0], args[0], args[1]), align=4)
        return context.get_dummy_value()

    return types.none(arr, offset, value), codegen


@intrinsic
def vload_halves(typingctx: Any, arr: Any, low: Any, high: Any) -> Any:
    """8 floats from flat index `low` in the lower lanes, 8 from `high` in the upper ones (two
    positions of 8 channels in one value)."""
    _check_array(arr)

    def codegen(context: Any, builder: ir.IRBuilder, sig: Any, args: Any) -> Any:
        data = context.make_array(sig.args[0])(context, builder, args[0]).data
        half = ir.VectorType(_F32, WIDTH // 2)
        parts = [builder.load(builder.bitcast(builder.gep(data, [off]), half.as_pointer()), align=4)
                 for off in args[1:]]  # fmt: skip
        return builder.shuffle_vector(parts[0], parts[1], ir.Constant(_VI, list(range(WIDTH))))

    return vec16(arr, low, high), codegen


@intrinsic
def vstore_halves(typingctx: Any, arr: Any, low: Any, high: Any, value: Any) -> Any:
    """The lower 8 lanes to flat index `low`, the upper 8 to `high` (`vload_halves` reversed)."""
    _check_array(arr)

    def codegen(context: Any, builder: ir.IRBuilder, sig: Any, args: Any) -> Any:
        data = context.make_array(sig.args[0])(context, builder, args[0]).data
        half = ir.VectorType(_F32, WIDTH // 2)
        for k, off in enumerate(args[1:3]):
            part = builder.shuffle_vector(
                args[3], ir.Constant(_VF, ir.Undefined), ir.Constant(ir.VectorType(_I32, WIDTH // 2),
                                                                     list(range(k * 8, k * 8 + 8)))
            )  # fmt: skip
            builder.store(part, builder.bitcast(builder.gep(data, [off]), half.as_pointer()), align=4)
        return context.get_dummy_value()

    return types.none(arr, low, high, value), codegen


def _splat(builder: ir.IRBuilder, scalar: Any, vtype: ir.VectorType) -> Any:
    one = builder.insert_element(ir.Constant(vtype, ir.Undefined), scalar, ir.Constant(_I32, 0))
    return builder.shuffle_vector(one, ir.Constant(vtype, ir.Undefined), ir.Constant(_VI, [0] * WIDTH))


def _as_f32(context: Any, builder: ir.IRBuilder, value: Any, ty: Any) -> Any:
    return context.cast(builder, value, ty, types.float32)


@intrinsic
def vsplat(typingctx: Any, scalar: Any) -> Any:
    """`scalar` (as float32) in every lane."""

    def codegen(context: Any, builder: ir.IRBuilder, sig: Any, args: Any) -> Any:
        return _splat(builder, _as_f32(context, builder, args[0], sig.args[0]), _VF)

    return vec16(scalar), codegen


@intrinsic
def vpair(typingctx: Any, low: Any, high: Any, half: Any) -> Any:
    """`low` in lanes below `half`, `high` in the others (two scan directions sharing the lanes); a
    literal `half` folds to one broadcast."""
    if not isinstance(half, types.Integer):
        raise TypeError("vpair: half must be an integer")

    def codegen(context: Any, builder: ir.IRBuilder, sig: Any, args: Any) -> Any:
        lo = _splat(builder, _as_f32(context, builder, args[0], sig.args[0]), _VF)
        hi = _splat(builder, _as_f32(context, builder, args[1], sig.args[1]), _VF)
        cut = builder.sext(args[2], _I32) if args[2].type.width < 32 else builder.trunc(args[2], _I32)
        mask = builder.icmp_signed("<", ir.Constant(_VI, list(range(WIDTH))), _splat(builder, cut, _VI))
        return builder.select(mask, lo, hi)

    return vec16(low, high, half), codegen


@intrinsic
def vpick(typingctx: Any, x: Any, k: Any) -> Any:
    """Lane k of x in the lower 8 lanes, lane 8 + k in the upper 8: one value per half, broadcast
    (two scan directions' B or C of state k, side by side). With k a constant once LLVM has unrolled
    the caller's loop, one permute."""
    if not isinstance(k, types.Integer):
        raise TypeError("vpick: k must be an integer")

    def codegen(context: Any, builder: ir.IRBuilder, sig: Any, args: Any) -> Any:
        k32 = builder.sext(args[1], _I32) if args[1].type.width < 32 else builder.trunc(args[1], _I32)
        lo = _splat(builder, builder.extract_element(args[0], k32), _VF)
        hi = _splat(builder, builder.extract_element(args[0], builder.add(k32, ir.Constant(_I32, 8))), _VF)
        mask = ir.Constant(ir.VectorType(ir.IntType(1), WIDTH), [i < WIDTH // 2 for i in range(WIDTH)])
        return builder.select(mask, lo, hi)

    return vec16(x, k), codegen


def _binary(op: str, doc: str) -> Any:
    @intrinsic
    def fn(typingctx: Any, a: Any, b: Any) -> Any:
        def codegen(context: Any, builder: ir.IRBuilder, sig: Any, args: Any) -> Any:
            return getattr(builder, op)(args[0], args[1], flags=_FAST)

        return vec16(a, b), codegen

    fn.__doc__ = doc
    return fn


vadd = _binary("fadd", "a + b, lane by lane.")
vsub = _binary("fsub", "a - b, lane by lane.")
vmul = _binary("fmul", "a * b, lane by lane.")


@intrinsic
def vfma(typingctx: Any, a: Any, b: Any, c: Any) -> Any:
    """a * b + c, lane by lane (one FMA)."""

    def codegen(context: Any, builder: ir.IRBuilder, sig: Any, args: Any) -> Any:
        return builder.fadd(builder.fmul(args[0], args[1], flags=_FAST), args[2], flags=_FAST)

    return vec16(a, b, c), codegen


def _const(x: float) -> ir.Constant:
    return ir.Constant(_VF, [float(np.float32(x))] * WIDTH)


def _intrinsic_fn(builder: ir.IRBuilder, name: str, arity: int) -> Any:
    """llvm.<name>.v16f32 of `arity` vector arguments."""
    fn_type = ir.FunctionType(_VF, [_VF] * arity)
    return cgutils.get_or_insert_function(builder.module, fn_type, f"llvm.{name}.v16f32")


def _has_avx512(context: Any) -> bool:
    """Whether numba compiles for a CPU with AVX-512F (its target machine's features: the host's,
    or what NUMBA_CPU_NAME / NUMBA_CPU_FEATURES ask for)."""
    features = getattr(context.codegen(), "_tm_features", "")
    return isinstance(features, str) and "+avx512f" in features.split(",")


def _pow2(builder: ir.IRBuilder, k: Any) -> Any:
    """2^k for whole-valued float lanes k in [-126, 127]: k + 127 put into the exponent bits."""
    exponent = builder.add(builder.fptosi(k, _VI), ir.Constant(_VI, [127] * WIDTH))
    return builder.bitcast(builder.shl(exponent, ir.Constant(_VI, [23] * WIDTH)), _VF)


def _exp_ir(builder: ir.IRBuilder, x: Any) -> Any:
    def mul(a: Any, b: Any) -> Any:
        return builder.fmul(a, b, flags=_FAST)

    def add(a: Any, b: Any) -> Any:
        return builder.fadd(a, b, flags=_FAST)

    fmin, fmax = _intrinsic_fn(builder, "minnum", 2), _intrinsic_fn(builder, "maxnum", 2)
    (lo, hi), (log2e, ln2_hi, ln2_lo) = EXP_RANGE, EXP_REDUCTION
    v = builder.call(fmin, [builder.call(fmax, [x, _const(lo)]), _const(hi)])
    k = builder.call(_intrinsic_fn(builder, "floor", 1), [add(mul(v, _const(log2e)), _const(0.5))])
    r = add(add(v, mul(k, _const(-ln2_hi))), mul(k, _const(-ln2_lo)))
    p = _const(EXP_POLY[0])
    for c in EXP_POLY[1:]:
        p = add(mul(p, r), _const(c))
    p = add(add(mul(mul(p, r), r), r), _const(1.0))
    return mul(p, _pow2(builder, k))


@intrinsic
def vexp(typingctx: Any, x: Any) -> Any:
    """exp, lane by lane, as `scan_numba._exp32`: inputs clamped to EXP_RANGE, ~1 ulp."""

    def codegen(context: Any, builder: ir.IRBuilder, sig: Any, args: Any) -> Any:
        return _exp_ir(builder, args[0])

    return vec16(x), codegen


# 2^f for f in [-1/2, 1/2]: degree-6 polynomial fitted for the least maximum relative error
# (9.7e-8 evaluated in float32, against Cephes' exp's ~6e-8)
_EXP2_COEFFICIENTS = (1.0, 0.6931471824645996, 0.24022647738456726, 0.055503323674201965, 0.00961843691766262,
                      0.0013398875016719103, 0.00015353361959569156)  # fmt: skip
EXP2_POLY = tuple(_F(c) for c in _EXP2_COEFFICIENTS)


@intrinsic
def vexp2(typingctx: Any, y: Any) -> Any:
    """2^y, lane by lane, for y <= 0 (the scan's decays, exp(dt A) = 2^(dt A log2 e) with A < 0 and
    dt >= 0 pre-scaled): 2^round(y) times a polynomial in y - round(y); below -126 (a decay under
    1e-38) the result is 0 or a subnormal. Five instructions fewer per state update than `vexp`'s
    range reduction and clamps (0.29 -> 0.21 ns per update). A rounding of y of relative size u costs
    |y| ln2 u of the result: decays that matter (|y| of a few) stay within ~1e-6 relative, as `vexp`
    of the same float32 product does. On AVX-512 the power of two is one `vscalefps`, which also
    handles the underflow; elsewhere it goes into the exponent bits, y clamped at -126."""

    def codegen(context: Any, builder: ir.IRBuilder, sig: Any, args: Any) -> Any:
        scalef = _has_avx512(context)
        v = (
            args[0]
            if scalef
            else builder.call(_intrinsic_fn(builder, "maxnum", 2), [args[0], _const(-126.0)])
        )
        k = builder.call(_intrinsic_fn(builder, "roundeven", 1), [v])
        f = builder.fsub(v, k, flags=_FAST)
        p = _const(EXP2_POLY[-1])
        for c in EXP2_POLY[-2::-1]:
            p = builder.fadd(builder.fmul(p, f, flags=_FAST), _const(c), flags=_FAST)
        if scalef:
            fn_type = ir.FunctionType(_VF, [_VF, _VF, _VF, ir.IntType(16), _I32])
            fn = cgutils.get_or_insert_function(builder.module, fn_type, "llvm.x86.avx512.mask.scalef.ps.512")
            # p 2^floor(k) (k whole already), every lane (mask -1), the current rounding mode (4)
            return builder.call(fn, [p, k, p, ir.Constant(ir.IntType(16), -1), ir.Constant(_I32, 4)])
        return builder.fmul(p, _pow2(builder, k), flags=_FAST)

    return vec16(y), codegen


@intrinsic
def vsoftplus(typingctx: Any, x: Any) -> Any:
    """log(1 + exp(x)), lane by lane, as `scan_numba._softplus` on float32: max(x, 0) +
    log1p(exp(-|x|)), log1p(v) = 2 atanh(v / (2 + v)) by its series to s^13."""

    def codegen(context: Any, builder: ir.IRBuilder, sig: Any, args: Any) -> Any:
        x = args[0]
        v = _exp_ir(builder, builder.fneg(builder.call(_intrinsic_fn(builder, "fabs", 1), [x])))
        s = builder.fdiv(v, builder.fadd(v, _const(2.0), flags=_FAST), flags=_FAST)
        s2 = builder.fmul(s, s, flags=_FAST)
        p = _const(LOG1P_SERIES[-1])
        for c in LOG1P_SERIES[-2::-1]:
            p = builder.fadd(builder.fmul(s2, p, flags=_FAST), _const(c), flags=_FAST)
        p = builder.fadd(builder.fmul(s2, p, flags=_FAST), _const(1.0), flags=_FAST)
        log1p = builder.fmul(builder.fmul(s, _const(2.0), flags=_FAST), p, flags=_FAST)
        positive = builder.call(_intrinsic_fn(builder, "maxnum", 2), [x, _const(0.0)])
        return builder.fadd(positive, log1p, flags=_FAST)

    return vec16(x), codegen


@intrinsic
def vmax(typingctx: Any, a: Any, b: Any) -> Any:
    """max(a, b), lane by lane."""

    def codegen(context: Any, builder: ir.IRBuilder, sig: Any, args: Any) -> Any:
        return builder.call(_intrinsic_fn(builder, "maxnum", 2), [args[0], args[1]])

    return vec16(a, b), codegen


@intrinsic
def vsilu(typingctx: Any, x: Any) -> Any:
    """x * sigmoid(x) = x / (1 + exp(-x)), lane by lane (`vexp`'s exp)."""

    def codegen(context: Any, builder: ir.IRBuilder, sig: Any, args: Any) -> Any:
        x = args[0]
        denominator = builder.fadd(_exp_ir(builder, builder.fneg(x)), _const(1.0), flags=_FAST)
        return builder.fdiv(x, denominator, flags=_FAST)

    return vec16(x), codegen


@intrinsic
def vrsqrt(typingctx: Any, x: Any) -> Any:
    """1 / sqrt(x), lane by lane."""

    def codegen(context: Any, builder: ir.IRBuilder, sig: Any, args: Any) -> Any:
        root = builder.call(_intrinsic_fn(builder, "sqrt", 1), [args[0]])
        return builder.fdiv(_const(1.0), root, flags=_FAST)

    return vec16(x), codegen


def _butterfly(builder: ir.IRBuilder, v: Any, spans: tuple[int, ...]) -> Any:
    """v plus its lanes swapped at each span in turn: every lane ends with the sum of its group of
    2 * spans[0] lanes."""
    for span in spans:
        swapped = [i ^ span for i in range(WIDTH)]
        other = builder.shuffle_vector(v, ir.Constant(_VF, ir.Undefined), ir.Constant(_VI, swapped))
        v = builder.fadd(v, other, flags=_FAST)
    return v


@intrinsic
def vsum_halves(typingctx: Any, x: Any) -> Any:
    """Every lane: the sum of its half (lanes 0-7 or 8-15)."""

    def codegen(context: Any, builder: ir.IRBuilder, sig: Any, args: Any) -> Any:
        return _butterfly(builder, args[0], (4, 2, 1))

    return vec16(x), codegen


@intrinsic
def vsum_all(typingctx: Any, x: Any) -> Any:
    """Every lane: the sum of all 16."""

    def codegen(context: Any, builder: ir.IRBuilder, sig: Any, args: Any) -> Any:
        return _butterfly(builder, args[0], (8, 4, 2, 1))

    return vec16(x), codegen


@intrinsic
def prefetch(typingctx: Any, arr: Any, offset: Any) -> Any:
    """Hint the cache line holding flat index `offset` of a C-contiguous float32 array into the
    caches (no fault if it is out of bounds: a hint, not a load)."""
    _check_array(arr)

    def codegen(context: Any, builder: ir.IRBuilder, sig: Any, args: Any) -> Any:
        data = context.make_array(sig.args[0])(context, builder, args[0]).data
        ptr = builder.bitcast(builder.gep(data, [args[1]]), ir.IntType(8).as_pointer())
        fn_type = ir.FunctionType(ir.VoidType(), [ptr.type, _I32, _I32, _I32])
        fn = cgutils.get_or_insert_function(builder.module, fn_type, "llvm.prefetch.p0")
        builder.call(fn, [ptr, ir.Constant(_I32, 0), ir.Constant(_I32, 3), ir.Constant(_I32, 1)])
        return context.get_dummy_value()

    return types.none(arr, offset), codegen
