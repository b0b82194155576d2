"""The ``qcompiler`` command line. Every error the user can cause prints one line to stderr
and exits non-zero (2 for usage/model errors); nothing the user owns is overwritten
unless they name it as the output."""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from . import artifact
from .errors import QCompilerError

if TYPE_CHECKING:
    from .ir import Graph


def _refuse_overwriting(output: str | os.PathLike | None, *inputs: str | os.PathLike | None) -> None:
    """Output never replaces input: ``output`` (and, for IR text, the ``.npz`` written beside it)
    must not be any of ``inputs`` (nor the ``.npz`` beside an IR input)."""
    if output is None:
        return
    out = Path(output)
    written = {out.resolve()} | ({out.with_suffix(".npz").resolve()} if out.suffix in IR_SUFFIXES else set())
    for given in filter(None, inputs):
        path = Path(given)
        if not path.exists():
            continue
        read = {path.resolve()} | ({path.with_suffix(".npz").resolve()} if path.suffix in IR_SUFFIXES else set())
        if written & read:
            raise QCompilerError(f"{out}: refusing to overwrite the input {path} (outputs never replace inputs)")


IR_SUFFIXES = (".qir", ".mlir", ".txt")


def _phase_log(args: argparse.Namespace):
    """Phase lines on stderr (CI logs see a long compile progress), unless ``--quiet``."""
    from .progress import PhaseLog

    quiet = getattr(args, "quiet", False)
    return PhaseLog(None if quiet else lambda line: print(f"qcompiler: {line}", file=sys.stderr, flush=True))


def _load_model(args: argparse.Namespace, spec: str | None = None) -> "Graph":
    """The model a command names (or ``spec``), with its --input-shape and --input-value (a
    dynamic batch's ``MIN:MAX`` pinned at MIN: data is read in batches of that size; a dynamic
    sequence's at MAX)."""
    from .batching import calibrated_key, from_input_shapes, shapes_at
    from .loading import is_dynamic, load_model, parse_shapes, parse_values

    shapes = parse_shapes(args.input_shape)
    if is_dynamic(shapes):
        if args.func is not _cmd_compile:
            raise QCompilerError("a MIN:MAX dimension in --input-shape applies to compile (other commands take one "
                                 "shape)")
        dims = from_input_shapes(shapes, list(shapes))
        # data is read where calibration runs: the smallest batch, the longest sequence
        shapes = shapes_at(shapes, dims, calibrated_key(dims))
    return load_model(spec or args.model, shapes, parse_values(args.input_value))


def _cmd_import(args: argparse.Namespace) -> int:
    from .ir import print_graph, save

    graph = _load_model(args)
    if args.output:
        out = Path(args.output)
        _refuse_overwriting(out, args.model)
        save(graph, out)
        print(f"wrote {out}" + (f" and {out.with_suffix('.npz')}" if any(a.size > 16 for a in graph.constants.values())
                                else ""), file=sys.stderr)
    else:
        sys.stdout.write(print_graph(graph))
    return 0


def _cmd_stats(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    graph = _load_model(args)
    params = sum(a.size for a in graph.constants.values())
    if args.json:
        print(json.dumps({"nodes": len(graph.nodes), "ops": graph.op_counts(), "constants": len(graph.constants),
                          "constant_elements": int(params)}, indent=2))
        return 0
    table = Table(title=f"{args.model}: {len(graph.nodes)} nodes")
    table.add_column("op")
    table.add_column("count", justify="right")
    for op, count in graph.op_counts().items():
        table.add_row(op, str(count))
    table.caption = f"{len(graph.constants)} constants, {params:,} elements"
    Console().print(table)
    return 0


def _cmd_inspect(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from .inspection import as_dict, plan
    from .quant_config import QuantConfig

    graph = _load_model(args)
    layers = plan(graph, QuantConfig.load(args.config) if args.config else None)
    if args.json:
        print(json.dumps(as_dict(graph, layers), indent=2))
        return 0
    console = Console()
    for kind, values in (("input", graph.inputs), ("output", graph.outputs)):
        for v in values:
            console.print(f"{kind} %{v.name}: {v.type}", highlight=False)
    table = Table(title=f"{args.model}: {len(layers)} layers after the float passes")
    for column in ("value", "op", "source", "output", "int8"):
        table.add_column(column, overflow="fold")
    for layer in layers:
        decision = layer.int8 or f"[yellow]float[/]: {layer.why_not}"
        table.add_row(layer.name, layer.op, layer.source, layer.output, decision)
    console.print(table)
    quantized = sum(1 for layer in layers if layer.int8)
    console.print(f"{quantized} of {len(layers)} layers would run in int8 (calibration may keep more float: "
                  f"compile reports why)", highlight=False)
    return 0


def _cmd_opt(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from .ir import print_graph, save
    from .pass_manager import Instruments, run_pipeline
    from .pipeline import parse_pipeline, registered_passes

    if args.list_passes:
        import dataclasses

        for name, cls in registered_passes().items():
            opts = ", ".join(f"{f.name}={f.default}" for f in dataclasses.fields(cls))
            print(f"{name}{'{' + opts + '}' if opts else ''}: {cls.summary}")
        return 0
    if not args.model or args.pipeline is None:
        raise QCompilerError("opt needs a model and -p PIPELINE (or --list-passes)")
    passes = parse_pipeline(args.pipeline)
    named = {p.name for p in passes}
    for flag, names in (("--print-ir-before", args.print_ir_before), ("--print-ir-after", args.print_ir_after)):
        unknown = sorted(set(names) - named)
        if unknown:
            raise QCompilerError(f"{flag} {', '.join(unknown)}: not a pass of this pipeline "
                                 f"({', '.join(sorted(named))})")
    out = Path(args.output) if args.output else None
    _refuse_overwriting(out, args.model, args.calibration, args.config)
    graph = _load_model(args)
    inst = Instruments(print_before=frozenset(args.print_ir_before), print_after=frozenset(args.print_ir_after),
                       print_after_all=args.print_ir_after_all, print_after_change=args.print_ir_after_change,
                       dump_dir=Path(args.dump_dir) if args.dump_dir else None, verify_each=args.verify_each,
                       bisect_limit=args.bisect_limit, reproducer_dir=Path(args.reproducer_dir),
                       emit=lambda text: print(text, file=sys.stderr))
    from .loading import load_calibration
    from .pipeline import PassContext
    from .quant_config import QuantConfig

    if args.config:  # the config's options go into the pipeline's passes: the string says everything
        from .quantize import with_config

        expanded = with_config(args.pipeline, QuantConfig.load(args.config))
        print(f"pipeline: {expanded}", file=sys.stderr)
        passes = parse_pipeline(expanded)
    ctx = PassContext(calibration=load_calibration(args.calibration, graph) if args.calibration else None,
                      progress=True)
    run_pipeline(graph, passes, inst, ctx)
    for entry in ctx.report.get("kept_float", []):
        print(f"{kept_label(entry)}: {entry['node']}: {entry['reason']}", file=sys.stderr)
    if args.timing:
        table = Table(title="pass timing")
        for col in ("#", "pass", "changed", "ms"):
            table.add_column(col, justify="right" if col in ("#", "ms") else "left")
        for r in inst.records:
            table.add_row(str(r.index + 1), r.name, "yes" if r.changed else "no", f"{r.seconds * 1e3:.2f}")
        Console(stderr=True).print(table)
    if out is not None:
        save(graph, out)
    else:
        sys.stdout.write(print_graph(graph))
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    from rich.console import Console

    from .compare import (compare, first_divergence, pass_divergence, passes_to_json, render_passes, render_search,
                          render_table, to_json, worst)
    from .loading import load_batches, load_calibration
    from .quant_config import QuantConfig
    from .quantize import quantize

    graph = _load_model(args)
    config = QuantConfig.load(args.config) if args.config else QuantConfig()
    if args.target_sqnr is not None and not args.passes:  # with --passes the target marks a pass; no search
        config = dataclasses.replace(config, target_output_sqnr_db=args.target_sqnr)
    config = _precision_options(args, config)
    search = None
    if args.passes and args.quantized:
        raise QCompilerError("--passes replays the quantization pipeline on MODEL: it takes no quantized model")
    if args.quantized:
        if args.target_sqnr is not None:
            raise QCompilerError("--target-sqnr searches while quantizing: it cannot apply to a given quantized model")
        float_graph, quant_graph = graph, _load_model(args, args.quantized)
        if not args.inputs:
            raise QCompilerError("compare with a quantized model needs --inputs")
    else:
        if not args.calibration and not args.synthetic:
            raise QCompilerError("compare needs --calibration data.npz (or --synthetic) to quantize the model (or a "
                                 "second, quantized model)")
        calibration = load_calibration(args.calibration, graph) if args.calibration else _synthetic(args, graph, 8)
        result = quantize(graph, calibration, config, lower=False, progress=not args.json)
        float_graph, quant_graph = result.float_graph, result.qdq_graph
        search = result.report.get("precision_search")
    if args.inputs:
        batch = load_batches(args.inputs, float_graph)[0]
    elif args.calibration:
        batch = load_calibration(args.calibration, float_graph).first()
    else:
        batch = _synthetic(args, float_graph, 1)[0]
    if args.passes:  # the output after each pass of the pipeline that made the quantized model
        lowered = result.pipeline if "lower-integer" in result.pipeline else f"{result.pipeline},{config.lower_stage()}"
        steps = pass_divergence(graph, lowered, batch, calibration)
        culprit = first_divergence(steps, args.target_sqnr)
        if args.json:
            print(json.dumps(passes_to_json(steps, culprit), indent=2))
        else:
            Console().print(render_passes(steps, culprit))
            print(f"first pass below {args.target_sqnr:g} dB: {culprit.name if culprit else 'none'}"
                  if args.target_sqnr is not None else
                  f"the pass that lost the most: {culprit.name if culprit else 'none (exact)'}")
        return 0
    layers = compare(float_graph, quant_graph, batch)
    if args.json:
        print(to_json(layers) if search is None else json.dumps({"layers": json.loads(to_json(layers)),
                                                                "precision_search": search}, indent=2))
    else:
        Console().print(render_table(worst(layers, args.top)))
        outputs = [e for e in layers if e.handle in {v.producer.handle for v in float_graph.outputs if v.producer}]
        for e in outputs:
            print(f"output {e.source or e.op}: SQNR {e.sqnr_db:.1f} dB, cosine {e.cosine:.5f}")
        if search is not None:
            Console().print(render_search(search))
    return 0


GATE_FAILED = 3  # exit status when the model builds but misses --max-accuracy-drop / --min-sqnr


def _predictions(model, batches):
    import numpy as np

    return np.concatenate([np.asarray(model(*b)).reshape(len(b[0]), -1) for b in batches])


def _accuracy(scores, labels) -> float:
    return float((scores.argmax(-1) == labels).mean())


def _cmd_compile(args: argparse.Namespace) -> int:
    from rich.console import Console

    from .compiled import _fidelity
    from .compiled import compile as compile_model
    from .loading import is_dynamic, load_calibration, load_data, load_labels, parse_shapes
    from .quant_config import QuantConfig

    console = Console(stderr=True)
    out = Path(args.output)
    if args.save_ranges:
        _refuse_overwriting(args.save_ranges, args.model, args.calibration, args.eval, args.config, args.ranges)
    for given in (args.model, args.calibration, args.eval, args.config, args.ranges):
        _refuse_overwriting(out, given)
        if given and Path(given).exists() and Path(given).resolve().is_relative_to(out.resolve()):
            raise QCompilerError(f"{out}: holds the input {given}; the artifact goes to its own folder")
    if args.rpc_tracker and not args.tune:
        raise QCompilerError("--rpc-tracker measures tuning candidates: it applies with --tune")
    rpc = _rpc_of(args)  # a malformed address is refused before minutes of compiling
    if args.cpu is not None:  # a typo in the CPU name is found before minutes of compiling
        from .targets.tvm import make_target

        make_target("llvm", arch=args.cpu)
    refusal = artifact.why_not_replaceable(out)
    if refusal:  # checked before minutes of compiling, and again when saving
        raise QCompilerError(f"{out}: {refusal}; refusing to replace it (choose another output folder)")
    if args.target_sqnr is not None and not (args.calibration or args.synthetic):
        raise QCompilerError("--target-sqnr measures the outputs on calibration data: it needs --calibration (or "
                             "--synthetic); a --ranges record already holds the layers an earlier search kept float")
    log = _phase_log(args)
    log.phase("capture", args.model)
    graph = _load_model(args)
    config = QuantConfig.load(args.config) if args.config else None
    if args.target_sqnr is not None:
        config = dataclasses.replace(config or QuantConfig(), target_output_sqnr_db=args.target_sqnr)
    config = _precision_options(args, config)
    given = [flag for flag, value in (("--calibration", args.calibration), ("--synthetic", args.synthetic),
                                      ("--ranges", args.ranges)) if value]
    if len(given) > 1:
        raise QCompilerError(f"{' and '.join(given)}: give one (--ranges replaces calibration data)")
    calibration = load_calibration(args.calibration, graph, args.image_mean, args.image_std) if args.calibration \
        else _synthetic(args, graph, 8) if args.synthetic else None
    if calibration is None and (args.max_accuracy_drop is not None or args.min_sqnr is not None) and not args.eval:
        raise QCompilerError("a gate (--max-accuracy-drop / --min-sqnr) needs --eval or --calibration data")
    if args.save_ranges and calibration is None:
        raise QCompilerError("--save-ranges records what calibration decides: it needs --calibration (or --synthetic)")
    shapes = parse_shapes(args.input_shape)
    dynamic = {"input_shapes": shapes} if is_dynamic(shapes) else {}
    if dynamic and (args.input_value or not args.model.endswith(".onnx")):
        raise QCompilerError("a MIN:MAX dimension in --input-shape applies to an ONNX model without --input-value")
    compiled = compile_model(args.model if dynamic else graph, calibration=calibration, target=args.target,
                             config=config, **dynamic,
                             pipeline=args.pipeline, tune=args.tune, tuning_db=args.tuning_db,
                             tuning_trials=args.tuning_trials, progress=not args.json and not args.quiet,
                             cpu=args.cpu, log=log, ranges=args.ranges, rpc=rpc)
    report = compiled.report()
    gate: dict = {}
    gate_requested = args.max_accuracy_drop is not None or args.min_sqnr is not None
    if gate_requested and not compiled.runs_here:
        raise QCompilerError(f"the gates run the build, and this machine cannot "
                             f"({report.get('note_runs_elsewhere', 'no device for ' + args.target)}): gate it where "
                             f"it runs, or build without --max-accuracy-drop/--min-sqnr")
    float_run = lambda *xs: graph(*xs)[0]  # noqa: E731  the uncompiled float model is the reference
    if args.eval:
        batches = load_data(args.eval, graph, args.image_mean, args.image_std)
        if args.max_accuracy_drop is not None:
            scores_f = _predictions(float_run, batches)
            labels = load_labels(args.eval, samples=len(scores_f), classes=scores_f.shape[-1])
            acc_f, acc_q = _accuracy(scores_f, labels), _accuracy(_predictions(compiled, batches), labels)
            report["accuracy"] = {"float": acc_f, "compiled": acc_q, "drop_points": round(100 * (acc_f - acc_q), 4)}
        check_batch = batches[0]
    else:
        check_batch = None if calibration is None else \
            calibration.first() if hasattr(calibration, "first") else calibration[0]
    if check_batch is not None and (compiled.runs_here or gate_requested):
        report["eval_output_sqnr_db"] = _fidelity(graph, compiled, check_batch)["output_sqnr_db"]
    if args.max_accuracy_drop is not None:
        drop = report["accuracy"]["drop_points"]
        gate["accuracy"] = {"limit_points": args.max_accuracy_drop, "drop_points": drop,
                            "passed": drop <= args.max_accuracy_drop,
                            "margin_points": round(args.max_accuracy_drop - drop, 4)}
    if args.min_sqnr is not None:
        sqnr = report.get("eval_output_sqnr_db")
        passed = sqnr is None or sqnr >= args.min_sqnr  # None: no error at all
        gate["sqnr"] = {"min_db": args.min_sqnr, "sqnr_db": sqnr, "passed": passed,
                        "margin_db": None if sqnr is None else round(sqnr - args.min_sqnr, 3)}
    if gate:
        report["gate"] = gate
    if args.image_mean is not None or args.image_std is not None:  # `run` on images applies the same
        compiled.preprocessing = {"image_mean": args.image_mean, "image_std": args.image_std}
    compiled.annotate({k: report[k] for k in ("accuracy", "eval_output_sqnr_db", "gate") if k in report})
    failed = [k for k, g in gate.items() if not g["passed"]]
    if not failed:  # a build that failed its gate is not an artifact: make must not see it as done
        compiled.save(out)
        report["digest"] = compiled.digest
        if args.save_ranges:
            compiled.save_ranges(args.save_ranges)
    if args.json:
        print(json.dumps(report, indent=2, sort_keys=True))
    else:
        _print_summary(console, report, out, gate, failed, compiled.digest, args.verbose)
    if failed:
        print(f"qcompiler: gate failed: {', '.join(failed)}; no artifact written to {out}", file=sys.stderr)
        return GATE_FAILED
    return 0


def target_label(report: dict) -> str:
    """``llvm (znver3, 2 cores)``, ``cuda (sm_80)``: the target as a person reads it (the full
    TVM target stays in the JSON report)."""

    target = report["target"]
    try:
        spec = json.loads(report["target_spec"])
    except (KeyError, ValueError):
        return {"reference": "reference (the interpreter)", "onnx": "onnx (ONNX Runtime)"}.get(target, target)
    if target == "cuda":
        return f"cuda ({spec.get('arch', '?')})"
    cores = spec.get("num-cores")
    return f"llvm ({spec.get('mcpu', 'generic')}" + (f", {cores} cores)" if cores else ")")


def kept_label(entry: dict) -> str:
    """How an op kept out of int8 runs: "kept bf16" or "kept float" (float32)."""
    return "kept bf16" if entry.get("precision") == "bf16" else "kept float"


def kept_float_groups(kept: list[dict]) -> list[tuple[int, str, str]]:
    """Ops kept float grouped by precision and reason (numbers masked, so one cause is one
    line; a group whose reasons are all the same shows it whole), most first: (count, label,
    reason)."""
    import re
    from collections import Counter

    def key(e: dict) -> tuple[str, str]:
        return kept_label(e), re.sub(r"(?<![A-Za-z_])-?\d+(\.\d+)?(e[-+]?\d+)?", "…", e["reason"])

    counts = Counter(key(e) for e in kept)
    reasons: dict[tuple[str, str], set[str]] = {}
    for e in kept:
        reasons.setdefault(key(e), set()).add(e["reason"])
    return [(n, label, next(iter(reasons[label, masked])) if len(reasons[label, masked]) == 1 else masked)
            for (label, masked), n in counts.most_common()]


def _print_summary(console, report: dict, out: Path, gate: dict, failed: list[str], digest: str | None,
                   verbose: bool) -> None:
    """The compile result as a person reads it: a table, kept-float ops grouped by reason (each
    one with ``-v``), then the pipeline and the digest on lines of their own, never wrapped, so
    they can be copied."""
    from rich.table import Table

    from .compare import format_db

    table = Table(title=f"qcompiler compile -> {out}")
    table.add_column("")
    table.add_column("")
    table.add_row("target", target_label(report))
    table.add_row("quantized", "yes" if report["quantized"] else f"no ({report.get('note', '')})")
    if "int8_kernels" in report and report["quantized"]:
        table.add_row("int8 kernels", report["int8_kernels"]["kernels"] or "[yellow]generic (slow)[/]")
    table.add_row("ops", f"{report['ops']['integer']} integer of {report['ops']['total']}")
    if report["quantized"] and "requantize" in report:
        out_of_int8 = report.get("float_precision", {}).get("resolved", "fp32")
        table.add_row("precision", f"int8 (requantized in {report['requantize']}); layers kept out of int8: "
                                   f"{out_of_int8}")
    widened = report.get("widen_float16", {})
    if widened:
        table.add_row("float16 model", "computed in float32 between its float16 inputs and outputs"
                      if widened.get("widened") else f"kept float16: {widened['refused']}")
    for d in report.get("dynamic", {}).get("dims", []):
        kind = "batch" if d["axis"] == 0 else "sequence"
        checked = d.get("per_sample_exact", d.get("padding_max_relative_error"))
        table.add_row(kind, f"any of {d['min']}..{d['max']} ('{d['name']}'): built at "
                            f"{', '.join(map(str, d['buckets']))}, padded up to the next"
                      + ("" if checked is None else
                         f"; padding changes real positions by {checked:.1g} (relative)" if kind == "sequence" else
                         "; per sample exact" if checked else "; per sample within float rounding"))
    bf16 = sum(1 for e in report["kept_float"] if e.get("precision") == "bf16")
    table.add_row("kept float", str(len(report["kept_float"])) + (f" ({bf16} in bf16)" if bf16 else ""))
    if report.get("per_token"):
        table.add_row("per-token int8", f"{len(report['per_token'])} linears/matmuls (activation scales computed at "
                                        f"run time, one per row)")
    if "smooth_quant" in report:
        groups = report["smooth_quant"]["groups"]
        why = report.get("defaults", {}).get("smooth_quant", "asked for")
        table.add_row("SmoothQuant", f"{sum(g['alpha'] is not None for g in groups)} of {len(groups)} linear groups "
                                     f"smoothed ({why})")
    if "low_rank" in report:
        factored = report["low_rank"]["layers"]
        table.add_row("low-rank", f"{len(factored)} layers factored at energy {report['low_rank']['energy']:g}: "
                                  f"{sum(e['params_before'] for e in factored)} -> "
                                  f"{sum(e['params_after'] for e in factored)} weights"
                                  + (f"; {len(report['low_rank']['left_alone'])} left alone (no saving)"
                                     if report["low_rank"]["left_alone"] else ""))
    if "cross_layer_equalization" in report:
        equalized = report["cross_layer_equalization"]
        table.add_row("equalized", f"{len(equalized['pairs'])} layer pairs (cross-layer equalization)"
                      + (f"; {len(equalized['blocked'])} left alone (a clip between them)" if equalized["blocked"]
                         else ""))
    if "range_search" in report:
        searched = report["range_search"]
        table.add_row("range search", f"{len(searched['changed'])} of {searched['values_tried']} activations took "
                                      f"another estimator's range (output SQNR "
                                      f"{searched['output_sqnr_db']['calibrated']:g} -> "
                                      f"{searched['output_sqnr_db']['searched']:g} dB, {searched['measured_on']})")
    if report.get("int4_weights") or report.get("int8_weights"):  # an i4 build, even one the search moved to int8
        table.add_row("4-bit weights", f"{report.get('int4_weights', 0)} layers"
                      + (f"; {len(report['int8_weights'])} kept int8 weights" if report.get("int8_weights") else ""))
    if "gptq" in report:
        layers = report["gptq"]["layers"]
        ratios = sorted(e["error_vs_nearest"] for e in layers if e["rounding"] == "gptq")
        table.add_row("gptq", f"{len(ratios)} of {len(layers)} layers rounded"
                      + (f"; output error {ratios[len(ratios) // 2]:.2f}x rounding to nearest's (median, on the "
                         f"calibration rows)" if ratios else "")
                      + (f"; {len(layers) - len(ratios)} rounded to nearest (GPTQ did worse on held-out "
                         f"calibration rows)" if len(ratios) < len(layers) else ""))
    if "int8_weight_search" in report:
        found = report["int8_weight_search"]
        table.add_row("int8-weight search", f"output SQNR {format_db(found['before_db'])} -> "
                                            f"{format_db(found['after_db'])} (target {found['target_output_sqnr_db']:g} "
                                            f"dB), {sum(len(p['nodes']) for p in found['promoted'])} layers given int8 "
                                            f"weights")
    if report.get("tuning", {}).get("trials"):
        tuning = report["tuning"]
        place = tuning["measured_on"]
        where = "here" if place == "local" else \
            f"{len(place['servers'])} server(s) of key '{place['key']}' at tracker {place['tracker']}"
        table.add_row("tuning", f"{tuning['trials']} candidates for {tuning['tasks_tuned']} kernels measured on "
                                f"{where}; {tuning['kernels_from_database']} kernels use a tuned schedule")
    if "precision_search" in report:
        found = report["precision_search"]
        colour = "green" if found["met"] else "yellow"
        table.add_row("precision search", f"[{colour}]output SQNR {format_db(found['before_db'])} -> "
                                          f"{format_db(found['after_db'])}[/] (target "
                                          f"{found['target_output_sqnr_db']:g} dB), "
                                          f"{sum(len(p['nodes']) for p in found['promoted'])} promoted for it ({found.get('action', 'kept float')})")
    size = report["size_bytes"]
    table.add_row("weights", f"{size['float'] / 1e6:.2f} MB -> {size['compiled'] / 1e6:.2f} MB")
    if "accuracy" in report:
        acc = report["accuracy"]
        table.add_row("accuracy", f"float {acc['float']:.4f}, compiled {acc['compiled']:.4f} "
                                  f"(drop {acc['drop_points']:.2f} points)")
    if report.get("eval_output_sqnr_db") is not None:
        table.add_row("output SQNR", f"{report['eval_output_sqnr_db']:.1f} dB")
    for name, g in gate.items():
        table.add_row(f"gate: {name}", "[green]passed[/]" if g["passed"] else "[red]FAILED[/]")
    if "note_runs_elsewhere" in report:
        table.add_row("runs", f"[yellow]not here[/]: {report['note_runs_elsewhere']}")
    table.add_row("compile time", f"{report['compile_seconds']:.1f} s")
    if failed:
        table.add_row("artifact", "[red]not written[/] (gate failed)")
    console.print(table)
    if verbose:
        for entry in report["kept_float"]:
            console.print(f"{kept_label(entry)}: {entry['node']}: {entry['reason']}", highlight=False)
    elif report["kept_float"]:
        for count, label, reason in kept_float_groups(report["kept_float"]):
            console.print(f"{label}: {count} x {reason}", highlight=False)
        console.print("(-v lists each op)", highlight=False)
    if "warning" in report.get("int8_kernels", {}):
        console.print(f"warning: {report['int8_kernels']['warning']}", highlight=False)
    print(f"pipeline: {report['pipeline']}", file=sys.stderr)  # plain print: rich would wrap it mid-word
    if digest:  # whole, on its own line: a deployer copies it into `run --expect-digest`
        print(f"digest: {digest}", file=sys.stderr)


def _cmd_run(args: argparse.Namespace) -> int:
    import numpy as np

    from .compiled import load
    from .loading import load_data

    if args.expect_outputs:
        _refuse_overwriting(args.output, args.expect_outputs)
    if args.output:
        if not args.output.endswith(".npz"):
            raise QCompilerError(f"{args.output}: run writes an .npz (name it NAME.npz)")
        _refuse_overwriting(args.output, args.inputs)
        if Path(args.output).resolve().is_relative_to(Path(args.artifact).resolve()):
            raise QCompilerError(f"{args.output}: inside the artifact {args.artifact}; write outputs elsewhere")
    if bool(args.inputs) == bool(args.synthetic):
        raise QCompilerError("run needs --inputs data.npz|folder or --synthetic (one of them)")
    model = load(args.artifact, expect_digest=args.expect_digest)
    if args.synthetic:
        batches = _synthetic(args, model.graph, 1)
    else:
        images = Path(args.inputs).is_dir()  # the artifact's image normalization applies to image folders
        prep = model.preprocessing if images else {}
        # a dynamic sequence's data may have any length in its range (shapes checked against the longest bucket)
        batches = load_data(args.inputs, _longest_bucket_graph(model), prep.get("image_mean"), prep.get("image_std"),
                            _sequence_lengths(model))
    dims = getattr(model, "dims", ())
    spec = next((d for d in dims if d.is_batch), None)  # a dynamic batch: samples run together, up to its max
    if spec is not None:
        batches = _regrouped(batches, spec)
    outputs = [model(*batch) for batch in batches]
    names = [v.name for v in model.graph.outputs]
    join = np.concatenate if spec is not None else np.stack  # dynamic: one array of all samples' outputs
    stacked = {name: join([o if len(names) == 1 else o[i] for o in outputs]) for i, name in enumerate(names)}
    if args.output:
        np.savez(args.output, **stacked)
    golden = _against_golden(stacked, args.expect_outputs, args.atol) if args.expect_outputs else {}
    if args.json:
        print(json.dumps({"digest": model.digest, "batches": len(batches), "written": args.output,
                          "outputs": {name: {"shape": list(a.shape[1:]), "dtype": str(a.dtype), **golden.get(name, {})}
                                      for name, a in stacked.items()}}, indent=2))
    else:
        for name, array in stacked.items():
            check = golden.get(name)
            count = f"{len(array)} sample(s)" if spec is not None else f"{len(batches)} batch(es)"
            print(f"{name}: {count} of {list(array.shape[1:])} {array.dtype}" +
                  (f"; max |difference| from {args.expect_outputs}: {check['max_abs_difference']:.3g} "
                   f"({'within' if check['matches'] else 'BEYOND'} --atol {args.atol:g})" if check else ""))
    failed = [name for name, check in golden.items() if not check["matches"]]
    if failed:
        print(f"qcompiler: outputs differ from {args.expect_outputs}: {', '.join(failed)}", file=sys.stderr)
        return GATE_FAILED
    return 0


def _longest_bucket_graph(model) -> "Graph":
    from .batching import calibrated_key

    dims = getattr(model, "dims", ())
    return model.builds[calibrated_key(dims)].graph if any(not d.is_batch for d in dims) else model.graph


def _sequence_lengths(model) -> dict[int, dict[int, tuple[int, int]]]:
    """Input position -> {axis: (min, max)} of each dynamic sequence of ``model`` (none for a static build)."""
    lengths: dict[int, dict[int, tuple[int, int]]] = {}
    for d in getattr(model, "dims", ()):
        if not d.is_batch:
            for position in d.inputs:
                lengths.setdefault(position, {})[d.axis] = (d.min, d.max)
    return lengths


def _regrouped(batches: list[list], spec) -> list[list]:
    """Batches of the smallest bucket joined into batches of up to the range's maximum."""
    import numpy as np

    step = max(spec.max // spec.min, 1)
    return [[np.concatenate([b[p] for b in batches[i:i + step]]) if p in spec.inputs else a
             for p, a in enumerate(batches[i])] for i in range(0, len(batches), step)]


def _against_golden(outputs: dict, path: str, atol: float) -> dict[str, dict]:
    """Each output against the same-named array of a golden ``.npz`` (a ``run -o`` file)."""
    import numpy as np

    from .loading import _array, _open_npz

    result = {}
    with _open_npz(Path(path)) as golden:
        for name, array in outputs.items():
            if name not in golden.files:
                raise QCompilerError(f"{path}: no array '{name}' (it holds {golden.files}); write golden outputs "
                                     f"with run -o")
            expected = _array(golden, name, Path(path))
            if expected.shape != array.shape:
                raise QCompilerError(f"{path}: '{name}' has shape {list(expected.shape)}, the outputs "
                                     f"{list(array.shape)} (same inputs?)")
            diff = float(np.max(np.abs(array.astype(np.float64) - expected.astype(np.float64)), initial=0.0))
            result[name] = {"max_abs_difference": diff, "matches": bool(diff <= atol)}
    return result


def _cmd_show(args: argparse.Namespace) -> int:
    from .show import render_html

    _refuse_overwriting(args.output, args.model, args.compare)
    graph = _load_model(args)
    errors = None
    if args.compare:
        try:
            errors = {int(e["handle"]): e for e in json.loads(Path(args.compare).read_text())}
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise QCompilerError(f"{args.compare}: not a compare JSON ({e})") from None
    out = Path(args.output)
    out.write_text(render_html(graph, errors, title=Path(args.model).name))
    print(f"wrote {out}", file=sys.stderr)
    return 0


EXIT_CODES = """exit codes:
  0  done
  1  a bug in qcompiler (internal error; QCOMPILER_DEBUG=1 shows the traceback)
  2  an error the input causes (one line on stderr: what and where)
  3  compile: the build missed a gate (--max-accuracy-drop / --min-sqnr); no artifact written
     run: the outputs differ from --expect-outputs beyond --atol"""


def _version() -> str:
    from importlib import metadata

    from . import __version__

    def of(package: str) -> str:
        try:
            return metadata.version(package)
        except metadata.PackageNotFoundError:
            return "not installed"

    return (f"qcompiler {__version__} (TVM {of('apache-tvm')}, torch {of('torch')}, onnx {of('onnx')}, "
            f"onnxruntime {of('onnxruntime')})")


def _rpc_args(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--rpc-tracker", metavar="HOST:PORT", help=f"TVM's RPC tracker: {what} (with --rpc-key)")
    p.add_argument("--rpc-key", metavar="KEY", help="the key the tracker's servers registered under (rpc_server --key)")


def _rpc_of(args: argparse.Namespace):
    """The :class:`RPC` address of --rpc-tracker and --rpc-key (both or neither)."""
    from .rpc import RPC

    if bool(args.rpc_tracker) != bool(args.rpc_key):
        raise QCompilerError("--rpc-tracker and --rpc-key go together: the tracker's address and the servers' key")
    return RPC(args.rpc_tracker, args.rpc_key) if args.rpc_tracker else None


def _cmd_bench(args: argparse.Namespace) -> int:
    from .benchmark import bench
    from .loading import load_data

    rpc = _rpc_of(args)
    if args.inputs and args.synthetic:
        raise QCompilerError("--inputs and --synthetic: give one (without either, bench uses synthetic inputs)")

    def inputs(graph) -> list:
        return load_data(args.inputs, graph)[0] if args.inputs else _synthetic(args, graph, 1)[0]

    result = bench(args.artifact, inputs, iterations=args.iterations, warmup=args.warmup, rpc=rpc,
                   expect_digest=args.expect_digest)
    summary = result.to_dict()
    beyond = {name: d for name, d in summary["max_abs_diff_vs_reference"].items()
              if args.atol is not None and not d <= args.atol}
    if args.json:
        print(json.dumps({**summary, "inputs": args.inputs or f"synthetic (seed {args.seed})"}, indent=2))
    else:
        _print_bench(summary, args, rpc)
    if beyond:
        print(f"qcompiler: outputs differ from the reference interpreter beyond --atol {args.atol:g}: "
              + ", ".join(f"{name} (max |difference| {d:.3g})" for name, d in beyond.items()), file=sys.stderr)
        return GATE_FAILED
    return 0


def _print_bench(summary: dict, args: argparse.Namespace, rpc) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    latency = summary["latency_ms"]
    table = Table(title=f"qcompiler bench {args.artifact}")
    table.add_column("")
    table.add_column("")
    table.add_row("ran on", "this machine" if rpc is None else f"a server of {rpc}")
    table.add_row("target", summary["target"])
    table.add_row("timed", f"{summary['iterations']} calls after {args.warmup} warm-up: {summary['timed']}")
    table.add_row("latency", f"min {latency['min']:.3f} ms, median {latency['median']:.3f} ms, "
                             f"p90 {latency['p90']:.3f} ms")
    rate = summary["throughput"]
    table.add_row("throughput", f"{rate['calls_per_s']:.1f} calls/s" +
                  (f" = {rate['samples_per_s']:.1f} samples/s (batch {summary['batch']})" if rate["samples_per_s"]
                   else ""))
    for name, d in summary["max_abs_diff_vs_reference"].items():
        table.add_row(f"output {name}", "bit-exact with the reference interpreter" if d == 0 else
                      f"max |difference| from the reference interpreter {d:.3g}")
    console.print(table)
    if summary["profile"]:
        kernels = Table(title=f"per-kernel profile (each kernel alone; top {args.top})")
        for column in ("kernel", "calls", "ms", "share"):
            kernels.add_column(column, justify="left" if column == "kernel" else "right")
        for k in summary["profile"][:args.top]:
            kernels.add_row(k["kernel"], str(k["calls"]), f"{k['ms']:.3f}", f"{100 * k['share']:.1f} %")
        console.print(kernels)
    elif summary["profile_note"]:
        console.print(summary["profile_note"], highlight=False)


def _synthetic(args: argparse.Namespace, graph, count: int) -> list[list]:
    from .loading import parse_val_range, synthetic_batches

    return synthetic_batches(graph, count, args.seed, parse_val_range(args.val_range))


def _float_precision_arg(p: argparse.ArgumentParser, auto: str) -> None:
    from .quant_config import PER_TOKEN_MODES

    p.add_argument("--float-precision", choices=["auto", "bf16", "fp32"],
                   help=f"precision of the conv/linear/matmul layers kept out of int8 (QuantConfig.float_precision; "
                        f"default auto: bf16 or fp32 {auto})")
    p.add_argument("--per-token", choices=list(PER_TOKEN_MODES),
                   help="per-token int8 activation scales computed at run time for linears and matmuls (QuantConfig."
                        "per_token): 'fallback' for those a static scale cannot carry, 'all', 'off'; default "
                        "auto: where the layers kept out of int8 would run fp32, 'all' on a graph with attention "
                        "(with SmoothQuant) and 'fallback' elsewhere; 'off' where they run bf16")


def _precision_options(args: argparse.Namespace, config):
    """``config`` (None: the default) with the precision flags given on the command line."""
    from .quant_config import QuantConfig

    changes = {k: v for k, v in (("float_precision", args.float_precision),
                                 ("per_token", args.per_token)) if v is not None}
    return dataclasses.replace(config or QuantConfig(), **changes) if changes else config


def _synthetic_args(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--synthetic", action="store_true", help=f"random {what} instead of data (smoke runs; "
                                                            f"accuracy on them means nothing)")
    p.add_argument("--seed", type=int, default=0, help="the random generator's seed for --synthetic (default 0)")
    p.add_argument("--val-range", default="0,1", metavar="LOW,HIGH",
                   help="--synthetic values: floats uniform in [LOW, HIGH), integers over its whole numbers "
                        "(a negative LOW: --val-range=-1,1)")


def _command(sub, name: str, **kwargs) -> argparse.ArgumentParser:
    """A subcommand whose --help ends with the exit codes."""
    return sub.add_parser(name, epilog=EXIT_CODES, formatter_class=argparse.RawDescriptionHelpFormatter, **kwargs)


def _positive(text: str) -> int:
    """A whole number >= 1 (argparse's ``type``)."""
    value = _count(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def _count(text: str) -> int:
    """A whole number >= 0 (argparse's ``type``)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text} is negative")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qcompiler", description="A quantizing model compiler.", epilog=EXIT_CODES,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", required=True)

    def model_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("model", help="model.onnx, model.qir, or package.module:function")
        input_args(p)

    def input_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--input-shape", action="append", default=[], metavar="NAME=D0,D1,...",
                       help="fix a dynamic ONNX input's shape (repeatable); for compile, a dimension may be MIN:MAX: "
                            "D0 a dynamic batch, another a dynamic sequence (one build per bucket, any size in "
                            "range at run time; `run` reads data of any length in it)")
        p.add_argument("--input-value", action="append", default=[], metavar="NAME=V0,V1,...",
                       help="fix the value of an ONNX input that gives a shape, axes or sizes: it becomes a "
                            "constant and is no longer an input (repeatable)")

    p = _command(sub, "import", help="capture a model and print (or save) its IR")
    model_args(p)
    p.add_argument("-o", "--output", help="write IR text here (weights to the same name with .npz)")
    p.set_defaults(func=_cmd_import)
    p = _command(sub, "opt", help="run a pass pipeline over a model, with IR printing, dumps, timing, bisect")
    p.add_argument("model", nargs="?", help="model.onnx, model.qir, or package.module:function")
    input_args(p)
    p.add_argument("-p", "--pipeline", help="e.g. 'fold-constants,fold-batchnorm,eliminate-dead-code'")
    p.add_argument("-o", "--output", help="write the result here (IR text + .npz); default: print it")
    p.add_argument("--print-ir-before", action="append", default=[], metavar="PASS",
                   help="print the IR before each run of this pass, to stderr (repeatable)")
    p.add_argument("--print-ir-after", action="append", default=[], metavar="PASS",
                   help="print the IR after each run of this pass, to stderr (repeatable)")
    p.add_argument("--print-ir-after-all", action="store_true", help="print the IR after every pass")
    p.add_argument("--print-ir-after-change", action="store_true",
                   help="print the IR after every pass that changed it")
    p.add_argument("--dump-dir", help="write numbered, re-parseable IR files after every pass")
    p.add_argument("--timing", action="store_true", help="per-pass wall time")
    p.add_argument("--verify-each", action=argparse.BooleanOptionalAction, default=True,
                   help="verify the IR after every pass (default: on)")
    p.add_argument("--bisect-limit", type=_count, metavar="N", help="run only the first N pass applications")
    p.add_argument("--reproducer-dir", default=".", help="where a failing pass's input IR is written")
    p.add_argument("--list-passes", action="store_true", help="list the passes with their options, and exit")
    p.add_argument("--calibration", metavar="DATA",
                   help=".npz, folder, or package.module:function of calibration batches (range-analysis, "
                        "bias-correction, smooth-quant)")
    p.add_argument("--config", help="QuantConfig as JSON (or YAML): its options are written into the pipeline's "
                                    "passes where the pipeline leaves them at their defaults (printed)")
    p.set_defaults(func=_cmd_opt)
    p = _command(sub, "compare", help="per-layer error of the quantized model against the float one")
    model_args(p)
    p.add_argument("quantized", nargs="?", help="an already quantized model (IR file); default: quantize MODEL")
    p.add_argument("--calibration", metavar="DATA",
                   help=".npz (arrays named like the inputs), folder, or package.module:function of calibration "
                        "batches")
    p.add_argument("--inputs", help=".npz with the batch to compare on (default: the first calibration batch)")
    p.add_argument("--config", help="QuantConfig as JSON (or YAML)")
    p.add_argument("--top", type=int, default=15, help="rows in the table of worst layers")
    p.add_argument("--target-sqnr", type=float, metavar="DB",
                   help="run the precision search: the layers whose float form brings every output (and each of its "
                        "channel groups) to this SQNR, with what each gained (--json: an object with 'layers' and "
                        "'precision_search')")
    _float_precision_arg(p, "as a build for this machine's CPU would")
    p.add_argument("--passes", action="store_true",
                   help="replay the quantization pipeline pass by pass and print the outputs' SQNR after each: the "
                        "first pass below --target-sqnr (or the one that lost the most)")
    p.add_argument("--json", action="store_true",
                   help="print every layer's numbers as JSON on stdout (for `show --compare`), not the table")
    _synthetic_args(p, "calibration and comparison inputs")
    p.set_defaults(func=_cmd_compare)
    from .compiled import DEFAULT_TUNING_TRIALS

    p = _command(sub, "compile", help="quantize and build a model into a deployment artifact")
    model_args(p)
    p.add_argument("-o", "--output", required=True, help="artifact folder (replaced only when complete)")
    p.add_argument("--calibration", metavar="DATA",
                   help=".npz, a folder of .npy arrays or images, or package.module:function (a data loader "
                        "returning or yielding batches); without it (or --ranges): a float build")
    p.add_argument("--save-ranges", metavar="FILE",
                   help="also write what calibration decided (ranges, corrected biases, layers kept float) as JSON")
    p.add_argument("--ranges", metavar="FILE",
                   help="quantize with a record written by --save-ranges instead of calibrating (same model)")
    p.add_argument("--target", default="llvm", choices=["llvm", "cuda", "reference", "onnx"],
                   help="llvm: this CPU via TVM; cuda; reference: the interpreter; onnx: a QDQ ONNX model")
    p.add_argument("--cpu", metavar="NAME",
                   help="build for this CPU (an LLVM name: znver4, icelake-server, ...), not this machine's")
    p.add_argument("--config", help="QuantConfig as JSON (or YAML)")
    p.add_argument("-p", "--pipeline", help="run this pipeline instead of the default quantization flow")
    p.add_argument("--tune", action="store_true",
                   help="tune the kernels without hand-written schedules with MetaSchedule (slow: minutes)")
    p.add_argument("--tuning-db", metavar="DIR",
                   help="tuning records: reused when present, added to with --tune (a directory)")
    p.add_argument("--tuning-trials", type=int, default=DEFAULT_TUNING_TRIALS, metavar="N",
                   help=f"measured candidates over all tuned kernels (default {DEFAULT_TUNING_TRIALS})")
    _rpc_args(p, "--tune measures candidates on the servers registered there (builds them here)")
    p.add_argument("--eval", help=".npz with inputs (and 'labels' for --max-accuracy-drop) to check the build on")
    p.add_argument("--max-accuracy-drop", type=float, metavar="POINTS",
                   help="gate: fail (exit 3) when accuracy drops by more than this many percentage points")
    p.add_argument("--min-sqnr", type=float, metavar="DB", help="gate: fail (exit 3) when output SQNR is lower")
    p.add_argument("--target-sqnr", type=float, metavar="DB",
                   help="precision search: keep the fewest layers float that bring every output (and each of its "
                        "channel groups) to this SQNR on the calibration data (QuantConfig.target_output_sqnr_db)")
    _float_precision_arg(p, "as the build's CPU has AMX-BF16 or not")
    p.add_argument("--image-mean", type=float, nargs=3, metavar="M", help="normalize calibration/eval images")
    p.add_argument("--image-std", type=float, nargs=3, metavar="S",
                   help="divide calibration/eval images by this per channel (after the mean); run applies it too")
    p.add_argument("--json", action="store_true", help="print the report as JSON on stdout")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress: neither phase lines nor bars on stderr")
    p.add_argument("-v", "--verbose", action="store_true", help="list every op kept float with its reason")
    _synthetic_args(p, "calibration batches (8)")
    p.set_defaults(func=_cmd_compile)
    p = _command(sub, "run", help="run a compiled artifact on inputs from an .npz (or a folder)")
    p.add_argument("artifact", help="an artifact folder written by `qcompiler compile` (loading runs its code)")
    p.add_argument("--inputs", help=".npz with one array per input (or a folder of .npy/images)")
    p.add_argument("-o", "--output", help="write the outputs to this .npz")
    p.add_argument("--expect-digest", metavar="sha256:HEX",
                   help="refuse the artifact unless its digest (printed by compile) is this one")
    p.add_argument("--expect-outputs", metavar="GOLDEN.npz",
                   help="compare the outputs with golden ones (a run -o file); exit 3 when they differ beyond --atol")
    p.add_argument("--atol", type=float, default=0.0,
                   help="largest absolute difference --expect-outputs accepts (default 0: bit for bit)")
    p.add_argument("--json", action="store_true", help="print what ran (outputs' shapes and dtypes) as JSON on stdout")
    _synthetic_args(p, "inputs (one batch)")
    p.set_defaults(func=_cmd_run)
    p = _command(sub, "bench", help="latency and throughput of an artifact, here or on a device behind an RPC "
                                    "tracker, checked against the reference interpreter (as trtexec)")
    p.add_argument("artifact", help="an artifact folder written by `qcompiler compile` (loading runs its code)")
    p.add_argument("--inputs", help=".npz with one array per input, or a folder (default: synthetic inputs)")
    p.add_argument("--iterations", type=_positive, default=100, metavar="N", help="timed calls (default 100)")
    p.add_argument("--warmup", type=_count, default=10, metavar="N", help="untimed calls first (default 10)")
    _rpc_args(p, "run the artifact on a server registered there instead of here")
    p.add_argument("--expect-digest", metavar="sha256:HEX", help="refuse the artifact unless its digest is this one")
    p.add_argument("--atol", type=float, metavar="X",
                   help="gate: exit 3 when an output differs from the reference interpreter by more than X")
    p.add_argument("--top", type=int, default=10, help="rows of the per-kernel profile (default 10)")
    p.add_argument("--json", action="store_true", help="print every number (and the whole profile) as JSON")
    _synthetic_args(p, "inputs (the default without --inputs)")
    p.set_defaults(func=_cmd_bench)
    p = _command(sub, "show", help="the graph as a self-contained HTML picture")
    model_args(p)
    p.add_argument("-o", "--output", default="graph.html", help="the HTML file to write (default graph.html)")
    p.add_argument("--compare", help="JSON from `qcompiler compare --json`: colour nodes by quantization error")
    p.set_defaults(func=_cmd_show)
    p = _command(sub, "inspect", help="inputs, outputs, layers with shapes, and what would be quantized and why not")
    model_args(p)
    p.add_argument("--config", help="QuantConfig as JSON (or YAML): decide as this config would")
    p.add_argument("--json", action="store_true", help="print it as JSON on stdout")
    p.set_defaults(func=_cmd_inspect)
    p = _command(sub, "stats", help="op counts of a model")
    model_args(p)
    p.add_argument("--json", action="store_true", help="print the counts as JSON on stdout")
    p.set_defaults(func=_cmd_stats)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except QCompilerError as e:
        print(f"qcompiler: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # unreadable input, unwritable output, full disk
        print(f"qcompiler: error: {e.filename or ''}{': ' if e.filename else ''}{e.strerror or e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("qcompiler: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # a bug in qcompiler: still one line, the traceback on request
        if os.environ.get("QCOMPILER_DEBUG"):
            raise
        first = (str(e).strip().splitlines() or [""])[0]
        print(f"qcompiler: internal error: {type(e).__name__}: {first} (set QCOMPILER_DEBUG=1 for the traceback; "
              f"please report it)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
