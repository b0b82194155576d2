"""fold-batchnorm: fold an inference batch norm into the conv or linear that feeds it, and a
per-channel scale or shift by constants (Caffe's Scale layer, exported as Mul and Add after a
BatchNormalization) into the batch norm, conv or linear before it.

Identities: bn(conv(x, w) + b) == conv(x, w * s) + (b - mean) * s + beta, with
s = gamma / sqrt(var + eps) per output channel (also for linear, channel = last axis of its
output and first of its weight); (conv(x, w) + b) * k == conv(x, w * k) + b * k and
conv(x, w) + b + c == conv(x, w) + (b + c) for k, c constant per output channel;
bn(x; gamma, beta) * k == bn(x; gamma * k, beta * k) and bn(x; beta) + c == bn(x; beta + c).
Refused when the producer's result has another user (it would then be needed unfolded too) or
when weights are not constants."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from qcompiler.ir import Graph, Node, Value
from qcompiler.ir.ops import traits_of
from qcompiler.pipeline import Pass, PassContext, apply_rules, matches, register


@matches("batch_norm")
def fold_bn_into_producer(graph: Graph, bn: Node) -> bool:
    if bn.op != "batch_norm":
        return False
    found = _foldable_producer(graph, bn.inputs[0])
    if found is None or found[0].op == "batch_norm" or found[1] % bn.inputs[0].type.rank != 1:
        return False  # a conv or linear whose output channels are batch norm's axis 1 (not linear's last)
    if not all(v.is_constant for v in bn.inputs[1:]):
        return False
    producer = found[0]
    gamma, beta, mean, var = (graph.constant_array(v).astype(np.float64) for v in bn.inputs[1:])
    scale = gamma / np.sqrt(var + bn.attrs["epsilon"])
    w = graph.constant_array(producer.inputs[1])
    out_channels = w.shape[0]
    bias = graph.constant_array(producer.inputs[2]).astype(np.float64) if len(producer.inputs) > 2 else \
        np.zeros(out_channels)
    new_w = (w.astype(np.float64) * scale.reshape((-1,) + (1,) * (w.ndim - 1))).astype(w.dtype)
    new_b = ((bias - mean) * scale + beta).astype(w.dtype)
    producer.inputs = [producer.inputs[0], graph.add_constant(f"{producer.inputs[1].name}.bn_folded", new_w),
                       graph.add_constant(f"{bn.inputs[1].name}.bias_folded", new_b)]
    graph.replace_all_uses(bn.output, producer.output)
    graph.remove_node(bn)
    return True


def _per_channel(graph: Graph, v: Value, out: Value, axis: int) -> np.ndarray | None:
    """``v`` as one value per channel of ``out`` along ``axis`` (a constant that broadcasts over
    ``out`` along that axis only, or a scalar), else None."""
    if not v.is_constant or v.type.rank > out.type.rank:
        return None
    shape = (1,) * (out.type.rank - v.type.rank) + tuple(v.shape)
    channels = out.shape[axis]
    if any(d != 1 for i, d in enumerate(shape) if i != axis % out.type.rank) or shape[axis % out.type.rank] not in (1, channels):
        return None
    return np.broadcast_to(graph.constant_array(v).astype(np.float64).reshape(-1), (channels,))


def _foldable_producer(graph: Graph, x: Value) -> tuple[Node, int] | None:
    """The conv/linear (no fused activation, constant weights) or batch norm (constant
    parameters) that alone produces ``x``, with the axis of its channels."""
    producer = x.producer
    if producer is None or len(graph.users_of(x)) != 1 or x in graph.outputs:
        return None
    if producer.op == "batch_norm" and all(v.is_constant for v in producer.inputs[1:]):
        return producer, 1
    traits = traits_of(producer.op)
    if (traits.quant == "weighted" and traits.channel_axis is not None and traits.bias_slot is not None
            and producer.attrs.get("activation", "none") == "none"
            and all(v.is_constant for v in producer.inputs[1:])):
        return producer, traits.channel_axis
    return None


@matches("mul", "add")
def fold_channel_affine_into_producer(graph: Graph, node: Node) -> bool:
    """A per-channel ``* k`` or ``+ c`` by a constant folded into the batch norm, conv or linear
    before it (the identities in the module docstring); the mul/add node is removed."""
    if node.op not in ("mul", "add"):
        return False
    for x, k in ((node.inputs[0], node.inputs[1]), (node.inputs[1], node.inputs[0])):
        found = _foldable_producer(graph, x) if x.type == node.output.type else None
        values = _per_channel(graph, k, node.output, found[1]) if found else None
        if values is not None:
            break
    else:
        return False
    producer, _ = found
    if producer.op == "batch_norm":
        gamma, beta = (graph.constant_array(v).astype(np.float64) for v in producer.inputs[1:3])
        gamma, beta = (gamma * values, beta * values) if node.op == "mul" else (gamma, beta + values)
        dtype = graph.constant_array(producer.inputs[1]).dtype
        producer.inputs = [producer.inputs[0], graph.add_constant(f"{producer.inputs[1].name}.scaled", gamma.astype(dtype)),
                           graph.add_constant(f"{producer.inputs[2].name}.shifted", beta.astype(dtype)),
                           *producer.inputs[3:]]
    else:
        w = graph.constant_array(producer.inputs[1])
        bias = graph.constant_array(producer.inputs[2]).astype(np.float64) if len(producer.inputs) > 2 else \
            np.zeros(w.shape[0])
        if node.op == "mul":
            w = (w.astype(np.float64) * values.reshape((-1,) + (1,) * (w.ndim - 1))).astype(w.dtype)
            bias = bias * values
        else:
            bias = bias + values
        producer.inputs = [producer.inputs[0], graph.add_constant(f"{producer.inputs[1].name}.{node.op}_folded", w),
                           graph.add_constant(f"{producer.inputs[1].name}.bias_{node.op}_folded", bias.astype(w.dtype))]
    graph.replace_all_uses(node.output, producer.output)
    graph.remove_node(node)
    return True


@register
@dataclass(frozen=True)
class FoldBatchNorm(Pass):
    name = "fold-batchnorm"
    summary = "fold inference batch norm, and per-channel constant scales and shifts, into the conv or linear before"

    def run(self, graph: Graph, ctx: PassContext) -> bool:
        hits = apply_rules(graph, [fold_channel_affine_into_producer, fold_bn_into_producer])
        if any(hits.values()):
            graph.remove_unused_constants()
        return any(hits.values())
