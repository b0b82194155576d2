"""factorize-low-rank: a linear or convolution whose weight is nearly low-rank becomes two thinner
layers (quantized low-rank factorization): fewer weight bytes and multiply-adds, each factor then
quantized like any layer.

Identity (Eckart-Young): with W = U diag(s) V^T (W a linear's [out, in] weight, or a convolution's
[out, in * k] with k its window size), W_r = (U_r diag(s_r)^1/2)(diag(s_r)^1/2 V_r^T) is the
closest rank-r matrix to W in the Frobenius norm, and its error is the energy left out:
||W - W_r||^2 = sum_{i>r} s_i^2. So linear(x, W, b) ~ linear(linear(x, A), B, b) and
conv(x, W, b) ~ conv_1x1(conv(x, A), B, b), with A = diag(s_r)^1/2 V_r^T ([r, in], or [r, in, window]
with W's strides, pads and dilations) and B = U_r diag(s_r)^1/2 ([out, r], or [out, r, 1, ...]); the
bias and the fused activation stay on the second. r is the smallest rank keeping ``energy`` of
sum s_i^2; the split of diag(s) between the factors gives both the same scale, so neither is
crushed by per-channel int8. A layer is factored only where r * (in * k + out) < out * in * k,
which is the saving in weights and in multiply-adds alike (per output position); grouped
convolutions and weights that are not constants are left alone."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from qcompiler.ir import Graph, Node
from qcompiler.ir.ops import traits_of
from qcompiler.pipeline import Pass, PassContext, register


def _factorable(node: Node) -> bool:
    traits = traits_of(node.op)
    if traits.family not in ("linear", "conv") or not node.inputs[1].is_constant:
        return False
    if node.inputs[1].dtype not in ("f32", "f64", "f16"):
        return False
    return traits.family == "linear" or node.attrs["groups"] == 1


def rank_for(singular: np.ndarray, energy: float) -> int:
    """The smallest r whose first r singular values hold ``energy`` of the sum of their squares."""
    squares = np.square(singular.astype(np.float64))
    total = squares.sum()
    if total == 0:
        return 0
    return int(np.searchsorted(np.cumsum(squares) / total, energy - 1e-12) + 1)


def _factor(graph: Graph, node: Node, energy: float) -> dict[str, Any]:
    """Replace ``node`` by its two factors when that saves; what it did (or why not), for the report."""
    w = graph.constant_array(node.inputs[1])
    out, fan_in = w.shape[0], int(np.prod(w.shape[1:]))
    u, s, vt = np.linalg.svd(w.reshape(out, fan_in).astype(np.float64), full_matrices=False)
    rank = max(rank_for(s, energy), 1)
    before, after = out * fan_in, rank * (fan_in + out)
    source = node.meta.get("source", node.outputs[0].name)
    if after >= before:
        return {"layer": source, "op": node.op, "rank": rank, "full_rank": int(min(out, fan_in)), "factored": False,
                "why": f"rank {rank} keeps {energy:g} of the energy: its factors would hold {after} weights, "
                       f"the layer holds {before}"}
    root = np.sqrt(s[:rank])
    first_w = (root[:, None] * vt[:rank]).reshape((rank, *w.shape[1:])).astype(w.dtype)
    second_w = (u[:, :rank] * root[None, :]).astype(w.dtype)
    kept_energy = float(np.square(s[:rank]).sum() / max(np.square(s).sum(), 1e-300))
    first_attrs = {k: v for k, v in node.attrs.items() if k not in ("activation", "activation_args")}
    if traits_of(node.op).family == "conv":
        spatial = w.ndim - 2
        second_w = second_w.reshape((out, rank) + (1,) * spatial)
        second_attrs = {"strides": (1,) * spatial, "pads": (0,) * (2 * spatial), "dilations": (1,) * spatial,
                        "groups": 1, "activation": node.attrs["activation"],
                        "activation_args": node.attrs["activation_args"]}
    else:
        second_attrs = {"activation": node.attrs["activation"], "activation_args": node.attrs["activation_args"]}
    name = node.inputs[1].name
    first = graph.add_node(node.op, [node.inputs[0], graph.add_constant(f"{name}.low_rank_a", first_w)], first_attrs,
                           name=f"{node.outputs[0].name}.low_rank", meta={"source": f"{source}.low_rank_a"},
                           before=node)
    node.inputs = [first.outputs[0], graph.add_constant(f"{name}.low_rank_b", second_w), *node.inputs[2:]]
    node.attrs = {**node.attrs, **second_attrs}
    node.meta["source"] = f"{source}.low_rank_b"
    shape = node.outputs[0].shape  # per sample: a linear's positions lie between batch and features
    positions = int(np.prod(shape[1:-1] if traits_of(node.op).family == "linear" else shape[2:]))
    return {"layer": source, "op": node.op, "rank": rank, "full_rank": int(min(out, fan_in)), "factored": True,
            "energy_kept": round(kept_energy, 6), "params_before": before, "params_after": after,
            "macs_before": before * positions, "macs_after": after * positions}


@register
@dataclass(frozen=True)
class FactorizeLowRank(Pass):
    name = "factorize-low-rank"
    summary = "split a linear/conv whose weight is nearly low-rank into two thinner layers (keeps `energy`)"
    energy: float = 0.95

    def run(self, graph: Graph, ctx: PassContext) -> bool:
        if not 0.0 < self.energy <= 1.0:
            raise ValueError(f"factorize-low-rank: energy {self.energy} must be in (0, 1]")
        considered = [_factor(graph, node, self.energy) for node in list(graph.nodes) if _factorable(node)]
        done = [entry for entry in considered if entry.pop("factored")]
        ctx.report["low_rank"] = {"energy": self.energy, "layers": done,
                                  "left_alone": [e for e in considered if e not in done]}
        if done:
            graph.remove_unused_constants()
        return bool(done)
