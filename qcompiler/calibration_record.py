"""Calibration, saved: everything the calibration data decided for one model (each float
activation's range, the corrected biases, the layers the sensitivity check kept float), so a
build can be repeated or tuned without the data and without the minutes calibration takes
(TensorRT's calibration cache does this for ranges).

A record belongs to one float graph: its digest (the graph's text and the bytes of every
constant, after the float passes) is stored, and applying a record to any other graph is
refused, so a record can never quietly quantize a retrained or re-exported model with stale
ranges."""
from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import QCompilerError
from .files import atomic_write
from .ir import Graph, Node, Value
from .ir.ops import traits_of

FORMAT = "qcompiler-ranges/1"
FLOAT = ("f32", "f16", "f64")


def calibrated_values(graph: Graph) -> list[Value]:
    """The values range analysis calibrates: float graph inputs and float node outputs."""
    values = [v for v in graph.inputs if v.dtype in FLOAT]
    return values + [v for n in graph.nodes for v in n.outputs if v.dtype in FLOAT]


def set_corrected_bias(graph: Graph, node: Node, bias: np.ndarray) -> None:
    """Give ``node`` (a conv or linear) the corrected ``bias`` as a new constant. bias-correction
    and an applied record both go through here, so the two routes make the same graph."""
    slot = traits_of(node.op).bias_slot
    bias = np.asarray(bias, np.float32)
    if len(node.inputs) > slot:
        node.inputs[slot] = graph.add_constant(f"{node.inputs[slot].name}.corrected", bias)
    else:
        node.inputs = node.inputs + [graph.add_constant(f"{node.inputs[1].name}.bias_correction", bias)]


def graph_digest(graph: Graph) -> str:
    """sha256 of the graph's text and of every constant's bytes (in name order)."""
    from .ir import print_graph

    h = hashlib.sha256(print_graph(graph, elide_above=0).encode())
    for name in sorted(graph.constants):
        array = np.ascontiguousarray(graph.constants[name])
        h.update(f"{name}:{array.dtype.str}:{array.shape}".encode())
        h.update(array.tobytes())
    return "sha256:" + h.hexdigest()


@dataclass(frozen=True)
class CalibrationRecord:
    graph_digest: str  # of the float graph it was calibrated on
    calibration: str  # the range-analysis pass that measured the ranges
    activation_dtype: str
    ranges: dict[str, tuple[float, float]]  # value name (a constant's: "@name") -> calibrated [min, max]
    biases: dict[str, list[float]]  # conv/linear output value name -> its corrected bias
    exclude: dict[str, str]  # layer (output value name) the sensitivity check kept float -> why
    int8_weights: dict[str, str] = field(default_factory=dict)  # i4 config: layers kept at int8 weights -> why
    bf16: tuple[str, ...] = ()  # of exclude, the layers run in bfloat16 (the rest float32)
    dynamic: dict[str, str] = field(default_factory=dict)  # linears and matmuls given per-token scales -> why
    # smooth-quant's choice, applied before the float graph's digest was taken: per group, in
    # order, {"input": x's name, "linears": their output names, "alpha", "factors": s per channel}
    smoothing: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def measure(cls, float_graph: Graph, calibrated: Graph, calibration: str, activation_dtype: str,
                exclude: dict[str, str], int8_weights: dict[str, str] | None = None,
                bf16: tuple[str, ...] = (), dynamic: dict[str, str] | None = None,
                smoothing: list[dict[str, Any]] | None = None) -> CalibrationRecord:
        """The record of ``calibrated`` (``float_graph`` after range-analysis and bias-correction)."""
        ranges = {v.name: v.range for v in calibrated_values(calibrated) if v.range is not None}
        before = {n.handle: n for n in float_graph.nodes}
        biases = {}
        for n in calibrated.nodes:
            slot = traits_of(n.op).bias_slot
            old = before.get(n.handle)
            if slot is None or len(n.inputs) <= slot or old is None:
                continue
            if len(old.inputs) <= slot or old.inputs[slot].name != n.inputs[slot].name:  # bias-correction's
                biases[n.output.name] = [float(b) for b in calibrated.constant_array(n.inputs[slot]).ravel()]
        return cls(graph_digest(float_graph), calibration, activation_dtype, ranges, biases, dict(exclude),
                   dict(int8_weights or {}), tuple(bf16), dict(dynamic or {}), list(smoothing or []))

    def save(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        body = {"format": FORMAT, "graph_digest": self.graph_digest, "calibration": self.calibration,
                "activation_dtype": self.activation_dtype, "exclude": self.exclude,
                "int8_weights": self.int8_weights, "bf16": list(self.bf16), "dynamic": self.dynamic,
                "smoothing": self.smoothing,
                "ranges": {k: list(r) for k, r in self.ranges.items()}, "biases": self.biases}
        atomic_write(path, lambda f: f.write(json.dumps(body, indent=1).encode()))
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> CalibrationRecord:
        try:
            body = json.loads(Path(path).read_text())
        except (OSError, UnicodeDecodeError, ValueError) as e:
            raise QCompilerError(f"{path}: not a calibration record ({getattr(e, 'strerror', None) or e})") from None
        if not isinstance(body, dict) or body.get("format") != FORMAT:
            raise QCompilerError(f"{path}: not a calibration record (no \"format\": \"{FORMAT}\"; write one with "
                                 f"--save-ranges)")
        try:
            ranges = {str(k): _finite_pair(r) for k, r in body["ranges"].items()}
            biases = {str(k): [float(b) for b in bs] for k, bs in body["biases"].items()}
            return cls(str(body["graph_digest"]), str(body["calibration"]), str(body["activation_dtype"]),
                       ranges, biases, {str(k): str(why) for k, why in body["exclude"].items()},
                       {str(k): str(why) for k, why in body.get("int8_weights", {}).items()},
                       tuple(str(k) for k in body.get("bf16", [])),
                       {str(k): str(why) for k, why in body.get("dynamic", {}).items()},
                       [_smoothing_group(g) for g in body.get("smoothing", [])])
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise QCompilerError(f"{path}: malformed calibration record ({type(e).__name__}: {e})") from None

    def apply(self, graph: Graph, where: str = "calibration record") -> None:
        """Set the recorded ranges and corrected biases on ``graph``, which must be the float
        graph the record was measured on."""
        if graph_digest(graph) != self.graph_digest:
            raise QCompilerError(f"{where}: calibrated for another model (or another float pipeline, or other "
                                 f"weights): its graph digest differs; recalibrate with --save-ranges")
        for v in calibrated_values(graph):
            v.range = self.ranges.get(v.name)
        for key, r in self.ranges.items():  # "@name": a constant's range (a grid shared with a longer bucket)
            if key.startswith("@") and key[1:] in graph.constants:
                graph.constant_value(key[1:]).range = r
        producers = {n.output.name: n for n in graph.nodes if len(n.outputs) == 1}
        for name, values in self.biases.items():
            set_corrected_bias(graph, producers[name], np.asarray(values))
        graph.remove_unused_constants()


def _smoothing_group(group: Any) -> dict[str, Any]:
    alpha = group["alpha"]
    factors = [float(f) for f in group["factors"]]
    if not all(math.isfinite(f) and f > 0 for f in factors):
        raise ValueError(f"smoothing factors of {group['input']!r} must be positive and finite")
    return {"input": str(group["input"]), "linears": [str(n) for n in group["linears"]],
            "alpha": None if alpha is None else float(alpha), "factors": factors}


def _finite_pair(r: Any) -> tuple[float, float]:
    lo, hi = (float(x) for x in r)
    if not (math.isfinite(lo) and math.isfinite(hi) and lo <= hi):
        raise ValueError(f"range {r} is not a finite [min, max]")
    return lo, hi
