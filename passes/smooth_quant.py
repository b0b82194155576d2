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
norm's output with 40x outlier channels and can hurt a tame input), so each group, in order,
tries no smoothing and ``STRENGTHS`` on the first calibration batch and keeps the best:
- a group whose linears all take per-token scales (``dynamic``) by its own error: x / s rounded
  per row as quantize_rows will, W * s per channel as insert-qdq will, against the float
  products. Per-token codes depend on x / s alone, so the group's error is its share of the
  model's, measured with a few matrix products instead of a quantized model run per strength
  (MiniLM: mean sentence cosine 0.9982 against the output measure's 0.9981; compile 12 s
  against 30). Nor does a later bottleneck hide its gain, as it does from the worst output
  when groups are tried in order (a query/key/value group going 4 -> 42 dB did not move an
  output an FFN held at 30 dB);
- any other group by the quantized model's worst output SQNR (quantized as insert-qdq will: the
  pass's options are the QuantScheme's), since with static scales a layer's own error misleads
  (a multiply after an already quantized value, data the calibration maxima do not cover). A
  trial needs no recalibration: every value but x / s keeps its range (the rewrite is exact in
  float), and x / s's min-max range is min_j(lo_j / s_j)..max_j(hi_j / s_j) from x's per-channel
  extremes.

``factors``: a calibration record's path; the groups and factors it holds are applied as they
were chosen (no data needed), so a record replays a smoothed build exactly."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from qcompiler.calibration import calibration_set
from qcompiler.calibration_record import CalibrationRecord
from qcompiler.errors import QCompilerError
from qcompiler.interpreter import run
from qcompiler.ir import Graph, Node, Value
from qcompiler.pipeline import Pass, PassContext, register
from qcompiler.progress import progress_bar
from qcompiler.quant_config import QuantScheme

from .bias_correction import fake_quant_rows
from .insert_qdq import quantize_weight
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
    """Per channel (the last axis): the largest magnitude, the min and the max; and the first
    calibration batch's rows (what a per-token group's error is measured on)."""

    def __init__(self, channels: int) -> None:
        self.amax = np.zeros(channels)
        self.lo, self.hi = np.full(channels, np.inf), np.full(channels, -np.inf)
        self.first: np.ndarray | None = None

    def update(self, a: np.ndarray) -> None:
        rows = a.reshape(-1, a.shape[-1]).astype(np.float64)
        if self.first is None:
            self.first = rows
        self.amax = np.maximum(self.amax, np.abs(rows).max(axis=0))
        self.lo, self.hi = np.minimum(self.lo, rows.min(axis=0)), np.maximum(self.hi, rows.max(axis=0))


def factors(amax: np.ndarray, w_max: np.ndarray, alpha: float) -> np.ndarray:
    """s per input channel (1 where a channel is never seen or has no weight)."""
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        s = np.power(amax, alpha) / np.power(w_max, 1.0 - alpha)
    return np.where(np.isfinite(s) & (s > 0), s, 1.0).clip(1e-5, 1e5).astype(np.float32)


def group_error(x: np.ndarray, weights: list[np.ndarray], s: np.ndarray, scheme: QuantScheme,
                linears: list[Node]) -> float:
    """Relative squared error of a group's linears on rows ``x`` when x / s is quantized per
    token (quantize_rows, dequantize_rows) and each W * s as insert-qdq quantizes it."""
    approx = fake_quant_rows((x / s).astype(np.float32)).astype(np.float64)
    err = ref = 0.0
    for w, node in zip(weights, linears):
        q, scale = quantize_weight(w * s[None, :], scheme.per_channel, groups=scheme.int4_groups(node))
        scale = np.asarray(scale, np.float64)
        want = x @ w.T.astype(np.float64)
        got = approx @ (q * (scale[:, None] if scale.ndim else scale)).T
        err, ref = err + float(((got - want) ** 2).sum()), ref + float((want ** 2).sum())
    return err / ref if ref > 0 else 0.0


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
               "strength by its own error under per-token scales, else by the quantized model's output error); "
               "needs calibration data, or factors=RECORD")
    alpha: float = 0.5
    per_layer: bool = False
    factors: str = ""  # a calibration record: its groups' factors, applied without data

    def run(self, graph: Graph, ctx: PassContext) -> bool:
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"smooth-quant: alpha {self.alpha} must be in [0, 1]")
        self.check_scheme()
        if self.factors:
            return self._replay(graph, ctx)
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
        entries, kept = [], []
        for x, linears in groups.items():
            alpha = chosen[x.name]
            entry: dict[str, Any] = {"input": x.name, "linears": [n.source for n in linears], "alpha": alpha}
            if alpha is not None:
                s = factors(seen[x.name].amax, w_max[x.name], alpha)
                kept.append({"input": x.name, "linears": plan[x.name], "alpha": alpha, "factors": s.tolist()})
                entry["folded_into"] = smooth(graph, x, linears, s)[1]
            entries.append(entry)
        graph.remove_unused_constants()
        ctx.decisions["smoothing"] = kept
        ctx.report["smooth_quant"] = {"alpha": "per layer" if self.per_layer else self.alpha, "groups": entries,
                                      **(searched or {})}
        return bool(kept)

    def _replay(self, graph: Graph, ctx: PassContext) -> bool:
        """The smoothing a calibration record holds, group by group in its order."""
        recorded = CalibrationRecord.load(self.factors).smoothing
        values = {v.name: v for n in graph.nodes for v in n.inputs}
        producers = {n.outputs[0].name: n for n in graph.nodes if n.op == "linear"}
        entries = []
        for group in recorded:
            x, linears = values.get(group["input"]), [producers.get(name) for name in group["linears"]]
            if x is None or None in linears or any(n.inputs[0] is not x for n in linears):
                raise QCompilerError(f"{self.factors}: its smoothing names {group['input']!r} read by linears "
                                     f"{group['linears']}, which this graph does not have; recalibrate")
            s = np.asarray(group["factors"], np.float32)
            entries.append({"input": x.name, "linears": [n.source for n in linears], "alpha": group["alpha"],
                            "folded_into": smooth(graph, x, linears, s)[1]})
        graph.remove_unused_constants()
        ctx.decisions["smoothing"] = recorded
        ctx.report["smooth_quant"] = {"alpha": "from a calibration record", "groups": entries, "from": self.factors}
        return bool(recorded)

    def _search(self, graph: Graph, batches: Any, plan: dict[str, list[str]], w_max: dict[str, np.ndarray],
                seen: dict[str, _Extremes], ctx: PassContext) -> tuple[dict[str, float | None], dict[str, Any]]:
        """Each group's strength (None: left alone): a group with per-token scales by its own
        error (``_by_group_error``); any other greedily in order, by the quantized model's worst
        output SQNR; and what was measured."""
        batch = batches.first()
        linears = {n.outputs[0].name: n for n in graph.nodes if n.op == "linear"}
        local = [x for x, names in plan.items() if all(self.runs_dynamic(linears[n]) for n in names)]
        chosen: dict[str, float | None] = {}
        gains = []
        for x_name in local:
            chosen[x_name], gain = self._by_group_error(seen[x_name].first, [linears[n] for n in plan[x_name]], graph,
                                                        seen[x_name].amax, w_max[x_name])
            gains.append(gain)
        measured: dict[str, Any] = {}
        if local:
            measured["per_token_groups"] = {"groups": len(local), "smoothed": sum(chosen[x] is not None for x in local),
                                            "by": "each group's own error (per-token codes, first calibration batch)",
                                            "mean_gain_db": round(float(np.mean(gains)), 2)}
        static = [x for x in plan if x not in chosen]
        if not static:
            return chosen, measured
        ranged = graph.copy()
        RangeAnalysis(activation_dtype=self.activation_dtype).run(ranged, PassContext(calibration=batches))
        score = OutputScore(self, batch, run(graph, batch))

        def apply(target: Graph, x_name: str, alpha: float) -> None:
            x = next(v for n in target.nodes for v in n.inputs if v.name == x_name)
            group = [n for n in target.nodes if n.outputs[0].name in plan[x_name]]
            s = factors(seen[x_name].amax, w_max[x_name], alpha)
            smoothed, _ = smooth(target, x, group, s)
            lo, hi = float(np.min(seen[x_name].lo / s)), float(np.max(seen[x_name].hi / s))
            smoothed.range = (min(lo, 0.0), max(hi, 0.0))

        for x_name in local:
            if chosen[x_name] is not None:
                apply(ranged, x_name, chosen[x_name])
        best = start = score(ranged)
        with progress_bar("smooth-quant: strength per layer", len(static) * len(STRENGTHS), ctx.progress) as advance:
            for x_name in static:
                chosen[x_name] = None
                for alpha in STRENGTHS:
                    trial = ranged.copy()
                    apply(trial, x_name, alpha)
                    measured_db = score(trial)
                    if measured_db > best + SIGNIFICANT_DB:
                        best, chosen[x_name] = measured_db, alpha
                    advance()
                if chosen[x_name] is not None:
                    apply(ranged, x_name, chosen[x_name])
        measured["output_sqnr_db"] = {"before": round(float(start), 2), "after": round(float(best), 2),
                                      "measured_on": "the first calibration batch"}
        return {x: chosen[x] for x in plan}, measured

    def _by_group_error(self, rows: np.ndarray, group: list[Node], graph: Graph, amax: np.ndarray,
                  w_max: np.ndarray) -> tuple[float | None, float]:
        """A group whose linears take per-token scales: the one of ``STRENGTHS`` with the least
        group error if it beats leaving the group alone by ``SIGNIFICANT_DB``, else None; and
        the gain in dB."""
        weights = [graph.constant_array(n.inputs[1]).astype(np.float64) for n in group]
        errors = {alpha: group_error(rows, weights, factors(amax, w_max, alpha).astype(np.float64), self, group)
                  for alpha in STRENGTHS}
        alpha = min(errors, key=errors.get)
        alone = group_error(rows, weights, np.ones(rows.shape[1]), self, group)
        gain = float(10 * np.log10(max(alone, 1e-300) / max(errors[alpha], 1e-300)))
        return (alpha, gain) if gain > SIGNIFICANT_DB else (None, 0.0)

