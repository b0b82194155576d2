"""ONNX's RoiAlign from gathers and arithmetic: every sample point's coordinates are computed
from the run-time boxes (the sample grid per bin is fixed once ``sampling_ratio`` is), its four
neighbours gathered from the feature map, blended bilinearly and pooled per bin."""
from __future__ import annotations

import numpy as np

from ..errors import QCompilerError
from .from_onnx import _attr, converts
from .onnx_composites import Arithmetic


def _sample_axis(a: Arithmetic, start, length, bins: int, grid: int, size: int):
    """One axis's sample coordinates [R, bins * grid] for boxes starting at ``start`` [R, 1] of
    ``length`` [R, 1]: the low and high neighbours, the weight of the high one, and whether the
    sample lies within one pixel of the map (others weigh 0), as the reference computes them."""
    ctx = a.ctx
    fractions = (np.arange(bins)[:, None] + (np.arange(grid)[None, :] + 0.5) / grid).reshape(1, -1)
    at = a.add(start, a.mul(ctx.const(fractions.astype(np.float32), "sample_fractions"), a.div(length, float(bins))))
    valid = ctx.emit1("logical_and", [a.greater_equal(at, -1.0), a.less_equal(at, float(size))])
    at = a.maximum(at, 0.0)
    low = a.floor(at)
    last = a.greater_equal(low, float(size - 1))
    low = a.where(last, a._v(size - 1), low)
    high = a.where(last, a._v(size - 1), a.add(low, 1.0))
    at = a.where(last, low, at)
    return low, high, a.sub(at, low), valid


@converts("RoiAlign")
def _roi_align(ctx, node, inputs):
    """[R, C, out_h, out_w]: each box (x1, y1, x2, y2, scaled by spatial_scale, shifted by half a
    pixel in half_pixel mode) cut into out_h x out_w bins, each bin the average (or max) of
    sampling_ratio^2 bilinear samples. An adaptive grid (sampling_ratio 0) depends on the box
    sizes at run time: refused."""
    x, rois, batch = inputs
    n, c, h, w = x.shape
    ratio = int(_attr(node, "sampling_ratio", 0))
    if ratio <= 0:
        raise QCompilerError(f"RoiAlign '{node.name}': sampling_ratio 0 (a grid sized by each box at run time) is not "
                             f"supported; export with a fixed sampling_ratio")
    mode = _attr(node, "mode", "avg")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    transform = _attr(node, "coordinate_transformation_mode", "half_pixel" if ctx.opset >= 16 else "output_half_pixel")
    transform = transform.decode() if isinstance(transform, bytes) else transform
    out_h, out_w = int(_attr(node, "output_height", 1)), int(_attr(node, "output_width", 1))
    scale = float(_attr(node, "spatial_scale", 1.0))
    a = Arithmetic(ctx, rois)
    r = rois.shape[0]
    boxes = a.sub(a.mul(ctx.cast(rois, x.dtype), scale), 0.5 if transform == "half_pixel" else 0.0)

    def column(i: int):
        return ctx.emit1("slice", [boxes], {"starts": [i], "ends": [i + 1], "axes": [1], "steps": [1]})  # [R, 1]

    x1, y1, x2, y2 = (column(i) for i in range(4))
    width, height = a.sub(x2, x1), a.sub(y2, y1)
    if transform != "half_pixel":  # legacy: malformed boxes forced to 1x1
        width, height = a.maximum(width, 1.0), a.maximum(height, 1.0)
    y_low, y_high, ly, y_ok = _sample_axis(a, y1, height, out_h, ratio, h)
    x_low, x_high, lx, x_ok = _sample_axis(a, x1, width, out_w, ratio, w)
    sy, sx = out_h * ratio, out_w * ratio
    pixels = ctx.reshape(ctx.emit1("transpose", [x], {"perm": [0, 2, 3, 1]}), [n * h * w, c])
    base = a.mul(ctx.cast(ctx.reshape(batch, [r, 1, 1]), x.dtype), float(h * w))

    def corner(rows, cols, weight):
        """weight [R, sy, sx] times the pixels at (rows, cols): [R, sy, sx, C]."""
        flat = a.add(base, a.add(a.mul(ctx.reshape(rows, [r, sy, 1]), float(w)), ctx.reshape(cols, [r, 1, sx])))
        taken = ctx.emit1("gather", [pixels, ctx.cast(flat, "i64")], {"axis": 0})
        return a.mul(taken, ctx.reshape(weight, [r, sy, sx, 1]))

    inside = ctx.cast(ctx.emit1("logical_and", [ctx.reshape(y_ok, [r, sy, 1]), ctx.reshape(x_ok, [r, 1, sx])]), x.dtype)
    hy, hx = a.sub(1.0, ly), a.sub(1.0, lx)

    def outer(u, v):
        return a.mul(a.mul(ctx.reshape(u, [r, sy, 1]), ctx.reshape(v, [r, 1, sx])), inside)

    terms = [corner(y_low, x_low, outer(hy, hx)), corner(y_low, x_high, outer(hy, lx)),
             corner(y_high, x_low, outer(ly, hx)), corner(y_high, x_high, outer(ly, lx))]
    if mode == "avg":
        samples = a.add(a.add(terms[0], terms[1]), a.add(terms[2], terms[3]))
        reduce = "reduce_mean"
    elif mode == "max":  # the reference: the largest weighted corner, then the largest sample
        samples = a.maximum(a.maximum(terms[0], terms[1]), a.maximum(terms[2], terms[3]))
        reduce = "reduce_max"
    else:
        raise QCompilerError(f"RoiAlign '{node.name}': mode '{mode}' is not supported (avg, max)")
    binned = ctx.emit1(reduce, [ctx.reshape(samples, [r, out_h, ratio, out_w, ratio, c])], {"axes": [2, 4],
                                                                                               "keepdims": False})
    return ctx.emit1("transpose", [binned], {"perm": [0, 3, 1, 2]})
