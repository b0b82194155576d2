"""Capture from PyTorch: ``torch.export`` (functionalized ATen) -> IR.

The exported graph is walked once to find every op that depends on a user input; ops that do
not (masks from buffers, ``arange``, weight views) are run by torch itself and become
constants. Every ATen op that remains must have a converter below; any that lack one are
reported together, before anything is built."""
from __future__ import annotations

import math
import operator
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.fx

from ..errors import ModelLoadError, QCompilerError, UnsupportedOpError
from ..ir import Graph, TensorType, Value, dtype_name
from ..ir.verify import verify_graph
from ..registrar import registrar
from .builder import AVG_POOL, CONV, CONV_TRANSPOSE, MAX_POOL, GraphBuilder

aten = torch.ops.aten
Converter = Callable[["_Ctx", torch.fx.Node, list[Any]], Any]
_CONVERTERS: dict[str, Converter] = {}
converts = registrar(_CONVERTERS)
# ops that produce nothing used downstream (runtime asserts); skipped
_IGNORED = {"_assert_tensor_metadata", "_assert_scalar", "sym_constrain_range_for_size", "_assert_async"}
# ops whose result depends only on the (static) shape of their tensor input, never its values
_SHAPE_ONLY = {"zeros_like", "ones_like", "full_like", "empty_like", "new_zeros", "new_ones", "new_full",
               "new_empty", "scalar_tensor"}
# ops that pass their input through unchanged (functional graph, inference)
_PASS_THROUGH = {"clone", "alias", "contiguous", "detach", "lift_fresh_copy", "dropout", "feature_dropout",
                 "alpha_dropout"}


def _packet(node: torch.fx.Node) -> str:
    """``aten.conv2d.default`` -> ``conv2d``; ``operator.getitem`` -> ``getitem``."""
    target = node.target
    if target is operator.getitem:
        return "getitem"
    name = getattr(target, "__name__", str(target))
    return name.split(".")[0]


def _source(node: torch.fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    path = list(stack.values())[-1][0] if stack else ""
    return path or node.name


def _describe(node: torch.fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    path = list(stack.values())[-1][0] if stack else ""
    return f"{node.name}" + (f" in {path}" if path else "")


class _Ctx(GraphBuilder):
    """Conversion state: FX node -> IR value(s)."""

    def __init__(self, graph: Graph):
        super().__init__(graph)
        self.env: dict[torch.fx.Node, Any] = {}

    def value(self, arg: Any, like: Value | None = None) -> Value:
        """An FX argument as an IR value; python scalars become constants typed like ``like``."""
        if isinstance(arg, torch.fx.Node):
            v = self.env[arg]
            if not isinstance(v, Value):
                raise QCompilerError(f"{arg.name}: expected a tensor, got {type(v).__name__}")
            return v
        if isinstance(arg, (bool, int, float)):
            if like is not None and not (isinstance(arg, float) and like.dtype not in ("f32", "f64", "f16")):
                return self.scalar_like(arg, like.type)
            return self.const(np.asarray(arg, np.float32 if isinstance(arg, float) else np.int64), "scalar")
        raise QCompilerError(f"unsupported argument {arg!r}")


def _meta_type(node: torch.fx.Node) -> TensorType | None:
    val = node.meta.get("val")
    if isinstance(val, torch.Tensor):
        return TensorType(tuple(int(d) for d in val.shape), dtype_name(_np_dtype(val.dtype)))
    return None


def _np_dtype(dtype: torch.dtype) -> np.dtype:
    return torch.empty((), dtype=dtype).numpy().dtype


def _materialize(value: Any) -> Any:
    """Turn torch results of constant evaluation into numpy (recursively for tuples)."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    if isinstance(value, (list, tuple)):
        return type(value)(_materialize(v) for v in value)
    return value


def from_torch(module: torch.nn.Module, example_inputs: Sequence[Any] | Any = (),
               example_kwargs: dict[str, Any] | None = None, *, name: str = "main") -> Graph:
    """Capture ``module`` (put in eval mode) at the shapes of ``example_inputs``."""
    if not isinstance(module, torch.nn.Module):
        raise ModelLoadError(f"from_torch expects a torch.nn.Module, got {type(module).__name__}")
    args = tuple(example_inputs) if isinstance(example_inputs, (list, tuple)) else (example_inputs,)
    module_name = type(module).__name__
    module.eval()
    try:
        with torch.no_grad():
            exported = torch.export.export(module, args, example_kwargs or {})
            exported = exported.run_decompositions({})
    except Exception as e:  # torch raises many types; the user needs the first line
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ModelLoadError(f"torch.export failed for {module_name}: {type(e).__name__}: {first}") from e
    return _convert(exported, module_name, name)


def _convert(exported: "torch.export.ExportedProgram", module_name: str, name: str) -> Graph:
    fx = exported.graph
    sig = exported.graph_signature
    state = {**exported.state_dict, **exported.constants}
    graph = Graph(name)
    ctx = _Ctx(graph)

    # placeholders: parameters/buffers/constants become named constants, user inputs inputs
    kinds = {spec.arg.name: spec for spec in sig.input_specs}
    depends: set[torch.fx.Node] = set()
    for node in fx.nodes:
        if node.op != "placeholder":
            continue
        spec = kinds[node.name]
        if spec.kind.name == "USER_INPUT":
            t = _meta_type(node)
            if t is None:
                raise ModelLoadError(f"{module_name}: input '{node.name}' is not a tensor")
            ctx.env[node] = graph.add_input(node.name, t)
            depends.add(node)
        else:
            tensor = state[spec.target]
            ctx.env[node] = ctx.const(tensor.detach().cpu().numpy().copy(), spec.target)

    # which nodes depend on user inputs, and which of those we cannot convert
    unsupported: dict[str, list[str]] = {}
    for node in fx.nodes:
        if node.op != "call_function":
            continue
        op = _packet(node)
        if any(a in depends for a in node.all_input_nodes) and op not in _SHAPE_ONLY:
            depends.add(node)
            if op not in _CONVERTERS and op not in _IGNORED and op not in _PASS_THROUGH:
                unsupported.setdefault(f"aten.{op}", []).append(_describe(node))
    if unsupported:
        raise UnsupportedOpError(f"torch model {module_name}", unsupported)

    for node in fx.nodes:
        if node.op == "call_function":
            op = _packet(node)
            ctx.source = _source(node)
            if op in _IGNORED:
                continue
            if node not in depends and op != "getitem":
                _evaluate_constant(ctx, node)
                continue
            args = list(node.args)
            try:
                if op in _PASS_THROUGH:
                    result = ctx.env[args[0]]
                else:
                    result = _CONVERTERS[op](ctx, node, args)
            except QCompilerError as e:
                raise QCompilerError(f"{module_name}: converting {_describe(node)} ({node.target}): {e}") from None
            except (TypeError, ValueError, KeyError, IndexError) as e:
                raise QCompilerError(f"{module_name}: cannot convert {_describe(node)} ({node.target}): {e}") from e
            ctx.env[node] = result
            expected = _meta_type(node)
            if expected is not None and isinstance(result, Value) and result.type != expected:
                raise QCompilerError(f"{module_name}: internal: {_describe(node)} ({node.target}) converted to "
                                     f"{result.type}, torch says {expected}")
        elif node.op == "output":
            outs = [ctx.value(a) for a in node.args[0]]
            graph.set_outputs(outs)
    graph.remove_unused_constants()
    verify_graph(graph, where=f"torch model {module_name}")
    return graph


def _evaluate_constant(ctx: _Ctx, node: torch.fx.Node) -> None:
    """Run a node that depends on no user input with torch and keep the result as constant."""
    op = _packet(node)
    if op in _SHAPE_ONLY:
        val = node.meta["val"]
        fill = {"zeros_like": 0, "new_zeros": 0, "ones_like": 1, "new_ones": 1}.get(op)
        if fill is None:
            fill = node.args[1] if op in ("full_like", "new_full") else 0
        ctx.env[node] = ctx.const(np.full(tuple(val.shape), fill, _np_dtype(val.dtype)), node.name)
        return

    def concrete(a: Any) -> Any:
        if isinstance(a, torch.fx.Node):
            v = ctx.env[a]
            return torch.from_numpy(ctx.array(v).copy()) if isinstance(v, Value) else v
        if isinstance(a, (list, tuple)):
            return type(a)(concrete(x) for x in a)
        return a

    with torch.no_grad():
        result = _materialize(node.target(*concrete(list(node.args)), **concrete(dict(node.kwargs))))
    if isinstance(result, np.ndarray):
        ctx.env[node] = ctx.const(result, node.name)
    elif isinstance(result, (list, tuple)):
        ctx.env[node] = [ctx.const(r, node.name) if isinstance(r, np.ndarray) else r for r in result]
    else:
        ctx.env[node] = result


# ---- converters ---------------------------------------------------------------------------------
def _arg(node: torch.fx.Node, args: list[Any], index: int, key: str, default: Any) -> Any:
    if len(args) > index:
        return args[index]
    return node.kwargs.get(key, default)


def _out_type(node: torch.fx.Node) -> TensorType:
    t = _meta_type(node)
    if t is None:
        raise QCompilerError("no tensor metadata")
    return t


@converts("getitem")
def _getitem(ctx: _Ctx, node, args):
    item = ctx.env[args[0]][args[1]]
    if item is None:
        raise QCompilerError(f"output {args[1]} of {args[0].name} is not supported")
    return item


_UNARY = {"relu": "relu", "sigmoid": "sigmoid", "tanh": "tanh", "hardswish": "hardswish", "silu": "silu",
          "erf": "erf", "exp": "exp", "log": "log", "sqrt": "sqrt", "rsqrt": "rsqrt", "neg": "neg",
          "abs": "abs", "reciprocal": "reciprocal", "logical_not": "logical_not", "floor": "floor",
          "ceil": "ceil", "sin": "sin", "cos": "cos", "tan": "tan", "asin": "asin", "acos": "acos", "atan": "atan",
          "sinh": "sinh", "cosh": "cosh", "asinh": "asinh", "acosh": "acosh", "atanh": "atanh", "sign": "sign"}


@converts(*_UNARY)
def _unary(ctx: _Ctx, node, args):
    x = ctx.value(args[0])
    if _UNARY[_packet(node)] not in ("logical_not",) and x.dtype != _out_type(node).dtype:
        x = ctx.cast(x, _out_type(node).dtype)  # e.g. sqrt of an integer tensor
    return ctx.emit1(_UNARY[_packet(node)], [x])


@converts("softplus")
def _softplus(ctx, node, args):
    """softplus(x, beta=1, threshold=20): log(1 + exp(beta x)) / beta, and x where beta x > threshold."""
    x = ctx.value(args[0])
    beta, threshold = float(_arg(node, args, 1, "beta", 1.0)), float(_arg(node, args, 2, "threshold", 20.0))
    scaled = x if beta == 1 else ctx.emit1("mul", [x, ctx.scalar_like(beta, x.type)])
    y = ctx.emit1("softplus", [scaled])
    if beta != 1:
        y = ctx.emit1("div", [y, ctx.scalar_like(beta, x.type)])
    linear = ctx.emit1("greater", [scaled, ctx.scalar_like(threshold, x.type)])
    return ctx.emit1("where", [linear, x, y])


@converts("hardsigmoid")
def _hardsigmoid(ctx, node, args):
    return ctx.emit1("hardsigmoid", [ctx.value(args[0])])


@converts("gelu")
def _gelu(ctx, node, args):
    return ctx.emit1("gelu", [ctx.value(args[0])], {"approximate": node.kwargs.get("approximate", "none")},
                    )


@converts("leaky_relu")
def _leaky_relu(ctx, node, args):
    return ctx.emit1("leaky_relu", [ctx.value(args[0])], {"alpha": _arg(node, args, 1, "negative_slope", 0.01)},
                    )


@converts("elu")
def _elu(ctx, node, args):
    if _arg(node, args, 2, "scale", 1) != 1 or _arg(node, args, 3, "input_scale", 1) != 1:
        raise QCompilerError("elu with scale != 1 is not supported")
    return ctx.emit1("elu", [ctx.value(args[0])], {"alpha": _arg(node, args, 1, "alpha", 1.0)})


@converts("linalg_vector_norm")
def _vector_norm(ctx, node, args):
    """||x||_2 over dims: sqrt(sum(x * x))."""
    x = ctx.value(args[0])
    if _arg(node, args, 1, "ord", 2) != 2:
        raise QCompilerError("only the 2-norm is supported")
    dims = _arg(node, args, 2, "dim", None) or list(range(x.type.rank))
    dims = [dims] if isinstance(dims, int) else list(dims)
    squares = ctx.emit1("mul", [x, x])
    total = ctx.emit1("reduce_sum", [squares], {"axes": dims, "keepdims": bool(_arg(node, args, 3, "keepdim", False))})
    return ctx.emit1("sqrt", [total])


@converts("relu6", "hardtanh", "clamp", "clamp_min", "clamp_max")
def _clip(ctx, node, args):
    op = _packet(node)
    if op == "relu6":
        lo, hi = 0.0, 6.0
    elif op == "hardtanh":
        lo, hi = _arg(node, args, 1, "min_val", -1.0), _arg(node, args, 2, "max_val", 1.0)
    elif op == "clamp_min":
        lo, hi = args[1], None
    elif op == "clamp_max":
        lo, hi = None, args[1]
    else:
        lo, hi = _arg(node, args, 1, "min", None), _arg(node, args, 2, "max", None)
    if isinstance(lo, torch.fx.Node) or isinstance(hi, torch.fx.Node):
        raise QCompilerError("clamp with tensor bounds is not supported")
    x = ctx.value(args[0])
    if x.dtype not in ("f32", "f64", "f16"):
        out = x
        if lo is not None:
            out = ctx.emit1("maximum", [out, ctx.scalar_like(lo, x.type)])
        if hi is not None:
            out = ctx.emit1("minimum", [out, ctx.scalar_like(hi, x.type)])
        return out
    return ctx.emit1("clip", [x], {"min": -math.inf if lo is None else lo, "max": math.inf if hi is None else hi},
                    )


_BINARY = {"add": "add", "sub": "sub", "mul": "mul", "div": "div", "pow": "pow", "maximum": "maximum",
           "minimum": "minimum", "eq": "equal", "lt": "less", "le": "less_equal", "gt": "greater",
           "ge": "greater_equal", "__and__": "logical_and", "bitwise_and": "logical_and", "__or__": "logical_or",
           "bitwise_or": "logical_or", "logical_and": "logical_and", "logical_or": "logical_or", "ne": "ne",
           "rsub": "rsub", "bitwise_xor": "logical_xor", "__xor__": "logical_xor", "logical_xor": "logical_xor",
           "fmod": "fmod", "remainder": "remainder", "multiply": "mul", "subtract": "sub", "divide": "div",
           "true_divide": "div"}
# on integers the bitwise ops are bitwise (on bools, the logical ones above)
_BITWISE = {"__and__": "bitwise_and", "bitwise_and": "bitwise_and", "__or__": "bitwise_or", "bitwise_or": "bitwise_or",
            "__xor__": "bitwise_xor", "bitwise_xor": "bitwise_xor"}


@converts(*_BINARY)
def _binary(ctx: _Ctx, node, args):
    op = _packet(node)
    out_t = _out_type(node)
    a_arg, b_arg = args[0], args[1]
    if op == "rsub":
        a_arg, b_arg = b_arg, a_arg
    tensor = next(ctx.value(x) for x in (a_arg, b_arg) if isinstance(x, torch.fx.Node))
    a, b = ctx.value(a_arg, like=tensor), ctx.value(b_arg, like=tensor)
    # torch promotes mixed operands; the IR wants one dtype: cast both to the computation type
    compute = out_t.dtype if out_t.dtype != "bool" or op in (*_BITWISE, "logical_and", "logical_or",
                                                             "logical_xor") else None
    if compute is None:
        dtypes = {a.dtype, b.dtype}
        compute = a.dtype if len(dtypes) == 1 else next((d for d in ("f64", "f32", "f16") if d in dtypes), "i64")
    a, b = ctx.cast(a, compute), ctx.cast(b, compute)
    alpha = node.kwargs.get("alpha", args[2] if len(args) > 2 and op in ("add", "sub", "rsub") else 1)
    if alpha != 1:
        b = ctx.emit1("mul", [b, ctx.scalar_like(alpha, b.type)])
    mode = node.kwargs.get("rounding_mode") if op == "div" else None
    if mode is not None:
        is_float = compute in ("f32", "f64", "f16")
        if (mode == "floor") != is_float:  # float trunc / integer floor: no IR op does it in one step
            raise QCompilerError(f"div with rounding_mode='{mode}' on {compute} is not supported")
        q = ctx.emit1("div", [a, b])
        return ctx.emit1("floor", [q]) if is_float else q
    if op == "ne":
        return ctx.emit1("logical_not", [ctx.emit1("equal", [a, b])])
    if op == "rsub":
        return ctx.emit1("sub", [a, b])
    if op == "remainder":
        return ctx.python_remainder(a, b)
    if op in _BITWISE and compute != "bool":
        return ctx.emit1(_BITWISE[op], [a, b])
    return ctx.emit1(_BINARY[op], [a, b])


@converts("where")
def _where(ctx, node, args):
    out_t = _out_type(node)
    cond = ctx.value(args[0])
    tensors = [ctx.value(x) for x in args[1:] if isinstance(x, torch.fx.Node)]
    like = tensors[0] if tensors else None
    a, b = (ctx.cast(ctx.value(x, like=like), out_t.dtype) for x in args[1:3])
    return ctx.emit1("where", [cond, a, b])


@converts("masked_fill")
def _masked_fill(ctx, node, args):
    """``x.masked_fill(mask, value)`` = ``where(mask, value, x)`` (attention masks)."""
    x = ctx.value(args[0])
    fill = ctx.cast(ctx.value(args[2], like=x), x.dtype)
    return ctx.emit1("where", [ctx.value(args[1]), fill, x])


@converts("bitwise_not")
def _bitwise_not(ctx, node, args):
    x = ctx.value(args[0])
    if x.dtype in ("f16", "f32", "f64"):
        raise QCompilerError(f"bitwise_not of {x.dtype} is not supported (only of integers and bool)")
    return ctx.emit1("logical_not" if x.dtype == "bool" else "bitwise_not", [x])


@converts("_to_copy", "to", "type_as")
def _to_copy(ctx, node, args):
    return ctx.cast(ctx.value(args[0]), _out_type(node).dtype)


def _window(value: Any, rank: int, default: Any = None) -> list[int]:
    if value is None or (isinstance(value, (list, tuple)) and not value):
        value = default
    if isinstance(value, int):
        return [value] * rank
    value = list(value)
    return value * rank if len(value) == 1 else value


@converts("conv1d", "conv2d", "conv3d", "convolution")
def _conv(ctx, node, args):
    op = _packet(node)
    x, w = ctx.value(args[0]), ctx.value(args[1])
    rank = w.type.rank - 2
    if op == "convolution":
        if args[6]:
            return _emit_conv_transpose(ctx, x, w, args[2], args[3], args[4], args[7], args[8], args[5])
        stride, padding, dilation, groups = args[3], args[4], args[5], args[8]
    else:
        stride = _arg(node, args, 3, "stride", 1)
        padding = _arg(node, args, 4, "padding", 0)
        dilation = _arg(node, args, 5, "dilation", 1)
        groups = _arg(node, args, 6, "groups", 1)
    bias = _arg(node, args, 2, "bias", None)
    stride, dilation = _window(stride, rank), _window(dilation, rank)
    if isinstance(padding, str):
        if padding == "valid":
            pads = [0] * (2 * rank)
        else:  # 'same' (stride 1): total = dilation*(k-1), extra on the end, as torch does
            totals = [dilation[i] * (w.shape[2 + i] - 1) for i in range(rank)]
            pads = [t // 2 for t in totals] + [t - t // 2 for t in totals]
    else:
        p = _window(padding, rank)
        pads = p + p
    if rank not in CONV:
        raise QCompilerError(f"conv with {rank} spatial dims is not supported")
    inputs = [x, w] + ([ctx.value(bias)] if bias is not None else [])
    return ctx.emit1(CONV[rank], inputs, {"strides": stride, "pads": pads, "dilations": dilation,
                                              "groups": groups})


@converts("conv_transpose1d", "conv_transpose2d", "conv_transpose3d")
def _conv_transpose(ctx, node, args):
    x, w = ctx.value(args[0]), ctx.value(args[1])
    return _emit_conv_transpose(ctx, x, w, _arg(node, args, 2, "bias", None), _arg(node, args, 3, "stride", 1),
                                _arg(node, args, 4, "padding", 0), _arg(node, args, 5, "output_padding", 0),
                                _arg(node, args, 6, "groups", 1), _arg(node, args, 7, "dilation", 1))


def _emit_conv_transpose(ctx, x: Value, w: Value, bias, stride, padding, output_padding, groups, dilation) -> Value:
    """torch's symmetric ``padding`` crops both ends of each axis."""
    rank = w.type.rank - 2
    if rank not in CONV_TRANSPOSE:
        raise QCompilerError(f"transposed convolution with {rank} spatial dims is not supported")
    p = _window(padding, rank)
    inputs = [x, w] + ([ctx.value(bias)] if bias is not None else [])
    return ctx.emit1(CONV_TRANSPOSE[rank], inputs, {"strides": _window(stride, rank), "pads": p + p,
                                    "dilations": _window(dilation, rank), "groups": int(groups),
                                    "output_padding": _window(output_padding, rank)})


@converts("im2col")
def _im2col(ctx, node, args):
    """im2col(x, kernel_size, dilation, padding, stride): nn.Unfold (ConvBERT's span convolution)."""
    kernel, dilation, padding, stride = (_window(a, 2) for a in args[1:5])
    return ctx.unfolded(ctx.value(args[0]), kernel, dilation, padding + padding, stride)


@converts("col2im")
def _col2im(ctx, node, args):
    """col2im(cols, output_size, kernel_size, dilation, padding, stride): nn.Fold."""
    size, kernel, dilation, padding, stride = (_window(a, 2) for a in args[1:6])
    return ctx.folded(ctx.value(args[0]), size, kernel, dilation, padding + padding, stride)


@converts("batch_norm", "_native_batch_norm_legit_no_training", "native_batch_norm")
def _batch_norm(ctx, node, args):
    op = _packet(node)
    if op == "batch_norm":
        training, eps = args[5], args[7]
    elif op == "native_batch_norm":
        training, eps = args[5], args[7]
    else:
        training, eps = False, args[6]
    if training:
        raise QCompilerError("batch norm in training mode (call module.eval())")
    y = _inference_batch_norm(ctx, ctx.value(args[0]), *args[1:5], eps)
    return y if op == "batch_norm" else (y, None, None)


def _inference_batch_norm(ctx, x: Value, weight, bias, mean, var, eps: float) -> Value:
    """batch_norm with running statistics; no weight or bias (affine=False) is ones or zeros."""
    c = x.shape[1]
    weight = ctx.value(weight) if weight is not None else ctx.const(np.ones(c, x.type.np_dtype), "bn.ones")
    bias = ctx.value(bias) if bias is not None else ctx.const(np.zeros(c, x.type.np_dtype), "bn.zeros")
    return ctx.emit1("batch_norm", [x, weight, bias, ctx.value(mean), ctx.value(var)], {"epsilon": float(eps)})


def _optional(ctx, arg):
    """The IR value of an optional tensor argument (None where torch passed none)."""
    return None if arg is None else ctx.value(arg)


@converts("group_norm")
def _group_norm(ctx, node, args):
    """group_norm(x, num_groups, weight=None, bias=None, eps=1e-5)."""
    x = ctx.value(args[0])
    weight, bias = (_arg(node, args, i, key, None) for i, key in ((2, "weight"), (3, "bias")))
    return ctx.group_normalized(x, int(args[1]), float(_arg(node, args, 4, "eps", 1e-5)), _optional(ctx, weight),
                                _optional(ctx, bias))


@converts("instance_norm")
def _instance_norm(ctx, node, args):
    """instance_norm(x, weight, bias, running_mean, running_var, use_input_stats, momentum, eps):
    each sample's channel over its positions; with running statistics, the batch norm they make."""
    x, (weight, bias, mean, var, use_input_stats, _, eps) = ctx.value(args[0]), args[1:8]
    if not use_input_stats:
        return _inference_batch_norm(ctx, x, weight, bias, mean, var, eps)
    return ctx.group_normalized(x, x.shape[1], float(eps), _optional(ctx, weight), _optional(ctx, bias))


@converts("roll")
def _roll(ctx, node, args):
    """roll(x, shifts, dims=[]): no dims rolls the flattened tensor (Swin's shifted windows give dims)."""
    x = ctx.value(args[0])
    shifts, dims = args[1], _arg(node, args, 2, "dims", [])
    shifts = [shifts] if isinstance(shifts, int) else list(shifts)
    dims = [dims] if isinstance(dims, int) else list(dims)
    if not dims:
        return ctx.reshape(ctx.rolled(ctx.reshape(x, (x.type.size,)), shifts, [0]), x.shape)
    return ctx.rolled(x, shifts, dims)


def _pool_attrs(node, args, rank: int, avg: bool) -> dict[str, Any]:
    kernel = _window(args[1], rank)
    stride = _window(_arg(node, args, 2, "stride", None), rank, kernel)
    padding = _window(_arg(node, args, 3, "padding", 0), rank)
    attrs: dict[str, Any] = {"kernel": kernel, "strides": stride, "pads": padding + padding}
    if avg:
        attrs["ceil_mode"] = bool(_arg(node, args, 4, "ceil_mode", False))
        attrs["count_include_pad"] = bool(_arg(node, args, 5, "count_include_pad", True))
        if _arg(node, args, 6, "divisor_override", None) is not None:
            raise QCompilerError("avg_pool with divisor_override is not supported")
    else:
        attrs["dilations"] = _window(_arg(node, args, 4, "dilation", 1), rank)
        attrs["ceil_mode"] = bool(_arg(node, args, 5, "ceil_mode", False))
    return attrs


@converts("max_pool1d", "max_pool2d", "max_pool2d_with_indices", "avg_pool1d", "avg_pool2d")
def _pool(ctx, node, args):
    op = _packet(node)
    rank = 1 if "1d" in op else 2
    avg = op.startswith("avg")
    y = ctx.emit1((AVG_POOL if avg else MAX_POOL)[rank], [ctx.value(args[0])], _pool_attrs(node, args, rank, avg),
                 )
    return (y, None) if op.endswith("with_indices") else y


@converts("upsample_nearest2d", "upsample_bilinear2d", "upsample_bicubic2d", "_upsample_nearest_exact2d",
          "_upsample_bilinear2d_aa", "_upsample_bicubic2d_aa")
def _upsample(ctx, node, args):
    """torch's interpolate on NCHW images: ``nearest`` reads ``floor(o * in / out)`` (ONNX
    asymmetric + floor), ``nearest-exact`` rounds half up from the pixel centre (half_pixel +
    round_prefer_ceil), bilinear is half_pixel (align_corners=True: align_corners), bicubic the
    same with Keys' a = -0.75. With a ``scale_factor`` whose sizes are fractional, torch maps
    coordinates by that factor, not by out / in: the IR op is given it as ``scales``.
    ``antialias=True`` is ONNX's antialias with the taps outside the image dropped (and a = -0.5
    for bicubic, as PIL)."""
    op = _packet(node)
    antialias = op.endswith("_aa")
    x = ctx.value(args[0])
    size = list(_out_type(node).shape[2:])
    nearest = "nearest" in op
    align = False if nearest else bool(args[2]) if len(args) > 2 else False
    factors = args[2 if nearest else 3] if len(args) > (2 if nearest else 3) else None
    attrs: dict[str, Any] = {"size": size}
    if factors and not align and any(f * n != m for f, n, m in zip(factors, x.shape[2:], size)):
        attrs["scales"] = [float(f) for f in factors]
    if nearest:
        exact = op.startswith("_upsample_nearest_exact")
        return ctx.emit1("resize_nearest", [x], {**attrs, "coordinate_transformation_mode": "half_pixel" if exact
                                                  else "asymmetric", "nearest_mode": "round_prefer_ceil" if exact else "floor"})
    if antialias:
        if align:
            raise QCompilerError("interpolate with antialias=True and align_corners=True is not supported")
        attrs.update(antialias=True, exclude_outside=True)
    if "bicubic" in op:
        return ctx.emit1("resize_cubic", [x], {**attrs, "coordinate_transformation_mode": "align_corners" if align
                                                else "half_pixel", "cubic_coeff_a": -0.5 if antialias else -0.75})
    # half_pixel, not ONNX's pytorch_half_pixel: torch has no special case for an output of one pixel
    return ctx.emit1("resize_linear", [x], {**attrs, "coordinate_transformation_mode": "align_corners" if align else
                                            "half_pixel"})


@converts("einsum")
def _einsum(ctx, node, args):
    return ctx.emit1("einsum", [ctx.value(a) for a in args[1]], {"equation": str(args[0])})


@converts("topk")
def _topk(ctx, node, args):
    if not _arg(node, args, 4, "sorted", True):
        raise QCompilerError("topk with sorted=False is not supported")
    attrs = {"k": int(args[1]), "axis": int(_arg(node, args, 2, "dim", -1)),
             "largest": bool(_arg(node, args, 3, "largest", True))}
    values, indices = ctx.emit("topk", [ctx.value(args[0])], attrs)
    return values, indices


@converts("adaptive_avg_pool1d", "adaptive_avg_pool2d", "_adaptive_avg_pool2d")
def _adaptive_pool(ctx, node, args):
    x = ctx.value(args[0])
    rank = x.type.rank - 2
    out = _window(args[1], rank)
    spatial = list(x.shape[2:])
    if all(o == 1 for o in out):
        return ctx.emit1("reduce_mean", [x], {"axes": list(range(2, 2 + rank)), "keepdims": True})
    if all(s % o == 0 for s, o in zip(spatial, out)):
        k = [s // o for s, o in zip(spatial, out)]
        return ctx.emit1(AVG_POOL[rank], [x], {"kernel": k, "strides": k})
    if rank != 2:
        raise QCompilerError("adaptive_avg_pool1d with a non-dividing output size is not supported")
    return ctx.emit1("adaptive_avg_pool2d", [x], {"output_size": out})


@converts("linear")
def _linear(ctx, node, args):
    inputs = [ctx.value(args[0]), ctx.value(args[1])]
    bias = _arg(node, args, 2, "bias", None)
    if bias is not None:
        inputs.append(ctx.value(bias))
    return ctx.emit1("linear", inputs)


@converts("matmul", "mm", "bmm")
def _matmul(ctx, node, args):
    return ctx.emit1("matmul", [ctx.value(args[0]), ctx.value(args[1])])


@converts("addmm", "baddbmm")
def _addmm(ctx, node, args):
    """beta * input + alpha * (a @ b) (BLOOM's attention scores: baddbmm with alpha 1/sqrt(d))."""
    beta, alpha = node.kwargs.get("beta", 1), node.kwargs.get("alpha", 1)
    y = ctx.emit1("matmul", [ctx.value(args[1]), ctx.value(args[2])])
    if alpha != 1:
        y = ctx.emit1("mul", [y, ctx.scalar_like(alpha, y.type)])
    if beta == 0:  # torch ignores the input then (NaN in it included)
        return y
    base = ctx.value(args[0])
    if beta != 1:
        base = ctx.emit1("mul", [base, ctx.scalar_like(beta, base.type)])
    return ctx.emit1("add", [y, base])


@converts("softmax", "_softmax", "log_softmax", "_log_softmax")
def _softmax(ctx, node, args):
    op = "log_softmax" if "log" in _packet(node) else "softmax"
    x = ctx.value(args[0])
    out_dtype = _out_type(node).dtype
    return ctx.emit1(op, [ctx.cast(x, out_dtype)], {"axis": args[1]})


@converts("layer_norm", "native_layer_norm")
def _layer_norm(ctx, node, args):
    x = ctx.value(args[0])
    normalized = list(args[1])
    weight = _arg(node, args, 2, "weight", None)
    bias = _arg(node, args, 3, "bias", None)
    eps = _arg(node, args, 4, "eps", 1e-5)
    inputs = [x]
    if weight is not None or bias is not None:
        inputs.append(ctx.value(weight) if weight is not None else
                      ctx.const(np.ones(normalized, x.type.np_dtype), "ln.ones"))
    if bias is not None:
        inputs.append(ctx.value(bias))
    y = ctx.emit1("layer_norm", inputs, {"axis": -len(normalized), "epsilon": eps})
    return y if _packet(node) == "layer_norm" else (y, None, None)


@converts("view", "reshape", "_unsafe_view", "flatten", "squeeze", "unsqueeze", "view_as", "reshape_as",
          "unflatten")
def _reshape(ctx, node, args):
    return ctx.reshape(ctx.value(args[0]), _out_type(node).shape)


@converts("permute", "transpose", "t", "numpy_T")
def _permute(ctx, node, args):
    x = ctx.value(args[0])
    op = _packet(node)
    if op == "permute":
        perm = [d % max(x.type.rank, 1) for d in args[1]]
    else:
        perm = list(range(x.type.rank))
        a, b = (args[1], args[2]) if op == "transpose" else (0, 1) if x.type.rank == 2 else (0, 0)
        if op == "numpy_T":
            perm = perm[::-1]
        else:
            perm[a], perm[b] = perm[b], perm[a]
    if perm == list(range(x.type.rank)):
        return x
    return ctx.emit1("transpose", [x], {"perm": perm})


@converts("cat", "concat")
def _cat(ctx, node, args):
    out_t = _out_type(node)
    tensors = [ctx.cast(ctx.value(t), out_t.dtype) for t in args[0] if ctx.value(t).type.size or len(args[0]) == 1]
    return ctx.emit1("concat", tensors, {"axis": _arg(node, args, 1, "dim", 0)})


@converts("stack")
def _stack(ctx, node, args):
    """stack(tensors, dim=0): each tensor given a new axis ``dim``, joined along it."""
    out_t = _out_type(node)
    return ctx.stack([ctx.cast(ctx.value(t), out_t.dtype) for t in args[0]], _arg(node, args, 1, "dim", 0) % out_t.rank)


@converts("slice")
def _slice(ctx, node, args):
    x = ctx.value(args[0])
    dim = _arg(node, args, 1, "dim", 0) % x.type.rank
    start = _arg(node, args, 2, "start", None)
    end = _arg(node, args, 3, "end", None)
    step = _arg(node, args, 4, "step", 1)
    size = x.shape[dim]
    start, end, step = slice(start, end, step).indices(size)
    if (start, end, step) == (0, size, 1):
        return x
    return ctx.emit1("slice", [x], {"starts": [start], "ends": [end], "axes": [dim], "steps": [step]},
                    )


@converts("select")
def _select(ctx, node, args):
    x = ctx.value(args[0])
    dim = args[1] % x.type.rank
    index = args[2] % x.shape[dim]
    y = ctx.emit1("slice", [x], {"starts": [index], "ends": [index + 1], "axes": [dim], "steps": [1]})
    return ctx.reshape(y, _out_type(node).shape)


@converts("embedding")
def _embedding(ctx, node, args):
    return ctx.emit1("gather", [ctx.value(args[0]), ctx.value(args[1])], {"axis": 0})


@converts("repeat")
def _repeat(ctx, node, args):
    """x.repeat(*sizes): the tensor tiled; more sizes than axes add leading axes first."""
    x, sizes = ctx.value(args[0]), [int(r) for r in args[1]]
    x = ctx.reshape(x, (1,) * (len(sizes) - x.type.rank) + x.shape)
    return ctx.emit1("tile", [x], {"repeats": sizes})


@converts("index_select")
def _index_select(ctx, node, args):
    """index_select(x, dim, index): whole slices of ``x`` along ``dim`` at a 1-D ``index``."""
    x = ctx.value(args[0])
    return ctx.emit1("gather", [x, ctx.value(args[2])], {"axis": int(args[1]) % x.type.rank})


@converts("repeat_interleave")
def _repeat_interleave(ctx, node, args):
    """repeat_interleave(x, repeats: int, dim): each slice along ``dim`` repeated in place
    (Canine's downsampling), as a new axis after ``dim`` expanded and merged into it."""
    if len(args) < 2 or not isinstance(args[1], int):
        raise QCompilerError("repeat_interleave with a tensor of repeats has a data-dependent shape; give an int")
    x, repeats = ctx.value(args[0]), int(args[1])
    dim = _arg(node, args, 2, "dim", None)
    if dim is None:
        x, dim = ctx.reshape(x, (x.type.size,)), 0
    dim %= x.type.rank
    spread = x.shape[:dim + 1] + (1,) + x.shape[dim + 1:]
    wide = ctx.emit1("expand", [ctx.reshape(x, spread)], {"shape": spread[:dim + 1] + (repeats,) + spread[dim + 2:]})
    return ctx.reshape(wide, _out_type(node).shape)


@converts("gather")
def _gather(ctx, node, args):
    return ctx.emit1("gather_elements", [ctx.value(args[0]), ctx.value(args[2])], {"axis": args[1]})


@converts("index")
def _index(ctx, node, args):
    """x[i0, i1, ...] (advanced indexing). Axes skipped with None (``x[:, idx]``) are moved
    behind the indexed ones for the IR's leading-axes ``index``; as torch does, the indexed
    result's axes then go back where the indexed axes were if those were adjacent, else first."""
    x, indices = ctx.value(args[0]), list(args[1])
    axes = [a for a, i in enumerate(indices) if i is not None]
    idx = [ctx.value(indices[a]) for a in axes]
    if any(i.dtype == "bool" for i in idx):
        raise QCompilerError("boolean-mask indexing has a data-dependent shape")
    if axes == list(range(len(axes))):
        return ctx.emit1("index", [x] + idx)
    rest = [a for a in range(x.type.rank) if a not in axes]
    picked = ctx.emit1("index", [ctx.emit1("transpose", [x], {"perm": axes + rest})] + idx)
    if axes != list(range(axes[0], axes[-1] + 1)):
        return picked  # not adjacent: the indexed axes first, as torch puts them
    depth, before = picked.type.rank - len(rest), axes[0]  # the broadcast index's axes, the skipped leading ones
    perm = list(range(depth, depth + before)) + list(range(depth)) + list(range(depth + before, picked.type.rank))
    return ctx.emit1("transpose", [picked], {"perm": perm})


@converts("expand", "expand_as", "broadcast_to")
def _expand(ctx, node, args):
    x = ctx.value(args[0])
    shape = _out_type(node).shape
    if x.shape == shape:
        return x
    return ctx.emit1("expand", [x], {"shape": shape})


@converts("mean", "sum", "amax", "amin", "max", "min", "prod")
def _reduce(ctx, node, args):
    op = _packet(node)
    x = ctx.value(args[0])
    if op in ("max", "min") and len(args) == 1:
        dims, keep = [], False
    elif op in ("max", "min"):
        if isinstance(args[1], torch.fx.Node):  # elementwise max(a, b)
            return ctx.emit1("maximum" if op == "max" else "minimum", [x, ctx.value(args[1])])
        raise QCompilerError(f"{op}.dim returns indices; not supported")
    else:
        dims = _arg(node, args, 1, "dim", None)
        keep = bool(_arg(node, args, 2, "keepdim", False))
    if dims is None:
        dims = []
    if isinstance(dims, int):
        dims = [dims]
    out_dtype = _out_type(node).dtype
    name = {"mean": "reduce_mean", "sum": "reduce_sum", "amax": "reduce_max", "amin": "reduce_min",
            "max": "reduce_max", "min": "reduce_min", "prod": "reduce_prod"}[op]
    return ctx.emit1(name, [ctx.cast(x, out_dtype)], {"axes": list(dims), "keepdims": keep})


@converts("cumsum")
def _cumsum(ctx, node, args):
    """torch.cumsum(x, dim, dtype=None): integers sum in int64 unless ``dtype`` says otherwise."""
    x = ctx.cast(ctx.value(args[0]), _out_type(node).dtype)
    return ctx.running_sum(x, int(_arg(node, args, 1, "dim", 0)))


@converts("argmax")
def _argmax(ctx, node, args):
    x = ctx.value(args[0])
    dim = _arg(node, args, 1, "dim", None)
    keep = bool(_arg(node, args, 2, "keepdim", False))
    if dim is None:
        x, dim = ctx.reshape(x, (x.type.size,)), 0
    return ctx.emit1("argmax", [x], {"axis": dim, "keepdims": keep})


@converts("split", "split_with_sizes", "chunk", "unbind")
def _split(ctx, node, args):
    op = _packet(node)
    x = ctx.value(args[0])
    outs = node.meta["val"]
    dim = _arg(node, args, 1 if op == "unbind" else 2, "dim", 0) % x.type.rank
    sizes = [int(o.shape[dim]) if op != "unbind" else 1 for o in outs]
    pieces = ctx.emit("split", [x], {"axis": dim, "sizes": sizes})
    if op == "unbind":
        pieces = [ctx.reshape(p, tuple(o.shape)) for p, o in zip(pieces, outs)]
    return pieces


@converts("constant_pad_nd", "pad")
def _pad(ctx, node, args):
    x = ctx.value(args[0])
    torch_pad = list(args[1])
    mode = node.kwargs.get("mode", args[2] if len(args) > 2 and isinstance(args[2], str) else "constant")
    value = _arg(node, args, 2 if _packet(node) == "constant_pad_nd" else 3, "value", 0.0) or 0.0
    rank = x.type.rank
    pads = [0] * (2 * rank)
    for i in range(len(torch_pad) // 2):  # torch lists the last dim first
        axis = rank - 1 - i
        pads[axis], pads[axis + rank] = torch_pad[2 * i], torch_pad[2 * i + 1]
    mode = {"replicate": "edge"}.get(mode, mode)
    return ctx.emit1("pad", [x], {"pads": pads, "mode": mode, "value": float(value)})


@converts("scaled_dot_product_attention")
def _sdpa(ctx, node, args):
    """softmax(q @ k^T * scale + mask) @ v, as the IR's own ops, so quantization sees the
    matmuls and the mask stays a visible (float) add."""
    q, k, v = (ctx.value(a) for a in args[:3])
    mask = _arg(node, args, 3, "attn_mask", None)
    if _arg(node, args, 4, "dropout_p", 0.0):
        raise QCompilerError("attention dropout at inference")
    if _arg(node, args, 5, "is_causal", False):
        raise QCompilerError("is_causal attention is not supported (pass an explicit mask)")
    if node.kwargs.get("enable_gqa"):
        raise QCompilerError("grouped-query attention is not supported")
    scale = node.kwargs.get("scale") or 1.0 / math.sqrt(q.shape[-1])
    perm = list(range(k.type.rank))
    perm[-1], perm[-2] = perm[-2], perm[-1]
    kt = ctx.emit1("transpose", [k], {"perm": perm})
    scores = ctx.emit1("matmul", [q, kt])
    scores = ctx.emit1("mul", [scores, ctx.scalar_like(scale, scores.type)])
    if mask is not None:
        m = ctx.value(mask)
        if m.dtype == "bool":
            scores = ctx.emit1("where", [m, scores, ctx.scalar_like(-math.inf, scores.type)])
        else:
            scores = ctx.emit1("add", [scores, ctx.cast(m, scores.dtype)])
    probs = ctx.emit1("softmax", [scores], {"axis": -1})
    return ctx.emit1("matmul", [probs, v])
