"""The quantization flow as one call: float passes, range analysis on calibration data,
quantize/dequantize insertion, integer lowering. Returns the integer graph, the QDQ graph
(for per-layer analysis) and the report, with the pipeline string that reproduces them."""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .calibration import calibration_set
from .ir import Graph
from .pass_manager import Instruments, PassRecord, run_pipeline
from .pipeline import PassContext, parse_pipeline_given, print_pipeline, registered_passes
from .quant_config import QuantConfig


def quantize_stages(config: QuantConfig, exclude: tuple[str, ...] = ()) -> str:
    """range-analysis, bias-correction (as ``config`` says) and insert-qdq, with every option
    ``config`` sets written out: the pipeline string is the whole reproducer. ``exclude``:
    layers kept float (the sensitivity check's), given to bias-correction and insert-qdq alike."""
    passes = registered_passes()
    scheme = dataclasses.asdict(config.scheme(exclude))
    calibrate = config.calibration.pipeline_options()
    if config.activation_dtype != "u8":
        calibrate += f",activation_dtype={config.activation_dtype}"
    stages = [f"range-analysis{{{calibrate}}}"]
    if config.bias_correction:
        stages.append(str(passes["bias-correction"](**scheme)))
    stages.append(str(passes["insert-qdq"](**scheme)))
    return ",".join(stages)


def with_config(pipeline: str, config: QuantConfig) -> str:
    """``pipeline`` with ``config``'s quantization options given to the passes that take them,
    where the pipeline leaves them at their defaults (``qcompiler opt --config``, ``compile(
    pipeline=..., config=...)``); the result is the full reproducer."""
    scheme = dataclasses.asdict(config.scheme())
    out = []
    for p, written in parse_pipeline_given(pipeline):
        fields = {f.name for f in dataclasses.fields(p)}
        filled = {k: v for k, v in scheme.items() if k in fields and k not in written}
        out.append(dataclasses.replace(p, **filled) if filled else p)
    return print_pipeline(out)


def quantization_pipeline(config: QuantConfig, float_pipeline: str | None = None, lower: bool = True,
                          exclude: tuple[str, ...] = ()) -> str:
    """The whole flow as one pipeline string: what ``qcompiler opt -p`` reproduces it with."""
    from .passes import DEFAULT_FLOAT_PIPELINE

    floats = float_pipeline if float_pipeline is not None else DEFAULT_FLOAT_PIPELINE
    stages = [floats, quantize_stages(config, exclude)]
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
             float_pipeline: str | None = None, progress: bool = False,
             on_pass: Callable[[Any], None] | None = None) -> QuantizeResult:
    """Quantize a copy of ``graph`` (which is left untouched) with ``calibration`` batches
    (see ``qcompiler.calibration`` for what they may be). ``on_pass`` is told of each pass
    before it runs (``PhaseLog.for_pass``)."""
    from .passes import DEFAULT_FLOAT_PIPELINE

    from .compare import compare

    config = config or QuantConfig()
    batches = calibration_set(graph, calibration)
    ctx = PassContext(calibration=batches, progress=progress)
    inst = Instruments(emit=lambda s: None, on_pass=on_pass)
    float_graph = run_pipeline(graph.copy(), float_pipeline if float_pipeline is not None else DEFAULT_FLOAT_PIPELINE,
                               inst, ctx)
    qdq = run_pipeline(float_graph.copy(), quantize_stages(config), inst, ctx)
    exclude: tuple[str, ...] = ()
    if config.min_layer_sqnr_db is not None:
        # sensitivity fallback: layers that lose too much even when quantized alone stay float
        names = {n.handle: n.outputs[0].name for n in float_graph.nodes}
        weak = [e for e in compare(float_graph, qdq, batches.first())
                if e.local_sqnr_db is not None and e.local_sqnr_db < config.min_layer_sqnr_db]
        if weak:
            exclude = tuple(names[e.handle] for e in weak)
            ctx.report["not_quantized"] = []
            qdq = run_pipeline(float_graph.copy(), quantize_stages(config, exclude), inst, ctx)
            reasons = {str(e.handle): f"local SQNR {e.local_sqnr_db:.1f} dB < min_layer_sqnr_db "
                                      f"{config.min_layer_sqnr_db:g}" for e in weak}
            for entry in ctx.report["not_quantized"]:
                entry["reason"] = reasons.get(entry["handle"], entry["reason"])
    final = run_pipeline(qdq.copy(), "lower-integer", inst, ctx) if lower else qdq
    for result in {id(g): g for g in (float_graph, qdq, final)}.values():
        result.name_outputs([v.name for v in graph.outputs])  # rewrites replace output values; names stay
    return QuantizeResult(final, qdq, float_graph, quantization_pipeline(config, float_pipeline, lower, exclude),
                          ctx.report, inst.records)
