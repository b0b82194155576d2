"""ONNX ops that are a few IR ops: built here from existing ones, so that every target runs
them without a kernel of their own."""
from __future__ import annotations

from .from_onnx import _attr, converts


@converts("LRN")
def _lrn(ctx, node, inputs):
    """Local response normalization across channels (AlexNet, Inception v1, ZFNet):
    y = x / (bias + alpha / size * sum of x^2 over the ``size`` channels around c) ^ beta, the window
    reaching floor((size - 1) / 2) channels down and ceil((size - 1) / 2) up, cut at the edges.
    The windowed sum is an average pool over channels of x^2 counting the zero padding (mean * size)."""
    x = inputs[0]
    size = int(_attr(node, "size"))
    alpha, beta, bias = (float(_attr(node, k, d)) for k, d in (("alpha", 1e-4), ("beta", 0.75), ("bias", 1.0)))
    n, c, *spatial = x.shape
    squares = ctx.emit1("mul", [x, x])
    positions = 1
    for d in spatial:
        positions *= d
    stacked = ctx.reshape(squares, [n, 1, c, positions])  # channels as a spatial axis of a 2-D pool
    down, up = (size - 1) // 2, size - 1 - (size - 1) // 2
    mean = ctx.emit1("avg_pool2d", [stacked], {"kernel": [size, 1], "strides": [1, 1], "dilations": [1, 1],
                                                "pads": [down, 0, up, 0], "count_include_pad": True})
    scaled = ctx.emit1("mul", [ctx.reshape(mean, list(x.shape)), ctx.scalar_like(alpha, x.type)])
    denominator = ctx.emit1("pow", [ctx.emit1("add", [scaled, ctx.scalar_like(bias, x.type)]),
                                    ctx.scalar_like(beta, x.type)])
    return ctx.emit1("div", [x, denominator])
