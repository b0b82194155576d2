"""Dynamic batch: one compiled model (and one artifact) for any batch size in a declared range.

The IR's shapes are static, so a dynamic batch is served by buckets, as TensorRT's optimization
profiles are: the model is captured and built at a few batch sizes from the range's minimum to
its maximum, every bucket quantized from one calibration (the first bucket's record, replayed
on the others, so all share every scale, zero point and corrected bias), and a call runs on the
smallest bucket that holds its batch, padded with copies of its last sample whose outputs are
dropped. Per sample the result is what the model gives that sample alone: checked at compile
time, since a model that mixes the samples of a batch (batch statistics, a reshape across the
batch) cannot be padded."""
from __future__ import annotations

import dataclasses
import inspect
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import InputError, QCompilerError
from .ir import Graph

PROBE_SAMPLES = 3  # samples the per-sample check runs, each alone and padded into the largest bucket


@dataclass(frozen=True)
class BatchRange:
    """The declared dynamic batch: its name, range, the input positions whose dimension 0 it
    is, and the batch sizes built."""
    name: str
    min: int
    max: int
    inputs: tuple[int, ...]
    buckets: tuple[int, ...]

    def bucket_for(self, batch: int) -> int:
        return next(b for b in self.buckets if b >= batch)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "min": self.min, "max": self.max, "inputs": list(self.inputs),
                "buckets": list(self.buckets)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> BatchRange:
        return cls(str(d["name"]), int(d["min"]), int(d["max"]), tuple(int(i) for i in d["inputs"]),
                   tuple(int(b) for b in d["buckets"]))


def default_buckets(lo: int, hi: int) -> tuple[int, ...]:
    """``lo``, then every power of 4 above it, then ``hi``: 1..32 builds 1, 4, 16 and 32 (a
    batch is padded by less than 4x; one build per bucket)."""
    sizes, b = {lo, hi}, 4
    while b < hi:
        if b > lo:
            sizes.add(b)
        b *= 4
    return tuple(sorted(sizes))


def _checked(name: str, lo: int, hi: int, buckets: Sequence[int] | None) -> tuple[int, ...]:
    if not 1 <= lo <= hi:
        raise QCompilerError(f"dynamic batch '{name}': the range must satisfy 1 <= min <= max, got {lo}..{hi}")
    chosen = tuple(sorted(set(int(b) for b in buckets))) if buckets else default_buckets(lo, hi)
    if chosen[0] != lo or chosen[-1] != hi or any(not lo <= b <= hi for b in chosen):
        raise QCompilerError(f"batch_buckets {list(chosen)} must lie in {lo}..{hi} and include both ends")
    return chosen


def from_dynamic_shapes(dynamic_shapes: Any, model: Any, example_inputs: Sequence[Any],
                        buckets: Sequence[int] | None) -> BatchRange:
    """torch.export's convention: ``{"x": {0: Dim("batch", min=1, max=32)}}`` keyed by the
    forward's argument names (or a tuple/list of such dicts, one per input, None for static)."""
    import torch

    if isinstance(dynamic_shapes, Mapping):
        names = [p for p in inspect.signature(model.forward).parameters][:len(example_inputs)]
        unknown = sorted(set(dynamic_shapes) - set(names))
        if unknown:
            raise QCompilerError(f"dynamic_shapes names {unknown}, which are not inputs of {type(model).__name__}"
                                 f".forward (its inputs: {names})")
        per_input = [dynamic_shapes.get(n) for n in names]
    else:
        per_input = list(dynamic_shapes)
        if len(per_input) != len(example_inputs):
            raise QCompilerError(f"dynamic_shapes has {len(per_input)} entries for {len(example_inputs)} inputs")
    dims: dict[int, Any] = {}
    for position, spec in enumerate(per_input):
        for axis, dim in (spec or {}).items():
            if axis != 0:
                raise QCompilerError(f"dynamic_shapes: input {position}, dim {axis} is dynamic; only the leading "
                                     f"(batch) dimension can be dynamic today")
            if not isinstance(dim, torch.export.Dim):
                raise QCompilerError(f"dynamic_shapes: input {position}, dim 0 must be a torch.export.Dim with min "
                                     f"and max, got {dim!r}")
            dims[position] = dim
    if not dims:
        raise QCompilerError("dynamic_shapes declares no dynamic dimension")
    first = next(iter(dims.values()))
    if any((d.__name__, d.min, d.max) != (first.__name__, first.min, first.max) for d in dims.values()):
        raise QCompilerError("dynamic_shapes: every dynamic input must share one batch Dim")
    if first.max > 2 ** 20:
        raise QCompilerError(f"dynamic batch '{first.__name__}' needs a max (Dim('{first.__name__}', min=1, max=N))")
    lo = max(int(first.min), 1)
    return BatchRange(first.__name__, lo, int(first.max), tuple(sorted(dims)),
                      _checked(first.__name__, lo, int(first.max), buckets))


def from_input_shapes(input_shapes: Mapping[str, Sequence[Any]], input_names: Sequence[str],
                      buckets: Sequence[int] | None) -> BatchRange | None:
    """ONNX: ``{"x": [(1, 32), 3, 224, 224]}``: a (min, max) pair in dimension 0 makes it the
    dynamic batch; None when every dimension is a number."""
    dynamic = {}
    for name, shape in input_shapes.items():
        for axis, d in enumerate(shape):
            if isinstance(d, (tuple, list)):
                if axis != 0:
                    raise QCompilerError(f"input_shapes: '{name}' dim {axis} is a range; only the leading (batch) "
                                         f"dimension can be dynamic today")
                if len(d) != 2:
                    raise QCompilerError(f"input_shapes: '{name}' dim 0 must be a number or (min, max), got {d!r}")
                dynamic[name] = (int(d[0]), int(d[1]))
    if not dynamic:
        return None
    if len(set(dynamic.values())) != 1:
        raise QCompilerError(f"input_shapes: every dynamic input must share one batch range, got {dynamic}")
    missing = sorted(set(dynamic) - set(input_names))
    if missing:
        raise QCompilerError(f"input_shapes names unknown input(s) {missing}; the model's inputs are "
                             f"{list(input_names)}")
    lo, hi = next(iter(dynamic.values()))
    return BatchRange("batch", lo, hi, tuple(i for i, n in enumerate(input_names) if n in dynamic),
                      _checked("batch", lo, hi, buckets))


def shapes_at(input_shapes: Mapping[str, Sequence[Any]], batch: int) -> dict[str, list[int]]:
    """``input_shapes`` with each (min, max) range replaced by ``batch``."""
    return {name: [batch if isinstance(d, (tuple, list)) else int(d) for d in shape]
            for name, shape in input_shapes.items()}


def examples_at(example_inputs: Sequence[Any], batch_inputs: Sequence[int], batch: int) -> tuple[Any, ...]:
    """The example inputs with each batched one cycled (or cut) to ``batch`` samples."""
    out = []
    for position, x in enumerate(example_inputs):
        if position in batch_inputs:
            x = x[np.arange(batch) % x.shape[0]]
        out.append(x)
    return tuple(out)


def same_model(a: Graph, b: Graph) -> str | None:
    """Why two captures of one model at two batch sizes are not the same model up to shapes
    (other ops, value names or weights), or None."""
    if [(n.op, [v.name for v in n.outputs]) for n in a.nodes] != [(n.op, [v.name for v in n.outputs]) for n in b.nodes]:
        return "its operations differ between batch sizes"
    weights_a = {k: v for k, v in a.constants.items() if v.size > 16}
    weights_b = {k: v for k, v in b.constants.items() if v.size > 16}
    if weights_a.keys() != weights_b.keys() or any(not np.array_equal(weights_a[k], weights_b[k]) for k in weights_a):
        return "its weights differ between batch sizes (a constant shaped by the batch?)"
    return None


def record_for(record: Any, float_graph: Graph, where: str) -> Path:
    """``record`` (a CalibrationRecord measured on the first bucket) bound to another bucket's
    float graph, written to a temporary file: every range, bias and decision it holds must name
    a value of that graph."""
    from .calibration_record import graph_digest

    names = {v.name for v in float_graph.inputs} | {v.name for n in float_graph.nodes for v in n.outputs}
    missing = sorted((set(record.ranges) | set(record.biases)) - names)
    if missing:
        raise QCompilerError(f"{where}: the calibration does not fit this batch size's graph (no value "
                             f"{missing[0]!r}): the model is not the same at every batch size")
    path = Path(tempfile.mkdtemp(prefix="qcompiler-bucket-")) / "ranges.json"
    dataclasses.replace(record, graph_digest=graph_digest(float_graph)).save(path)
    return path


def pad_to(array: np.ndarray, batch: int) -> np.ndarray:
    """``array`` with copies of its last sample appended up to ``batch`` samples (real-looking
    data: no overflow or NaN that zeros could cause in a normalization)."""
    extra = batch - array.shape[0]
    return array if extra == 0 else np.concatenate([array, np.repeat(array[-1:], extra, axis=0)])


def probe_inputs(samples: Sequence[np.ndarray], batch_inputs: Sequence[int], count: int, seed: int = 0
                 ) -> list[np.ndarray]:
    """``count`` distinct samples for the per-sample check: the given ones, and where there are
    fewer, copies of them perturbed (identical samples would hide a model that mixes them)."""
    rng = np.random.default_rng(seed)
    out = []
    for position, a in enumerate(samples):
        a = np.asarray(a)
        if position not in batch_inputs:
            out.append(a)
            continue
        picked = a[np.arange(count) % a.shape[0]].copy()
        if a.dtype.kind == "f" and a.shape[0] < count:
            spread = float(np.std(a)) or 1.0
            for i in range(a.shape[0], count):
                picked[i] += (0.1 * spread * rng.standard_normal(picked[i].shape)).astype(a.dtype)
        out.append(picked)
    return out


def check_per_sample(spec: BatchRange, run: Callable[[int, list[np.ndarray]], list[np.ndarray]],
                     probe: list[np.ndarray]) -> bool:
    """Each probe sample alone (padded into the smallest bucket) against the samples together
    in every other bucket (padded): a model whose sample's output depends on the others, or on
    the batch size, is refused. ``run(size, arrays)``: bucket ``size``'s outputs. Returns whether
    all agree exactly (integer builds do; float kernels built for other batch sizes may sum in
    another order)."""
    def share(outputs: list[np.ndarray], size: int, i: int) -> list[np.ndarray]:
        return [o[o.shape[0] // size * i:o.shape[0] // size * (i + 1)] for o in outputs]

    count = probe[spec.inputs[0]].shape[0]
    smallest = spec.buckets[0]
    alone = [share(run(smallest, [pad_to(a[i:i + 1], smallest) if p in spec.inputs else a
                                  for p, a in enumerate(probe)]), smallest, 0) for i in range(count)]
    exact = True
    for size in spec.buckets[1:]:
        used = min(count, size)
        together = run(size, [pad_to(a[:used], size) if p in spec.inputs else a for p, a in enumerate(probe)])
        for i in range(used):
            for k, (t, s) in enumerate(zip(share(together, size, i), alone[i])):
                if t.shape != s.shape:
                    raise QCompilerError(f"dynamic batch: output {k} does not follow the batch (shape {s.shape} "
                                         f"at batch {smallest}, {t.shape} per sample at batch {size})")
                if np.array_equal(t, s):
                    continue
                exact = False
                scale = float(np.max(np.abs(s))) if s.size else 0.0
                if not np.allclose(t, s, rtol=1e-4, atol=1e-4 * max(scale, 1e-30)):
                    raise QCompilerError(
                        f"dynamic batch: sample {i}'s output {k} at batch {size} differs from its output alone "
                        f"(max difference {float(np.max(np.abs(t - s))):.3g}): the model mixes the samples of a "
                        f"batch, so it cannot be padded; compile it with a static batch")
    return exact


def batch_of(spec: BatchRange, arrays: Sequence[np.ndarray], names: Sequence[str]) -> int:
    """The batch of a call's inputs, checked against the range."""
    sizes = {arrays[p].shape[0] if arrays[p].ndim else None for p in spec.inputs}
    if len(sizes) != 1 or None in sizes:
        raise InputError(f"inputs {[names[p] for p in spec.inputs]} share the batch '{spec.name}': give them "
                         f"the same dimension 0 (got {sorted(s for s in sizes if s is not None)})")
    n = sizes.pop()
    if not spec.min <= n <= spec.max:
        raise InputError(f"input %{names[spec.inputs[0]]}: batch {n} is outside dimension 0's range "
                         f"'{spec.name}' {spec.min}..{spec.max} this model was compiled for")
    return n
