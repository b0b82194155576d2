"""smooth-quant: migrate activation outliers into the weights before quantization (SmoothQuant,
Xiao et al. 2023). Transformer activations carry a few channels far larger than the rest, so a
per-tensor activation scale wastes most of the int8 grid on them; weights, quantized per output
channel, absorb a per-input-channel factor at no cost.

Identity: linear(x, W) == linear(x * (1/s), W * s) with s broadcast over W's input axis, for
s_j = max|x_j|^alpha / max|W_:,j|^(1-alpha) (per input channel j, from calibration data; one s
for all linears reading the same x). Where x is a layer norm's result read by these linears
only, x * (1/s) is that layer norm with its scale and bias times 1/s (the norm is per row, the
factor per channel: layer_norm(z, g, b) / s == layer_norm(z, g / s, b / s)); elsewhere it is a
float multiply before the quantize.

``per_layer``: the strength suited to one layer is wrong for another (alpha 0.5 helps a layer
norm's output with 40x outlier channels and can hurt a tame input), and a layer's own error
misleads (a multiply after an already quantized value, data the calibration maxima do not
cover). So each group, in order, tries no smoothing and ``STRENGTHS``, each on the model quantized
as insert-qdq will (the pass's options are the QuantScheme's) and run on the first calibration
batch, and keeps the strength with the best worst-output SQNR. A trial needs no recalibration:
every value but x / s keeps its range (the rewrite is exact in float), and x / s's min-max range
is min_j(lo_j / s_j)..max_j(hi_j / s_j) from x's per-channel extremes."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from qcompiler.calibration import calibration_set
from qcompiler.interpreter import run
from qcompiler.ir import Graph, Node, Value
from qcompiler.pipeline import Pass, PassContext, register
from qcompiler.progress import progress_bar
from qcompiler.quant_config import QuantScheme

from .output_score import OutputScore
from .range_analysis import RangeAnalysis, sweep

FLOAT = ("f32", "f16", "f64")
STRENGTHS = (0.25, 0.5, 0.75)  # the alphas per_layer tries besides leaving a group alone
SIGNIFICANT_DB = 0.05  # a strength must beat the current choice by this much


def _candidates(graph: Graph) -> dict[Value, list[Node]]:
    groups: dict[Value, list[Node]] = {}
    for node in graph.nodes:
        if (node.op == "linear" and node.inputs[1].is_constant and not node.inputs[0].is_constant
                and node.inputs[0].dtype in FLOAT):
            groups.setdefault(node.inputs[0], []).append(node)
    return groups


class _Extremes:
    """Per channel (the last axis): the largest magnitude, the min and the max."""

    def __init__(self, channels: int) -> None:
        self.amax = np.zeros(channels)
        self.lo, self.hi = np.full(channels, np.inf), np.full(channels, -np.inf)

    def update(self, a: np.ndarray) -> None:
        rows = a.reshape(-1, a.shape[-1]).astype(np.float64)
        self.amax = np.maximum(self.amax, np.abs(rows).max(axis=0))
        self.lo, self.hi = np.minimum(self.lo, rows.min(axis=0)), np.maximum(self.hi, rows.max(axis=0))


def factors(amax: np.ndarray, w_max: np.ndarray, alpha: float) -> np.ndarray:
    """s per input channel (1 where a channel is never seen or has no weight)."""
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        s = np.power(amax, alpha) / np.power(w_max, 1.0 - alpha)
    return np.where(np.isfinite(s) & (s > 0), s, 1.0).clip(1e-5, 1e5).astype(np.float32)


def _foldable(graph: Graph, x: Value, linears: list[Node]) -> bool:
    """Whether x is a layer norm's result (over its last axis, constant scale and bias) that
    nothing but ``linears`` reads: then 1/s folds into the norm."""
    norm = x.producer
    return (norm is not None and norm.op == "layer_norm" and norm.attrs["axis"] in (-1, x.type.rank - 1)
            and all(v.is_constant for v in norm.inputs[1:]) and x not in graph.outputs
            and len(graph.users_of(x)) == len(linears))


def smooth(graph: Graph, x: Value, linears: list[Node], s: np.ndarray) -> tuple[Value, str]:
    """Rewrite ``linears`` (all readers of ``x`` among the linears) to read x / s with weights
    W * s; the value that now holds x / s, and how it was made (for the report)."""
    for n in linears:
        w = graph.constant_array(n.inputs[1])
        n.inputs[1] = graph.add_constant(f"{n.inputs[1].name}.smoothed", (w * s[None, :]).astype(w.dtype))
    if _foldable(graph, x, linears):
        norm = x.producer
        scale = graph.constant_array(norm.inputs[1]) if len(norm.inputs) > 1 else np.ones(len(s), np.float32)
        parts = [norm.inputs[0], graph.add_constant(f"{x.name}.norm_scale.smoothed", (scale / s).astype(np.float32))]
        if len(norm.inputs) > 2:
            bias = graph.constant_array(norm.inputs[2])
            parts.append(graph.add_constant(f"{x.name}.norm_bias.smoothed", (bias / s).astype(np.float32)))
        norm.inputs = parts
        return x, f"layer_norm {norm.source}"
    inv = graph.add_constant(f"{x.name}.smooth", (1.0 / s).astype(np.float32))
    first = min(graph.nodes.index(n) for n in linears)
    scaled = graph.add_node("mul", [x, inv], meta={"source": linears[0].source}, before=graph.nodes[first]).output
    for n in linears:
        n.inputs[0] = scaled
    return scaled, "multiply"


@register
@dataclass(frozen=True)
class SmoothQuant(QuantScheme, Pass):
    """Its options are ``alpha`` and ``per_layer``, and the QuantScheme's (with ``per_layer``,
    the model is quantized as insert-qdq will to measure each strength)."""

    name = "smooth-quant"
    summary = ("scale activation outlier channels into linear weights (SmoothQuant; per_layer: each group's "
               "strength by the quantized model's output error); needs calibration data")
    alpha: float = 0.5
    per_layer: bool = False

    def run(self, graph: Graph, ctx: PassContext) -> bool:
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"smooth-quant: alpha {self.alpha} must be in [0, 1]")
        self.check_scheme()
        groups = _candidates(graph)
        if not groups:
            return False
        batches = calibration_set(graph, ctx.calibration)
        seen = {v.name: _Extremes(v.shape[-1]) for v in groups}
        sweep(graph, batches, list(groups), lambda v, a: seen[v.name].update(a), ctx.progress,
              "smoothing (per-channel maxima)")
        plan = {x.name: [n.outputs[0].name for n in linears] for x, linears in groups.items()}
        w_max = {x.name: np.max([np.abs(graph.constant_array(n.inputs[1])).max(axis=0) for n in linears], axis=0)
                 for x, linears in groups.items()}
        if self.per_layer:
            chosen, searched = self._search(graph, batches, plan, w_max, seen, ctx)
        else:
            chosen, searched = {name: self.alpha for name in plan}, None
        entries = []
        for x, linears in groups.items():
            alpha = chosen[x.name]
            entry: dict[str, Any] = {"input": x.name, "linears": [n.source for n in linears], "alpha": alpha}
            if alpha is not None:
                entry["folded_into"] = smooth(graph, x, linears, factors(seen[x.name].amax, w_max[x.name], alpha))[1]
            entries.append(entry)
        graph.remove_unused_constants()
        ctx.report["smooth_quant"] = {"alpha": "per layer" if self.per_layer else self.alpha, "groups": entries,
                                      **({"output_sqnr_db": searched} if searched else {})}
        return any(alpha is not None for alpha in chosen.values())

    def _search(self, graph: Graph, batches: Any, plan: dict[str, list[str]], w_max: dict[str, np.ndarray],
                seen: dict[str, _Extremes], ctx: PassContext) -> tuple[dict[str, float | None], dict[str, float]]:
        """Each group's strength (None: left alone), chosen greedily in order on the quantized
        model's worst output SQNR; and that SQNR before and after."""
        ranged = graph.copy()
        RangeAnalysis(activation_dtype=self.activation_dtype).run(ranged, PassContext(calibration=batches))
        batch = batches.first()
        score = OutputScore(self, batch, run(graph, batch))
        best = start = score(ranged)
        chosen: dict[str, float | None] = {}

        def apply(target: Graph, x_name: str, alpha: float) -> None:
            x = next(v for n in target.nodes for v in n.inputs if v.name == x_name)
            linears = [n for n in target.nodes if n.outputs[0].name in plan[x_name]]
            s = factors(seen[x_name].amax, w_max[x_name], alpha)
            smoothed, _ = smooth(target, x, linears, s)
            lo, hi = float(np.min(seen[x_name].lo / s)), float(np.max(seen[x_name].hi / s))
            smoothed.range = (min(lo, 0.0), max(hi, 0.0))

        with progress_bar("smooth-quant: strength per layer", len(plan) * len(STRENGTHS), ctx.progress) as advance:
            for x_name in plan:
                chosen[x_name] = None
                for alpha in STRENGTHS:
                    trial = ranged.copy()
                    apply(trial, x_name, alpha)
                    measured = score(trial)
                    if measured > best + SIGNIFICANT_DB:
                        best, chosen[x_name] = measured, alpha
                    advance()
                if chosen[x_name] is not None:
                    apply(ranged, x_name, chosen[x_name])
        return chosen, {"before": round(float(start), 2), "after": round(float(best), 2),
                        "measured_on": "the first calibration batch"}
