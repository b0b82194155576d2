"""ONNX Runtime's QOperator form (``quantize_static(quant_format=QuantFormat.QOperator)``): the
``com.microsoft`` QLinear* ops, each an integer op with its operands' and result's scales and
zero points as inputs. Each becomes dequantize -> the float op -> quantize, the QDQ form the rest of
qcompiler reads (``lower-integer`` turns such sandwiches into integer ops).

Identity: QLinearOp(x1, s1, z1, ..., s_y, z_y) = quantize(Op(dequantize(x1, s1, z1), ...), s_y, z_y),
which is how ONNX Runtime's contrib-op specification defines each of them. Scales and zero points
must be constants (a model whose scales are computed at run time is refused with the node named).

Also DynamicQuantizeLinear (the input of ONNX Runtime's dynamic quantization), whose scale and
zero point are computed from the tensor it quantizes."""
from __future__ import annotations

from typing import Any

import numpy as np

from ..errors import QCompilerError
from ..ir import Value
from .from_onnx import _CONVERTERS, _attr, _quant, _zero_point, as_standard_op, converts

MS = "com.microsoft."
# QLinear op -> (the float op it quantizes, how many (x, scale, zero point) triples lead its inputs)
_ELEMENTWISE = {"QLinearAdd": ("Add", 2), "QLinearMul": ("Mul", 2), "QLinearSigmoid": ("Sigmoid", 1),
                "QLinearLeakyRelu": ("LeakyRelu", 1), "QLinearAveragePool": ("AveragePool", 1),
                "QLinearGlobalAveragePool": ("GlobalAveragePool", 1), "QLinearSoftmax": ("Softmax", 1),
                "QLinearReduceMean": ("ReduceMean", 1)}


def _dequantize(ctx, node: Any, x: Value, scale: Value | None, zp: Value | None, axis: int = 1) -> Value:
    """``axis``: where a per-channel scale applies (a QGemm's B: its output axis)."""
    if scale is None:
        raise QCompilerError(f"{node.op} '{node.name}': a scale is missing")
    ctx.const_input(scale, node, "scale")
    return ctx.emit("dequantize", [x, scale, _zero_point(ctx, zp, x, node)], {"axis": axis}, fold=False)[0]


def _quantize(ctx, node: Any, y: Value, scale: Value | None, zp: Value | None, like: Value) -> Value:
    if scale is None:  # QGemm without y_scale: a float result
        return y
    ctx.const_input(scale, node, "scale")
    return ctx.emit("quantize", [y, scale, _zero_point(ctx, zp, like, node)], {"axis": 1}, fold=False)[0]


def _elementwise(float_op: str, triples: int):
    def convert(ctx, node, inputs):
        if float_op == "GlobalAveragePool" and _attr(node, "channels_last", 0):
            raise QCompilerError(f"{node.op} '{node.name}': channels_last=1 is not supported")
        padded = inputs + [None] * (3 * triples + 2 - len(inputs))
        xs = [_dequantize(ctx, node, *padded[3 * i:3 * i + 3]) for i in range(triples)]
        proxy = as_standard_op(node, float_op, node.inputs[:triples])
        y = _CONVERTERS[float_op](ctx, proxy, xs)
        y_scale, y_zp = padded[3 * triples], padded[3 * triples + 1]
        return _quantize(ctx, node, y, y_scale, y_zp, inputs[0])
    return convert


for _op, (_float_op, _triples) in _ELEMENTWISE.items():
    converts(MS + _op)(_elementwise(_float_op, _triples))


@converts(MS + "QLinearConcat")
def _qlinear_concat(ctx, node, inputs):
    """Inputs: y_scale, y_zero_point, then (x, scale, zero point) per joined tensor."""
    y_scale, y_zp, rest = inputs[0], inputs[1], inputs[2:]
    if len(rest) % 3:
        raise QCompilerError(f"QLinearConcat '{node.name}': inputs after y_scale, y_zero_point come in triples")
    xs = [_dequantize(ctx, node, *rest[i:i + 3]) for i in range(0, len(rest), 3)]
    y = _CONVERTERS["Concat"](ctx, as_standard_op(node, "Concat", node.inputs[2::3]), xs)
    return _quantize(ctx, node, y, y_scale, y_zp, rest[0])


@converts(MS + "QGemm")
def _qgemm(ctx, node, inputs):
    """A, a_scale, a_zp, B, b_scale, b_zp, C (int32 bias at scale a_scale * b_scale), y_scale, y_zp."""
    a, a_scale, a_zp, b, b_scale, b_zp, c, y_scale, y_zp = (inputs + [None] * 9)[:9]
    xs = [_dequantize(ctx, node, a, a_scale, a_zp),
          _dequantize(ctx, node, b, b_scale, b_zp, axis=0 if _attr(node, "transB", 0) else 1)]
    if c is not None:
        bias_scale = ctx.array(a_scale) * ctx.array(b_scale)
        zero = ctx.const(np.zeros(bias_scale.shape, np.int32), "zero_point")
        bias_scale = ctx.const(bias_scale.astype(np.float32), "bias_scale")
        xs.append(ctx.emit("dequantize", [c, bias_scale, zero], {"axis": 0}, fold=False)[0])
    y = _CONVERTERS["Gemm"](ctx, as_standard_op(node, "Gemm", node.inputs[:3]), xs)
    return _quantize(ctx, node, y, y_scale, y_zp, a)


for _op in ("QuantizeLinear", "DequantizeLinear"):  # ONNX Runtime's contrib copies of the standard ops
    converts(MS + _op)(_quant)


@converts("DynamicQuantizeLinear")
def _dynamic_quantize_linear(ctx, node, inputs):
    """uint8 with a scale and zero point computed from this input's own range:
    s = (max(x, 0) - min(x, 0)) / 255, z = saturate(round(-min(x, 0) / s)), y = saturate(round(x / s) + z),
    each rounding and saturation the quantize op's (half to even, as the ONNX spec says)."""
    x = inputs[0]
    everything = {"axes": list(range(x.type.rank)), "keepdims": False}
    zero = ctx.scalar_like(0.0, x.type)
    lo = ctx.emit1("minimum", [ctx.emit1("reduce_min", [x], everything), zero])
    hi = ctx.emit1("maximum", [ctx.emit1("reduce_max", [x], everything), zero])
    scale = ctx.emit1("div", [ctx.emit1("sub", [hi, lo]), ctx.scalar_like(255.0, x.type)])
    u8_zero = ctx.const(np.zeros((), np.uint8), "zero_point")
    zp = ctx.emit1("quantize", [ctx.emit1("neg", [lo]), scale, u8_zero], {"axis": 0})
    y = ctx.emit1("quantize", [x, scale, zp], {"axis": 1})
    return [y, scale, zp]
