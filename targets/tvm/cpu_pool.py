"""Max pooling on the CPU along output rows, for any dtype (int8 models pool uint8 bytes)."""
from __future__ import annotations

import functools

import numpy as np
import tvm
from tvm import te

from .tiling import padded, tile_window_rows

VECTOR_BYTES = 64  # one AVX-512 register


def lanes(dtype: str, out_width: int) -> int:
    """Outputs per vector: a 64-byte register's worth, but no more than the row needs in
    16-lane steps (rows of 4 uint8 outputs would otherwise compute 64 and pad their input by 98)."""
    return min(VECTOR_BYTES // np.dtype(dtype).itemsize, padded(out_width, 16))


@functools.cache
def max_pool_rows(batch: int, channels: int, padded_hw: tuple[int, int], kernel: tuple[int, int],
                  strides: tuple[int, int], out_hw: tuple[int, int], dtype: str) -> tvm.tirx.PrimFunc:
    """``out[b, c, y, x] = max_{i,j} X[b, c, y*sy + i, j % sx, x + j // sx]`` over an input split
    into column phases (``layout.phase_split``), so that a vector of neighbouring outputs reads
    neighbouring elements at any stride; a register of outputs per strip (64 bytes: 64 uint8
    outputs at once), the window's maxima kept in registers. Rows of ``X`` must hold the
    window of the last strip, padding included."""
    from tvm.s_tir import Schedule

    (kh, kw), (sh, sw), (oh, ow) = kernel, strides, out_hw
    ow_padded = padded(ow, lanes(dtype, ow))
    x = te.placeholder((batch, channels, padded_hw[0], sw, padded_hw[1] // sw), dtype, name="X")
    i, j = te.reduce_axis((0, kh), name="i"), te.reduce_axis((0, kw), name="j")
    c = te.compute((batch, channels, oh, ow_padded), lambda b, ch, y, v: te.max(
        x[b, ch, y * sh + i, j % sw, v + j // sw], axis=[i, j]), name="C")
    out = te.compute((batch, channels, oh, ow), lambda b, ch, y, v: c[b, ch, y, v], name="out")
    return tile_window_rows(Schedule(te.create_prim_func([x, out])), lanes(dtype, ow))
