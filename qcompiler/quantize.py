"""The quantization flow as one call: float passes, range analysis on calibration data,
quantize/dequantize insertion, integer lowering. Returns the integer graph, the QDQ graph
(for per-layer analysis) and the report, with the pipeline string that reproduces them."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .ir import Graph
from .pass_manager import Instruments, PassRecord, run_pipeline
from .pipeline import PassContext
from .quant_config import QuantConfig


def quantization_pipeline(config: QuantConfig, float_pipeline: str | None = None, lower: bool = True) -> str:
    from .passes import DEFAULT_FLOAT_PIPELINE

    stages = [float_pipeline if float_pipeline is not None else DEFAULT_FLOAT_PIPELINE,
              f"range-analysis{{{config.calibration.pipeline_options()}}}", "insert-qdq"]
    if lower:
        stages.append("lower-integer")
    return ",".join(s for s in stages if s)


@dataclass
class QuantizeResult:
    graph: Graph  # the integer graph (or the QDQ graph when lower=False)
    qdq_graph: Graph  # the float-simulated quantized graph, for compare()
    float_graph: Graph  # after the float passes: the reference the report compares against
    pipeline: str
    report: dict[str, Any] = field(default_factory=dict)
    timings: list[PassRecord] = field(default_factory=list)


def quantize(graph: Graph, calibration: Any, config: QuantConfig | None = None, *, lower: bool = True,
             float_pipeline: str | None = None, progress: bool = False) -> QuantizeResult:
    """Quantize a copy of ``graph`` (which is left untouched) with ``calibration`` batches."""
    from .passes import DEFAULT_FLOAT_PIPELINE

    config = config or QuantConfig()
    ctx = PassContext(calibration=calibration, config=config, progress=progress)
    inst = Instruments(emit=lambda s: None)
    float_graph = run_pipeline(graph.copy(), float_pipeline if float_pipeline is not None else DEFAULT_FLOAT_PIPELINE,
                               inst, ctx)
    qdq = run_pipeline(float_graph.copy(),
                       f"range-analysis{{{config.calibration.pipeline_options()}}},insert-qdq", inst, ctx)
    final = run_pipeline(qdq.copy(), "lower-integer", inst, ctx) if lower else qdq
    return QuantizeResult(final, qdq, float_graph, quantization_pipeline(config, float_pipeline, lower), ctx.report,
                          inst.records)
