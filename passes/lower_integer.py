"""lower-integer: turn QDQ sandwiches into integer ops.

- ``dequantize -> conv/linear/matmul -> quantize`` becomes an integer op (u8/i8 x i8 -> i32
  accumulation, bias in int32 at scale s_x*s_w) and ``requantize`` with a fixed-point
  multiplier m*2^-shift = s_x*s_w/s_y, rounding half to even and saturating. A fused relu,
  relu6 or clip becomes the requantize clamp; other fused activations run in float between
  a dequantized accumulator and the quantize. Without the quantize (a result read as float)
  the integer op's accumulator is dequantized at s_x*s_w.
- ``dequantize_rows -> linear/matmul`` (per-token scales) becomes ``linear_int``/``matmul_int``
  over the codes and ``dequantize_rows`` of the accumulator by row and column scale, plus the
  float bias.
- ``dequantize -> add -> quantize`` becomes ``add_int`` (operands rescaled in fixed point), or
  with ``requantize=float32`` (the default) ``add_int_f32`` (in float32, one rounding).
- relu, pooling, reshape/transpose/slice/concat between pairs with identical parameters run
  on the integers themselves (relu is max(x, zero_point)).
- ``quantize(dequantize(x))`` is x for identical parameters, else a ``requantize``.
What stays float is reported in ``report["kept_float"]`` with the reason."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from qcompiler.errors import QCompilerError
from qcompiler.ir import Graph, Node, Value, dtype_name
from qcompiler.ir.ops import ops_where, traits_of
from qcompiler.ir.ops.quant import ADD_INT_BITS, add_scale, quantize_multiplier
from qcompiler.pipeline import Pass, PassContext, apply_rules, matches, register

from .dead_code import EliminateDeadCode
from .insert_qdq import qparams_of

EIGHT_BIT = ("u8", "i8")  # the integer kernels' operands; 16-bit QDQ models (A16W8) stay float-simulated

INTEGER_CLAMPS = ("none", "relu", "clip")
COMPUTING = ("weighted", "own_params", "shared_params")  # roles whose result left float is a layer kept float


def _sole_quantize_user(graph: Graph, v: Value) -> Node | None:
    """The one per-tensor `quantize` reading ``v``, if that is its only use."""
    users = graph.users_of(v)
    if len(users) != 1 or v in graph.outputs:
        return None
    q = users[0]
    if q.op != "quantize" or len(q.inputs) < 3 or not (q.inputs[1].is_constant and q.inputs[2].is_constant):
        return None
    return q if q.inputs[1].type.rank == 0 and q.output.dtype in EIGHT_BIT else None


def _int8_params(graph: Graph, v: Value) -> tuple[np.float32, np.integer] | None:
    """``qparams_of``, for a value dequantized from 8 bits only."""
    params = qparams_of(graph, v)
    return params if params is not None and v.producer.inputs[0].dtype in EIGHT_BIT else None


NOT_LOWERED = "not_lowered"  # node.meta key: why a rule left a quantized node in float (reported)
FLOAT_RESULT = "float_result"  # node.meta key: the dequantized accumulator of a layer whose result is read as float


def _multiplier(node: Node, real: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """``quantize_multiplier(real)``, or None with the reason left on ``node`` (reported)."""
    try:
        return quantize_multiplier(real)
    except ValueError as e:
        node.meta[NOT_LOWERED] = str(e)
        return None


def _q_params(graph: Graph, q: Node) -> tuple[np.float32, np.integer]:
    return graph.constant_array(q.inputs[1])[()], graph.constant_array(q.inputs[2])[()]


def _const(graph: Graph, name: str, value) -> Value:
    return graph.add_constant(name, np.asarray(value))


def _weight(graph: Graph, v: Value) -> tuple[Value, Value, np.ndarray] | None:
    """(int8 weight, its zero point, per-channel or scalar float scale) behind a dequantize."""
    dq = v.producer
    if dq is None or dq.op != "dequantize" or len(dq.inputs) < 3:
        return None
    w, s, z = dq.inputs
    if not (w.is_constant and s.is_constant and z.is_constant) or w.dtype != "i8":
        return None
    if s.type.rank == 1 and dq.attrs["axis"] % w.type.rank != 0:
        return None
    return w, z, graph.constant_array(s).astype(np.float64)


def _int_bias(graph: Graph, node: Node, acc_scale: np.ndarray) -> Value | None | bool:
    """The bias as int32 at the accumulator's scale; False when it cannot be expressed."""
    if len(node.inputs) < 3:
        return None
    b = node.inputs[2]
    if b.producer is not None and b.producer.op == "dequantize":  # ONNX QDQ: dq(int32 bias)
        b_q, b_s, _ = b.producer.inputs
        if not (b_q.is_constant and b_s.is_constant):
            return False
        real = graph.constant_array(b_q).astype(np.float64) * graph.constant_array(b_s).astype(np.float64)
    elif b.is_constant:
        real = graph.constant_array(b).astype(np.float64)
    else:
        return False
    q = np.rint(real / acc_scale)
    if np.any(np.abs(q) >= 2 ** 31):
        return False
    return _const(graph, f"{b.name}.int32", q.astype(np.int32))


@matches(*ops_where(quant="weighted"))
def lower_compute(graph: Graph, node: Node) -> bool:
    """q(op(dq(x), dq(w)) + b) == requantize(op_int(x, w) + b_int), b_int = round(b / (s_x s_w)),
    multiplier s_x s_w / s_y; exact up to the final rounding."""
    traits = traits_of(node.op)
    if traits.quant != "weighted":
        return False
    q = _sole_quantize_user(graph, node.output)
    x_params = qparams_of(graph, node.inputs[0])
    if x_params is not None and node.inputs[0].producer.inputs[0].dtype not in EIGHT_BIT:
        node.meta[NOT_LOWERED] = (f"{node.inputs[0].producer.inputs[0].dtype} activations: the integer kernels take "
                                  f"8 bits, so it runs as dequantize -> float op -> quantize (as ONNX Runtime does)")
        x_params = None
    # a result nothing quantizes (a model output, one read only by float ops): the accumulator, dequantized
    to_float = q is None and not any(user.op == "quantize" for user in graph.users_of(node.output))
    if (q is None and not to_float) or x_params is None:
        return False
    if traits.channel_axis is None:  # matmul: the right operand per tensor, a weight or a run-time value
        b_params = _int8_params(graph, node.inputs[1])
        if b_params is None:
            return False
        w, w_zp, w_scale = node.inputs[1].producer.inputs[0], node.inputs[1].producer.inputs[2], \
            np.float64(b_params[0])
        bias = None
    else:
        weight = _weight(graph, node.inputs[1])
        if weight is None:
            return False
        w, w_zp, w_scale = weight
        acc_scale = np.float64(x_params[0]) * w_scale
        bias = _int_bias(graph, node, acc_scale)
        if bias is False:
            node.meta[NOT_LOWERED] = "its bias does not fit int32 at the accumulator's scale (s_x * s_w)"
            return False
    acc_scale = np.float64(x_params[0]) * w_scale
    act = node.attrs["activation"]
    requantized = act in INTEGER_CLAMPS and not to_float  # else: the accumulator dequantized, activated in float
    if requantized:
        y_scale, y_zp = _q_params(graph, q)
        fixed_point = _multiplier(node, acc_scale / np.float64(y_scale))
        if fixed_point is None:
            return False
        multiplier, shift = fixed_point
    x_q, x_zp = node.inputs[0].producer.inputs[0], node.inputs[0].producer.inputs[2]
    op = traits.integer_form
    int_attrs = {k: v for k, v in node.attrs.items() if k not in ("activation", "activation_args")}
    # the result that stands for the original node's value (requantize, or the quantize fed by
    # the float activation) carries its debug handle; the accumulator gets a fresh one
    acc = graph.add_node(op, [x_q, x_zp, w, w_zp] + ([bias] if bias is not None else []), int_attrs,
                         meta={"source": node.source}, before=node).output
    axis = traits.channel_axis if traits.channel_axis is not None else -1
    if requantized:
        info = np.iinfo(np.asarray(y_zp).dtype)
        lo, hi = int(info.min), int(info.max)
        if act == "relu":
            lo = int(y_zp)
        elif act == "clip":
            a, b = node.attrs["activation_args"]
            lo = max(lo, int(y_zp) + int(np.rint(a / y_scale))) if np.isfinite(a) else lo
            hi = min(hi, int(y_zp) + int(np.rint(b / y_scale))) if np.isfinite(b) else hi
        result = graph.add_node("requantize", [acc, _const(graph, f"{q.output.name}.multiplier", multiplier),
                                               _const(graph, f"{q.output.name}.shift", shift), q.inputs[2]],
                                {"axis": axis, "min": lo, "max": hi, "scale": float(y_scale)},
                                meta=dict(node.meta), before=node).output
        graph.replace_all_uses(q.output, result)
        graph.remove_node(q)
    else:  # the activation has no integer form: dequantize the accumulator, activate in float
        s = _const(graph, f"{acc.name}.scale", np.asarray(acc_scale, np.float32))
        real = graph.add_node("dequantize", [acc, s, _const(graph, f"{acc.name}.zero_point",
                                                           np.zeros(s.shape, np.int32))],
                              {"axis": axis % acc.type.rank}, meta={"source": node.source}, before=node).output
        fused = {k: v for k, v in node.attrs.items() if k in ("activation", "activation_args")}
        activated = real if act == "none" else _apply_activation(graph, real, fused, node)
        if to_float:
            activated.producer.meta = dict(node.meta)  # it stands for the original result
            real.producer.meta[FLOAT_RESULT] = True  # an int8 layer with a float result: not kept float
            graph.replace_all_uses(node.output, activated)
        else:
            q.inputs[0] = activated
            q.meta = dict(node.meta)
    graph.replace_all_uses(node.output, acc)  # nothing else reads it; keeps the graph consistent
    graph.remove_node(node)
    return True


def _apply_activation(graph: Graph, x: Value, fused: dict, before: Node) -> Value:
    act = fused["activation"]
    attrs = {"approximate": "tanh"} if act == "gelu_tanh" else {}
    if act == "clip":
        attrs = dict(zip(("min", "max"), fused["activation_args"]))
    op = "gelu" if act.startswith("gelu") else act
    return graph.add_node(op, [x], attrs, meta={"source": before.source}, before=before).output


@matches("linear", "matmul")
def lower_dynamic_product(graph: Graph, node: Node) -> bool:
    """op(dequantize_rows(q, s), dq(w)) + b == dequantize_rows(op_int(q, 128, w), s, s_w, b): with
    codes q = x/s + 128 per row and w = (w_q - z_w) s_w per column (a linear's weight per channel,
    a matmul's run-time right operand per tensor), sum_k (q - 128) s (w_q - z_w) s_w
    = s s_w sum_k (q - 128)(w_q - z_w), the integer product scaled by row and column in float32."""
    if node.op not in ("linear", "matmul"):
        return False
    rows = node.inputs[0].producer
    if rows is None or rows.op != "dequantize_rows" or len(rows.inputs) != 2:
        return False
    if node.op == "linear":
        weight = _weight(graph, node.inputs[1])
        if weight is None:
            return False
        w, w_zp, w_scale = weight
    else:
        right = _int8_params(graph, node.inputs[1])
        if right is None:
            return False
        dq = node.inputs[1].producer
        w, w_zp, w_scale = dq.inputs[0], dq.inputs[2], np.float64(right[0])
    bias = None
    if len(node.inputs) > 2:
        b = node.inputs[2]
        if not b.is_constant:
            node.meta[NOT_LOWERED] = "its bias is not a constant (a dynamic layer adds it in float after the product)"
            return False
        bias = graph.constant_array(b).astype(np.float32).reshape(-1)
    codes, row_scale = rows.inputs
    channels = node.output.shape[-1]
    acc = graph.add_node(traits_of(node.op).integer_form,
                         [codes, _const(graph, f"{codes.name}.zero_point", np.uint8(rows.attrs["zero_point"])), w, w_zp],
                         {}, meta={"source": node.source}, before=node).output
    col = _const(graph, f"{acc.name}.column_scale", np.broadcast_to(w_scale, (channels,)).astype(np.float32))
    extra = [col] + ([_const(graph, f"{acc.name}.bias", bias)] if bias is not None else [])
    act = node.attrs["activation"]
    real = graph.add_node("dequantize_rows", [acc, row_scale, *extra], {"zero_point": 0},
                          meta=dict(node.meta) if act == "none" else {"source": node.source}, before=node).output
    if act != "none":
        real = _apply_activation(graph, real, {k: v for k, v in node.attrs.items()
                                               if k in ("activation", "activation_args")}, node)
        real.producer.meta = dict(node.meta)
    graph.replace_all_uses(node.output, real)
    graph.remove_node(node)
    return True


@matches("add")
def lower_add(graph: Graph, node: Node) -> bool:
    """q(dq(a) + dq(b)) == add_int(a, b): s_a (a - z_a) + s_b (b - z_b) rescaled to s_y in
    fixed point with 2^-20 headroom, rounded half to even, plus z_y."""
    if node.op != "add":
        return False
    q = _sole_quantize_user(graph, node.output)
    pa, pb = _int8_params(graph, node.inputs[0]), _int8_params(graph, node.inputs[1])
    if q is None or pa is None or pb is None:
        return False
    y_scale, _ = _q_params(graph, q)
    multipliers = [_multiplier(node, np.float64(p[0]) / np.float64(y_scale)) for p in (pa, pb)]
    if None in multipliers:
        return False
    (ma, sa), (mb, sb) = multipliers
    if min(int(sa), int(sb)) <= ADD_INT_BITS - 31 + 1:
        return False  # an operand scale far above the output's would overflow int64 headroom
    a_q, b_q = node.inputs[0].producer.inputs[0], node.inputs[1].producer.inputs[0]
    attrs = {"a_zero_point": int(pa[1]), "a_multiplier": int(ma), "a_shift": int(sa), "b_zero_point": int(pb[1]),
             "b_multiplier": int(mb), "b_shift": int(sb), "scale": float(y_scale)}
    result = graph.add_node("add_int", [a_q, b_q, q.inputs[2]], attrs, meta=dict(node.meta), before=node).output
    graph.replace_all_uses(q.output, result)
    graph.remove_node(q)
    graph.remove_node(node)
    return True


@matches(*ops_where(on_grid=True))
def lower_same_params(graph: Graph, node: Node) -> bool:
    """q(f(dq(x))) == f(x) when the input and output parameters are identical and f only
    moves, selects or averages values on the grid (relu: max(x, z), since dq(z) == 0)."""
    if not traits_of(node.op).on_grid or not node.inputs:
        return False
    q = _sole_quantize_user(graph, node.output)
    if q is None:
        return False
    out = _q_params(graph, q)
    operands = node.inputs if traits_of(node.op).quant == "shared_params" else node.inputs[:1]
    params = [_int8_params(graph, v) for v in operands]
    if any(p is None or float(p[0]) != float(out[0]) or int(p[1]) != int(out[1]) for p in params):
        return False
    ints = [v.producer.inputs[0] for v in operands]
    if any(v.dtype != dtype_name(np.asarray(out[1]).dtype) for v in ints):
        return False
    if node.op == "relu":
        result = graph.add_node("maximum", [ints[0], q.inputs[2]], meta=dict(node.meta), before=node).output
    else:
        attrs = {**node.attrs, **dict(traits_of(node.op).integer_attrs)}
        result = graph.add_node(node.op, ints + node.inputs[len(operands):], attrs, meta=dict(node.meta),
                                before=node).output
    graph.replace_all_uses(q.output, result)
    graph.remove_node(q)
    graph.remove_node(node)
    return True


@matches("reduce_mean")
def lower_mean(graph: Graph, node: Node) -> bool:
    """q(mean(dq(x))) == requantize(sum(x) - n z_x) with multiplier s_x / (n s_y): the sum is
    exact in int32 and the result is rounded once."""
    if node.op != "reduce_mean":
        return False
    q = _sole_quantize_user(graph, node.output)
    p_in = _int8_params(graph, node.inputs[0])
    if q is None or p_in is None:
        return False
    x = node.inputs[0].producer.inputs[0]
    axes = node.attrs["axes"] or tuple(range(x.type.rank))
    count = int(np.prod([x.shape[a] for a in axes]))
    if count * 255 >= 2 ** 31:
        return False
    y_scale, _ = _q_params(graph, q)
    multiplier = _multiplier(node, np.float64(p_in[0]) / (count * np.float64(y_scale)))
    if multiplier is None:
        return False
    m, s = multiplier
    wide = graph.add_node("cast", [x], {"to": "i32"}, meta={"source": node.source}, before=node).output
    total = graph.add_node("reduce_sum", [wide], node.attrs, meta={"source": node.source}, before=node).output
    result = graph.add_node("requantize", [total, _const(graph, f"{q.output.name}.multiplier", m),
                                           _const(graph, f"{q.output.name}.shift", s), q.inputs[2]],
                            {"input_zero_point": count * int(p_in[1]), "scale": float(y_scale), "axis": 0},
                            meta=dict(node.meta), before=node).output
    graph.replace_all_uses(q.output, result)
    graph.remove_node(q)
    graph.remove_node(node)
    return True


@matches("quantize")
def fold_quantize_dequantize(graph: Graph, node: Node) -> bool:
    """q(dq(x, s1, z1), s2, z2) is x when (s1, z1) == (s2, z2), else requantize(x) with
    multiplier s1/s2 from input zero point z1."""
    if node.op != "quantize" or len(node.inputs) < 3 or node.inputs[1].type.rank:
        return False
    p_in = _int8_params(graph, node.inputs[0])
    if p_in is None or not (node.inputs[1].is_constant and node.inputs[2].is_constant):
        return False
    p_out = _q_params(graph, node)
    x = node.inputs[0].producer.inputs[0]
    if float(p_in[0]) == float(p_out[0]) and int(p_in[1]) == int(p_out[1]) and x.dtype == node.output.dtype:
        if node.output in graph.outputs:
            return False
        graph.replace_all_uses(node.output, x)
        graph.remove_node(node)
        return True
    multiplier = _multiplier(node, np.float64(p_in[0]) / np.float64(p_out[0]))
    if multiplier is None:
        return False
    m, s = multiplier
    result = graph.add_node("requantize", [x, _const(graph, f"{x.name}.multiplier", m),
                                           _const(graph, f"{x.name}.shift", s), node.inputs[2]],
                            {"input_zero_point": int(p_in[1]), "scale": float(p_out[0]), "axis": 0},
                            meta=dict(node.meta), before=node).output
    graph.replace_all_uses(node.output, result)
    graph.remove_node(node)
    return True


RULES = [lower_compute, lower_dynamic_product, lower_add, lower_mean, lower_same_params, fold_quantize_dequantize]
REQUANTIZE_FORMS = ("fixed", "float32")


@matches("requantize")
def requantize_in_float32(graph: Graph, node: Node) -> bool:
    """requantize(x, m, s, z) == requantize_f32(x, float32(m * 2^-s), z), up to the float32
    rounding of the scale and of the product (the fixed-point form rounds the product once,
    exactly; the float32 form rounds it to 24 bits first). Both are exact definitions every
    kernel reproduces bit for bit; the float32 one costs a conversion and a multiply per output
    where the fixed-point one needs 64-bit products."""
    if node.op != "requantize" or not (node.inputs[1].is_constant and node.inputs[2].is_constant):
        return False
    m = graph.constant_array(node.inputs[1]).astype(np.float64)
    shift = graph.constant_array(node.inputs[2]).astype(np.float64)
    scale = _const(graph, f"{node.output.name}.scale", np.asarray(m * 2.0 ** -shift, np.float32))
    result = graph.add_node("requantize_f32", [node.inputs[0], scale, node.inputs[3]], dict(node.attrs),
                            meta=dict(node.meta), before=node).output
    graph.replace_all_uses(node.output, result)
    graph.remove_node(node)
    return True


@matches("add_int")
def add_in_float32(graph: Graph, node: Node) -> bool:
    """add_int(a, b) == add_int_f32(a, b) with scales m * 2^-shift rounded to 16 significant bits,
    up to that rounding (relative 2^-17 of each scale: under 0.002 of a step for 8-bit operands)
    and the rounding of the float32 sum. Exact definitions both; the float32 one is two multiplies
    and an add per element where the fixed-point one needs three 64-bit rounding shifts."""
    if node.op != "add_int":
        return False
    attrs = {k: v for k, v in node.attrs.items() if not k.endswith(("_multiplier", "_shift"))}
    for p in ("a", "b"):
        attrs[f"{p}_scale"] = add_scale(node.attrs[f"{p}_multiplier"] * 2.0 ** -node.attrs[f"{p}_shift"])
    result = graph.add_node("add_int_f32", list(node.inputs), attrs, meta=dict(node.meta), before=node).output
    graph.replace_all_uses(node.output, result)
    graph.remove_node(node)
    return True


@register
@dataclass(frozen=True)
class LowerInteger(Pass):
    """``requantize``: "float32" (:func:`requantize_in_float32`: the cheaper epilogue in the
    kernels) or "fixed" (int32 multiplier and shift, int64 products, as gemmlowp). The rules
    make the fixed-point form first; the float32 one is a rewrite of it."""

    name = "lower-integer"
    summary = "turn dequantize -> op -> quantize sandwiches into integer ops with a requantize (float32 or fixed-point)"
    requantize: str = "float32"

    def run(self, graph: Graph, ctx: PassContext) -> bool:
        if self.requantize not in REQUANTIZE_FORMS:
            raise QCompilerError(f"lower-integer: requantize '{self.requantize}' is not one of "
                                 f"{', '.join(REQUANTIZE_FORMS)}")
        float32 = [requantize_in_float32, add_in_float32] if self.requantize == "float32" else []
        hits = apply_rules(graph, RULES + float32)
        EliminateDeadCode().run(graph, ctx)
        ctx.report.setdefault("rule_hits", {}).update({f"lower-integer.{k}": v for k, v in hits.items()})
        reasons = {r["handle"]: r["reason"] for r in ctx.report.get("not_quantized", [])}
        # a model quantized elsewhere (a QDQ model, no insert-qdq here): only its ops that read
        # quantized values were meant to be integer; its other float ops are not "kept" float
        given_quantized = "not_quantized" not in ctx.report
        kept = []
        for node in graph.nodes:
            if given_quantized and not any(v.producer is not None and v.producer.op == "dequantize"
                                           and not v.producer.inputs[0].is_constant for v in node.inputs):
                continue  # (a float op reading a dequantized weight is weight-only by the model's design)
            if traits_of(node.op).quant in COMPUTING and node.outputs[0].dtype in ("f32", "f16", "f64"):
                reason = reasons.get(str(node.handle)) or node.meta.get(NOT_LOWERED) or \
                    "quantized operands did not form a lowerable dequantize -> op -> quantize sandwich"
                bf16 = any(v.producer is not None and v.producer.op == "round_bf16" for v in node.inputs)
                kept.append({"node": node.describe(), "handle": str(node.handle), "reason": reason,
                             "precision": "bf16" if bf16 else "fp32"})
            elif node.op == "dequantize" and node.inputs[0].dtype == "i32" and not node.meta.get(FLOAT_RESULT):
                kept.append({"node": node.describe(), "handle": str(node.handle),
                             "reason": "fused activation has no integer form; applied in float after the "
                                       "integer accumulation"})
        ctx.report["kept_float"] = kept
        return any(hits.values())
