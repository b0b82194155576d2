"""Per-layer numerics: float graph vs quantized graph, matched by debug handle.

- cumulative: both graphs run end to end; each layer's quantized result (dequantized when it
  is integer) against the float result — the error that has built up to that layer;
- local: the layer quantized alone — its float inputs (from the float run) put through the
  same quantize/dequantize as in the quantized graph, its quantized weights, its output
  quantized — against the float layer. Local needs the QDQ form of the graph (after
  insert-qdq); for a lowered graph only cumulative numbers are given.
Metrics: SQNR in dB (signal power over error power), cosine similarity, max abs error.

``pass_divergence`` is the other axis: the model's outputs after each pass of a pipeline, which
finds the first pass whose output diverges (a wrong rewrite, or the step that loses accuracy)."""
from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from .interpreter import check_inputs, run
from .ir import Graph, Node, Value
from .ir.ops import get_op

FLOAT = ("f32", "f16", "f64")


@dataclass
class LayerError:
    handle: int
    op: str
    source: str
    sqnr_db: float
    cosine: float
    max_abs: float
    local_sqnr_db: float | None = None
    local_cosine: float | None = None


def _metrics(ref: np.ndarray, got: np.ndarray) -> tuple[float, float, float]:
    ref = ref.astype(np.float64).reshape(-1)
    got = got.astype(np.float64).reshape(-1)
    finite = np.isfinite(ref) & np.isfinite(got)
    if not np.array_equal(ref[~finite], got[~finite]):  # an inf/nan where the other has a number
        return -math.inf, 0.0, math.inf
    ref, got = ref[finite], got[finite]  # equal infinities (masked attention scores) carry no error
    noise = float(np.sum((ref - got) ** 2))
    signal = float(np.sum(ref ** 2))
    sqnr = math.inf if noise == 0 else (10 * math.log10(signal / noise) if signal > 0 else -math.inf)
    denom = float(np.linalg.norm(ref) * np.linalg.norm(got))
    cosine = float(ref @ got / denom) if denom > 0 else (1.0 if noise == 0 else 0.0)
    return sqnr, cosine, float(np.max(np.abs(ref - got))) if ref.size else 0.0


def sqnr_db(ref: np.ndarray, got: np.ndarray) -> float:
    return _metrics(ref, got)[0]


def _integer_params(graph: Graph) -> dict[int, tuple[float, int]]:
    """(scale, zero point) of every per-tensor quantized integer value in ``graph``."""
    params: dict[int, tuple[float, int]] = {}
    for node in graph.nodes:
        out = node.outputs[0] if node.outputs else None
        if out is None or out.dtype not in ("u8", "i8"):
            continue
        if node.op == "quantize" and node.inputs[1].is_constant and node.inputs[1].type.rank == 0:
            params[id(out)] = (float(graph.constant_array(node.inputs[1])),
                               int(graph.constant_array(node.inputs[2])) if len(node.inputs) > 2 else 0)
        elif node.op in ("requantize", "requantize_f32", "add_int", "add_int_f32") and node.attrs.get("scale"):
            zp = node.inputs[-1]
            params[id(out)] = (node.attrs["scale"], int(graph.constant_array(zp)))
        elif node.inputs and id(node.inputs[0]) in params:  # layout, pooling, max(x, zp): same grid
            params[id(out)] = params[id(node.inputs[0])]
    return params


def _record(graph: Graph, inputs: list[np.ndarray], dequantize: bool) -> dict[int, list[np.ndarray | None]]:
    """Each node's outputs as real numbers (dequantized when integer), by debug handle; an
    output that has no real meaning is None. All outputs: a split's second half is read too."""
    params = _integer_params(graph) if dequantize else {}
    values: dict[int, list[np.ndarray | None]] = {}

    def real(out: Value, array: np.ndarray) -> np.ndarray | None:
        if out.dtype in FLOAT:
            return array
        if id(out) in params:
            scale, zp = params[id(out)]
            return (array.astype(np.float64) - zp) * scale
        return None

    def observer(node: Node, outs: list[np.ndarray]) -> None:
        # a dequantize with a layer's handle is that layer's result (a model output's accumulator)
        if node.op == "quantize" or "handle" not in node.meta:
            return
        arrays = [real(out, a) for out, a in zip(node.outputs, outs)]
        if arrays[0] is not None:
            values[node.handle] = arrays

    run(graph, inputs, observer=observer)
    return values


def _local(float_graph: Graph, quant_graph: Graph, float_values: dict[int, list[np.ndarray | None]],
           inputs: list[np.ndarray]) -> dict[int, np.ndarray]:
    """Each QDQ layer evaluated on fake-quantized float inputs (see the module docstring)."""
    by_input = {id(q): f for q, f in zip(quant_graph.inputs, inputs)}
    results: dict[int, np.ndarray] = {}

    def float_of(v: Value) -> np.ndarray | None:
        if id(v) in by_input:
            return by_input[id(v)]
        if v.producer is not None and "handle" in v.producer.meta and v.producer.handle in float_values:
            return float_values[v.producer.handle][v.producer.outputs.index(v)]
        return None

    def operand(v: Value) -> np.ndarray | None:
        if v.is_constant:
            return quant_graph.constant_array(v)
        dq = v.producer
        if dq is not None and dq.op == "dequantize_rows" and dq.inputs[0].producer is not None:
            rows = dq.inputs[0].producer  # per-token scales: quantize_rows of the float input
            x = float_of(rows.inputs[0])
            return None if x is None else get_op("dequantize_rows").run(get_op(rows.op).run([x], rows.attrs),
                                                                        dq.attrs)[0]
        if dq is not None and dq.op == "dequantize":
            src = dq.inputs[0]
            consts = [quant_graph.constant_array(c) for c in dq.inputs[1:] if c.is_constant]
            if src.is_constant:
                return get_op("dequantize").run([quant_graph.constant_array(src)] + consts, dq.attrs)[0]
            q = src.producer
            if q is None or q.op != "quantize" or len(consts) != len(dq.inputs) - 1:
                return None
            x = float_of(q.inputs[0])
            if x is None:
                return None
            qx = get_op("quantize").run([x] + [quant_graph.constant_array(c) for c in q.inputs[1:]], q.attrs)[0]
            return get_op("dequantize").run([qx] + consts, dq.attrs)[0]
        return float_of(v)

    users = quant_graph.users()
    for node in quant_graph.nodes:
        if node.op in ("quantize", "dequantize", "quantize_rows", "dequantize_rows") or node.handle not in float_values:
            continue
        if not any(v.producer is not None and v.producer.op in ("dequantize", "dequantize_rows") for v in node.inputs):
            continue  # not a quantized layer
        arrays = [operand(v) for v in node.inputs]
        if any(a is None for a in arrays):
            continue
        y = get_op(node.op).run(arrays, node.attrs)[0]
        readers = users.get(node.outputs[0], [])
        q = next((u for u in readers if u.op == "quantize"), None)
        if q is not None and all(c.is_constant for c in q.inputs[1:]):
            consts = [quant_graph.constant_array(c) for c in q.inputs[1:]]
            y = get_op("dequantize").run([get_op("quantize").run([y] + consts, q.attrs)[0]] + consts, q.attrs)[0]
        results[node.handle] = y
    return results


def _normalized_rows(graph: Graph) -> dict[int, int]:
    """Handle -> the rank of the trailing block a ``layer_norm`` rescales, for each layer whose
    result reaches one directly or through a residual ``add``. Such a result's error counts
    relative to each of its rows: a row 100x smaller than the largest (a quiet token) carries
    1/10,000 of the tensor's energy, so an error that wipes it out hardly moves the tensor's
    SQNR, and the normalization then scales that row, error and all, back to unit size."""
    users = graph.users()

    def normalizing(v: Value) -> int | None:
        for r in users.get(v, []):
            if r.op == "layer_norm" and r.inputs[0] is v:
                return v.type.rank - (r.attrs["axis"] % v.type.rank)
        return None

    found = {}
    for node in graph.nodes:
        if not node.outputs or "handle" not in node.meta:
            continue
        out = node.outputs[0]
        trailing = normalizing(out)
        for r in users.get(out, []):
            if trailing is None and r.op == "add":
                trailing = normalizing(r.outputs[0])
        if trailing is not None:
            found[node.handle] = trailing
    return found


def _row_metrics(ref: np.ndarray, got: np.ndarray, trailing: int) -> tuple[float, float, float]:
    """``_metrics`` of both tensors with each row (the last ``trailing`` axes) divided by the
    reference row's RMS: every row weighs the same."""
    ref = ref.astype(np.float64)
    rows = ref.reshape(-1, int(np.prod(ref.shape[ref.ndim - trailing:])))
    rms = np.sqrt(np.mean(rows ** 2, axis=1, keepdims=True))
    rms = np.where(rms > 0, rms, 1.0)
    return _metrics(rows / rms, got.astype(np.float64).reshape(rows.shape) / rms)


def compare(float_graph: Graph, quant_graph: Graph, inputs: Sequence[Any]) -> list[LayerError]:
    """Per-layer errors of ``quant_graph`` against ``float_graph`` on one batch of ``inputs``,
    in graph order. A layer whose result a ``layer_norm`` normalizes (directly or after a
    residual add) has its local error measured row by row (``_normalized_rows``)."""
    arrays = check_inputs(float_graph, list(inputs))
    float_values = _record(float_graph, arrays, dequantize=False)
    quant_values = _record(quant_graph, arrays, dequantize=True)
    local = _local(float_graph, quant_graph, float_values, arrays)
    row_normalized = _normalized_rows(float_graph)
    sources = {n.handle: n for n in float_graph.nodes}
    layers = []
    for handle, refs in float_values.items():
        ref = refs[0]
        if handle not in quant_values or quant_values[handle][0].shape != ref.shape:
            continue
        sqnr, cosine, max_abs = _metrics(ref, quant_values[handle][0])
        entry = LayerError(handle, sources[handle].op, sources[handle].source, sqnr, cosine, max_abs)
        if handle in local:
            metrics = _row_metrics(ref, local[handle], row_normalized[handle]) if handle in row_normalized \
                else _metrics(ref, local[handle])
            entry.local_sqnr_db, entry.local_cosine = metrics[:2]
        layers.append(entry)
    return layers


@dataclass
class PassStep:
    """The outputs after one pass: the worst output's SQNR against the model as given, and what
    this pass changed it by (None: exact; -inf/inf as for ``_metrics``)."""
    index: int
    name: str
    changed: bool
    sqnr_db: float
    drop_db: float


def pass_divergence(graph: Graph, pipeline: str, inputs: Sequence[Any], calibration: Any = None) -> list[PassStep]:
    """Replay ``pipeline`` on a copy of ``graph`` (with ``calibration`` for the passes that read
    data) and, after each pass, run the graph on ``inputs``: each pass's worst output SQNR
    against ``graph``'s own outputs, and the drop from the pass before."""
    from .calibration import calibration_set
    from .pass_manager import Instruments, run_pipeline
    from .pipeline import PassContext

    arrays = check_inputs(graph, list(inputs))
    reference = run(graph, arrays)
    steps: list[PassStep] = []

    def observe(p: Any, after: Graph, changed: bool) -> None:
        outputs = run(after, arrays)
        worst_db = min((_metrics(r, o)[0] for r, o in zip(reference, outputs)), default=math.inf)
        before = steps[-1].sqnr_db if steps else math.inf
        drop = 0.0 if worst_db == before else before - worst_db  # inf: the first error, or a NaN
        steps.append(PassStep(len(steps) + 1, str(p), changed, worst_db, drop))

    run_pipeline(graph.copy(), pipeline, Instruments(emit=lambda s: None, after_pass=observe),
                 PassContext(calibration=calibration_set(graph, calibration) if calibration is not None else None))
    return steps


def first_divergence(steps: Sequence[PassStep], target_db: float | None) -> PassStep | None:
    """The first pass after which the outputs fall below ``target_db``, or (no target) the pass
    that lost the most; None when no pass changed the outputs."""
    if target_db is not None:
        return next((s for s in steps if s.sqnr_db < target_db), None)
    def noise(db: float) -> float:  # error power over signal power
        return 10 ** (-db / 10) if db != -math.inf else math.inf

    gains = [(noise(s.sqnr_db) - noise(steps[i - 1].sqnr_db if i else math.inf), s) for i, s in enumerate(steps)]
    lossy = [(g, s) for g, s in gains if g > 0]
    return max(lossy, key=lambda gs: gs[0])[1] if lossy else None


def render_passes(steps: Sequence[PassStep], culprit: PassStep | None):
    """The pass-by-pass table, the culprit's row marked."""
    from rich.table import Table

    table = Table(title="outputs after each pass (worst output's SQNR against the model as given)")
    for col in ("#", "pass", "changed", "output SQNR", "drop", ""):
        table.add_column(col, justify="left" if col in ("pass", "") else "right")
    for s in steps:
        table.add_row(str(s.index), s.name, "yes" if s.changed else "", _db(s.sqnr_db),
                      _drop(s),
                      "<- first divergence" if s is culprit else "")
    return table


def _drop(step: PassStep) -> str:
    if not step.drop_db:
        return ""
    if step.sqnr_db == -math.inf:
        return "all (inf/nan)"
    return f"{step.drop_db:.1f} dB" if math.isfinite(step.drop_db) else "first error"


def _db(db: float) -> str:
    return "exact" if db == math.inf else f"{db:.1f} dB"


def passes_to_json(steps: Sequence[PassStep], culprit: PassStep | None) -> dict[str, Any]:
    def finite(x: float) -> float | None:
        return x if math.isfinite(x) else None

    return {"passes": [{**asdict(s), "sqnr_db": finite(s.sqnr_db), "drop_db": finite(s.drop_db)} for s in steps],
            "first_divergence": culprit.name if culprit else None}


def worst(layers: Sequence[LayerError], top: int = 10) -> list[LayerError]:
    return sorted(layers, key=lambda e: e.sqnr_db)[:top]


def to_json(layers: Sequence[LayerError]) -> str:
    def clean(d: dict) -> dict:
        return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in d.items()}

    return json.dumps([clean(asdict(e)) for e in layers], indent=2)


def render_table(layers: Sequence[LayerError], title: str = "worst layers by cumulative SQNR"):
    from rich.table import Table

    table = Table(title=title)
    for col in ("#", "op", "source", "SQNR dB", "cosine", "max |err|", "local SQNR dB"):
        table.add_column(col, justify="right" if col not in ("op", "source") else "left")
    for e in layers:
        table.add_row(str(e.handle), e.op, e.source, f"{e.sqnr_db:.1f}", f"{e.cosine:.4f}", f"{e.max_abs:.3g}",
                      "" if e.local_sqnr_db is None else f"{e.local_sqnr_db:.1f}")
    return table


def render_search(search: dict):
    """The precision search's report (``report()["precision_search"]``) as a table: each layer
    kept float, in the order chosen, what it gained at the outputs and what it costs."""
    from rich.table import Table

    state = "met" if search["met"] else "NOT met"
    table = Table(title=f"precision search: worst output group {format_db(search['before_db'])} -> "
                        f"{format_db(search['after_db'])}, target {search['target_output_sqnr_db']:g} dB {state} "
                        f"({search['layers_measured']} layers measured)")
    for col in ("kept float", "gain", "cost (MACs)"):
        table.add_column(col, justify="left" if col == "kept float" else "right")
    for p in search["promoted"]:
        table.add_row("\n".join(p["nodes"]), format_db(p["gain_db"]), f"{p['cost']:,}")
    return table


def format_db(db: float | None) -> str:
    """An SQNR from a report: None is no error at all."""
    return "exact" if db is None else f"{db:.1f} dB"
