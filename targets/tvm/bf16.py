"""bfloat16 on the TVM target: the rounding the IR's ``round_bf16`` defines, bit for bit (ties
to even on the float32 word, NaN kept quiet), and the bf16 operand rows of the AMX-BF16 GEMM
(``x86_amx.dense`` with ``bf16``). Both are plain TE computes: TVM fuses them with their neighbours."""
from __future__ import annotations

from tvm import te, tirx

_ROUNDED = 0xFFFF0000


def _rounded_word(v: tirx.PrimExpr) -> tirx.PrimExpr:
    """The float32 ``v``'s word rounded to its upper 16 bits (uint32, lower half zero)."""
    bits = tirx.reinterpret("uint32", v)
    up = bits + tirx.const(0x7FFF, "uint32") + ((bits >> tirx.const(16, "uint32")) & tirx.const(1, "uint32"))
    nan = (bits | tirx.const(0x00400000, "uint32")) & tirx.const(_ROUNDED, "uint32")
    return tirx.Select(v != v, nan, up & tirx.const(_ROUNDED, "uint32"))


def round_bf16(x: te.Tensor) -> te.Tensor:
    """``x`` (float32) rounded to the nearest bfloat16, as float32."""
    return te.compute(x.shape, lambda *i: tirx.reinterpret("float32", _rounded_word(x(*i))), name="round_bf16")


def bf16_rows(x: te.Tensor, k_padded: int) -> te.Tensor:
    """``x [rows, k]`` float32 -> ``[rows, k_padded]`` bf16 bit patterns (uint16; zeros past ``k``)."""
    rows, k = x.shape

    def bits(i, j):
        word = _rounded_word(x[i, tirx.min(j, k - 1)]) >> tirx.const(16, "uint32")
        return tirx.if_then_else(j < k, word.astype("uint16"), tirx.const(0, "uint16"))

    return te.compute((rows, k_padded), bits, name="bf16_rows")
