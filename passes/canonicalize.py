"""canonicalize: small local simplifications that put the graph in the form later passes
match on. Each rule below states the identity it relies on. A node whose result is a graph
output is never removed (the output keeps its name)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from qcompiler.ir import Graph, Node, Value
from qcompiler.pipeline import Pass, PassContext, apply_rules, matches, register

from . import activation_patterns
from .dead_code import EliminateDeadCode


def _forward(graph: Graph, node: Node, value: Value) -> bool:
    """Replace ``node``'s single result by ``value`` and drop the node."""
    if node.output in graph.outputs:
        return False
    graph.replace_all_uses(node.output, value)
    graph.remove_node(node)
    return True


@matches("identity", "dropout")
def remove_identity(graph: Graph, node: Node) -> bool:
    """identity(x) == x and dropout(x) == x at inference."""
    return node.op in ("identity", "dropout") and _forward(graph, node, node.inputs[0])


@matches("reshape", "expand", "transpose", "cast")
def remove_noop_layout(graph: Graph, node: Node) -> bool:
    """reshape/expand to the input's own shape, transpose by the identity permutation and cast
    to the input's own dtype return x unchanged."""
    if node.op not in ("reshape", "expand", "transpose", "cast"):
        return False
    if node.output.type != node.inputs[0].type:
        return False
    if node.op == "transpose" and list(node.attrs["perm"]) != list(range(len(node.attrs["perm"]))):
        return False  # a square transpose keeps the type but moves data
    return _forward(graph, node, node.inputs[0])


@matches("reshape")
def merge_reshapes(graph: Graph, node: Node) -> bool:
    """reshape(reshape(x, s1), s2) == reshape(x, s2): only the element order matters."""
    inner = node.inputs[0].producer
    if node.op != "reshape" or inner is None or inner.op != "reshape":
        return False
    node.inputs = [inner.inputs[0]]
    return True


@matches("transpose")
def merge_transposes(graph: Graph, node: Node) -> bool:
    """transpose(transpose(x, p), q) == transpose(x, [p[i] for i in q])."""
    inner = node.inputs[0].producer
    if node.op != "transpose" or inner is None or inner.op != "transpose":
        return False
    p, q = inner.attrs["perm"], node.attrs["perm"]
    node.inputs = [inner.inputs[0]]
    node.attrs = {**node.attrs, "perm": tuple(p[i] for i in q)}
    return True


def _constant_equal_to(graph: Graph, v: Value, number: float) -> bool:
    return v.is_constant and bool(np.all(graph.constant_array(v) == number))


@matches("mul", "add", "sub", "div")
def remove_neutral_arithmetic(graph: Graph, node: Node) -> bool:
    """x * 1 == x, x + 0 == x, x - 0 == x, x / 1 == x, when the constant does not broadcast
    the result to a larger shape or another dtype."""
    neutral = {"mul": 1, "add": 0, "sub": 0, "div": 1}.get(node.op)
    if neutral is None:
        return False
    a, b = node.inputs
    candidates = [(a, b)] + ([(b, a)] if node.op in ("mul", "add") else [])
    for keep, const in candidates:
        if _constant_equal_to(graph, const, neutral) and keep.type == node.output.type:
            return _forward(graph, node, keep)
    return False


@matches("matmul")
def transposed_weight_matmul_to_linear(graph: Graph, node: Node) -> bool:
    """matmul(x, W) with a constant 2-D W [K, N] == linear(x, W^T): linear keeps weights in
    [out, in] layout, the form per-output-channel quantization and the targets expect.
    (A transpose feeding the matmul has been folded into W by fold-constants.)"""
    if node.op != "matmul" or node.attrs["activation"] != "none":
        return False
    x, w = node.inputs
    if not w.is_constant or w.type.rank != 2 or x.type.rank < 1:
        return False
    weight = graph.add_constant(f"{w.name}.T", np.ascontiguousarray(graph.constant_array(w).T))
    node.op, node.inputs = "linear", [x, weight]
    return True


@matches("add")
def add_bias_to_linear(graph: Graph, node: Node) -> bool:
    """linear(x, W) + b == linear(x, W, b) for a constant b of shape [N] (ONNX MatMul + Add).
    The add node itself becomes the biased linear, so its result (perhaps a graph output)
    survives; the bias-free linear is erased when nothing else reads it."""
    if node.op != "add":
        return False
    for lin, bias in ((node.inputs[0], node.inputs[1]), (node.inputs[1], node.inputs[0])):
        producer = lin.producer
        if (producer is not None and producer.op == "linear" and len(producer.inputs) == 2
                and producer.attrs["activation"] == "none" and bias.is_constant
                and bias.shape == (producer.inputs[1].shape[0],) and lin.type == node.output.type):
            node.op, node.inputs, node.attrs = "linear", producer.inputs + [bias], dict(producer.attrs)
            node.meta = {**node.meta, "source": producer.source or node.source}
            return True
    return False


RULES = [remove_identity, remove_noop_layout, merge_reshapes, merge_transposes, remove_neutral_arithmetic,
         transposed_weight_matmul_to_linear, add_bias_to_linear, *activation_patterns.RULES]


@register
@dataclass(frozen=True)
class Canonicalize(Pass):  # also erases the nodes its rewrites leave dead
    name = "canonicalize"
    summary = ("remove identity/dropout and no-op reshapes/transposes/casts, x*1, x+0; matmul by a constant -> "
               "linear; activations written in pieces (hard-swish, hard-sigmoid, SiLU, GELU) -> their op")

    def run(self, graph: Graph, ctx: PassContext) -> bool:
        changed = any(apply_rules(graph, RULES).values())
        if changed:  # rewrites leave the nodes they bypassed unused: erase them, as MLIR does
            EliminateDeadCode().run(graph, ctx)
        return changed
