"""The pass manager: runs a pipeline over a graph with instruments around every pass.

Debugging lives here, never inside passes: printing IR before/after passes, numbered dumps,
per-pass timing, verification after each pass, and opt-bisect (run only the first N pass
applications). A pass that raises or leaves an invalid graph is reported as
``pass X failed after [A, B]`` with the IR it received written as a reproducer."""
from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .errors import QCompilerError, VerificationError
from .ir import Graph, print_graph, save, verify_graph
from . import passes as _standard_passes  # noqa: F401  registers the standard passes this manager runs by name
from .pipeline import Pass, PassContext, parse_pipeline, print_pipeline


class PassFailure(QCompilerError):
    """A pass raised or broke an IR invariant; ``reproducer`` is the IR it received."""


@dataclass
class PassRecord:
    index: int
    name: str
    changed: bool
    seconds: float


@dataclass
class Instruments:
    """What to observe while passes run. ``emit`` receives every printed line."""

    print_before: frozenset[str] = frozenset()
    print_after: frozenset[str] = frozenset()
    print_after_all: bool = False
    print_after_change: bool = False
    dump_dir: Path | None = None
    verify_each: bool = True
    bisect_limit: int | None = None
    reproducer_dir: Path | None = None
    emit: Callable[[str], None] = print
    on_pass: Callable[[Pass], None] | None = None  # told of each pass before it runs (progress lines)
    after_pass: Callable[[Pass, Graph, bool], None] | None = None  # each pass, the graph after it, whether it changed
    records: list[PassRecord] = field(default_factory=list)


def run_pipeline(graph: Graph, pipeline: str | Sequence[Pass], instruments: Instruments | None = None,
                 context: PassContext | None = None) -> Graph:
    """Run ``pipeline`` on ``graph`` in place and return it; ``instruments.records`` gets
    timings and ``context.report`` what the passes reported."""
    passes = parse_pipeline(pipeline) if isinstance(pipeline, str) else list(pipeline)
    inst = instruments or Instruments()
    ctx = context or PassContext()
    if inst.dump_dir is not None:
        inst.dump_dir.mkdir(parents=True, exist_ok=True)
        save(graph, inst.dump_dir / "00_input.qir")
    for index, p in enumerate(passes):
        if inst.bisect_limit is not None and index >= inst.bisect_limit:
            inst.emit(f"bisect: not running pass #{index + 1} ({p})")
            continue
        if inst.bisect_limit is not None:
            inst.emit(f"bisect: running pass #{index + 1} ({p})")
        if inst.on_pass is not None:
            inst.on_pass(p)
        if p.name in inst.print_before:
            inst.emit(f"// ----- IR before {p} -----\n{print_graph(graph)}")
        before = graph.copy() if inst.reproducer_dir is not None else None
        start = time.perf_counter()
        try:
            changed = bool(p.run(graph, ctx))
            if inst.verify_each:
                verify_graph(graph, where=f"after pass {p.name}")
        except Exception as e:
            raise _failure(p, passes, index, before, inst, e) from e
        inst.records.append(PassRecord(index, str(p), changed, time.perf_counter() - start))
        if inst.after_pass is not None:
            inst.after_pass(p, graph, changed)
        if p.name in inst.print_after or inst.print_after_all or (inst.print_after_change and changed):
            inst.emit(f"// ----- IR after {p}{'' if changed else ' (unchanged)'} -----\n{print_graph(graph)}")
        if inst.dump_dir is not None:
            save(graph, inst.dump_dir / f"{index + 1:02d}_{p.name}.qir")
    return graph


def _failure(p: Pass, passes: list[Pass], index: int, before: Graph | None, inst: Instruments,
             error: Exception) -> PassFailure:
    ran = "[" + ", ".join(str(q) for q in passes[:index]) + "]"
    detail = str(error) if isinstance(error, (QCompilerError, VerificationError)) else f"{type(error).__name__}: {error}"
    message = f"pass {p} failed after {ran}: {detail}"
    # a pass refusing what it was given (no calibration data, a bad option) is the user's to fix,
    # and the input IR reproduces nothing: reproducers are for crashes and broken invariants
    users_error = isinstance(error, QCompilerError) and not isinstance(error, VerificationError)
    if before is not None and inst.reproducer_dir is not None and not users_error:
        inst.reproducer_dir.mkdir(parents=True, exist_ok=True)
        path = save(before, inst.reproducer_dir / f"reproducer_{p.name}.qir")
        message += f"; reproduce with: qcompiler opt {path} -p '{print_pipeline(passes[index:])}'"
    return PassFailure(message)
