"""bfloat16 on the TVM target: the rounding the IR's ``round_bf16`` defines, bit for bit (ties
to even on the float32 word, NaN kept quiet), the bf16 operand rows of the AMX-BF16 GEMM
(``x86_amx.dense`` with ``bf16``; plain TE computes that TVM fuses with their neighbours), and
a convolution input as the AMX convolution reads it (:func:`to_pair_flat`)."""
from __future__ import annotations

import functools

import tvm
from tvm import te, tirx

from .layout import flat_phases

_ROUNDED = 0xFFFF0000


def _rounded_word(v: tirx.PrimExpr) -> tirx.PrimExpr:
    """The float32 ``v``'s word rounded to its upper 16 bits (uint32, lower half zero)."""
    bits = tirx.reinterpret("uint32", v)
    up = bits + tirx.const(0x7FFF, "uint32") + ((bits >> tirx.const(16, "uint32")) & tirx.const(1, "uint32"))
    nan = (bits | tirx.const(0x00400000, "uint32")) & tirx.const(_ROUNDED, "uint32")
    return tirx.Select(v != v, nan, up & tirx.const(_ROUNDED, "uint32"))


def _bits(v: tirx.PrimExpr) -> tirx.PrimExpr:
    """The bf16 bit pattern (in a uint32's low half) of the float32 ``v`` rounded to bf16."""
    return _rounded_word(v) >> tirx.const(16, "uint32")


def round_bf16(x: te.Tensor) -> te.Tensor:
    """``x`` (float32) rounded to the nearest bfloat16, as float32."""
    return te.compute(x.shape, lambda *i: tirx.reinterpret("float32", _rounded_word(x(*i))), name="round_bf16")


def bf16_rows(x: te.Tensor, k_padded: int) -> te.Tensor:
    """``x [rows, k]`` float32 -> ``[rows, k_padded]`` bf16 bit patterns (uint16; zeros past ``k``)."""
    rows, k = x.shape

    def bits(i, j):
        return tirx.if_then_else(j < k, _bits(x[i, tirx.min(j, k - 1)]).astype("uint16"), tirx.const(0, "uint16"))

    return te.compute((rows, k_padded), bits, name="bf16_rows")


@functools.cache
def to_pair_flat(batch: int, channels: int, height: int, width: int, pads: tuple[int, int, int, int],
                 strides: tuple[int, int], rows: int, row: int, pairs: int) -> tvm.tirx.PrimFunc:
    """``x [B, C, H, W]`` float32 -> ``[B, pairs, sh, sw, rows, row]`` uint32 words holding the
    bf16 values of channels ``2g`` (low half) and ``2g + 1`` (zero past ``C``, and outside the
    image): ``x86_int8.to_blocked_flat``'s planes with a 4-byte group of two bf16 channels, which
    the AMX convolution reads as it reads four int8 channels."""
    x = te.placeholder((batch, channels, height, width), "float32", name="x")

    def word(b, g, r, c):
        low = _bits(x[b, tirx.min(2 * g, channels - 1), r, c])
        high = _bits(x[b, tirx.min(2 * g + 1, channels - 1), r, c])
        if channels % 2:
            high = tirx.if_then_else(2 * g + 1 < channels, high, tirx.const(0, "uint32"))
            low = tirx.if_then_else(2 * g < channels, low, tirx.const(0, "uint32"))
        return low | (high << tirx.const(16, "uint32"))

    return flat_phases(x, pairs, pads, strides, rows, row, word, tirx.const(0, "uint32"))
