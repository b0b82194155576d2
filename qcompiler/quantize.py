"""The quantization flow as one call: float passes, range analysis on calibration data,
quantize/dequantize insertion, integer lowering. Returns the integer graph, the QDQ graph
(for per-layer analysis) and the report, with the pipeline string that reproduces them."""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .calibration import calibration_set
from .calibration_record import CalibrationRecord
from .errors import QCompilerError
from .ir import Graph
from .pass_manager import Instruments, PassRecord, run_pipeline
from .pipeline import PassContext, parse_pipeline_given, print_pipeline, registered_passes
from .quant_config import QuantConfig

if TYPE_CHECKING:
    from .precision_search import SearchResult


def calibrate_stages(config: QuantConfig, exclude: tuple[str, ...] = ()) -> str:
    """range-analysis and (as ``config`` says) bias-correction, with every option ``config``
    sets written out. ``exclude``: layers kept float (the sensitivity check's)."""
    calibrate = config.calibration.pipeline_options()
    if config.activation_dtype != "u8":
        calibrate += f",activation_dtype={config.activation_dtype}"
    stages = [f"range-analysis{{{calibrate}}}"]
    if config.bias_correction:
        stages.append(str(registered_passes()["bias-correction"](**dataclasses.asdict(config.scheme(exclude)))))
    return ",".join(stages)


def insert_stage(config: QuantConfig, exclude: tuple[str, ...] = ()) -> str:
    """insert-qdq with ``config``'s scheme; ``exclude`` as for ``calibrate_stages``."""
    return str(registered_passes()["insert-qdq"](**dataclasses.asdict(config.scheme(exclude))))


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


def float_stages(config: QuantConfig, float_pipeline: str | None = None) -> str:
    """The float passes (``float_pipeline``, or the default ones), then the low-rank factorization
    when ``config`` asks for it: the float model that is calibrated and quantized."""
    from .passes import DEFAULT_FLOAT_PIPELINE

    floats = float_pipeline if float_pipeline is not None else DEFAULT_FLOAT_PIPELINE
    if config.low_rank is not None:
        floats = ",".join(s for s in (floats, f"factorize-low-rank{{energy={config.low_rank.energy}}}") if s)
    return floats


def quantization_pipeline(config: QuantConfig, float_pipeline: str | None = None, lower: bool = True,
                          exclude: tuple[str, ...] = (), ranges: str | None = None) -> str:
    """The whole flow as one pipeline string: what ``qcompiler opt -p`` reproduces it with.
    ``ranges``: a calibration record's path, applied instead of calibrating."""
    floats = float_stages(config, float_pipeline)
    calibrate = calibrate_stages(config, exclude) if ranges is None else f"apply-calibration{{path={ranges}}}"
    stages = [floats, calibrate, insert_stage(config, exclude)]
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
    calibration: CalibrationRecord | None = None  # what the data decided: .save(path) to reuse it


def quantize(graph: Graph, calibration: Any = None, config: QuantConfig | None = None, *, lower: bool = True,
             float_pipeline: str | None = None, progress: bool = False,
             on_pass: Callable[[Any], None] | None = None,
             ranges: str | os.PathLike | None = None) -> QuantizeResult:
    """Quantize a copy of ``graph`` (which is left untouched) with ``calibration`` batches
    (see ``qcompiler.calibration`` for what they may be), or, instead of data, with ``ranges``:
    a calibration record saved from an earlier run (``result.calibration.save(path)``) on the
    same model. ``on_pass`` is told of each pass before it runs (``PhaseLog.for_pass``)."""
    config = config or QuantConfig()
    if (calibration is None) == (ranges is None):
        raise QCompilerError("quantizing needs calibration data or a saved calibration record (ranges=...): "
                             + ("neither was given" if ranges is None else "give one, not both"))
    batches = calibration_set(graph, calibration) if calibration is not None else None
    ctx = PassContext(calibration=batches, progress=progress)
    inst = Instruments(emit=lambda s: None, on_pass=on_pass)
    float_graph = run_pipeline(graph.copy(), float_stages(config, float_pipeline), inst, ctx)
    if ranges is not None:
        record = CalibrationRecord.load(ranges)
        if record.activation_dtype != config.activation_dtype:
            raise QCompilerError(f"{ranges}: calibrated for {record.activation_dtype} activations, and the config "
                                 f"asks for {config.activation_dtype}; recalibrate")
        exclude = tuple(record.exclude)
        qdq = run_pipeline(float_graph.copy(), f"apply-calibration{{path={ranges}}},{insert_stage(config, exclude)}",
                           inst, ctx)
        _explain_exclusions(float_graph, record.exclude, ctx)
    else:
        qdq, record = _calibrate_and_insert(float_graph, config, batches, inst, ctx)
        exclude = tuple(record.exclude)
    final = run_pipeline(qdq.copy(), "lower-integer", inst, ctx) if lower else qdq
    for result in {id(g): g for g in (float_graph, qdq, final)}.values():
        result.name_outputs([v.name for v in graph.outputs])  # rewrites replace output values; names stay
    pipeline = quantization_pipeline(config, float_pipeline, lower, exclude, None if ranges is None else str(ranges))
    return QuantizeResult(final, qdq, float_graph, pipeline, ctx.report, inst.records, record)


def _calibrate_and_insert(float_graph: Graph, config: QuantConfig, batches: Any, inst: Instruments,
                          ctx: PassContext) -> tuple[Graph, CalibrationRecord]:
    """Calibrate and insert quantize/dequantize pairs; with ``min_layer_sqnr_db``, layers that
    lose too much even when quantized alone are kept float; with ``target_output_sqnr_db``, the
    precision search keeps more float until the outputs meet it. Each decision recalibrates
    without the layers kept float (bias correction depends on them)."""
    from .compare import compare

    def calibrated(exclude: dict[str, str]) -> tuple[Graph | None, Graph, CalibrationRecord]:
        """The calibrated graph (kept for the precision search only), the QDQ graph, the record."""
        graph = run_pipeline(float_graph.copy(), calibrate_stages(config, tuple(exclude)), inst, ctx)
        record = CalibrationRecord.measure(float_graph, graph, calibrate_stages(config).split(",")[0],
                                           config.activation_dtype, exclude)  # before insert-qdq rewrites it
        ranged = graph.copy() if config.target_output_sqnr_db is not None else None
        return ranged, run_pipeline(graph, insert_stage(config, tuple(exclude)), inst, ctx), record

    exclude: dict[str, str] = {}
    ranged, qdq, record = calibrated(exclude)
    if config.min_layer_sqnr_db is not None:
        names = {n.handle: n.outputs[0].name for n in float_graph.nodes}
        weak = [e for e in compare(float_graph, qdq, batches.first())
                if e.local_sqnr_db is not None and e.local_sqnr_db < config.min_layer_sqnr_db]
        if weak:
            exclude = {names[e.handle]: f"local SQNR {e.local_sqnr_db:.1f} dB < min_layer_sqnr_db "
                                        f"{config.min_layer_sqnr_db:g}" for e in weak}
            ctx.report["not_quantized"] = []
            ranged, qdq, record = calibrated(exclude)
    if config.target_output_sqnr_db is not None:
        found = _search_precision(float_graph, ranged, config, batches, tuple(exclude), inst, ctx)
        if found.promoted:
            exclude |= found.reasons()
            ctx.report["not_quantized"] = []
            ranged, qdq, record = calibrated(exclude)
            found.remeasure(qdq, batches.first())
            ctx.report["precision_search"] = found.report()  # measured on what ships (recalibrated)
    if exclude:
        _explain_exclusions(float_graph, record.exclude, ctx)
    return qdq, record


def _search_precision(float_graph: Graph, ranged: Graph, config: QuantConfig, batches: Any, kept: tuple[str, ...],
                      inst: Instruments, ctx: PassContext) -> SearchResult:
    """The precision search (``precision_search.search``) on the calibrated graph ``ranged``;
    its result goes into the report as ``precision_search``."""
    from .precision_search import search
    from .progress import Step

    quiet = Instruments(emit=lambda s: None)

    def insert(exclude: tuple[str, ...]) -> Graph:
        return run_pipeline(ranged.copy(), insert_stage(config, exclude), quiet, PassContext())

    if inst.on_pass is not None:
        inst.on_pass(Step("precision-search", f"target {config.target_output_sqnr_db:g} dB at the outputs"))
    found = search(float_graph, insert, batches.first(), config.target_output_sqnr_db, kept, ctx.progress)
    ctx.report["precision_search"] = found.report()
    return found


def _explain_exclusions(float_graph: Graph, reasons: dict[str, str], ctx: PassContext) -> None:
    """Layers the sensitivity check kept float are reported with its reason, not as exclusions."""
    by_handle = {str(n.handle): reasons[n.outputs[0].name] for n in float_graph.nodes if n.outputs[0].name in reasons}
    for entry in ctx.report.get("not_quantized", []):
        entry["reason"] = by_handle.get(entry["handle"], entry["reason"])
