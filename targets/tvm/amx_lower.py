"""Convolutions and linears lowered onto the AMX kernels of ``x86_amx`` where they pay, onto
the VNNI kernels of ``kernel_lower`` otherwise (depthwise convolutions, fewer than 16 output
channels (linears: rows) or 32 positions (columns), dilations, few input channels with wide
kernels).

The arithmetic is ``kernel_lower``'s (zero-point term folded into the bias, int8 activations
shifted to unsigned, requantize absorbed into the epilogue); only the operand layouts differ:
a convolution reads the flat input of ``x86_int8.to_blocked_flat`` with its channel blocks
padded to whole tile products (with under 16 channels, that input re-laid out once more so
that a kernel row's taps are one tile product: ``x86_amx.tap_rows``), a linear its activations
as rows padded the same way."""
from __future__ import annotations

import numpy as np
from tvm import relax

from qcompiler.ir import Node

from . import bf16, kernel_lower, x86_amx
from .lowering import ConvGeometry, Fused, Lowerer
from .kernel_lower import (activation_zero_point, applies, call_kernel, epilogue_arrays, folded_bias,
                           kernel_result, matmul, matmul_applies, result_dtype, unsigned_rows)
from .x86_int8 import GROUP, FlatGeometry, to_blocked_flat


R = relax.op
__all__ = ["applies", "bf16_applies", "conv2d", "conv2d_bf16", "conv2d_bf16_applies", "linear", "linear_bf16", "matmul",
           "matmul_applies"]


def _params(low: Lowerer, node: Node, bias: np.ndarray, channels: int, channel_axis: int):
    arrays, requant, req = epilogue_arrays(low, node, bias, channels, channels, channel_axis)
    return low.const(np.stack(arrays)), requant, req


def _bytes(low: Lowerer, words: relax.Expr, shape: tuple[int, ...]) -> relax.Expr:
    """A layout kernel's uint32 words (``shape``) as the flat bytes the GEMM addresses."""
    return low.emit(R.memory.view(words, shape=(int(np.prod(shape)) * GROUP,), dtype="uint8"))


def conv2d(low: Lowerer, node: Node, xs: list[relax.Expr]) -> relax.Expr | Fused | None:
    g = ConvGeometry.of(node)
    batch, channels, height, width, out_channels = g.batch, g.channels, g.height, g.width, g.out_channels
    kh, kw, oh, ow, strides, pads = g.kh, g.kw, g.oh, g.ow, g.strides, g.pads
    w = low.array(node.inputs[2])
    geometry = FlatGeometry.of(width, pads, (kh, kw), strides, (oh, ow))
    taps = x86_amx.taps_in_k(channels, kw)
    if (g.groups != 1 or g.dilations != (1, 1) or out_channels < x86_amx.TILE
            or (channels < x86_amx.MIN_CHANNELS and not taps) or oh * (ow if taps else geometry.row) < x86_amx.BLOCK):
        return kernel_lower.conv2d(low, node, xs)
    zp, signed = activation_zero_point(low, node)
    bias = folded_bias(low, node, w.reshape(out_channels, -1), zp)
    if bias is None:
        return kernel_lower.conv2d(low, node, xs)
    blocks = -(-channels // GROUP)
    if not taps:
        steps, per_step = x86_amx.k_chunks(blocks)
        blocks = steps * per_step
    planes = (batch, blocks, *strides, geometry.length // geometry.row, geometry.row)
    if not x86_amx.addressable(int(np.prod(planes)) * GROUP * kw, batch * out_channels * oh * geometry.row):
        return kernel_lower.conv2d(low, node, xs)
    layout = to_blocked_flat(batch, channels, height, width, pads, strides, geometry, zp, signed, blocks)
    params, requant, req = _params(low, node, bias, out_channels, 1)
    weight = low.const(x86_amx.pack_conv_weight(w, blocks))
    words = call_kernel(low, layout, "amx_conv2d_input", [xs[0]], planes, "uint32")
    if taps:
        rows_shape = (batch, kw, blocks, strides[0], oh + (kh - 1) // strides[0], ow)
        words = call_kernel(low, x86_amx.tap_rows(batch, blocks, geometry, (kh, kw), strides, (oh, ow)),
                            "amx_conv2d_tap_rows", [words], rows_shape, "uint32")
        func = x86_amx.conv_tap_rows(batch, blocks, out_channels, (kh, kw), strides, (oh, ow), requant, low.cores)
        y = call_kernel(low, func, "amx_conv2d", [weight, _bytes(low, words, rows_shape), params],
                        (batch, out_channels, oh * ow), result_dtype(requant))
        return kernel_result(low.emit(R.reshape(y, (batch, out_channels, oh, ow))), req)
    func = x86_amx.conv(batch, blocks, geometry, out_channels, (kh, kw), strides, oh, requant, low.cores)
    y = call_kernel(low, func, "amx_conv2d", [weight, _bytes(low, words, planes), params],
                    (batch, out_channels, oh * geometry.row), result_dtype(requant))
    y = low.emit(R.reshape(y, (batch, out_channels, oh, geometry.row)))
    if geometry.row != ow:
        y = low.emit(R.strided_slice(y, axes=[3], begin=[0], end=[ow]))
    return kernel_result(y, req)


def linear(low: Lowerer, node: Node, xs: list[relax.Expr]) -> relax.Expr | Fused | None:
    x = node.inputs[0]
    w2d = low.array(node.inputs[2])
    n, k = w2d.shape
    rows = int(np.prod(x.shape[:-1], dtype=np.int64))
    small = rows < x86_amx.TILE or n < x86_amx.BLOCK or not x86_amx.addressable(rows * (k + 64), rows * n)
    if small or kernel_lower.four_bit_groups(low, node.inputs[2]):  # 4-bit weights stay 4-bit: no AMX form
        return kernel_lower.linear(low, node, xs)
    zp, signed = activation_zero_point(low, node)
    bias = folded_bias(low, node, w2d, zp)
    if bias is None:
        return None
    steps, per_step = x86_amx.k_chunks(-(-k // GROUP))
    k_padded = steps * per_step * GROUP
    a = unsigned_rows(low, low.emit(R.reshape(xs[0], (rows, k))), k, k_padded, signed)
    a = low.emit(R.reshape(a, (rows * k_padded,)))
    params, requant, req = _params(low, node, bias, n, -1)
    func = x86_amx.dense(rows, n, k_padded // GROUP, requant, low.cores)
    weight = low.const(x86_amx.pack_dense_weight(w2d, k_padded))
    y = call_kernel(low, func, "amx_dense", [a, weight, params], (1, rows, n), result_dtype(requant))
    return kernel_result(low.emit(R.reshape(y, x.shape[:-1] + (n,))), req)


def _bf16_operands(low: Lowerer, node: Node) -> bool:
    """The layer's activation is rounded to bf16 by a ``round_bf16`` node, its weight a constant
    of bf16 values, its bias (if any) a constant: what the AMX-BF16 GEMM computes exactly."""
    x, w = node.inputs[0], node.inputs[1]
    if x.producer is None or x.producer.op != "round_bf16" or not w.is_constant or \
            not all(b.is_constant for b in node.inputs[2:]):
        return False
    return not np.any(np.ascontiguousarray(low.array(w), np.float32).view(np.uint32) & 0xFFFF)


def bf16_applies(low: Lowerer, node: Node) -> bool:
    """A linear over bf16 operands (:func:`_bf16_operands`) of 16 rows and 32 columns or more."""
    x, w = node.inputs[0], node.inputs[1]
    rows = int(np.prod(x.shape[:-1], dtype=np.int64))
    n, k = w.shape
    return (rows >= x86_amx.TILE and n >= x86_amx.BLOCK and x86_amx.addressable(rows * (k + 64) * 2, rows * n)
            and _bf16_operands(low, node))


def _bias_params(low: Lowerer, node: Node, channels: int) -> relax.Expr:
    """The float epilogue's one parameter row: the bias (zeros without one)."""
    bias = low.array(node.inputs[2]) if len(node.inputs) > 2 else np.zeros(channels, np.float32)
    return low.const(np.asarray(bias, np.float32).reshape(1, channels))


def conv2d_bf16_applies(low: Lowerer, node: Node) -> bool:
    """A convolution over bf16 operands that the AMX convolution takes: not grouped or dilated,
    16 input and output channels or more, 32 positions or more."""
    if node.op != "conv2d" or not _bf16_operands(low, node):
        return False
    g = ConvGeometry.of(node)
    geometry = FlatGeometry.of(g.width, g.pads, (g.kh, g.kw), g.strides, (g.oh, g.ow))
    pairs = -(-g.channels // 2)
    planes = g.batch * pairs * g.strides[0] * g.strides[1] * geometry.length
    return (g.groups == 1 and g.dilations == (1, 1) and g.out_channels >= x86_amx.TILE
            and g.channels >= x86_amx.MIN_CHANNELS and g.oh * geometry.row >= x86_amx.BLOCK
            and x86_amx.addressable(planes * GROUP * 2, g.batch * g.out_channels * g.oh * geometry.row))


def conv2d_bf16(low: Lowerer, node: Node, xs: list[relax.Expr]) -> relax.Expr:
    """The AMX convolution with ``tdpbf16ps``: the input laid out as ``bf16.to_pair_flat`` (two
    bf16 channels per 4-byte group), the weights as ``x86_amx.pack_conv_weight``'s bf16 rows,
    float32 accumulators plus the bias; columns past the output width dropped after."""
    g = ConvGeometry.of(node)
    geometry = FlatGeometry.of(g.width, g.pads, (g.kh, g.kw), g.strides, (g.oh, g.ow))
    steps, per_step = x86_amx.k_chunks(-(-g.channels // 2))
    pairs = steps * per_step
    rows = geometry.length // geometry.row
    planes = (g.batch, pairs, *g.strides, rows, geometry.row)
    layout = bf16.to_pair_flat(g.batch, g.channels, g.height, g.width, g.pads, g.strides, rows, geometry.row, pairs)
    words = call_kernel(low, layout, "amx_conv2d_bf16_input", [xs[0]], planes, "uint32")
    weight = low.const(x86_amx.pack_conv_weight(low.array(node.inputs[1]), pairs))
    func = x86_amx.conv(g.batch, pairs, geometry, g.out_channels, (g.kh, g.kw), g.strides, g.oh, None, low.cores,
                        bf16=True)
    y = call_kernel(low, func, "amx_conv2d_bf16", [weight, _bytes(low, words, planes), _bias_params(low, node,
                                                                                                  g.out_channels)],
                    (g.batch, g.out_channels, g.oh * geometry.row), "float32")
    y = low.emit(R.reshape(y, (g.batch, g.out_channels, g.oh, geometry.row)))
    if geometry.row != g.ow:
        y = low.emit(R.strided_slice(y, axes=[3], begin=[0], end=[g.ow]))
    return y


def linear_bf16(low: Lowerer, node: Node, xs: list[relax.Expr]) -> relax.Expr:
    """``x @ w.T + b`` over bf16 operands on AMX-BF16 tiles, accumulated in float32 (the IR's
    result up to the order of the float32 sums; every product is exact)."""
    x = node.inputs[0]
    w2d = low.array(node.inputs[1])
    n, k = w2d.shape
    rows = int(np.prod(x.shape[:-1], dtype=np.int64))
    steps, per_step = x86_amx.k_chunks(-(-k // 2))
    k_padded = steps * per_step * 2
    a = low.bb.emit_te(bf16.bf16_rows, low.emit(R.reshape(xs[0], (rows, k))), k_padded, primfunc_name_hint="bf16_rows")
    a = low.emit(R.memory.view(a, shape=(rows * k_padded * 2,), dtype="uint8"))
    params = _bias_params(low, node, n)
    weight = low.const(x86_amx.pack_dense_weight(w2d, k_padded))
    func = x86_amx.dense(rows, n, k_padded // 2, None, low.cores, bf16=True)
    y = call_kernel(low, func, "amx_dense_bf16", [a, weight, params], (1, rows, n), "float32")
    return low.emit(R.reshape(y, x.shape[:-1] + (n,)))
