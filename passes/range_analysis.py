"""range-analysis: run calibration batches through the reference interpreter and record each
float activation's range on its value (printed in the IR as ``range(lo, hi)``).

Methods: minmax, moving_average (EMA of per-batch extrema), percentile, entropy (KL, as
TensorRT's calibrator) and mse (least quantize-dequantize error). Observers stream; the
histogram methods take a second sweep over the batches instead of keeping activations."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from qcompiler.errors import QCompilerError
from qcompiler.interpreter import check_inputs, run, to_numpy
from qcompiler.ir import Graph, Value
from qcompiler.pipeline import Pass, PassContext, register

from .observers import Histogram, MinMax, MovingAverageMinMax, entropy_range, mse_range, percentile_range

FLOAT = ("f32", "f16", "f64")


def calibration_batches(graph: Graph, data: Any) -> list[list[np.ndarray]]:
    """Normalize calibration data to a list of input lists, checked against the graph's
    signature; NaN or inf is refused with the batch and input named."""
    if data is None:
        raise QCompilerError("range-analysis needs calibration data (calibration=... / --calibration)")
    if isinstance(data, np.ndarray) or hasattr(data, "detach"):
        data = [data]
    batches = []
    for i, batch in enumerate(data):
        if isinstance(batch, dict):
            missing = [v.name for v in graph.inputs if v.name not in batch]
            if missing:
                raise QCompilerError(f"calibration batch {i}: missing input(s) {missing}")
            batch = [batch[v.name] for v in graph.inputs]
        elif not isinstance(batch, (list, tuple)):
            batch = [batch]
        arrays = check_inputs(graph, [to_numpy(b) for b in batch])
        for value, a in zip(graph.inputs, arrays):
            if a.dtype.kind == "f" and not np.all(np.isfinite(a)):
                what = "NaN" if np.isnan(a).any() else "inf"
                raise QCompilerError(f"calibration batch {i}, input %{value.name}: contains {what}")
        batches.append(arrays)
    if not batches:
        raise QCompilerError("calibration data is empty")
    return batches


def sweep(graph: Graph, batches: Sequence[list[np.ndarray]], values: list[Value], update, progress: bool,
           label: str) -> None:
    """Run every batch; call ``update(value, array)`` for each observed value."""
    wanted = {id(v): v for v in values}

    def observer(node, outs):
        for v, a in zip(node.outputs, outs):
            if id(v) in wanted:
                update(v, a)

    from rich.progress import Progress

    with Progress(transient=True, disable=not progress) as bar:
        task = bar.add_task(label, total=len(batches))
        for batch in batches:
            for v, a in zip(graph.inputs, batch):
                if id(v) in wanted:
                    update(v, a)
            run(graph, batch, observer=observer)
            bar.advance(task)


@register
@dataclass(frozen=True)
class RangeAnalysis(Pass):
    name = "range-analysis"
    summary = "calibrate every float activation's range (minmax, moving_average, percentile, entropy, mse)"
    method: str = "minmax"
    percentile: float = 99.99
    averaging_constant: float = 0.01
    bins: int = 2048

    def run(self, graph: Graph, ctx: PassContext) -> bool:
        from qcompiler.quant_config import CalibrationConfig, QuantConfig

        CalibrationConfig(self.method, self.percentile, self.averaging_constant, self.bins)  # validates
        config = ctx.config or QuantConfig()
        batches = calibration_batches(graph, ctx.calibration)
        values = [v for v in graph.inputs if v.dtype in FLOAT]
        values += [v for n in graph.nodes for v in n.outputs if v.dtype in FLOAT]
        if self.method == "moving_average":
            observers: dict[int, Any] = {id(v): MovingAverageMinMax(self.averaging_constant) for v in values}
        else:
            observers = {id(v): MinMax() for v in values}
        sweep(graph, batches, values, lambda v, a: observers[id(v)].update(a), ctx.progress, "calibrating")
        ranges = {id(v): observers[id(v)].result() for v in values}
        if self.method in ("percentile", "entropy", "mse"):
            hists = {id(v): Histogram(*ranges[id(v)], self.bins) for v in values}
            sweep(graph, batches, values, lambda v, a: hists[id(v)].update(a), ctx.progress,
                   f"calibrating ({self.method} histograms)")
            levels = 256
            symmetric = config.activation_dtype == "i8"
            for v in values:
                h = hists[id(v)]
                if self.method == "percentile":
                    ranges[id(v)] = percentile_range(h, self.percentile)
                elif self.method == "entropy":
                    ranges[id(v)] = entropy_range(h, levels)
                else:
                    ranges[id(v)] = mse_range(h, levels, symmetric)
        for v in values:
            v.range = (float(ranges[id(v)][0]), float(ranges[id(v)][1]))
        ctx.report["calibration"] = {"method": str(self), "batches": len(batches), "values": len(values)}
        return True


