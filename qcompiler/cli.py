"""The ``qcompiler`` command line. Every error the user can cause prints one line to stderr
and exits non-zero (2 for usage/model errors); nothing the user owns is overwritten
unless they name it as the output."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .errors import QCompilerError


def _cmd_import(args: argparse.Namespace) -> int:
    from .ir import print_graph, save
    from .loading import load_model, parse_shapes

    graph = load_model(args.model, parse_shapes(args.input_shape))
    if args.output:
        out = Path(args.output)
        if out.resolve() == Path(args.model).resolve():
            raise QCompilerError(f"{out}: refusing to overwrite the input model")
        save(graph, out)
        print(f"wrote {out}" + (f" and {out.with_suffix('.npz')}" if any(a.size > 16 for a in graph.constants.values())
                                else ""), file=sys.stderr)
    else:
        sys.stdout.write(print_graph(graph))
    return 0


def _cmd_stats(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from .loading import load_model, parse_shapes

    graph = load_model(args.model, parse_shapes(args.input_shape))
    table = Table(title=f"{args.model}: {len(graph.nodes)} nodes")
    table.add_column("op")
    table.add_column("count", justify="right")
    for op, count in graph.op_counts().items():
        table.add_row(op, str(count))
    params = sum(a.size for a in graph.constants.values())
    table.caption = f"{len(graph.constants)} constants, {params:,} elements"
    Console().print(table)
    return 0


def _cmd_opt(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from .ir import print_graph, save
    from .loading import load_model, parse_shapes
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
    graph = load_model(args.model, parse_shapes(args.input_shape))
    out = Path(args.output) if args.output else None
    if out is not None and out.resolve() == Path(args.model).resolve():
        raise QCompilerError(f"{out}: refusing to overwrite the input model")
    inst = Instruments(print_before=frozenset(args.print_ir_before), print_after=frozenset(args.print_ir_after),
                       print_after_all=args.print_ir_after_all, print_after_change=args.print_ir_after_change,
                       dump_dir=Path(args.dump_dir) if args.dump_dir else None, verify_each=args.verify_each,
                       bisect_limit=args.bisect_limit, reproducer_dir=Path(args.reproducer_dir),
                       emit=lambda text: print(text, file=sys.stderr))
    from .loading import load_batches
    from .pipeline import PassContext
    from .quant_config import QuantConfig

    ctx = PassContext(calibration=load_batches(args.calibration, graph) if args.calibration else None,
                      config=QuantConfig.load(args.config) if args.config else None, progress=True)
    run_pipeline(graph, passes, inst, ctx)
    for entry in ctx.report.get("kept_float", []):
        print(f"kept float: {entry['node']}: {entry['reason']}", file=sys.stderr)
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

    from .compare import compare, render_table, to_json, worst
    from .loading import load_batches, load_model, parse_shapes
    from .quant_config import QuantConfig
    from .quantize import quantize

    graph = load_model(args.model, parse_shapes(args.input_shape))
    config = QuantConfig.load(args.config) if args.config else QuantConfig()
    if args.quantized:
        float_graph, quant_graph = graph, load_model(args.quantized, parse_shapes(args.input_shape))
        if not args.inputs:
            raise QCompilerError("compare with a quantized model needs --inputs")
    else:
        if not args.calibration:
            raise QCompilerError("compare needs --calibration data.npz to quantize the model (or a second, "
                                 "quantized model)")
        result = quantize(graph, load_batches(args.calibration, graph), config, lower=False,
                          progress=not args.json)
        float_graph, quant_graph = result.float_graph, result.qdq_graph
    batch = load_batches(args.inputs or args.calibration, float_graph)[0]
    layers = compare(float_graph, quant_graph, batch)
    if args.json:
        Path(args.json).write_text(to_json(layers)) if args.json != "-" else print(to_json(layers))
    if args.json != "-":
        Console().print(render_table(worst(layers, args.top)))
        outputs = [e for e in layers if e.handle in {v.producer.handle for v in float_graph.outputs if v.producer}]
        for e in outputs:
            print(f"output {e.source or e.op}: SQNR {e.sqnr_db:.1f} dB, cosine {e.cosine:.5f}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qcompiler", description="A quantizing model compiler.")
    sub = parser.add_subparsers(dest="command", required=True)

    def model_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("model", help="model.onnx, model.qir, or package.module:function")
        p.add_argument("--input-shape", action="append", default=[], metavar="NAME=D0,D1,...",
                       help="fix a dynamic ONNX input's shape (repeatable)")

    p = sub.add_parser("import", help="capture a model and print (or save) its IR")
    model_args(p)
    p.add_argument("-o", "--output", help="write IR text here (weights to the same name with .npz)")
    p.set_defaults(func=_cmd_import)
    p = sub.add_parser("opt", help="run a pass pipeline over a model, with IR printing, dumps, timing, bisect")
    p.add_argument("model", nargs="?", help="model.onnx, model.qir, or package.module:function")
    p.add_argument("--input-shape", action="append", default=[], metavar="NAME=D0,D1,...")
    p.add_argument("-p", "--pipeline", help="e.g. 'fold-constants,fold-batchnorm,eliminate-dead-code'")
    p.add_argument("-o", "--output", help="write the result here (IR text + .npz); default: print it")
    p.add_argument("--print-ir-before", action="append", default=[], metavar="PASS")
    p.add_argument("--print-ir-after", action="append", default=[], metavar="PASS")
    p.add_argument("--print-ir-after-all", action="store_true")
    p.add_argument("--print-ir-after-change", action="store_true")
    p.add_argument("--dump-dir", help="write numbered, re-parseable IR files after every pass")
    p.add_argument("--timing", action="store_true", help="per-pass wall time")
    p.add_argument("--verify-each", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--bisect-limit", type=int, metavar="N", help="run only the first N pass applications")
    p.add_argument("--reproducer-dir", default=".", help="where a failing pass's input IR is written")
    p.add_argument("--list-passes", action="store_true")
    p.add_argument("--calibration", help=".npz of calibration batches, for range-analysis and smooth-quant")
    p.add_argument("--config", help="QuantConfig as JSON (or YAML), for insert-qdq")
    p.set_defaults(func=_cmd_opt)
    p = sub.add_parser("compare", help="per-layer error of the quantized model against the float one")
    model_args(p)
    p.add_argument("quantized", nargs="?", help="an already quantized model (IR file); default: quantize MODEL")
    p.add_argument("--calibration", help=".npz of calibration batches (arrays named like the inputs)")
    p.add_argument("--inputs", help=".npz with the batch to compare on (default: the first calibration batch)")
    p.add_argument("--config", help="QuantConfig as JSON (or YAML)")
    p.add_argument("--top", type=int, default=15, help="rows in the table of worst layers")
    p.add_argument("--json", metavar="FILE", help="write every layer's numbers as JSON ('-' for stdout)")
    p.set_defaults(func=_cmd_compare)
    p = sub.add_parser("stats", help="op counts of a model")
    model_args(p)
    p.set_defaults(func=_cmd_stats)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except QCompilerError as e:
        print(f"qcompiler: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("qcompiler: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
