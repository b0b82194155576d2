"""fold-constants: evaluate nodes whose inputs are all constants (weight transposes and
reshapes, shape arithmetic) with the reference kernels, replacing them by constants.
Identity: op(c1, ..., cn) == constant(kernel(c1, ..., cn)) for deterministic ops.

With ``keep_quantized_weights``, a ``dequantize`` of an 8-bit constant is left alone: it is a
quantized model's weight (ONNX Runtime's or NNCF's QDQ form), whose integer values and scales
lower-integer builds the integer op from; folded to float, the layer could only run in float.
``compile`` of a model quantized elsewhere folds with it, lowers, then folds what lower-integer
did not take; a model being calibrated folds them (its weights are quantized again)."""
from __future__ import annotations

from dataclasses import dataclass

from qcompiler.ir import Graph
from qcompiler.ir.ops import get_op
from qcompiler.pipeline import Pass, PassContext, register


@register
@dataclass(frozen=True)
class FoldConstants(Pass):
    name = "fold-constants"
    summary = "evaluate nodes whose inputs are all constants (results up to max_elements)"
    max_elements: int = 1 << 22
    keep_quantized_weights: bool = False

    def run(self, graph: Graph, ctx: PassContext) -> bool:
        changed = False
        for node in list(graph.nodes):
            if not node.inputs or not all(v.is_constant for v in node.inputs):
                continue
            if self.keep_quantized_weights and node.op == "dequantize" and node.inputs[0].dtype in ("u8", "i8"):
                continue
            if any(v.type.size > self.max_elements for v in node.outputs):
                continue  # folding would bloat the model with a large materialized tensor
            results = get_op(node.op).run([graph.constant_array(v) for v in node.inputs], node.attrs)
            for value, array in zip(node.outputs, results):
                folded = graph.add_constant(f"{node.source or node.op}.folded",
                                            array.astype(value.type.np_dtype).reshape(value.shape))
                graph.replace_all_uses(value, folded)
            graph.remove_node(node)
            changed = True
        if changed:
            graph.remove_unused_constants()
        return changed
