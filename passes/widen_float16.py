"""widen-float16: compute a float16 model in float32 between its float16 inputs and outputs.

Published models often ship in float16 (weights halved for download). Quantization needs float32
arithmetic around the int8 layers: observers, scales, bias correction and the float32
requantization epilogues are float32, and x86 CPUs have no float16 arithmetic (LLVM rounds
after every op). Identity relied on: every float16 number is exactly a float32 number, so
widening constants and inputs loses nothing; results differ from float16 evaluation only by
float16's own rounding, which float32 does not repeat. The model's interface is unchanged: its
float16 inputs are cast up on entry and its float16 outputs cast back on exit.

Refused (the graph left as it is, and the report says why) when a bitcast reads or makes a
float16 value: reinterpreting bits depends on the width."""
from __future__ import annotations

from dataclasses import dataclass

from qcompiler.ir import Graph, Value
from qcompiler.ir.ops import get_op
from qcompiler.pipeline import Pass, PassContext, register


def _float16_values(graph: Graph) -> bool:
    return any(v.dtype == "f16" for v in graph.inputs) or any(
        v.dtype == "f16" for node in graph.nodes for v in (*node.inputs, *node.outputs))


def _widen_constant(graph: Graph, value: Value) -> Value:
    return graph.add_constant(f"{value.name}.f32", graph.constant_array(value).astype("float32"))


@register
@dataclass(frozen=True)
class WidenFloat16(Pass):
    name = "widen-float16"
    summary = "compute float16 models in float32 (inputs and outputs stay float16)"

    def run(self, graph: Graph, ctx: PassContext) -> bool:
        if not _float16_values(graph):
            return False
        bitcast = next((n for n in graph.nodes if n.op == "bitcast"
                        and "f16" in (n.inputs[0].dtype, n.output.dtype)), None)
        if bitcast is not None:
            ctx.report.setdefault("widen_float16", {})["refused"] = \
                f"{bitcast.describe()} reinterprets float16 bits: the model is computed in float16"
            return False
        output_names = [v.name for v in graph.outputs]
        narrow_outputs = [v.dtype == "f16" for v in graph.outputs]
        first = graph.nodes[0] if graph.nodes else None
        for x in [v for v in graph.inputs if v.dtype == "f16"]:
            users = graph.users_of(x)
            wide = graph.add_node("cast", [x], {"to": "f32"}, name=f"{x.name}.f32", before=first).output
            for user in users:  # an input that is also an output stays one, float16
                user.inputs = [wide if v is x else v for v in user.inputs]
        widened: dict[int, Value] = {}
        for node in list(graph.nodes):
            if node.op == "cast" and node.attrs["to"] == "f16":
                node.attrs = {**node.attrs, "to": "f32"}
            inputs = list(node.inputs)
            for i, v in enumerate(inputs):
                if v.is_constant and v.dtype == "f16":
                    inputs[i] = widened.setdefault(id(v), _widen_constant(graph, v))
            if any(a is not b for a, b in zip(inputs, node.inputs)):
                node.inputs = inputs
            for v, t in zip(node.outputs, get_op(node.op).infer([v.type for v in node.inputs], node.attrs)):
                v.type = t
        outputs = [graph.add_node("cast", [v], {"to": "f16"}, name=f"{v.name}.f16").output
                   if narrow and v.dtype != "f16" else v for v, narrow in zip(graph.outputs, narrow_outputs)]
        graph.set_outputs(outputs)
        graph.name_outputs(output_names)
        graph.remove_unused_constants()
        ctx.report.setdefault("widen_float16", {})["widened"] = True
        return True
