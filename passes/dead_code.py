"""eliminate-dead-code: remove nodes none of whose outputs reach a graph output, and constants
no node reads."""
from __future__ import annotations

from dataclasses import dataclass

from qcompiler.ir import Graph
from qcompiler.pipeline import Pass, PassContext, register


@register
@dataclass(frozen=True)
class EliminateDeadCode(Pass):
    name = "eliminate-dead-code"
    summary = "remove nodes whose results are never used, and unused constants"

    def run(self, graph: Graph, ctx: PassContext) -> bool:
        live = {id(v) for v in graph.outputs}
        dead = []
        for node in reversed(graph.nodes):
            if any(id(v) in live for v in node.outputs):
                live.update(id(v) for v in node.inputs)
            else:
                dead.append(node)
        for node in dead:
            graph.remove_node(node)
        return bool(dead) | bool(graph.remove_unused_constants())
