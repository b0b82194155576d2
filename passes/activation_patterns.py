"""Activations that exporters write out in pieces, recognised as the one op they are (rules of
canonicalize). Paddle writes hard-swish as ``x * clip(x + 3, 0, 6) / 6``, ONNX exporters
write GELU as ``0.5 * x * (1 + erf(x / sqrt(2)))`` (or with tanh, in several groupings) and SiLU
as ``x * sigmoid(x)``: left in
pieces, each piece gets its own quantize/dequantize pair and none fuses into the convolution
before it. Each rule states its identity; the fused op's kernel computes the same function
(to float rounding). A rule rewrites the last node in place, so its result (perhaps a graph
output) survives; the pieces left unused are erased by canonicalize."""
from __future__ import annotations

import math

import numpy as np

from qcompiler.ir import Graph, Node, Value
from qcompiler.ir.ops import get_op
from qcompiler.pipeline import matches


def _producer(v: Value, op: str) -> Node | None:
    p = v.producer
    return p if p is not None and p.op == op else None


def _is(graph: Graph, v: Value, number: float) -> bool:
    """A scalar (or all-equal) constant close to ``number`` (exporters round 1/6 and sqrt(2))."""
    if not v.is_constant:
        return False
    a = graph.constant_array(v)
    return a.size > 0 and bool(np.allclose(a, number, rtol=1e-5, atol=0))


def _scaled(graph: Graph, node: Node, factor: float) -> Value | None:
    """``y`` when ``node`` is ``y / (1/factor)`` or ``y * factor`` (either operand order)."""
    if node.op == "div" and _is(graph, node.inputs[1], 1 / factor):
        return node.inputs[0]
    if node.op == "mul":
        for y, k in ((node.inputs[0], node.inputs[1]), (node.inputs[1], node.inputs[0])):
            if _is(graph, k, factor):
                return y
    return None


def _plus(graph: Graph, v: Value, number: float) -> Value | None:
    """``x`` when ``v`` is ``x + number`` (either operand order)."""
    add = _producer(v, "add")
    if add is None:
        return None
    for x, k in ((add.inputs[0], add.inputs[1]), (add.inputs[1], add.inputs[0])):
        if _is(graph, k, number):
            return x
    return None


def _relu6_of_plus_3(graph: Graph, v: Value) -> Value | None:
    """``x`` when ``v`` is ``clip(x + 3, 0, 6)``."""
    clip = _producer(v, "clip")
    if clip is None or (clip.attrs["min"], clip.attrs["max"]) != (0.0, 6.0):
        return None
    return _plus(graph, clip.inputs[0], 3.0)


def _become(graph: Graph, node: Node, op: str, x: Value, attrs: dict | None = None) -> bool:
    if x.type != node.output.type:
        return False  # a constant broadcast the result: not the elementwise op
    node.op, node.inputs, node.attrs = op, [x], get_op(op).normalize_attrs(attrs or {}, op)
    return True


@matches("div", "mul")
def hardsigmoid_from_parts(graph: Graph, node: Node) -> bool:
    """clip(x + 3, 0, 6) / 6 == hardsigmoid(x) with alpha 1/6, beta 1/2 (== clip(x/6 + 1/2, 0, 1))."""
    inner = _scaled(graph, node, 1 / 6) if node.op in ("div", "mul") else None
    x = _relu6_of_plus_3(graph, inner) if inner is not None else None
    return x is not None and _become(graph, node, "hardsigmoid", x, {"alpha": 1 / 6, "beta": 0.5})


@matches("div", "mul")
def hardswish_from_parts(graph: Graph, node: Node) -> bool:
    """x * clip(x + 3, 0, 6) / 6 == x * hardsigmoid(x) == hardswish(x) (Paddle, MobileNetV3)."""
    if node.op not in ("div", "mul"):
        return False
    inner = _scaled(graph, node, 1 / 6)
    product = _producer(inner, "mul") if inner is not None else None
    candidates = [(product.inputs[0], product.inputs[1]), (product.inputs[1], product.inputs[0])] if product else []
    for x, c in candidates:
        if _relu6_of_plus_3(graph, c) is x:
            return _become(graph, node, "hardswish", x)
    if node.op == "mul":  # x * hardsigmoid(x), PyTorch's parameters
        for x, h in ((node.inputs[0], node.inputs[1]), (node.inputs[1], node.inputs[0])):
            hs = _producer(h, "hardsigmoid")
            if hs is not None and hs.inputs[0] is x and np.isclose(hs.attrs["alpha"], 1 / 6) \
                    and hs.attrs["beta"] == 0.5:
                return _become(graph, node, "hardswish", x)
    return False


@matches("mul")
def silu_from_parts(graph: Graph, node: Node) -> bool:
    """x * sigmoid(x) == silu(x)."""
    if node.op != "mul":
        return False
    for x, s in ((node.inputs[0], node.inputs[1]), (node.inputs[1], node.inputs[0])):
        sigmoid = _producer(s, "sigmoid")
        if sigmoid is not None and sigmoid.inputs[0] is x:
            return _become(graph, node, "silu", x)
    return False


def _factors(v: Value, depth: int = 3) -> list[Value]:
    """The operands of a product tree of ``mul`` nodes under ``v`` (``v`` itself if none)."""
    p = _producer(v, "mul")
    if p is None or depth == 0:
        return [v]
    return _factors(p.inputs[0], depth - 1) + _factors(p.inputs[1], depth - 1)


@matches("mul")
def gelu_from_parts(graph: Graph, node: Node) -> bool:
    """0.5 * x * (1 + erf(x / sqrt(2))) == gelu(x), the factors in any order and grouping."""
    if node.op != "mul":
        return False
    factors = _factors(node.output)
    if len(factors) != 3:
        return False
    half = [f for f in factors if _is(graph, f, 0.5)]
    rest = [f for f in factors if not _is(graph, f, 0.5)]
    if len(half) != 1 or len(rest) != 2:
        return False
    for x, a in ((rest[0], rest[1]), (rest[1], rest[0])):
        erf_of = _plus(graph, a, 1.0)
        erf = _producer(erf_of, "erf") if erf_of is not None else None
        if erf is None:
            continue
        d = erf.inputs[0].producer
        if d is not None and d.op in ("div", "mul") and _scaled(graph, d, 1 / math.sqrt(2)) is x:
            return _become(graph, node, "gelu", x, {"approximate": "none"})
    return False


CONE_OPS = ("mul", "add", "sub", "div", "pow", "tanh")  # what tanh-GELU's spellings are made of
CONE_LIMIT = 12  # nodes: the longest spelling has 9


def _one_variable_cone(graph: Graph, v: Value) -> tuple[Value, list[Node]] | None:
    """(x, nodes in evaluation order) when ``v`` is computed from one run-time value ``x`` and
    scalar constants by at most ``CONE_LIMIT`` elementwise ``CONE_OPS`` nodes; else None."""
    order: list[Node] = []
    variables: set[int] = set()
    x: Value | None = None

    def visit(u: Value) -> bool:
        nonlocal x
        p = u.producer
        if u.is_constant:
            return u.type.size == 1
        if p is None or p.op not in CONE_OPS or len(order) >= CONE_LIMIT:
            variables.add(id(u))
            x = u
            return len(variables) == 1
        if p in order:
            return True
        if not all(visit(i) for i in p.inputs):
            return False
        order.append(p)
        return True

    return (x, order) if visit(v) and x is not None and order else None


GELU_SAMPLES = np.linspace(-8.0, 8.0, 321, dtype=np.float32)


@matches("mul")
def gelu_tanh_from_parts(graph: Graph, node: Node) -> bool:
    """0.5 * x * (1 + tanh(sqrt(2/pi) * (x + 0.044715 * x^3))) == gelu(x, approximate="tanh"),
    however written (``pow(x, 3)`` or ``x * x * x``, HF's FastGELU ``x * k * (1 + 0.044715 *
    x * x)``, any grouping): when the result is a function of one value ``x`` and scalar constants
    through a tanh, and that function agrees with tanh-GELU on samples over [-8, 8] to float32
    rounding (the spellings are polynomial identities in x, so agreeing there is being it)."""
    if node.op != "mul":
        return False
    cone = _one_variable_cone(graph, node.output)
    if cone is None or not any(n.op == "tanh" for n in cone[1]):
        return False
    x, nodes = cone
    values = {id(x): GELU_SAMPLES}
    for n in nodes:
        operands = [graph.constant_array(i).reshape(()) if i.is_constant else values[id(i)] for i in n.inputs]
        values[id(n.output)] = get_op(n.op).run(operands, n.attrs)[0]
    expected = get_op("gelu").run([GELU_SAMPLES], {"approximate": "tanh"})[0]
    return bool(np.allclose(values[id(node.output)], expected, rtol=1e-4, atol=1e-5)) \
        and _become(graph, node, "gelu", x, {"approximate": "tanh"})


RULES = [hardswish_from_parts, hardsigmoid_from_parts, silu_from_parts, gelu_from_parts, gelu_tanh_from_parts]
