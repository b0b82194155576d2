"""Exact fixed-point arithmetic as TIR expressions: requantize and add_int as one TE
computation each.

Written with Relax ops, a requantization is ~20 elementwise ops, and the inlined form of the
floor-and-compare rounding repeats its operand five times per shift (125 times for the nested
shifts of ``add_int``). The form here reads it twice. Same semantics as
``quant.rounding_shift`` and the interpreter's ``requantize`` / ``add_int``: round half to
even, in int64."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from tvm import te, tirx

from qcompiler.ir.ops.quant import ADD_INT_BITS


def _i64(value: int) -> tirx.PrimExpr:
    return tirx.const(value, "int64")


def rounding_shift(v: tirx.PrimExpr, shift: tirx.PrimExpr) -> tirx.PrimExpr:
    """round(v / 2^shift), ties to even (int64, 1 <= shift <= 62, |v| < 2^62), as
    ``(v + 2^(shift-1) - 1 + ((v >> shift) & 1)) >> shift``: with ``v = q 2^shift + r``, the
    added amount carries into ``q`` exactly when ``r`` is above half, or is half and ``q`` odd.
    Reads ``v`` twice, so nested shifts stay small when inlined."""
    half_less_one = tirx.shift_left(_i64(1), shift - _i64(1)) - _i64(1)
    odd = tirx.bitwise_and(tirx.shift_right(v, shift), _i64(1))
    return tirx.shift_right(v + half_less_one + odd, shift)


def as_unsigned(value: tirx.PrimExpr, signed: bool) -> tirx.PrimExpr:
    """An activation byte as VNNI's unsigned operand: int8 shifted by +128 (its zero point too)."""
    return (value.astype("int32") + 128).astype("uint8") if signed else value


def saturate(y: tirx.PrimExpr, lo: int, hi: int, dtype: str) -> tirx.PrimExpr:
    return tirx.max(tirx.min(y, _i64(hi)), _i64(lo)).astype(dtype)


def requantize(acc: tirx.PrimExpr, input_zero_point: int, multiplier: tirx.PrimExpr, shift: tirx.PrimExpr,
               output_zero_point: int | tirx.PrimExpr, lo: int, hi: int, dtype: str,
               bind_product: bool = True) -> tirx.PrimExpr:
    """clip(round_half_even((acc - zp_in) * multiplier / 2^shift) + zp_out, lo, hi). The product
    is bound once (a Let): read twice by the rounding as a plain expression, LLVM computed the
    64-bit multiply twice in vectorized epilogues. Kernels MetaSchedule may tune take
    ``bind_product=False``: its flop estimator has no rule for a Let and stops the tuning."""
    zp_out = _i64(output_zero_point) if isinstance(output_zero_point, int) else output_zero_point.astype("int64")
    product = (acc.astype("int64") - _i64(input_zero_point)) * multiplier.astype("int64")
    if not bind_product:
        return saturate(rounding_shift(product, shift.astype("int64")) + zp_out, lo, hi, dtype)
    v = tirx.Var("v", "int64")
    return tirx.Let(v, product, saturate(rounding_shift(v, shift.astype("int64")) + zp_out, lo, hi, dtype))


def requantize_f32(acc: tirx.PrimExpr, input_zero_point: int, scale: tirx.PrimExpr,
                   output_zero_point: int | tirx.PrimExpr, lo: int, hi: int, dtype: str) -> tirx.PrimExpr:
    """``requantize_f32``: clip(round_half_even(float32(acc - zp_in) * scale) + zp_out, lo, hi),
    the IR's definition (``quant.requantize_f32_values``): one float32 product, rounded to
    nearest even (``nearbyint``), clamped in float to the bounds less the zero point (exact:
    they are small integers) before the conversion, so no out-of-range float reaches it."""
    v = acc.astype("int32") if input_zero_point == 0 else acc.astype("int32") - tirx.const(input_zero_point, "int32")
    zp = tirx.const(output_zero_point, "int32") if isinstance(output_zero_point, int) \
        else output_zero_point.astype("int32")
    rounded = tirx.nearbyint(v.astype("float32") * scale.astype("float32"))
    bounded = tirx.max(tirx.min(rounded, (hi - zp).astype("float32")), (lo - zp).astype("float32"))
    return (bounded.astype("int32") + zp).astype(dtype)


@dataclass(frozen=True)
class Requantize:
    """A ``requantize`` done in a kernel's epilogue, per output channel (multiplier and shift
    arrive as kernel arguments): ``clip(round_half_even((acc - zp_in) * mult / 2^shift) +
    zp_out, lo, hi)``, in int64; with ``float32``, ``requantize_f32`` (the float32 scale's bits
    arrive in the multiplier's place, the shift unused)."""
    input_zero_point: int
    output_zero_point: int
    lo: int
    hi: int
    dtype: str  # uint8 or int8
    float32: bool = False


def wrapping_add(a: tirx.PrimExpr, b: tirx.PrimExpr) -> tirx.PrimExpr:
    """``a + b`` of int32s, wrapping as the accumulator does, added as uint32. The result stays an
    int32 for the simplifier: a plain sum widened to int64 becomes a sum of int64s, so LLVM
    cannot multiply it with ``vpmuldq`` (32 x 32 -> 64 bits, 1 uop) and uses ``vpmullq`` (3)."""
    total = tirx.reinterpret("uint32", a) + tirx.reinterpret("uint32", b)
    return tirx.reinterpret("int32", total)


def epilogue(acc: tirx.PrimExpr, channel: tirx.PrimExpr, params: "list[te.Tensor] | tirx.Buffer",
             requant: Requantize | None) -> tirx.PrimExpr:
    """``acc + bias``, requantized when ``requant``; ``params`` from :func:`epilogue_inputs`, or
    one ``[1 or 3, channels]`` buffer stacking them (a hand-written kernel's single argument)."""
    def param(i: int) -> tirx.PrimExpr:
        return params[i][channel] if isinstance(params, (list, tuple)) else params[i, channel]

    v = wrapping_add(acc, param(0))
    if requant is None:
        return v
    if requant.float32:
        return requantize_f32(v, requant.input_zero_point, tirx.reinterpret("float32", param(1)),
                              requant.output_zero_point, requant.lo, requant.hi, requant.dtype)
    return requantize(v, requant.input_zero_point, param(1), param(2), requant.output_zero_point, requant.lo,
                      requant.hi, requant.dtype)


def epilogue_inputs(channels: int, requant: Requantize | None) -> list[te.Tensor]:
    """The kernel arguments :func:`epilogue` reads: bias, and multiplier and shift when requantizing."""
    names = ("bias", "multiplier", "shift") if requant else ("bias",)
    return [te.placeholder((channels,), "int32", name=n) for n in names]


def _broadcast_index(shape: Sequence[int], out_shape: Sequence[int], index: Sequence[tirx.PrimExpr]) -> list:
    offset = len(out_shape) - len(shape)
    return [0 if size == 1 else index[offset + i] for i, size in enumerate(shape)]


def requantize_tensor(x: te.Tensor, multiplier: te.Tensor, shift: te.Tensor, axis: int, input_zero_point: int,
                      output_zero_point: int | te.Tensor, lo: int, hi: int, dtype: str) -> te.Tensor:
    """``requantize`` over a tensor, multiplier and shift per tensor (0-d) or along ``axis``; the
    output zero point a constant or a 0-d tensor."""
    axis %= max(len(x.shape), 1)
    zp = output_zero_point if isinstance(output_zero_point, int) else output_zero_point[()]

    def element(*index):
        at = [] if len(multiplier.shape) == 0 else [index[axis]]
        return requantize(x[index], input_zero_point, multiplier[tuple(at)], shift[tuple(at)], zp, lo, hi, dtype,
                          bind_product=False)  # a generic kernel: tuning may see it

    return te.compute(x.shape, element, name="requantize")


def requantize_f32_tensor(x: te.Tensor, scale: te.Tensor, axis: int, input_zero_point: int,
                          output_zero_point: int | te.Tensor, lo: int, hi: int, dtype: str) -> te.Tensor:
    """``requantize_f32`` over a tensor, the scale per tensor (0-d) or along ``axis``."""
    axis %= max(len(x.shape), 1)
    zp = output_zero_point if isinstance(output_zero_point, int) else output_zero_point[()]

    def element(*index):
        at = [] if len(scale.shape) == 0 else [index[axis]]
        return requantize_f32(x[index], input_zero_point, scale[tuple(at)], zp, lo, hi, dtype)

    return te.compute(x.shape, element, name="requantize_f32")


def add_int_tensor(a: te.Tensor, b: te.Tensor, out_shape: Sequence[int], attrs: dict, output_zero_point: int,
                   lo: int, hi: int, dtype: str) -> te.Tensor:
    """``add_int``: each operand rescaled to 2^-20 output steps, summed, rounded once more."""
    def rescaled(t: te.Tensor, index, prefix: str) -> tirx.PrimExpr:
        value = t[tuple(_broadcast_index(t.shape, out_shape, index))].astype("int64")
        v = (value - _i64(attrs[f"{prefix}_zero_point"])) * _i64((1 << ADD_INT_BITS) * attrs[f"{prefix}_multiplier"])
        return rounding_shift(v, _i64(attrs[f"{prefix}_shift"]))

    def element(*index):
        total = rescaled(a, index, "a") + rescaled(b, index, "b")
        return saturate(rounding_shift(total, _i64(ADD_INT_BITS)) + _i64(output_zero_point), lo, hi, dtype)

    return te.compute(tuple(out_shape), element, name="add_int")


ROUNDING = 12582912.0  # 1.5 * 2^23: v + it holds round_half_even(v) in its low significand bits, for |v| < 2^22
ROUNDING_BITS = 0x4B400000  # the bits of ROUNDING as a float32


def round_clamped(v: tirx.PrimExpr, lo: int | tirx.PrimExpr, hi: int | tirx.PrimExpr) -> tirx.PrimExpr:
    """``clip(round_half_even(v), lo, hi)`` of a float32 as an int32, for integer bounds under
    2^22 in magnitude: clamped first (the same, the bounds being integers), then rounded by adding
    ``ROUNDING``, whose float32 sum keeps the nearest even integer in the low bits of its word:
    vector instructions, where LLVM scalarizes ``nearbyint``, and a reinterpretation the
    simplifier cannot fold away as it would ``(v + c) - c``. ``v`` appears once in the result, so
    chains of roundings fused into one kernel stay linear in size."""
    lo_f, hi_f = (tirx.const(float(b), "float32") if isinstance(b, int) else b.astype("float32") for b in (lo, hi))
    bounded = tirx.max(tirx.min(v, hi_f), lo_f)
    bits = tirx.reinterpret("int32", bounded + tirx.const(ROUNDING, "float32"))
    return bits - tirx.const(ROUNDING_BITS, "int32")


def round_half_even_tensor(x: te.Tensor) -> te.Tensor:
    """round(x), ties to even, as ``nearbyint`` (the default rounding mode): one read of ``x``, so
    roundings fused into one kernel stay linear in size (from floor and parity, each read its
    operand seven times). Not ``tirx.round``: CUDA lowers that to ``round``, ties away from zero."""
    return te.compute(x.shape, lambda *index: tirx.nearbyint(x[index]), name="round_half_even")


def quantize_8bit_tensor(x: te.Tensor, scale: te.Tensor, zero_point: te.Tensor | None, lo: int, hi: int,
                         dtype: str) -> te.Tensor:
    """``quantize`` to an 8-bit type: clip(round_half_even(float32(x) / scale) + zp, lo, hi), the
    scale and zero point broadcastable against ``x``. Rounds with :func:`round_clamped`, which
    reads its operand once: rounding from floor and parity reads it seven times, and a fused
    chain of three quantizes (a GELU written out by an exporter) grew 7^3-fold, past what TVM's
    simplifier finishes."""
    def element(*index):
        v = x[index].astype("float32") / scale[tuple(_broadcast_index(scale.shape, x.shape, index))]
        if zero_point is None:
            return round_clamped(v, lo, hi).astype(dtype)
        z = zero_point[tuple(_broadcast_index(zero_point.shape, x.shape, index))].astype("int32")
        return (round_clamped(v, tirx.const(lo, "int32") - z, tirx.const(hi, "int32") - z) + z).astype(dtype)

    return te.compute(x.shape, element, name="quantize")


def add_int_f32_tensor(a: te.Tensor, b: te.Tensor, out_shape: Sequence[int], attrs: dict, output_zero_point: int,
                       lo: int, hi: int, dtype: str) -> te.Tensor:
    """``add_int_f32``: each operand less its zero point times its scale (exact products), summed
    once in float32, rounded half to even, clamped, plus the output zero point."""
    def product(t: te.Tensor, index, prefix: str) -> tirx.PrimExpr:
        value = t[tuple(_broadcast_index(t.shape, out_shape, index))].astype("int32")
        centered = value - tirx.const(attrs[f"{prefix}_zero_point"], "int32")
        return centered.astype("float32") * tirx.const(attrs[f"{prefix}_scale"], "float32")

    def element(*index):
        total = product(a, index, "a") + product(b, index, "b")
        y = round_clamped(total, lo - output_zero_point, hi - output_zero_point)
        return (y + tirx.const(output_zero_point, "int32")).astype(dtype)

    return te.compute(tuple(out_shape), element, name="add_int_f32")
