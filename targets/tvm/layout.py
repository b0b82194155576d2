"""Layout kernels for the CPU: an input padded with a fill value and split into column phases
(``[B, C, H', s, W'/s]``, column ``v*s + q`` at phase ``q``), the form the row-wise convolution
kernels read so that neighbouring outputs read neighbouring bytes at any stride.

Written as one TE computation with bounds checks, then scheduled so that the checks vanish
where they cannot fail: the padding rows, and the padding columns of each phase, are loop
partitions of their own, and the interior, free of conditions, is vectorized. (A generic
schedule of pad + reshape + transpose runs 10-20x slower.)"""
from __future__ import annotations

import functools
from collections.abc import Callable

import tvm
from tvm import te, tirx

from .int_arith import as_unsigned
from .tiling import opaque


@functools.cache
def phase_split(batch: int, channels: int, height: int, width: int, pads: tuple[int, int, int, int], stride: int,
                fill: float | int, dtype: str, to_unsigned: bool = False) -> tvm.tirx.PrimFunc:
    """``x [B, C, H, W]`` -> ``[B, C, H + top + bottom, s, (W + left + right) / s]`` holding ``x``
    inside the image and ``fill`` in the padding; with ``to_unsigned``, int8 ``x`` becomes uint8
    ``x + 128`` (the VNNI kernels' unsigned operand; ``fill`` is then already shifted)."""
    x = te.placeholder((batch, channels, height, width), dtype, name="x")
    out_dtype = "uint8" if to_unsigned else dtype
    return padded_phases(x, channels, pads, stride, lambda b, c, row, col: as_unsigned(
        x[b, c, row, col], to_unsigned and dtype == "int8"), tirx.const(fill, out_dtype))


def padded_phases(x: te.Tensor, channels: int, pads: tuple[int, int, int, int], stride: int,
                  value: Callable[..., tirx.PrimExpr], fill: tirx.PrimExpr) -> tvm.tirx.PrimFunc:
    """The layout kernel ``x [B, ., H, W]`` -> ``[B, channels, H', s, W'/s]``: ``value(b, c, row,
    col)`` inside the image, ``fill`` in the padding; scheduled by :func:`vectorize_interior`."""
    from tvm.s_tir import Schedule

    batch, _, height, width = (int(d) for d in x.shape)
    top, left, bottom, right = pads
    out_h, out_w = height + top + bottom, (width + left + right) // stride

    def element(b, c, h, q, v):
        row, col = h - top, v * stride + q - left
        inside = tirx.all(row >= 0, row < height, col >= 0, col < width)
        return tirx.if_then_else(inside, value(b, c, row, col), fill)

    out = te.compute((batch, channels, out_h, stride, out_w), element, name="out")
    sch = Schedule(te.create_prim_func([x, out]))
    b, c, h, _, _ = sch.get_loops(sch.get_sblock("out"))
    sch.parallel(sch.fuse(b, c))
    vectorize_interior(sch, h, (top, left), (height, width), stride, out_w)
    return opaque(sch)


def flat_phases(x: te.Tensor, channels: int, pads: tuple[int, int, int, int], strides: tuple[int, int], rows: int,
                row: int, value: Callable[..., tirx.PrimExpr], fill: tirx.PrimExpr) -> tvm.tirx.PrimFunc:
    """The layout kernel ``x [B, ., H, W]`` -> ``[B, channels, sh, sw, rows, row]``: plane ``(qr,
    qc)`` holds the padded image's ``(r*sh + qr, c*sw + qc)`` at ``(r, c)``, ``value(b, c, row,
    col)`` inside the image and ``fill`` elsewhere. Each row phase is scheduled as
    :func:`padded_phases`' rows are, its interior rows found among its own."""
    from tvm.s_tir import Schedule

    batch, _, height, width = (int(d) for d in x.shape)
    (top, left, _, _), (sh, sw) = pads, strides

    def element(b, c, qr, qc, r, col):
        image_row, image_col = r * sh + qr - top, col * sw + qc - left
        inside = tirx.all(image_row >= 0, image_row < height, image_col >= 0, image_col < width)
        return tirx.if_then_else(inside, value(b, c, image_row, image_col), fill)

    out = te.compute((batch, channels, sh, sw, rows, row), element, name="out")
    sch = Schedule(te.create_prim_func([x, out]))
    b, c, qr, qc, r, _ = sch.get_loops(sch.get_sblock("out"))
    sch.reorder(qr, r, qc)
    sch.parallel(sch.fuse(b, c))
    phases = sch.loop_partition(qr, [1] * (sh - 1) + [None]) if sh > 1 else [qr]
    for phase, loop in enumerate(phases):
        first, end = -(-(top - phase) // sh), -(-(top + height - phase) // sh)
        first, end = max(0, first), min(rows, end)
        if end > first:
            rows_loop = sch.get_loops(sch.get_child_blocks(loop)[0])[-3]
            vectorize_interior(sch, rows_loop, (first, left), (end - first, width), sw, row)
    return opaque(sch)


def vectorize_interior(sch, rows, top_left: tuple[int, int], image_hw: tuple[int, int], stride: int,
                       out_width: int) -> None:
    """For a layout block over ``[..., h, q, v]`` (``rows`` its ``h`` loop) whose image occupies
    rows ``[top, top + H)`` and, at phase ``q``, the columns ``v`` with ``0 <= v*s + q - left < W``:
    partition the padding off and vectorize the interior."""
    (top, left), (height, width) = top_left, image_hw
    interior_rows = _middle(sch, rows, top, top + height, sch.get(rows).extent.value)
    phase_loops = [sch.get_loops(block)[-2] for block in sch.get_child_blocks(interior_rows)]  # [..., q, v]
    if stride > 1:
        phase_loops = sch.loop_partition(phase_loops[0], [1] * (stride - 1) + [None])
    for phase, loop in enumerate(phase_loops):
        columns = sch.get_loops(sch.get_child_blocks(loop)[0])[-1]
        first = max(0, -(-(left - phase) // stride))
        end = min(out_width, -(-(width + left - phase) // stride))
        if end > first:
            sch.vectorize(_middle(sch, columns, first, end, out_width))


def _middle(sch, loop, start: int, end: int, extent: int):
    """Partition ``loop`` (``0 <= i < extent``) at ``start`` and ``end``; the loop over ``[start, end)``."""
    factors = ([start] if start else []) + ([end - start] if end < extent else [])
    if not factors:
        return loop
    return sch.loop_partition(loop, factors + [None])[1 if start else 0]
