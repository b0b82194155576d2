"""search-ranges: each activation's range from the estimator (the calibrated one, percentile or
mse) that leaves the model's outputs closest to float, measured on the quantized model itself.

No one estimator suits every layer: min-max wastes the grid of a tensor with rare outliers that
do not matter downstream, while percentile and mse clip a tensor whose largest values carry the
signal (a sparse feature before a max pool, a detector's scores). Each estimator judges its own
tensor; only the output knows which error counts. So, in topological order, each quantized
activation tries each candidate range with the others fixed (greedy coordinate descent), the
model quantized exactly as insert-qdq will (same scheme) and run on the first calibration batch,
and keeps the one whose worst output SQNR against float is highest. A candidate is kept only
if it beats the current choice by ``SIGNIFICANT_DB``, so min-max (the calibrated range) stays
where the estimators tie.

Identity relied on: insert-qdq reads nothing of a value but its range, so the model each trial
runs is the one the chosen ranges will build."""
from __future__ import annotations

from dataclasses import dataclass

from qcompiler.calibration import calibration_set
from qcompiler.calibration_record import calibrated_values
from qcompiler.errors import QCompilerError
from qcompiler.interpreter import run
from qcompiler.ir import Graph
from qcompiler.pipeline import Pass, PassContext, register
from qcompiler.progress import progress_bar
from qcompiler.quant_config import QuantScheme

from .output_score import OutputScore
from .range_analysis import RangeAnalysis

ESTIMATORS = ("percentile", "mse")  # tried against the calibrated range
SIGNIFICANT_DB = 0.05  # a candidate must beat the current choice by this much
DIFFERENT = 1e-3  # candidate ranges within this fraction of the current one are not tried


def _same_range(a: tuple[float, float], b: tuple[float, float]) -> bool:
    width = max(a[1] - a[0], b[1] - b[0], 1e-30)
    return abs(a[0] - b[0]) <= DIFFERENT * width and abs(a[1] - b[1]) <= DIFFERENT * width


@register
@dataclass(frozen=True)
class SearchRanges(QuantScheme, Pass):
    """Its options are the QuantScheme's (the model is quantized as insert-qdq will) and the
    estimators' (``percentile``, ``bins``)."""

    name = "search-ranges"
    summary = ("choose each activation's range among the calibrated one, percentile and mse by the quantized "
               "model's output error (needs range-analysis)")
    percentile: float = 99.99
    bins: int = 2048

    def run(self, graph: Graph, ctx: PassContext) -> bool:
        self.check_scheme()
        if ctx.calibration is None:
            raise QCompilerError("search-ranges needs calibration data (it measures the quantized model's outputs); "
                                 "a calibration record does not carry it")
        values = {v.name: v for v in calibrated_values(graph)}
        if any(v.range is None for v in values.values()):
            raise QCompilerError("search-ranges needs range-analysis before it (a float value has no range)")
        batches = calibration_set(graph, ctx.calibration)
        candidates: dict[str, dict[str, tuple[float, float]]] = {name: {} for name in values}
        for method in ESTIMATORS:
            estimated = graph.copy()
            RangeAnalysis(method=method, percentile=self.percentile, bins=self.bins,
                          activation_dtype=self.activation_dtype).run(estimated, PassContext(calibration=batches))
            for v in calibrated_values(estimated):
                candidates[v.name][method] = v.range
        batch = batches.first()
        score = OutputScore(self, batch, run(graph, batch))
        baseline = score.quantized(graph)
        read_quantized = {n.inputs[0].name for n in baseline.nodes if n.op == "quantize"}
        trials = {name: {m: r for m, r in candidates[name].items() if not _same_range(r, values[name].range)}
                  for name in values if name in read_quantized}
        trials = {name: found for name, found in trials.items() if found}
        best = start = score.measure(baseline)
        changes = []
        with progress_bar("search-ranges: trying estimators", sum(map(len, trials.values())), ctx.progress) as advance:
            for name, found in trials.items():
                value, kept = values[name], values[name].range
                for method, candidate in found.items():
                    value.range = candidate
                    trial = score(graph)
                    if trial > best + SIGNIFICANT_DB:
                        best, kept = trial, candidate
                        changes = [c for c in changes if c["value"] != name]
                        changes.append({"value": name, "estimator": method, "range": [float(x) for x in candidate],
                                        "output_sqnr_db": round(float(trial), 2)})
                    advance()
                value.range = kept
        ctx.report["range_search"] = {
            "values_tried": len(trials), "changed": changes,
            "output_sqnr_db": {"calibrated": round(float(start), 2), "searched": round(float(best), 2)},
            "measured_on": "the first calibration batch"}
        return bool(changes)
