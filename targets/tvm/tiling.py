"""Pieces shared by the hand-written kernels: a register tile of accumulators with the epilogue
applied on the tile, the row-wise window schedule (pooling, depthwise), the scheduled function
marked opaque for Relax, and im2col indexing."""
from __future__ import annotations

from collections.abc import Callable

import tvm
from tvm import te, tirx

LANES = 16  # 32-bit lanes of an AVX-512 vector


def padded(size: int, multiple: int) -> int:
    return -(-size // multiple) * multiple


def accumulate_in_registers(sch, accumulate, tile_loop, unrolled) -> "tvm.s_tir.SBlockRV":
    """Accumulators in registers for one tile; the epilogue reads them there and stores once."""
    copy_out = sch.cache_write(accumulate, 0, "local")
    sch.compute_inline(copy_out)  # the epilogue reads the accumulators directly
    epilogue = sch.get_sblock("out")
    sch.reverse_compute_at(epilogue, tile_loop)
    for loop in unrolled:
        sch.unroll(loop)
    return epilogue


def finalize(sch, epilogue) -> tvm.tirx.PrimFunc:
    try:
        sch.vectorize(sch.get_loops(epilogue)[-1])
    except Exception:  # noqa: BLE001  a tail predicate the vectorizer cannot take: scalar stores
        pass
    return opaque(sch)


def opaque(sch) -> tvm.tirx.PrimFunc:
    """The scheduled function, named by the Relax module, never fused with its neighbours."""
    return mark_opaque(sch.mod["main"])


def mark_opaque(func: tvm.tirx.PrimFunc) -> tvm.tirx.PrimFunc:
    """A scheduled (or hand-written) function as :func:`opaque` returns it."""
    func = func.without_attr("global_symbol")
    return func.with_attrs({"tirx.is_scheduled": True, "op_pattern": 8})  # 8: kOpaque


def pick(extent: int, choices: tuple[int, ...]) -> int:
    return next(c for c in choices if extent % c == 0)


MAX_ACCUMULATORS = 28  # of 32 vector registers: the rest hold the streamed operand and the broadcast
# rows of a dense register tile (the first dividing M), times 2 vectors of 16 columns: 16 of the
# 32 registers accumulate; 8 rows over 4 took a linear of MiniLM's (128 x 384 x 1536) from 355
# to 420-455 GFLOP/s in float32 and from 1.19 to 1.65 int8 TOP/s with VNNI on a 2-core AVX-512
# EPYC (bench/RESULTS.md), fewer broadcasts per FMA and more latency hidden
DENSE_ROWS = (8, 6, 4, 7, 5, 3, 2, 1)
NARROW_DENSE_ROWS = (4, 6, 8, 7, 5, 3, 2, 1)  # without AVX-512 a 16-lane vector takes two of 16 registers


def row_tile(channels: int, strips: int, max_accumulators: int = MAX_ACCUMULATORS) -> tuple[int, int]:
    """(output channels, 16-wide strips) per register tile of a convolution over output rows:
    the pair that divides both extents, fits the registers, and reuses loads best (each strip
    load feeds ``rows`` instructions, each broadcast weight ``strips`` of them)."""
    options = [(r, s) for r in range(1, max_accumulators + 1) if channels % r == 0 for s in range(1, strips + 1)
               if strips % s == 0 and r * s <= max_accumulators]
    return max(options, key=lambda rs: (rs[0] * rs[1] / (rs[0] + rs[1]), rs[1]))


def tile_dense(sch, m: int, n_padded: int, k_group: int | None = None,
               row_choices: tuple[int, ...] = DENSE_ROWS, block_choices: tuple[int, ...] = (2, 1)) -> tuple:
    """Block ``C`` over loops ``[i, j, k]`` (``j`` the 16-lane axis) in register tiles of
    ``rows x 16*blocks`` accumulators (the first of the choices dividing the extents), the whole
    reduction inside a tile, tiles in parallel; with ``k_group``, ``k`` is split so that the
    innermost ``k_group`` go with the lanes (a dot-product instruction). Returns the block, its
    epilogue, the reduction loop to decompose at, and the lane loop (to vectorize or tensorize)."""
    block = sch.get_sblock("C")
    i, j, k = sch.get_loops(block)
    rows, blocks = pick(m, row_choices), pick(n_padded // LANES, block_choices)
    i_outer, i_inner = sch.split(i, [None, rows])
    j_outer, j_mid, j_inner = sch.split(j, [None, blocks, LANES])
    k_inner = []
    if k_group:
        k, grouped = sch.split(k, [None, k_group])
        k_inner = [grouped]
    sch.reorder(j_outer, i_outer, k, i_inner, j_mid, j_inner, *k_inner)
    tile = sch.fuse(j_outer, i_outer)
    sch.parallel(tile)
    return block, accumulate_in_registers(sch, block, tile, (i_inner, j_mid)), k, j_inner


MIN_PARALLEL_TILES = 16  # parallel tasks a row-major dense tile loop keeps for load balance


def tile_dense_by_rows(sch, m: int, n_padded: int, row_choices: tuple[int, ...], k_group: int | None = None) -> tuple:
    """:func:`tile_dense` with one 16-column block per tile and the row tiles outermost: each
    parallel task owns ``rows`` rows and sweeps a chunk of the column blocks with them, so that
    work done once per row tile (widening the rows: :func:`x86_int8.dense_u8s8` on AVX2) is
    shared by every column block, and the rows stay in L1 while the weights stream. The columns
    are cut into as few chunks as keep :data:`MIN_PARALLEL_TILES` tasks (one row of a batch-1
    head still spreads over the cores). ``C``'s loops are ``[i, j, k]`` with ``k`` split by
    ``k_group``, or ``[i, j, *reductions]`` whose last goes with the lanes. Returns as
    :func:`tile_dense`, then the task loop."""
    block = sch.get_sblock("C")
    i, j, *reductions = sch.get_loops(block)
    if k_group:
        reductions = sch.split(reductions[0], [None, k_group])
    rows, blocks = pick(m, row_choices), n_padded // LANES
    chunks = next(d for d in range(1, blocks + 1) if blocks % d == 0 and (m // rows * d >= MIN_PARALLEL_TILES
                                                                           or d == blocks))
    i_outer, i_inner = sch.split(i, [None, rows])
    j_chunk, j_outer, j_inner = sch.split(j, [chunks, None, LANES])
    sch.reorder(i_outer, j_chunk, j_outer, *reductions[:-1], i_inner, j_inner, reductions[-1])
    task = sch.fuse(i_outer, j_chunk)
    sch.parallel(task)
    return block, accumulate_in_registers(sch, block, j_outer, (i_inner,)), reductions[0], j_inner, task


def tile_rows(sch, out_channels: int, out_width_padded: int, inner_reductions: int = 0,
              max_accumulators: int = MAX_ACCUMULATORS) -> tuple:
    """Block ``C`` of a convolution over loops ``[b, o, y, x, *reductions]`` (``x`` the output row,
    padded to 16-wide strips) in register tiles of :func:`row_tile` channels times strips, all
    reductions inside a tile except the last ``inner_reductions``, which go with the lanes.
    Returns as :func:`tile_dense`."""
    block = sch.get_sblock("C")
    b, o, y, x, *reductions = sch.get_loops(block)
    outer, inner = reductions[:len(reductions) - inner_reductions], reductions[len(reductions) - inner_reductions:]
    rows, strips = row_tile(out_channels, out_width_padded // LANES, max_accumulators)
    o_outer, o_inner = sch.split(o, [None, rows])
    x_outer, x_mid, x_inner = sch.split(x, [None, strips, LANES])
    sch.reorder(b, o_outer, y, x_outer, *outer, o_inner, x_mid, x_inner, *inner)
    tile = sch.fuse(b, o_outer, y, x_outer)
    sch.parallel(tile)
    return block, accumulate_in_registers(sch, block, tile, (o_inner, x_mid)), outer[0], x_inner


def im2col_element(x: te.Tensor, b, p, col, kernel: tuple[int, int], strides: tuple[int, int],
                   dilations: tuple[int, int], pads: tuple[int, int, int, int], out_hw: tuple[int, int],
                   convert: Callable[[tirx.PrimExpr], tirx.PrimExpr], fill: tirx.PrimExpr) -> tirx.PrimExpr:
    """The im2col matrix of ``x [B, C, H, W]`` at output position ``p`` and column ``col = (c, i, j)``:
    ``convert(x[b, c, y*sy + i*dy - top, x*sx + j*dx - left])``, and ``fill`` where the window
    leaves the image or ``p`` and ``col`` are past the matrix (padding rows and columns)."""
    (kh, kw), (sh, sw), (dh, dw), (top, left, _, _), (oh, ow) = kernel, strides, dilations, pads, out_hw
    _, channels, height, width = x.shape
    c, tap = col // (kh * kw), col % (kh * kw)
    h, v = p // ow * sh + tap // kw * dh - top, p % ow * sw + tap % kw * dw - left
    inside = tirx.all(p < oh * ow, col < channels * kh * kw, h >= 0, h < height, v >= 0, v < width)
    return tirx.if_then_else(inside, convert(x[b, c, h, v]), fill)


WINDOW_ACCUMULATORS = 8  # vectors of outputs a window-row tile keeps in registers


def tile_window_rows(sch, lanes: int, intrinsic: str | None = None) -> tvm.tirx.PrimFunc:
    """Schedule a window reduction ``C`` over loops ``[b, c, y, v, *reductions]`` (one output
    channel per tile, its rows in strips of ``lanes``, the window's reductions outside the strips
    so that each strip stays in a register; narrow rows several to a tile, so that a tile's fixed
    costs weigh less) with its epilogue ``out``; the scheduled function. The strips are
    vectorized, or, with ``intrinsic``, tensorized together with the last reduction."""
    block = sch.get_sblock("C")
    b, ch, y, v, *reductions = sch.get_loops(block)
    outside, inside = (reductions[:-1], reductions[-1:]) if intrinsic else (reductions, [])
    height, width = (sch.get(loop).extent.value for loop in (y, v))
    strips_per_row = width // lanes
    # a row wider than the accumulators (a 320-pixel image, a text line) is cut into pieces
    # of whole strips, each a tile of its own: the largest divisor that fits
    piece = max(d for d in range(1, min(strips_per_row, WINDOW_ACCUMULATORS) + 1) if strips_per_row % d == 0)
    rows = max(r for r in range(1, height + 1) if height % r == 0 and r * piece <= WINDOW_ACCUMULATORS)
    y_outer, y_inner = sch.split(y, [None, rows])
    pieces, strips, vector = sch.split(v, [None, piece, lanes])
    sch.reorder(b, ch, y_outer, pieces, *outside, y_inner, strips, vector, *inside)
    tile = sch.fuse(b, ch, y_outer, pieces)
    sch.parallel(tile)
    epilogue = accumulate_in_registers(sch, block, tile, (*outside, y_inner, strips))
    if intrinsic:  # the intrinsic's body has no init: decompose first
        sch.decompose_reduction(block, outside[0])
        sch.tensorize(vector, intrinsic)
    else:  # a vector loop must be vectorized while the block is still a whole reduction
        sch.vectorize(vector)
        sch.decompose_reduction(block, outside[0])
    return finalize(sch, epilogue)
