"""The quantization flow as one call: float passes, range analysis on calibration data,
quantize/dequantize insertion, integer lowering. Returns the integer graph, the QDQ graph
(for per-layer analysis) and the report, with the pipeline string that reproduces them."""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from .calibration import calibration_set
from .calibration_record import CalibrationRecord
from .errors import QCompilerError
from .ir import Graph
from .pass_manager import Instruments, PassRecord, run_pipeline
from .pipeline import PassContext, parse_pipeline_given, print_pipeline, registered_passes
from .quant_config import QuantConfig

if TYPE_CHECKING:
    from .precision_search import SearchResult


def calibrate_stages(config: QuantConfig, exclude: tuple[str, ...] = (), int8_weights: tuple[str, ...] = (),
                     dynamic: tuple[str, ...] = (), bf16: tuple[str, ...] = ()) -> str:
    """range-analysis and (as ``config`` says) search-ranges, gptq and bias-correction, with every
    option ``config`` sets written out. ``exclude``: layers kept float, ``int8_weights``: layers
    of an i4 config kept at int8 weights (the sensitivity check's), ``dynamic``: layers with
    per-token scales, ``bf16``: those of ``exclude`` that run in bfloat16."""
    stages = [range_stage(config), search_stage(config, exclude, int8_weights, bf16, dynamic),
              gptq_stage(config, exclude, int8_weights), bias_stage(config, exclude, int8_weights, dynamic)]
    return ",".join(s for s in stages if s)


def range_stage(config: QuantConfig) -> str:
    """range-analysis with ``config``'s calibration options."""
    calibrate = config.calibration.pipeline_options()
    if config.activation_dtype != "u8":
        calibrate += f",activation_dtype={config.activation_dtype}"
    return f"range-analysis{{{calibrate}}}"


def search_stage(config: QuantConfig, exclude: tuple[str, ...] = (), int8_weights: tuple[str, ...] = (),
                 bf16: tuple[str, ...] = (), dynamic: tuple[str, ...] = ()) -> str:
    """search-ranges with ``config``'s scheme and estimator options, or "" when ``config`` does
    not ask for it."""
    if not config.range_search:
        return ""
    scheme = dataclasses.asdict(config.scheme(exclude, int8_weights, bf16, dynamic))
    return str(registered_passes()["search-ranges"](**scheme, percentile=config.calibration.percentile,
                                                     bins=config.calibration.bins))


def gptq_stage(config: QuantConfig, exclude: tuple[str, ...] = (), int8_weights: tuple[str, ...] = ()) -> str:
    """gptq with ``config``'s scheme, or "" when ``config`` does not ask for it."""
    if not config.gptq:
        return ""
    return str(registered_passes()["gptq"](**dataclasses.asdict(config.scheme(exclude, int8_weights))))


def bias_stage(config: QuantConfig, exclude: tuple[str, ...] = (), int8_weights: tuple[str, ...] = (),
               dynamic: tuple[str, ...] = ()) -> str:
    """bias-correction with ``config``'s scheme, or "" when ``config`` turns it off."""
    if not config.bias_correction:
        return ""
    scheme = config.scheme(exclude, int8_weights, dynamic=dynamic)
    return str(registered_passes()["bias-correction"](**dataclasses.asdict(scheme)))


def insert_stage(config: QuantConfig, exclude: tuple[str, ...] = (), int8_weights: tuple[str, ...] = (),
                 bf16: tuple[str, ...] = (), dynamic: tuple[str, ...] = ()) -> str:
    """insert-qdq with ``config``'s scheme; ``exclude``, ``int8_weights`` and ``dynamic`` as for
    ``calibrate_stages``, ``bf16``: those of ``exclude`` that run in bfloat16."""
    scheme = config.scheme(exclude, int8_weights, bf16, dynamic)
    return str(registered_passes()["insert-qdq"](**dataclasses.asdict(scheme)))


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


def float_stages(config: QuantConfig, float_pipeline: str | None = None, ranges: str | None = None) -> str:
    """A float16 model widened to float32 (quantization's arithmetic is float32), transposed
    convolutions as the convolutions they equal (the int8 kernels' form), the float passes
    (``float_pipeline``, or the default ones), then the low-rank factorization, cross-layer
    equalization (after it: it balances the factors too) and SmoothQuant (``smooth_stage``) when
    ``config`` asks for them: the float model that is calibrated and quantized."""
    from .passes import DEFAULT_FLOAT_PIPELINE

    stages = ["widen-float16,conv-transpose-as-conv",
              DEFAULT_FLOAT_PIPELINE if float_pipeline is None else float_pipeline]
    if config.low_rank is not None:
        stages.append(f"factorize-low-rank{{energy={config.low_rank.energy}}}")
    if config.cross_layer_equalization:
        stages.append("equalize-cross-layer")
    stages.append(smooth_stage(config, ranges))
    return ",".join(s for s in stages if s)


def smooth_stage(config: QuantConfig, ranges: str | None = None) -> str:
    """smooth-quant where ``config.smooth_quant`` (resolved: ``QuantConfig.resolved``; with a
    calibration record, whether the record holds smoothing) says so: replaying the factors of
    the record ``ranges`` (what the data chose is part of the record), else searching a
    strength per group; or ""."""
    if not config.smooth_quant:
        return ""
    if ranges is not None:
        return f"smooth-quant{{factors={ranges}}}"
    return str(registered_passes()["smooth-quant"](**dataclasses.asdict(config.scheme()), per_layer=True))


def has_attention(graph: Graph) -> bool:
    """Whether a matmul multiplies two run-time tensors (attention's products: the graph's
    linears read rows that are tokens), after the float passes folded constant operands."""
    from .ir.ops import traits_of

    return any(traits_of(n.op).config_type == "matmul" and len(n.inputs) >= 2
               and not n.inputs[0].is_constant and not n.inputs[1].is_constant for n in graph.nodes)


def quantization_pipeline(config: QuantConfig, float_pipeline: str | None = None, lower: bool = True,
                          exclude: tuple[str, ...] = (), ranges: str | None = None,
                          int8_weights: tuple[str, ...] = (), bf16: tuple[str, ...] = (),
                          dynamic: tuple[str, ...] = ()) -> str:
    """The whole flow as one pipeline string: what ``qcompiler opt -p`` reproduces it with.
    ``ranges``: a calibration record's path, applied instead of calibrating."""
    floats = float_stages(config, float_pipeline, ranges)
    calibrate = calibrate_stages(config, exclude, int8_weights, dynamic, bf16) if ranges is None \
        else f"apply-calibration{{path={ranges}}}"
    stages = [floats, calibrate, insert_stage(config, exclude, int8_weights, bf16, dynamic)]
    if lower:
        stages.append(config.lower_stage())
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
             ranges: str | os.PathLike | None = None, bf16_native: bool | None = None) -> QuantizeResult:
    """Quantize a copy of ``graph`` (which is left untouched) with ``calibration`` batches
    (see ``qcompiler.calibration`` for what they may be), or, instead of data, with ``ranges``:
    a calibration record saved from an earlier run (``result.calibration.save(path)``) on the
    same model. ``on_pass`` is told of each pass before it runs (``PhaseLog.for_pass``).
    ``bf16_native``: whether the build's CPU computes bf16 natively, for ``float_precision="auto"``
    (``compile`` says it of its target; default: this machine has AMX-BF16)."""
    from .cpu_features import has_amx_bf16

    config = config or QuantConfig()
    precision = config.resolved_float_precision(has_amx_bf16() if bf16_native is None else bf16_native)
    if ranges is not None and config.gptq:
        raise QCompilerError("gptq rounds weights on calibration data, which a calibration record does not carry: "
                             "give the calibration data, or turn gptq off")
    if (calibration is None) == (ranges is None):
        raise QCompilerError("quantizing needs calibration data or a saved calibration record (ranges=...): "
                             + ("neither was given" if ranges is None else "give one, not both"))
    saved = CalibrationRecord.load(ranges) if ranges is not None else None
    if saved is not None and config.smooth_quant and not saved.smoothing:
        raise QCompilerError(f"{ranges}: recorded without smooth_quant (a record replays the smoothing its data "
                             f"chose): give the calibration data, or turn smooth_quant off")
    batches = calibration_set(graph, calibration) if calibration is not None else None
    ctx = PassContext(calibration=batches, progress=progress)
    inst = Instruments(emit=lambda s: None, on_pass=on_pass)
    float_graph = run_pipeline(graph.copy(), float_stages(dataclasses.replace(config, smooth_quant=False),
                                                          float_pipeline), inst, ctx)
    config, ctx.report["defaults"] = config.resolved(precision, has_attention(float_graph))
    if saved is not None:  # a record replays the smoothing its data chose, and none where it holds none
        config = dataclasses.replace(config, smooth_quant=bool(saved.smoothing))
        if "smooth_quant" in ctx.report["defaults"]:
            ctx.report["defaults"]["smooth_quant"] = f"{'on' if saved.smoothing else 'off'}: as the calibration " \
                                                     f"record holds it"
    smoothing = smooth_stage(config, None if ranges is None else str(ranges))
    if smoothing:
        float_graph = run_pipeline(float_graph, smoothing, inst, ctx)
    if saved is not None:
        record = saved
        if record.activation_dtype != config.activation_dtype:
            raise QCompilerError(f"{ranges}: calibrated for {record.activation_dtype} activations, and the config "
                                 f"asks for {config.activation_dtype}; recalibrate")
        exclude, int8_weights, bf16 = tuple(record.exclude), tuple(record.int8_weights), tuple(record.bf16)
        dynamic = tuple(record.dynamic)
        qdq = run_pipeline(float_graph.copy(), f"apply-calibration{{path={ranges}}},"
                           f"{insert_stage(config, exclude, int8_weights, bf16, dynamic)}", inst, ctx)
        _explain_exclusions(float_graph, record.exclude, ctx)
    else:
        qdq, record = _calibrate_and_insert(float_graph, config, precision, batches, inst, ctx)
        exclude, int8_weights, bf16 = tuple(record.exclude), tuple(record.int8_weights), tuple(record.bf16)
        dynamic = tuple(record.dynamic)
    ctx.report["float_precision"] = {"config": config.float_precision, "resolved": precision,
                                     "bf16_layers": list(bf16)}
    ctx.report["per_token"] = _per_token_report(qdq, record.dynamic, config)
    if record.int8_weights:
        ctx.report["int8_weights"] = [{"layer": k, "reason": why} for k, why in record.int8_weights.items()]
    final = run_pipeline(qdq.copy(), config.lower_stage(), inst, ctx) if lower else qdq
    for result in {id(g): g for g in (float_graph, qdq, final)}.values():
        result.name_outputs([v.name for v in graph.outputs])  # rewrites replace output values; names stay
    pipeline = quantization_pipeline(config, float_pipeline, lower, exclude, None if ranges is None else str(ranges),
                                     int8_weights, bf16, dynamic)
    return QuantizeResult(final, qdq, float_graph, pipeline, ctx.report, inst.records, record)


def _calibrate_and_insert(float_graph: Graph, config: QuantConfig, precision: str, batches: Any, inst: Instruments,
                          ctx: PassContext) -> tuple[Graph, CalibrationRecord]:
    """Calibrate and insert quantize/dequantize pairs; with ``min_layer_sqnr_db``, layers that
    lose too much even when quantized alone climb their ladder (``_ladder``: int4 weights ->
    int8 weights -> weight-only or float) one step a round; with ``target_output_sqnr_db``, the
    precision search gives int4 layers int8 weights, then keeps more float (or weight-only) until
    the outputs meet it, and where float is bf16 (``precision``) and that falls short, a second
    search moves bf16 layers to float32. Each decision recalibrates (bias correction depends on it)."""
    from .compare import compare

    exclude: dict[str, str] = {}  # layers kept out of int8 (in bf16 where precision is bf16) -> why
    int8_weights: dict[str, str] = {}
    dynamic: dict[str, str] = {}  # linears and matmuls given per-token activation scales -> why
    fp32: dict[str, str] = {}  # of exclude, the layers bf16 could not carry either (the second search's)

    def bf16_layers() -> tuple[str, ...]:
        return tuple(name for name in exclude if name not in fp32) if precision == "bf16" else ()

    def calibrated() -> tuple[Graph | None, Graph, CalibrationRecord]:
        """The graph with ranges only (kept for the precision search), the QDQ graph, the record."""
        kept, int8, bf16, per_token = tuple(exclude), tuple(int8_weights), bf16_layers(), tuple(dynamic)
        ranges = ",".join(s for s in (range_stage(config), search_stage(config, kept, int8, bf16, per_token)) if s)
        graph = run_pipeline(float_graph.copy(), ranges, inst, ctx)
        ranged = graph.copy() if config.target_output_sqnr_db is not None else None
        later = ",".join(s for s in (gptq_stage(config, kept, int8), bias_stage(config, kept, int8, per_token)) if s)
        if later:
            graph = run_pipeline(graph, later, inst, ctx)
        record = CalibrationRecord.measure(float_graph, graph, range_stage(config), config.activation_dtype, exclude,
                                           int8_weights, bf16, dynamic,  # before insert-qdq rewrites it
                                           ctx.decisions.get("smoothing"))
        ctx.report["not_quantized"] = []
        return ranged, run_pipeline(graph, insert_stage(config, kept, int8, bf16, per_token), inst, ctx), record

    ranged, qdq, record = calibrated()
    if config.min_layer_sqnr_db is not None:
        nodes = {n.handle: n for n in float_graph.nodes}
        int4_layers = {n.outputs[0].name for n in float_graph.nodes if config.scheme().int4_groups(n) is not None}
        step: dict[str, int] = {}  # each weak layer's place on its ladder (_ladder)
        per_token_eligible = _per_token_eligible(float_graph, config) if config.per_token_fallback(precision) else set()
        for _ in range(4):
            weak = []  # (layer, its local SQNR, the floor it is under, the field that set the floor)
            for e in compare(float_graph, qdq, batches.first()):
                if e.local_sqnr_db is None or e.handle not in nodes:
                    continue
                floor, floor_name = config.sensitivity_floor(precision, nodes[e.handle].op)
                if e.local_sqnr_db < floor:
                    weak.append((nodes[e.handle].outputs[0].name, e.local_sqnr_db, floor, floor_name))
            moved = per_token_tried = False
            for name, sqnr, floor, floor_name in weak:
                ladder = _ladder(name in int4_layers, config.weight_only_fallback, name in per_token_eligible)
                here = step.get(name, 0)
                if here + 1 >= len(ladder):
                    continue
                step[name], moved = here + 1, True
                was = _LADDER_WORDS[ladder[here]] if name in int4_layers else \
                    " with per-token scales" if ladder[here] == PER_TOKEN else ""
                reason = f"local SQNR {sqnr:.1f} dB{was} < {floor_name} {floor:g}"
                exclude.pop(name, None)
                int8_weights.pop(name, None)
                dynamic.pop(name, None)
                if ladder[here + 1] == PER_TOKEN:
                    dynamic[name] = reason + " with a static scale: per-token scales at run time"
                    per_token_tried = True
                    continue
                to_float, to_int8 = ladder[here + 1]
                if to_float:
                    exclude[name] = reason + (": weight-only (weights quantized, activations float)"
                                              if config.weight_only_fallback else "")
                if to_int8:
                    int8_weights[name] = reason
            if not moved:
                break
            ranged, qdq, record = calibrated()
            if config.weight_dtype != "i4" and not per_token_tried:
                break  # an int8 config decides in one round, and a second after trying per-token scales
    if config.target_output_sqnr_db is not None and config.weight_dtype == "i4":  # int8 weights before float
        found = _search_precision(float_graph, ranged, record, config, batches, tuple(exclude), tuple(int8_weights),
                                  (), inst, ctx, "int8 weights")
        if found.promoted:
            int8_weights |= found.reasons()
            ranged, qdq, record = calibrated()
            found.remeasure(qdq, batches.first())
            ctx.report["int8_weight_search"] = found.report()
    if config.target_output_sqnr_db is not None:
        action = "bf16" if precision == "bf16" else "weight-only" if config.weight_only_fallback else "keeping it float"
        found = _search_precision(float_graph, ranged, record, config, batches, tuple(exclude), tuple(int8_weights),
                                  bf16_layers(), inst, ctx, action)
        if found.promoted:
            exclude |= found.reasons()
            ranged, qdq, record = calibrated()
            found.remeasure(qdq, batches.first())
            ctx.report["precision_search"] = found.report()  # measured on what ships (recalibrated)
        if precision == "bf16" and not found.met and bf16_layers():
            further = _search_precision(float_graph, ranged, record, config, batches, tuple(exclude),
                                        tuple(int8_weights), bf16_layers(), inst, ctx, "float32")
            if further.promoted:
                fp32 |= further.reasons()
                exclude |= further.reasons()
                ranged, qdq, record = calibrated()
                further.remeasure(qdq, batches.first())
                ctx.report["float32_search"] = further.report()
    if exclude:
        _explain_exclusions(float_graph, record.exclude, ctx)
    return qdq, record


def _search_precision(float_graph: Graph, ranged: Graph, record: CalibrationRecord, config: QuantConfig, batches: Any,
                      kept: tuple[str, ...], int8_weights: tuple[str, ...], bf16: tuple[str, ...], inst: Instruments,
                      ctx: PassContext, action: str) -> SearchResult:
    """The precision search (``precision_search.search``) on ``ranged`` (the graph with ranges),
    promoting layers by ``action``: "int8 weights" (an i4 config's layers), "bf16",
    "keeping it float" or "weight-only" (int8 layers out of int8), "float32" (bf16 layers, of
    ``bf16``, to float32); its result goes into the report under the search's key.

    Bias correction measures each layer quantized alone, so a layer's corrected bias depends on
    its own precision only: every choice the search measures takes the record's biases (the
    current precisions), int8-weight ones for layers it moves to int8, the float bias for
    layers it keeps float."""
    from .calibration_record import set_corrected_bias
    from .precision_search import reads_bf16, search
    from .progress import Step

    quiet = Instruments(emit=lambda s: None)
    int8_search = action == "int8 weights"
    int8_biases = record.biases
    if int8_search and config.bias_correction:
        graph = run_pipeline(ranged.copy(), bias_stage(config, kept, ("*",)), quiet, PassContext(calibration=batches))
        int8_biases = CalibrationRecord.measure(float_graph, graph, "", config.activation_dtype, {}).biases

    def insert(promoted: tuple[str, ...]) -> Graph:
        exclude, int8, in_bf16 = kept + promoted, int8_weights, bf16
        if int8_search:
            exclude, int8 = kept, int8_weights + promoted
        elif action == "bf16":
            in_bf16 = bf16 + promoted
        elif action == "float32":
            exclude, in_bf16 = kept, tuple(name for name in bf16 if name not in promoted)
        graph = ranged.copy()
        for node in graph.nodes:
            name = node.outputs[0].name if node.outputs else None
            biases = int8_biases if name in promoted and int8_search else record.biases
            if name in biases and name not in exclude:
                set_corrected_bias(graph, node, np.asarray(biases[name]))
        return run_pipeline(graph, insert_stage(config, exclude, int8, in_bf16, tuple(record.dynamic)), quiet,
                            PassContext())

    key = SEARCH_KEYS[action]
    if inst.on_pass is not None:
        inst.on_pass(Step("precision-search", f"target {config.target_output_sqnr_db:g} dB at the outputs ({action})"))
    eligible = _has_int4_weight if int8_search else reads_bf16 if action == "float32" else None
    found = search(float_graph, insert, batches.first(), config.target_output_sqnr_db, (), ctx.progress, action,
                   eligible)
    ctx.report[key] = found.report()
    return found


SEARCH_KEYS = {"int8 weights": "int8_weight_search", "bf16": "precision_search", "keeping it float": "precision_search",
               "weight-only": "precision_search", "float32": "float32_search"}  # the report's key of each search


_LADDER_WORDS = {(False, False): " with int4 weights", (False, True): " with int8 weights",
                 (True, False): " weight-only with int4 weights", (True, True): " weight-only with int8 weights"}


PER_TOKEN = "per-token"  # a step of _ladder: int8 with per-token activation scales (a linear or matmul)


def _ladder(int4: bool, weight_only: bool, per_token: bool = False) -> list[tuple[bool, bool] | str]:
    """The precisions a layer the sensitivity check finds weak climbs, one per round, as
    (kept float or weight-only, int8 weights), or ``PER_TOKEN``: 4-bit weights -> int8 weights ->
    weight-only with 4-bit weights (its activations were at fault, not its weights) ->
    weight-only with int8 weights; without ``weight_only``, int8 weights -> float. Other layers:
    quantized -> (``per_token``: per-token activation scales ->) float (or weight-only)."""
    if not int4:
        return [(False, False)] + ([PER_TOKEN] if per_token else []) + [(True, False)]
    return [(False, False), (False, True)] + ([(True, False), (True, True)] if weight_only else [(True, True)])


def _per_token_eligible(float_graph: Graph, config: QuantConfig) -> set[str]:
    """The layers the ladder may give per-token scales, in an int8-weight config
    (``insert_qdq.per_token_applies``)."""
    from .passes.insert_qdq import per_token_applies

    if config.weight_dtype != "i8":
        return set()
    return {n.outputs[0].name for n in float_graph.nodes if per_token_applies(n)}


def _per_token_report(qdq: Graph, reasons: dict[str, str], config: QuantConfig) -> list[dict[str, str]]:
    """The linears and matmuls that got per-token activation scales, each with why."""
    layers = []
    for node in qdq.nodes:
        rows = node.inputs[0].producer if node.inputs else None
        if node.op in ("linear", "matmul") and rows is not None and rows.op == "dequantize_rows":
            why = reasons.get(node.outputs[0].name, "QuantConfig.per_token is 'all'"
                              if config.per_token == "all" else "QuantConfig's dynamic layers")
            layers.append({"node": node.describe(), "handle": str(node.handle), "reason": why})
    return layers


def _has_int4_weight(qdq: Graph, node: Any) -> bool:
    """``node`` reads a weight stored 4-bit (what an int8-weight promotion changes)."""
    return any(v.producer is not None and v.producer.op == "dequantize" and v.producer.inputs[0].name in qdq.storage
               for v in node.inputs)


def _explain_exclusions(float_graph: Graph, reasons: dict[str, str], ctx: PassContext) -> None:
    """Layers the sensitivity check kept float are reported with its reason, not as exclusions."""
    by_handle = {str(n.handle): reasons[n.outputs[0].name] for n in float_graph.nodes if n.outputs[0].name in reasons}
    for entry in ctx.report.get("not_quantized", []):
        entry["reason"] = by_handle.get(entry["handle"], entry["reason"])
