"""Dynamic shapes: one compiled model (and one artifact) for any batch size, and any sequence
length, in a declared range.

The IR's shapes are static, so dynamic dimensions are served by buckets, as TensorRT's
optimization profiles are: the model is captured and built at a few sizes of each dynamic
dimension (a grid when both a batch and a sequence are dynamic), every bucket quantized from
one calibration (the record measured on one bucket, replayed on the others, so all share
every scale, zero point and corrected bias), and a call runs on the smallest bucket that holds
it, padded:

- the **batch** (a dimension 0) with copies of the call's last sample, whose outputs are
  dropped. Per sample the result is what the model gives that sample alone: checked at compile
  time, since a model that mixes the samples of a batch (batch statistics, a reshape across
  the batch) cannot be padded;
- a **sequence** (any other dimension, shared by the inputs that declare it: token ids, an
  attention mask) with zeros, a padding token and a mask that excludes it; outputs that follow
  the sequence are cut back to the call's length. Checked at compile time the same way: the
  shortest bucket's outputs against the same inputs padded into every longer one, so a model
  whose real positions see the padding (no attention mask) is refused."""
from __future__ import annotations

import dataclasses
import inspect
import itertools
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import InputError, QCompilerError
from .ir import Graph

PROBE_SAMPLES = 3  # samples the per-sample check runs, each alone and padded into the largest bucket
PADDING_TOLERANCE = 1e-3  # relative L2 error a padded sequence may add (reductions over longer axes)


@dataclass(frozen=True)
class DimRange:
    """One declared dynamic dimension: its name, range, the input positions that carry it (at
    ``axis`` of each: 0 for a batch), the sizes built, and for a sequence the axis of each
    output that follows it (None: the output does not)."""
    name: str
    min: int
    max: int
    inputs: tuple[int, ...]
    buckets: tuple[int, ...]
    axis: int = 0
    outputs: tuple[int | None, ...] = ()

    @property
    def is_batch(self) -> bool:
        return self.axis == 0

    @property
    def kind(self) -> str:
        return "batch" if self.is_batch else "sequence"

    def bucket_for(self, size: int) -> int:
        return next(b for b in self.buckets if b >= size)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "min": self.min, "max": self.max, "inputs": list(self.inputs),
                "buckets": list(self.buckets), "axis": self.axis, "outputs": list(self.outputs)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> DimRange:
        return cls(str(d["name"]), int(d["min"]), int(d["max"]), tuple(int(i) for i in d["inputs"]),
                   tuple(int(b) for b in d["buckets"]), int(d.get("axis", 0)),
                   tuple(None if a is None else int(a) for a in d.get("outputs", ())))


Dims = tuple[DimRange, ...]  # the batch first where both are dynamic
Key = tuple[int, ...]  # one size per dynamic dimension: a bucket of the grid


def grid(dims: Dims) -> list[Key]:
    """Every bucket, the smallest first."""
    return list(itertools.product(*(d.buckets for d in dims)))


def calibrated_key(dims: Dims) -> Key:
    """The bucket calibration runs on: the smallest batch (batches of any multiple of it split
    into its size) and the longest sequence (data of any length padded up to it)."""
    return tuple(d.buckets[0] if d.is_batch else d.buckets[-1] for d in dims)


def tag(dims: Dims, key: Key) -> str:
    """A bucket's file-name mark: ``.b8``, ``.s64``, ``.b8.s64``; empty for the first bucket."""
    if key == grid(dims)[0]:
        return ""
    return "".join(f".{'b' if d.is_batch else 's'}{size}" for d, size in zip(dims, key))


def default_buckets(lo: int, hi: int, factor: int = 4) -> tuple[int, ...]:
    """``lo``, then every power of ``factor`` above it, then ``hi``: a batch of 1..32 builds 1,
    4, 16 and 32 (padded by less than 4x); a sequence (factor 2) of 8..128 builds 8, 16, 32, 64
    and 128 (attention's cost grows with the square of the padding)."""
    sizes, b = {lo, hi}, factor
    while b < hi:
        if b > lo:
            sizes.add(b)
        b *= factor
    return tuple(sorted(sizes))


def _checked(name: str, lo: int, hi: int, buckets: Sequence[int] | None, batch: bool) -> tuple[int, ...]:
    """The buckets of a batch (powers of 4 by default; it calibrates at its first bucket, so that
    starts at the minimum) or of a sequence (powers of 2; it calibrates at its last)."""
    if not 1 <= lo <= hi:
        raise QCompilerError(f"dynamic dimension '{name}': the range must satisfy 1 <= min <= max, got {lo}..{hi}")
    chosen = tuple(sorted(set(int(b) for b in buckets))) if buckets else default_buckets(lo, hi, 4 if batch else 2)
    if chosen[-1] != hi or any(not lo <= b <= hi for b in chosen) or (batch and chosen[0] != lo):
        raise QCompilerError(f"buckets {list(chosen)} of '{name}' must lie in {lo}..{hi}, "
                             + ("include both ends" if batch else
                                f"and end at {hi} (a length below the first bucket is padded up to it)"))
    return chosen


def _dims(declared: Mapping[tuple[int, int], tuple[str, int, int]], batch_buckets: Sequence[int] | None,
          sequence_buckets: Sequence[int] | None, where: str) -> Dims:
    """``{(input position, axis): (name, min, max)}`` as the batch and sequence DimRanges."""
    by_name: dict[str, list[tuple[int, int]]] = {}
    ranges: dict[str, tuple[int, int]] = {}
    for (position, axis), (name, lo, hi) in sorted(declared.items()):
        if ranges.setdefault(name, (lo, hi)) != (lo, hi):
            raise QCompilerError(f"{where}: dimension '{name}' is declared with two ranges, {ranges[name]} and "
                                 f"{(lo, hi)}")
        by_name.setdefault(name, []).append((position, axis))
    batch = [n for n, uses in by_name.items() if all(a == 0 for _, a in uses)]
    sequence = [n for n, uses in by_name.items() if all(a != 0 for _, a in uses)]
    mixed = sorted(set(by_name) - set(batch) - set(sequence))
    if mixed or len(batch) > 1 or len(sequence) > 1:
        raise QCompilerError(f"{where}: at most two dynamic dimensions, a batch (dimension 0 of every input that "
                             f"has it) and one sequence (one other dimension, the same in every input that has "
                             f"it); got {sorted(by_name)}")
    dims = []
    for names, buckets, kind in ((batch, batch_buckets, "batch"), (sequence, sequence_buckets, "sequence")):
        if not names:
            if buckets is not None:
                raise QCompilerError(f"{where}: {kind}_buckets given, but no {kind} dimension is dynamic")
            continue
        name, uses = names[0], by_name[names[0]]
        axes = {a for _, a in uses}
        if len(axes) > 1:
            raise QCompilerError(f"{where}: sequence '{name}' is dimension {sorted(axes)} of different inputs: "
                                 f"padding needs it at one dimension in every input")
        lo, hi = ranges[name]
        dims.append(DimRange(name, lo, hi, tuple(p for p, _ in uses), _checked(name, lo, hi, buckets, kind == "batch"),
                             axes.pop()))
    return tuple(dims)


def _finite(bound: Any) -> int | None:
    """A Dim's bound as an int; None where torch left it unbounded (its infinity)."""
    try:
        return int(bound)
    except (TypeError, ValueError, AttributeError, OverflowError):
        return None


def from_dynamic_shapes(dynamic_shapes: Any, model: Any, example_inputs: Sequence[Any],
                        batch_buckets: Sequence[int] | None = None,
                        sequence_buckets: Sequence[int] | None = None) -> Dims:
    """torch.export's convention: ``{"x": {0: Dim("batch", min=1, max=32)}}`` keyed by the
    forward's argument names (or a tuple/list of such dicts, one per input, None for static);
    ``{"ids": {1: Dim("seq", min=8, max=128)}, "mask": {1: seq}}`` declares a sequence."""
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
    declared = {}
    for position, spec in enumerate(per_input):
        for axis, dim in (spec or {}).items():
            if not isinstance(dim, torch.export.Dim):
                raise QCompilerError(f"dynamic_shapes: input {position}, dim {axis} must be a torch.export.Dim with "
                                     f"min and max, got {dim!r}")
            rank = len(example_inputs[position].shape)
            if not 0 <= int(axis) < rank:
                raise QCompilerError(f"dynamic_shapes: input {position} has {rank} dimensions, not a dimension {axis}")
            hi = _finite(dim.max)
            if hi is None or hi > 2 ** 20:
                raise QCompilerError(f"dynamic dimension '{dim.__name__}' needs a max "
                                     f"(Dim('{dim.__name__}', min=1, max=N))")
            declared[(position, int(axis))] = (dim.__name__, max(_finite(dim.min) or 1, 1), hi)
    if not declared:
        raise QCompilerError("dynamic_shapes declares no dynamic dimension")
    return _dims(declared, batch_buckets, sequence_buckets, "dynamic_shapes")


def from_input_shapes(input_shapes: Mapping[str, Sequence[Any]], input_names: Sequence[str],
                      batch_buckets: Sequence[int] | None = None,
                      sequence_buckets: Sequence[int] | None = None) -> Dims:
    """ONNX: ``{"x": [(1, 32), 3, 224, 224]}``: a (min, max) pair in dimension 0 makes it the
    dynamic batch, in another dimension the dynamic sequence (``{"ids": [1, (8, 128)]}``); an
    empty tuple when every dimension is a number."""
    declared = {}
    for name, shape in input_shapes.items():
        for axis, d in enumerate(shape):
            if isinstance(d, (tuple, list)):
                if len(d) != 2:
                    raise QCompilerError(f"input_shapes: '{name}' dim {axis} must be a number or (min, max), got {d!r}")
                if name not in input_names:
                    raise QCompilerError(f"input_shapes names unknown input(s) ['{name}']; the model's inputs are "
                                         f"{list(input_names)}")
                declared[(list(input_names).index(name), axis)] = (f"dimension {axis}", int(d[0]), int(d[1]))
    axes = {axis for _, axis in declared if axis}
    declared = {k: ("batch" if not k[1] else "sequence" if len(axes) == 1 else name, lo, hi)
                for k, (name, lo, hi) in declared.items()}  # a second ranged dimension is named, and refused
    if not declared:
        if batch_buckets is not None or sequence_buckets is not None:
            raise QCompilerError("batch_buckets / sequence_buckets apply to a dynamic dimension (dynamic_shapes, or "
                                 "a (min, max) in input_shapes)")
        return ()
    return _dims(declared, batch_buckets, sequence_buckets, "input_shapes")


def _size_of(dims: Dims, key: Key, axis: int) -> int:
    return next(size for d, size in zip(dims, key) if d.axis == axis)


def shapes_at(input_shapes: Mapping[str, Sequence[Any]], dims: Dims, key: Key) -> dict[str, list[int]]:
    """``input_shapes`` with each (min, max) range replaced by its dimension's size in ``key``."""
    return {name: [_size_of(dims, key, axis) if isinstance(d, (tuple, list)) else int(d)
                   for axis, d in enumerate(shape)] for name, shape in input_shapes.items()}


def resized(arrays: Sequence[np.ndarray], dims: Dims, key: Key, cycle_batch: bool = False) -> list[np.ndarray]:
    """``arrays`` brought to bucket ``key``: each sequence padded with zeros (or cut) to its size;
    each batch padded with copies of the last sample, or with ``cycle_batch`` cycled or cut (the
    example inputs a bucket is captured with)."""
    out = [np.asarray(a) for a in arrays]
    for d, size in zip(dims, key):
        for p in d.inputs:
            a = out[p]
            if d.is_batch:
                out[p] = a[np.arange(size) % a.shape[0]] if cycle_batch else pad_to(a, size)
            elif a.shape[d.axis] >= size:
                out[p] = a.take(np.arange(size), axis=d.axis)
            else:
                widths = [(0, 0)] * a.ndim
                widths[d.axis] = (0, size - a.shape[d.axis])
                out[p] = np.pad(a, widths)
    return out


def sequence_padder(dims: Dims) -> Callable[[list[np.ndarray]], list[np.ndarray]]:
    """Calibration batches zero-padded along the sequence to its longest bucket (where the model
    is calibrated); a longer one is refused rather than cut."""
    sequence = tuple(d for d in dims if not d.is_batch)

    def pad(arrays: list[np.ndarray]) -> list[np.ndarray]:
        for d in sequence:
            for p in d.inputs:
                if arrays[p].ndim > d.axis and arrays[p].shape[d.axis] > d.max:
                    raise QCompilerError(f"calibration: input {p} is {arrays[p].shape[d.axis]} long in dimension "
                                         f"{d.axis}, beyond the sequence '{d.name}' range {d.min}..{d.max}")
        return resized(arrays, sequence, tuple(d.max for d in sequence))
    return pad


def same_model(a: Graph, b: Graph) -> str | None:
    """Why two captures of one model at two bucket sizes are not the same model up to shapes
    (other ops, value names or weights), or None. A constant may differ in shape (a position
    table cut to the length, token types expanded to the batch) or be folded under another
    name, never differ in values where name and shape agree; the compile-time checks catch one
    that changes what a sample gets."""
    if [(n.op, [v.name for v in n.outputs]) for n in a.nodes] != [(n.op, [v.name for v in n.outputs]) for n in b.nodes]:
        return "its operations differ between sizes"
    shared = [k for k in a.constants.keys() & b.constants.keys() if a.constants[k].size > 16]
    if any(a.constants[k].shape == b.constants[k].shape and not np.array_equal(a.constants[k], b.constants[k])
           for k in shared):
        return "its weights differ between sizes"
    return None


def output_axes(dim: DimRange, small: Graph, large: Graph, sizes: tuple[int, int]) -> tuple[int | None, ...]:
    """For a sequence: the axis of each output that follows it, read off the graphs captured at
    two of its sizes (None where the output's shape does not change)."""
    axes = []
    for k, (a, b) in enumerate(zip(small.outputs, large.outputs)):
        changed = [i for i, (x, y) in enumerate(zip(a.shape, b.shape)) if x != y]
        if not changed:
            axes.append(None)
        elif len(changed) == 1 and (a.shape[changed[0]], b.shape[changed[0]]) == sizes:
            axes.append(changed[0])
        else:
            raise QCompilerError(f"dynamic sequence '{dim.name}': output {k} (%{a.name}) is {list(a.shape)} at "
                                 f"length {sizes[0]} and {list(b.shape)} at {sizes[1]}: an output must either keep "
                                 f"its shape or have one dimension equal to the length, to be cut back after padding")
    return tuple(axes)


def record_for(record: Any, float_graph: Graph, where: str, calibrated: Graph) -> Path:
    """``record`` (a CalibrationRecord measured on the ``calibrated`` bucket's float graph)
    bound to another bucket's float graph, written to a temporary file: every range, bias and
    decision it holds must name a value of that graph. A constant shaped by the sequence (a
    position table cut to the length) takes the calibrated bucket's range, so a prefix of it
    quantizes to the same integers at every length."""
    from .calibration_record import graph_digest

    names = {v.name for v in float_graph.inputs} | {v.name for n in float_graph.nodes for v in n.outputs}
    missing = sorted((set(record.ranges) | set(record.biases)) - names)
    if missing:
        raise QCompilerError(f"{where}: the calibration does not fit this size's graph (no value "
                             f"{missing[0]!r}): the model is not the same at every size")
    ranges = dict(record.ranges)
    for name, array in float_graph.constants.items():
        wide = calibrated.constants.get(name)
        if wide is not None and wide.shape != array.shape and array.dtype.kind == "f" and wide.size:
            ranges[f"@{name}"] = (min(0.0, float(wide.min())), max(0.0, float(wide.max())))
    path = Path(tempfile.mkdtemp(prefix="qcompiler-bucket-")) / "ranges.json"
    dataclasses.replace(record, graph_digest=graph_digest(float_graph), ranges=ranges).save(path)
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


Runner = Callable[[Key, list[np.ndarray]], list[np.ndarray]]  # bucket ``key``'s outputs for padded arrays


def check_per_sample(dims: Dims, run: Runner, probe: list[np.ndarray]) -> bool:
    """Each probe sample alone (padded into the smallest batch bucket) against the samples
    together in every other batch bucket (padded), at the first bucket of any other dimension: a
    model whose sample's output depends on the others, or on the batch size, is refused.
    Returns whether all agree exactly (integer builds do; float kernels built for other batch
    sizes may sum in another order)."""
    spec = dims[0]
    first = grid(dims)[0]

    def share(outputs: list[np.ndarray], size: int, i: int) -> list[np.ndarray]:
        return [o[o.shape[0] // size * i:o.shape[0] // size * (i + 1)] for o in outputs]

    def at(size: int, arrays: list[np.ndarray]) -> list[np.ndarray]:
        key = (size,) + first[1:]
        return run(key, resized(arrays, dims, key))

    count = probe[spec.inputs[0]].shape[0]
    smallest = spec.buckets[0]
    alone = [share(at(smallest, [a[i:i + 1] if p in spec.inputs else a for p, a in enumerate(probe)]), smallest, 0)
             for i in range(count)]
    exact = True
    for size in spec.buckets[1:]:
        used = min(count, size)
        together = at(size, [a[:used] if p in spec.inputs else a for p, a in enumerate(probe)])
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


def cut(dims: Dims, key: Key, sizes: Key, outputs: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Outputs of bucket ``key`` cut back to a call of ``sizes``: its samples (the batch's share
    of dimension 0) and its sequence positions."""
    out = list(outputs)
    for d, bucket, n in zip(dims, key, sizes):
        if d.is_batch:
            out = [o[:o.shape[0] // bucket * n] for o in out]
        else:
            out = [o if axis is None else o.take(np.arange(n), axis=axis) for o, axis in zip(out, d.outputs)]
    return out


def check_padding(dims: Dims, run: Runner, probe: list[np.ndarray]) -> float:
    """The sequence's check: the probe at the shortest length, unpadded, against the same inputs
    zero-padded into every longer bucket and cut back. Returns the largest relative difference
    (float sums over longer axes round differently); a model whose real positions see the
    padding is refused."""
    index = next(i for i, d in enumerate(dims) if not d.is_batch)
    dim, first = dims[index], grid(dims)[0]
    short = resized(probe, dims, first, cycle_batch=True)
    want = run(first, short)
    worst = 0.0
    for size in dim.buckets[1:]:
        key = first[:index] + (size,) + first[index + 1:]
        got = cut(dims, key, first, run(key, resized(short, dims, key)))
        for k, (g, w) in enumerate(zip(got, want)):
            g64, w64 = g.astype(np.float64), w.astype(np.float64)
            error = float(np.linalg.norm(g64 - w64) / max(np.linalg.norm(w64), 1e-30)) if w.size else 0.0
            if not error <= PADDING_TOLERANCE:
                raise QCompilerError(
                    f"dynamic sequence '{dim.name}': output {k} at the first {first[index]} positions changes by "
                    f"{error:.3g} (relative) when the inputs are zero-padded to {size}: the model's real positions "
                    f"see the padding (give it an attention mask input that is zero on padding), so it cannot be "
                    f"bucketed; compile it with a static length")
            worst = max(worst, error)
    return worst


def sizes_of(dims: Dims, arrays: Sequence[np.ndarray], names: Sequence[str]) -> Key:
    """The size of each dynamic dimension in a call's inputs, checked against its range."""
    sizes = []
    for d in dims:
        found = {arrays[p].shape[d.axis] if arrays[p].ndim > d.axis else None for p in d.inputs}
        if len(found) != 1 or None in found:
            raise InputError(f"inputs {[names[p] for p in d.inputs]} share the {d.kind} '{d.name}': give them "
                             f"the same dimension {d.axis} (got {sorted(s for s in found if s is not None)})")
        n = found.pop()
        if not d.min <= n <= d.max:
            raise InputError(f"input %{names[d.inputs[0]]}: {d.kind} {n} is outside dimension {d.axis}'s range "
                             f"'{d.name}' {d.min}..{d.max} this model was compiled for")
        sizes.append(n)
    return tuple(sizes)
