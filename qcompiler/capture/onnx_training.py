"""ONNX's training ops (the ai.onnx.preview.training optimizers, BatchNormalization in training
mode) as elementwise IR: one optimizer step, or the batch statistics and updated running ones,
for graphs exported with their training step."""
from __future__ import annotations

from ..errors import QCompilerError
from .from_onnx import _attr, converts
from .onnx_composites import Arithmetic, _normalized, _scalar

TRAINING = "ai.onnx.preview.training"


def _groups(node, inputs, per_tensor: int) -> tuple:
    """R, T and the per-tensor operand lists (X..., G..., V..., H...) of an optimizer node."""
    n = (len(inputs) - 2) // per_tensor
    if n < 1 or len(inputs) != 2 + per_tensor * n:
        raise QCompilerError(f"{node.op} '{node.name}': expected R, T and {per_tensor} operands per tensor, got "
                             f"{len(inputs)} inputs")
    return inputs[0], inputs[1], [inputs[2 + k * n: 2 + (k + 1) * n] for k in range(per_tensor)]


def _step_count(ctx, t, like):
    return ctx.cast(ctx.reshape(t, []), like.dtype)


@converts(f"{TRAINING}.Adagrad")
def _adagrad(ctx, node, inputs):
    """r' = R / (1 + T decay); g = norm x + G; H' = H + g^2; X' = X - r' g / (sqrt(H') + epsilon)."""
    r, t, (xs, gs, hs) = _groups(node, inputs, 3)
    decay, epsilon, norm = (float(_attr(node, k, d)) for k, d in (("decay_factor", 0.0), ("epsilon", 1e-6),
                                                                  ("norm_coefficient", 0.0)))
    new_x, new_h = [], []
    for x, g, h in zip(xs, gs, hs):
        a = Arithmetic(ctx, x)
        rate = a.div(ctx.cast(ctx.reshape(r, []), x.dtype), a.add(1.0, a.mul(_step_count(ctx, t, x), decay)))
        g = a.add(a.mul(norm, x), g)
        h = a.add(h, a.mul(g, g))
        new_x.append(a.sub(x, a.div(a.mul(rate, g), a.add(a.sqrt(h), epsilon))))
        new_h.append(h)
    return new_x + new_h


@converts(f"{TRAINING}.Momentum")
def _momentum(ctx, node, inputs):
    """g = norm x + G; V' = alpha V + beta' g (beta' = 1 at the first step, T = 0); standard:
    X' = X - R V'; nesterov: X' = X - R (g + alpha V')."""
    r, t, (xs, gs, vs) = _groups(node, inputs, 3)
    alpha, beta, norm = (float(_attr(node, k)) for k in ("alpha", "beta", "norm_coefficient"))
    mode = _attr(node, "mode", "standard")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    if mode not in ("standard", "nesterov"):
        raise QCompilerError(f"Momentum '{node.name}': unknown mode '{mode}' (standard or nesterov)")
    new_x, new_v = [], []
    for x, g, v in zip(xs, gs, vs):
        a = Arithmetic(ctx, x)
        rate = ctx.cast(ctx.reshape(r, []), x.dtype)
        first = ctx.emit1("greater", [_step_count(ctx, t, x), _scalar(ctx, 0, x)])
        g = a.add(a.mul(norm, x), g)
        v = a.add(a.mul(alpha, v), a.mul(a.where(first, _scalar(ctx, beta, x), _scalar(ctx, 1, x)), g))
        step = v if mode == "standard" else a.add(g, a.mul(alpha, v))
        new_x.append(a.sub(x, a.mul(rate, step)))
        new_v.append(v)
    return new_x + new_v


@converts(f"{TRAINING}.Adam")
def _adam(ctx, node, inputs):
    """g = norm x + G; V' = alpha V + (1 - alpha) g; H' = beta H + (1 - beta) g^2;
    r' = R sqrt(1 - beta^T) / (1 - alpha^T) after the first step (T > 0), else R;
    X' = (1 - norm_post) (X - r' V' / (sqrt(H') + epsilon))."""
    r, t, (xs, gs, vs, hs) = _groups(node, inputs, 4)
    alpha, beta, epsilon, norm, post = (float(_attr(node, k, d)) for k, d in (
        ("alpha", 0.9), ("beta", 0.999), ("epsilon", 1e-6), ("norm_coefficient", 0.0), ("norm_coefficient_post", 0.0)))
    outs: list[list] = [[], [], []]
    for x, g, v, h in zip(xs, gs, vs, hs):
        a = Arithmetic(ctx, x)
        steps = _step_count(ctx, t, x)
        rate = ctx.cast(ctx.reshape(r, []), x.dtype)
        corrected = a.div(a.mul(rate, a.sqrt(a.sub(1.0, a.pow(beta, steps)))), a.sub(1.0, a.pow(alpha, steps)))
        rate = a.where(ctx.emit1("greater", [steps, _scalar(ctx, 0, x)]), corrected, rate)
        g = a.add(a.mul(norm, x), g)
        v = a.add(a.mul(alpha, v), a.mul(1.0 - alpha, g))
        h = a.add(a.mul(beta, h), a.mul(1.0 - beta, a.mul(g, g)))
        x = a.mul(1.0 - post, a.sub(x, a.mul(rate, a.div(v, a.add(a.sqrt(h), epsilon)))))
        for out, value in zip(outs, (x, v, h)):
            out.append(value)
    return outs[0] + outs[1] + outs[2]


def batch_norm_training(ctx, node, inputs):
    """Training mode: normalized with the batch's own mean and (biased) variance over every axis
    but the channel; running statistics updated as mean * momentum + batch's * (1 - momentum)."""
    x, scale, bias, mean, var = inputs[:5]
    momentum, epsilon = float(_attr(node, "momentum", 0.9)), float(_attr(node, "epsilon", 1e-5))
    axes = [0] + list(range(2, x.type.rank))
    per_channel = [x.shape[1]] + [1] * (x.type.rank - 2)
    a = Arithmetic(ctx, x)
    y = a.add(a.mul(_normalized(ctx, x, axes, epsilon), ctx.reshape(scale, per_channel)),
              ctx.reshape(bias, per_channel))
    batch_mean = ctx.emit1("reduce_mean", [x], {"axes": axes, "keepdims": False})
    centered = a.sub(x, ctx.reshape(batch_mean, per_channel))
    batch_var = ctx.emit1("reduce_mean", [a.mul(centered, centered)], {"axes": axes, "keepdims": False})
    running = [a.add(a.mul(old, momentum), a.mul(new, 1.0 - momentum)) for old, new in ((mean, batch_mean),
                                                                                         (var, batch_var))]
    return [y] + running[:max(len(node.outputs) - 1, 0)]
