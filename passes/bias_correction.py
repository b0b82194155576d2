"""bias-correction: remove the systematic shift that quantizing a layer's input and weights
adds to its output (empirical bias correction, Nagel et al. 2019; OpenVINO NNCF's
FastBiasCorrection).

Identity: for y = op(x, W) + b, quantization gives y' = op(q(x), q(W)) + b, and
E[y - y'] = E[op(x, W) - op(q(x), q(W))] =: d per output channel, so b + d makes
E[y'] == E[y]. d is measured on the calibration batches with each layer quantized alone, as
insert-qdq will quantize it (same ranges, same weight scheme). Runs after range-analysis.
A weight gptq rounded has moved its bias by its own part, E[op(x, W - q(W))]; of the split
d = E[op(x, W - q(W))] + E[op(x - q(x), q(W))] the second part is left, measured with q(W)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from qcompiler.calibration import calibration_set
from qcompiler.calibration_record import set_corrected_bias
from qcompiler.interpreter import values_of
from qcompiler.ir import Graph, Value
from qcompiler.ir.ops import get_op, traits_of
from qcompiler.ir.ops.quant import ROW_ZERO_POINT, choose_qparams
from qcompiler.pipeline import Pass, PassContext, register
from qcompiler.quant_config import QuantScheme

from .insert_qdq import is_quantized_weight, layer_weight, per_token_applies


def _fake_quant(x: np.ndarray, lo: float, hi: float, dtype: str) -> np.ndarray:
    scale, zp = choose_qparams(lo, hi, dtype)
    q = get_op("quantize").run([x, np.asarray(scale), np.asarray(zp)], {"axis": 0})[0]
    return get_op("dequantize").run([q, np.asarray(scale), np.asarray(zp)], {"axis": 0})[0]


def fake_quant_rows(x: np.ndarray) -> np.ndarray:
    """x through quantize_rows and dequantize_rows: what per-token int8 makes of it."""
    codes, scales = get_op("quantize_rows").run([x.astype(np.float32)], {})
    return get_op("dequantize_rows").run([codes, scales], {"zero_point": ROW_ZERO_POINT})[0]


def _dequantized(graph: Graph, weight: Value) -> np.ndarray:
    """The float values of a weight already quantized (``dequantize`` of constants)."""
    dq = weight.producer
    return get_op("dequantize").run([graph.constant_array(i) for i in dq.inputs], dq.attrs)[0]


def _per_token(scheme: QuantScheme, node) -> bool:
    """``node`` gets per-token activation scales from insert-qdq (a layer it names in ``dynamic``)."""
    return scheme.runs_dynamic(node) and per_token_applies(node)


@register
@dataclass(frozen=True)
class BiasCorrection(QuantScheme, Pass):
    """Its options are the QuantScheme's, the same as insert-qdq's: it corrects exactly the
    layers insert-qdq will quantize, as it will quantize them (a layer kept float keeps its bias)."""

    name = "bias-correction"
    summary = "shift conv/linear biases by the mean error quantization adds (needs range-analysis, calibration)"

    def run(self, graph: Graph, ctx: PassContext) -> bool:
        self.check_scheme()
        layers = [n for n in graph.nodes if traits_of(n.op).bias_slot is not None and self.quantizes(n.op)
                  and not self.excluded(n.source, n.output.name)
                  and (n.inputs[1].is_constant or is_quantized_weight(n.inputs[1]))
                  and not n.inputs[0].is_constant and n.inputs[0].range is not None
                  and max(abs(r) for r in n.inputs[0].range) <= self.max_abs_range]
        if not layers:
            return False
        exact_weights, fq_weights = {}, {}
        for n in layers:
            if is_quantized_weight(n.inputs[1]):  # rounded by gptq, which moved the bias for its part
                exact_weights[id(n)] = fq_weights[id(n)] = _dequantized(graph, n.inputs[1])
                continue
            exact_weights[id(n)] = graph.constant_array(n.inputs[1])
            wq, scale = layer_weight(graph, n, self)
            fq_weights[id(n)] = (wq.astype(np.float32) * (scale.reshape((-1,) + (1,) * (wq.ndim - 1))
                                                          if scale.ndim else scale)).astype(np.float32)
        sums = {id(n): np.zeros(n.inputs[1].shape[0]) for n in layers}
        counts = {id(n): 0 for n in layers}
        for batch in calibration_set(graph, ctx.calibration):
            seen = values_of(graph, batch, [n.inputs[0] for n in layers])
            for n in layers:
                x = seen[id(n.inputs[0])]
                attrs = {**n.attrs, "activation": "none", "activation_args": ()}
                op = get_op(n.op)
                exact = op.run([x, exact_weights[id(n)]], attrs)[0].astype(np.float64)
                xq = x if self.is_weight_only(n) else fake_quant_rows(x) if _per_token(self, n) \
                    else _fake_quant(x, *n.inputs[0].range, self.activation_dtype)
                approx = op.run([xq, fq_weights[id(n)]], attrs)[0].astype(np.float64)
                axis = traits_of(n.op).channel_axis % exact.ndim
                diff = np.moveaxis(exact - approx, axis, 0).reshape(exact.shape[axis], -1)
                sums[id(n)] += diff.sum(axis=1)
                counts[id(n)] += diff.shape[1]
        for n in layers:
            delta = (sums[id(n)] / max(counts[id(n)], 1)).astype(np.float32)
            slot = traits_of(n.op).bias_slot
            set_corrected_bias(graph, n, graph.constant_array(n.inputs[slot]) + delta if len(n.inputs) > slot else delta)
        graph.remove_unused_constants()
        ctx.report["bias_correction"] = {"layers": len(layers)}
        return True
