"""IR -> Relax through ``relax.BlockBuilder``: one rule per IR op, written with Relax ops only.

Integer ops are expressed in exact integer Relax arithmetic (int32 accumulation, int64
fixed-point requantization with round-half-to-even done with shifts and masks), so a compiled
module is bit-exact with the reference interpreter. Float rounding that must be half-to-even
(ONNX's QLinear* output stage) is built from floor and parity, not from a round intrinsic."""
from __future__ import annotations

from collections.abc import Callable

import numpy as np
import tvm
from tvm import relax, te, tirx, topi

from qcompiler.errors import QCompilerError
from qcompiler.ir import Graph, Node, Value
from qcompiler.ir.ops import traits_of
from qcompiler.ir.ops.resize import given_scale, interpolation_matrix, nearest_indices
from qcompiler.ir.types import DTYPES
from qcompiler.registrar import registrar

from . import amx_lower, bf16, cpu_softmax, cuda_lower, dynamic_quant, int_arith, kernel_lower
from .index_check import checked_indices
from .lowering import Fused, Int8Kernels, Lowerer

R = relax.op
TVM_DTYPE = {name: np.dtype(dt).name for name, dt in DTYPES.items()}
Lowering = Callable[[Lowerer, Node, list[relax.Expr]], "relax.Expr | list[relax.Expr] | Fused"]
_RULES: dict[str, Lowering] = {}
# each implements lowering.Int8Kernels; "vnni-vbmi": VNNI with vpermb (the
# sliding depthwise kernel); "amx": AMX where it pays, VNNI with vpermb elsewhere; "avx2": the
# VNNI kernels' vpmaddwd form
INT8_KERNELS: dict[str, Int8Kernels] = {"vnni": kernel_lower, "vnni-vbmi": kernel_lower, "amx": amx_lower,
                                        "avx2": kernel_lower, "dp4a": cuda_lower}


lowers = registrar(_RULES)


def supported_ops() -> set[str]:
    return set(_RULES)


def not_lowered() -> dict[str, str]:
    """The ops this target cannot lower, each with the reason (none today; the op coverage test
    reads it, so an op added without a lowering fails there, not at a user's model)."""
    return {}


def to_relax(graph: Graph, int8_kernels: str | None = None, cpu_kernels: bool = False,
             cores: int = 1, bf16_kernels: str | None = None) -> tvm.IRModule:
    """The graph as a Relax module with one function, ``main``, taking the graph's inputs.
    ``int8_kernels``: integer convolutions and linears use the x86 VNNI kernels (``"vnni"``, or
    ``"vnni-vbmi"`` where ``vpermb`` exists; ``kernel_lower``), AMX ones (``"amx"``,
    ``amx_lower``) or the CUDA dp4a GEMM (``"dp4a"``, ``cuda_lower``); ``cpu_kernels``: float
    convolutions and linears and max pooling use the hand-written CPU kernels (``kernel_lower``);
    ``cores``: the threads the target runs; ``bf16_kernels``: linears over bf16 operands use the
    AMX-BF16 GEMM (``"amx"``; ``amx_lower.linear_bf16``)."""
    nodes = graph.live_nodes()  # an imported model's dead branch (RotaryEmbedding's empty pass-through) is not built
    missing = sorted({n.op for n in nodes} - set(_RULES))
    if missing:
        raise QCompilerError(f"the TVM target cannot lower op(s) {', '.join(missing)}")
    read_values = {id(v) for n in nodes for v in n.inputs} | {id(v) for v in graph.outputs}
    empty = next((v for v in [*graph.inputs, *(o for n in nodes for o in n.outputs if id(o) in read_values)]
                  if 0 in v.shape), None)
    if empty is not None:  # TVM's schedules divide by the extent
        raise QCompilerError(f"the TVM target cannot build tensors with no elements (%{empty.name}: {empty.type})")
    low = Lowerer(graph, int8_kernels, cpu_kernels, cores, INT8_KERNELS, bf16_kernels)
    absorbed: dict[int, relax.Expr] = {}  # requantizes a kernel computed in its epilogue
    params = [relax.Var(v.name, relax.TensorType(v.shape, TVM_DTYPE[v.dtype])) for v in graph.inputs]
    env: dict[int, relax.Expr] = {id(v): p for v, p in zip(graph.inputs, params)}

    def read(v: Value) -> relax.Expr:
        if v.is_constant:
            return low.const(graph.constant_array(v))
        return env[id(v)]

    with low.bb.function("main", params):
        with low.bb.dataflow():
            for node in nodes:
                if id(node) in absorbed:
                    env[id(node.output)] = absorbed[id(node)]
                    continue
                try:
                    out = _RULES[node.op](low, node, [read(v) for v in node.inputs])
                except QCompilerError:
                    raise
                except Exception as e:
                    raise QCompilerError(f"lowering {node.describe()} to Relax: {type(e).__name__}: {e}") from e
                if isinstance(out, Fused):
                    absorbed[id(out.requantize)] = out.expr
                    out = out.expr
                outs = out if isinstance(out, list) else [out]
                for value, expr in zip(node.outputs, outs):
                    env[id(value)] = expr
            results = [read(v) for v in graph.outputs]
            output = low.bb.emit_output(results[0] if len(results) == 1 else relax.Tuple(results))
        low.bb.emit_func_output(output)
    return low.bb.get()


# ---- elementwise -----------------------------------------------------------------------------------
_SIMPLE_UNARY = {"relu": R.nn.relu, "sigmoid": R.sigmoid, "tanh": R.tanh, "erf": R.erf, "exp": R.exp, "log": R.log,
                 "sqrt": R.sqrt, "rsqrt": R.rsqrt, "neg": R.negative, "abs": R.abs, "floor": R.floor, "ceil": R.ceil,
                 "sin": R.sin, "cos": R.cos, "logical_not": R.logical_not, "sign": R.sign, "isnan": R.isnan,
                 "isinf": R.isinf, "tan": R.tan, "asin": R.asin, "acos": R.acos, "atan": R.atan, "asinh": R.asinh,
                 "acosh": R.acosh, "atanh": R.atanh}


@lowers(*_SIMPLE_UNARY)
def _unary(low: Lowerer, node: Node, xs):
    return low.emit(_SIMPLE_UNARY[node.op](xs[0]))


@lowers("identity", "dropout")
def _identity(low, node, xs):
    return xs[0]


def activation(low: Lowerer, x: relax.Expr, act: str, args: tuple, dtype: str) -> relax.Expr:
    """A fused or standalone activation, by its IR name."""
    if act == "none":
        return x
    if act == "relu":
        return low.emit(R.nn.relu(x))
    if act == "clip":
        return low.emit(R.clip(x, float(args[0]), float(args[1])))
    if act == "sigmoid":
        return low.emit(R.sigmoid(x))
    if act == "tanh":
        return low.emit(R.tanh(x))
    if act == "silu":
        return low.emit(R.multiply(x, low.emit(R.sigmoid(x))))
    if act == "gelu":  # x/2 (1 + erf(x / sqrt 2)), with TVM's vectorizable erf (max error 3e-7)
        erf = low.bb.emit_te(topi.fast_erf, low.emit(R.multiply(x, low.scalar(0.7071067811865476, dtype))))
        return low.emit(R.multiply(low.emit(R.multiply(x, low.scalar(0.5, dtype))),
                                   low.emit(R.add(erf, low.scalar(1.0, dtype)))))
    if act == "gelu_tanh":
        return low.emit(R.nn.gelu_tanh(x))
    if act == "hardswish":  # x * clip(x / 6 + 0.5, 0, 1): the interpreter's arithmetic, rounding for rounding
        hs = low.emit(R.clip(low.emit(R.add(low.emit(R.divide(x, low.scalar(6.0, dtype))), low.scalar(0.5, dtype))),
                             0.0, 1.0))
        return low.emit(R.multiply(x, hs))
    if act == "hardsigmoid":
        alpha, beta = args
        return low.emit(R.clip(low.emit(R.add(low.emit(R.multiply(x, low.scalar(alpha, dtype))),
                                              low.scalar(beta, dtype))), 0.0, 1.0))
    raise QCompilerError(f"activation '{act}' has no Relax lowering")


@lowers("clip", "hardswish", "silu", "gelu")
def _activation_op(low, node, xs):
    dtype = TVM_DTYPE[node.output.dtype]
    if node.op == "clip":
        return activation(low, xs[0], "clip", (node.attrs["min"], node.attrs["max"]), dtype)
    if node.op == "gelu":
        return activation(low, xs[0], "gelu_tanh" if node.attrs["approximate"] == "tanh" else "gelu", (), dtype)
    return activation(low, xs[0], node.op, (), dtype)


@lowers("hardsigmoid")
def _hardsigmoid(low, node, xs):
    return activation(low, xs[0], "hardsigmoid", (node.attrs["alpha"], node.attrs["beta"]), TVM_DTYPE[node.output.dtype])


@lowers("leaky_relu")
def _leaky_relu(low, node, xs):
    return low.emit(R.nn.leakyrelu(xs[0], node.attrs["alpha"]))


@lowers("elu", "selu")
def _elu(low, node, xs):
    x, dtype = xs[0], TVM_DTYPE[node.output.dtype]
    alpha = node.attrs["alpha"]
    neg = low.emit(R.multiply(low.scalar(alpha, dtype), low.emit(R.subtract(low.emit(R.exp(x)), low.scalar(1, dtype)))))
    y = low.emit(R.where(low.emit(R.greater(x, low.scalar(0, dtype))), x, neg))
    return low.emit(R.multiply(y, low.scalar(node.attrs["gamma"], dtype))) if node.op == "selu" else y


@lowers("softplus")
def _softplus(low, node, xs):
    x, dtype = xs[0], TVM_DTYPE[node.output.dtype]
    # log(1 + e^x) = max(x, 0) + log(1 + e^-|x|), stable for large |x|
    return low.emit(R.add(low.emit(R.nn.relu(x)),
                          low.emit(R.log(low.emit(R.add(low.scalar(1, dtype),
                                                        low.emit(R.exp(low.emit(R.negative(low.emit(R.abs(x))))))))))))


@lowers("sinh", "cosh")
def _hyperbolic(low, node, xs):
    """(e^x - e^-x) / 2 and (e^x + e^-x) / 2: LLVM has no sinh/cosh intrinsic."""
    x, dtype = xs[0], TVM_DTYPE[node.output.dtype]
    up, down = low.emit(R.exp(x)), low.emit(R.exp(low.emit(R.negative(x))))
    return low.emit(R.multiply(low.emit((R.subtract if node.op == "sinh" else R.add)(up, down)), low.scalar(0.5, dtype)))


@lowers("shift_left", "shift_right")
def _shift(low, node, xs):
    """As the reference: an amount below 0 or of the width or more shifts every bit out (LLVM
    leaves such shifts undefined)."""
    a, b = xs
    dtype = TVM_DTYPE[node.output.dtype]
    bits = np.dtype(dtype).itemsize * 8
    out_of_range = low.emit(R.logical_or(low.emit(R.less(b, low.scalar(0, dtype))),
                                         low.emit(R.greater_equal(b, low.scalar(bits, dtype)))))
    amount = low.emit(R.where(out_of_range, low.scalar(0, dtype), b))
    if node.op == "shift_left":
        return low.emit(R.where(out_of_range, low.scalar(0, dtype), low.emit(R.left_shift(a, amount))))
    fill = low.emit(R.where(low.emit(R.less(a, low.scalar(0, dtype))), low.scalar(-1, dtype), low.scalar(0, dtype))) \
        if np.dtype(dtype).kind == "i" else low.scalar(0, dtype)
    return low.emit(R.where(out_of_range, fill, low.emit(R.right_shift(a, amount))))


@lowers("bitwise_not")
def _bitwise_not(low, node, xs):
    return low.emit(R.bitwise_not(xs[0]))


def _fmod_tensor(a: te.Tensor, b: te.Tensor) -> te.Tensor:
    """C's fmod for floats (exact: LLVM's frem); for integers the truncated remainder, 0 where b
    is 0 as numpy gives (a remainder by zero traps on x86)."""
    dtype = str(a.dtype)
    if dtype.startswith("float"):  # libm's (CUDA's) fmod: TVM's LLVM codegen has no fmod intrinsic
        wide = "float64" if dtype == "float64" else "float32"  # fmod of halves is exact in float32
        name = "fmod" if wide == "float64" else "fmodf"
        return te.compute(a.shape, lambda *i: tirx.call_pure_extern(wide, name, a[i].astype(wide),
                                                                     b[i].astype(wide)).astype(dtype), name="fmod")
    zero, one = tirx.const(0, dtype), tirx.const(1, dtype)
    return te.compute(a.shape, lambda *i: tirx.Select(b[i] == zero, zero,
                                                      tirx.truncmod(a[i], tirx.Select(b[i] == zero, one, b[i]))),
                      name="fmod")


@lowers("fmod")
def _fmod(low, node, xs):
    shape = list(node.output.shape)
    a, b = (x if tuple(v.shape) == tuple(shape) else low.emit(R.broadcast_to(x, shape))
            for x, v in zip(xs, node.inputs))
    return low.bb.emit_te(_fmod_tensor, a, b, primfunc_name_hint="fmod")


@lowers("round")
def _round(low, node, xs):
    return round_half_even(low, xs[0])


@lowers("reciprocal")
def _reciprocal(low, node, xs):
    return low.emit(R.divide(low.scalar(1, TVM_DTYPE[node.output.dtype]), xs[0]))


_BINARY = {"add": R.add, "sub": R.subtract, "mul": R.multiply, "pow": R.power, "maximum": R.maximum,
           "minimum": R.minimum, "equal": R.equal, "less": R.less, "less_equal": R.less_equal, "greater": R.greater,
           "greater_equal": R.greater_equal, "logical_and": R.logical_and, "logical_or": R.logical_or,
           "logical_xor": R.logical_xor, "bitwise_and": R.bitwise_and, "bitwise_or": R.bitwise_or,
           "bitwise_xor": R.bitwise_xor}


@lowers(*_BINARY)
def _binary(low, node, xs):
    return low.emit(_BINARY[node.op](xs[0], xs[1]))


@lowers("div")
def _div(low, node, xs):
    a, b = xs
    if node.inputs[0].dtype in ("f32", "f64", "f16"):
        return low.emit(R.divide(a, b))
    q = low.emit(R.floor_divide(low.emit(R.abs(a)), low.emit(R.abs(b))))  # truncate toward zero
    negative = low.emit(R.not_equal(low.emit(R.less(a, low.scalar(0, TVM_DTYPE[node.inputs[0].dtype]))),
                                    low.emit(R.less(b, low.scalar(0, TVM_DTYPE[node.inputs[1].dtype])))))
    return low.emit(R.where(negative, low.emit(R.negative(q)), q))


@lowers("where")
def _where(low, node, xs):
    return low.emit(R.where(*xs))


@lowers("cast")
def _cast(low, node, xs):
    return low.cast(xs[0], TVM_DTYPE[node.attrs["to"]])


@lowers("bitcast")
def _bitcast(low, node, xs):
    """A bool is one byte of 0 or 1: its bits as a byte are its value; other types are
    reinterpreted element by element."""
    to = TVM_DTYPE[node.attrs["to"]]
    if node.inputs[0].dtype == "bool" or node.attrs["to"] == "bool":
        return low.cast(xs[0], to)
    return low.bb.emit_te(lambda t: te.compute(t.shape, lambda *i: tirx.reinterpret(to, t[i]), name="bitcast"), xs[0],
                          primfunc_name_hint="bitcast")


# ---- nn --------------------------------------------------------------------------------------------
_CONVS = {1: R.nn.conv1d, 2: R.nn.conv2d, 3: R.nn.conv3d}  # by spatial rank, float and integer alike
_POOLS = {"max_pool1d": R.nn.max_pool1d, "max_pool2d": R.nn.max_pool2d, "max_pool3d": R.nn.max_pool3d,
          "avg_pool1d": R.nn.avg_pool1d, "avg_pool2d": R.nn.avg_pool2d, "avg_pool3d": R.nn.avg_pool3d}


@lowers("conv1d", "conv2d", "conv3d")
def _conv(low, node, xs):
    if low.bf16_variant == "amx" and amx_lower.conv2d_bf16_applies(low, node):
        y = amx_lower.conv2d_bf16(low, node, xs)
        return activation(low, y, node.attrs["activation"], node.attrs["activation_args"], "float32")
    if low.cpu_kernels and node.op == "conv2d" and kernel_lower.float_applies(low, node):
        y, rest = kernel_lower.float_conv2d(low, node, xs)
        return activation(low, y, node.attrs["activation"], node.attrs["activation_args"], "float32") if rest else y
    rank = traits_of(node.op).spatial_rank
    conv = _CONVS[rank]
    y = low.emit(conv(xs[0], xs[1], strides=node.attrs["strides"], padding=node.attrs["pads"],
                      dilation=node.attrs["dilations"], groups=node.attrs["groups"]))
    if len(xs) > 2:
        y = low.emit(R.add(y, low.emit(R.reshape(xs[2], (1, -1) + (1,) * rank))))
    return activation(low, y, node.attrs["activation"], node.attrs["activation_args"], TVM_DTYPE[node.output.dtype])


@lowers("conv_transpose1d", "conv_transpose2d", "conv_transpose3d")
def _conv_transpose(low, node, xs):
    rank = traits_of(node.op).spatial_rank
    conv = {1: R.nn.conv1d_transpose, 2: R.nn.conv2d_transpose, 3: R.nn.conv3d_transpose}[rank]
    y = low.emit(conv(xs[0], xs[1], strides=node.attrs["strides"], padding=node.attrs["pads"],
                      output_padding=node.attrs["output_padding"], dilation=node.attrs["dilations"],
                      groups=node.attrs["groups"]))
    if len(xs) > 2:
        y = low.emit(R.add(y, low.emit(R.reshape(xs[2], (1, -1) + (1,) * rank))))
    return y


@lowers("resize_nearest", "resize_linear", "resize_cubic")
def _resize(low, node, xs):
    """``image.resize2d``: its coordinate transformations and roundings are ONNX's, by name.
    Where the model's own scales drive the transform (resize2d derives them from the sizes), for
    cubic, and for align_corners onto one pixel (resize2d divides by size - 1), the reference's
    own plan: gathers of its indices (nearest) or products with its interpolation matrices."""
    nearest = "nearest_mode" in node.attrs
    x = node.inputs[0]
    if not nearest and x.dtype not in ("f16", "f32", "f64"):  # integers: in float64, truncated or rounded
        info = np.iinfo(DTYPES[x.dtype])
        y = _resize_in(low, node, low.cast(xs[0], "float64"), "float64")
        y = low.cast(round_half_even(low, y) if node.attrs["rounding"] == "half_even" else y, "int64")
        return _clip_cast(low, y, int(info.min), int(info.max), TVM_DTYPE[x.dtype])
    return _resize_in(low, node, xs[0], TVM_DTYPE[x.dtype])


def _resize_in(low: Lowerer, node: Node, image: relax.Expr, dtype: str) -> relax.Expr:
    """The resize of ``image`` (the node's input, as ``dtype``)."""
    nearest = "nearest_mode" in node.attrs
    x = node.inputs[0]
    mode = node.attrs["coordinate_transformation_mode"]
    (n, m), (w, p) = ((x.shape[2], node.attrs["size"][0]), (x.shape[3], node.attrs["size"][1]))
    reference_plan = node.attrs["scales"] or node.op == "resize_cubic" or node.attrs.get("antialias") or \
        (mode == "align_corners" and 1 in (m, p))
    if nearest and reference_plan:
        rounding = node.attrs["nearest_mode"]
        rows = low.emit(R.take(image, low.const(nearest_indices(n, m, mode, rounding, given_scale(node.attrs, 0))),
                               axis=2))
        return low.emit(R.take(rows, low.const(nearest_indices(w, p, mode, rounding, given_scale(node.attrs, 1))),
                               axis=3))
    if reference_plan:
        rows = low.const(interpolation_matrix(n, m, node.attrs, 0).astype(dtype))
        cols = low.const(interpolation_matrix(w, p, node.attrs, 1).T.astype(dtype))
        return low.emit(R.matmul(low.emit(R.matmul(rows, image)), cols))
    return low.emit(R.image.resize2d(image, tuple(node.attrs["size"]), layout="NCHW",
                                     method="nearest_neighbor" if nearest else "linear",
                                     coordinate_transformation_mode=node.attrs["coordinate_transformation_mode"],
                                     rounding_method=node.attrs["nearest_mode"] if nearest else ""))


@lowers("grid_sample")
def _grid_sample(low, node, xs):
    """TOPI's grid_sample reads the grid as [N, 2, H_out, W_out] (its Relax docstring says
    otherwise): transposed from ONNX's and torch's [N, H_out, W_out, 2]."""
    grid = low.emit(R.permute_dims(xs[1], [0, 3, 1, 2]))
    return low.emit(R.image.grid_sample(xs[0], grid, method=node.attrs["mode"], layout="NCHW",
                                        padding_mode=node.attrs["padding_mode"],
                                        align_corners=node.attrs["align_corners"]))


@lowers("batch_norm")
def _batch_norm(low, node, xs):
    x, scale, bias, mean, var = node.inputs
    shape = (-1,) + (1,) * (x.type.rank - 2)
    if all(v.is_constant for v in (scale, bias, mean, var)):
        inv = low.array(scale) / np.sqrt(low.array(var) + np.float32(node.attrs["epsilon"]))
        mul = low.const(inv.reshape(shape).astype(x.type.np_dtype))
        add = low.const((low.array(bias) - low.array(mean) * inv).reshape(shape).astype(x.type.np_dtype))
        return low.emit(R.add(low.emit(R.multiply(xs[0], mul)), add))
    eps = low.scalar(node.attrs["epsilon"], TVM_DTYPE[x.dtype])
    inv = low.emit(R.divide(xs[1], low.emit(R.sqrt(low.emit(R.add(xs[4], eps))))))
    centered = low.emit(R.subtract(xs[0], low.emit(R.reshape(xs[3], shape))))
    return low.emit(R.add(low.emit(R.multiply(centered, low.emit(R.reshape(inv, shape)))),
                          low.emit(R.reshape(xs[2], shape))))


@lowers(*_POOLS)
def _pool(low, node, xs):
    if low.cpu_kernels and kernel_lower.max_pool_applies(node):
        return kernel_lower.max_pool(low, node, xs)
    fn = _POOLS[node.op]
    kwargs = dict(pool_size=node.attrs["kernel"], strides=node.attrs["strides"], padding=node.attrs["pads"],
                  dilation=node.attrs["dilations"], ceil_mode=node.attrs["ceil_mode"])
    if "count_include_pad" in node.attrs:  # average pooling
        kwargs["count_include_pad"] = node.attrs["count_include_pad"]
        if node.inputs[0].dtype not in ("f32", "f64", "f16"):  # integer mean: round half to even
            x = low.cast(xs[0], "float64")
            return low.cast(round_half_even(low, low.emit(fn(x, **kwargs))), TVM_DTYPE[node.output.dtype])
    return low.emit(fn(xs[0], **kwargs))


@lowers("adaptive_avg_pool2d")
def _adaptive(low, node, xs):
    return low.emit(R.nn.adaptive_avg_pool2d(xs[0], node.attrs["output_size"]))


@lowers("linear")
def _linear(low, node, xs):
    if low.bf16_variant == "amx" and amx_lower.bf16_applies(low, node):
        y = amx_lower.linear_bf16(low, node, xs)
        return activation(low, y, node.attrs["activation"], node.attrs["activation_args"], "float32")
    if low.cpu_kernels and kernel_lower.float_applies(low, node):
        y, rest = kernel_lower.float_linear(low, node, xs)
        return activation(low, y, node.attrs["activation"], node.attrs["activation_args"], "float32") if rest else y
    y = low.emit(R.matmul(xs[0], low.emit(R.permute_dims(xs[1], [1, 0]))))
    if len(xs) > 2:
        y = low.emit(R.add(y, xs[2]))
    return activation(low, y, node.attrs["activation"], node.attrs["activation_args"], TVM_DTYPE[node.output.dtype])


@lowers("matmul")
def _matmul(low, node, xs):
    y = low.emit(R.matmul(xs[0], xs[1]))
    return activation(low, y, node.attrs["activation"], node.attrs["activation_args"], TVM_DTYPE[node.output.dtype])


@lowers("softmax", "log_softmax")
def _softmax(low, node, xs):
    """On the CPU over the last axis: one hand-written kernel (``cpu_softmax``). Elsewhere
    ``e = exp(x - max)``, then ``e / sum(e)`` or ``(x - max) - log(sum(e))``, with TOPI's
    polynomial ``fast_exp`` for float32 (``R.nn.softmax``'s exp is a scalar libm call per
    element: 3x slower on attention scores)."""
    axis = node.attrs["axis"]
    x = node.inputs[0]
    if x.dtype != "f32":
        fn = R.nn.softmax if node.op == "softmax" else R.nn.log_softmax
        return low.emit(fn(xs[0], axis=axis))
    if low.cpu_kernels and axis % x.type.rank == x.type.rank - 1:
        length = x.shape[-1]
        rows = int(np.prod(x.shape[:-1], dtype=np.int64))
        func = cpu_softmax.softmax_rows(rows, length, node.op == "log_softmax")
        y = kernel_lower.call_kernel(low, func, "cpu_" + node.op, [low.emit(R.reshape(xs[0], (rows, length)))],
                                     (rows, length), "float32")
        return low.emit(R.reshape(y, x.shape))
    shifted = low.emit(R.subtract(xs[0], low.emit(R.max(xs[0], axis=[axis], keepdims=True))))
    e = low.bb.emit_te(topi.fast_exp, shifted)
    total = low.emit(R.sum(e, axis=[axis], keepdims=True))
    if node.op == "softmax":
        return low.emit(R.divide(e, total))
    return low.emit(R.subtract(shifted, low.emit(R.log(total))))


@lowers("layer_norm")
def _layer_norm(low, node, xs):
    x = node.inputs[0]
    axis = node.attrs["axis"] % x.type.rank
    axes = list(range(axis, x.type.rank))
    norm_shape = x.shape[axis:]
    dtype = x.type.np_dtype
    gamma = xs[1] if len(xs) > 1 else low.const(np.ones(norm_shape, dtype))
    beta = xs[2] if len(xs) > 2 else low.const(np.zeros(norm_shape, dtype))
    return low.emit(R.nn.layer_norm(xs[0], gamma, beta, axes=axes, epsilon=node.attrs["epsilon"]))


# ---- data movement -----------------------------------------------------------------------------------
@lowers("reshape")
def _reshape(low, node, xs):
    return low.emit(R.reshape(xs[0], node.attrs["shape"]))


@lowers("transpose")
def _transpose(low, node, xs):
    return low.emit(R.permute_dims(xs[0], list(node.attrs["perm"])))


@lowers("concat")
def _concat(low, node, xs):
    return low.emit(R.concat(xs, axis=node.attrs["axis"]))


@lowers("slice")
def _slice(low, node, xs):
    x = node.inputs[0]
    y = xs[0]
    for start, end, axis, step in zip(node.attrs["starts"], node.attrs["ends"], node.attrs["axes"],
                                      node.attrs["steps"]):
        axis %= x.type.rank
        indices = np.arange(x.shape[axis])[slice(start, end, step)]
        if step == 1 and len(indices):
            y = low.emit(R.strided_slice(y, [axis], [int(indices[0])], [int(indices[-1]) + 1]))
        else:  # strided or backward: an explicit gather of the selected positions
            y = low.emit(R.take(y, low.const(indices.astype(np.int64)), axis=axis))
    return y


def _checked_indices(low, node: Node, index: Value, expr: relax.Expr, size: int) -> relax.Expr:
    """``expr`` (the run-time index operand ``index`` of ``node``) with negative entries wrapped,
    checked against ``[-size, size)`` inside the module (``index_check``): TVM's gathers read
    whatever an index points at. Constant indices were checked by the interpreter's kernel at
    capture and need no run-time check, only the wrap. On a GPU the indices are clamped into
    range instead (no foreign reads) and ``CompiledModel`` checks index inputs on the host."""
    dtype = TVM_DTYPE[index.dtype]
    if index.is_constant:
        array = low.array(index)
        return low.const(np.where(array < 0, array + size, array).astype(array.dtype))
    count = int(np.prod(index.shape, dtype=np.int64))
    if count == 0:
        return expr
    if not low.cpu_kernels:  # a GPU kernel cannot stop the call: clamp on the device, inputs are checked on the host
        wrapped = low.emit(R.where(low.emit(R.less(expr, low.scalar(0, dtype))),
                                   low.emit(R.add(expr, low.scalar(size, dtype))), expr))
        return low.emit(R.minimum(low.emit(R.maximum(wrapped, low.scalar(0, dtype))), low.scalar(size - 1, dtype)))
    message = f"{node.describe()}: index out of range for axis of size {size}"
    func = low.bb.add_func(checked_indices(count, size, dtype, message), "checked_indices")
    flat_shape = index.type.rank == 1
    flat = low.emit(relax.call_tir(func, [expr if flat_shape else low.emit(R.reshape(expr, [count]))],
                                   relax.TensorType([count], dtype)))
    return flat if flat_shape else low.emit(R.reshape(flat, list(index.shape)))


_TVM_SCATTER_REDUCTION = {"none": "update", "add": "add", "mul": "mul", "max": "max", "min": "min"}


@lowers("scatter_elements")
def _scatter_elements(low, node, xs):
    data, idx, _ = node.inputs
    axis = node.attrs["axis"] % data.type.rank
    return low.emit(R.scatter_elements(xs[0], _checked_indices(low, node, idx, xs[1], data.shape[axis]), xs[2],
                                       axis=axis, reduction=_TVM_SCATTER_REDUCTION[node.attrs["reduction"]]))


@lowers("scatter_nd")
def _scatter_nd(low, node, xs):
    data, idx, _ = node.inputs
    depth = idx.shape[-1]
    if any(data.shape[k] != data.shape[0] for k in range(depth)):  # one range check covers all index columns
        raise QCompilerError(f"{node.describe()}: scatter_nd over axes of different sizes has no Relax lowering yet")
    return low.emit(R.scatter_nd(xs[0], _checked_indices(low, node, idx, xs[1], data.shape[0]), xs[2],
                                 reduction=_TVM_SCATTER_REDUCTION[node.attrs["reduction"]]))


@lowers("gather")
def _gather(low, node, xs):
    data, idx = node.inputs
    axis = node.attrs["axis"] % data.type.rank
    return low.emit(R.take(xs[0], _checked_indices(low, node, idx, xs[1], data.shape[axis]), axis=axis))


@lowers("gather_elements")
def _gather_elements(low, node, xs):
    data, idx = node.inputs
    axis = node.attrs["axis"] % data.type.rank
    return low.emit(R.gather_elements(xs[0], _checked_indices(low, node, idx, xs[1], data.shape[axis]), axis=axis))


@lowers("index")
def _index(low, node, xs):
    data = node.inputs[0]
    indices = [_checked_indices(low, node, v, x, size) for v, x, size in zip(node.inputs[1:], xs[1:], data.shape)]
    return low.emit(R.index_tensor(xs[0], relax.Tuple(indices)))


@lowers("expand")
def _expand(low, node, xs):
    return low.emit(R.broadcast_to(xs[0], node.attrs["shape"]))


@lowers("tile")
def _tile(low, node, xs):
    return low.emit(R.tile(xs[0], node.attrs["repeats"]))


@lowers("pad")
def _pad(low, node, xs):
    x = node.inputs[0]
    pads, rank = node.attrs["pads"], x.type.rank
    y = xs[0]
    for axis in range(rank):  # negative pads crop first
        begin, end = max(0, -pads[axis]), x.shape[axis] - max(0, -pads[axis + rank])
        if (begin, end) != (0, x.shape[axis]):
            y = low.emit(R.strided_slice(y, [axis], [begin], [end]))
    mode = node.attrs["mode"]
    if mode != "constant":  # edge/reflect as gathers of computed positions (TVM's pad modes zero-fill)
        for axis in range(rank):
            begin, end = max(0, pads[axis]), max(0, pads[axis + rank])
            size = x.shape[axis] - max(0, -pads[axis]) - max(0, -pads[axis + rank])
            if begin or end:
                pos = np.arange(-begin, size + end)
                if mode == "edge":
                    pos = np.clip(pos, 0, size - 1)
                else:  # reflect without repeating the edge, as numpy's and ONNX's "reflect"
                    period = 2 * (size - 1)
                    pos = np.abs(pos) % period
                    pos = np.where(pos >= size, period - pos, pos)
                y = low.emit(R.take(y, low.const(pos.astype(np.int64)), axis=axis))
        return y
    width = [max(0, v) for i in range(rank) for v in (pads[i], pads[i + rank])]
    return low.emit(R.nn.pad(y, width, pad_value=node.attrs["value"]))


@lowers("einsum")
def _einsum(low, node, xs):
    return low.emit(R.einsum(xs, node.attrs["equation"].replace(" ", "")))


@lowers("topk")
def _topk(low, node, xs):
    both = low.emit(R.topk(xs[0], k=node.attrs["k"], axis=node.attrs["axis"], ret_type="both",
                           largest=node.attrs["largest"], dtype="int64"))
    return [low.emit(relax.TupleGetItem(both, 0)), low.emit(relax.TupleGetItem(both, 1))]


@lowers("split")
def _split(low, node, xs):
    """Parts with no elements are not built (none is read: ``to_relax`` refuses a read empty
    tensor); a split into one non-empty part is that part."""
    sizes = [s for s in node.attrs["sizes"] if s]
    if len(sizes) == 1:
        parts = [xs[0]]
    else:
        split = low.emit(R.split(xs[0], np.cumsum(sizes)[:-1].tolist(), axis=node.attrs["axis"]))
        parts = [low.emit(relax.TupleGetItem(split, i)) for i in range(len(sizes))]
    built = iter(parts)
    return [next(built) if s else None for s in node.attrs["sizes"]]


_REDUCE = {"reduce_mean": R.mean, "reduce_sum": R.sum, "reduce_max": R.max, "reduce_min": R.min,
           "reduce_prod": R.prod}


@lowers(*_REDUCE)
def _reduce(low, node, xs):
    axes = list(node.attrs["axes"]) or None
    x = node.inputs[0]
    if node.op == "reduce_mean" and x.dtype not in ("f32", "f64", "f16"):
        mean = low.emit(R.mean(low.cast(xs[0], "float64"), axis=axes, keepdims=node.attrs["keepdims"]))
        return low.cast(round_half_even(low, mean), TVM_DTYPE[x.dtype])
    y = low.emit(_REDUCE[node.op](xs[0], axis=axes, keepdims=node.attrs["keepdims"]))
    if node.op in ("reduce_max", "reduce_min") and x.dtype in ("f32", "f64", "f16"):
        # TOPI starts a max at the lowest finite float (a min at the highest): over nothing but
        # -inf it returns that, not -inf, and ONNX's masked-attention guard (row max == -inf) fails
        bound = low.scalar(float("-inf") if node.op == "reduce_max" else float("inf"), TVM_DTYPE[x.dtype])
        beyond = low.emit(R.max(low.cast(low.emit(R.not_equal(xs[0], bound)), "int8"), axis=axes,
                                keepdims=node.attrs["keepdims"]))
        y = low.emit(R.where(low.cast(beyond, "bool"), y, bound))
    return y


@lowers("argmax")
def _argmax(low, node, xs):
    return low.cast(low.emit(R.argmax(xs[0], axis=node.attrs["axis"], keepdims=node.attrs["keepdims"])), "int64")


# ---- quantization ------------------------------------------------------------------------------------
def round_half_even(low: Lowerer, x: relax.Expr) -> relax.Expr:
    """round(x), ties to even (``int_arith.round_half_even_tensor``)."""
    return low.bb.emit_te(int_arith.round_half_even_tensor, x, primfunc_name_hint="round_half_even")


def _axis_shaped(low: Lowerer, v: Value, x_rank: int, axis: int, dtype: str) -> relax.Expr:
    array = low.array(v).astype(dtype)
    if array.ndim == 1:
        shape = [1] * x_rank
        shape[axis % x_rank] = -1
        array = array.reshape(shape)
    return low.const(array)


def _clip_cast(low: Lowerer, y: relax.Expr, lo: int, hi: int, dtype: str) -> relax.Expr:
    y = low.emit(R.maximum(low.emit(R.minimum(y, low.scalar(hi, "int64"))), low.scalar(lo, "int64")))
    return low.cast(y, dtype)


@lowers("round_bf16")
def _round_bf16(low, node, xs):
    return low.bb.emit_te(bf16.round_bf16, xs[0], primfunc_name_hint="round_bf16")


@lowers("quantize")
def _quantize(low, node, xs):
    x, scale = node.inputs[0], node.inputs[1]
    zp_dtype = node.output.dtype
    info = np.iinfo(DTYPES[zp_dtype])
    axis = node.attrs["axis"] % max(x.type.rank, 1)
    shape = None
    if scale.type.rank == 1:
        shape = [1] * x.type.rank
        shape[axis] = -1
    s = low.cast(xs[1], "float32") if scale.dtype != "f32" else xs[1]
    s = low.emit(R.reshape(s, shape)) if shape else s
    z = (low.emit(R.reshape(xs[2], shape)) if shape else xs[2]) if len(xs) > 2 else None
    if info.bits == 8:
        return low.bb.emit_te(int_arith.quantize_8bit_tensor, low.cast(xs[0], "float32"), s, z, int(info.min),
                              int(info.max), TVM_DTYPE[zp_dtype], primfunc_name_hint="quantize")
    scaled = low.emit(R.divide(low.cast(xs[0], "float32"), s))
    q = low.cast(round_half_even(low, low.cast(scaled, "float64")), "int64")
    q = low.emit(R.add(q, low.cast(z, "int64"))) if z is not None else q
    return _clip_cast(low, q, int(info.min), int(info.max), TVM_DTYPE[zp_dtype])


def _as_rows(low: Lowerer, v: Value, x: relax.Expr) -> tuple[relax.Expr, int, int]:
    """``x`` (the value ``v``) viewed as ``[rows, last axis]``."""
    last = v.shape[-1]
    rows = int(np.prod(v.shape[:-1], dtype=np.int64))
    return low.emit(R.reshape(x, (rows, last))), rows, last


@lowers("quantize_rows")
def _quantize_rows(low, node, xs):
    x, rows, length = _as_rows(low, node.inputs[0], xs[0])
    if low.cpu_kernels:
        func = low.bb.add_func(dynamic_quant.quantize_rows_cpu(rows, length), "quantize_rows")
        both = low.emit(relax.call_tir(func, [x], [relax.TensorType((rows, length), "uint8"),
                                                   relax.TensorType((rows, 1), "float32")]))
    else:
        both = low.bb.emit_te(dynamic_quant.quantize_rows, x, primfunc_name_hint="quantize_rows")
    codes, scales = node.outputs
    return [low.emit(R.reshape(low.emit(relax.TupleGetItem(both, 0)), codes.shape)),
            low.emit(R.reshape(low.emit(relax.TupleGetItem(both, 1)), scales.shape))]


@lowers("dequantize_rows")
def _dequantize_rows(low, node, xs):
    x, rows, _ = _as_rows(low, node.inputs[0], xs[0])
    row = low.emit(R.reshape(xs[1], (rows, 1)))
    y = low.bb.emit_te(dynamic_quant.dequantize_rows, x, row, node.attrs["zero_point"], *xs[2:],
                       primfunc_name_hint="dequantize_rows")
    return low.emit(R.reshape(y, node.output.shape))


@lowers("dequantize")
def _dequantize(low, node, xs):
    x, scale = node.inputs[0], node.inputs[1]
    axis = node.attrs["axis"] % max(x.type.rank, 1)
    v = low.cast(xs[0], "int64")
    shape = None
    if scale.type.rank == 1:
        shape = [1] * x.type.rank
        shape[axis] = -1
    if len(xs) > 2:
        z = low.cast(xs[2], "int64")
        v = low.emit(R.subtract(v, low.emit(R.reshape(z, shape)) if shape else z))
    s = low.emit(R.reshape(xs[1], shape)) if shape else xs[1]
    out = TVM_DTYPE[node.output.dtype]
    return low.emit(R.multiply(low.cast(low.cast(v, "float32"), out), s))


def _axis_operand(low: Lowerer, v: Value, expr: relax.Expr, rank: int, axis: int, dtype: str) -> relax.Expr:
    """A per-tensor or per-``axis`` parameter (zero point, scale) shaped to broadcast against a
    rank-``rank`` tensor: a constant folded in, or computed at run time (DynamicQuantizeLinear's
    zero point, a QLinear op's scales given as inputs)."""
    if v.is_constant:
        return _axis_shaped(low, v, rank, axis, dtype)
    value = low.cast(expr, dtype)
    return low.emit(R.reshape(value, [-1 if i == axis % rank else 1 for i in range(rank)])) if v.type.rank else value


def _centered(low: Lowerer, x: relax.Expr, zp: Value, zp_expr: relax.Expr, rank: int, axis: int) -> relax.Expr:
    """x - zp in int32."""
    return low.emit(R.subtract(low.cast(x, "int32"), _axis_operand(low, zp, zp_expr, rank, axis, "int32")))


def _int8_kernel(low: Lowerer, node: Node, xs: list[relax.Expr]) -> relax.Expr | Fused | None:
    """The node on the target's hand-scheduled int8 kernels, or None where they do not apply."""
    kernels = low.int8_kernels
    if kernels is None or not kernels.applies(low, node):
        return None
    return (kernels.conv2d if node.op == "conv2d_int" else kernels.linear)(low, node, xs)


@lowers("conv1d_int", "conv2d_int", "conv3d_int")
def _conv_int(low, node, xs):
    fast = _int8_kernel(low, node, xs) if node.op == "conv2d_int" else None
    if fast is not None:
        return fast
    rank = traits_of(node.op).spatial_rank
    conv = _CONVS[rank]
    x = _centered(low, xs[0], node.inputs[1], xs[1], rank + 2, 1)
    w = _centered(low, xs[2], node.inputs[3], xs[3], rank + 2, 0)
    y = low.emit(conv(x, w, strides=node.attrs["strides"], padding=node.attrs["pads"], dilation=node.attrs["dilations"],
                      groups=node.attrs["groups"], out_dtype="int32"))
    if len(xs) > 4:
        y = low.emit(R.add(y, low.emit(R.reshape(xs[4], (1, -1) + (1,) * rank))))
    return y


@lowers("linear_int")
def _linear_int(low, node, xs):
    fast = _int8_kernel(low, node, xs)
    if fast is not None:
        return fast
    x = _centered(low, xs[0], node.inputs[1], xs[1], node.inputs[0].type.rank, 0)
    w = _centered(low, xs[2], node.inputs[3], xs[3], 2, 0)
    y = low.emit(R.matmul(x, low.emit(R.permute_dims(w, [1, 0])), out_dtype="int32"))
    return low.emit(R.add(y, xs[4])) if len(xs) > 4 else y


@lowers("matmul_int")
def _matmul_int(low, node, xs):
    kernels = low.int8_kernels
    if kernels is not None and kernels.matmul_applies(low, node):
        return kernels.matmul(low, node, xs)
    a = _centered(low, xs[0], node.inputs[1], xs[1], node.inputs[0].type.rank, 0)
    b = _centered(low, xs[2], node.inputs[3], xs[3], node.inputs[2].type.rank, -1)
    return low.emit(R.matmul(a, b, out_dtype="int32"))


@lowers("requantize")
def _requantize(low, node, xs):
    zp = node.inputs[3]
    info = np.iinfo(DTYPES[node.output.dtype])
    return low.bb.emit_te(int_arith.requantize_tensor, xs[0], xs[1], xs[2], node.attrs["axis"],
                          node.attrs["input_zero_point"], int(low.array(zp)) if zp.is_constant else xs[3],
                          max(int(info.min), node.attrs["min"]), min(int(info.max), node.attrs["max"]),
                          TVM_DTYPE[node.output.dtype])


@lowers("requantize_f32")
def _requantize_f32(low, node, xs):
    zp = node.inputs[2]
    info = np.iinfo(DTYPES[node.output.dtype])
    return low.bb.emit_te(int_arith.requantize_f32_tensor, xs[0], xs[1], node.attrs["axis"],
                          node.attrs["input_zero_point"], int(low.array(zp)) if zp.is_constant else xs[2],
                          max(int(info.min), node.attrs["min"]), min(int(info.max), node.attrs["max"]),
                          TVM_DTYPE[node.output.dtype])


_ADDS = {"add_int": int_arith.add_int_tensor, "add_int_f32": int_arith.add_int_f32_tensor}


@lowers(*_ADDS)
def _add_int(low, node, xs):
    zp = node.inputs[2]
    if not zp.is_constant:
        raise QCompilerError(f"{node.describe()}: the output zero point must be a constant to lower to Relax")
    info = np.iinfo(DTYPES[node.output.dtype])
    return low.bb.emit_te(_ADDS[node.op], xs[0], xs[1], node.output.shape, dict(node.attrs),
                          int(low.array(zp)), max(int(info.min), node.attrs["min"]),
                          min(int(info.max), node.attrs["max"]), TVM_DTYPE[node.output.dtype])


@lowers("rescale")
def _rescale(low, node, xs):
    x = node.inputs[0]
    scale = _axis_operand(low, node.inputs[1], xs[1], x.type.rank, node.attrs["axis"], "float64")
    y = round_half_even(low, low.emit(R.multiply(low.cast(xs[0], "float64"), scale)))
    y = low.emit(R.add(low.cast(y, "int64"), low.cast(xs[2], "int64")))
    info = np.iinfo(DTYPES[node.output.dtype])
    return _clip_cast(low, y, int(info.min), int(info.max), TVM_DTYPE[node.output.dtype])
