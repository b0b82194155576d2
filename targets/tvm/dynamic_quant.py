"""Per-token (dynamic) quantization: ``quantize_rows`` (a row's largest magnitude, its scale,
its codes) as a TE computation for any target and as a hand-written CPU kernel
(:func:`quantize_rows_cpu`: the default schedule reduced each row with scalar code, 0.16 ms for
one of MiniLM's 128 x 1536 inputs), and ``dequantize_rows`` (an int32 product scaled by row
and column, plus the bias) as one elementwise computation.

Same arithmetic as the interpreter's kernels (``qcompiler.ir.ops.quant``), bit for bit for the
codes and scales: the maximum is exact, ``max / 127`` and ``127 / max`` are float32 divisions
(one per row), a code one float32 multiply rounded to nearest even. (No ``from __future__ import
annotations``: TVMScript reads the kernel's buffer annotations as values.)"""
import functools

import tvm
from tvm import te, tirx
from tvm.script import tirx as T

from qcompiler.ir.ops.quant import ROW_LEVELS, ROW_ZERO_POINT

from .cpu_softmax import fold
from .int_arith import round_clamped
from .tiling import LANES, mark_opaque


def _row_factors(amax: "tirx.PrimExpr") -> tuple["tirx.PrimExpr", "tirx.PrimExpr"]:
    """(scale, code factor) of a row whose largest magnitude is ``amax`` (``quant.row_scales``)."""
    zero, levels = tirx.const(0, "float32"), tirx.const(ROW_LEVELS, "float32")
    s = amax / levels
    inv = tirx.if_then_else(amax > zero, tirx.min(levels / amax, tirx.max_value("float32")), zero)
    return tirx.if_then_else(s > zero, s, tirx.const(1, "float32")), inv


def _code(x: "tirx.PrimExpr", factor: "tirx.PrimExpr") -> "tirx.PrimExpr":
    """The code of ``x``: ``x * factor`` rounded half to even and clamped to +-127
    (``int_arith.round_clamped``), plus the zero point."""
    return (round_clamped(x * factor, -int(ROW_LEVELS), int(ROW_LEVELS)) + ROW_ZERO_POINT).astype("uint8")


def quantize_rows(x: te.Tensor) -> list[te.Tensor]:
    """``x [rows, K]`` float32 -> (codes ``[rows, K]`` uint8, scales ``[rows, 1]`` float32)."""
    rows, k = x.shape
    r = te.reduce_axis((0, k), name="k")
    amax = te.compute((rows,), lambda i: te.max(tirx.abs(x[i, r]), axis=r), name="row_max")
    scales = te.compute((rows, 1), lambda i, _: _row_factors(amax[i])[0], name="row_scale")
    codes = te.compute((rows, k), lambda i, j: _code(x[i, j], _row_factors(amax[i])[1]), name="row_codes")
    return [codes, scales]


def dequantize_rows(x: te.Tensor, row: te.Tensor, zero_point: int, column: te.Tensor | None = None,
                    bias: te.Tensor | None = None) -> te.Tensor:
    """``((float32(x - zero_point) * row) * column) + bias`` over ``x [rows, N]``, ``row [rows, 1]``,
    ``column`` and ``bias`` ``[N]``."""
    def element(i, j):
        v = x[i, j].astype("int32")
        if zero_point:
            v = v - tirx.const(zero_point, "int32")
        y = v.astype("float32") * row[i, 0]
        if column is not None:
            y = y * column[j]
        if bias is not None:
            y = y + bias[j]
        return y

    return te.compute(x.shape, element, name="dequantize_rows")


@functools.cache
def quantize_rows_cpu(rows: int, length: int) -> tvm.tirx.PrimFunc:
    """``(codes, scales) = quantize_rows(x)`` for ``x [rows, length]`` float32: a task takes
    ``group`` rows, keeps 16 running maxima of ``|x|`` per row in a vector, folds them, then
    writes the row's codes in 16-lane strips (the row is still in cache)."""
    chunks, tail = divmod(length, LANES)
    start = chunks * LANES
    group = next(g for g in (8, 4, 2, 1) if rows % g == 0)

    @T.prim_func(private=True, s_tir=True)
    def kernel(x: T.Buffer((rows, length), "float32"), codes: T.Buffer((rows, length), "uint8"),
               scales: T.Buffer((rows, 1), "float32")):
        T.func_attr({"tir.noalias": True})
        with T.sblock("root"):
            for task in T.parallel(rows // group):
              with T.sblock("rows"):
                T.reads(x[task * group:task * group + group, 0:length])
                T.writes(codes[task * group:task * group + group, 0:length],
                         scales[task * group:task * group + group, 0:1])
                lanes = T.sblock_alloc_buffer((group, LANES), "float32", scope="local")
                factor = T.sblock_alloc_buffer((group,), "float32", scope="local")
                for g in T.unroll(group):
                    for v in T.vectorized(LANES):
                        lanes[g, v] = T.float32(0)
                for g, i in T.grid(group, chunks):
                    for v in T.vectorized(LANES):
                        lanes[g, v] = T.max(lanes[g, v], T.abs(x[task * group + g, i * LANES + v]))
                for g in T.unroll(group):
                    fold(lanes, g, T.max)
                    for t in range(tail):
                        lanes[g, 0] = T.max(lanes[g, 0], T.abs(x[task * group + g, start + t]))
                    scales[task * group + g, 0] = _row_factors(lanes[g, 0])[0]
                    factor[g] = _row_factors(lanes[g, 0])[1]
                for g, i in T.grid(group, chunks):
                    for v in T.vectorized(LANES):
                        codes[task * group + g, i * LANES + v] = _code(x[task * group + g, i * LANES + v], factor[g])
                for g, t in T.grid(group, tail):
                    codes[task * group + g, start + t] = _code(x[task * group + g, start + t], factor[g])

    return mark_opaque(kernel)
