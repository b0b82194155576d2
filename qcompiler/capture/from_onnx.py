"""Capture from ONNX through onnx-graphsurgeon.

Handles opsets 6 to the installed onnx package's newest: where an operand moved from attribute to input across opsets
(Clip, Squeeze, Slice, Pad, Split, Reduce*), both forms are read. Nodes that depend on no
graph input (``Shape`` of a static tensor, ``Range``, ``ConstantOfShape``, weight transposes)
are evaluated at import and become constants; for those with no converter the ONNX
reference implementation evaluates them. QuantizeLinear/DequantizeLinear become the IR's
quantize/dequantize."""
from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import onnx

from ..errors import ModelLoadError, QCompilerError, UnsupportedOpError
from ..ir import Graph, TensorType, Value, dtype_name
from ..ir.types import DTYPES, MAX_CONSTANT_BYTES
from ..ir.verify import verify_graph
from ..registrar import registrar
from ..ir.ops.resize import COORDINATE_MODES
from . import recurrent
from .builder import AVG_POOL, CONV, CONV_INT, CONV_TRANSPOSE, MAX_POOL, GraphBuilder, resolve_shape
from .onnx_functions import expand_functions

Converter = Callable[["_Ctx", Any, list["Value | None"]], "list[Value] | Value"]
_CONVERTERS: dict[str, Converter] = {}
converts = registrar(_CONVERTERS)
# depend on the static shape (or sequence length, or presence) of their input, never its values
_SHAPE_ONLY = {"Shape", "Size", "EyeLike", "SequenceLength", "OptionalHasElement"}
# operands (by position) that must be known at import: shapes, axes, bounds, pads
_STATIC_OPERANDS = {"LSTM": (1, 2, 3, 4), "GRU": (1, 2, 3, 4), "RNN": (1, 2, 3, 4), "TopK": (1,), "Resize": (1, 2, 3), "Upsample": (1,), "CumSum": (1,), "CumProd": (1,), "ReduceL1": (1,),
                    "ReduceLogSum": (1,), "ReduceLogSumExp": (1,), "Reshape": (1,), "Expand": (1,), "Slice": (1, 2, 3, 4), "Squeeze": (1,), "Unsqueeze": (1,),
                    "Pad": (1, 2, 3), "Split": (1,), "Tile": (1,), "OneHot": (1,), "ConstantOfShape": (0,), "ReduceMean": (1,),
                    "ReduceSum": (1,), "ReduceMax": (1,), "ReduceL2": (1,), "ReduceSumSquare": (1,), "ReduceMin": (1,), "ReduceProd": (1,),
                    "Compress": (1,), "MaxUnpool": (2,), "DFT": (1, 2), "STFT": (1, 3), "Col2Im": (1, 2),
                    "Dropout": (2,),
                    "SequenceAt": (1,), "SequenceInsert": (2,), "SequenceErase": (1,), "SplitToSequence": (1,)}

# ops whose subgraphs are inlined or unrolled at import, and how many leading operands decide
# what runs (If's condition, Loop's trip count and condition): those must be known then
_CONTROL_FLOW = {"If": 1, "Loop": 2, "Scan": 0, "SequenceMap": 0}
# operands needed at import along with a static one, when it is computed: a training_mode that is
# known only once given makes Dropout read its ratio
_STATIC_ALONG = {("Dropout", 2): (1,)}
# operator sets a model may import without the ONNX one (its nodes then are those sets' only)
_DOMAINS_WITHOUT_ONNX = {"ai.onnx.preview.training", "com.microsoft"}
# ops whose result is a shape-defining constant (a range, a window): evaluated at import, so
# their operands must be known then
_IMPORT_TIME_ONLY = {"Range", "HannWindow", "HammingWindow", "BlackmanWindow", "MelWeightMatrix"}


class _Ctx(GraphBuilder):
    def __init__(self, graph: Graph, opset: int):
        super().__init__(graph)
        self.opset = opset
        self.bf16_values: set[int] = set()  # f32 values holding a Cast-to-bfloat16's result (see _cast)

    def const_input(self, v: Value | None, node: Any, what: str) -> np.ndarray | None:
        """An operand that must be known at import (shape, axes, pads, slice bounds)."""
        if v is None:
            return None
        if not v.is_constant:
            raise QCompilerError(f"{node.op} '{node.name}': {what} must be a constant, not computed at run time")
        return self.array(v)


def _load(model: "str | os.PathLike | onnx.ModelProto") -> tuple[onnx.ModelProto, str]:
    if isinstance(model, onnx.ModelProto):
        return model, model.graph.name or "<ModelProto>"
    path = Path(model)
    if not path.exists():
        raise ModelLoadError(f"{path}: no such file")
    try:
        proto = onnx.load(str(path))
    except Exception as e:  # protobuf DecodeError and friends
        raise ModelLoadError(f"{path}: not a readable ONNX model ({type(e).__name__}: "
                             f"{(str(e).splitlines() or [''])[0]})") from None
    if not proto.graph.node and not proto.graph.output:
        raise ModelLoadError(f"{path}: not an ONNX model (no graph)")
    return proto, str(path)


def input_names(model: "str | os.PathLike | onnx.ModelProto") -> list[str]:
    """The model's data inputs (initializers excluded), in order: what ``input_shapes`` names."""
    proto, _ = _load(model)
    weights = {t.name for t in proto.graph.initializer}
    return [v.name for v in proto.graph.input if v.name not in weights]


def from_onnx(model: "str | os.PathLike | onnx.ModelProto",
              input_shapes: Mapping[str, Any] | None = None, *, name: str = "main",
              input_values: Mapping[str, Any] | None = None) -> Graph:
    """Import an ONNX model. Dynamic input dimensions must be fixed with ``input_shapes``; a
    sequence input is given as its elements' shapes (``[[2, 3], [2, 3]]``: two elements, inputs
    ``name.0`` and ``name.1``), an optional input as its shape or None (no value).
    ``input_values`` fixes the value of inputs that give a shape, axes, sizes or a trip count
    (what static shapes need known): each becomes a constant and is no longer an input."""
    import onnx_graphsurgeon as gs

    gs.logger.G_LOGGER.severity = gs.logger.G_LOGGER.ERROR  # its warnings (float8, 'colored') are not the user's
    proto, where = _load(model)
    proto = onnx_contrib.in_runtime_domain(proto)
    try:
        onnx.checker.check_model(proto)
    except Exception as e:
        raise ModelLoadError(f"{where}: invalid ONNX model: {(str(e).strip().splitlines() or [''])[0]}") from None
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)
    newest = onnx.defs.onnx_opset_version()
    domains = sorted({o.domain for o in proto.opset_import})
    if opset == 0 and set(domains) <= _DOMAINS_WITHOUT_ONNX:  # read with the newest ONNX ops' meanings
        opset = newest
    if opset == 0:
        raise ModelLoadError(f"{where}: imports no ONNX operator set, only {domains}: not supported")
    if not 1 <= opset <= newest:
        raise ModelLoadError(f"{where}: ONNX opset {opset} is not supported (1 to {newest})")
    structured = {v.name: v for v in proto.graph.input if value_kind(v.type) != ("tensor",)}  # sequences, optionals
    if input_values:
        proto = _bind_inputs(proto, input_values, where)
    if proto.functions:
        proto = onnx.inliner.inline_local_functions(proto)
    proto, _ = expand_functions(proto, opset, _has_converter)
    gsg = gs.import_onnx(proto)
    graph = Graph(name)
    ctx = _Ctx(graph, opset)
    env: dict[str, Value] = {}
    input_shapes = dict(input_shapes or {})

    gsg.toposort()
    depends: dict[str, frozenset[str]] = {t.name: frozenset([t.name]) for t in gsg.inputs}  # value -> inputs behind it
    unsupported: dict[str, list[str]] = {}
    bindable: set[str] = set()  # the inputs behind run-time shape operands

    def scan(nodes: Sequence[Any]) -> None:
        """Which values depend on which inputs (a subgraph's reads of outer values count), and
        which of the nodes computing them have no converter."""
        for node in nodes:
            behind = frozenset().union(*(depends.get(name, frozenset()) for name in _reads(node)))
            if node.op in _SHAPE_ONLY or not behind:
                continue
            depends.update((t.name, behind) for t in node.outputs)
            key = _key(node)
            label = node.name or node.outputs[0].name
            if key in _CONTROL_FLOW:
                decided = [t.name for t in node.inputs[:_CONTROL_FLOW[key]] if t.name in depends]
                if decided:  # what decides the branch or the step count
                    what = "condition" if key == "If" else "trip count or condition"
                    unsupported.setdefault(f"{key} ({what} computed from the inputs)", []).append(label)
                    bindable.update(*(depends[name] for name in decided))
                for body in node.subgraphs():  # If: both branches (which one runs is known once converting)
                    depends.update((t.name, behind) for t in body.inputs if key != "Loop" or t is not body.inputs[0])
                    scan(body.nodes)
            elif key in _IMPORT_TIME_ONLY:  # evaluated at import by the ONNX reference, once its inputs are known
                unsupported.setdefault(f"{key} (operands computed at run time)", []).append(label)
                bindable.update(behind)
            elif key not in _CONVERTERS:
                unsupported.setdefault(key, []).append(label)
            else:  # static shapes: a shape/axes/bounds operand computed from an input is dynamic
                computed = [i for i in _STATIC_OPERANDS.get(key, ())
                            if i < len(node.inputs) and node.inputs[i].name in depends]
                dynamic = [node.inputs[j].name for i in computed for j in (i, *_STATIC_ALONG.get((key, i), ()))
                           if node.inputs[j].name in depends]
                if dynamic:
                    unsupported.setdefault(f"{key} (run-time shape operand)", []).append(label)
                    bindable.update(*(depends[name] for name in dynamic))

    scan(gsg.nodes)
    if opset < OLDEST_READ_OPSET:
        _refuse_changed_since(gsg.nodes, opset, unsupported)
    if unsupported:
        raise UnsupportedOpError(where, unsupported, sorted(bindable))

    for tensor in gsg.inputs:
        if tensor.name in structured:
            env[tensor.name] = structured_input(graph, structured[tensor.name], input_shapes.pop(tensor.name, MISSING),
                                                where)
            continue
        shape = input_shapes.pop(tensor.name, tensor.shape)
        if shape is None or any(not isinstance(d, (int, np.integer)) or d < 0 for d in shape):
            raise ModelLoadError(f"{where}: input '{tensor.name}' has dynamic shape {list(shape or [])}; "
                                 f"fix it with --input-shape {tensor.name}=D0,D1,... on the command line "
                                 f"(input_shapes={{'{tensor.name}': [...]}} in Python)")
        try:
            dtype = dtype_name(tensor.dtype)
        except ValueError:
            raise ModelLoadError(f"{where}: input '{tensor.name}' has unsupported dtype {_dtype_label(tensor.dtype)} "
                                 f"(inputs are f16/f32/f64, i8/i16/i32/i64, u8/u16/u32/u64 or bool)") from None
        env[tensor.name] = graph.add_input(_value_name(tensor.name), TensorType(tuple(shape), dtype))
    if input_shapes:
        raise ModelLoadError(f"{where}: --input-shape/input_shapes names unknown input(s) {sorted(input_shapes)}; "
                             f"the model's inputs are {[t.name for t in gsg.inputs]}")

    consumed = {t.name for n in gsg.nodes for t in n.inputs if t.name} | {t.name for t in gsg.outputs}

    def operand(tensor: Any) -> Value | None:
        if not tensor.name:  # an omitted optional input
            return None
        if tensor.name in env:
            return env[tensor.name]
        if isinstance(tensor, gs.Constant):
            array = widened(np.asarray(tensor.values), f"{where}: initializer '{tensor.name}'")
            env[tensor.name] = ctx.const(array, _value_name(tensor.name))
            return env[tensor.name]
        raise ModelLoadError(f"{where}: tensor '{tensor.name}' is used but never produced")

    def convert(nodes: Sequence[Any]) -> None:
        for node in nodes:
            ctx.source = node.name or node.outputs[0].name
            inputs = [operand(t) for t in node.inputs]
            held = next((t.name for t, v in zip(node.inputs, inputs) if id(v) in ctx.bf16_values), None)
            if held is not None and node.op != "Cast":
                raise QCompilerError(f"{where}: {node.op} '{ctx.source}' reads the bfloat16 tensor '{held}': "
                                     f"qcompiler has no bf16 tensors, only Casts of one (Cast to bf16 and back "
                                     f"around a float op is a bf16 layer)")
            try:
                if _key(node) == "If":
                    result = inline_if(node, inputs)
                elif _key(node) in ("Scan", "Loop"):
                    result = (unroll_scan if node.op == "Scan" else unroll_loop)(ctx, node, inputs, run_body)
                elif _key(node) == "SequenceMap":
                    result = map_sequences(ctx, node, inputs, run_body)
                elif _key(node) == "Identity" and not isinstance(inputs[0], Value):  # a sequence or optional
                    result = [inputs[0]]
                elif _key(node) in _CONVERTERS:
                    result = _CONVERTERS[_key(node)](ctx, node, inputs)
                else:
                    result = _reference_eval(ctx, node, inputs)
            except QCompilerError as e:
                raise QCompilerError(f"{where}: {e}") from None
            except (TypeError, ValueError, KeyError, IndexError) as e:
                raise QCompilerError(f"{where}: cannot convert {node.op} node '{ctx.source}': {e}") from e
            results = [result] if isinstance(result, Value) else list(result)
            for tensor, value in zip(node.outputs, results):
                if tensor.name:
                    env[tensor.name] = value
            for tensor in node.outputs[len(results):]:
                if tensor.name in consumed:
                    raise QCompilerError(f"{where}: output {tensor.name} of {node.op} '{ctx.source}' is not supported")

    def inline_if(node: Any, inputs: list[Value | None]) -> list[Value]:
        """An If whose condition is known once shapes are fixed: the branch it takes, converted in
        place (its reads of outer values resolve by name), its outputs the If's."""
        cond = ctx.const_input(inputs[0], node, "condition (data-dependent control flow is not supported)")
        return run_body(node.attrs["then_branch" if bool(np.asarray(cond).reshape(-1)[0]) else "else_branch"], [])

    def run_body(body: Any, values: Sequence[Value]) -> list[Value]:
        """Convert a subgraph in place, its inputs bound to ``values`` (its reads of outer values
        resolve by name): an If's branch, one step of an unrolled Scan or Loop."""
        env.update((t.name, v) for t, v in zip(body.inputs, values))
        source = ctx.source
        convert(body.nodes)
        ctx.source = source
        return [operand(t) for t in body.outputs]

    convert(gsg.nodes)

    outputs, names = [], []
    for tensor in gsg.outputs:
        value = operand(tensor)
        if value is None:
            raise ModelLoadError(f"{where}: graph output '{tensor.name}' is never produced")
        if id(value) in ctx.bf16_values:
            raise ModelLoadError(f"{where}: graph output '{tensor.name}' is bfloat16: qcompiler has no bf16 tensors "
                                 f"(cast it to float32 in the model)")
        for name, v in flattened_outputs(tensor.name, value, where):  # a sequence: one output per element
            if v.is_constant or v in graph.inputs or v in outputs:  # outputs must be node results
                v = graph.add_node("identity", [v], meta={"source": name}).output
            outputs.append(v)
            names.append(name)
    graph.set_outputs(outputs)
    _name_outputs(graph, names)
    graph.remove_unused_constants()
    verify_graph(graph, where=where)
    return graph


# constants of dtypes the IR has no name for, widened exactly (every value kept): int4 weights
# (opset 21 DequantizeLinear) become int8, bfloat16 and float8 become float32
_WIDER = {"int4": np.int8, "uint4": np.uint8, "bfloat16": np.float32,
          "float8_e4m3fn": np.float32, "float8_e4m3fnuz": np.float32, "float8_e5m2": np.float32,
          "float8_e5m2fnuz": np.float32, "float8_e8m0fnu": np.float32, "float4_e2m1fn": np.float32}


def widened(array: np.ndarray, what: str) -> np.ndarray:
    """``array`` as a dtype the IR has (see ``_WIDER``); a clear error for anything else."""
    try:
        dtype_name(array.dtype)
        return array
    except ValueError:
        pass
    name = np.dtype(array.dtype).name
    if name in _WIDER:
        return array.astype(_WIDER[name])
    raise ModelLoadError(f"{what}: dtype {name} is not supported (f16/f32/f64, i8/i16/i32/i64, u8/u16/u32/u64, bool; "
                         f"int4, uint4, bfloat16 and float8 constants are widened exactly)")


def _bind_inputs(proto: onnx.ModelProto, values: Mapping[str, Any], where: str) -> onnx.ModelProto:
    """A copy of ``proto`` in which each named input is an initializer holding its value, in the
    input's declared element type and shape (a flat list fills a declared shape)."""
    from onnx import helper, numpy_helper

    bound = onnx.ModelProto()
    bound.CopyFrom(proto)
    declared = {v.name: v for v in bound.graph.input}
    unknown = sorted(set(values) - set(declared))
    if unknown:
        raise ModelLoadError(f"{where}: --input-value/input_values names unknown input(s) {unknown}; "
                             f"the model's inputs are {sorted(declared)}")
    for input_name, value in values.items():
        tensor_type = declared[input_name].type.tensor_type
        dtype = helper.tensor_dtype_to_np_dtype(tensor_type.elem_type)
        shape = [d.dim_value if d.HasField("dim_value") else -1 for d in tensor_type.shape.dim]
        array = np.asarray(value)
        try:
            if np.dtype(dtype).kind in "iub" and array.dtype.kind == "f" and not np.all(array == np.round(array)):
                raise ValueError(f"the input is {np.dtype(dtype).name}, the values {array.tolist()} are not whole")
            array = array.astype(dtype).reshape(shape if shape.count(-1) <= 1 and tensor_type.HasField("shape")
                                                else array.shape)
        except (TypeError, ValueError) as e:
            raise ModelLoadError(f"{where}: --input-value/input_values '{input_name}': {e}") from None
        bound.graph.initializer.append(numpy_helper.from_array(array, input_name))
        bound.graph.input.remove(declared[input_name])
    return bound


OLDEST_READ_OPSET = 6  # the converters read each op as defined at opset 6 or later


def _refuse_changed_since(nodes: Sequence[Any], opset: int, unsupported: dict[str, list[str]]) -> None:
    """A model older than opset 6 is read where its ops mean what they mean at opset 6: the same
    schema version serves both. Ops redefined in between (BatchNormalization's ``spatial``,
    Clip, Reshape's attribute shape, ...) are listed as unsupported at that opset."""
    for node in nodes:
        if _key(node) != node.op:
            continue
        try:
            then = onnx.defs.get_schema(node.op, opset).since_version
            later = onnx.defs.get_schema(node.op, OLDEST_READ_OPSET).since_version
        except onnx.defs.SchemaError:
            continue  # not an operator of that opset: the scan reports it if it has no converter
        if then != later:
            unsupported.setdefault(f"{node.op} (as defined at opset {then}, before 6)", []).append(
                node.name or node.outputs[0].name)


def _dtype_label(dtype: Any) -> str:
    """A readable dtype: onnx-graphsurgeon leaves types numpy lacks (float8) as ONNX's numbers."""
    if isinstance(dtype, (int, np.integer)):
        return onnx.TensorProto.DataType.Name(int(dtype)).lower()
    return np.dtype(dtype).name


def _reads(node: Any) -> set[str]:
    """The value names ``node`` reads: its inputs and what its subgraphs (If branches) read from
    the enclosing scope."""
    names = {t.name for t in node.inputs if t.name}
    for branch in node.subgraphs():
        inner = {t.name for n in branch.nodes for t in n.outputs} | {t.name for t in branch.inputs}
        for n in branch.nodes:
            names |= _reads(n) - inner
        names |= {t.name for t in branch.outputs} - inner
    return names


def _value_name(name: str) -> str:
    return name or "unnamed"


def _name_outputs(graph: Graph, names: list[str]) -> None:
    """Give graph outputs their ONNX names, so results can be matched by name."""
    for v, name in zip(graph.outputs, names):
        if name and v.name != name and not graph.has_value_name(name):
            graph.rename_value(v, name)


def _reference_eval(ctx: _Ctx, node: Any, inputs: list[Value | None]) -> list[Value]:
    """Evaluate a constant-only node that has no converter with onnx's reference runtime."""
    import onnx_graphsurgeon as gs
    from onnx.reference import ReferenceEvaluator

    names = [t.name for t in node.inputs]
    feeds = {n: ctx.array(v) for n, v in zip(names, inputs) if v is not None}
    one = gs.Graph(nodes=[node.copy(inputs=[gs.Variable(n, dtype=feeds[n].dtype, shape=feeds[n].shape) if n else
                                            gs.Variable.empty() for n in names],
                                    outputs=[gs.Variable(t.name or f"out{i}") for i, t in enumerate(node.outputs)])],
                   opset=ctx.opset)
    one.inputs = [t for t in one.nodes[0].inputs if t.name]
    one.outputs = one.nodes[0].outputs
    model = gs.export_onnx(one, do_type_check=False)
    outs = ReferenceEvaluator(model).run(None, feeds)
    return [ctx.const(np.asarray(o), node.outputs[0].name or node.op) for o in outs]


# ---- converters -----------------------------------------------------------------------------------
def _has_converter(op_type: str) -> bool:
    """Whether the importer handles a default-domain op itself (else its function body is used)."""
    return op_type in _CONVERTERS or op_type in _CONTROL_FLOW or op_type in _IMPORT_TIME_ONLY \
        or op_type in _SHAPE_ONLY


def _key(node: Any) -> str:
    """A converter's key: the op type, prefixed by its domain outside the default one
    (``com.microsoft.QLinearAdd``)."""
    return node.op if node.domain in (None, "", "ai.onnx") else f"{node.domain}.{node.op}"


def as_standard_op(node: Any, op: str, inputs: list, outputs: list | None = None, **attrs: Any) -> Any:
    """``node`` seen as the standard op ``op`` (its attributes, plus ``attrs``) by that op's
    converter: how a fused or quantized op (QLinearAdd, SkipLayerNormalization) reuses it."""
    return SimpleNamespace(op=op, name=node.name, attrs={**node.attrs, **attrs}, domain="", inputs=inputs,
                           outputs=node.outputs if outputs is None else outputs)


def _attr(node: Any, key: str, default: Any = None) -> Any:
    value = node.attrs.get(key, default)
    return value.values if hasattr(value, "values") and not isinstance(value, (list, tuple)) else value


_UNARY = {"Relu": "relu", "Sigmoid": "sigmoid", "Tanh": "tanh", "Erf": "erf", "Exp": "exp", "Log": "log",
          "Sqrt": "sqrt", "Reciprocal": "reciprocal", "Neg": "neg", "Abs": "abs", "Floor": "floor", "Ceil": "ceil",
          "Sin": "sin", "Cos": "cos", "Not": "logical_not", "BitwiseNot": "bitwise_not", "Identity": "identity",
          "HardSwish": "hardswish", "Softplus": "softplus", "Sign": "sign", "IsNaN": "isnan", "Tan": "tan",
          "Asin": "asin", "Acos": "acos", "Atan": "atan", "Sinh": "sinh", "Cosh": "cosh", "Asinh": "asinh",
          "Acosh": "acosh", "Atanh": "atanh", "Round": "round"}


@converts(*_UNARY)
def _unary(ctx, node, inputs):
    return ctx.emit1(_UNARY[node.op], [inputs[0]])


@converts("IsInf")
def _isinf(ctx, node, inputs):
    """isinf, narrowed to one sign when ``detect_negative`` or ``detect_positive`` is 0."""
    x = inputs[0]
    found = ctx.emit1("isinf", [x])
    negative, positive = _attr(node, "detect_negative", 1), _attr(node, "detect_positive", 1)
    if negative and positive:
        return found
    if not (negative or positive):
        return ctx.emit1("logical_and", [found, ctx.const(np.zeros((), np.bool_), "false")])
    zero = ctx.const(np.zeros((), x.type.np_dtype), "zero")
    sign = ctx.emit1("greater" if positive else "less", [x, zero])
    return ctx.emit1("logical_and", [found, sign])


@converts("Resize", "Upsample")
def _resize(ctx, node, inputs):
    """Resize (opset 10+) and Upsample (7-9) of the two spatial axes of an NCHW image, nearest,
    linear or cubic. Sizes come from ``sizes`` or from ``scales`` (rounded down, the transform
    then using the scales themselves); tf_crop_and_resize samples the ``roi`` (nearest, linear);
    antialias stretches a linear or cubic kernel when downscaling; a resize of N or C is refused
    with the node named."""
    x = inputs[0]
    mode = _attr(node, "mode", "nearest")
    mode = {"bilinear": "linear", "bicubic": "cubic"}.get(mode.decode() if isinstance(mode, bytes) else mode, mode)
    what = f"{node.op} '{node.name}'"
    if mode not in ("nearest", "linear", "cubic"):
        raise QCompilerError(f"{what}: mode '{mode}' is not supported (nearest, linear, cubic)")
    if x.type.rank != 4:
        raise QCompilerError(f"{what}: only NCHW images (rank 4) are resized, got {x.type}")
    antialias = bool(_attr(node, "antialias", 0))
    if antialias and mode == "nearest":
        raise QCompilerError(f"{what}: antialias applies to linear and cubic resizes, not nearest")
    sizes = ctx.const_input(inputs[3], node, "sizes") if len(inputs) > 3 and inputs[3] is not None else None
    if node.op == "Upsample":
        scales = ctx.const_input(inputs[1], node, "scales") if len(inputs) > 1 else np.asarray(_attr(node, "scales"))
    else:
        index = 1 if ctx.opset < 11 else 2
        scales = ctx.const_input(inputs[index], node, "scales") \
            if len(inputs) > index and inputs[index] is not None and inputs[index].type.size else None
    axes = _attr(node, "axes", None)
    given_scales: list[float] = []
    if sizes is None:
        if scales is None:
            raise QCompilerError(f"{what}: neither sizes nor scales given")
        full = np.ones(4) if axes is not None else None
        if axes is not None:
            full[[a % 4 for a in axes]] = scales
        scales = np.asarray(full if full is not None else scales, np.float64)
        exact = np.asarray(x.shape) * scales
        if np.allclose(exact, np.round(exact)):
            out = [int(round(v)) for v in exact]
        else:  # ONNX: floor(size * scale), and the coordinate transform uses the scale as given
            out = [int(np.floor(v)) for v in exact]
            given_scales = [float(v) for v in scales[2:]]
    else:
        out = list(x.shape)
        resized = [a % 4 for a in (axes if axes is not None else range(4 - len(sizes), 4))]
        for a, size in zip(resized, sizes):
            out[a] = int(size)
        policy = _attr(node, "keep_aspect_ratio_policy", "stretch")
        if policy != "stretch":  # one scale for every resized axis, the smallest or largest asked for
            scale = (min if policy == "not_larger" else max)(out[a] / x.shape[a] for a in resized)
            exact = [scale * x.shape[a] for a in resized]
            if not np.allclose(exact, np.round(exact)):
                raise QCompilerError(f"{what}: keep_aspect_ratio_policy '{policy}' gives fractional sizes "
                                     f"{[round(v, 3) for v in exact]} for {list(x.shape)}")
            for a, size in zip(resized, exact):
                out[a] = int(size + 0.5)
    if min(out) < 1:
        raise QCompilerError(f"{what}: resizing {list(x.shape)} gives an empty image {out}")
    if out[:2] != list(x.shape[:2]):
        raise QCompilerError(f"{what}: only the spatial axes may be resized ({list(x.shape)} to {out})")
    if ctx.opset < 11:
        transform = "asymmetric"
    else:
        transform = _attr(node, "coordinate_transformation_mode", "half_pixel")
        if transform == "tf_crop_and_resize":
            from .onnx_indexing import crop_and_resize

            roi = np.asarray(ctx.const_input(inputs[1], node, "roi") if inputs[1] is not None else [],
                             np.float64).reshape(-1)
            if roi.size != 2 * (len(axes) if axes is not None else 4):
                raise QCompilerError(f"{what}: tf_crop_and_resize needs a roi of starts and ends per resized axis, "
                                     f"got {roi.size} values")
            if axes is not None:  # the roi names only these axes: the others are whole
                full = np.array([0.0] * 4 + [1.0] * 4)
                for i, a in enumerate(a % 4 for a in axes):
                    full[a], full[a + 4] = roi[i], roi[i + len(axes)]
                roi = full
            return crop_and_resize(ctx, x, roi, out[2:], mode, _attr(node, "nearest_mode", "round_prefer_floor"),
                                   float(_attr(node, "extrapolation_value", 0.0)))
        if transform not in COORDINATE_MODES:
            raise QCompilerError(f"{what}: coordinate_transformation_mode '{transform}' is not supported "
                                 f"({', '.join(COORDINATE_MODES)})")
        if transform == "tf_half_pixel_for_nn" and mode != "nearest":
            raise QCompilerError(f"{what}: coordinate_transformation_mode 'tf_half_pixel_for_nn' is for nearest only")
    attrs = {"size": out[2:], "coordinate_transformation_mode": transform}
    if given_scales:
        attrs["scales"] = given_scales
    if mode == "nearest":
        attrs["nearest_mode"] = _attr(node, "nearest_mode", "round_prefer_floor") if ctx.opset >= 11 else "floor"
        return ctx.emit1("resize_nearest", [x], attrs)
    attrs.update(antialias=antialias, exclude_outside=bool(_attr(node, "exclude_outside", 0)))
    if mode == "cubic":
        attrs["cubic_coeff_a"] = float(_attr(node, "cubic_coeff_a", -0.75))
        return ctx.emit1("resize_cubic", [x], attrs)
    return ctx.emit1("resize_linear", [x], attrs)


@converts("Dropout")
def _dropout(ctx, node, inputs):
    """Inference: the identity, and an all-true mask. ``training_mode`` true with a ratio above
    0 is random: refused, never silently the identity."""
    training = ctx.const_input(inputs[2], node, "training_mode") if len(inputs) > 2 else None
    training = training is not None and bool(np.asarray(training).reshape(-1)[0])
    ratio = _attr(node, "ratio", 0.5) if ctx.opset < 12 else (  # read only in training: unused at inference
        float(ctx.const_input(inputs[1], node, "ratio")) if training and len(inputs) > 1 and inputs[1] is not None else 0.5)
    if training and ratio > 0:
        raise ModelLoadError(f"Dropout node '{node.name}': training_mode is true (random, ratio {ratio}); "
                             f"export the model for inference")
    y = ctx.emit1("dropout", [inputs[0]])
    if len(node.outputs) > 1:
        return [y, ctx.const(np.ones(inputs[0].shape, np.bool_), "dropout_mask")]
    return y


@converts("HardSigmoid")
def _hardsigmoid(ctx, node, inputs):
    return ctx.emit1("hardsigmoid", [inputs[0]], {"alpha": _attr(node, "alpha", 0.2), "beta": _attr(node, "beta", 0.5)})


@converts("LeakyRelu", "Elu")
def _alpha_unary(ctx, node, inputs):
    default = 0.01 if node.op == "LeakyRelu" else 1.0
    return ctx.emit1("leaky_relu" if node.op == "LeakyRelu" else "elu", [inputs[0]],
                     {"alpha": _attr(node, "alpha", default)})


@converts("Selu")
def _selu(ctx, node, inputs):
    return ctx.emit1("selu", [inputs[0]], {"alpha": _attr(node, "alpha", 1.67326319217681884765625),
                                           "gamma": _attr(node, "gamma", 1.05070102214813232421875)})


@converts("PRelu")
def _prelu(ctx, node, inputs):
    """prelu(x) = where(x >= 0, x, x * slope); before opset 7 a 1-D slope is per channel (axis 1)."""
    x, slope = inputs
    if ctx.opset < 7 and slope.type.rank == 1 and slope.shape[0] != 1 and x.type.rank > 2:
        slope = ctx.reshape(slope, (slope.shape[0],) + (1,) * (x.type.rank - 2))
    negative = ctx.emit1("mul", [x, slope])
    positive = ctx.emit1("greater_equal", [x, ctx.scalar_like(0, x.type)])
    return ctx.emit1("where", [positive, x, negative])


@converts("Tile")
def _tile(ctx, node, inputs):
    reps = ctx.const_input(inputs[1], node, "repeats")
    return ctx.emit1("tile", [inputs[0]], {"repeats": [int(r) for r in reps]})


@converts("Gelu")
def _gelu(ctx, node, inputs):
    return ctx.emit1("gelu", [inputs[0]], {"approximate": _attr(node, "approximate", "none")})


@converts("Clip")
def _clip(ctx, node, inputs):
    if ctx.opset < 11:
        lo, hi = _attr(node, "min", -math.inf), _attr(node, "max", math.inf)
    elif any(v is not None and not v.is_constant for v in inputs[1:3]):
        # bounds computed at run time: min(max(x, lo), hi), as ONNX defines Clip
        out = inputs[0]
        for op, bound in zip(("maximum", "minimum"), inputs[1:3]):
            out = out if bound is None else ctx.emit1(op, [out, bound])
        return out
    else:
        lo_a = ctx.const_input(inputs[1] if len(inputs) > 1 else None, node, "min")
        hi_a = ctx.const_input(inputs[2] if len(inputs) > 2 else None, node, "max")
        lo = -math.inf if lo_a is None else lo_a.item()
        hi = math.inf if hi_a is None else hi_a.item()
    x = inputs[0]
    if x.dtype not in ("f32", "f64", "f16"):
        out = ctx.emit1("maximum", [x, ctx.scalar_like(lo, x.type)]) if math.isfinite(lo) else x
        return ctx.emit1("minimum", [out, ctx.scalar_like(hi, x.type)]) if math.isfinite(hi) else out
    return ctx.emit1("clip", [x], {"min": float(lo), "max": float(hi)})


_BINARY = {"Add": "add", "Sub": "sub", "Mul": "mul", "Div": "div", "Pow": "pow", "Equal": "equal", "Less": "less",
           "LessOrEqual": "less_equal", "Greater": "greater", "GreaterOrEqual": "greater_equal",
           "And": "logical_and", "Or": "logical_or", "Xor": "logical_xor", "BitwiseAnd": "bitwise_and",
           "BitwiseOr": "bitwise_or", "BitwiseXor": "bitwise_xor"}


@converts(*_BINARY)
def _binary(ctx, node, inputs):
    a, b = inputs
    if node.op == "Pow" and a.dtype != b.dtype:
        b = ctx.cast(b, a.dtype)  # ONNX Pow allows a different exponent type
    if ctx.opset < 7 and _attr(node, "broadcast", 0):
        # before opset 7, b broadcasts against a starting at `axis` (default: trailing alignment)
        axis = _attr(node, "axis", a.type.rank - b.type.rank) % max(a.type.rank, 1)
        b = ctx.reshape(b, (1,) * axis + b.shape + (1,) * (a.type.rank - axis - b.type.rank))
    return ctx.emit1(_BINARY[node.op], [a, b])


@converts("Max", "Min", "Sum", "Mean")
def _variadic(ctx, node, inputs):
    op = {"Max": "maximum", "Min": "minimum", "Sum": "add", "Mean": "add"}[node.op]
    out = inputs[0]
    for v in inputs[1:]:
        out = ctx.emit1(op, [out, v])
    if node.op == "Mean" and len(inputs) > 1:
        out = ctx.emit1("div", [out, ctx.scalar_like(len(inputs), out.type)])
    return out if len(inputs) > 1 else ctx.emit1("identity", [out])


@converts("Where")
def _where(ctx, node, inputs):
    return ctx.emit1("where", inputs)


@converts("Cast", "CastLike")
def _cast(ctx, node, inputs):
    """A Cast to bfloat16 is ``round_bf16`` (the IR has no bf16 tensors: its values are carried in
    float32, exactly); the converter loop lets only Casts read such a value, and a Cast of it to
    any type converts the float32 value, which is the bf16 value itself."""
    if node.op == "CastLike":
        to = inputs[1].dtype
    else:
        to_enum = _attr(node, "to")
        if to_enum == onnx.TensorProto.BFLOAT16:
            if inputs[0].dtype not in ("f32", "f16"):
                raise QCompilerError(f"Cast '{node.name}': to bfloat16 from {inputs[0].dtype} is not supported "
                                     f"(from float32 or float16)")
            x = inputs[0] if inputs[0].dtype == "f32" else ctx.emit1("cast", [inputs[0]], {"to": "f32"})
            rounded = x if id(x) in ctx.bf16_values else ctx.emit1("round_bf16", [x])
            ctx.bf16_values.add(id(rounded))
            return rounded
        try:
            to = dtype_name(onnx.helper.tensor_dtype_to_np_dtype(to_enum))
        except (ValueError, KeyError, TypeError):
            raise QCompilerError(f"Cast '{node.name}': unsupported target type {to_enum}") from None
    return ctx.emit1("cast", [inputs[0]], {"to": to}) if to != inputs[0].dtype else ctx.emit1("identity", [inputs[0]])


@converts("BitCast")
def _bitcast(ctx, node, inputs):
    """The same bits as another type of the same width (opset 26)."""
    to_enum = _attr(node, "to")
    try:
        to = dtype_name(onnx.helper.tensor_dtype_to_np_dtype(to_enum))
    except (ValueError, KeyError, TypeError):
        raise QCompilerError(f"BitCast '{node.name}': unsupported target type {to_enum}") from None
    if np.dtype(DTYPES[to]).itemsize != np.dtype(DTYPES[inputs[0].dtype]).itemsize:
        raise QCompilerError(f"BitCast '{node.name}': {inputs[0].dtype} and {to} differ in width")
    return ctx.emit1("bitcast", [inputs[0]], {"to": to}) if to != inputs[0].dtype else inputs[0]


def _auto_pads(node: Any, in_spatial: Sequence[int], kernel: Sequence[int], strides: Sequence[int],
               dilations: Sequence[int]) -> list[int]:
    rank = len(kernel)
    auto = _attr(node, "auto_pad", "NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else auto
    if auto in ("NOTSET", ""):
        return list(_attr(node, "pads", [0] * (2 * rank)))
    if auto == "VALID":
        return [0] * (2 * rank)
    begins, ends = [], []
    for size, k, s, d in zip(in_spatial, kernel, strides, dilations):
        out = -(-size // s)
        total = max(0, (out - 1) * s + d * (k - 1) + 1 - size)
        small, big = total // 2, total - total // 2
        begins.append(small if auto == "SAME_UPPER" else big)
        ends.append(big if auto == "SAME_UPPER" else small)
    return begins + ends


@converts("Conv")
def _conv(ctx, node, inputs):
    x, w = inputs[0], inputs[1]
    rank = w.type.rank - 2
    if rank not in (1, 2, 3):
        raise QCompilerError(f"Conv '{node.name}': {rank}-D convolution is not supported")
    kernel = list(_attr(node, "kernel_shape", w.shape[2:]))
    strides = list(_attr(node, "strides", [1] * rank))
    dilations = list(_attr(node, "dilations", [1] * rank))
    pads = _auto_pads(node, x.shape[2:], kernel, strides, dilations)
    operands = [x, w] + ([inputs[2]] if len(inputs) > 2 and inputs[2] is not None else [])
    return ctx.emit1(CONV[rank], operands, {"strides": strides, "pads": pads, "dilations": dilations,
                                                "groups": _attr(node, "group", 1)})


@converts("ConvTranspose")
def _conv_transpose(ctx, node, inputs):
    """ONNX ConvTranspose; ``output_shape`` and SAME auto-padding become explicit pads (total
    padding s (in - 1) + output_padding + d (k - 1) + 1 - out, split as the spec says). An
    ``output_shape`` beyond the full result makes negative pads: zeros added around the full
    result (the bias then covers them too, as in the spec's arithmetic)."""
    x, w = inputs[0], inputs[1]
    rank = w.type.rank - 2
    if rank not in CONV_TRANSPOSE:
        raise QCompilerError(f"ConvTranspose '{node.name}': {rank}-D transposed convolution is not supported")
    strides = list(_attr(node, "strides", [1] * rank))
    dilations = list(_attr(node, "dilations", [1] * rank))
    out_pad = list(_attr(node, "output_padding", [0] * rank))
    auto = _attr(node, "auto_pad", "NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else auto
    wanted = _attr(node, "output_shape", None)
    if wanted is not None or auto in ("SAME_UPPER", "SAME_LOWER"):
        wanted = list(wanted)[-rank:] if wanted is not None else [x.shape[2 + i] * strides[i] for i in range(rank)]
        begins, ends = [], []
        for i in range(rank):
            total = strides[i] * (x.shape[2 + i] - 1) + out_pad[i] + dilations[i] * (w.shape[2 + i] - 1) + 1 - wanted[i]
            small, big = total // 2, total - total // 2
            begins.append(small if auto == "SAME_UPPER" else big)  # the spec: the larger half first unless SAME_UPPER
            ends.append(big if auto == "SAME_UPPER" else small)
        pads = begins + ends
    else:
        pads = list(_attr(node, "pads", [0] * (2 * rank))) if auto != "VALID" else [0] * (2 * rank)
    bias = inputs[2] if len(inputs) > 2 else None
    grow = [max(-p, 0) for p in pads]
    attrs = {"strides": strides, "pads": [max(p, 0) for p in pads], "dilations": dilations,
             "groups": _attr(node, "group", 1), "output_padding": out_pad}
    if not any(grow):
        return ctx.emit1(CONV_TRANSPOSE[rank], [x, w] + ([bias] if bias is not None else []), attrs)
    y = ctx.emit1("pad", [ctx.emit1(CONV_TRANSPOSE[rank], [x, w], attrs)],
                  {"pads": [0, 0] + grow[:rank] + [0, 0] + grow[rank:]})
    return y if bias is None else ctx.emit1("add", [y, ctx.reshape(bias, [-1] + [1] * rank)])


@converts("BatchNormalization")
def _batch_norm(ctx, node, inputs):
    if _attr(node, "training_mode", 0) and ctx.opset >= 14:
        from .onnx_training import batch_norm_training

        return batch_norm_training(ctx, node, inputs)
    if _attr(node, "training_mode", 0) or (ctx.opset < 7 and not _attr(node, "is_test", 1)):
        raise QCompilerError(f"BatchNormalization '{node.name}' in training mode (before opset 14) is not supported")
    return ctx.emit1("batch_norm", inputs[:5], {"epsilon": _attr(node, "epsilon", 1e-5)})


def pool_window(node: Any, x: Value) -> dict[str, Any]:
    """A pooling node's window as the IR's pool attributes (kernel, strides, dilations, pads
    with auto_pad resolved, ceil_mode); 1-D to 3-D only."""
    rank = x.type.rank - 2
    if rank not in (1, 2, 3):
        raise QCompilerError(f"{node.op} '{node.name}': {rank}-D pooling is not supported")
    kernel = list(_attr(node, "kernel_shape"))
    strides = list(_attr(node, "strides", [1] * rank))
    dilations = list(_attr(node, "dilations", [1] * rank))
    return {"kernel": kernel, "strides": strides, "dilations": dilations,
            "pads": _auto_pads(node, x.shape[2:], kernel, strides, dilations),
            "ceil_mode": bool(_attr(node, "ceil_mode", 0))}


@converts("MaxPool", "AveragePool")
def _pool(ctx, node, inputs):
    x = inputs[0]
    rank = x.type.rank - 2
    attrs = pool_window(node, x)
    if node.op == "MaxPool":
        pooled = ctx.emit1(MAX_POOL[rank], [x], attrs)
        if len(node.outputs) < 2 or not node.outputs[1].name:
            return pooled
        from .onnx_indexing import max_pool_indices

        return [pooled, max_pool_indices(ctx, x, pooled, attrs, int(_attr(node, "storage_order", 0)))]
    attrs["count_include_pad"] = bool(_attr(node, "count_include_pad", 0))
    return ctx.emit1(AVG_POOL[rank], [x], attrs)


@converts("GlobalAveragePool", "GlobalMaxPool")
def _global_pool(ctx, node, inputs):
    x = inputs[0]
    op = "reduce_mean" if node.op == "GlobalAveragePool" else "reduce_max"
    return ctx.emit1(op, [x], {"axes": list(range(2, x.type.rank)), "keepdims": True})


@converts("Gemm")
def _gemm(ctx, node, inputs):
    a, b = inputs[0], inputs[1]
    c = inputs[2] if len(inputs) > 2 else None
    alpha, beta = _attr(node, "alpha", 1.0), _attr(node, "beta", 1.0)
    trans_a, trans_b = _attr(node, "transA", 0), _attr(node, "transB", 0)
    if trans_a:
        a = ctx.emit1("transpose", [a], {"perm": [1, 0]})
    n = b.shape[0] if trans_b else b.shape[1]
    if alpha == 1.0 and beta == 1.0 and (c is None or c.shape == (n,)):
        w = b if trans_b else ctx.emit1("transpose", [b], {"perm": [1, 0]})
        return ctx.emit1("linear", [a, w] + ([c] if c is not None else []))
    if trans_b:
        b = ctx.emit1("transpose", [b], {"perm": [1, 0]})
    y = ctx.emit1("matmul", [a, b])
    if alpha != 1.0:
        y = ctx.emit1("mul", [y, ctx.scalar_like(alpha, y.type)])
    if c is not None and beta != 0.0:
        if beta != 1.0:
            c = ctx.emit1("mul", [c, ctx.scalar_like(beta, c.type)])
        y = ctx.emit1("add", [y, c])
    return y


@converts("MatMul")
def _matmul(ctx, node, inputs):
    return ctx.emit1("matmul", inputs)


@converts("Softmax", "LogSoftmax")
def _softmax(ctx, node, inputs):
    x = inputs[0]
    op = "softmax" if node.op == "Softmax" else "log_softmax"
    axis = _attr(node, "axis", -1 if ctx.opset >= 13 else 1) % max(x.type.rank, 1)
    if ctx.opset >= 13 or axis == x.type.rank - 1:
        return ctx.emit1(op, [x], {"axis": axis})
    # before opset 13: softmax over the flattened dims axis..-1
    flat = ctx.reshape(x, (int(np.prod(x.shape[:axis])), int(np.prod(x.shape[axis:]))))
    return ctx.reshape(ctx.emit1(op, [flat], {"axis": 1}), x.shape)


@converts("LayerNormalization")
def _layer_norm(ctx, node, inputs):
    """The normalized result; its optional Mean and InvStdDev outputs (training's), when read,
    are computed beside it: mean over axis..-1 and 1 / sqrt(variance + epsilon), kept dims."""
    x = inputs[0]
    axis = _attr(node, "axis", -1)
    eps = _attr(node, "epsilon", 1e-5)
    y = ctx.emit1("layer_norm", [v for v in inputs if v is not None], {"axis": axis, "epsilon": eps})
    if len(node.outputs) == 1:
        return y
    axes = list(range(axis % x.type.rank, x.type.rank))
    mean = ctx.emit1("reduce_mean", [x], {"axes": axes, "keepdims": True})
    centered = ctx.emit1("sub", [x, mean])
    variance = ctx.emit1("reduce_mean", [ctx.emit1("mul", [centered, centered])], {"axes": axes, "keepdims": True})
    inv_std = ctx.emit1("rsqrt", [ctx.emit1("add", [variance, ctx.const(np.array(eps, x.type.np_dtype), "epsilon")])])
    return [y, mean, inv_std][:len(node.outputs)]


@converts("Mod")
def _mod(ctx, node, inputs):
    """fmod=1: C's remainder (the sign of a), the IR's ``fmod``; fmod=0: Python's (the sign of b)."""
    a, b = inputs
    return ctx.emit1("fmod", [a, b]) if _attr(node, "fmod", 0) else ctx.python_remainder(a, b)


@converts("Flatten")
def _flatten(ctx, node, inputs):
    x = inputs[0]
    axis = _attr(node, "axis", 1)
    axis = axis + x.type.rank if axis < 0 else axis  # [-r, r]: -1 keeps the last axis apart
    return ctx.reshape(x, (int(np.prod(x.shape[:axis])), int(np.prod(x.shape[axis:]))))


@converts("Reshape")
def _reshape(ctx, node, inputs):
    x = inputs[0]
    shape = ctx.const_input(inputs[1], node, "shape") if ctx.opset >= 5 else _attr(node, "shape")
    shape = [int(d) for d in shape]
    if not _attr(node, "allowzero", 0):
        shape = [x.shape[i] if d == 0 else d for i, d in enumerate(shape)]
    return ctx.reshape(x, resolve_shape(shape, x.type.size, f"Reshape '{node.name}'"))


def _axes(ctx, node, inputs, index: int, attr_until: int) -> list[int] | None:
    """Axes from the attribute (opsets before ``attr_until``) or from input ``index``."""
    if ctx.opset < attr_until:
        axes = _attr(node, "axes")
    else:
        axes = ctx.const_input(inputs[index] if len(inputs) > index else None, node, "axes")
    return None if axes is None else [int(a) for a in np.asarray(axes).reshape(-1)]


@converts("Squeeze", "Unsqueeze")
def _squeeze(ctx, node, inputs):
    x = inputs[0]
    axes = _axes(ctx, node, inputs, 1, 13)
    if node.op == "Squeeze":
        axes = [a % x.type.rank for a in axes] if axes else [i for i, d in enumerate(x.shape) if d == 1]
        shape = [d for i, d in enumerate(x.shape) if i not in axes]
    else:
        out_rank = x.type.rank + len(axes)
        axes = sorted(a % out_rank for a in axes)
        shape = list(x.shape)
        for a in axes:
            shape.insert(a, 1)
    return ctx.emit1("identity", [x]) if tuple(shape) == x.shape else ctx.reshape(x, shape)


@converts("Transpose")
def _transpose(ctx, node, inputs):
    x = inputs[0]
    perm = list(_attr(node, "perm", list(range(x.type.rank))[::-1]))
    return ctx.emit1("transpose", [x], {"perm": perm})


@converts("Concat")
def _concat(ctx, node, inputs):
    """Operands with no elements add nothing to a join and are left out (a full-width
    RotaryEmbedding joins its rotated part with an empty pass-through slice)."""
    given = [v for v in inputs if v is not None]
    operands = [v for v in given if 0 not in v.shape] or given
    if len(operands) == 1:
        return ctx.emit1("identity", operands)
    return ctx.emit1("concat", operands, {"axis": _attr(node, "axis")})


@converts("Slice")
def _slice(ctx, node, inputs):
    x = inputs[0]
    if ctx.opset < 10:
        starts, ends = _attr(node, "starts"), _attr(node, "ends")
        axes, steps = _attr(node, "axes"), None
    else:
        starts, ends = (ctx.const_input(v, node, "slice bounds") for v in inputs[1:3])
        axes = ctx.const_input(inputs[3], node, "axes") if len(inputs) > 3 else None
        steps = ctx.const_input(inputs[4], node, "steps") if len(inputs) > 4 else None
    starts, ends = [int(s) for s in starts], [int(e) for e in ends]
    axes = [int(a) % x.type.rank for a in axes] if axes is not None else list(range(len(starts)))
    steps = [int(s) for s in steps] if steps is not None else [1] * len(starts)
    norm = {"starts": [], "ends": [], "axes": [], "steps": []}
    for start, end, axis, step in zip(starts, ends, axes, steps):
        size = x.shape[axis]
        start, end, step = slice(start, end, step).indices(size)
        if end < 0:  # a backward slice through index 0: python needs an end before the start
            end = -(size + 1)
        for key, val in zip(("starts", "ends", "axes", "steps"), (start, end, axis, step)):
            norm[key].append(val)
    return ctx.emit1("slice", [x], norm)


@converts("Gather")
def _gather(ctx, node, inputs):
    return ctx.emit1("gather", inputs, {"axis": _attr(node, "axis", 0)})


@converts("GatherND")
def _gather_nd(ctx, node, inputs):
    """GatherND(data, idx) with idx [..., k] == data[idx[..., 0], ..., idx[..., k-1]] (advanced
    indexing). With ``batch_dims`` b, the first b axes of both pair up: each index row is led by
    its own batch coordinates (constants), which is plain indexing of data."""
    data, idx = inputs
    b = int(_attr(node, "batch_dims", 0))
    k = idx.shape[-1]
    last = idx.type.rank - 1
    columns = [ctx.take(idx, last, i) for i in range(k)]
    batch = [ctx.const(np.broadcast_to(np.arange(idx.shape[a], dtype=np.int64).reshape(
        [-1 if j == a else 1 for j in range(last)]), idx.shape[:-1]), "batch_coordinates") for a in range(b)]
    return ctx.emit1("index", [data] + batch + [ctx.cast(c, "i64") for c in columns])


@converts("GatherElements")
def _gather_elements(ctx, node, inputs):
    return ctx.emit1("gather_elements", inputs, {"axis": _attr(node, "axis", 0)})


@converts("Expand")
def _expand(ctx, node, inputs):
    x = inputs[0]
    shape = [int(d) for d in ctx.const_input(inputs[1], node, "shape")]
    out = tuple(np.broadcast_shapes(x.shape, tuple(shape)))
    return ctx.emit1("expand", [x], {"shape": out}) if out != x.shape else ctx.emit1("identity", [x])


@converts("Shape")
def _shape(ctx, node, inputs):
    shape = np.array(inputs[0].shape, dtype=np.int64)
    start, end = _attr(node, "start", 0), _attr(node, "end", None)
    return ctx.const(shape[start:end], "shape")


@converts("Size")
def _size(ctx, node, inputs):
    return ctx.const(np.array(inputs[0].type.size, dtype=np.int64), "size")


@converts("Constant")
def _constant(ctx, node, inputs):
    for key in ("value", "value_float", "value_floats", "value_int", "value_ints"):
        if key in node.attrs:
            value = node.attrs[key]
            array = np.asarray(value.values if hasattr(value, "values") else value)
            if key in ("value_float", "value_floats"):
                array = array.astype(np.float32)
            elif key in ("value_int", "value_ints"):
                array = array.astype(np.int64)
            return ctx.const(widened(array, f"Constant '{node.name}'"), node.outputs[0].name or "const")
    raise QCompilerError(f"Constant '{node.name}': unsupported value kind {sorted(node.attrs)}")


@converts("ConstantOfShape")
def _constant_of_shape(ctx, node, inputs):
    shape = [int(d) for d in ctx.const_input(inputs[0], node, "shape")]
    value = node.attrs.get("value")
    fill = np.asarray(value.values if value is not None else np.zeros(1, np.float32)).reshape(-1)
    nbytes = math.prod(shape) * fill.dtype.itemsize
    if any(d < 0 for d in shape) or nbytes > MAX_CONSTANT_BYTES:
        raise ModelLoadError(f"ConstantOfShape node '{node.name}': shape {shape} ({nbytes:,} bytes) is negative "
                             f"or larger than {MAX_CONSTANT_BYTES:,} bytes")
    return ctx.const(np.full(shape, fill[0], fill.dtype), "filled")


_REDUCE = {"ReduceMean": "reduce_mean", "ReduceSum": "reduce_sum", "ReduceMax": "reduce_max",
           "ReduceMin": "reduce_min", "ReduceProd": "reduce_prod"}


@converts(*_REDUCE)
def _reduce(ctx, node, inputs):
    x = inputs[0]
    axes = _axes(ctx, node, inputs, 1, 13 if node.op == "ReduceSum" else 18)
    if not axes:
        if _attr(node, "noop_with_empty_axes", 0):
            return ctx.emit1("identity", [x])
        axes = list(range(x.type.rank))
    return ctx.emit1(_REDUCE[node.op], [x], {"axes": axes, "keepdims": bool(_attr(node, "keepdims", 1))})


@converts("ReduceL2", "ReduceSumSquare")
def _reduce_l2(ctx, node, inputs):
    """ReduceSumSquare = sum(x * x); ReduceL2 = sqrt of that."""
    x = inputs[0]
    axes = _axes(ctx, node, inputs, 1, 18) or list(range(x.type.rank))
    total = ctx.emit1("reduce_sum", [ctx.emit1("mul", [x, x])],
                      {"axes": axes, "keepdims": bool(_attr(node, "keepdims", 1))})
    return ctx.emit1("sqrt", [total]) if node.op == "ReduceL2" else total


@converts("ArgMax", "ArgMin")
def _argmax(ctx, node, inputs):
    """argmin(x) == argmax(-x) (first index of ties alike; for integers, ~x = -x - 1 keeps the
    order without overflow); select_last_index: n - 1 - argmax of the axis reversed."""
    x = inputs[0]
    axis = _attr(node, "axis", 0) % max(x.type.rank, 1)
    if node.op == "ArgMin":
        if x.dtype in ("f16", "f32", "f64"):
            x = ctx.emit1("neg", [x])
        else:  # -1 - x: the reversed order, without negating the smallest integer
            x = ctx.emit1("sub", [ctx.const(np.array(-1, x.type.np_dtype), "minus_one"), x])
    keepdims = bool(_attr(node, "keepdims", 1))
    if not _attr(node, "select_last_index", 0):
        return ctx.emit1("argmax", [x], {"axis": axis, "keepdims": keepdims})
    n = x.shape[axis]
    reversed_x = ctx.emit1("slice", [x], {"starts": [n - 1], "ends": [-n - 1], "axes": [axis], "steps": [-1]})
    index = ctx.emit1("argmax", [reversed_x], {"axis": axis, "keepdims": keepdims})
    return ctx.emit1("sub", [ctx.const(np.array(n - 1, np.int64), "last"), index])


@converts("ReduceL1", "ReduceLogSumExp", "ReduceLogSum")
def _reduce_composite(ctx, node, inputs):
    """ReduceL1 = sum(|x|); ReduceLogSum = log(sum(x)); ReduceLogSumExp = m + log(sum(exp(x - m)))
    with m the maximum (kept, so that large inputs do not overflow exp)."""
    x = inputs[0]
    axes = _axes(ctx, node, inputs, 1, 18) or list(range(x.type.rank))
    keepdims = bool(_attr(node, "keepdims", 1))
    if node.op == "ReduceL1":
        return ctx.emit1("reduce_sum", [ctx.emit1("abs", [x])], {"axes": axes, "keepdims": keepdims})
    if node.op == "ReduceLogSum":
        return ctx.emit1("log", [ctx.emit1("reduce_sum", [x], {"axes": axes, "keepdims": keepdims})])
    top = ctx.emit1("reduce_max", [x], {"axes": axes, "keepdims": True})
    total = ctx.emit1("reduce_sum", [ctx.emit1("exp", [ctx.emit1("sub", [x, top])])], {"axes": axes, "keepdims": True})
    y = ctx.emit1("add", [ctx.emit1("log", [total]), top])
    if keepdims:
        return y
    return ctx.reshape(y, [d for i, d in enumerate(x.shape) if i not in {a % x.type.rank for a in axes}])


@converts("LSTM", "GRU", "RNN")
def _recurrent(ctx, node, inputs):
    return recurrent.unroll(ctx, node, inputs, _attr)


@converts("Einsum")
def _einsum(ctx, node, inputs):
    equation = _attr(node, "equation")
    equation = equation.decode() if isinstance(equation, bytes) else equation
    return ctx.emit1("einsum", list(inputs), {"equation": equation})


@converts("TopK")
def _topk(ctx, node, inputs):
    """Opset 10+: k is an input (a constant); before, an attribute. ``sorted=0`` allows any order:
    sorted is one of them."""
    k = int(ctx.const_input(inputs[1], node, "k").reshape(-1)[0]) if ctx.opset >= 10 else _attr(node, "k")
    return ctx.emit("topk", [inputs[0]], {"k": k, "axis": _attr(node, "axis", -1),
                                          "largest": bool(_attr(node, "largest", 1))})


@converts("Trilu")
def _trilu(ctx, node, inputs):
    """The upper (or lower) triangle of the last two axes: the elements whose column - row is
    >= k (<= k for the lower one). A mask known at import from the static shape when ``k`` is
    a constant; compared at run time when ``k`` is an input."""
    x = inputs[0]
    rows, cols = x.shape[-2:]
    diagonal = np.arange(cols, dtype=np.int64)[None, :] - np.arange(rows, dtype=np.int64)[:, None]
    k = inputs[1] if len(inputs) > 1 and inputs[1] is not None else ctx.const(np.zeros((), np.int64), "k")
    compare = "greater_equal" if _attr(node, "upper", 1) else "less_equal"
    mask = ctx.emit1(compare, [ctx.const(diagonal, "diagonal"), ctx.reshape(ctx.cast(k, "i64"), [])])
    return ctx.emit1("where", [mask, x, ctx.const(np.zeros((), x.type.np_dtype), "zero")])


@converts("CumSum")
def _cumsum(ctx, node, inputs):
    axis = int(ctx.const_input(inputs[1], node, "axis"))
    return ctx.running_sum(inputs[0], axis, bool(_attr(node, "exclusive", 0)), bool(_attr(node, "reverse", 0)))


@converts("Col2Im")
def _col2im(ctx, node, inputs):
    """Col2Im (opset 18), two spatial axes: torch's fold (``GraphBuilder.folded``)."""
    size = [int(d) for d in ctx.const_input(inputs[1], node, "image_shape")]
    kernel = [int(d) for d in ctx.const_input(inputs[2], node, "block_shape")]
    if len(size) != 2:
        raise QCompilerError(f"{node.name or node.op}: Col2Im over {len(size)} spatial axes (2 are supported)")
    return ctx.folded(inputs[0], size, kernel, _attr(node, "dilations", [1, 1]), _attr(node, "pads", [0, 0, 0, 0]),
                      _attr(node, "strides", [1, 1]))


@converts("RMSNormalization")
def _rms_norm(ctx, node, inputs):
    """x / sqrt(mean(x^2 over axis..-1) + epsilon) * scale (opset 23)."""
    x, scale = inputs[0], inputs[1]
    axis = _attr(node, "axis", -1) % x.type.rank
    eps = ctx.const(np.array(_attr(node, "epsilon", 1e-5), x.type.np_dtype), "epsilon")
    mean = ctx.emit1("reduce_mean", [ctx.emit1("mul", [x, x])], {"axes": list(range(axis, x.type.rank)),
                                                                  "keepdims": True})
    return ctx.emit1("mul", [ctx.emit1("div", [x, ctx.emit1("sqrt", [ctx.emit1("add", [mean, eps])])]), scale])


@converts("Split")
def _split(ctx, node, inputs):
    x = inputs[0]
    axis = _attr(node, "axis", 0) % x.type.rank
    if ctx.opset < 13:
        sizes = _attr(node, "split")
    else:
        sizes = ctx.const_input(inputs[1] if len(inputs) > 1 else None, node, "split sizes")
    count = len(node.outputs)
    if sizes is None:
        n = _attr(node, "num_outputs", count)
        chunk = -(-x.shape[axis] // n)
        sizes = [min(chunk, x.shape[axis] - i * chunk) for i in range(n)]
    return ctx.emit("split", [x], {"axis": axis, "sizes": [int(s) for s in np.asarray(sizes).reshape(-1)]})


@converts("Pad")
def _pad(ctx, node, inputs):
    x = inputs[0]
    mode = _attr(node, "mode", "constant")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    if ctx.opset < 11:
        pads, value = list(_attr(node, "pads", _attr(node, "paddings"))), _attr(node, "value", 0.0)
    else:
        pads = [int(p) for p in ctx.const_input(inputs[1], node, "pads")]
        v = ctx.const_input(inputs[2], node, "pad value") if len(inputs) > 2 else None
        value = 0.0 if v is None else float(np.asarray(v).reshape(-1)[0])
        axes = ctx.const_input(inputs[3], node, "axes") if len(inputs) > 3 else None
        if axes is not None:
            full = [0] * (2 * x.type.rank)
            for i, a in enumerate(int(a) % x.type.rank for a in axes):
                full[a], full[a + x.type.rank] = pads[i], pads[i + len(axes)]
            pads = full
    return ctx.emit1("pad", [x], {"pads": [int(p) for p in pads], "mode": mode, "value": float(value)})


def _zero_point(ctx: _Ctx, zp: Value | None, like: Value, node: Any, computed: bool = False) -> Value:
    """An integer op's zero point: the given constant (or, where ``computed``, a value computed
    at run time), or 0 of the operand's type."""
    if zp is None:
        return ctx.const(np.zeros((), like.type.np_dtype), "zero_point")
    if not computed:
        ctx.const_input(zp, node, "zero point")
    return zp if zp.type.rank == 0 or zp.type.size > 1 else ctx.reshape(zp, ())


def _integer_conv(ctx: _Ctx, node: Any, x: Value, x_zp: Value, w: Value, w_zp: Value, bias: Value | None) -> Value:
    rank = w.type.rank - 2
    kernel = list(_attr(node, "kernel_shape", w.shape[2:]))
    strides = list(_attr(node, "strides", [1] * rank))
    dilations = list(_attr(node, "dilations", [1] * rank))
    attrs = {"strides": strides, "dilations": dilations, "groups": _attr(node, "group", 1),
             "pads": _auto_pads(node, x.shape[2:], kernel, strides, dilations)}
    return ctx.emit1(CONV_INT[rank], [x, x_zp, w, w_zp] + ([bias] if bias is not None else []), attrs)


def _output_stage(ctx: _Ctx, node: Any, acc: Value, scales: list[Value | None], y_zp: Value | None,
                  like: Value, axis: int) -> Value:
    """QLinear* output: round(acc * (s_a * s_b / s_y)) + zp_y, the multiplier computed in the
    scales' own type (as ONNX's reference does): folded now where they are constants, at run
    time where they are inputs."""
    if any(s is None for s in scales):
        raise QCompilerError(f"{node.op} '{node.name}': a scale is missing")
    s_a, s_b, s_y = scales
    multiplier = ctx.emit1("div", [ctx.emit1("mul", [s_a, s_b]), s_y])
    zp = _zero_point(ctx, y_zp, like, node, computed=True)
    return ctx.emit1("rescale", [acc, ctx.cast(multiplier, "f32"), zp], {"axis": axis})


@converts("ConvInteger")
def _conv_integer(ctx, node, inputs):
    x, w = inputs[0], inputs[1]
    x_zp = _zero_point(ctx, inputs[2] if len(inputs) > 2 else None, x, node, computed=True)
    w_zp = _zero_point(ctx, inputs[3] if len(inputs) > 3 else None, w, node, computed=True)
    centered = _centered_weight(ctx, w, w_zp)
    if x_zp.is_constant or centered is None or x_zp.type.rank:
        return _integer_conv(ctx, node, x, x_zp, w, w_zp, None)
    # a zero point computed at run time (quantize_dynamic): sum over the window of (x - z) w' =
    # conv(x, w') - z * conv(ones, w'), the second a constant (padding counts in neither), so the
    # product runs on the int8 kernels, whose activation zero point is a constant
    zero_x, zero_w = ctx.const(np.zeros((), x.type.np_dtype), "zero_point"), ctx.const(np.zeros((), np.int8),
                                                                                       "weight_zero_point")
    product = _integer_conv(ctx, node, x, zero_x, centered, zero_w, None)
    ones = ctx.const(np.ones((1, *x.shape[1:]), x.type.np_dtype), "ones")
    window_sums = ctx.array(_integer_conv(ctx, node, ones, zero_x, centered, zero_w, None))  # folded: all constant
    first = window_sums[(slice(None), slice(None)) + (slice(0, 1),) * (window_sums.ndim - 2)]
    if np.array_equal(np.broadcast_to(first, window_sums.shape), window_sums):
        window_sums = first  # no window reaches the padding: one sum per output channel
    return ctx.emit1("sub", [product, ctx.emit1("mul", [ctx.cast(x_zp, "i32"),
                                                         ctx.const(window_sums.astype(np.int32), "window_sums")])])


@converts("QLinearConv")
def _qlinear_conv(ctx, node, inputs):
    x, x_scale, x_zp, w, w_scale, w_zp, y_scale, y_zp = (inputs + [None] * 9)[:8]
    bias = inputs[8] if len(inputs) > 8 else None
    acc = _integer_conv(ctx, node, x, _zero_point(ctx, x_zp, x, node, computed=True), w,
                        _zero_point(ctx, w_zp, w, node, computed=True), bias)
    return _output_stage(ctx, node, acc, [x_scale, w_scale, y_scale], y_zp, x, axis=1)


def _centered_weight(ctx: _Ctx, w: Value, w_zp: Value) -> Value | None:
    """A constant weight minus its constant zero point as int8 (per output channel: axis 0 of a
    conv weight, the last of a matmul's), or None where either is computed or it leaves int8."""
    if not (w.is_constant and w_zp.is_constant):
        return None
    zp = ctx.array(w_zp).astype(np.int64)
    shape = [1] * w.type.rank
    if zp.ndim:
        shape[0 if w.type.rank > 2 else -1] = -1
    centered = ctx.array(w).astype(np.int64) - zp.reshape(shape)
    if np.abs(centered).max(initial=0) > 127:
        return None
    return ctx.const(centered.astype(np.int8), "weight")


@converts("MatMulInteger")
def _matmul_integer(ctx, node, inputs):
    """(a - a_zp) @ (b - b_zp) in int32. With a constant int8 ``b`` (a weight) and a zero point
    for ``a`` computed at run time (quantize_dynamic's DynamicQuantizeLinear), the integer
    identity (a - z) @ w' = a @ w' - z * colsum(w'), w' = b - b_zp, keeps the product on the int8
    kernels (whose activation zero point is a constant): a linear_int with zero point 0, minus z
    times the weight's column sums."""
    a, b = inputs[0], inputs[1]
    a_zp = _zero_point(ctx, inputs[2] if len(inputs) > 2 else None, a, node, computed=True)
    b_zp = _zero_point(ctx, inputs[3] if len(inputs) > 3 else None, b, node, computed=True)
    if a_zp.type.rank:
        raise QCompilerError(f"MatMulInteger '{node.name}': per-row a_zero_point is not supported")
    centered = _centered_weight(ctx, b, b_zp) if b.type.rank == 2 else None
    if a_zp.is_constant or centered is None:
        return ctx.emit1("matmul_int", [a, a_zp, b, b_zp])
    weights = ctx.array(centered)
    zero = ctx.const(np.zeros((), a.type.np_dtype), "zero_point")
    product = ctx.emit1("linear_int", [a, zero, ctx.const(np.ascontiguousarray(weights.T), "weight"),
                                       ctx.const(np.zeros((), np.int8), "weight_zero_point")])
    sums = ctx.const(weights.astype(np.int64).sum(axis=0).astype(np.int32), "weight_column_sums")
    return ctx.emit1("sub", [product, ctx.emit1("mul", [ctx.cast(a_zp, "i32"), sums])])


@converts("QLinearMatMul")
def _qlinear_matmul(ctx, node, inputs):
    a, a_scale, a_zp, b, b_scale, b_zp, y_scale, y_zp = inputs
    acc = ctx.emit1("matmul_int", [a, _zero_point(ctx, a_zp, a, node, computed=True), b,
                                   _zero_point(ctx, b_zp, b, node, computed=True)])
    return _output_stage(ctx, node, acc, [a_scale, b_scale, y_scale], y_zp, a, axis=-1)


def _blocked_dequantize(ctx, node, inputs, block: int) -> Value:
    """Opset 21 block-quantized constant weights (int4 with a scale per block of ``block``
    elements along ``axis``): dequantized at import into a float constant, which the
    quantizer then treats as any float weight."""
    x = ctx.array(inputs[0]).astype(np.float64)
    axis = _attr(node, "axis", 1) % x.ndim

    def per_element(v: Value | None) -> np.ndarray:
        if v is None:
            return np.zeros(1)
        return np.repeat(ctx.array(v).astype(np.float64), block, axis=axis).take(range(x.shape[axis]), axis=axis)

    scale, zero_point = per_element(inputs[1]), per_element(inputs[2] if len(inputs) > 2 else None)
    real = ((x - zero_point) * scale).astype(ctx.array(inputs[1]).dtype)
    return ctx.const(real, node.outputs[0].name or "dequantized")


@converts("QuantizeLinear", "DequantizeLinear")
def _quant(ctx, node, inputs):
    block = _attr(node, "block_size", 0)
    if block and node.op == "DequantizeLinear" and all(v is None or v.is_constant for v in inputs):
        return _blocked_dequantize(ctx, node, inputs, block)
    if block:
        raise QCompilerError(f"{node.op} '{node.name}': blocked quantization of run-time values is not supported")
    operands = [v for v in inputs if v is not None]
    op = "quantize" if node.op == "QuantizeLinear" else "dequantize"
    out_dtype = _attr(node, "output_dtype", 0)
    if op == "quantize" and len(operands) == 2 and out_dtype:  # opset 21+: type without a zero point
        dtype = onnx.helper.tensor_dtype_to_np_dtype(out_dtype)
        operands.append(ctx.const(np.zeros(operands[1].shape, dtype), "zero_point"))
    if int(np.prod(operands[1].shape)) == 1:  # a one-element scale (and zero point) is per tensor, whatever
        operands[1:] = [ctx.reshape(v, []) for v in operands[1:]]  # their ranks (ONNX Runtime writes [1] and [])
    # kept as nodes even on constants (quantized weights): lowering matches dequantize(int8 weight)
    return ctx.emit(op, operands, {"axis": _attr(node, "axis", 1)}, fold=False)[0]


from . import onnx_composites, onnx_contrib, onnx_detection, onnx_indexing, onnx_qoperator, onnx_signal, onnx_text, onnx_training  # noqa: E402,F401  register their converters
from .onnx_loops import unroll_loop, unroll_scan  # noqa: E402
from .onnx_sequences import MISSING, flattened_outputs, map_sequences, structured_input, value_kind  # noqa: E402
