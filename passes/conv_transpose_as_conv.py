"""conv-transpose-as-conv: a transposed convolution (segmentation and text-detection heads,
FPN upsampling) rewritten as the ordinary convolution it equals, so quantization runs it on
the int8 convolution kernels instead of leaving it float.

Identity (per spatial axis, stride s, dilation d, kernel k, pads p_b/p_e, output padding o):
conv_transpose(x, w) == conv(z, w'), where z is x with s - 1 zeros inserted between neighbours
(extent (n - 1) s + 1), padded by d (k - 1) - p_b before and d (k - 1) - p_e + o after (a
negative pad crops), and w' is w with its spatial axes flipped and, per group, its in/out
channel axes swapped ([C_in, C_out/g, k..] -> [C_out, C_in/g, k..]); stride 1, dilation d,
same groups and bias. Zeros are inserted by a reshape, a pad and a reshape, which quantization
keeps exact (a zero is the zero point). The convolution multiplies the inserted zeros too:
stride^rank times the MACs of a direct kernel, still int8."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from qcompiler.ir import Graph, Node
from qcompiler.ir.ops import traits_of
from qcompiler.pipeline import Pass, PassContext, apply_rules, matches, register


def _conv_weight(w: np.ndarray, groups: int) -> np.ndarray:
    """[C_in, C_out/g, k..] -> [C_out, C_in/g, k..], spatial axes flipped."""
    c_in, c_out_g = w.shape[:2]
    spatial = w.shape[2:]
    grouped = w.reshape(groups, c_in // groups, c_out_g, *spatial).swapaxes(1, 2)
    flipped = np.flip(grouped, axis=tuple(range(3, 3 + len(spatial))))
    return np.ascontiguousarray(flipped.reshape(groups * c_out_g, c_in // groups, *spatial))


@matches("conv_transpose1d", "conv_transpose2d", "conv_transpose3d")
def conv_transpose_to_conv(graph: Graph, node: Node) -> bool:
    """The identity in the module docstring, where the weight is a constant."""
    traits = traits_of(node.op)
    if traits.family != "conv_transpose" or not node.inputs[1].is_constant:
        return False
    rank = traits.spatial_rank
    x = node.inputs[0]
    w = graph.constant_array(node.inputs[1])
    strides, dilations = node.attrs["strides"], node.attrs["dilations"]
    pads, extra = node.attrs["pads"], node.attrs["output_padding"]
    kernel = w.shape[2:]
    n, c, *size = x.shape
    value = x
    if any(s > 1 for s in strides):  # x[.., i, ..] at i * s, zeros between: [.., n, 1, ..] padded to [.., n, s, ..]
        spread = [n, c]
        for extent in size:
            spread += [extent, 1]
        value = graph.add_node("reshape", [value], {"shape": spread}, before=node).output
        widths = [0] * (2 * len(spread))
        for i, s in enumerate(strides):
            widths[len(spread) + 3 + 2 * i] = s - 1  # after each inserted axis
        value = graph.add_node("pad", [value], {"pads": widths}, before=node).output
        value = graph.add_node("reshape", [value], {"shape": [n, c, *(e * s for e, s in zip(size, strides))]},
                               before=node).output
    begins = [d * (k - 1) - pads[i] for i, (d, k) in enumerate(zip(dilations, kernel))]
    ends = [d * (k - 1) - pads[rank + i] + extra[i] - (strides[i] - 1)
            for i, (d, k) in enumerate(zip(dilations, kernel))]
    if any(begins) or any(ends):
        value = graph.add_node("pad", [value], {"pads": [0, 0, *begins, 0, 0, *ends]}, before=node).output
    weight = graph.add_constant(f"{node.inputs[1].name}.as_conv", _conv_weight(w, node.attrs["groups"]))
    conv = graph.add_node(traits.quantized_as, [value, weight, *node.inputs[2:]],
                          {"strides": [1] * rank, "dilations": list(dilations), "pads": [0] * (2 * rank),
                           "groups": node.attrs["groups"]}, meta=dict(node.meta), before=node).output
    if conv.shape != node.output.shape:  # the identity fixes the shape: a mismatch is a bug in this rule
        raise AssertionError(f"{node.describe()}: rewritten as {conv.shape}, not {node.output.shape}")
    graph.replace_all_uses(node.output, conv)
    graph.remove_node(node)
    return True


@register
@dataclass(frozen=True)
class ConvTransposeAsConv(Pass):
    name = "conv-transpose-as-conv"
    summary = "transposed convolutions with constant weights as the ordinary convolution they equal (int8-able)"

    def run(self, graph: Graph, ctx: PassContext) -> bool:
        hits = apply_rules(graph, [conv_transpose_to_conv])
        return any(hits.values())
