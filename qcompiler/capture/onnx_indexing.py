"""ONNX ops that select or place elements by position, built from gathers and scatters once
the positions' count is known at import (static shapes)."""
from __future__ import annotations

import math

import numpy as np

from ..errors import QCompilerError
from .from_onnx import _attr, converts


@converts("Compress")
def _compress(ctx, node, inputs):
    """The slices along ``axis`` (of the flattened input when no axis is given) whose condition
    is true: a gather of the true positions. The condition decides the result's shape, so it must
    be known at import (given with ``input_values`` when it is a graph input); a condition
    shorter than the axis leaves the rest out."""
    x, condition = inputs
    keep = np.asarray(ctx.const_input(condition, node, "condition (it decides the result's shape)")).reshape(-1)
    axis = _attr(node, "axis", None)
    if axis is None:
        x, axis = ctx.reshape(x, [math.prod(x.shape)]), 0
    axis = int(axis) % x.type.rank
    if keep.size > x.shape[axis]:
        raise QCompilerError(f"Compress '{node.name}': condition has {keep.size} entries for an axis of "
                             f"{x.shape[axis]}")
    return ctx.emit1("gather", [x, ctx.const(np.flatnonzero(keep).astype(np.int64), "compress_positions")],
                     {"axis": axis})


@converts("MaxUnpool")
def _max_unpool(ctx, node, inputs):
    """MaxPool's inverse: each value written at its flat position ``indices`` (MaxPool's, over
    the whole tensor: batch and channel included) of a zero tensor of the shape kernel, strides
    and pads give (a 1-D scatter), then zeros added at the ends up to ``output_shape`` when given."""
    x, indices = inputs[0], inputs[1]
    rank = x.type.rank - 2
    kernel = list(_attr(node, "kernel_shape"))
    strides = list(_attr(node, "strides", [1] * rank))
    pads = list(_attr(node, "pads", [0] * (2 * rank)))
    shape = list(x.shape[:2]) + [(x.shape[2 + i] - 1) * strides[i] + kernel[i] - pads[i] - pads[i + rank]
                                 for i in range(rank)]
    zeros = ctx.const(np.zeros(math.prod(shape), x.type.np_dtype), "unpool_zeros")
    flat = ctx.emit1("scatter_elements", [zeros, ctx.reshape(ctx.cast(indices, "i64"), [math.prod(indices.shape)]),
                                          ctx.reshape(x, [math.prod(x.shape)])], {"axis": 0})
    y = ctx.reshape(flat, shape)
    if len(inputs) < 3 or inputs[2] is None:
        return y
    wanted = [int(d) for d in ctx.const_input(inputs[2], node, "output_shape")]
    if len(wanted) != len(shape) or any(w < s for w, s in zip(wanted, shape)):
        raise QCompilerError(f"MaxUnpool '{node.name}': output_shape {wanted} is smaller than the unpooled {shape}")
    return ctx.emit1("pad", [y], {"pads": [0] * len(shape) + [w - s for w, s in zip(wanted, shape)]})


def max_pool_indices(ctx, x, pooled, attrs: dict, storage_order: int):
    """MaxPool's Indices output: where each window's (first) maximum is, as a flat index over the
    whole input (batch and channel included; within a plane row-major, or column-major with
    ``storage_order`` 1). Each window's elements are gathered at constant positions (those in the
    padding masked to -inf), argmax picks one, and a one-hot product maps it to its position."""
    n, c, *size = x.shape
    out = pooled.shape[2:]
    offsets = np.stack(np.meshgrid(*[np.arange(k) * d for k, d in zip(attrs["kernel"], attrs["dilations"])],
                                   indexing="ij"), -1).reshape(-1, len(size))  # [K, rank]
    starts = np.stack(np.meshgrid(*[np.arange(o) * s - p for o, s, p in zip(out, attrs["strides"], attrs["pads"])],
                                  indexing="ij"), -1).reshape(-1, len(size))  # [P, rank]
    coords = starts[:, None, :] + offsets[None, :, :]  # [P, K, rank]
    inside = np.all((coords >= 0) & (coords < np.asarray(size)), axis=-1)
    coords = np.clip(coords, 0, np.asarray(size) - 1)
    row_major = np.ravel_multi_index(tuple(np.moveaxis(coords, -1, 0)), size)
    stored = row_major if not storage_order else np.ravel_multi_index(tuple(np.moveaxis(coords, -1, 0)[::-1]), size[::-1])
    plane = int(np.prod(size))
    windows = ctx.emit1("gather", [ctx.reshape(x, [n, c, plane]), ctx.const(row_major.astype(np.int64), "window")],
                        {"axis": 2})  # [N, C, P, K]
    lowest = ctx.const(np.asarray(-np.inf if x.type.np_dtype.kind == "f" else np.iinfo(x.type.np_dtype).min,
                                  x.type.np_dtype), "lowest")
    windows = ctx.emit1("where", [ctx.const(inside, "in_window"), windows, lowest])
    first = ctx.emit1("argmax", [windows], {"axis": 3, "keepdims": True})  # [N, C, P, 1]
    chosen = ctx.emit1("equal", [first, ctx.const(np.arange(offsets.shape[0], dtype=np.int64), "window_slot")])
    within = ctx.emit1("reduce_sum", [ctx.emit1("mul", [ctx.cast(chosen, "i64"), ctx.const(stored.astype(np.int64),
                                                                                           "position")])],
                       {"axes": [3], "keepdims": False})  # [N, C, P]
    base = (np.arange(n * c, dtype=np.int64) * plane).reshape(n, c, 1)
    return ctx.reshape(ctx.emit1("add", [within, ctx.const(base, "plane_start")]), [n, c, *out])


def _crop_resize_matrix(n: int, m: int, start: float, end: float, mode: str, rounding: str) -> tuple[np.ndarray, np.ndarray]:
    """The [m, n] interpolation matrix of one axis under tf_crop_and_resize (output o reads
    start (n - 1) + o (end - start) (n - 1) / (m - 1)), and which outputs fall outside the input."""
    o = np.arange(m, dtype=np.float64)
    x = start * (n - 1) + o * (end - start) * (n - 1) / (m - 1) if m > 1 else np.full(m, 0.5 * (start + end) * (n - 1))
    outside = (x < 0) | (x > n - 1)
    x = np.clip(x, 0, n - 1)
    matrix = np.zeros((m, n))
    if mode == "nearest":
        picked = {"floor": np.floor(x), "ceil": np.ceil(x), "round_prefer_ceil": np.floor(x + 0.5)}.get(rounding,
                                                                                                     np.ceil(x - 0.5))
        matrix[np.arange(m), np.clip(picked, 0, n - 1).astype(int)] = 1
    else:
        low = np.floor(x).astype(int)
        high = np.minimum(low + 1, n - 1)
        np.add.at(matrix, (np.arange(m), low), 1 - (x - low))
        np.add.at(matrix, (np.arange(m), high), x - low)
    matrix[outside] = 0
    return matrix, outside


def crop_and_resize(ctx, x, roi: np.ndarray, size: list[int], mode: str, rounding: str, extrapolation: float):
    """Resize with tf_crop_and_resize: the region ``roi`` ([starts..., ends...] of the 4 axes,
    normalized) of each NCHW image sampled on an [H', W'] grid, nearest or bilinear, as
    A_h X A_w^T with constant interpolation matrices; samples outside the image get
    ``extrapolation``."""
    if mode not in ("nearest", "linear"):
        raise QCompilerError(f"tf_crop_and_resize with mode '{mode}' is not supported (nearest, linear)")
    starts, ends = roi[:4], roi[4:]
    (a_h, out_h), (a_w, out_w) = (_crop_resize_matrix(x.shape[2 + i], size[i], float(starts[2 + i]),
                                                      float(ends[2 + i]), mode, rounding) for i in range(2))
    dtype = x.type.np_dtype
    rows = ctx.emit1("matmul", [x, ctx.const(a_w.T.astype(dtype), "resize_columns")])
    y = ctx.emit1("matmul", [ctx.const(a_h.astype(dtype), "resize_rows"), rows])
    outside = out_h[:, None] | out_w[None, :]
    if not outside.any():
        return y
    return ctx.emit1("where", [ctx.const(outside, "outside"), ctx.const(np.asarray(extrapolation, dtype), "extrapolation"),
                               y])
