"""fuse-activations: an activation that alone consumes a conv/linear/matmul result becomes
that node's `activation` attribute, so integer lowering and targets see one unit.

Identity: act(op(x, w)) == op{activation=act}(x, w), where the fused kernel applies the same
activation kernel to the same result."""
from __future__ import annotations

from dataclasses import dataclass

from qcompiler.ir import Graph, Node
from qcompiler.ir.ops import ops_where, traits_of
from qcompiler.pipeline import Pass, PassContext, apply_rules, register

# what the `ops` option names: every op the registry calls fusible, and relu6 (clip to [0, 6])
FUSIBLE = ("relu6", *ops_where(fusible=True))


def _activation_of(node: Node) -> tuple[str, str, tuple[float, ...]] | None:
    """(option name, activation attribute, activation args) for a fusible activation node."""
    if node.op == "clip":
        bounds = (node.attrs["min"], node.attrs["max"])
        return ("relu6" if bounds == (0.0, 6.0) else "clip"), "clip", bounds
    if node.op == "gelu":
        return "gelu", "gelu_tanh" if node.attrs["approximate"] == "tanh" else "gelu", ()
    if node.op == "hardsigmoid" and (node.attrs["alpha"], node.attrs["beta"]) != (1 / 6, 0.5):
        return None  # only PyTorch's hardsigmoid is a fused activation
    if traits_of(node.op).fusible:
        return node.op, node.op, ()
    return None


@register
@dataclass(frozen=True)
class FuseActivations(Pass):
    name = "fuse-activations"
    summary = "fold relu/relu6/clip/hardswish/gelu/silu/... into the conv, linear or matmul before it"
    ops: tuple[str, ...] = FUSIBLE

    def run(self, graph: Graph, ctx: PassContext) -> bool:
        unknown = set(self.ops) - set(FUSIBLE)
        if unknown:
            raise ValueError(f"fuse-activations: unknown ops {sorted(unknown)} (fusible: {', '.join(FUSIBLE)})")

        def fuse_activation_into_producer(graph: Graph, act: Node) -> bool:
            found = _activation_of(act)
            if found is None or found[0] not in self.ops:
                return False
            producer = act.inputs[0].producer
            if producer is None or not traits_of(producer.op).fuses_activation:
                return False
            if producer.attrs["activation"] != "none":
                return False
            if producer.output in graph.outputs or len(graph.users_of(producer.output)) != 1:
                return False  # the un-activated result is needed elsewhere
            if producer.output.dtype not in ("f32", "f16", "f64"):
                return False
            producer.attrs = {**producer.attrs, "activation": found[1], "activation_args": found[2]}
            graph.replace_all_uses(act.output, producer.output)
            graph.remove_node(act)
            return True

        return bool(apply_rules(graph, [fuse_activation_into_producer])["fuse_activation_into_producer"])
