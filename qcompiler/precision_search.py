"""Output-driven precision search: which layers to keep float so that the quantized model's
outputs meet the user's target (``QuantConfig.target_output_sqnr_db``).

Why at the outputs: a layer's local SQNR misses losses that only show there (errors that
build up along a path, an output whose small channels drown in its large ones). Why per
channel group: a detector's output joins box coordinates (hundreds) and class scores (0..1);
one SQNR over the whole tensor is the boxes' and hides scores rounded to nothing. Channels
along axis 1 and along the last axis are grouped by their float RMS (``channel_groups``) and
every group of every output must meet the target.

The search measures the gain at the outputs of keeping each quantized layer float, alone and
together with the layers reading its result (``candidate_units``), then keeps those units
float in order of gain, measuring after each, until the target is met: about two runs of the
QDQ graph on one calibration batch per layer, plus one per promotion."""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .compare import sqnr_db
from .interpreter import run
from .ir import Graph, Node
from .ir.ops import traits_of
from .progress import progress_bar

GROUP_GAP = 10.0
DUST = 1e-6  # a channel group this much quieter than its output is dead (zero after a relu, subnormal)
FLOOR_DB = -100.0  # an output with inf/nan where float has numbers counts as this (gains stay finite)


def channel_groups(reference: np.ndarray, axis: int) -> list[np.ndarray]:
    """Indices along ``axis`` grouped by the channels' RMS, in log scale: the sorted channels
    are split at their widest gap when it exceeds ``GROUP_GAP`` and is wider than the spread on
    either side (recursively). Box coordinates (150..180) and scores (0.2..0.6) split; the
    logits of one sample (|x| from 1e-5 to 10, a continuum) stay one group."""
    moved = np.moveaxis(reference.astype(np.float64), axis, 0).reshape(reference.shape[axis], -1)
    rms = _rms(moved, axis=1)
    logs = np.log10(np.maximum(rms, max(float(rms.max(initial=0.0)), 1e-30) * 1e-12))
    order = np.argsort(logs, kind="stable")

    def split(part: np.ndarray) -> list[np.ndarray]:
        if len(part) < 2:
            return [part]
        values = logs[part]
        gaps = np.diff(values)
        at = int(np.argmax(gaps)) + 1
        gap, left, right = gaps[at - 1], values[at - 1] - values[0], values[-1] - values[at]
        if gap <= math.log10(GROUP_GAP) or gap <= left or gap <= right:
            return [part]
        return split(part[:at]) + split(part[at:])

    return split(order)


def output_sqnr_db(references: Sequence[np.ndarray], outputs: Sequence[np.ndarray]) -> float:
    """The worst SQNR over the float outputs and their channel groups (see the module docstring)."""
    worst = math.inf
    for ref, got in zip(references, outputs):
        if ref.dtype.kind != "f" or ref.size == 0:
            continue
        worst = min(worst, sqnr_db(ref, got))
        dust = DUST * _rms(ref)
        for axis in sorted({1, ref.ndim - 1}) if ref.ndim >= 2 else ():
            groups = channel_groups(ref, axis)
            for group in groups if len(groups) > 1 else ():
                part = np.take(ref, group, axis)
                if _rms(part) > dust:  # dead channels carry no signal to keep: the whole output judges them
                    worst = min(worst, sqnr_db(part, np.take(got, group, axis)))
    return max(worst, FLOOR_DB)


def _rms(a: np.ndarray, axis: int | None = None) -> Any:
    """Root mean square in float64, non-finite entries counted as 0 (of all of ``a``, a float;
    along ``axis``, an array)."""
    a = a.astype(np.float64)
    if axis is None and not a.size:
        return 0.0
    rms = np.sqrt(np.mean(np.where(np.isfinite(a), a, 0.0) ** 2, axis=axis))
    return float(rms) if axis is None else rms


def _cost(node: Node) -> int:
    """Multiply-adds (weighted ops) or elements written: what keeping the layer float costs."""
    out = node.outputs[0]
    size = math.prod(out.shape)
    traits = traits_of(node.op)
    if traits.quant != "weighted":
        return size
    w = node.inputs[traits.weight_slot]
    reduced = math.prod(w.shape[1:]) if len(w.shape) >= 3 else node.inputs[0].shape[-1]
    return size * reduced


def _reads(node: Node, op: str) -> bool:
    return any(v.producer is not None and v.producer.op == op for v in node.inputs)


def reads_dequantized(qdq: Graph, node: Node) -> bool:
    """``node`` reads a dequantized value: a layer in int8."""
    return _reads(node, "dequantize")


def reads_bf16(qdq: Graph, node: Node) -> bool:
    """``node`` reads a value rounded to bfloat16: a layer in bf16."""
    return _reads(node, "round_bf16")


def quantized_layers(qdq: Graph) -> list[Node]:
    """The layers insert-qdq quantized or put in bf16: nodes reading a dequantized or bf16 value."""
    return [n for n in qdq.nodes if n.op not in ("quantize", "dequantize", "round_bf16") and "handle" in n.meta
            and (reads_dequantized(qdq, n) or reads_bf16(qdq, n))]


def _quantized_source(v: Any) -> Any:
    """The float value behind ``dequantize(quantize(x))``, else None."""
    dq = v.producer
    q = dq.inputs[0].producer if dq is not None and dq.op == "dequantize" else None
    return q.inputs[0] if q is not None and q.op == "quantize" else None


def candidate_units(layers: dict[str, Node]) -> list[tuple[str, ...]]:
    """What the search may keep float: each layer alone, and each layer with the layers reading
    its quantized result. A tensor is crushed by its producer's quantize/dequantize pair and
    again by its readers' inputs: only keeping both float recovers it, which neither shows alone."""
    by_output = {id(n.outputs[0]): name for name, n in layers.items()}
    readers: dict[str, list[str]] = {name: [] for name in layers}
    for name, n in layers.items():
        for v in n.inputs:
            source = _quantized_source(v)
            producer = by_output.get(id(source)) if source is not None else None
            if producer is not None and name not in readers[producer]:
                readers[producer].append(name)
    return [(name,) for name in layers] + [(name, *r) for name, r in readers.items() if r]


@dataclass
class Promotion:
    names: tuple[str, ...]  # the layers' float outputs: what QuantConfig.exclude names
    nodes: list[str]
    gain_db: float  # output SQNR gained when these layers joined the float ones
    cost: int  # multiply-adds (or elements) they now run in float


@dataclass
class SearchResult:
    target_db: float
    before_db: float
    after_db: float
    layers_measured: int = 0
    promoted: list[Promotion] = field(default_factory=list)
    references: list[np.ndarray] = field(default_factory=list, repr=False)  # the float outputs it judged against
    action: str = "keeping it float"  # what a promotion does (an i4 config's first search: int8 weights)
    bisected: bool = False  # the promotions are a prefix found by bisection (``_bisect``)

    def remeasure(self, qdq: Graph, batch: Sequence[np.ndarray]) -> None:
        """``after_db`` of the graph that ships (recalibrated without the layers kept float)."""
        self.after_db = output_sqnr_db(self.references, run(qdq, batch))

    @property
    def met(self) -> bool:
        return self.after_db >= self.target_db

    def report(self) -> dict[str, Any]:
        """JSON-ready: an SQNR of infinity (no error at all) is None, as in the compile report."""
        def db(x: float) -> float | None:
            return round(x, 2) if math.isfinite(x) else None

        return {"target_output_sqnr_db": self.target_db, "action": self.action, "before_db": db(self.before_db),
                "after_db": db(self.after_db), "met": self.met, "layers_measured": self.layers_measured,
                "promoted": [{"nodes": p.nodes, "gain_db": db(p.gain_db), "cost": p.cost}
                             for p in self.promoted],
                **({"bisected": True} if self.bisected else {})}

    def reasons(self) -> dict[str, str]:
        """Each layer kept float by the search (by float output name), with why."""
        return {name: f"output SQNR {self.before_db:.1f} dB < target_output_sqnr_db {self.target_db:g}: {self.action} "
                      f"gained {p.gain_db:.1f} dB" for p in self.promoted for name in p.names}


def search(float_graph: Graph, insert: Callable[[tuple[str, ...]], Graph], batch: Sequence[np.ndarray],
           target_db: float, kept: tuple[str, ...] = (), progress: bool = False,
           action: str = "keeping it float", eligible: Callable[[Graph, Node], bool] | None = None) -> SearchResult:
    """Layers (by float output name) to promote, besides ``kept``, to meet ``target_db``.

    ``insert(promoted)`` returns the QDQ graph with ``promoted`` in the higher precision (kept
    float; or, for an i4 config's first search, given int8 weights); its layers carry the float
    graph's debug handles. ``action`` says what a promotion does, in the reasons; ``eligible(qdq,
    layer)``: which layers a promotion can change (default: those in int8)."""
    references = run(float_graph, batch)
    names = {n.handle: n.outputs[0].name for n in float_graph.nodes}

    def measure(exclude: tuple[str, ...]) -> float:
        return output_sqnr_db(references, run(insert(exclude), batch))

    before = measure(kept)
    result = SearchResult(target_db, before, before, references=references, action=action)
    if result.met:
        return result
    qdq = insert(kept)
    eligible = eligible or reads_dequantized
    layers = {names[n.handle]: n for n in quantized_layers(qdq) if n.handle in names and eligible(qdq, n)}
    units = candidate_units(layers)
    gains = {}
    with progress_bar(f"precision search ({action}): each layer's effect at the outputs", len(units),
                      progress) as advance:
        for unit in units:
            gains[unit] = measure(kept + unit) - before
            advance()
    result.layers_measured = len(layers)

    def cost(unit: tuple[str, ...]) -> int:
        return sum(_cost(layers[name]) for name in unit)

    order = sorted(gains, key=lambda u: (-gains[u], cost(u)))
    chosen: tuple[str, ...] = ()
    for unit in (u for u in order if gains[u] > 0):
        new = tuple(name for name in unit if name not in chosen and name not in kept)
        if not new:
            continue
        now = measure(kept + chosen + new)
        if now <= result.after_db:  # no gain next to the layers already float
            continue
        chosen += new
        result.promoted.append(Promotion(new, [layers[n].describe() for n in new], now - result.after_db, cost(new)))
        result.after_db = now
        if result.met:
            return result
    _bisect(result, order, gains, kept, measure, layers, cost)
    return result


def _bisect(result: SearchResult, order: list[tuple[str, ...]], gains: dict[tuple[str, ...], float],
            kept: tuple[str, ...], measure: Callable[[tuple[str, ...]], float], layers: dict[str, Node],
            cost: Callable[[tuple[str, ...]], int]) -> None:
    """When promoting one unit at a time stalls (an error spread thinly over many layers, as 4-bit
    weights spread it: each promotion alone gains a tenth of a dB), the shortest prefix of all
    units in order of gain that meets the target, by bisection (about log2(units) measurements;
    the whole list if even that falls short: the most this precision can give)."""
    def prefix(k: int) -> tuple[str, ...]:
        names: list[str] = []
        for unit in order[:k]:
            names += [n for n in unit if n not in names and n not in kept]
        return tuple(names)

    best = len(order)
    best_db = measure(kept + prefix(best))
    if best_db <= result.after_db:
        return
    lo = 0  # prefix(best) meets the target (or is everything); prefix(lo) does not
    if best_db >= result.target_db:
        while best - lo > 1:
            mid = (lo + best) // 2
            now = measure(kept + prefix(mid))
            if now >= result.target_db:
                best, best_db = mid, now
            else:
                lo = mid
    result.promoted = [Promotion((n,), [layers[n].describe()], gains.get((n,), 0.0), cost((n,))) for n in prefix(best)]
    result.after_db, result.bisected = best_db, True
