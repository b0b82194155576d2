"""ONNX ops that are a few IR ops: built here from existing ones, so that every target runs
them without a kernel of their own."""
from __future__ import annotations

import math

import numpy as np

from ..errors import QCompilerError
from .builder import AVG_POOL
from .from_onnx import _attr, converts, pool_window


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
    stacked = ctx.reshape(squares, [n, 1, c, math.prod(spatial)])  # channels as a spatial axis of a 2-D pool
    down, up = (size - 1) // 2, size - 1 - (size - 1) // 2
    mean = ctx.emit1("avg_pool2d", [stacked], {"kernel": [size, 1], "strides": [1, 1], "dilations": [1, 1],
                                                "pads": [down, 0, up, 0], "count_include_pad": True})
    scaled = ctx.emit1("mul", [ctx.reshape(mean, list(x.shape)), ctx.scalar_like(alpha, x.type)])
    denominator = ctx.emit1("pow", [ctx.emit1("add", [scaled, ctx.scalar_like(bias, x.type)]),
                                    ctx.scalar_like(beta, x.type)])
    return ctx.emit1("div", [x, denominator])


@converts("LpPool")
def _lp_pool(ctx, node, inputs):
    """(sum of |x|^p over the window)^(1/p), padding counting as zeros: the window's average of
    |x|^p with the padding counted, times the window's size (the standard's own definition)."""
    x = inputs[0]
    p = _attr(node, "p", 2)
    attrs = {**pool_window(node, x), "count_include_pad": True}
    powered = ctx.emit1("mul", [x, x]) if p == 2 else \
        ctx.emit1("pow", [ctx.emit1("abs", [x]), ctx.scalar_like(p, x.type)])
    total = ctx.emit1("mul", [ctx.emit1(AVG_POOL[x.type.rank - 2], [powered], attrs),
                              ctx.scalar_like(int(np.prod(attrs["kernel"])), x.type)])
    return ctx.emit1("sqrt", [total]) if p == 2 else ctx.emit1("pow", [total, ctx.scalar_like(1 / p, x.type)])


@converts("LpNormalization")
def _lp_normalization(ctx, node, inputs):
    """x / (sum of |x|^p along ``axis``)^(1/p), p 1 or 2, and 0 where that norm is 0 (as the
    ONNX reference and ONNX Runtime give, not NaN)."""
    x = inputs[0]
    p, axis = _attr(node, "p", 2), _attr(node, "axis", -1) % x.type.rank
    if p not in (1, 2):
        raise QCompilerError(f"LpNormalization '{node.name}': p={p} (the standard allows 1 and 2)")
    powered = ctx.emit1("mul", [x, x]) if p == 2 else ctx.emit1("abs", [x])
    total = ctx.emit1("reduce_sum", [powered], {"axes": [axis], "keepdims": True})
    norm = ctx.emit1("sqrt", [total]) if p == 2 else total
    zero = ctx.scalar_like(0, x.type)
    return ctx.emit1("where", [ctx.emit1("equal", [norm, zero]), zero, ctx.emit1("div", [x, norm])])


def _flip(ctx, x, axis: int):
    n = x.shape[axis]
    return ctx.emit1("slice", [x], {"starts": [n - 1], "ends": [-n - 1], "axes": [axis], "steps": [-1]})


def _shift_in_ones(ctx, x, axis: int, count: int):
    """x moved ``count`` places up ``axis``, ones filling the start and the end cut off."""
    n, rank = x.shape[axis], x.type.rank
    kept = ctx.emit1("slice", [x], {"starts": [0], "ends": [n - count], "axes": [axis], "steps": [1]})
    pads = [0] * (2 * rank)
    pads[axis] = count
    return ctx.emit1("pad", [kept], {"pads": pads, "value": 1.0})


@converts("CumProd")
def _cumprod(ctx, node, inputs):
    """A running product along a static axis by doubling (Hillis-Steele): after step k each
    position holds the product of the 2^k values ending at it, so log2(n) multiplies by a copy
    shifted in with ones. Exact for integers (wrapping as a sequential product would); floats
    multiply in another order. exclusive shifts in one 1 first; reverse runs on the flipped axis."""
    x = inputs[0]
    axis = int(ctx.const_input(inputs[1], node, "axis")) % x.type.rank
    n = x.shape[axis]
    reverse = bool(_attr(node, "reverse", 0))
    y = _flip(ctx, x, axis) if reverse else x
    if _attr(node, "exclusive", 0) and n:
        y = _shift_in_ones(ctx, y, axis, 1)
    step = 1
    while step < n:
        y = ctx.emit1("mul", [y, _shift_in_ones(ctx, y, axis, step)])
        step *= 2
    return _flip(ctx, y, axis) if reverse else y


def _scalar(ctx, value: float, like):
    return ctx.scalar_like(value, like.type)


class Arithmetic:
    """Elementwise arithmetic on IR values, Python numbers becoming constants of ``like``'s dtype."""

    def __init__(self, ctx, like):
        self.ctx, self.like = ctx, like

    def _v(self, a):
        return a if hasattr(a, "type") else _scalar(self.ctx, float(a), self.like)

    def __getattr__(self, op: str):  # add, sub, mul, div, sqrt, pow, where, greater, ...
        return lambda *args: self.ctx.emit1(op, [self._v(a) for a in args])


def _positions(ctx, count: int, axis: int, rank: int):
    """0, 1, ..., count - 1 along ``axis`` of a rank-``rank`` constant (1 on every other axis)."""
    return ctx.const(np.arange(count, dtype=np.int64).reshape([-1 if i == axis else 1 for i in range(rank)]),
                     "positions")


@converts("BitShift")
def _bit_shift(ctx, node, inputs):
    return ctx.emit1("shift_left" if _attr(node, "direction") == "LEFT" else "shift_right", inputs)


def _swish(ctx, x, alpha: float):
    """x * sigmoid(alpha * x): ``silu`` for alpha 1 (which fuse-activations folds into a producer)."""
    if alpha == 1.0:
        return ctx.emit1("silu", [x])
    return ctx.emit1("mul", [x, ctx.emit1("sigmoid", [ctx.emit1("mul", [x, _scalar(ctx, alpha, x)])])])


@converts("Swish")
def _swish_op(ctx, node, inputs):
    """Swish (opset 24): x * sigmoid(alpha * x)."""
    return _swish(ctx, inputs[0], float(_attr(node, "alpha", 1.0)))


@converts("SwiGLU")
def _swiglu(ctx, node, inputs):
    """SwiGLU (opset 28, the gated FFN of LLaMA-style models): swish_alpha(a) * b, a and b of one
    shape (the reference applies no broadcasting)."""
    a, b = inputs[0], inputs[1]
    if a.shape != b.shape or a.dtype != b.dtype:
        raise QCompilerError(f"SwiGLU '{node.name}': its two inputs must have one shape and dtype, got {a.type} "
                             f"and {b.type}")
    return ctx.emit1("mul", [_swish(ctx, a, float(_attr(node, "alpha", 1.0))), b])


@converts("Softsign")
def _softsign(ctx, node, inputs):
    """x / (1 + |x|)."""
    x = inputs[0]
    return ctx.emit1("div", [x, ctx.emit1("add", [ctx.emit1("abs", [x]), _scalar(ctx, 1, x)])])


@converts("Celu")
def _celu(ctx, node, inputs):
    """max(0, x) + min(0, alpha * (exp(x / alpha) - 1))."""
    x, alpha = inputs[0], float(_attr(node, "alpha", 1.0))
    negative = ctx.emit1("mul", [ctx.emit1("sub", [ctx.emit1("exp", [ctx.emit1("div", [x, _scalar(ctx, alpha, x)])]),
                                                   _scalar(ctx, 1, x)]), _scalar(ctx, alpha, x)])
    return ctx.emit1("add", [ctx.emit1("relu", [x]), ctx.emit1("minimum", [negative, _scalar(ctx, 0, x)])])


@converts("ThresholdedRelu")
def _thresholded_relu(ctx, node, inputs):
    """x where x > alpha, else 0."""
    x = inputs[0]
    above = ctx.emit1("greater", [x, _scalar(ctx, float(_attr(node, "alpha", 1.0)), x)])
    return ctx.emit1("where", [above, x, _scalar(ctx, 0, x)])


@converts("Shrink")
def _shrink(ctx, node, inputs):
    """x + bias below -lambd, x - bias above lambd, 0 between."""
    x = inputs[0]
    lambd, bias = float(_attr(node, "lambd", 0.5)), float(_attr(node, "bias", 0.0))
    upper = ctx.emit1("where", [ctx.emit1("greater", [x, _scalar(ctx, lambd, x)]),
                                ctx.emit1("sub", [x, _scalar(ctx, bias, x)]), _scalar(ctx, 0, x)])
    return ctx.emit1("where", [ctx.emit1("less", [x, _scalar(ctx, -lambd, x)]),
                               ctx.emit1("add", [x, _scalar(ctx, bias, x)]), upper])


@converts("Hardmax")
def _hardmax(ctx, node, inputs):
    """1 at the first maximum along ``axis``, 0 elsewhere: argmax compared with the positions.
    Before opset 13 the input is seen as a matrix [prod(shape[:axis]), prod(shape[axis:])]."""
    x = inputs[0]
    axis = int(_attr(node, "axis", -1 if ctx.opset >= 13 else 1)) % max(x.type.rank, 1)
    seen = x if ctx.opset >= 13 else ctx.reshape(x, [math.prod(x.shape[:axis]), math.prod(x.shape[axis:])])
    axis = axis if ctx.opset >= 13 else 1
    first = ctx.emit1("argmax", [seen], {"axis": axis, "keepdims": True})
    hit = ctx.emit1("equal", [first, _positions(ctx, seen.shape[axis], axis, seen.type.rank)])
    return ctx.reshape(ctx.cast(hit, x.dtype), x.shape)


@converts("DepthToSpace")
def _depth_to_space(ctx, node, inputs):
    """[N, C, H, W] -> [N, C/b², H·b, W·b]: the channel splits as (b, b, C/b²) in DCR mode and as
    (C/b², b, b) in CRD mode, and the two b axes interleave with H and W."""
    x, b = inputs[0], int(_attr(node, "blocksize"))
    n, c, h, w = x.shape
    if _attr(node, "mode", "DCR") == "CRD":
        split, perm = [n, c // (b * b), b, b, h, w], [0, 1, 4, 2, 5, 3]
    else:
        split, perm = [n, b, b, c // (b * b), h, w], [0, 3, 4, 1, 5, 2]
    moved = ctx.emit1("transpose", [ctx.reshape(x, split)], {"perm": perm})
    return ctx.reshape(moved, [n, c // (b * b), h * b, w * b])


@converts("SpaceToDepth")
def _space_to_depth(ctx, node, inputs):
    """[N, C, H, W] -> [N, C·b², H/b, W/b], the b×b block's offsets leading the channel (DCR mode)
    or following it (CRD mode)."""
    x, b = inputs[0], int(_attr(node, "blocksize"))
    n, c, h, w = x.shape
    perm = [0, 1, 3, 5, 2, 4] if _attr(node, "mode", "DCR") == "CRD" else [0, 3, 5, 1, 2, 4]
    moved = ctx.emit1("transpose", [ctx.reshape(x, [n, c, h // b, b, w // b, b])], {"perm": perm})
    return ctx.reshape(moved, [n, c * b * b, h // b, w // b])


def _normalized(ctx, x, axes: list[int], epsilon: float):
    """(x - mean) / sqrt(var + epsilon) over ``axes``, the variance biased (divided by the count)."""
    centered = ctx.emit1("sub", [x, ctx.emit1("reduce_mean", [x], {"axes": axes, "keepdims": True})])
    variance = ctx.emit1("reduce_mean", [ctx.emit1("mul", [centered, centered])], {"axes": axes, "keepdims": True})
    return ctx.emit1("div", [centered, ctx.emit1("sqrt", [ctx.emit1("add", [variance, _scalar(ctx, epsilon, x)])])])


@converts("InstanceNormalization")
def _instance_norm(ctx, node, inputs):
    """Each (sample, channel) normalized over its spatial positions, then scale[c]·y + bias[c]."""
    x, scale, bias = inputs
    y = _normalized(ctx, x, list(range(2, x.type.rank)), float(_attr(node, "epsilon", 1e-5)))
    per_channel = [x.shape[1]] + [1] * (x.type.rank - 2)
    return ctx.emit1("add", [ctx.emit1("mul", [y, ctx.reshape(scale, per_channel)]), ctx.reshape(bias, per_channel)])


@converts("MeanVarianceNormalization")
def _mean_variance_normalization(ctx, node, inputs):
    """(x - mean) / sqrt(var + 1e-9) over ``axes`` (default N, H, W), as ONNX's function body."""
    x = inputs[0]
    return _normalized(ctx, x, [int(a) for a in _attr(node, "axes", [0, 2, 3])], 1e-9)


@converts("EyeLike")
def _eye_like(ctx, node, inputs):
    """Ones on the k-th diagonal of a matrix shaped like the input: known at import from the shape."""
    from onnx.helper import tensor_dtype_to_np_dtype

    x = inputs[0]
    dtype = tensor_dtype_to_np_dtype(int(_attr(node, "dtype"))) if _attr(node, "dtype") is not None else x.type.np_dtype
    return ctx.const(np.eye(*x.shape, k=int(_attr(node, "k", 0)), dtype=dtype), "eye")


@converts("OneHot")
def _one_hot(ctx, node, inputs):
    """values[1] where the position along the new ``axis`` equals the index (negative indices count
    from ``depth``), values[0] elsewhere. ``depth`` must be known at import: it is a dimension."""
    indices, depth_v, values = inputs
    depth = int(ctx.const_input(depth_v, node, "depth").reshape(-1)[0])
    rank = indices.type.rank + 1
    axis = int(_attr(node, "axis", -1)) % rank
    idx = ctx.cast(indices, "i64") if indices.dtype != "f32" else ctx.cast(ctx.emit1("floor", [indices]), "i64")
    idx = ctx.emit1("where", [ctx.emit1("less", [idx, ctx.scalar_like(0, idx.type)]),
                              ctx.emit1("add", [idx, ctx.scalar_like(depth, idx.type)]), idx])
    idx = ctx.reshape(idx, indices.shape[:axis] + (1,) + indices.shape[axis:])
    hit = ctx.emit1("equal", [idx, _positions(ctx, depth, axis, rank)])
    off, on = (ctx.reshape(ctx.emit1("slice", [values], {"starts": [i], "ends": [i + 1], "axes": [0], "steps": [1]}), [])
               for i in (0, 1))
    return ctx.emit1("where", [hit, on, off])


@converts("ReverseSequence")
def _reverse_sequence(ctx, node, inputs):
    """Along ``time_axis``, the first lens[b] steps of batch b reversed, the rest kept: a gather whose
    source step is lens[b] - 1 - t for t < lens[b], else t."""
    x, lens = inputs
    time_axis = int(_attr(node, "time_axis", 0))  # batch_axis is the other of axes 0 and 1
    steps = x.shape[time_axis]
    t = ctx.const(np.arange(steps, dtype=np.int64).reshape([steps, 1] if time_axis == 0 else [1, steps]), "steps")
    n = ctx.reshape(ctx.cast(lens, "i64"), [1, lens.type.size] if time_axis == 0 else [lens.type.size, 1])
    source = ctx.emit1("where", [ctx.emit1("less", [t, n]),
                                 ctx.emit1("sub", [ctx.emit1("sub", [n, ctx.scalar_like(1, n.type)]), t]), t])
    rest = x.shape[2:]
    source = ctx.emit1("expand", [ctx.reshape(source, source.shape + (1,) * len(rest))], {"shape": x.shape})
    return ctx.emit1("gather_elements", [x, source], {"axis": time_axis})


def _negative_log_likelihood(ctx, node, log_prob, target, weight):
    """loss[n, d..] = -log_prob[n, target[n, d..], d..] · weight[target], 0 where target is
    ``ignore_index``; reduced by ``reduction``: none, sum, or mean (the sum over the sum of the
    weights that applied)."""
    reduction = _attr(node, "reduction", "mean")
    ignore = _attr(node, "ignore_index")
    target = ctx.cast(target, "i64")
    kept = None
    if ignore is not None:
        kept = ctx.emit1("logical_not", [ctx.emit1("equal", [target, ctx.scalar_like(int(ignore), target.type)])])
        target = ctx.emit1("where", [kept, target, ctx.scalar_like(0, target.type)])
    picked = ctx.emit1("gather_elements", [log_prob, ctx.reshape(target, target.shape[:1] + (1,) + target.shape[1:])],
                       {"axis": 1})
    loss = ctx.emit1("neg", [ctx.reshape(picked, target.shape)])
    applied = ctx.emit1("gather", [weight, target], {"axis": 0}) if weight is not None else None
    if kept is not None:
        mask = ctx.cast(kept, log_prob.dtype)
        applied = mask if applied is None else ctx.emit1("mul", [applied, mask])
    if applied is not None:
        loss = ctx.emit1("mul", [loss, applied])
    if reduction == "none":
        return loss
    total = ctx.emit1("reduce_sum", [loss], {"axes": [], "keepdims": False})
    if reduction == "sum":
        return total
    if applied is None:
        return ctx.emit1("div", [total, ctx.scalar_like(max(target.type.size, 1), total.type)])
    return ctx.emit1("div", [total, ctx.emit1("reduce_sum", [applied], {"axes": [], "keepdims": False})])


@converts("NegativeLogLikelihoodLoss")
def _nll_loss(ctx, node, inputs):
    return _negative_log_likelihood(ctx, node, inputs[0], inputs[1], inputs[2] if len(inputs) > 2 else None)


@converts("SoftmaxCrossEntropyLoss")
def _softmax_cross_entropy(ctx, node, inputs):
    """The negative log-likelihood of log_softmax(scores) over the class axis 1; the second
    output, when asked for, is that log-probability."""
    log_prob = ctx.emit1("log_softmax", [inputs[0]], {"axis": 1})
    loss = _negative_log_likelihood(ctx, node, log_prob, inputs[1], inputs[2] if len(inputs) > 2 else None)
    return [loss, log_prob]


@converts("ScatterElements", "Scatter")
def _scatter_elements(ctx, node, inputs):
    """Scatter (opset 9, deprecated) is ScatterElements without a reduction."""
    return ctx.emit1("scatter_elements", inputs, {"axis": int(_attr(node, "axis", 0)),
                                                  "reduction": _attr(node, "reduction", "none")})


@converts("ScatterND")
def _scatter_nd(ctx, node, inputs):
    return ctx.emit1("scatter_nd", inputs, {"reduction": _attr(node, "reduction", "none")})


@converts("GridSample")
def _grid_sample(ctx, node, inputs):
    """4-D images only; the mode names of opset 16 (bilinear, bicubic) and 20 (linear, cubic) both."""
    x, grid = inputs
    if x.type.rank != 4:
        raise QCompilerError(f"GridSample '{node.name}': only NCHW images (rank 4) are sampled, got {x.type}")
    mode = {"linear": "bilinear", "cubic": "bicubic"}.get(_attr(node, "mode", "bilinear"), _attr(node, "mode", "bilinear"))
    return ctx.emit1("grid_sample", [x, ctx.cast(grid, x.dtype)],
                     {"mode": mode, "padding_mode": _attr(node, "padding_mode", "zeros"),
                      "align_corners": bool(_attr(node, "align_corners", 0))})


MAX_DET_ORDER = 5  # Leibniz's formula has n! terms


@converts("Det")
def _det(ctx, node, inputs):
    """Determinant of [..., n, n] by Leibniz's formula, sum over permutations p of
    sign(p) * prod_i x[i, p(i)]: one gather of the n! products' entries, exact arithmetic
    without pivoting (which would depend on the data), for n up to MAX_DET_ORDER."""
    import itertools

    x = inputs[0]
    n = x.shape[-1]
    if x.type.rank < 2 or x.shape[-2] != n or not 1 <= n <= MAX_DET_ORDER:
        raise QCompilerError(f"Det '{node.name}': square matrices up to {MAX_DET_ORDER}x{MAX_DET_ORDER} are supported, "
                             f"got {list(x.shape)}")
    perms = np.asarray(list(itertools.permutations(range(n))), np.int64)  # [n!, n]
    signs = np.asarray([np.linalg.det(np.eye(n)[p]) for p in perms]).round().astype(x.type.np_dtype)
    flat = ctx.reshape(x, list(x.shape[:-2]) + [n * n])
    entries = ctx.emit1("gather", [flat, ctx.const(np.arange(n) * n + perms, "leibniz")], {"axis": x.type.rank - 2})
    products = ctx.emit1("reduce_prod", [entries], {"axes": [-1], "keepdims": False})
    return ctx.emit1("reduce_sum", [ctx.emit1("mul", [products, ctx.const(signs, "signs")])],
                     {"axes": [-1], "keepdims": False})
