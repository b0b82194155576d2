"""insert-qdq: put quantize/dequantize pairs where the QuantConfig says, with scales and zero
points from the calibrated ranges, and quantize weights at compile time.

The result is a QDQ graph (as ONNX Runtime writes): every quantized op reads dequantized
inputs and its result is quantized and dequantized again. It computes what the integer
graph will compute, in float, which is what `compare` measures and `lower-integer` matches.

- conv/linear/matmul: activation inputs and the result get per-tensor parameters; constant
  weights become int8 constants (symmetric, per output channel by default) behind a dequantize.
- add: each input and the result get their own parameters.
- concat: inputs and result share one scale (the union of their ranges), so it stays a copy.
- max/avg pooling, relu: the result reuses the input's parameters (exact for max/relu; a local
  average stays on the input's grid up to rounding).
- reduce_mean (global average pooling): the mean has a much narrower range than its input, so
  it gets its own parameters.
A value whose calibrated range exceeds ``max_abs_range`` (attention masks filled with -1e30)
is left in float with the op that reads it; every op left in float is reported."""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass

import numpy as np

from qcompiler.ir import Graph, Node, Value
from qcompiler.ir.ops.quant import choose_qparams
from qcompiler.pipeline import Pass, PassContext, register
from qcompiler.quant_config import QuantConfig

FLOAT = ("f32", "f16", "f64")
COMPUTE = ("conv1d", "conv2d", "conv3d", "linear", "matmul")
SAME_AS_INPUT = ("relu", "max_pool1d", "max_pool2d", "max_pool3d", "avg_pool1d", "avg_pool2d", "avg_pool3d")
Params = tuple[np.float32, np.integer]


def qparams_of(graph: Graph, dq: Value) -> Params | None:
    """The per-tensor (scale, zero point) of a value made by `dequantize`, if it is one."""
    node = dq.producer
    if node is None or node.op != "dequantize" or len(node.inputs) < 3:
        return None
    scale, zp = node.inputs[1], node.inputs[2]
    if not (scale.is_constant and zp.is_constant) or scale.type.rank or zp.type.rank:
        return None
    return graph.constant_array(scale)[()], graph.constant_array(zp)[()]


def quantize_weight(w: np.ndarray, per_channel: bool) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 over [-127, 127] per output channel (axis 0) or per tensor."""
    w = w.astype(np.float32)
    if per_channel:
        amax = np.abs(w.reshape(w.shape[0], -1)).max(axis=1)
        scale = np.where(amax > 0, amax / 127.0, 1.0).astype(np.float32)
        q = np.rint(w / scale.reshape((-1,) + (1,) * (w.ndim - 1)))
    else:
        amax = float(np.abs(w).max())
        scale = np.float32(amax / 127.0 if amax > 0 else 1.0)
        q = np.rint(w / scale)
    return np.clip(q, -127, 127).astype(np.int8), np.asarray(scale, np.float32)


class _Inserter:
    def __init__(self, graph: Graph, config: QuantConfig, report: list[dict[str, str]]):
        self.graph, self.config, self.report = graph, config, report
        self.cache: dict[tuple[int, float, int], Value] = {}

    def params(self, v: Value) -> Params | None:
        existing = qparams_of(self.graph, v)
        if existing is not None:
            return existing
        if v.dtype not in FLOAT or v.range is None:
            return None
        lo, hi = v.range
        if max(abs(lo), abs(hi)) > self.config.max_abs_range:
            return None
        return choose_qparams(lo, hi, self.config.activation_dtype)

    def why_not(self, v: Value) -> str:
        if v.dtype not in FLOAT:
            return f"%{v.name} is {v.dtype}, not float"
        if v.range is None:
            return f"%{v.name} has no calibrated range"
        return f"%{v.name} has range {v.range[0]:.3g}..{v.range[1]:.3g}, beyond max_abs_range (a mask?)"

    def _pair(self, v: Value, params: Params, source: str, before: Node | None) -> Value:
        g = self.graph
        scale = g.add_constant(f"{v.name}.scale", np.asarray(params[0], np.float32))
        zp = g.add_constant(f"{v.name}.zero_point", np.asarray(params[1]))
        meta = {"source": source}
        q = g.add_node("quantize", [v, scale, zp], {"axis": 0}, meta=dict(meta), before=before)
        return g.add_node("dequantize", [q.output, scale, zp], {"axis": 0}, meta=dict(meta), before=before).output

    def input(self, v: Value, params: Params, user: Node) -> Value:
        """``v`` as seen through quantize/dequantize with ``params`` (reusing pairs)."""
        current = qparams_of(self.graph, v)
        if current is not None and _same(current, params):
            return v
        key = (id(v), float(params[0]), int(params[1]))
        if key not in self.cache:
            self.cache[key] = self._pair(v, params, user.source, before=user)
        return self.cache[key]

    def output(self, node: Node, params: Params) -> None:
        """Quantize-dequantize ``node``'s result right after it; later readers see the pair."""
        y = node.output
        index = self.graph.nodes.index(node)
        after = self.graph.nodes[index + 1] if index + 1 < len(self.graph.nodes) else None
        dq = self._pair(y, params, node.source, before=after)
        q = dq.producer.inputs[0].producer
        self.graph.replace_all_uses(y, dq)
        q.inputs[0] = y
        self.cache[(id(y), float(params[0]), int(params[1]))] = dq

    def skip(self, node: Node, reason: str) -> None:
        self.report.append({"node": node.describe(), "handle": str(node.handle), "reason": reason})


def _same(a: Params, b: Params) -> bool:
    return float(a[0]) == float(b[0]) and int(a[1]) == int(b[1]) and np.asarray(a[1]).dtype == np.asarray(b[1]).dtype


@register
@dataclass(frozen=True)
class InsertQDQ(Pass):
    name = "insert-qdq"
    summary = "insert quantize/dequantize pairs from calibrated ranges; quantize weights (needs range-analysis)"
    exclude: tuple[str, ...] = ()  # more names/patterns kept float, beside QuantConfig.exclude

    def run(self, graph: Graph, ctx: PassContext) -> bool:
        config = ctx.config or QuantConfig()
        report = ctx.report.setdefault("not_quantized", [])
        ins = _Inserter(graph, config, report)
        changed = False
        for node in list(graph.nodes):
            if node.op in ("quantize", "dequantize") or not node.outputs or node.output.dtype not in FLOAT:
                continue
            quantizable = node.op in COMPUTE or node.op in SAME_AS_INPUT or node.op in ("add", "concat", "reduce_mean")
            if not quantizable:
                continue
            if not config.quantizes(node.op):
                ins.skip(node, f"op type '{node.op}' is not in QuantConfig.op_types")
                continue
            names = (node.source, *(v.name for v in node.outputs))
            if config.excluded(*names):
                ins.skip(node, "excluded by QuantConfig.exclude")
                continue
            if any(fnmatch.fnmatchcase(n, p) for n in names if n for p in self.exclude):
                ins.skip(node, "excluded by insert-qdq{exclude}")
                continue
            changed |= self._quantize(graph, node, ins, config)
        if changed:
            graph.remove_unused_constants()
        return changed

    def _quantize(self, graph: Graph, node: Node, ins: _Inserter, config: QuantConfig) -> bool:
        weight_slot = None
        if node.op in COMPUTE:
            weight_slot = 1 if node.op != "matmul" or node.inputs[1].is_constant else None
            acts = [i for i, v in enumerate(node.inputs[:2]) if i != weight_slot]
        elif node.op == "concat":
            acts = list(range(len(node.inputs)))
        elif node.op == "add":
            acts = [0, 1]
        elif node.op == "reduce_mean":  # a global pool: its mean gets its own (finer) scale
            acts = [0]
        else:
            acts = [0]
        for i in acts:
            if node.inputs[i].is_constant:
                ins.skip(node, f"operand {i} is a constant")
                return False
            if ins.params(node.inputs[i]) is None:
                ins.skip(node, ins.why_not(node.inputs[i]))
                return False
        if node.op in SAME_AS_INPUT:
            out_params = ins.params(node.inputs[0])
        elif node.op == "concat":
            ranges = [v.range for v in node.inputs + node.outputs]
            if any(r is None for r in ranges):
                ins.skip(node, "concat operand without a calibrated range")
                return False
            lo, hi = min(r[0] for r in ranges), max(r[1] for r in ranges)
            if max(-lo, hi) > config.max_abs_range:
                ins.skip(node, f"concat range {lo:.3g}..{hi:.3g} beyond max_abs_range")
                return False
            out_params = choose_qparams(lo, hi, config.activation_dtype)
        else:
            out_params = ins.params(node.output)
            if out_params is None:
                ins.skip(node, ins.why_not(node.output))
                return False
        for i in acts:
            params = out_params if node.op == "concat" else ins.params(node.inputs[i])
            node.inputs[i] = ins.input(node.inputs[i], params, node)
        if weight_slot is not None:
            w = node.inputs[1]
            if not w.is_constant or w.dtype not in FLOAT:
                ins.skip(node, "weight is not a float constant")
                return True
            per_channel = config.per_channel and node.op != "matmul"
            wq, scale = quantize_weight(graph.constant_array(w), per_channel)
            q = graph.add_constant(f"{w.name}.quantized", wq)
            s = graph.add_constant(f"{w.name}.scale", scale)
            z = graph.add_constant(f"{w.name}.zero_point", np.zeros(scale.shape, np.int8))
            node.inputs[1] = graph.add_node("dequantize", [q, s, z], {"axis": 0}, meta={"source": node.source},
                                            before=node).output
        ins.output(node, out_params)
        return True
