"""IR -> ONNX (opset 20; 21 with 4-bit weights), for deployment where TVM is not used: the QDQ graph exports as
QuantizeLinear/DequantizeLinear around float ops, which ONNX Runtime and TensorRT turn into
their own int8 kernels. Fused activations become separate nodes again; integer-only ops
(``*_int``, requantize) have no ONNX form: export the QDQ graph, not the lowered one."""
from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from qcompiler.errors import QCompilerError
from qcompiler.ir import Graph, Node, Value
from qcompiler.ir.ops import ops_where
from qcompiler.ir.ops.resize import given_scale, nearest_indices
from qcompiler.registrar import registrar

OPSET = 20
INT4_OPSET = 21  # blocked DequantizeLinear and INT4 tensors, for 4-bit weights
Emitter = Callable[["_Exporter", Node, list[str]], "str | list[str]"]
_RULES: dict[str, Emitter] = {}
exports = registrar(_RULES)


def supported_ops() -> set[str]:
    return set(_RULES)


def not_exported() -> dict[str, str]:
    """The ops with no ONNX form, each with the reason (tests/test_op_coverage.py reads it)."""
    reasons = {name: "integer arithmetic made by lower-integer: export the QDQ graph, which ONNX runtimes lower "
                     "themselves (compile(target='onnx') does)"
               for name in ops_where(family="integer")}
    reasons["rescale"] = reasons["conv2d_int"]
    reasons["bitcast"] = f"ONNX has BitCast from opset 26; this target writes opset {OPSET}"
    reasons["adaptive_avg_pool2d"] = ("only bins that do not divide the input are left as this op at capture, and "
                                      "ONNX has no pooling with PyTorch's uneven bins")
    return reasons


class _Exporter:
    def __init__(self, graph: Graph):
        self.graph = graph
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: dict[str, onnx.TensorProto] = {}
        self.count = 0
        self.used = set(graph.constants) | {v.name for v in graph.inputs}  # names a made-up one must avoid

    def name(self, hint: str) -> str:
        """A fresh name: ``hint_N``, never one of the graph's own constants or inputs (a folded
        constant may be called ``identity_3`` too)."""
        while True:
            self.count += 1
            name = f"{hint}_{self.count}"
            if name not in self.used:
                self.used.add(name)
                return name

    def const(self, array: Any, hint: str = "c") -> str:
        name = self.name(hint)
        self.initializers[name] = numpy_helper.from_array(np.asarray(array), name)
        return name

    def add(self, op: str, inputs: list[str], outputs: int = 1, **attrs: Any) -> list[str]:
        outs = [self.name(op.lower()) for _ in range(outputs)]
        self.nodes.append(helper.make_node(op, inputs, outs, name=self.name(op), **attrs))
        return outs

    def add1(self, op: str, inputs: list[str], **attrs: Any) -> str:
        return self.add(op, inputs, **attrs)[0]


def to_onnx(graph: Graph) -> onnx.ModelProto:
    missing = sorted({n.op for n in graph.nodes} - set(_RULES))
    if missing:
        raise QCompilerError(f"the ONNX target cannot export op(s) {', '.join(missing)} "
                             f"(export the QDQ graph: integer-lowered ops have no ONNX form)")
    ex = _Exporter(graph)
    names: dict[int, str] = {id(v): v.name for v in graph.inputs}
    for cname, array in graph.constants.items():
        if cname not in graph.storage:  # 4-bit weights are written by their dequantize
            ex.initializers[cname] = numpy_helper.from_array(array, cname)
        names[id(graph.constant_value(cname))] = cname
    for node in graph.nodes:
        out = _RULES[node.op](ex, node, [names[id(v)] for v in node.inputs])
        for value, n in zip(node.outputs, out if isinstance(out, list) else [out]):
            names[id(value)] = n
    outputs = []
    taken = set(names.values())
    for v in graph.outputs:  # graph outputs keep their IR names
        out_name = v.name if v.name not in taken else f"{v.name}_out"
        ex.nodes.append(helper.make_node("Identity", [names[id(v)]], [out_name], name=ex.name("output")))
        outputs.append(helper.make_tensor_value_info(out_name, _elem(v), list(v.shape)))
    inputs = [helper.make_tensor_value_info(v.name, _elem(v), list(v.shape)) for v in graph.inputs]
    model = helper.make_model(helper.make_graph(ex.nodes, graph.name, inputs, outputs, list(ex.initializers.values())),
                              opset_imports=[helper.make_opsetid("", INT4_OPSET if graph.storage else OPSET)],
                              producer_name="qcompiler")
    model.ir_version = 9
    onnx.checker.check_model(model)
    return model


def _elem(v: Value) -> int:
    return helper.np_dtype_to_tensor_dtype(v.type.np_dtype)


# ---- rules ----------------------------------------------------------------------------------------
_SIMPLE = {"relu": "Relu", "sigmoid": "Sigmoid", "tanh": "Tanh", "erf": "Erf", "exp": "Exp", "log": "Log",
           "sqrt": "Sqrt", "neg": "Neg", "abs": "Abs", "floor": "Floor", "ceil": "Ceil", "sin": "Sin", "cos": "Cos",
           "logical_not": "Not", "sign": "Sign", "isnan": "IsNaN", "isinf": "IsInf", "identity": "Identity",
           "dropout": "Identity", "hardswish": "HardSwish", "reciprocal": "Reciprocal", "softplus": "Softplus",
           "add": "Add", "sub": "Sub", "mul": "Mul", "div": "Div", "pow": "Pow", "maximum": "Max",
           "minimum": "Min", "equal": "Equal", "less": "Less", "less_equal": "LessOrEqual", "greater": "Greater",
           "greater_equal": "GreaterOrEqual", "logical_and": "And", "logical_or": "Or", "where": "Where",
           "matmul": "MatMul", "tan": "Tan", "asin": "Asin", "acos": "Acos", "atan": "Atan", "sinh": "Sinh",
           "cosh": "Cosh", "asinh": "Asinh", "acosh": "Acosh", "atanh": "Atanh", "round": "Round",
           "logical_xor": "Xor", "bitwise_and": "BitwiseAnd", "bitwise_or": "BitwiseOr", "bitwise_xor": "BitwiseXor",
           "bitwise_not": "BitwiseNot"}


def _activation(ex: _Exporter, x: str, act: str, args: tuple, dtype: np.dtype) -> str:
    if act == "none":
        return x
    if act == "clip":
        return ex.add1("Clip", [x, ex.const(np.asarray(args[0], dtype)), ex.const(np.asarray(args[1], dtype))])
    if act in ("gelu", "gelu_tanh"):
        return ex.add1("Gelu", [x], approximate="tanh" if act == "gelu_tanh" else "none")
    if act == "silu":
        return ex.add1("Mul", [x, ex.add1("Sigmoid", [x])])
    if act == "hardsigmoid":
        return ex.add1("HardSigmoid", [x], alpha=1 / 6, beta=0.5)
    return ex.add1({"relu": "Relu", "sigmoid": "Sigmoid", "tanh": "Tanh", "hardswish": "HardSwish"}[act], [x])


@exports("fmod")
def _fmod(ex, node, xs):
    return ex.add1("Mod", xs, fmod=1)


@exports("shift_left", "shift_right")
def _bit_shift(ex, node, xs):
    return ex.add1("BitShift", xs, direction="LEFT" if node.op == "shift_left" else "RIGHT")


@exports(*_SIMPLE)
def _simple(ex, node, xs):
    y = ex.add1(_SIMPLE[node.op], xs)
    if node.op == "matmul":
        return _activation(ex, y, node.attrs["activation"], node.attrs["activation_args"], node.output.type.np_dtype)
    return y


@exports("rsqrt")
def _rsqrt(ex, node, xs):
    return ex.add1("Reciprocal", [ex.add1("Sqrt", xs)])


@exports("clip")
def _clip(ex, node, xs):
    dtype = node.output.type.np_dtype
    lo, hi = node.attrs["min"], node.attrs["max"]
    return ex.add1("Clip", [xs[0], ex.const(np.asarray(lo if math.isfinite(lo) else np.finfo(dtype).min, dtype)),
                            ex.const(np.asarray(hi if math.isfinite(hi) else np.finfo(dtype).max, dtype))])


@exports("gelu", "silu", "hardsigmoid", "leaky_relu", "elu", "selu")
def _param_activations(ex, node, xs):
    a = node.attrs
    if node.op == "gelu":
        return ex.add1("Gelu", xs, approximate=a["approximate"])
    if node.op == "silu":
        return ex.add1("Mul", [xs[0], ex.add1("Sigmoid", xs)])
    if node.op == "hardsigmoid":
        return ex.add1("HardSigmoid", xs, alpha=a["alpha"], beta=a["beta"])
    if node.op == "leaky_relu":
        return ex.add1("LeakyRelu", xs, alpha=a["alpha"])
    if node.op == "elu":
        return ex.add1("Elu", xs, alpha=a["alpha"])
    return ex.add1("Selu", xs, alpha=a["alpha"], gamma=a["gamma"])


@exports("cast")
def _cast(ex, node, xs):
    return ex.add1("Cast", xs, to=helper.np_dtype_to_tensor_dtype(node.output.type.np_dtype))


@exports("round_bf16")
def _round_bf16(ex, node, xs):
    """A Cast to bfloat16 and back: ONNX's Cast rounds to nearest, ties to even (ONNX Runtime's too)."""
    return ex.add1("Cast", [ex.add1("Cast", xs, to=onnx.TensorProto.BFLOAT16)], to=onnx.TensorProto.FLOAT)


@exports("conv1d", "conv2d", "conv3d")
def _conv(ex, node, xs):
    a = node.attrs
    y = ex.add1("Conv", xs, strides=list(a["strides"]), pads=list(a["pads"]), dilations=list(a["dilations"]),
                group=a["groups"])
    return _activation(ex, y, a["activation"], a["activation_args"], node.output.type.np_dtype)


@exports("linear")
def _linear(ex, node, xs):
    x = node.inputs[0]
    if x.type.rank == 2:
        y = ex.add1("Gemm", xs, transB=1)
    else:
        y = ex.add1("MatMul", [xs[0], ex.add1("Transpose", [xs[1]], perm=[1, 0])])
        if len(xs) > 2:
            y = ex.add1("Add", [y, xs[2]])
    return _activation(ex, y, node.attrs["activation"], node.attrs["activation_args"], node.output.type.np_dtype)


@exports("batch_norm")
def _batch_norm(ex, node, xs):
    return ex.add1("BatchNormalization", xs, epsilon=node.attrs["epsilon"])


@exports("max_pool1d", "max_pool2d", "max_pool3d", "avg_pool1d", "avg_pool2d", "avg_pool3d")
def _pool(ex, node, xs):
    a = node.attrs
    common = dict(kernel_shape=list(a["kernel"]), strides=list(a["strides"]), pads=list(a["pads"]),
                  ceil_mode=int(a["ceil_mode"]))
    if node.op.startswith("max"):
        return ex.add1("MaxPool", xs, dilations=list(a["dilations"]), **common)
    return ex.add1("AveragePool", xs, count_include_pad=int(a["count_include_pad"]), **common)


@exports("softmax", "log_softmax")
def _softmax(ex, node, xs):
    return ex.add1("Softmax" if node.op == "softmax" else "LogSoftmax", xs, axis=node.attrs["axis"])


@exports("layer_norm")
def _layer_norm(ex, node, xs):
    x = node.inputs[0]
    axis = node.attrs["axis"] % x.type.rank
    if len(xs) == 1:
        xs = xs + [ex.const(np.ones(x.shape[axis:], x.type.np_dtype))]
    return ex.add1("LayerNormalization", xs, axis=axis, epsilon=node.attrs["epsilon"])


@exports("reshape", "expand")
def _reshape(ex, node, xs):
    return ex.add1("Reshape" if node.op == "reshape" else "Expand",
                   [xs[0], ex.const(np.asarray(node.attrs["shape"], np.int64))])


@exports("transpose")
def _transpose(ex, node, xs):
    return ex.add1("Transpose", xs, perm=list(node.attrs["perm"]))


@exports("concat")
def _concat(ex, node, xs):
    return ex.add1("Concat", xs, axis=node.attrs["axis"])


@exports("slice")
def _slice(ex, node, xs):
    a = node.attrs
    return ex.add1("Slice", [xs[0]] + [ex.const(np.asarray(a[k], np.int64)) for k in ("starts", "ends", "axes", "steps")])


@exports("gather", "gather_elements")
def _gather(ex, node, xs):
    return ex.add1("Gather" if node.op == "gather" else "GatherElements", xs, axis=node.attrs["axis"])


@exports("scatter_elements", "scatter_nd")
def _scatter(ex, node, xs):
    attrs = {"axis": node.attrs["axis"]} if node.op == "scatter_elements" else {}
    return ex.add1("ScatterElements" if node.op == "scatter_elements" else "ScatterND", xs,
                   reduction=node.attrs["reduction"], **attrs)


@exports("index")
def _index(ex, node, xs):
    shape = tuple(np.broadcast_shapes(*(v.shape for v in node.inputs[1:])))
    columns = [ex.add1("Unsqueeze", [ex.add1("Expand", [x, ex.const(np.asarray(shape, np.int64))]),
                                     ex.const(np.asarray([-1], np.int64))]) for x in xs[1:]]
    return ex.add1("GatherND", [xs[0], ex.add1("Concat", columns, axis=-1)])


@exports("tile")
def _tile(ex, node, xs):
    return ex.add1("Tile", [xs[0], ex.const(np.asarray(node.attrs["repeats"], np.int64))])


@exports("pad")
def _pad(ex, node, xs):
    value = ex.const(np.asarray(node.attrs["value"], node.inputs[0].type.np_dtype))
    return ex.add1("Pad", [xs[0], ex.const(np.asarray(node.attrs["pads"], np.int64)), value], mode=node.attrs["mode"])


@exports("split")
def _split(ex, node, xs):
    return ex.add("Split", [xs[0], ex.const(np.asarray(node.attrs["sizes"], np.int64))], len(node.outputs),
                  axis=node.attrs["axis"])


_REDUCE = {"reduce_mean": "ReduceMean", "reduce_sum": "ReduceSum", "reduce_max": "ReduceMax", "reduce_min": "ReduceMin",
           "reduce_prod": "ReduceProd"}


@exports(*_REDUCE)
def _reduce(ex, node, xs):
    axes = list(node.attrs["axes"]) or list(range(node.inputs[0].type.rank))
    return ex.add1(_REDUCE[node.op], [xs[0], ex.const(np.asarray(axes, np.int64))], keepdims=int(node.attrs["keepdims"]))


@exports("argmax")
def _argmax(ex, node, xs):
    return ex.add1("ArgMax", xs, axis=node.attrs["axis"], keepdims=int(node.attrs["keepdims"]))


@exports("conv_transpose1d", "conv_transpose2d", "conv_transpose3d")
def _conv_transpose(ex, node, xs):
    w = node.inputs[1]
    return ex.add1("ConvTranspose", xs, kernel_shape=list(w.shape[2:]), strides=list(node.attrs["strides"]),
                   pads=list(node.attrs["pads"]), dilations=list(node.attrs["dilations"]), group=node.attrs["groups"],
                   output_padding=list(node.attrs["output_padding"]))


@exports("einsum")
def _einsum(ex, node, xs):
    return ex.add1("Einsum", xs, equation=node.attrs["equation"])


@exports("topk")
def _topk(ex, node, xs):
    k = ex.const(np.asarray([node.attrs["k"]], np.int64), "k")
    return ex.add("TopK", [xs[0], k], outputs=2, axis=node.attrs["axis"], largest=int(node.attrs["largest"]), sorted=1)


@exports("resize_nearest", "resize_linear", "resize_cubic")
def _resize(ex, node, xs):
    x = node.inputs[0]
    if node.attrs["coordinate_transformation_mode"] == "tf_half_pixel_for_nn":  # gone from Resize since opset 13
        rows, cols = (nearest_indices(n, m, "tf_half_pixel_for_nn", node.attrs["nearest_mode"],
                                      given_scale(node.attrs, axis))
                      for axis, (n, m) in enumerate(zip(x.shape[2:], node.attrs["size"])))
        return ex.add1("Gather", [ex.add1("Gather", [xs[0], ex.const(rows, "rows")], axis=2), ex.const(cols, "cols")],
                       axis=3)
    attrs = {"mode": node.op.removeprefix("resize_"),
             "coordinate_transformation_mode": node.attrs["coordinate_transformation_mode"]}
    for key in ("nearest_mode", "cubic_coeff_a"):
        if key in node.attrs:
            attrs[key] = node.attrs[key]
    if "exclude_outside" in node.attrs:
        attrs["exclude_outside"] = int(node.attrs["exclude_outside"])
    if node.attrs.get("antialias"):
        attrs["antialias"] = 1
    if node.attrs["scales"]:  # the transform follows the scales: give them, not the sizes
        return ex.add1("Resize", [xs[0], "", ex.const(np.asarray([1, 1, *node.attrs["scales"]], np.float32), "scales")],
                       **attrs)
    sizes = ex.const(np.asarray([*x.shape[:2], *node.attrs["size"]], np.int64), "sizes")
    return ex.add1("Resize", [xs[0], "", "", sizes], **attrs)


@exports("grid_sample")
def _grid_sample(ex, node, xs):
    mode = {"bilinear": "linear", "bicubic": "cubic"}.get(node.attrs["mode"], node.attrs["mode"])  # opset 20 names
    return ex.add1("GridSample", xs, mode=mode, padding_mode=node.attrs["padding_mode"],
                   align_corners=int(node.attrs["align_corners"]))


@exports("quantize", "dequantize")
def _qdq(ex, node, xs):
    w = node.inputs[0]
    if node.op == "dequantize" and w.is_constant and w.name in ex.graph.storage:
        return _int4_weight(ex, node)
    axis = node.attrs["axis"] % max(w.type.rank, 1)
    return ex.add1("QuantizeLinear" if node.op == "quantize" else "DequantizeLinear", xs, axis=axis)


@exports("quantize_rows")
def _quantize_rows(ex, node, xs):
    """Per-token codes in plain ONNX ops (``quant.row_scales``; Round is half to even): no ONNX
    runtime fuses them into an int8 kernel, but the model computes what qcompiler's does."""
    f32 = np.float32
    amax = ex.add1("ReduceMax", [ex.add1("Abs", xs), ex.const(np.asarray([-1], np.int64), "axes")], keepdims=1)
    levels, zero = ex.const(np.asarray(127.0, f32), "levels"), ex.const(np.asarray(0.0, f32), "zero")
    positive = ex.add1("Greater", [amax, zero])
    scale = ex.add1("Div", [amax, levels])
    scale = ex.add1("Where", [ex.add1("Greater", [scale, zero]), scale, ex.const(np.asarray(1.0, f32), "one")])
    factor = ex.add1("Min", [ex.add1("Div", [levels, amax]), ex.const(np.asarray(np.finfo(f32).max, f32), "largest")])
    factor = ex.add1("Where", [positive, factor, zero])
    codes = ex.add1("Clip", [ex.add1("Round", [ex.add1("Mul", [xs[0], factor])]),
                             ex.const(np.asarray(-127.0, f32), "low"), levels])
    codes = ex.add1("Add", [codes, ex.const(np.asarray(128.0, f32), "zero_point")])
    return [ex.add1("Cast", [codes], to=onnx.TensorProto.UINT8), scale]


@exports("dequantize_rows")
def _dequantize_rows(ex, node, xs):
    y = ex.add1("Cast", [xs[0]], to=onnx.TensorProto.FLOAT)
    if node.attrs["zero_point"]:
        y = ex.add1("Sub", [y, ex.const(np.asarray(node.attrs["zero_point"], np.float32), "zero_point")])
    for operand in xs[1:]:  # row scales, column scales, bias
        y = ex.add1("Add" if operand is xs[-1] and len(xs) == 4 else "Mul", [y, operand])
    return y


def _int4_weight(ex: _Exporter, node: Node) -> str:
    """A 4-bit weight (``ir.packing``) as an INT4 initializer [out, in...] flattened to two
    dims, dequantized in blocks of the group size along the second (opset 21), reshaped back:
    the group scale is the channel scale times the group's multiplier."""
    g = ex.graph
    w, groups = g.constant_array(node.inputs[0]), g.storage[node.inputs[0].name]
    multipliers = groups.multipliers(w).astype(np.float32)
    rows = w.reshape(w.shape[0], -1).astype(np.int32)
    q = rows // np.repeat(multipliers.astype(np.int32), groups.group_size, axis=1)[:, :rows.shape[1]]
    channel_scale = np.broadcast_to(g.constant_array(node.inputs[1]).astype(np.float32), (w.shape[0],))
    name = ex.name(node.inputs[0].name)
    ex.initializers[name] = helper.make_tensor(name, onnx.TensorProto.INT4, list(q.shape), q.reshape(-1).tolist())
    zero = ex.name("zero_point")
    ex.initializers[zero] = helper.make_tensor(zero, onnx.TensorProto.INT4, list(multipliers.shape),
                                               [0] * multipliers.size)
    scale = ex.const((channel_scale[:, None] * multipliers).astype(np.float32), "scale")
    y = ex.add1("DequantizeLinear", [name, scale, zero], axis=1, block_size=groups.group_size)
    return ex.add1("Reshape", [y, ex.const(np.asarray(w.shape, np.int64), "shape")]) if w.ndim != 2 else y
