"""Softmax and log-softmax over the last axis of a float32 tensor on the CPU, one kernel, a row
per task, written by hand.

Relax's form is four kernels (max, subtract + exp, sum, divide), and TVM's default schedules
reduce each row with scalar code; a row of attention scores is short (128 in MiniLM), so one
pass keeps it in cache: 16 running maxima in a vector, then ``exp(x - max)`` stored with 16
running sums, then one multiply by ``1 / sum`` (log-softmax: ``(x - max) - log(sum)``).

``exp`` is evaluated here, not by libm (a scalar call per element): ``x = n ln2 + r`` with
``|r| <= ln2 / 2`` (Cody-Waite, ``ln2`` in two parts), a degree-6 Taylor polynomial in ``r``
(relative error under 2e-7), times ``2^n`` built in the exponent bits. Its argument is never
positive (the row's maximum was subtracted); below ``EXP_MIN`` it is 0, as masked scores (the
float32 minimum) must give. (No ``from __future__ import annotations``: TVMScript reads the
buffer annotations as values.)"""
import functools

import tvm
from tvm import tirx
from tvm.script import tirx as T

from .tiling import LANES, mark_opaque

LOG2E = 1.4426950408889634
LN2_HI, LN2_LO = 0.693359375, -2.12194440e-4  # ln2 = LN2_HI + LN2_LO, LN2_HI exact in few bits
EXP_MIN = -87.33654  # exp below this is under float32's smallest normal: taken as 0
LOWEST = -3.4028234663852886e38


def fast_exp(x: "tirx.PrimExpr") -> "tirx.PrimExpr":
    """``exp(x)`` for float32 ``x <= 0``, as the module docstring says."""
    clamped = tirx.max(x, tirx.const(EXP_MIN, "float32"))
    n = tirx.round(clamped * tirx.const(LOG2E, "float32"))
    r = clamped - n * tirx.const(LN2_HI, "float32") - n * tirx.const(LN2_LO, "float32")
    poly = tirx.const(1.0 / 720, "float32")
    for k in (120, 24, 6, 2, 1, 1):
        poly = poly * r + tirx.const(1.0 / k, "float32")
    two_n = tirx.reinterpret("float32", (n.astype("int32") + 127) << 23)
    return tirx.Select(x < tirx.const(EXP_MIN, "float32"), tirx.const(0.0, "float32"), poly * two_n)


@T.macro
def fold(lanes, g, combine):
    """``lanes[g, 0] = combine`` of row ``g``'s 16 lanes, in halving vector steps (a scalar chain
    through memory costs 5x as much)."""
    for v in T.vectorized(8):
        lanes[g, v] = combine(lanes[g, v], lanes[g, v + 8])
    for v in T.vectorized(4):
        lanes[g, v] = combine(lanes[g, v], lanes[g, v + 4])
    for v in T.vectorized(2):
        lanes[g, v] = combine(lanes[g, v], lanes[g, v + 2])
    lanes[g, 0] = combine(lanes[g, 0], lanes[g, 1])


@functools.cache
def softmax_rows(rows: int, length: int, log: bool) -> tvm.tirx.PrimFunc:
    """``out[r, :] = softmax(x[r, :])`` (``log``: log-softmax) for ``x [rows, length]`` float32.
    A task takes ``group`` rows and runs each pass over all of them before the next, so that
    their dependency chains (a running max, a running sum) overlap."""
    chunks, tail = divmod(length, LANES)
    start = chunks * LANES
    group = next(g for g in (8, 4, 2, 1) if rows % g == 0)

    def finish(xv, e, factor):
        """softmax: ``e / sum`` (``factor = 1 / sum``); log-softmax: ``x - (max + log(sum))``."""
        return xv - factor if log else e * factor

    @T.prim_func(private=True, s_tir=True)
    def kernel(x: T.Buffer((rows, length), "float32"), out: T.Buffer((rows, length), "float32")):
        # blocks, as Relax's reshape analysis expects of a kernel with one input and one output
        T.func_attr({"tir.noalias": True})
        with T.sblock("root"):
            for task in T.parallel(rows // group):
              with T.sblock("rows"):
                T.reads(x[task * group:task * group + group, 0:length])
                T.writes(out[task * group:task * group + group, 0:length])
                lanes = T.sblock_alloc_buffer((group, LANES), "float32", scope="local")
                peak = T.sblock_alloc_buffer((group,), "float32", scope="local")
                total = T.sblock_alloc_buffer((group,), "float32", scope="local")
                for g in T.unroll(group):
                    for v in T.vectorized(LANES):
                        lanes[g, v] = T.float32(LOWEST)
                for g, i in T.grid(group, chunks):
                    for v in T.vectorized(LANES):
                        lanes[g, v] = T.max(lanes[g, v], x[task * group + g, i * LANES + v])
                for g in T.unroll(group):
                    fold(lanes, g, T.max)
                    peak[g] = lanes[g, 0]
                    for t in range(tail):
                        peak[g] = T.max(peak[g], x[task * group + g, start + t])
                    for v in T.vectorized(LANES):
                        lanes[g, v] = T.float32(0)
                for g, i in T.grid(group, chunks):
                    for v in T.vectorized(LANES):
                        out[task * group + g, i * LANES + v] = fast_exp(x[task * group + g, i * LANES + v] - peak[g])
                        lanes[g, v] = lanes[g, v] + out[task * group + g, i * LANES + v]
                for g in T.unroll(group):
                    fold(lanes, g, lambda a, b: a + b)
                    total[g] = lanes[g, 0]
                    for t in range(tail):
                        out[task * group + g, start + t] = fast_exp(x[task * group + g, start + t] - peak[g])
                        total[g] = total[g] + out[task * group + g, start + t]
                    if log:
                        total[g] = peak[g] + T.log(total[g])
                    else:
                        total[g] = T.float32(1) / total[g]
                for g, i in T.grid(group, chunks):
                    for v in T.vectorized(LANES):
                        out[task * group + g, i * LANES + v] = finish(x[task * group + g, i * LANES + v],
                                                                      out[task * group + g, i * LANES + v], total[g])
                for g, t in T.grid(group, tail):
                    out[task * group + g, start + t] = finish(x[task * group + g, start + t],
                                                              out[task * group + g, start + t], total[g])

    return mark_opaque(kernel)
