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
        live = {id(node) for node in graph.live_nodes()}
        dead = [node for node in reversed(graph.nodes) if id(node) not in live]  # readers before what they read
        for node in dead:
            graph.remove_node(node)
        return bool(dead) | bool(graph.remove_unused_constants())
