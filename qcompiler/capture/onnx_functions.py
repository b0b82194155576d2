"""ONNX ops that qcompiler has no converter for but whose schema defines them as a function of
other ops (Attention, RotaryEmbedding, GroupNormalization, Mish, CenterCropPad, ...): each such
node is replaced by its function body before import, as ONNX Runtime does for function ops it
has no kernel for. The body is the schema's own definition at the model's opset (for a
context-dependent function, built for the node's attributes and input types), so the expansion
means exactly what the op means; the fusion passes then see ordinary MatMul/Softmax/... nodes."""
from __future__ import annotations

from collections.abc import Callable, Iterator

import onnx
import onnx.inliner
from onnx import defs, shape_inference

PRIVATE_DOMAIN = "qcompiler.expanded"
_ONNX_DOMAINS = ("", "ai.onnx")


def _schema(node: onnx.NodeProto, opset: int) -> defs.OpSchema | None:
    """``node``'s op schema at ``opset`` if it defines the op as a function, else None."""
    try:
        schema = defs.get_schema(node.op_type, opset, node.domain)
    except defs.SchemaError:
        return None
    return schema if schema.has_function or schema.has_context_dependent_function else None


def _schema_function(node: onnx.NodeProto, schema: defs.OpSchema, opset: int,
                     types: dict[str, onnx.TypeProto]) -> onnx.FunctionProto | None:
    """The function body of ``node``'s op at ``opset`` (the newest one defined by then), or None
    where a context-dependent body needs an input type that shape inference did not find, or its
    builder refuses the node."""
    plain = [v for v in schema.function_opset_versions if v <= opset]
    dependent = [v for v in schema.context_dependent_function_opset_versions if v <= opset]
    body = onnx.FunctionProto()
    if plain and (not dependent or max(plain) >= max(dependent)):
        body.ParseFromString(schema.get_function_with_opset_version(max(plain)))
        return body
    if not dependent:
        return None
    input_types = [types.get(name) if name else onnx.TypeProto() for name in node.input]
    if any(t is None for t in input_types):
        return None
    try:
        built = schema.get_context_dependent_function_with_opset_version(
            max(dependent), node.SerializeToString(), [t.SerializeToString() for t in input_types])
    except Exception:  # the builder refuses these attributes or types: the op stays unsupported
        return None
    body.ParseFromString(built)
    return body if body.node else None


def _with_default_attributes(node: onnx.NodeProto, schema: defs.OpSchema) -> onnx.NodeProto:
    """``node`` with each attribute it omits set to the schema's default (a function body reads
    attributes by reference, and an omitted one would otherwise be dropped, not defaulted)."""
    full = onnx.NodeProto()
    full.CopyFrom(node)
    present = {a.name for a in node.attribute}
    for name, attr in schema.attributes.items():
        if name not in present and attr.default_value.type != onnx.AttributeProto.UNDEFINED:
            full.attribute.append(attr.default_value)
    return full


def all_graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    """``graph`` and every subgraph (If branches, Loop and Scan bodies) inside it."""
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from all_graphs(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from all_graphs(g)


def _known_types(proto: onnx.ModelProto) -> dict[str, onnx.TypeProto]:
    try:
        inferred = shape_inference.infer_shapes(proto)
    except Exception:  # inference is best-effort here: unknown types only block dependent bodies
        inferred = proto
    graph = inferred.graph
    types = {v.name: v.type for v in (*graph.input, *graph.value_info, *graph.output)}
    types.update((t.name, onnx.helper.make_tensor_type_proto(t.data_type, list(t.dims))) for t in graph.initializer)
    return types


def _candidates(proto: onnx.ModelProto, opset: int,
                supported: Callable[[str], bool]) -> list[tuple[onnx.NodeProto, defs.OpSchema]]:
    return [(node, schema) for graph in all_graphs(proto.graph) for node in graph.node
            if node.domain in _ONNX_DOMAINS and not supported(node.op_type)
            and (schema := _schema(node, opset)) is not None]


def _copy(proto: onnx.ModelProto) -> onnx.ModelProto:
    copied = onnx.ModelProto()
    copied.CopyFrom(proto)
    return copied


def expand_functions(proto: onnx.ModelProto, opset: int, supported: Callable[[str], bool],
                     rounds: int = 4) -> tuple[onnx.ModelProto, list[str]]:
    """``proto`` with every default-domain node that ``supported`` refuses (by op type) and whose
    schema has a function body replaced by that body, repeated for ops inside bodies; and the op
    types expanded. Nodes without a body are left for the importer to report."""
    expanded: list[str] = []
    for step in range(rounds):
        candidates = _candidates(proto, opset, supported)
        if not candidates:
            break
        if step == 0:  # the caller's model (perhaps the user's ModelProto) is never changed
            proto = _copy(proto)
            candidates = _candidates(proto, opset, supported)
        dependent = any(schema.has_context_dependent_function for _, schema in candidates)
        types = _known_types(proto) if dependent else {}  # before any node here is renamed
        functions: list[onnx.FunctionProto] = []
        for node, schema in candidates:
            full = _with_default_attributes(node, schema)
            body = _schema_function(full, schema, opset, types)
            if body is None:
                continue
            body.name, body.domain = f"{node.op_type}_{len(functions)}", PRIVATE_DOMAIN
            node.ClearField("attribute")
            node.attribute.extend(full.attribute)
            node.op_type, node.domain = body.name, PRIVATE_DOMAIN
            functions.append(body)
            expanded.append(schema.name)
        if not functions:
            break
        imports = [onnx.OperatorSetIdProto(domain=o.domain, version=o.version) for o in proto.opset_import]
        proto.functions.extend(functions)
        proto.opset_import.append(onnx.helper.make_opsetid(PRIVATE_DOMAIN, 1))
        proto = onnx.inliner.inline_local_functions(proto)
        del proto.opset_import[:]  # the private domain's import goes: nothing uses it now
        proto.opset_import.extend(imports)
    return proto, sorted(set(expanded))
