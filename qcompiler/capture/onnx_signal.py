"""ONNX's signal ops (DFT, STFT) as products with constant cosine and sine matrices: a DFT of
length n along one axis is x @ W with W[j, k] = exp(-2 pi i j k / n), exact in the arithmetic
every target already runs (and quantizable like any linear with constant weights)."""
from __future__ import annotations

import numpy as np

from ..errors import QCompilerError
from .from_onnx import _attr, converts


def _fit(ctx, x, length: int):
    """``x`` cut or zero-padded to ``length`` along its last axis (dft_length)."""
    n = x.shape[-1]
    if length < n:
        return ctx.emit1("slice", [x], {"starts": [0], "ends": [length], "axes": [x.type.rank - 1], "steps": [1]})
    if length > n:
        return ctx.emit1("pad", [x], {"pads": [0] * x.type.rank + [0] * (x.type.rank - 1) + [length - n]})
    return x


def dft_last_axis(ctx, real, imag, length: int, inverse: bool, onesided: bool):
    """The DFT of (real + i imag) along the last axis (imag None: a real signal), as two matmuls
    per part: Y = X (cos t -/+ i sin t), t = 2 pi j k / n, scaled by 1/n when inverse. Returns
    the result with a trailing [real, imaginary] axis."""
    bins = length // 2 + 1 if onesided else length
    theta = 2 * np.pi * np.outer(np.arange(length), np.arange(bins)) / length
    sign, scale = (1.0, 1.0 / length) if inverse else (-1.0, 1.0)
    dtype = real.type.np_dtype
    cos = ctx.const((np.cos(theta) * scale).astype(dtype), "dft_cos")
    sin = ctx.const((sign * np.sin(theta) * scale).astype(dtype), "dft_sin")
    real = _fit(ctx, real, length)
    out_real, out_imag = ctx.emit1("matmul", [real, cos]), ctx.emit1("matmul", [real, sin])
    if imag is not None:  # (a + ib)(c + is) = ac - bs + i(as + bc)
        imag = _fit(ctx, imag, length)
        out_real = ctx.emit1("sub", [out_real, ctx.emit1("matmul", [imag, sin])])
        out_imag = ctx.emit1("add", [out_imag, ctx.emit1("matmul", [imag, cos])])
    return ctx.stack([out_real, out_imag], out_real.type.rank)


def inverse_real_last_axis(ctx, real, imag, length: int):
    """The real signal of ``length`` whose one-sided spectrum (bins 0..length/2) is given, along
    the last axis (numpy's irfft): x[j] = (1/n) sum_k c_k (Re X_k cos t - Im X_k sin t), t = 2 pi j k / n,
    c_k = 2 for the bins that stand for two (k and n - k), 1 for DC and an even n's Nyquist bin."""
    bins = length // 2 + 1
    theta = 2 * np.pi * np.outer(np.arange(bins), np.arange(length)) / length
    twice = np.full(bins, 2.0)
    twice[0] = 1.0
    if length % 2 == 0:
        twice[-1] = 1.0
    dtype = real.type.np_dtype
    cos = ctx.const((np.cos(theta) * twice[:, None] / length).astype(dtype), "irfft_cos")
    y = ctx.emit1("matmul", [_fit(ctx, real, bins), cos])
    if imag is not None:
        sin = ctx.const((np.sin(theta) * twice[:, None] / length).astype(dtype), "irfft_sin")
        y = ctx.emit1("sub", [y, ctx.emit1("matmul", [_fit(ctx, imag, bins), sin])])
    return ctx.reshape(y, list(y.shape) + [1])


def _moved(ctx, x, source: int, destination: int):
    perm = list(range(x.type.rank))
    perm.insert(destination, perm.pop(source))
    return x if perm == sorted(perm) else ctx.emit1("transpose", [x], {"perm": perm})


def _scalar_operand(ctx, node, inputs, index: int, what: str) -> int | None:
    value = ctx.const_input(inputs[index], node, what) if len(inputs) > index else None
    return None if value is None else int(np.asarray(value).reshape(-1)[0])


@converts("DFT")
def _dft(ctx, node, inputs):
    """DFT of a real ([..., 1]) or complex ([..., 2]) signal along ``axis`` (an attribute, 1 by
    default, before opset 20; an input, -2 by default, from 20), zero-padded or cut to
    ``dft_length``; ``onesided`` keeps the n/2 + 1 unique bins of a real signal, and with
    ``inverse`` takes them back to the real signal of ``dft_length``
    (2 (bins - 1) by default)."""
    x = inputs[0]
    if ctx.opset >= 20:
        axis = _scalar_operand(ctx, node, inputs, 2, "axis")
        axis = -2 if axis is None else axis
    else:
        axis = int(_attr(node, "axis", 1))
    rank = x.type.rank
    axis %= rank
    if axis == rank - 1 or x.shape[-1] not in (1, 2):
        raise QCompilerError(f"DFT '{node.name}': the last axis must hold [real] or [real, imaginary] parts and "
                             f"the signal axis another one (got shape {list(x.shape)}, axis {axis})")
    inverse, onesided = bool(_attr(node, "inverse", 0)), bool(_attr(node, "onesided", 0))
    real_output = inverse and onesided
    length = _scalar_operand(ctx, node, inputs, 1, "dft_length") or (
        2 * (x.shape[axis] - 1) if real_output else x.shape[axis])
    parts = [_moved(ctx, ctx.take(x, x.type.rank - 1, i), axis, rank - 2) for i in range(x.shape[-1])]
    imag = parts[1] if len(parts) > 1 else None
    y = (inverse_real_last_axis(ctx, parts[0], imag, length) if real_output
         else dft_last_axis(ctx, parts[0], imag, length, inverse, onesided))
    return _moved(ctx, y, rank - 2, axis)


@converts("STFT")
def _stft(ctx, node, inputs):
    """Short-time Fourier transform of [batch, length, 1 or 2]: frames of ``frame_length`` every
    ``frame_step`` samples (a gather of constant positions), times the window, each one DFT'd:
    [batch, frames, bins, 2]."""
    signal = inputs[0]
    step = _scalar_operand(ctx, node, inputs, 1, "frame_step")
    window = inputs[2] if len(inputs) > 2 else None
    length = _scalar_operand(ctx, node, inputs, 3, "frame_length")
    length = length or (window.shape[0] if window is not None else None)
    if length is None or step is None or step < 1 or length > signal.shape[1]:
        raise QCompilerError(f"STFT '{node.name}': needs a frame_step >= 1 and a frame_length (or window) no "
                             f"longer than the signal ({signal.shape[1]})")
    frames = 1 + (signal.shape[1] - length) // step
    positions = np.arange(frames)[:, None] * step + np.arange(length)[None, :]
    framed = ctx.emit1("gather", [signal, ctx.const(positions.astype(np.int64), "stft_positions")], {"axis": 1})
    parts = [ctx.take(framed, framed.type.rank - 1, i) for i in range(signal.shape[-1])]  # [batch, frames, length]
    if window is not None:
        parts = [ctx.emit1("mul", [p, ctx.cast(window, p.dtype)]) for p in parts]
    onesided = bool(_attr(node, "onesided", 1))
    return dft_last_axis(ctx, parts[0], parts[1] if len(parts) > 1 else None, length, False, onesided)
