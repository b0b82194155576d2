"""Quantization ops with ONNX QuantizeLinear/DequantizeLinear semantics: a rank-0 scale is
per-tensor, a rank-1 scale is per-axis along `axis`; rounding is half to even; saturation to
the integer type of the zero point."""
from __future__ import annotations

import numpy as np

from ..types import TensorType
from .registry import Attr, Traits, declare, norm_axis

QUANT_DTYPES = ("i8", "u8", "i16", "u16", "i32")
INTEGER = Traits("integer", quant="integer")  # quantized arithmetic, made by lower-integer
CONVERSION = Traits("quant", quant="integer")  # between real numbers and integers (quantize, dequantize, rescale)


def check_qparams(x: TensorType, scale: TensorType, zp: TensorType | None, axis: int, where: str) -> None:
    """Scale must be float, rank 0 or 1 (per-axis, matching x's extent on `axis`), zero point
    the same shape as scale and of a quantized integer type."""
    if scale.dtype not in ("f32", "f16"):
        raise TypeError(f"{where}: scale must be f32, got {scale.dtype}")
    if scale.rank > 1:
        raise TypeError(f"{where}: scale must be a scalar or 1-D, got {scale}")
    if scale.rank == 1:
        ax = norm_axis(axis, x.rank, where)
        if scale.shape[0] != x.shape[ax]:
            raise TypeError(f"{where}: {scale.shape[0]} scales for axis {ax} of size {x.shape[ax]}")
    if zp is not None:
        if zp.shape != scale.shape:
            raise TypeError(f"{where}: zero point {zp} must have the shape of scale {scale}")
        if zp.dtype not in QUANT_DTYPES:
            raise TypeError(f"{where}: zero point must be one of {QUANT_DTYPES}, got {zp.dtype}")


def _broadcastable(p: np.ndarray, x: np.ndarray, axis: int) -> np.ndarray:
    if p.ndim == 0:
        return p
    shape = [1] * x.ndim
    shape[axis % x.ndim] = -1
    return p.reshape(shape)


def _quantize_infer(types, attrs):
    x, scale = types[0], types[1]
    zp = types[2] if len(types) > 2 else None
    check_qparams(x, scale, zp, attrs["axis"], "quantize")
    return [TensorType(x.shape, zp.dtype if zp else "u8")]


def _quantize_kernel(xs, attrs):
    x, scale = xs[0], xs[1]
    zp = xs[2] if len(xs) > 2 else np.zeros(scale.shape, np.uint8)
    info = np.iinfo(zp.dtype)
    s = _broadcastable(scale, x, attrs["axis"]).astype(np.float32)
    z = _broadcastable(zp, x, attrs["axis"]).astype(np.int64)
    # clamped before rounding (the same for integer bounds): an infinite or huge x / s saturates
    # instead of overflowing int64; rint rounds half to even
    q = np.rint(np.clip(x.astype(np.float32) / s, info.min - z, info.max - z)).astype(np.int64) + z
    return np.clip(q, info.min, info.max).astype(zp.dtype)


def _dequantize_infer(types, attrs):
    x, scale = types[0], types[1]
    zp = types[2] if len(types) > 2 else None
    check_qparams(x, scale, zp, attrs["axis"], "dequantize")
    if zp is not None and zp.dtype != x.dtype:
        raise TypeError(f"dequantize: input {x.dtype} and zero point {zp.dtype} differ")
    return [TensorType(x.shape, scale.dtype)]


def _dequantize_kernel(xs, attrs):
    x, scale = xs[0], xs[1]
    zp = xs[2] if len(xs) > 2 else np.zeros(scale.shape, x.dtype)
    s = _broadcastable(scale, x, attrs["axis"])
    z = _broadcastable(zp, x, attrs["axis"]).astype(np.int64)
    return ((x.astype(np.int64) - z).astype(np.float32) * s).astype(scale.dtype)


declare("quantize", arity=(2, 3), attrs={"axis": Attr("int", 1)}, infer=_quantize_infer, kernel=_quantize_kernel,
        traits=CONVERSION, doc="saturate(round_half_even(x / scale) + zero_point); type from zero_point (u8 if absent)")
declare("dequantize", arity=(2, 3), attrs={"axis": Attr("int", 1)}, infer=_dequantize_infer,
        kernel=_dequantize_kernel, traits=CONVERSION, doc="(x - zero_point) * scale")


def round_to_bf16(x: np.ndarray) -> np.ndarray:
    """float32 -> the nearest bfloat16 (ties to even), as float32: the upper 16 bits of the
    rounded word. NaN stays NaN (quiet), infinities stay, values past bf16's largest become
    infinities (the carry reaches the exponent), subnormals round like any other value."""
    x = np.asarray(x, np.float32)
    bits = x.view(np.uint32)
    rounded = (bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))) & np.uint32(0xFFFF0000)
    rounded = np.where(np.isnan(x), (bits | np.uint32(0x00400000)) & np.uint32(0xFFFF0000), rounded)
    return rounded.astype(np.uint32).view(np.float32).reshape(x.shape)


def _round_bf16_infer(types, attrs):
    if types[0].dtype != "f32":
        raise TypeError(f"round_bf16: input must be f32, got {types[0].dtype}")
    return [types[0]]


# a layer run in bfloat16 reads its operands through this op (its weights rounded at insertion):
# products of two bf16 values are exact in float32, so the layer's result is its float32
# accumulation of exact products, whatever the kernel (AMX-BF16 tdpbf16ps, or float32 FMAs)
declare("round_bf16", arity=1, infer=_round_bf16_infer, kernel=lambda xs, attrs: round_to_bf16(xs[0]),
        traits=Traits("quant"), doc="x rounded to the nearest bfloat16 (ties to even), kept as f32: "
                                   "the operand of a layer run in bf16")


# ---- per-token (dynamic) quantization --------------------------------------------------------------
ROW_ZERO_POINT = 128  # quantize_rows' codes: symmetric int8 stored as u8 + 128, VNNI's and AMX's unsigned operand
ROW_LEVELS = 127.0


def row_scales(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row (last axis) of ``x``: the scale ``max|x| / 127`` (1 for a row of zeros) and the
    factor codes are made with, ``127 / max|x|`` (0 for a row of zeros, at most float32's
    largest: a row of subnormals must not give infinity times zero), both float32 divisions."""
    amax = np.max(np.abs(x.astype(np.float32)), axis=-1, keepdims=True)
    with np.errstate(divide="ignore", over="ignore"):
        s = (amax / np.float32(ROW_LEVELS)).astype(np.float32)
        inv = np.where(amax > 0, np.float32(ROW_LEVELS) / amax, np.float32(0)).astype(np.float32)
    return np.where(s > 0, s, np.float32(1.0)).astype(np.float32), np.minimum(inv, np.finfo(np.float32).max)


def _quantize_rows_infer(types, attrs):
    x = types[0]
    if x.dtype != "f32" or x.rank < 1:
        raise TypeError(f"quantize_rows: input must be f32 of rank 1 or more, got {x}")
    return [TensorType(x.shape, "u8"), TensorType(x.shape[:-1] + (1,), "f32")]


def _quantize_rows_kernel(xs, attrs):
    x = xs[0].astype(np.float32)
    s, inv = row_scales(x)
    q = np.clip(np.rint(x * inv), -ROW_LEVELS, ROW_LEVELS) + ROW_ZERO_POINT  # one float32 multiply, rounded
    return [q.astype(np.uint8), s]


def _dequantize_rows_infer(types, attrs):
    x, row = types[0], types[1]
    if x.dtype not in ("u8", "i8", "i32") or x.rank < 1:
        raise TypeError(f"dequantize_rows: input must be u8/i8/i32, got {x}")
    if row.dtype != "f32" or row.shape != x.shape[:-1] + (1,):
        raise TypeError(f"dequantize_rows: row scales must be f32{list(x.shape[:-1]) + [1]}, got {row}")
    for extra, what in zip(types[2:], ("column scales", "bias")):
        if extra.dtype != "f32" or extra.shape != (x.shape[-1],):
            raise TypeError(f"dequantize_rows: {what} must be f32[{x.shape[-1]}], got {extra}")
    return [TensorType(x.shape, "f32")]


def _dequantize_rows_kernel(xs, attrs):
    x, row = xs[0], xs[1]
    y = (x.astype(np.int64) - attrs["zero_point"]).astype(np.float32) * row.astype(np.float32)
    if len(xs) > 2:
        y = y * xs[2].astype(np.float32)
    if len(xs) > 3:
        y = y + xs[3].astype(np.float32)
    return y.astype(np.float32)


# per-token dynamic quantization (a transformer linear's activations, whose rows differ by 100x
# in range: one static scale wastes most of the grid on the few large tokens); the scales are
# computed at run time, so the product's result is dequantized row by row, never requantized
declare("quantize_rows", arity=1, infer=_quantize_rows_infer, kernel=_quantize_rows_kernel, traits=CONVERSION,
        doc="per-row (last axis) symmetric int8 at run time: scale s = max|x| / 127 (1 for a zero row) and codes "
            "clip(round_half_even(x * min(127 / max|x|, FLT_MAX)), -127, 127) + 128 as u8 (0 + 128 for a zero "
            "row), all float32; returns (codes, s[..., 1])")
declare("dequantize_rows", arity=(2, 4), attrs={"zero_point": Attr("int", ROW_ZERO_POINT)},
        infer=_dequantize_rows_infer, kernel=_dequantize_rows_kernel, traits=CONVERSION,
        doc="((float32(x - zero_point) * row_scale) * column_scale) + bias, in float32: quantize_rows' codes back "
            "to real numbers, or (zero_point 0) an int32 product of such codes and per-channel int8 weights")

# ---- quantization arithmetic shared by passes, importers and kernels ---------------------------------
def _normal_or_one(scale: float) -> float:
    return scale if scale >= np.finfo(np.float32).tiny else 1.0


def choose_qparams(lo: float, hi: float, dtype: str) -> tuple[np.float32, np.integer]:
    """Scale and zero point covering [lo, hi] (widened to include 0, so zero is exact):
    u8 asymmetric over 0..255, i8 symmetric over -127..127 with zero point 0.

    A range whose scale would not be a normal float32 (a value that is all subnormal dust, as
    in layers behind dead channels, or exactly zero) gets scale 1: every value rounds to the zero
    point, which it is to float32's resolution; a subnormal scale (or one flushed to 0) would
    make 1/scale infinite."""
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    if dtype == "u8":
        scale = _normal_or_one((hi - lo) / 255.0)
        zp = int(np.clip(np.rint(-lo / scale), 0, 255))
        return np.float32(scale), np.uint8(zp)
    if dtype == "i8":
        return np.float32(_normal_or_one(max(-lo, hi) / 127.0)), np.int8(0)
    raise ValueError(f"no quantization parameters for dtype {dtype}")


def quantize_multiplier(real: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Write each non-negative real multiplier as m * 2^-s with m an int32 in [2^30, 2^31)
    (gemmlowp/TFLite's QuantizeMultiplier): requantization then needs only integer ops.

    A multiplier under 2^-32 becomes m = 0: every operand is an int32 (|v| < 2^31), so
    ``v * real`` is under half a step and rounds to 0 exactly (a dead channel's, say)."""
    real = np.asarray(real, np.float64)
    if np.any(real < 0) or not np.all(np.isfinite(real)):
        raise ValueError("requantization multipliers must be finite and non-negative")
    negligible = real < 2.0 ** -32
    mantissa, exponent = np.frexp(np.where(negligible, 0.5, real))  # real = mantissa * 2^exponent
    m = np.rint(mantissa * (1 << 31)).astype(np.int64)
    carry = m == (1 << 31)
    m = np.where(carry, m // 2, m)
    exponent = exponent + carry
    shift = 31 - exponent
    if np.any(shift < 1):
        raise ValueError(f"requantization multiplier {real.max():.4g} is 2^30 or more (the output's scale is "
                         f"over a billion times finer than the accumulator's)")
    return np.where(negligible, 0, m).astype(np.int32), np.where(negligible, 31, shift).astype(np.int32)


def rounding_shift(v: np.ndarray, shift: np.ndarray) -> np.ndarray:
    """round(v / 2^shift), ties to even, exactly in int64."""
    v = v.astype(np.int64)
    shift = np.asarray(shift, np.int64)
    q = v >> shift
    r = v - (q << shift)
    half = np.int64(1) << (shift - 1)
    return q + ((r > half) | ((r == half) & (q & 1 == 1)))


def _axis_shape(p: np.ndarray, ndim: int, axis: int) -> np.ndarray:
    if p.ndim == 0:
        return p
    shape = [1] * ndim
    shape[axis % ndim] = -1
    return p.reshape(shape)


# ---- integer ops ----------------------------------------------------------------------------------
def _int_infer_check(types, where: str) -> None:
    x, x_zp, w, w_zp = types[:4]
    if x.dtype not in ("u8", "i8") or w.dtype not in ("u8", "i8"):
        raise TypeError(f"{where}: operands must be u8/i8, got {x.dtype} and {w.dtype}")
    if x_zp.dtype != x.dtype or w_zp.dtype != w.dtype or x_zp.rank != 0 or w_zp.rank > 1:
        raise TypeError(f"{where}: zero points must match their operands' dtypes (x: scalar, w: scalar or per channel)")
    if len(types) > 4 and types[4].dtype != "i32":
        raise TypeError(f"{where}: bias must be i32, got {types[4].dtype}")


def _centered(a: np.ndarray, zp: np.ndarray, axis: int = 0) -> np.ndarray:
    return a.astype(np.int64) - _axis_shape(zp.astype(np.int64), a.ndim, axis)


def _declare_conv_int(name: str, float_name: str, rank: int) -> None:
    from .nn import _check_window, _spatial_out, _window_attrs
    from .registry import get_op

    float_conv = get_op(float_name)

    def infer(types, attrs):
        _int_infer_check(types, name)
        x, w = types[0], types[2]
        _check_window(attrs, rank, name)
        if x.rank != rank + 2 or w.rank != rank + 2 or x.shape[1] != w.shape[1] * attrs["groups"]:
            raise TypeError(f"{name}: input {x} does not fit weight {w} with groups={attrs['groups']}")
        out = _spatial_out(x.shape[2:], w.shape[2:], attrs, rank)
        return [TensorType((x.shape[0], w.shape[0], *out), "i32")]

    def kernel(xs, attrs):
        x, x_zp, w, w_zp = xs[:4]
        # every product and partial sum is an integer below 2^53: float64 convolution is exact
        xc = _centered(x, x_zp).astype(np.float64)
        wc = _centered(w, w_zp, axis=0).astype(np.float64)
        conv_attrs = {k: v for k, v in attrs.items()}
        conv_attrs.update(activation="none", activation_args=())
        acc = float_conv.run([xc, wc], conv_attrs)[0]
        acc = np.rint(acc).astype(np.int64)
        if len(xs) > 4:
            acc = acc + _axis_shape(xs[4].astype(np.int64), acc.ndim, 1)
        return acc.astype(np.int32)

    declare(name, arity=(4, 5), attrs={**_window_attrs(rank, pool=False), "groups": Attr("int", 1)},
            infer=infer, kernel=kernel, traits=Traits("integer", quant="integer", spatial_rank=rank),
            doc=f"{rank}-D integer convolution: sum((x - x_zp) * (w - w_zp)) + bias, accumulated exactly in int32 "
                "(w_zp per output channel or scalar)")


def _linear_int_infer(types, attrs):
    _int_infer_check(types, "linear_int")
    x, w = types[0], types[2]
    if w.rank != 2 or x.shape[-1] != w.shape[1]:
        raise TypeError(f"linear_int: input {x} does not fit weight {w} ([out, in])")
    return [TensorType(x.shape[:-1] + (w.shape[0],), "i32")]


def _exact_matmul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Integer matmul through float64 BLAS: 8-bit products summed over K < 2^37 terms stay
    below 2^53, so every partial sum is exact; numpy's int64 matmul has no BLAS and is ~50x slower."""
    return np.rint(np.matmul(a.astype(np.float64), b.astype(np.float64))).astype(np.int64)


def _linear_int_kernel(xs, attrs):
    x, x_zp, w, w_zp = xs[:4]
    acc = _exact_matmul(_centered(x, x_zp), _centered(w, w_zp, axis=0).T)
    if len(xs) > 4:
        acc = acc + xs[4].astype(np.int64)
    return acc.astype(np.int32)


def _matmul_int_infer(types, attrs):
    _int_infer_check(types, "matmul_int")
    from .nn import _matmul_shape

    return [TensorType(_matmul_shape(types[0].shape, types[2].shape, "matmul_int"), "i32")]


def _matmul_int_kernel(xs, attrs):
    a, a_zp, b, b_zp = xs
    return _exact_matmul(_centered(a, a_zp), _centered(b, b_zp, axis=-1)).astype(np.int32)


def _rescaled_type(name: str, x: TensorType, factor: TensorType, zp: TensorType, axis: int, what: str) -> list:
    """The result type of a requantize: ``x`` an i32/u8/i8 tensor, ``factor`` (its ``what``) a
    scalar or one per channel along ``axis``, ``zp`` a u8/i8 scalar giving the result's type."""
    if x.dtype not in ("i32", "u8", "i8"):
        raise TypeError(f"{name}: input must be i32/u8/i8, got {x.dtype}")
    if factor.rank == 1 and factor.shape[0] != x.shape[axis % x.rank]:
        raise TypeError(f"{name}: {factor.shape[0]} {what} for axis {axis} of {x}")
    if zp.dtype not in ("u8", "i8") or zp.rank != 0:
        raise TypeError(f"{name}: output zero point must be a u8/i8 scalar")
    return [TensorType(x.shape, zp.dtype)]


def _requantize_infer(types, attrs):
    x, mult, shift, zp = types
    if mult.dtype != "i32" or shift.dtype != "i32" or mult.shape != shift.shape or mult.rank > 1:
        raise TypeError("requantize: multiplier and shift must be i32 scalars or per-channel vectors of one shape")
    return _rescaled_type("requantize", x, mult, zp, attrs["axis"], "multipliers")


def _requantize_kernel(xs, attrs):
    x, mult, shift, zp = xs
    info = np.iinfo(zp.dtype)
    axis = attrs["axis"]
    v = x.astype(np.int64) - attrs["input_zero_point"]
    y = rounding_shift(v * _axis_shape(mult.astype(np.int64), x.ndim, axis), _axis_shape(shift, x.ndim, axis))
    y = y + int(zp)
    lo, hi = max(info.min, attrs["min"]), min(info.max, attrs["max"])
    return np.clip(y, lo, hi).astype(zp.dtype)


def _requantize_f32_infer(types, attrs):
    x, scale, zp = types
    if scale.dtype != "f32" or scale.rank > 1:
        raise TypeError("requantize_f32: scale must be an f32 scalar or per-channel vector")
    return _rescaled_type("requantize_f32", x, scale, zp, attrs["axis"], "scales")


def requantize_f32_values(v: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """round_half_even(float32(v) * scale) in float32 arithmetic, as int64: what every kernel
    computes (int32 -> float32 rounds to nearest even past 2^24, the product is one float32
    rounding, nothing is fused into it), so the result is bit-identical everywhere."""
    return np.rint(v.astype(np.float32) * scale.astype(np.float32)).astype(np.int64)


def _requantize_f32_kernel(xs, attrs):
    x, scale, zp = xs
    info = np.iinfo(zp.dtype)
    v = x.astype(np.int64) - attrs["input_zero_point"]
    y = requantize_f32_values(v, _axis_shape(scale, x.ndim, attrs["axis"])) + int(zp)
    lo, hi = max(info.min, attrs["min"]), min(info.max, attrs["max"])
    return np.clip(y, lo, hi).astype(zp.dtype)


def _add_int_infer(types, attrs):
    a, b, zp = types
    if a.dtype not in ("u8", "i8") or b.dtype not in ("u8", "i8") or zp.dtype not in ("u8", "i8") or zp.rank:
        raise TypeError("add_int: operands and output zero point must be u8/i8")
    from .registry import broadcast_shapes

    return [TensorType(broadcast_shapes(a.shape, b.shape, where="add_int"), zp.dtype)]


ADD_INT_BITS = 20  # headroom bits: operands are rescaled to units of 2^-20 output steps


def _add_int_kernel(xs, attrs):
    a, b, zp = xs
    info = np.iinfo(zp.dtype)
    left = np.int64(1) << ADD_INT_BITS
    ra = rounding_shift((a.astype(np.int64) - attrs["a_zero_point"]) * left * attrs["a_multiplier"], attrs["a_shift"])
    rb = rounding_shift((b.astype(np.int64) - attrs["b_zero_point"]) * left * attrs["b_multiplier"], attrs["b_shift"])
    y = rounding_shift(ra + rb, np.int64(ADD_INT_BITS)) + int(zp)
    return np.clip(y, max(info.min, attrs["min"]), min(info.max, attrs["max"])).astype(zp.dtype)


ADD_SCALE_BITS = 16  # significant bits of add_int_f32's operand scales: 8-bit operand x scale is exact in float32


def add_scale(real: float) -> float:
    """``real`` rounded to ``ADD_SCALE_BITS`` significant bits (an ``add_int_f32`` scale): its
    product with any 8-bit operand then fits float32's 24-bit significand exactly."""
    if real == 0 or not np.isfinite(real):
        return float(real)
    mantissa, exponent = np.frexp(np.float64(real))
    return float(np.ldexp(np.rint(mantissa * (1 << ADD_SCALE_BITS)), int(exponent) - ADD_SCALE_BITS))


def add_f32_values(a: np.ndarray, b: np.ndarray, attrs: dict) -> np.ndarray:
    """round_half_even(float32(a - z_a) * s_a + float32(b - z_b) * s_b), as int64: both products
    are exact (``add_scale``), so the sum is rounded once, whether or not a kernel fuses one
    product into a multiply-add: every kernel computes the same bits."""
    pa = (a.astype(np.int64) - attrs["a_zero_point"]).astype(np.float32) * np.float32(attrs["a_scale"])
    pb = (b.astype(np.int64) - attrs["b_zero_point"]).astype(np.float32) * np.float32(attrs["b_scale"])
    return np.rint((pa + pb).astype(np.float32)).astype(np.int64)


def _add_int_f32_kernel(xs, attrs):
    a, b, zp = xs
    info = np.iinfo(zp.dtype)
    y = add_f32_values(a, b, attrs) + int(zp)
    return np.clip(y, max(info.min, attrs["min"]), min(info.max, attrs["max"])).astype(zp.dtype)


def _add_int_f32_infer(types, attrs):
    for name in ("a_scale", "b_scale"):
        if add_scale(attrs[name]) != attrs[name]:
            raise TypeError(f"add_int_f32: {name} {attrs[name]!r} has more than {ADD_SCALE_BITS} significant bits")
    return _add_int_infer(types, attrs)


def _rescale_infer(types, attrs):
    x, scale, zp = types
    if x.dtype != "i32" or scale.dtype != "f32" or zp.dtype not in ("u8", "i8") or zp.rank or scale.rank > 1:
        raise TypeError("rescale: takes an i32 accumulator, an f32 multiplier (scalar or per channel) "
                        "and a u8/i8 zero point")
    return [TensorType(x.shape, zp.dtype)]


def _rescale_kernel(xs, attrs):
    x, scale, zp = xs
    info = np.iinfo(zp.dtype)
    # as ONNX's reference: the int32 accumulator times the float32 multiplier, in float64
    y = np.rint(x.astype(np.float64) * _axis_shape(scale.astype(np.float64), x.ndim, attrs["axis"]))
    y = y.astype(np.int64) + int(zp)
    return np.clip(y, info.min, info.max).astype(zp.dtype)


_INT_BOUNDS = {"min": Attr("int", -(1 << 31), "lower clamp in the output's integer domain (fused relu)"),
               "max": Attr("int", (1 << 31) - 1, "upper clamp in the output's integer domain (fused relu6)")}

_declare_conv_int("conv1d_int", "conv1d", 1)
_declare_conv_int("conv2d_int", "conv2d", 2)
_declare_conv_int("conv3d_int", "conv3d", 3)
declare("linear_int", arity=(4, 5), infer=_linear_int_infer, kernel=_linear_int_kernel, traits=INTEGER,
        doc="integer linear: (x - x_zp) @ (w - w_zp).T + bias, int32 accumulation; w is [out, in]")
declare("matmul_int", arity=4, infer=_matmul_int_infer, kernel=_matmul_int_kernel, traits=INTEGER,
        doc="integer matmul of two quantized tensors: (a - a_zp) @ (b - b_zp), int32 accumulation")
declare("requantize", arity=4, attrs={"axis": Attr("int", 1), "input_zero_point": Attr("int", 0),
                                      "scale": Attr("float", 0.0, "the real scale of the result (informational)"),
                                      **_INT_BOUNDS},
        infer=_requantize_infer, kernel=_requantize_kernel, traits=INTEGER,
        doc="saturate(clamp(round_half_even((x - input_zero_point) * multiplier / 2^shift) + zero_point)): "
            "fixed-point rescaling, per tensor or per channel along `axis`")
declare("requantize_f32", arity=3, attrs={"axis": Attr("int", 1), "input_zero_point": Attr("int", 0),
                                          "scale": Attr("float", 0.0, "the real scale of the result (informational)"),
                                          **_INT_BOUNDS},
        infer=_requantize_f32_infer, kernel=_requantize_f32_kernel, traits=INTEGER,
        doc="saturate(clamp(round_half_even(float32(x - input_zero_point) * scale) + zero_point)): rescaling in "
            "float32 arithmetic (one rounding of the product, none fused), per tensor or per channel along `axis`; "
            "lower-integer{requantize=float32} makes it instead of the fixed-point requantize")
declare("add_int", arity=3, attrs={"a_zero_point": Attr("int"), "a_multiplier": Attr("int"), "a_shift": Attr("int"),
                                   "b_zero_point": Attr("int"), "b_multiplier": Attr("int"), "b_shift": Attr("int"),
                                   "scale": Attr("float", 0.0, "the real scale of the result (informational)"),
                                   **_INT_BOUNDS},
        infer=_add_int_infer, kernel=_add_int_kernel, traits=INTEGER,
        doc="quantized add: both operands rescaled to the output scale in fixed point (2^-20 headroom), "
            "summed, rounded half to even, offset by the output zero point, clamped")
declare("add_int_f32", arity=3, attrs={"a_zero_point": Attr("int"), "a_scale": Attr("float"),
                                       "b_zero_point": Attr("int"), "b_scale": Attr("float"),
                                       "scale": Attr("float", 0.0, "the real scale of the result (informational)"),
                                       **_INT_BOUNDS},
        infer=_add_int_f32_infer, kernel=_add_int_f32_kernel, traits=INTEGER,
        doc="quantized add in float32: saturate(clamp(round_half_even(float32(a - a_zero_point) * a_scale + "
            "float32(b - b_zero_point) * b_scale) + zero_point)); the scales (s_a / s_y, s_b / s_y) have at most 16 "
            "significant bits, so both products are exact and the sum is rounded once on every kernel; "
            "lower-integer{requantize=float32} makes it instead of add_int")
declare("rescale", arity=3, attrs={"axis": Attr("int", 1)}, infer=_rescale_infer, kernel=_rescale_kernel,
        traits=CONVERSION, doc="ONNX QLinear* output stage: saturate(round_half_even(x * scale) + zero_point), in float64")
