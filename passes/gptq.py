"""gptq: round each linear's weights to the grid insert-qdq would use, column by column, each
column's rounding error pushed onto the columns not yet rounded (GPTQ, Frantar et al. 2023;
ONNX Runtime and AutoGPTQ use it for 4-bit weights).

Identity: for y = W x over the calibration inputs X, with H = X^T X, a rounded W' costs the
output error tr((W - W') H (W - W')^T). With U the upper Cholesky factor of H^-1, rounding
column i to q_i and then adding -(w_i - q_i) / U_ii * U_i,j to every later column j is the
least-squares best update of the columns still free (the optimal brain surgeon step), so the
error of the whole weight is at most what rounding to nearest leaves, usually well under it.

The grid is insert-qdq's own (same channel scales, bias floor, dead channels and int4 group
multipliers: ``layer_weight``); the pass writes the weight as ``dequantize(int8)``, which
insert-qdq keeps. Runs after range-analysis (the bias floor reads the input's range), before
bias-correction (which leaves layers with quantized weights alone). Linears only: a conv's
inputs would be its unfolded windows."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from qcompiler.calibration import calibration_set
from qcompiler.errors import QCompilerError
from qcompiler.interpreter import values_of
from qcompiler.ir import Graph, Node
from qcompiler.ir.packing import Q_MAX
from qcompiler.pipeline import Pass, PassContext, register
from qcompiler.quant_config import QuantScheme

from .insert_qdq import FLOAT, attach_quantized_weight, int4_grid, layer_weight

BLOCK = 128  # columns rounded together before their errors update the rest (one matrix product)


def gptq_round(w: np.ndarray, step: np.ndarray, limit: np.ndarray, gram: np.ndarray, damping: float,
               act_order: bool = True) -> np.ndarray:
    """Integer levels for ``w`` [out, in] on the grid ``step`` [out, in] within +-``limit``,
    compensating each column's error on the later ones through the inverse of ``gram`` (X^T X,
    damped by ``damping`` of its mean diagonal; inputs never seen keep their column at 0).
    ``act_order``: columns of the most active inputs first (largest diagonal of X^T X), while
    the most columns are left to absorb their errors (AutoGPTQ's desc_act); the grid is per
    element, so the order changes nothing else."""
    if act_order:
        order = np.argsort(-np.diag(gram), kind="stable")
        levels = gptq_round(w[:, order], step[:, order], limit[:, order], gram[np.ix_(order, order)], damping, False)
        return levels[:, np.argsort(order)]
    w = w.astype(np.float64).copy()
    gram = gram.astype(np.float64).copy()
    unseen = np.diag(gram) == 0
    gram[unseen, unseen] = 1.0
    w[:, unseen] = 0.0
    gram[np.diag_indices_from(gram)] += damping * float(np.mean(np.diag(gram)))
    upper = np.linalg.cholesky(np.linalg.inv(gram)).T
    levels = np.zeros_like(w)
    for start in range(0, w.shape[1], BLOCK):
        end = min(start + BLOCK, w.shape[1])
        block = w[:, start:end].copy()
        errors = np.zeros_like(block)
        for j in range(end - start):
            i = start + j
            q = np.clip(np.rint(block[:, j] / step[:, i]), -limit[:, i], limit[:, i])
            levels[:, i] = q
            errors[:, j] = (block[:, j] - q * step[:, i]) / upper[i, i]
            block[:, j + 1:] -= np.outer(errors[:, j], upper[i, i + 1:end])
        w[:, end:] -= errors @ upper[start:end, end:]
    return levels


def output_error(w: np.ndarray, dequantized: np.ndarray, gram: np.ndarray) -> float:
    """tr((W - W') H (W - W')^T): the squared output error over the calibration inputs."""
    diff = w.astype(np.float64) - dequantized
    return float(np.einsum("oi,ij,oj->", diff, gram, diff))


@register
@dataclass(frozen=True)
class GPTQ(QuantScheme, Pass):
    """Its options are the QuantScheme's (it rounds the layers insert-qdq will quantize, on the
    grid it would use) and ``damping``."""

    name = "gptq"
    summary = "round linear weights compensating each column's error on calibration inputs (needs range-analysis)"
    damping: float = 0.01

    def run(self, graph: Graph, ctx: PassContext) -> bool:
        self.check_scheme()
        if ctx.calibration is None:
            raise QCompilerError("gptq needs calibration data (its inputs' X^T X); a calibration record does not "
                                 "carry it")
        layers = [n for n in graph.nodes if n.op == "linear" and self.quantizes(n.op)
                  and not self.excluded(n.source, n.output.name) and n.inputs[1].is_constant
                  and n.inputs[1].dtype in FLOAT and n.inputs[0].range is not None
                  and max(abs(r) for r in n.inputs[0].range) <= self.max_abs_range]
        if not layers:
            return False
        grams = {id(n): np.zeros((n.inputs[1].shape[1],) * 2) for n in layers}
        for batch in calibration_set(graph, ctx.calibration):
            seen = values_of(graph, batch, [n.inputs[0] for n in layers])
            for n in layers:
                x = seen[id(n.inputs[0])].reshape(-1, n.inputs[1].shape[1]).astype(np.float64)
                grams[id(n)] += x.T @ x
        entries = [self._round(graph, n, grams[id(n)]) for n in layers]
        graph.remove_unused_constants()
        ctx.report["gptq"] = {"layers": entries}
        return True

    def _round(self, graph: Graph, node: Node, gram: np.ndarray) -> dict[str, object]:
        w = graph.constant_array(node.inputs[1]).astype(np.float64)
        nearest, scale = layer_weight(graph, node, self)
        groups = self.int4_groups(node)
        unit = np.broadcast_to(scale.astype(np.float64).reshape(-1, 1), w.shape)
        if groups is not None:
            multiplier = int4_grid(w, scale, groups.group_size)[1]
            step, limit = unit * multiplier, np.full(w.shape, Q_MAX)
        else:
            multiplier, step, limit = 1, unit, np.full(w.shape, 127)
        levels = gptq_round(w, step, limit, gram, self.damping)
        levels[~nearest.any(axis=1)] = 0  # dead channels stay zero channels
        q = (levels * multiplier).astype(np.int8)
        before = output_error(w, nearest.astype(np.float64) * unit, gram)
        after = output_error(w, q.astype(np.float64) * unit, gram)
        attach_quantized_weight(graph, node, 1, q, scale, groups)
        return {"layer": node.describe(), "error_vs_nearest": round(after / before, 4) if before > 0 else 1.0}
