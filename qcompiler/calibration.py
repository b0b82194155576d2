"""Calibration data as a stream: batches are checked as they are read and never all held in
memory, whatever their number.

Calibration sweeps the data more than once (range analysis, its histogram pass, bias
correction, the sensitivity check's second range analysis), so the source must be read again:

- a list or tuple of batches (or one array): the user already holds them; read in place;
- a re-iterable object (``iter(x) is not x``: a ``torch.utils.data.DataLoader``, a ``range``-like
  dataset) or a callable returning a fresh iterator: asked for a new iterator per sweep;
- a one-shot iterator or generator: read once; each batch is spooled to a temporary folder
  on disk as it goes by, and later sweeps replay the spool (deleted with the object).

A batch is a list/tuple of arrays in input order, a dict by input name, or one array for a
one-input model; arrays or torch tensors. NaN or inf is refused with the batch and input named."""
from __future__ import annotations

import tempfile
from os import PathLike
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from .errors import QCompilerError
from .interpreter import check_inputs, to_numpy
from .ir import Graph

Batch = list[np.ndarray]


class CalibrationSet:
    """Checked, re-iterable calibration batches for ``graph`` (see the module docstring)."""

    def __init__(self, graph: Graph, data: Any, pad: Callable[[Batch], Batch] | None = None):
        if data is None:
            raise QCompilerError("range-analysis needs calibration data (calibration=... / --calibration)")
        if isinstance(data, (str, bytes, PathLike)):
            raise QCompilerError(f"calibration data {data!r} is a path: pass batches (arrays), or read the file "
                                 f"with qcompiler.loading.load_data")
        self.graph, self._pad = graph, pad  # pad: brings a batch to the graph's sequence length
        if isinstance(data, (np.ndarray, dict)) or hasattr(data, "detach"):
            data = [data]  # one batch
        self._fresh: Callable[[], Iterable[Any]] | None = None
        self._source: Iterator[Any] | None = None
        self.count: int | None = len(data) if isinstance(data, (list, tuple)) else None
        if isinstance(data, (list, tuple)) or (isinstance(data, Iterable) and iter(data) is not data):
            self._fresh = lambda: data
        elif isinstance(data, Iterable):
            self._source = iter(data)
            self._spool = tempfile.TemporaryDirectory(prefix="qcompiler-calibration-")
            self._spooled = 0
            self._read = 0  # batches taken from the source (each may split into several)
        elif callable(data):
            self._fresh = data
        else:
            raise QCompilerError(f"calibration data must be batches (a list, an iterable, a generator or a "
                                 f"function returning one), not {type(data).__name__}")
        self._first: Batch | None = None

    def __iter__(self) -> Iterator[Batch]:
        count = 0
        for count, batch in enumerate(self._replay() if self._fresh is None else self._read_fresh(), start=1):
            yield batch
        if count == 0:
            raise QCompilerError("calibration data is empty")
        self.count = count

    def first(self) -> Batch:
        """The first batch (kept: the sensitivity check and the fidelity report use it)."""
        if self._first is None:
            for batch in self:
                self._first = batch
                break
        return self._first

    def _read_fresh(self) -> Iterator[Batch]:
        fresh = self._fresh()
        try:
            iterator = iter(fresh)
        except TypeError:
            raise QCompilerError(f"the calibration function returned {type(fresh).__name__}, not an iterable "
                                 f"of batches") from None
        for i, raw in enumerate(iterator):
            yield from self._check(i, raw)

    def _replay(self) -> Iterator[Batch]:
        """What is spooled, then on from the source (spooling as it goes)."""
        i = 0
        while True:
            if i < self._spooled:
                yield self._load(i)
                i += 1
            elif self._source is not None:
                try:
                    raw = next(self._source)
                except StopIteration:
                    self._source = None
                    return
                for batch in self._check(self._read, raw):
                    self._store(i, batch)
                    yield batch
                    i += 1
                self._read += 1
            else:
                return

    def _store(self, i: int, batch: Batch) -> None:
        folder = Path(self._spool.name)
        for j, array in enumerate(batch):
            np.save(folder / f"{i}_{j}.npy", array, allow_pickle=False)
        self._spooled = i + 1

    def _load(self, i: int) -> Batch:
        folder = Path(self._spool.name)
        return [np.load(folder / f"{i}_{j}.npy", allow_pickle=False) for j in range(len(self.graph.inputs))]

    def _check(self, i: int, batch: Any) -> list[Batch]:
        """Raw batch ``i`` as checked batches of the model's batch size: one whose arrays hold k
        times the model's leading axis (the same k for every input) is split into k batches, so
        a model captured with one example calibrates on batches of any size, mixed."""
        graph = self.graph
        if isinstance(batch, dict):
            missing = [v.name for v in graph.inputs if v.name not in batch]
            if missing:
                raise QCompilerError(f"calibration batch {i}: missing input(s) {missing}")
            batch = [batch[v.name] for v in graph.inputs]
        elif not isinstance(batch, (list, tuple)):
            batch = [batch]
        arrays = [to_numpy(b) for b in batch]
        if self._pad is not None and len(arrays) == len(graph.inputs):
            arrays = self._pad(arrays)
        chunks = _splits(graph, arrays)
        for a, v in zip(arrays, graph.inputs):
            if chunks == 1 and a.ndim == len(v.shape) >= 2 and tuple(a.shape[1:]) == tuple(v.shape[1:]) \
                    and a.shape[0] != v.shape[0]:
                raise QCompilerError(f"calibration batch {i}: input %{v.name} holds {a.shape[0]} samples and the "
                                     f"model was captured for batches of {v.shape[0]}: give {v.shape[0]} or a "
                                     f"multiple of it (split into batches of {v.shape[0]}), the same for every "
                                     f"input")
        try:
            checked = [check_inputs(graph, [a[k * v.shape[0]:(k + 1) * v.shape[0]] if chunks > 1 else a
                                            for a, v in zip(arrays, graph.inputs)]) for k in range(chunks)]
        except QCompilerError as e:
            raise type(e)(f"calibration batch {i}: {e}") from None
        for arrays in checked:
            for value, a in zip(graph.inputs, arrays):
                if a.dtype.kind == "f" and not np.isfinite(a).all():
                    what = "NaN" if np.isnan(a).any() else "inf"
                    raise QCompilerError(f"calibration batch {i}, input %{value.name}: contains {what}")
        return checked


def _splits(graph: Graph, arrays: list[np.ndarray]) -> int:
    """k when every array is k (> 1) of the model's batches stacked along the leading axis; else 1
    (and ``check_inputs`` says what does not fit). Inputs of rank 1 are never split: their one
    axis is the data itself more often than a batch."""
    if len(arrays) != len(graph.inputs):
        return 1
    ks = set()
    for a, v in zip(arrays, graph.inputs):
        shape = getattr(a, "shape", None)
        if shape is None or len(shape) != len(v.shape) or len(v.shape) < 2 or not v.shape[0] \
                or tuple(shape[1:]) != tuple(v.shape[1:]) or shape[0] % v.shape[0]:
            return 1
        ks.add(shape[0] // v.shape[0])
    return ks.pop() if len(ks) == 1 and min(ks) > 1 else 1


def calibration_set(graph: Graph, data: Any) -> CalibrationSet:
    """``data`` as a :class:`CalibrationSet` for ``graph`` (one already made passes through)."""
    return data if isinstance(data, CalibrationSet) else CalibrationSet(graph, data)
