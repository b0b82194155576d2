"""smooth-quant: migrate activation outliers into the weights before quantization (SmoothQuant,
Xiao et al. 2023). Transformer activations carry a few channels far larger than the rest, so a
per-tensor activation scale wastes most of the int8 grid on them; weights, quantized per output
channel, absorb a per-input-channel factor at no cost.

Identity: linear(x, W) == linear(x * (1/s), W * s) with s broadcast over W's input axis, for
s_j = max|x_j|^alpha / max|W_:,j|^(1-alpha) (per input channel j, from calibration data; one s
for all linears reading the same x). The x * (1/s) stays a float multiply before the quantize."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from qcompiler.calibration import calibration_set
from qcompiler.ir import Graph, Node, Value
from qcompiler.pipeline import Pass, PassContext, register

from .range_analysis import sweep

FLOAT = ("f32", "f16", "f64")


def _candidates(graph: Graph) -> dict[Value, list[Node]]:
    groups: dict[Value, list[Node]] = {}
    for node in graph.nodes:
        if (node.op == "linear" and node.inputs[1].is_constant and not node.inputs[0].is_constant
                and node.inputs[0].dtype in FLOAT):
            groups.setdefault(node.inputs[0], []).append(node)
    return groups


@register
@dataclass(frozen=True)
class SmoothQuant(Pass):
    name = "smooth-quant"
    summary = "scale activation outlier channels into linear weights (SmoothQuant); needs calibration data"
    alpha: float = 0.5

    def run(self, graph: Graph, ctx: PassContext) -> bool:
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"smooth-quant: alpha {self.alpha} must be in [0, 1]")
        groups = _candidates(graph)
        if not groups:
            return False
        amax = {id(v): np.zeros(v.shape[-1]) for v in groups}

        def observe(v: Value, a: np.ndarray) -> None:
            amax[id(v)] = np.maximum(amax[id(v)], np.abs(a.reshape(-1, a.shape[-1])).max(axis=0))

        sweep(graph, calibration_set(graph, ctx.calibration), list(groups), observe, ctx.progress,
              "smoothing (per-channel maxima)")

        for x, linears in groups.items():
            a = amax[id(x)]
            w_max = np.max([np.abs(graph.constant_array(n.inputs[1])).max(axis=0) for n in linears], axis=0)
            with np.errstate(divide="ignore", invalid="ignore"):
                s = np.power(a, self.alpha) / np.power(w_max, 1.0 - self.alpha)
            s = np.where(np.isfinite(s) & (s > 0), s, 1.0).clip(1e-5, 1e5).astype(np.float32)
            inv = graph.add_constant(f"{x.name}.smooth", (1.0 / s).astype(np.float32))
            first = min(graph.nodes.index(n) for n in linears)
            scaled = graph.add_node("mul", [x, inv], meta={"source": linears[0].source},
                                    before=graph.nodes[first]).output
            for n in linears:
                w = graph.constant_array(n.inputs[1])
                n.inputs = [scaled, graph.add_constant(f"{n.inputs[1].name}.smoothed", (w * s[None, :]).astype(w.dtype))] \
                    + n.inputs[2:]
        graph.remove_unused_constants()
        ctx.report["smooth_quant"] = {"alpha": self.alpha, "groups": len(groups)}
        return True
