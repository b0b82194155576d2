"""gptq: round each linear's and convolution's weights to the grid insert-qdq would use, column
by column, each column's rounding error pushed onto the columns not yet rounded (GPTQ, Frantar
et al. 2023; ONNX Runtime and AutoGPTQ use it for 4-bit weights).

Identity: for y = W x over the calibration inputs X, with H = X^T X, a rounded W' costs the
output error tr((W - W') H (W - W')^T). With U the upper Cholesky factor of H^-1, rounding
column i to q_i and then adding -(w_i - q_i) / U_ii * U_i,j to every later column j is the
least-squares best update of the columns still free (the optimal brain surgeon step), so the
error of the whole weight is at most what rounding to nearest leaves, usually well under it.

The grid is insert-qdq's own (same channel scales, bias floor, dead channels and int4 group
multipliers: ``layer_weight``); the pass writes the weight as ``dequantize(int8)``, which
insert-qdq keeps. Runs after range-analysis (the bias floor reads the input's range), before
bias-correction (which then corrects only the input quantization's share for these layers).

A convolution is a linear over its input windows: output channel o at a position is
W[o, :] . window, W flattened over (input channel, kernel positions) in that order, so X holds
one unfolded window per row (every position of every sample) and H = X^T X. A grouped
convolution is one such linear per group (its output channels read only its input channels):
one H per group; a depthwise one has a kernel-sized H per channel."""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from qcompiler.calibration import calibration_set
from qcompiler.calibration_record import set_corrected_bias
from qcompiler.errors import QCompilerError
from qcompiler.interpreter import values_of
from qcompiler.ir import Graph, Node
from qcompiler.ir.ops import traits_of
from qcompiler.ir.ops.quant import choose_qparams
from qcompiler.ir.packing import Q_MAX
from qcompiler.pipeline import Pass, PassContext, register
from qcompiler.progress import progress_bar
from qcompiler.quant_config import QuantScheme

from .insert_qdq import FLOAT, attach_quantized_weight, bias_scale_floor, int4_grid, layer_weight

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
    upper = inverse_upper_cholesky(gram)
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


def conv_windows(x: np.ndarray, kernel: tuple[int, ...], attrs: dict, groups: int) -> np.ndarray:
    """The input windows a convolution with ``kernel`` (spatial extents) and ``attrs`` (strides,
    pads, dilations) multiplies its flattened weight by: [groups, samples x positions,
    channels / groups x kernel size], columns in the weight's (channel, kernel...) order."""
    rank = len(kernel)
    pads = attrs["pads"]
    x = np.pad(x, [(0, 0), (0, 0)] + [(pads[i], pads[i + rank]) for i in range(rank)])
    extent = tuple((k - 1) * d + 1 for k, d in zip(kernel, attrs["dilations"]))
    windows = sliding_window_view(x, extent, axis=tuple(range(2, 2 + rank)))  # [N, C, *P, *extent]
    windows = windows[(slice(None), slice(None)) + tuple(slice(None, None, s) for s in attrs["strides"])
                      + tuple(slice(None, None, d) for d in attrs["dilations"])]  # [N, C, *out, *kernel]
    n, channels = x.shape[:2]
    out = windows.shape[2:2 + rank]
    windows = windows.reshape(n, groups, channels // groups, *out, *kernel)
    order = (1, 0, *range(3, 3 + rank), 2, *range(3 + rank, 3 + 2 * rank))  # [G, N, *out, C/G, *kernel]
    return windows.transpose(order).reshape(groups, -1, channels // groups * math.prod(kernel))


def layer_rows(node: Node, x: np.ndarray) -> np.ndarray:
    """``node``'s input ``x`` as the rows its flattened weight multiplies: [groups, rows, columns]
    (a linear: one group, its input's vectors; a convolution: its windows per group)."""
    w = node.inputs[1]
    if traits_of(node.op).family == "conv":
        return conv_windows(x, w.shape[2:], node.attrs, node.attrs["groups"])
    return x.reshape(1, -1, w.shape[1])


def inverse_upper_cholesky(gram: np.ndarray) -> np.ndarray:
    """U upper triangular with U^T U = gram^-1, from one Cholesky factorization and one triangular
    inverse (a third of inverting, then factoring). Identity: with P the reversal permutation and
    P gram P = L L^T, gram^-1 = (P L^-T P)(P L^-1 P), and P L^-1 P is upper triangular."""
    import torch  # here, not at import: importing qcompiler must not load torch (test_layering)

    lower = torch.linalg.cholesky(torch.from_numpy(np.ascontiguousarray(gram[::-1, ::-1])))
    inverse = torch.linalg.solve_triangular(lower, torch.eye(len(gram), dtype=lower.dtype), upper=False)
    return inverse.numpy()[::-1, ::-1]


class Moments:
    """Sums over rows X [groups, rows, columns] (float32 products, summed in float64): X^T X, the
    row sum and the count, from which the centered X^T X - n m m^T (m the mean row)."""

    def __init__(self) -> None:
        self.gram: np.ndarray | float = 0.0
        self.total: np.ndarray | float = 0.0
        self.count = 0

    def add(self, rows: np.ndarray) -> None:
        self.gram = self.gram + np.matmul(rows.transpose(0, 2, 1), rows).astype(np.float64)
        self.total = self.total + rows.sum(axis=1, dtype=np.float64)
        self.count += rows.shape[1]

    def __add__(self, other: Moments) -> Moments:
        both = Moments()
        both.gram, both.total, both.count = self.gram + other.gram, self.total + other.total, self.count + other.count
        return both

    def mean(self) -> np.ndarray:
        return self.total / max(self.count, 1)

    def centered(self, noise: float = 0.0) -> np.ndarray:
        """The centered X^T X of rows that carry independent noise of variance ``noise`` per
        element (which adds ``count * noise`` to its diagonal)."""
        gram = self.gram - np.einsum("gi,gj->gij", self.total, self.total) / max(self.count, 1)
        return gram + self.count * noise * np.eye(gram.shape[-1])


def output_error(w: np.ndarray, dequantized: np.ndarray, gram: np.ndarray) -> float:
    """tr((W - W') H (W - W')^T): the squared output error over the calibration inputs."""
    diff = w.astype(np.float64) - dequantized
    return float(((diff @ gram) * diff).sum())


@register
@dataclass(frozen=True)
class GPTQ(QuantScheme, Pass):
    """Its options are the QuantScheme's (it rounds the layers insert-qdq will quantize, on the
    grid it would use) and ``damping``."""

    name = "gptq"
    summary = ("round linear and conv weights compensating each column's error on calibration inputs "
               "(needs range-analysis)")
    damping: float = 0.01

    def run(self, graph: Graph, ctx: PassContext) -> bool:
        self.check_scheme()
        if ctx.calibration is None:
            raise QCompilerError("gptq needs calibration data (its inputs' X^T X); a calibration record does not "
                                 "carry it")
        layers = [n for n in graph.nodes if traits_of(n.op).family in ("linear", "conv") and self.quantizes(n.op)
                  and not self.excluded(n.source, n.output.name) and n.inputs[1].is_constant
                  and n.inputs[1].dtype in FLOAT and n.inputs[0].range is not None
                  and max(abs(r) for r in n.inputs[0].range) <= self.max_abs_range]
        if not layers:
            return False
        halves = {id(n): [Moments(), Moments()] for n in layers}  # of each half of the calibration data
        batches = calibration_set(graph, ctx.calibration)
        with progress_bar("gptq: collecting X^T X", batches.count, ctx.progress) as advance:
            for index, batch in enumerate(batches):
                seen = values_of(graph, batch, [n.inputs[0] for n in layers])
                for n in layers:
                    rows = layer_rows(n, seen[id(n.inputs[0])].astype(np.float32))
                    parts = [(index % 2, rows)] if batches.count > 1 else \
                        [(0, rows[:, :rows.shape[1] // 2]), (1, rows[:, rows.shape[1] // 2:])]
                    for half, part in parts:
                        halves[id(n)][half].add(part)
                advance()
        entries = [self._round(graph, n, *halves[id(n)]) for n in layers]
        graph.remove_unused_constants()
        ctx.report["gptq"] = {"layers": entries}
        return True

    def _round(self, graph: Graph, node: Node, fit: Moments, check: Moments) -> dict[str, object]:
        """Round ``node``'s weight with GPTQ on ``fit`` + ``check`` (the moments of two halves
        of the calibration data, per group of output channels) if GPTQ fitted on ``fit`` alone
        leaves less output error than rounding to nearest on ``check``; else leave it to
        insert-qdq: with fewer calibration rows than a layer has inputs, GPTQ fits the
        calibration data and does worse elsewhere (a held-out check, per layer).

        The error is split as tr(E X^T X E^T) = tr(E C E^T) + n |E m|^2 (E the weight's error,
        m the mean row, C the centered X^T X): GPTQ minimizes the first on C and the bias absorbs
        the second (b - E m); bias-correction then adds only the input quantization's share. On X^T X
        itself, GPTQ spends its freedom on the mean (a ReLU's output is mostly its mean). And the
        layer will read its input quantized, x + d with d's elements independent of variance
        s_x^2 / 12 (uniform rounding error), so the error it minimizes is tr(E (C + n s_x^2/12 I)
        E^T): without that term it pushes error into directions the calibration rows never take
        (fewer rows than inputs), where the rounding noise of the input then finds it."""
        shape = node.inputs[1].shape
        w = graph.constant_array(node.inputs[1]).astype(np.float64).reshape(shape[0], -1)
        x_scale = None if self.is_weight_only(node) else float(choose_qparams(*node.inputs[0].range,
                                                                              self.activation_dtype)[0])
        nearest, scale = layer_weight(graph, node, self, x_scale)
        nearest = nearest.reshape(w.shape).astype(np.float64)
        groups = self.int4_groups(node)
        unit = np.broadcast_to(scale.astype(np.float64).reshape(-1, 1), w.shape)
        if groups is not None:
            multiplier = int4_grid(w, scale, groups.group_size)[1]
            step, limit = unit * multiplier, np.full(w.shape, Q_MAX)
        else:
            multiplier, step, limit = np.ones(w.shape), unit, np.full(w.shape, 127)
        dead = ~nearest.any(axis=1)
        both = fit + check
        per_group = w.shape[0] // len(both.total)
        spans = [slice(g * per_group, (g + 1) * per_group) for g in range(len(both.total))]

        def rounded(grams: np.ndarray) -> np.ndarray:
            levels = np.zeros_like(w)
            for rows, gram in zip(spans, grams):
                levels[rows] = gptq_round(w[rows], step[rows], limit[rows], gram, self.damping)
            levels[dead] = 0  # dead channels stay zero channels
            return levels * multiplier  # int8 values (4-bit ones times their group multipliers)

        def error(q: np.ndarray, grams: np.ndarray) -> float:
            return sum(output_error(w[rows], q[rows] * unit[rows], gram) for rows, gram in zip(spans, grams))

        noise = 0.0 if x_scale is None or self.runs_dynamic(node) else x_scale ** 2 / 12
        check_grams = check.centered(noise)
        held_out = error(rounded(fit.centered(noise)), check_grams) / max(error(nearest, check_grams),
                                                                         np.finfo(float).tiny)
        entry: dict[str, object] = {"layer": node.describe(), "held_out_error_vs_nearest": round(held_out, 4)}
        if held_out >= 1:
            return {**entry, "rounding": "nearest (left to insert-qdq)"}
        grams = both.centered(noise)
        q = rounded(grams)
        shift = np.concatenate([-(q[rows] * unit[rows] - w[rows]) @ m for rows, m in zip(spans, both.mean())])
        slot = traits_of(node.op).bias_slot
        bias = graph.constant_array(node.inputs[slot]).astype(np.float64) if len(node.inputs) > slot \
            else np.zeros(shape[0])
        if x_scale is not None:  # a channel whose shifted bias would not fit int32 on this scale keeps its bias
            shift = np.where(bias_scale_floor(bias + shift, x_scale, shape[0]) <= scale.astype(np.float64), shift, 0.0)
        set_corrected_bias(graph, node, bias + shift)
        attach_quantized_weight(graph, node, 1, q.astype(np.int8).reshape(shape), scale, groups)
        return {**entry, "rounding": "gptq", "error_vs_nearest": round(error(q, grams) / max(error(nearest, grams),
                                                                                              np.finfo(float).tiny), 4)}
