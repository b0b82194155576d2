"""range-analysis: run calibration batches through the reference interpreter and record each
float activation's range on its value (printed in the IR as ``range(lo, hi)``).

Methods: minmax, moving_average (EMA of per-batch extrema), percentile, entropy (KL, as
TensorRT's calibrator) and mse (least quantize-dequantize error). Observers stream; the
histogram methods take a second sweep over the batches instead of keeping activations."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from qcompiler.calibration import CalibrationSet, calibration_set
from qcompiler.calibration_record import calibrated_values
from qcompiler.interpreter import run
from qcompiler.ir import Graph, Value
from qcompiler.pipeline import Pass, PassContext, register
from qcompiler.progress import progress_bar

from .observers import FLT_MAX, Histogram, MinMax, MovingAverageMinMax, entropy_range, mse_range, percentile_range


def sweep(graph: Graph, batches: CalibrationSet, values: list[Value], update, progress: bool,
           label: str) -> None:
    """Run every batch; call ``update(value, array)`` for each observed value."""
    wanted = {id(v): v for v in values}

    def observer(node, outs):
        for v, a in zip(node.outputs, outs):
            if id(v) in wanted:
                update(v, a)

    with progress_bar(label, batches.count, progress) as advance:
        for batch in batches:
            for v, a in zip(graph.inputs, batch):
                if id(v) in wanted:
                    update(v, a)
            run(graph, batch, observer=observer)
            advance()


@register
@dataclass(frozen=True)
class RangeAnalysis(Pass):
    name = "range-analysis"
    summary = "calibrate every float activation's range (minmax, moving_average, percentile, entropy, mse)"
    method: str = "minmax"
    percentile: float = 99.99
    averaging_constant: float = 0.01
    bins: int = 2048
    activation_dtype: str = "u8"  # i8: symmetric ranges (mse searches symmetric clipping)

    def run(self, graph: Graph, ctx: PassContext) -> bool:
        from qcompiler.quant_config import CalibrationConfig

        CalibrationConfig(self.method, self.percentile, self.averaging_constant, self.bins)  # validates
        batches = calibration_set(graph, ctx.calibration)
        values = calibrated_values(graph)
        if self.method == "moving_average":
            observers: dict[int, Any] = {id(v): MovingAverageMinMax(self.averaging_constant) for v in values}
        else:
            observers = {id(v): MinMax() for v in values}
        sweep(graph, batches, values, lambda v, a: observers[id(v)].update(a), ctx.progress, "calibrating")
        ranges = {id(v): observers[id(v)].result() for v in values}
        if self.method in ("percentile", "entropy", "mse"):
            # a value that holds an infinity (a mask) keeps its min-max range: no clipping makes it quantizable
            clipped = [v for v in values if max(abs(ranges[id(v)][0]), abs(ranges[id(v)][1])) < FLT_MAX]
            hists = {id(v): Histogram(*ranges[id(v)], self.bins) for v in clipped}
            sweep(graph, batches, clipped, lambda v, a: hists[id(v)].update(a), ctx.progress,
                   f"calibrating ({self.method} histograms)")
            levels = 256
            symmetric = self.activation_dtype == "i8"
            for v in clipped:
                h = hists[id(v)]
                if self.method == "percentile":
                    ranges[id(v)] = percentile_range(h, self.percentile)
                elif self.method == "entropy":
                    ranges[id(v)] = entropy_range(h, levels)
                else:
                    ranges[id(v)] = mse_range(h, levels, symmetric)
        for v in values:
            v.range = (float(ranges[id(v)][0]), float(ranges[id(v)][1]))
        ctx.report["calibration"] = {"method": str(self), "batches": batches.count, "values": len(values)}
        return True


