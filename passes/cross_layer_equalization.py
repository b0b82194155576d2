"""equalize-cross-layer: balance the weight ranges of two consecutive layers channel by channel
(cross-layer equalization, Nagel et al. 2019), so per-tensor weight scales stop crushing the
small channels. Depthwise-separable nets need it most: batch-norm folding leaves a depthwise
convolution's channels with ranges 100x apart, and one int8 scale for all of them rounds the
small ones to a few levels.

Identity: for a layer A whose output channel c feeds layer B's input channel c through ops that
commute with a positive per-channel factor (relu and leaky relu: f(x / s) = f(x) / s for s > 0;
max and average pooling act per channel), B(f(A(x))) == B'(f(A'(x))) with A' = A's weight rows
and bias of channel c divided by s_c, B' = B's weights reading channel c multiplied by s_c. With
r1_c = max|A's weights of channel c| and r2_c = max|B's weights reading c|, s_c = sqrt(r1_c / r2_c)
gives both the same range sqrt(r1_c r2_c), which maximizes the precision both keep per channel
(the paper's proof). Chains (A -> B -> C) are swept until the factors settle.

A clip such as relu6 does not commute (clip(x / s, 0, 6) != clip(x, 0, 6) / s): such pairs are
left alone and listed in the report, as are channels with a zero range (dead channels keep
their zeros)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from qcompiler.ir import Graph, Node
from qcompiler.ir.ops import traits_of
from qcompiler.pipeline import Pass, PassContext, register

FLOAT = ("f32", "f64")
# ops between the two layers through which a positive per-channel factor passes unchanged
CHANNELWISE = ("relu", "leaky_relu", "max_pool1d", "max_pool2d", "max_pool3d", "avg_pool1d", "avg_pool2d",
               "avg_pool3d", "adaptive_avg_pool2d")
HOMOGENEOUS_ACTIVATIONS = ("none", "relu")
SWEEPS = 100  # chains settle geometrically (a factor ~0.75 a sweep); the bound keeps a pathological one finite
SETTLED = 1e-3  # largest |log s| of a sweep below which the factors count as settled (0.1 %)


@dataclass
class Pair:
    """A layer ``first`` whose output channels feed ``second``'s input channels."""
    first: Node
    second: Node


def _weighted(graph: Graph, node: Node) -> bool:
    """A conv or linear with constant float weights (and bias) that no other node shares."""
    family = traits_of(node.op).family
    if family not in ("conv", "linear") or not all(v.is_constant for v in node.inputs[1:3]):
        return False
    return node.inputs[1].dtype in FLOAT and all(len(graph.users_of(v)) == 1 for v in node.inputs[1:3])


def _in_channels(node: Node) -> int:
    w = node.inputs[1].shape
    return w[1] * node.attrs["groups"] if traits_of(node.op).family == "conv" else w[1]


def _follower(graph: Graph, node: Node) -> Node | None:
    """The layer reading ``node``'s output channels through channel-wise ops only, if any."""
    value = node.output
    while True:
        users = graph.users_of(value)
        if len(users) != 1 or value in graph.outputs:
            return None
        user = users[0]
        if user.op not in CHANNELWISE:
            break
        value = user.output
    if not _weighted(graph, user) or user.inputs[0] is not value:
        return None
    if traits_of(user.op).family != traits_of(node.op).family:
        return None  # a conv's channels are axis 1, a linear's the last: no common axis
    return user if _in_channels(user) == node.inputs[1].shape[0] else None


def find_pairs(graph: Graph) -> tuple[list[Pair], list[dict[str, str]]]:
    """Every equalizable pair, and the layers a clip-like fused activation keeps from one."""
    pairs, blocked = [], []
    for node in graph.nodes:
        second = _follower(graph, node) if _weighted(graph, node) else None
        if second is None:
            continue
        activation = node.attrs.get("activation", "none")
        if activation in HOMOGENEOUS_ACTIVATIONS:
            pairs.append(Pair(node, second))
        else:
            blocked.append({"layer": node.source, "next": second.source,
                            "why": f"its fused {activation} does not commute with a per-channel factor"})
    return pairs, blocked


def _read_channel(second: Node) -> np.ndarray:
    """``[out, in / groups]``: the input channel each (output row, input column) of ``second``'s
    weight reads (a grouped convolution's group g reads channels g*k..g*k+k-1, k per group,
    with its own output rows)."""
    w = second.inputs[1].shape
    groups = second.attrs["groups"] if traits_of(second.op).family == "conv" else 1
    group_of_row = np.arange(w[0]) // (w[0] // groups)
    return group_of_row[:, None] * w[1] + np.arange(w[1])[None, :]


def equalize(arrays: dict[int, np.ndarray], pair: Pair) -> float:
    """Equalize one pair in ``arrays`` (constant id -> array, updated in place); the largest
    |log s| it applied."""
    w1, w2 = arrays[id(pair.first.inputs[1])], arrays[id(pair.second.inputs[1])]
    channels = w1.shape[0]
    read = _read_channel(pair.second)
    r1 = np.abs(w1.reshape(channels, -1)).max(axis=1).astype(np.float64)
    r2 = np.zeros(channels)
    np.maximum.at(r2, read.ravel(), np.abs(w2.reshape(*read.shape, -1)).max(axis=2).ravel())
    live = (r1 > 0) & (r2 > 0)
    s = np.ones(channels)
    s[live] = np.sqrt(r1[live] / r2[live])
    arrays[id(pair.first.inputs[1])] = (w1 / s.reshape((channels,) + (1,) * (w1.ndim - 1))).astype(w1.dtype)
    if len(pair.first.inputs) > 2:
        b1 = arrays[id(pair.first.inputs[2])]
        arrays[id(pair.first.inputs[2])] = (b1 / s).astype(b1.dtype)
    factor = s[read].reshape(read.shape + (1,) * (w2.ndim - 2))
    arrays[id(pair.second.inputs[1])] = (w2 * factor).astype(w2.dtype)
    return float(np.abs(np.log(s)).max()) if channels else 0.0


@register
@dataclass(frozen=True)
class EqualizeCrossLayer(Pass):
    name = "equalize-cross-layer"
    summary = "balance consecutive conv/linear weight ranges per channel (cross-layer equalization; data-free)"

    def run(self, graph: Graph, ctx: PassContext) -> bool:
        pairs, blocked = find_pairs(graph)
        report: dict[str, Any] = {"pairs": [], "blocked": blocked}
        ctx.report["cross_layer_equalization"] = report
        if not pairs:
            return False
        constants = {id(v): v for p in pairs for n in (p.first, p.second) for v in n.inputs[1:3]}
        arrays = {key: graph.constant_array(v).copy() for key, v in constants.items()}
        before = [_spread(arrays[id(p.first.inputs[1])]) for p in pairs]
        sweeps = 0
        for sweeps in range(1, SWEEPS + 1):
            if max(equalize(arrays, p) for p in pairs) < SETTLED:
                break
        report["sweeps"] = sweeps
        report["pairs"] = [{"first": p.first.source, "second": p.second.source, "channel_range_spread_before": b,
                            "channel_range_spread_after": _spread(arrays[id(p.first.inputs[1])])}
                           for p, b in zip(pairs, before)]
        equalized = {key: graph.add_constant(f"{v.name}.equalized", arrays[key]) for key, v in constants.items()}
        for node in {id(n): n for p in pairs for n in (p.first, p.second)}.values():
            node.inputs = [equalized.get(id(v), v) for v in node.inputs]
        graph.remove_unused_constants()
        return True


def _spread(w: np.ndarray) -> float:
    """max / min of a weight's live output-channel ranges: what one per-tensor scale spans."""
    ranges = np.abs(w.reshape(w.shape[0], -1)).max(axis=1)
    live = ranges[ranges > 0]
    return round(float(live.max() / live.min()), 3) if live.size else 1.0
