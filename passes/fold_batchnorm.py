"""fold-batchnorm: fold an inference batch norm into the conv or linear that feeds it.

Identity: bn(conv(x, w) + b) == conv(x, w * s) + (b - mean) * s + beta, with
s = gamma / sqrt(var + eps) per output channel (also for linear, channel = last axis of its
output and first of its weight). Refused when the conv result has another user (it would
then be needed unnormalized too) or when weights are not constants."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from qcompiler.ir import Graph, Node
from qcompiler.ir.ops import traits_of
from qcompiler.pipeline import Pass, PassContext, apply_rules, matches, register


@matches("batch_norm")
def fold_bn_into_producer(graph: Graph, bn: Node) -> bool:
    if bn.op != "batch_norm":
        return False
    producer = bn.inputs[0].producer
    traits = traits_of(producer.op) if producer is not None else None
    if traits is None or traits.quant != "weighted" or traits.channel_axis is None or traits.bias_slot is None:
        return False  # a conv or linear: weights with output channels and a bias to fold into
    if traits.channel_axis % bn.inputs[0].type.rank != 1:
        return False  # batch norm's channel axis is 1; linear's output channel is the last axis
    if producer.attrs.get("activation", "none") != "none":
        return False  # bn(act(conv(x))) is not a conv with other weights
    if not all(v.is_constant for v in producer.inputs[1:] + bn.inputs[1:]):
        return False
    if len(graph.users().get(producer.output, [])) != 1 or producer.output in graph.outputs:
        return False
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


@register
@dataclass(frozen=True)
class FoldBatchNorm(Pass):
    name = "fold-batchnorm"
    summary = "fold inference batch norm into the preceding conv or linear"

    def run(self, graph: Graph, ctx: PassContext) -> bool:
        hits = apply_rules(graph, [fold_bn_into_producer])
        if hits["fold_bn_into_producer"]:
            graph.remove_unused_constants()
        return bool(hits["fold_bn_into_producer"])
