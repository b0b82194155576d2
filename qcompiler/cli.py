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
