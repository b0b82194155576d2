"""Quantization ops with ONNX QuantizeLinear/DequantizeLinear semantics: a rank-0 scale is
per-tensor, a rank-1 scale is per-axis along `axis`; rounding is half to even; saturation to
the integer type of the zero point."""
from __future__ import annotations

import numpy as np

from ..types import TensorType
from .registry import Attr, declare, norm_axis

QUANT_DTYPES = ("i8", "u8", "i32")


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
    q = np.rint(x.astype(np.float32) / s).astype(np.int64) + z  # rint: round half to even
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
        tags=("quant",), doc="saturate(round_half_even(x / scale) + zero_point); type from zero_point (u8 if absent)")
declare("dequantize", arity=(2, 3), attrs={"axis": Attr("int", 1)}, infer=_dequantize_infer,
        kernel=_dequantize_kernel, tags=("quant",), doc="(x - zero_point) * scale")
