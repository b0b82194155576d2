"""The verifier: SSA form, no dangling uses, op arity/attributes, re-inferred types equal to
the recorded ones, constants matching their data, quantization parameters well formed.
Run after every pass in tests; a failure names the node and what is wrong."""
from __future__ import annotations

import numpy as np

from ..errors import VerificationError
from .graph import Graph, Node
from .ops import get_op
from .types import TensorType


def _fail(where: str, node: Node | None, msg: str) -> VerificationError:
    at = f" at {node.describe()}" if node is not None else ""
    return VerificationError(f"{where}: invalid graph{at}: {msg}")


def _check_quant_constants(graph: Graph, node: Node, where: str) -> None:
    scale = node.inputs[1]
    if scale.is_constant:
        s = graph.constant_array(scale)
        if not np.all(np.isfinite(s)) or np.any(s <= 0):
            raise _fail(where, node, f"scale @{scale.name} must be finite and positive")


def verify_graph(graph: Graph, where: str = "graph") -> None:
    """Raise :class:`VerificationError` on the first broken invariant."""
    defined: set[int] = set()
    names: set[str] = set()
    for v in graph.inputs:
        if v.name in names:
            raise _fail(where, None, f"input %{v.name} is declared twice")
        names.add(v.name)
        defined.add(id(v))
    for name, array in graph.constants.items():
        value = graph.constant_value(name)
        if value.type != TensorType.of(array):
            raise _fail(where, None, f"constant @{name} is typed {value.type} but holds {TensorType.of(array)}")
    for node in graph.nodes:
        try:
            opdef = get_op(node.op)
        except KeyError:
            raise _fail(where, node, f"unknown op '{node.op}'") from None
        for v in node.inputs:
            if v.is_constant:
                if graph.constants.get(v.name) is None or graph.constant_value(v.name) is not v:
                    raise _fail(where, node, f"uses constant @{v.name} that is not in the graph")
            elif id(v) not in defined:
                raise _fail(where, node, f"uses %{v.name} before (or without) its definition")
        try:
            opdef.check_arity(len(node.inputs), node.op)
            attrs = opdef.normalize_attrs(dict(node.attrs), node.op)
            inferred = opdef.infer([v.type for v in node.inputs], attrs)
        except (TypeError, ValueError) as e:
            raise _fail(where, node, str(e)) from None
        recorded = [v.type for v in node.outputs]
        if inferred != recorded:
            raise _fail(where, node, f"recorded result types {', '.join(map(str, recorded))} but the op "
                                     f"infers {', '.join(map(str, inferred))}")
        if "handle" not in node.meta:
            raise _fail(where, node, "node has no debug handle")
        if node.op in ("quantize", "dequantize"):
            _check_quant_constants(graph, node, where)
        for v in node.outputs:
            if v.name in names:
                raise _fail(where, node, f"value %{v.name} is defined twice")
            if v.producer is not node:
                raise _fail(where, node, f"value %{v.name} does not point back to its producer")
            names.add(v.name)
            defined.add(id(v))
    if not graph.outputs:
        raise _fail(where, None, "graph has no outputs")
    for v in graph.outputs:
        if not v.is_constant and id(v) not in defined:
            raise _fail(where, None, f"returns %{v.name}, which is never defined")
