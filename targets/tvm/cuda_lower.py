"""Integer linears and convolutions lowered onto the dp4a GEMM of ``cuda_int8``.

The identity is ``kernel_lower``'s: ``sum_k (x - z) * w = sum_k x * w - z * sum_k w``, the
second term folded into the int32 bias at compile time. dp4a multiplies signed bytes, so
unsigned activations are shifted by -128 (``x - 128``, zero point ``z - 128``) on their way
into the GEMM's operand: the rows of a linear, or the im2col matrix of a convolution, whose
taps outside the image hold the shifted zero point (``(z - z) * w = 0``). A requantize that is
the accumulator's only reader is done in the GEMM's epilogue. Depthwise and grouped
convolutions keep the generic integer path."""
from __future__ import annotations

import numpy as np
from tvm import relax, te, tirx

from qcompiler.ir import Node

from . import kernel_lower
from .lowering import ConvGeometry, Fused, Lowerer
from .cuda_int8 import gemm_s8s8, gemm_shape
from .kernel_lower import call_kernel, epilogue_args, folded_bias, kernel_result, result_dtype
from .tiling import im2col_element


R = relax.op


def applies(low: Lowerer, node: Node) -> bool:
    """What ``kernel_lower`` takes, less depthwise convolutions."""
    return kernel_lower.applies(low, node) and (node.op != "conv2d_int" or node.attrs["groups"] == 1)


def _signed_zero_point(low: Lowerer, node: Node) -> tuple[int, bool]:
    """The activations' zero point in the signed domain, and whether they need the -128 shift."""
    unsigned = node.inputs[0].dtype == "u8"
    return int(low.array(node.inputs[1])) - (128 if unsigned else 0), unsigned


def as_signed(value: tirx.PrimExpr, unsigned: bool) -> tirx.PrimExpr:
    """An activation byte as dp4a's signed operand: uint8 shifted by -128."""
    return (value.astype("int32") - 128).astype("int8") if unsigned else value


def _padded_weight(w2d: np.ndarray, n_padded: int, k_padded: int) -> np.ndarray:
    full = np.zeros((n_padded, k_padded), np.int8)
    full[:w2d.shape[0], :w2d.shape[1]] = w2d
    return full


def _gemm(low: Lowerer, node: Node, a: relax.Expr, w2d: np.ndarray, bias: np.ndarray, rows: int,
          channel_axis: int) -> tuple[relax.Expr, Node | None]:
    """``epilogue(a . w2d^T)`` as ``[rows, N]``, and the requantize absorbed, if any."""
    n, k = w2d.shape
    _, n_padded, k_padded = gemm_shape(rows, n, k)
    args, requant, req = epilogue_args(low, node, bias, n, n_padded, channel_axis)
    weight = low.const(_padded_weight(w2d, n_padded, k_padded))
    y = call_kernel(low, gemm_s8s8(rows, n, k, requant), "cuda_int8_gemm", [a, weight, *args], (rows, n),
                    result_dtype(requant))
    return y, req


def linear(low: Lowerer, node: Node, xs: list[relax.Expr]) -> relax.Expr | Fused | None:
    x = node.inputs[0]
    w2d = low.array(node.inputs[2])
    zp, unsigned = _signed_zero_point(low, node)
    bias = folded_bias(low, node, w2d, zp)
    if bias is None:
        return None
    n, k = w2d.shape
    rows = int(np.prod(x.shape[:-1], dtype=np.int64))
    m_padded, _, k_padded = gemm_shape(rows, n, k)
    flat = low.emit(R.reshape(xs[0], (rows, k)))
    a = low.bb.emit_te(lambda t: te.compute((m_padded, k_padded), lambda i, j: tirx.if_then_else(
        tirx.all(i < rows, j < k), as_signed(t[tirx.min(i, rows - 1), tirx.min(j, k - 1)], unsigned),
        tirx.const(0, "int8")), name="rows_s8"), flat, primfunc_name_hint="rows_s8")
    y, req = _gemm(low, node, a, w2d, bias, rows, -1)
    return kernel_result(low.emit(R.reshape(y, x.shape[:-1] + (n,))), req)


def conv2d(low: Lowerer, node: Node, xs: list[relax.Expr]) -> relax.Expr | Fused | None:
    g = ConvGeometry.of(node)
    batch, out_channels, kh, kw, oh, ow = g.batch, g.out_channels, g.kh, g.kw, g.oh, g.ow
    zp, unsigned = _signed_zero_point(low, node)
    w2d = low.array(node.inputs[2]).reshape(out_channels, -1)
    bias = folded_bias(low, node, w2d, zp)
    if bias is None:
        return None
    positions = oh * ow
    m_padded, _, k_padded = gemm_shape(batch * positions, out_channels, w2d.shape[1])
    geometry = ((kh, kw), g.strides, g.dilations, g.pads, (oh, ow))

    def im2col(x: te.Tensor) -> te.Tensor:
        def element(i, j):
            row = tirx.min(i, batch * positions - 1)
            tap = im2col_element(x, row // positions, row % positions, j, *geometry,
                                 lambda v: as_signed(v, unsigned), tirx.const(zp, "int8"))
            return tirx.if_then_else(i < batch * positions, tap, tirx.const(0, "int8"))
        return te.compute((m_padded, k_padded), element, name="im2col_s8")

    a = low.bb.emit_te(im2col, xs[0], primfunc_name_hint="im2col_s8")
    y, req = _gemm(low, node, a, w2d, bias, batch * positions, 1)
    y = low.emit(R.permute_dims(low.emit(R.reshape(y, (batch, positions, out_channels))), [0, 2, 1]))
    return kernel_result(low.emit(R.reshape(y, (batch, out_channels, oh, ow))), req)


def matmul_applies(low: Lowerer, node: Node) -> bool:
    """Products of two run-time operands take the generic lowering (dlight's GPU schedules)."""
    return False


def matmul(low: Lowerer, node: Node, xs: list[relax.Expr]) -> relax.Expr:
    raise NotImplementedError("cuda_lower has no kernel for products of two run-time operands")
