"""Output-driven precision search: which layers to keep float so that the quantized model's
outputs meet the user's target (``QuantConfig.target_output_sqnr_db``).

Why at the outputs: a layer's local SQNR misses losses that only show there (errors that
build up along a path, an output whose small channels drown in its large ones). Why per
channel group: a detector's output joins box coordinates (hundreds) and class scores (0..1);
one SQNR over the whole tensor is the boxes' and hides scores rounded to nothing. Channels
along axis 1 and along the last axis are grouped by their float RMS (a gap of more than
``GROUP_GAP`` between neighbours starts a new group) and every group of every output must meet
the target.

The search measures each quantized layer's gain at the outputs when it alone is kept float
(one run per layer), then keeps layers float in order of that gain, measuring after each,
until the target is met: layers + promotions runs of the QDQ graph on one calibration batch."""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from .compare import sqnr_db
from .interpreter import run
from .ir import Graph, Node
from .ir.ops import traits_of
from .progress import progress_bar

GROUP_GAP = 10.0
FLOOR_DB = -100.0  # an output with inf/nan where float has numbers counts as this (gains stay finite)


def channel_groups(reference: np.ndarray, axis: int) -> list[np.ndarray]:
    """Indices along ``axis`` grouped by the channels' RMS: sorted, split at gaps > GROUP_GAP."""
    moved = np.moveaxis(reference.astype(np.float64), axis, 0).reshape(reference.shape[axis], -1)
    rms = np.sqrt(np.mean(np.where(np.isfinite(moved), moved, 0.0) ** 2, axis=1))
    order = np.argsort(rms)
    groups, start = [], 0
    for i in range(1, len(order)):
        if rms[order[i]] > GROUP_GAP * max(rms[order[i - 1]], 1e-30):
            groups.append(order[start:i])
            start = i
    groups.append(order[start:])
    return groups


def output_sqnr_db(references: Sequence[np.ndarray], outputs: Sequence[np.ndarray]) -> float:
    """The worst SQNR over the float outputs and their channel groups (see the module docstring)."""
    worst = math.inf
    for ref, got in zip(references, outputs):
        if ref.dtype.kind != "f" or ref.size == 0:
            continue
        worst = min(worst, sqnr_db(ref, got))
        for axis in sorted({1, ref.ndim - 1}) if ref.ndim >= 2 else ():
            groups = channel_groups(ref, axis)
            for group in groups if len(groups) > 1 else ():
                worst = min(worst, sqnr_db(np.take(ref, group, axis), np.take(got, group, axis)))
    return max(worst, FLOOR_DB)


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


def quantized_layers(qdq: Graph) -> list[Node]:
    """The layers insert-qdq quantized: nodes reading a dequantized value."""
    return [n for n in qdq.nodes if n.op not in ("quantize", "dequantize") and "handle" in n.meta
            and any(v.producer is not None and v.producer.op == "dequantize" for v in n.inputs)]


@dataclass
class Promotion:
    name: str  # the layer's float output: what QuantConfig.exclude names
    node: str
    gain_db: float  # output SQNR gained when this layer joined the float ones
    cost: int  # multiply-adds (or elements) it now runs in float


@dataclass
class SearchResult:
    target_db: float
    before_db: float
    after_db: float
    layers_measured: int = 0
    promoted: list[Promotion] = field(default_factory=list)

    @property
    def met(self) -> bool:
        return self.after_db >= self.target_db

    def report(self) -> dict[str, Any]:
        return {"target_output_sqnr_db": self.target_db, "before_db": round(self.before_db, 2),
                "after_db": round(self.after_db, 2), "met": self.met, "layers_measured": self.layers_measured,
                "promoted": [asdict(p) | {"gain_db": round(p.gain_db, 2)} for p in self.promoted]}

    def reason(self, promotion: Promotion) -> str:
        return (f"output SQNR {self.before_db:.1f} dB < target_output_sqnr_db {self.target_db:g}: keeping it float "
                f"gained {promotion.gain_db:.1f} dB")


def search(float_graph: Graph, insert: Callable[[tuple[str, ...]], Graph], batch: Sequence[np.ndarray],
           target_db: float, kept: tuple[str, ...] = (), progress: bool = False) -> SearchResult:
    """Layers (by float output name) to keep float, besides ``kept``, to meet ``target_db``.

    ``insert(exclude)`` returns the QDQ graph with ``exclude`` kept float; its layers carry the
    float graph's debug handles."""
    references = run(float_graph, batch)
    names = {n.handle: n.outputs[0].name for n in float_graph.nodes}

    def measure(exclude: tuple[str, ...]) -> float:
        return output_sqnr_db(references, run(insert(exclude), batch))

    before = measure(kept)
    result = SearchResult(target_db, before, before)
    if result.met:
        return result
    layers = {names[n.handle]: n for n in quantized_layers(insert(kept)) if n.handle in names}
    gains = {}
    with progress_bar("precision search: each layer's effect at the outputs", len(layers), progress) as advance:
        for name in layers:
            gains[name] = measure(kept + (name,)) - before
            advance()
    result.layers_measured = len(layers)
    chosen: tuple[str, ...] = ()
    for name in sorted((n for n in gains if gains[n] > 0), key=lambda n: (-gains[n], _cost(layers[n]))):
        now = measure(kept + chosen + (name,))
        if now <= result.after_db:  # no gain next to the layers already float
            continue
        chosen += (name,)
        result.promoted.append(Promotion(name, layers[name].describe(), now - result.after_db, _cost(layers[name])))
        result.after_db = now
        if result.met:
            break
    return result
