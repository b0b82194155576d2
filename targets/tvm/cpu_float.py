"""Float32 kernels for CPUs, scheduled by hand: what an fp32 model runs, and what an int8
model keeps float. The vectors are 16 float32 lanes (AVX-512; LLVM splits them for AVX2, where
the register tiles are smaller: ``kernel_lower`` passes AVX2's row and accumulator counts).

- ``dense_f32``: a register tile of ``rows x 16*blocks`` accumulators; each FMA multiplies one
  broadcast activation by 16 weights, packed at compile time as ``[N/16, K, 16]``.
- ``conv2d_f32``: a direct NCHW convolution over an input padded beforehand (also on the right,
  so every 16-wide strip of an output row reads inside it): the 16 lanes are 16 neighbouring
  outputs of one row, each FMA multiplies them by one broadcast weight; a tile holds
  ``rows`` output channels times the strips of one output row. No im2col copy. With a
  horizontal stride ``s`` the padded rows are split into ``s`` phases (columns ``x*s + q``
  for phase ``q``), so that a strip's 16 inputs are contiguous again.
Both end with bias and a clamp (ReLU, ReLU6, clip) on the tile before the single store."""
from __future__ import annotations

import functools

import numpy as np
import tvm
from tvm import te, tirx

from .tiling import DENSE_ROWS, LANES, MAX_ACCUMULATORS, finalize, padded, tile_dense, tile_rows

Clamp = tuple[float, float] | None  # (lo, hi) of a fused ReLU/clip, or none


def _clamped(v: tirx.PrimExpr, clamp: Clamp) -> tirx.PrimExpr:
    if clamp is None:
        return v
    lo, hi = clamp
    if hi != float("inf"):
        v = tirx.min(v, tirx.const(hi, "float32"))
    return tirx.max(v, tirx.const(lo, "float32")) if lo != float("-inf") else v


def pack_dense_weight(w: np.ndarray, n_padded: int) -> np.ndarray:
    """``[N, K]`` float32 -> ``[N'/16, K, 16]``: the 16 columns one FMA updates are contiguous."""
    n, k = w.shape
    full = np.zeros((n_padded, k), np.float32)
    full[:n] = w
    return np.ascontiguousarray(full.reshape(n_padded // LANES, LANES, k).transpose(0, 2, 1))


@functools.cache
def dense_f32(m: int, n: int, n_padded: int, k: int, clamp: Clamp = None,
              row_choices: tuple[int, ...] = DENSE_ROWS) -> tvm.tirx.PrimFunc:
    """``out[m, n] = clamp(A[m, k] . W[n, k] + bias[n])`` with ``W`` packed by
    :func:`pack_dense_weight`; arguments ``A, W, bias, out``. ``row_choices``: the register
    tile's rows (``tiling.DENSE_ROWS`` for AVX-512's 32 registers)."""
    from tvm.s_tir import Schedule

    a = te.placeholder((m, k), "float32", name="A")
    w = te.placeholder((n_padded // LANES, k, LANES), "float32", name="W")
    bias = te.placeholder((n_padded,), "float32", name="bias")
    r = te.reduce_axis((0, k), name="k")
    c = te.compute((m, n_padded), lambda i, j: te.sum(a[i, r] * w[j // LANES, r, j % LANES], axis=r), name="C")
    out = te.compute((m, n), lambda i, j: _clamped(c[i, j] + bias[j], clamp), name="out")
    sch = Schedule(te.create_prim_func([a, w, bias, out]))
    block, epilogue, reduction, lanes = tile_dense(sch, m, n_padded, row_choices=row_choices)
    sch.vectorize(lanes)
    sch.decompose_reduction(block, reduction)
    return finalize(sch, epilogue)


def conv_input_padding(width: int, pads: tuple[int, int, int, int], out_width: int, kernel_width: int,
                       stride: int) -> tuple[int, int, int, int]:
    """(top, left, bottom, right) padding that also lets the last 16-wide output strip read in
    bounds, the padded width a multiple of the stride (for the phase split)."""
    top, left, bottom, right = pads
    needed = max(width + left + right, (padded(out_width, LANES) - 1) * stride + kernel_width)
    return top, left, bottom, padded(needed, stride) - width - left


@functools.cache
def conv2d_f32(batch: int, channels: int, padded_hw: tuple[int, int], out_channels: int,
               kernel: tuple[int, int], strides: tuple[int, int], out_hw: tuple[int, int],
               clamp: Clamp = None, max_accumulators: int = MAX_ACCUMULATORS) -> tvm.tirx.PrimFunc:
    """``out[b, o, y, x] = clamp(sum_cij X[b, c, y*sy + i, x*sx + j] * W[o, c, i, j] + bias[o])``
    over an input padded by :func:`conv_input_padding` and split into phases, ``X[b, c, h, q, x]``
    standing for column ``x*sx + q``; arguments ``X, W, bias, out``. ``max_accumulators``:
    16-lane vectors the register tile keeps (AVX-512's 28 of 32 registers; 6 on AVX2, whose 16
    registers hold half a vector each: 28 spilled, ResNet-18 fp32 took 4.4x ONNX Runtime's)."""
    from tvm.s_tir import Schedule

    (kh, kw), (sh, sw), (oh, ow) = kernel, strides, out_hw
    ow_padded = padded(ow, LANES)
    x = te.placeholder((batch, channels, padded_hw[0], sw, padded_hw[1] // sw), "float32", name="X")
    w = te.placeholder((out_channels, channels, kh, kw), "float32", name="W")
    bias = te.placeholder((out_channels,), "float32", name="bias")
    rc, ri, rj = te.reduce_axis((0, channels), name="c"), te.reduce_axis((0, kh), name="i"), \
        te.reduce_axis((0, kw), name="j")
    c = te.compute((batch, out_channels, oh, ow_padded), lambda b, o, y, v: te.sum(
        x[b, rc, y * sh + ri, rj % sw, v + rj // sw] * w[o, rc, ri, rj], axis=[rc, ri, rj]), name="C")
    out = te.compute((batch, out_channels, oh, ow), lambda b, o, y, v: _clamped(c[b, o, y, v] + bias[o], clamp),
                     name="out")
    sch = Schedule(te.create_prim_func([x, w, bias, out]))
    block, epilogue, first_reduction, lanes = tile_rows(sch, out_channels, ow_padded,
                                                        max_accumulators=max_accumulators)
    sch.vectorize(lanes)
    sch.decompose_reduction(block, first_reduction)
    return finalize(sch, epilogue)
