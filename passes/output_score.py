"""What a choice made before quantization does to the quantized model's outputs: the searches
(search-ranges, smooth-quant's per-layer strength) build the model exactly as insert-qdq will,
run it on one calibration batch and compare each output with float."""
from __future__ import annotations

import dataclasses

import numpy as np

from qcompiler.compare import sqnr_db
from qcompiler.interpreter import run
from qcompiler.ir import Graph
from qcompiler.pipeline import PassContext
from qcompiler.quant_config import QuantScheme

from .insert_qdq import InsertQDQ


class OutputScore:
    """The worst output SQNR (dB) against ``reference`` (the float outputs on ``batch``) of a
    calibrated graph quantized with ``scheme``'s insert-qdq."""

    def __init__(self, scheme: QuantScheme, batch: list[np.ndarray], reference: list[np.ndarray]) -> None:
        self.insert = InsertQDQ(**{f.name: getattr(scheme, f.name) for f in dataclasses.fields(QuantScheme)})
        self.batch, self.reference = batch, reference

    def quantized(self, ranged: Graph) -> Graph:
        graph = ranged.copy()
        self.insert.run(graph, PassContext())
        return graph

    def measure(self, quantized: Graph) -> float:
        """The worst output SQNR of an already quantized graph."""
        return min(sqnr_db(r, o) for r, o in zip(self.reference, run(quantized, self.batch)))

    def __call__(self, ranged: Graph) -> float:
        return self.measure(self.quantized(ranged))
