"""insert-qdq: put quantize/dequantize pairs where the QuantConfig says, with scales and zero
points from the calibrated ranges, and quantize weights at compile time.

The result is a QDQ graph (as ONNX Runtime writes): every quantized op reads dequantized
inputs and its result is quantized and dequantized again. It computes what the integer
graph will compute, in float, which is what `compare` measures and `lower-integer` matches.

- conv/linear/matmul: activation inputs and the result get per-tensor parameters; constant
  weights become int8 constants (symmetric, per output channel by default) behind a dequantize.
  A result no reader takes as int8 (a model output; a transformer's linear read by a residual
  add, GELU or softmax) is not quantized: the int32 accumulator is dequantized at s_x * s_w
  per channel, as NNCF and OpenVINO leave a network's last layer. Rounding 1,000 logits to
  255 levels cost MobileNetV2 7 dB of output SQNR (41.4 -> 48.3 dB without it).
- add: each input and the result get their own parameters, where some reader takes the sum
  as int8 (ResNet's residual add, read by relu -> conv). One read only by float ops (a
  transformer's residual add, read by a layer norm) stays float: rounding the sum would only
  add error before the dequantize. On all-MiniLM-L6-v2 (256 real sentences) the two rules
  took the default build from cosine 0.9921 to 0.9967 at the same latency.
- concat: inputs and result share one scale (the union of their ranges), so it stays a copy;
  when an operand's range is far narrower than the union (boxes joined with scores) the
  join stays float instead (``JOIN_SPREAD``).
- max/avg pooling, relu: the result reuses the input's parameters (exact for max/relu; a local
  average stays on the input's grid up to rounding).
- reduce_mean (global average pooling): the mean has a much narrower range than its input, so
  it gets its own parameters.
- a linear or matmul named in ``dynamic``: its left operand gets per-token scales at run time
  (``quantize_rows`` -> ``dequantize_rows``), its weight per channel (a matmul's run-time right
  operand per tensor) as above, its result float.
A value whose calibrated range exceeds ``max_abs_range``, or that is computed from a constant
beyond it (attention masks filled with -1e30 or -inf, whether or not calibration saw padding)
is left in float with the op that reads it; every op left in float is reported."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from qcompiler.ir import Graph, Node, Value
from qcompiler.ir.ops import get_op, traits_of
from qcompiler.ir.ops.quant import choose_qparams, round_to_bf16
from qcompiler.ir.packing import M_MAX, Q_MAX, Int4Groups
from qcompiler.pipeline import Pass, PassContext, register
from qcompiler.quant_config import QuantScheme, layer_names

FLOAT = ("f32", "f16", "f64")
QUANTIZABLE = ("weighted", "own_params", "shared_params", "same_as_input")  # the roles insert-qdq acts on
BF16_REASON = "bf16: operands rounded to bfloat16, accumulated in float32"
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


DEAD_CHANNEL_RATIO = 2.0 ** -20  # a channel this much smaller than the largest is a zero channel
BIAS_LIMIT = 2.0 ** 30  # |int32 bias| at most this, leaving the accumulator's sum room below 2^31


def quantize_weight(w: np.ndarray, per_channel: bool, min_scale: np.ndarray | None = None,
                    groups: Int4Groups | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 over [-127, 127] per output channel (axis 0) or per tensor; with ``groups``,
    4-bit values times group multipliers (:func:`int4_grid`) on a channel scale.

    Real weights hold dead channels (after batch-norm folding, 1e-12 down to subnormal 1e-40):
    a channel whose largest weight is under ``DEAD_CHANNEL_RATIO`` of the tensor's largest
    contributes less than float32 resolves of the layer's (per-tensor quantized) output, so it
    is a zero channel, with the largest channel's scale; its own (1e-42) would make the
    requantization multiplier and the int32 bias meaningless. ``min_scale`` (per channel, from
    :func:`bias_scale_floor`) coarsens a channel whose bias would not fit int32 otherwise."""
    w = w.astype(np.float32)
    channels = w.reshape(w.shape[0], -1) if per_channel else w.reshape(1, -1)
    amax = np.abs(channels).max(axis=1).astype(np.float64) if channels.size else np.zeros(len(channels))
    top = float(amax.max()) if amax.size else 0.0
    levels = float(Q_MAX * M_MAX) if groups is not None else 127.0
    if top < np.finfo(np.float32).tiny:  # the whole tensor is (sub)normal dust
        dead, scale = np.ones_like(amax, bool), np.ones_like(amax)
    else:
        dead = amax < top * DEAD_CHANNEL_RATIO
        scale = np.where(dead, top / levels, amax / levels)
    if min_scale is not None:
        floor = np.asarray(min_scale, np.float64)
        scale = np.maximum(scale, floor if per_channel else floor.max(initial=0.0))
    scale = scale.astype(np.float32)
    if groups is not None:
        values, multipliers = int4_grid(channels, scale, groups.group_size)
        q = values * multipliers
    else:
        q = np.clip(np.rint(channels / scale[:, None].astype(np.float64)), -127, 127)
    q = np.where(dead[:, None], 0, q).astype(np.int8).reshape(w.shape)
    return q, (scale if per_channel else scale.reshape(()))


def int4_grid(rows: np.ndarray, scale: np.ndarray, group_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(q, m) per element of ``rows`` [channels, inputs]: each group of ``group_size`` consecutive
    weights of a row gets the integer multiple ``m`` in [1, 18] of the row's scale (its group
    scale, exact in int8 since 7 * 18 < 128) and 4-bit values ``q`` in [-7, 7] on it. ``m`` is the
    one among the three just covering the group's range and the two below it (clipping a few
    outliers for a finer grid) with the least squared error: a search over 3 candidates, as MSE
    range setting does."""
    count, cols = rows.shape
    groups = -(-cols // group_size)
    padded = np.zeros((count, groups * group_size), np.float64)
    padded[:, :cols] = rows
    grouped = padded.reshape(count, groups, group_size)
    unit = scale.astype(np.float64)[:, None, None]
    cover = np.clip(np.ceil(np.abs(grouped).max(axis=2, keepdims=True) / (Q_MAX * unit) - 1e-9), 1, M_MAX)
    best_q = best_m = best_err = None
    for step in (0, 1, 2):
        m = np.clip(cover - step, 1, M_MAX)
        q = np.clip(np.rint(grouped / (unit * m)), -Q_MAX, Q_MAX)
        err = ((grouped - q * m * unit) ** 2).sum(axis=2, keepdims=True)
        if best_err is None:
            best_q, best_m, best_err = q, m, err
        else:
            better = err < best_err
            best_q, best_m, best_err = np.where(better, q, best_q), np.where(better, m, best_m), np.minimum(err, best_err)
    best_m = np.broadcast_to(best_m, grouped.shape)
    return best_q.reshape(count, -1)[:, :cols], best_m.reshape(count, -1)[:, :cols]


def bias_scale_floor(bias: np.ndarray | None, x_scale: float, channels: int) -> np.ndarray | None:
    """The smallest weight scale per output channel that keeps ``round(b / (s_x * s_w))`` within
    ``BIAS_LIMIT`` (an int32 bias, with room for the accumulation): ``|b| / (s_x * 2^30)``."""
    if bias is None:
        return None
    return np.broadcast_to(np.abs(bias.astype(np.float64)) / (float(x_scale) * BIAS_LIMIT), (channels,))


def layer_weight(graph: Graph, node: Node, scheme: QuantScheme,
                 x_scale: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``node``'s constant weight quantized as insert-qdq quantizes it under ``scheme``, with its
    constant bias and its input's scale (``x_scale``, else from the input's calibrated range)."""
    traits = traits_of(node.op)
    slot = traits.bias_slot
    bias = graph.constant_array(node.inputs[slot]) \
        if slot is not None and len(node.inputs) > slot and node.inputs[slot].is_constant else None
    if x_scale is None and not scheme.is_weight_only(node):
        x_scale = float(choose_qparams(*node.inputs[0].range, scheme.activation_dtype)[0])
    return quantize_layer_weight(node, graph.constant_array(node.inputs[traits.weight_slot]), bias, x_scale, scheme)


def quantize_layer_weight(node: Node, w: np.ndarray, bias: np.ndarray | None, x_scale: float | None,
                          scheme: QuantScheme) -> tuple[np.ndarray, np.ndarray]:
    """The weight ``w`` of ``node`` quantized under ``scheme``: per channel where the layer has
    output channels, same dead channels, 4-bit groups where the scheme says, and the int32 bias
    floor from ``bias`` and ``x_scale`` (none for a weight-only layer: its bias stays float).
    insert-qdq, bias correction, gptq and the QAT module all quantize through here."""
    per_channel = scheme.per_channel and traits_of(node.op).channel_axis is not None
    floor = None if scheme.is_weight_only(node) else bias_scale_floor(bias, x_scale, w.shape[0])
    return quantize_weight(w, per_channel, floor, scheme.int4_groups(node))


def attach_quantized_weight(graph: Graph, node: Node, slot: int, q: np.ndarray, scale: np.ndarray,
                            groups: Int4Groups | None) -> None:
    """``node`` reads its weight as ``dequantize(q, scale, 0)`` along axis 0, ``q`` stored as
    ``groups`` says (4-bit) or as int8."""
    w = node.inputs[slot]
    operands = [graph.add_constant(f"{w.name}.quantized", q, storage=groups),
                graph.add_constant(f"{w.name}.scale", scale),
                graph.add_constant(f"{w.name}.zero_point", np.zeros(scale.shape, np.int8))]
    node.inputs[slot] = graph.add_node("dequantize", operands, {"axis": 0}, meta={"source": node.source},
                                       before=node).output


def is_quantized_weight(v: Value) -> bool:
    """``v`` is an int8 constant behind a dequantize: a weight already quantized (by gptq)."""
    dq = v.producer
    return dq is not None and dq.op == "dequantize" and dq.inputs[0].is_constant and dq.inputs[0].dtype == "i8"


def per_token_applies(node: Node) -> bool:
    """``node`` can take per-token scales: a run-time f32 left operand, and either a linear's float
    constant weight or a matmul's run-time f32 right operand with the same batch dimensions
    (attention's products; a broadcast batch would leave the row scales the wrong shape). The one
    test insert-qdq, bias correction and the sensitivity check's ladder read."""
    config_type = traits_of(node.op).config_type
    if config_type not in ("linear", "matmul") or len(node.inputs) < 2:
        return False
    x, right = node.inputs[0], node.inputs[1]
    if x.is_constant or x.dtype != "f32":
        return False
    if config_type == "linear":
        return right.is_constant and right.dtype in FLOAT
    return (not right.is_constant and right.dtype == "f32" and x.type.rank >= 2 and right.type.rank >= 2
            and x.shape[:-2] == right.shape[:-2])


class _Inserter:
    def __init__(self, graph: Graph, config: QuantScheme, report: list[dict[str, str]]):
        self.graph, self.config, self.report = graph, config, report
        self.cache: dict[tuple, Value] = {}  # (id, scale, zero point) or ("rows", id) -> the dequantized value
        self.bf16_cache: dict[int, Value] = {}  # id(value) -> the value rounded to bf16
        self.largest: dict[str, float] = {}  # constant name -> its largest magnitude
        self.int8_read: dict[int, bool] = {}  # id(value) -> whether a reader takes it as int8

    def read_as_int8(self, v: Value) -> bool:
        """Some reader of ``v`` will take it on the int8 grid: a conv, linear or matmul this scheme
        quantizes statically, or, through ops that keep values on the grid (reshapes, relu,
        pooling) and joins (add, concat: quantized only then), one that does. Where none does, a
        result rounded to int8 would only be dequantized again: more error, no saving."""
        key = id(v)
        if key not in self.int8_read:
            self.int8_read[key] = v not in self.graph.outputs and any(
                self._reads_as_int8(user) for user in self.graph.users_of(v))
        return self.int8_read[key]

    def _reads_as_int8(self, user: Node) -> bool:
        traits, c = traits_of(user.op), self.config
        if len(user.outputs) != 1 or user.op in ("quantize", "dequantize"):
            return user.op == "quantize"
        if traits.quant == "float":  # a layout op carries the grid; any other float op reads float
            return traits.on_grid and self.read_as_int8(user.output)
        if not c.quantizes(user.op) or c.excluded(*layer_names(user)) or c.runs_bf16(user) \
                or c.is_weight_only(user):
            return False
        if traits.quant == "weighted":
            return not (c.runs_dynamic(user) and per_token_applies(user))
        return self.read_as_int8(user.output)

    def params(self, v: Value) -> Params | None:
        existing = qparams_of(self.graph, v)
        if existing is not None:
            return existing
        if v.dtype not in FLOAT:
            return None
        if v.is_constant:  # an operand known at compile time (LRN's bias): its own values are its range,
            values = self.graph.constant_array(v)  # or a calibrated one that covers them
            lo, hi = min(0.0, float(values.min(initial=0.0))), max(0.0, float(values.max(initial=0.0)))
            if v.range is not None:
                lo, hi = min(lo, v.range[0]), max(hi, v.range[1])
        elif v.range is None or self._masked(v):
            return None
        else:
            lo, hi = v.range
        if max(abs(lo), abs(hi)) > self.config.max_abs_range:
            return None
        return choose_qparams(lo, hi, self.config.activation_dtype)

    def _masked(self, v: Value) -> bool:
        """``v`` is computed from a constant beyond ``max_abs_range`` (a ``where`` filling with
        -inf or -1e30): a mask, whatever range calibration saw (data without padding never shows
        the fill value, and run-time padding would be clamped onto the grid: attention leaking
        onto padding)."""
        producer = v.producer
        while producer is not None and traits_of(producer.op).family == "layout" and producer.inputs \
                and not producer.inputs[0].is_constant:  # through reshapes and transposes of the mask
            producer = producer.inputs[0].producer
        return producer is not None and any(i.is_constant and i.dtype in FLOAT and i.type.size and
                                            not self._largest(i) <= self.config.max_abs_range
                                            for i in producer.inputs)

    def _largest(self, constant: Value) -> float:
        if constant.name not in self.largest:
            self.largest[constant.name] = float(np.max(np.abs(self.graph.constant_array(constant))))
        return self.largest[constant.name]

    def why_not(self, v: Value) -> str:
        if v.dtype not in FLOAT:
            return f"%{v.name} is {v.dtype}, not float"
        if v.range is None and not v.is_constant:
            return f"%{v.name} has no calibrated range"
        if v.is_constant:
            return f"constant %{v.name} has values beyond max_abs_range (a mask?)"
        if self._masked(v):
            return f"%{v.name} is filled from a constant beyond max_abs_range (a mask)"
        return f"%{v.name} has range {v.range[0]:.3g}..{v.range[1]:.3g}, beyond max_abs_range (a mask?)"

    def _pair(self, v: Value, params: Params, source: str, before: Node | None) -> Value:
        g = self.graph
        scale = g.add_constant(f"{v.name}.scale", np.asarray(params[0], np.float32))
        zp = g.add_constant(f"{v.name}.zero_point", np.asarray(params[1]))
        meta = {"source": source}
        q = g.add_node("quantize", [v, scale, zp], {"axis": 0}, meta=dict(meta), before=before)
        dq = g.add_node("dequantize", [q.output, scale, zp], {"axis": 0}, meta=dict(meta), before=before).output
        dq.range = v.range  # what a later concat reads to choose its shared scale
        return dq

    def input(self, v: Value, params: Params, user: Node) -> Value:
        """``v`` as seen through quantize/dequantize with ``params`` (reusing pairs); a
        constant is quantized now, and only its dequantize is a node."""
        current = qparams_of(self.graph, v)
        if current is not None and _same(current, params):
            return v
        key = (id(v), float(params[0]), int(params[1]))
        if key not in self.cache:
            self.cache[key] = self._constant(v, params, user) if v.is_constant else \
                self._pair(v, params, user.source, before=user)
        return self.cache[key]

    def _constant(self, v: Value, params: Params, user: Node) -> Value:
        """The constant quantized by the quantize op's own kernel; a dequantize reads it."""
        g = self.graph
        scale, zero_point = np.asarray(params[0], np.float32), np.asarray(params[1])
        q = get_op("quantize").run([g.constant_array(v), scale, zero_point], {"axis": 0})[0]
        operands = [g.add_constant(f"{v.name}.quantized", q), g.add_constant(f"{v.name}.scale", scale),
                    g.add_constant(f"{v.name}.zero_point", zero_point)]
        return g.add_node("dequantize", operands, {"axis": 0}, meta={"source": user.source}, before=user).output

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

    def rows_quantized(self, v: Value, user: Node) -> Value:
        """``v`` through ``quantize_rows`` and ``dequantize_rows`` (one pair per value: the
        query, key and value projections read one)."""
        key = ("rows", id(v))
        if key not in self.cache:
            meta = {"source": user.source}
            codes, scales = self.graph.add_node("quantize_rows", [v], {}, meta=dict(meta), before=user).outputs
            dq = self.graph.add_node("dequantize_rows", [codes, scales], {}, meta=dict(meta), before=user).output
            dq.range = v.range
            self.cache[key] = dq
        return self.cache[key]

    def rounded_bf16(self, v: Value, user: Node) -> Value:
        """``v`` rounded to bfloat16 (one ``round_bf16`` node per value; a constant rounded now)."""
        key = id(v)
        if key not in self.bf16_cache:
            g = self.graph
            if v.is_constant:
                self.bf16_cache[key] = g.add_constant(f"{v.name}.bf16", round_to_bf16(g.constant_array(v)))
            else:
                rounded = g.add_node("round_bf16", [v], {}, meta={"source": user.source}, before=user).output
                rounded.range = v.range
                self.bf16_cache[key] = rounded
        return self.bf16_cache[key]

    def skip(self, node: Node, reason: str) -> None:
        self.report.append({"node": node.describe(), "handle": str(node.handle), "reason": reason})


NO_INT8_READER = "no reader takes its result as int8 (it would be rounded only to be dequantized)"
JOIN_SPREAD = 16.0  # a join stays float when an operand spans less than 1/16 of the shared range


def _crushed_operand(node: Node, lo: float, hi: float) -> str | None:
    """Why one shared grid would crush an operand of the join ``node``, or None.

    A concat is a copy only when its operands share one scale, the union of their ranges. An
    operand spanning 1/k of that union keeps 255/k levels: a detector joining box coordinates
    (0..320) and class scores (0..1) would round every score to 0 or 1.25. Below
    ``JOIN_SPREAD`` the join stays float (each operand keeps its own int8 producer's grid);
    the local SQNR of the whole join, dominated by the wide operand, would never show it."""
    union = max(hi, 0.0) - min(lo, 0.0)
    for v in node.inputs:
        span = max(v.range[1], 0.0) - min(v.range[0], 0.0)
        if 0 < span and span * JOIN_SPREAD < union:  # an all-zero operand is exact on any grid
            levels = 255.0 * span / union
            return (f"operand %{v.name} spans {v.range[0]:.3g}..{v.range[1]:.3g}, {union / span:.3g}x "
                    f"less than the join's {lo:.3g}..{hi:.3g}: one int8 grid would leave it {levels:.1f} levels, "
                    f"so the join stays float")
    return None


def _same(a: Params, b: Params) -> bool:
    return float(a[0]) == float(b[0]) and int(a[1]) == int(b[1]) and np.asarray(a[1]).dtype == np.asarray(b[1]).dtype


@register
@dataclass(frozen=True)
class InsertQDQ(QuantScheme, Pass):
    """Its options are the QuantScheme's (per_channel, activation_dtype, op_types, exclude,
    max_abs_range), which QuantConfig expands into."""

    name = "insert-qdq"
    summary = "insert quantize/dequantize pairs from calibrated ranges; quantize weights (needs range-analysis)"

    def run(self, graph: Graph, ctx: PassContext) -> bool:
        self.check_scheme()
        report = ctx.report.setdefault("not_quantized", [])
        ins = _Inserter(graph, self, report)
        changed = False
        for node in list(graph.nodes):
            if node.op in ("quantize", "dequantize") or len(node.outputs) != 1 or node.output.dtype not in FLOAT:
                continue  # multi-output ops (split, topk) have no quantized form: their readers get pairs
            if traits_of(node.op).quant not in QUANTIZABLE:
                continue
            if not self.quantizes(node.op):
                ins.skip(node, f"op type '{node.op}' is not in QuantConfig.op_types")
                continue
            if self.runs_bf16(node):  # kept out of int8 (so also excluded), in bf16
                changed |= self._round_bf16(graph, node, ins)
                continue
            if self.excluded(*layer_names(node)):
                ins.skip(node, "excluded by QuantConfig.exclude")
                continue
            if self.is_weight_only(node):
                changed |= self._quantize_weight_only(graph, node, ins)
                continue
            if self.runs_dynamic(node) and self._quantize_dynamic(graph, node, ins):
                changed = True
                continue
            changed |= self._quantize(graph, node, ins)
        if changed:
            graph.remove_unused_constants()
        return changed

    def _quantize_weight_only(self, graph: Graph, node: Node, ins: _Inserter) -> bool:
        """Weights quantized (int8/int4), activations and result float: a layer whose activations
        int8 cannot carry still ships its weights small (as ONNX Runtime's MatMulNBits does)."""
        traits = traits_of(node.op)
        slot = traits.weight_slot
        if traits.quant != "weighted" or traits.channel_axis is None or not node.inputs[slot].is_constant \
                or node.inputs[slot].dtype not in FLOAT:
            ins.skip(node, "kept float (weight-only applies to conv and linear weights)")
            return False
        q, scale = layer_weight(graph, node, self)
        groups = self.int4_groups(node)
        attach_quantized_weight(graph, node, slot, q, scale, groups)
        ins.skip(node, f"weight-only: weights {'int4' if groups else 'int8'}, activations float")
        return True

    def _quantize_dynamic(self, graph: Graph, node: Node, ins: _Inserter) -> bool:
        """A linear or matmul whose left operand is quantized per token at run time:
        ``quantize_rows`` (symmetric int8 codes, one scale per row) and ``dequantize_rows`` in
        front of it; a linear's weight per output channel as any int8 layer's, a matmul's right
        operand (run-time: attention's keys or values) per tensor from its range; the bias and
        the result float (no static range can hold a scale that changes with each input). False
        (left to the static path) where :func:`per_token_applies` says no, or a matmul's right
        operand has no range."""
        if not per_token_applies(node):
            return False
        traits, right = traits_of(node.op), node.inputs[1]
        if traits.config_type == "linear":
            node.inputs[0] = ins.rows_quantized(node.inputs[0], node)
            q, scale = quantize_layer_weight(node, graph.constant_array(right), None, None, self)
            attach_quantized_weight(graph, node, traits.weight_slot, q, scale, self.int4_groups(node))
            return True
        params = ins.params(right)
        if params is None:
            return False
        node.inputs[0] = ins.rows_quantized(node.inputs[0], node)
        node.inputs[1] = ins.input(right, params, node)
        return True

    def _round_bf16(self, graph: Graph, node: Node, ins: _Inserter) -> bool:
        """A layer int8 cannot carry, in bfloat16: its float operands (not the bias) rounded to
        bf16, weights now and activations by a ``round_bf16`` node, accumulated in float32 (the
        arithmetic of AMX-BF16's ``tdpbf16ps``, which the TVM target runs it on). Other ops than
        conv, linear and matmul gain nothing from it and stay float32."""
        traits = traits_of(node.op)
        if traits.quant != "weighted":
            ins.skip(node, "kept float32 (bf16 applies to conv, linear and matmul)")
            return False
        operands = (0, traits.weight_slot)
        for i in operands:
            v = node.inputs[i]
            if v.dtype != "f32":
                ins.skip(node, f"kept float32: operand %{v.name} is {v.dtype}")
                return False
        for i in operands:
            node.inputs[i] = ins.rounded_bf16(node.inputs[i], node)
        ins.skip(node, BF16_REASON)
        return True

    def _quantize(self, graph: Graph, node: Node, ins: _Inserter) -> bool:
        traits = traits_of(node.op)
        weight_slot = None
        if traits.quant == "weighted":
            # a weight without output channels (matmul's right operand) may be a run-time value: then
            # both operands are activations (attention's products)
            slot = traits.weight_slot
            weight_slot = slot if traits.channel_axis is not None or node.inputs[slot].is_constant else None
            acts = [i for i in (0, 1) if i != weight_slot]
        elif traits.quant == "same_as_input":
            acts = [0]
        else:  # own_params (add; reduce_mean: a mean gets its own, finer scale), shared_params (concat)
            acts = list(range(len(node.inputs)))
        for i in acts:
            if node.inputs[i].is_constant and traits.quant != "own_params":  # an add quantizes its constant
                ins.skip(node, f"operand {i} is a constant")
                return False
            if ins.params(node.inputs[i]) is None:
                ins.skip(node, ins.why_not(node.inputs[i]))
                return False
        if traits.quant in ("own_params", "shared_params") and not ins.read_as_int8(node.output):
            ins.skip(node, NO_INT8_READER)  # after the operands' checks: a mask says so first
            return False
        if traits.quant == "same_as_input":
            out_params = ins.params(node.inputs[0])
        elif traits.quant == "shared_params":
            ranges = [v.range for v in node.inputs + node.outputs]
            if any(r is None for r in ranges):
                ins.skip(node, "concat operand without a calibrated range")
                return False
            lo, hi = min(r[0] for r in ranges), max(r[1] for r in ranges)
            if max(-lo, hi) > self.max_abs_range:
                ins.skip(node, f"concat range {lo:.3g}..{hi:.3g} beyond max_abs_range")
                return False
            crushed = _crushed_operand(node, lo, hi)
            if crushed is not None:
                ins.skip(node, crushed)
                return False
            out_params = choose_qparams(lo, hi, self.activation_dtype)
        elif traits.quant == "weighted" and not ins.read_as_int8(node.output):
            out_params = None  # read only as float: keeps the accumulator's precision (see the module docstring)
        else:
            out_params = ins.params(node.output)
            if out_params is None:
                ins.skip(node, ins.why_not(node.output))
                return False
        x_scale = float(ins.params(node.inputs[acts[0]])[0])
        for i in acts:
            params = out_params if traits.quant == "shared_params" else ins.params(node.inputs[i])
            node.inputs[i] = ins.input(node.inputs[i], params, node)
        if weight_slot is not None and not is_quantized_weight(node.inputs[weight_slot]):  # gptq's are
            w = node.inputs[weight_slot]
            if not w.is_constant or w.dtype not in FLOAT:
                ins.skip(node, "weight is not a float constant")
                return True
            wq, scale = layer_weight(graph, node, self, x_scale)
            attach_quantized_weight(graph, node, weight_slot, wq, scale, self.int4_groups(node))
        if out_params is not None:
            ins.output(node, out_params)
        return True
