"""eliminate-common-subexpressions: nodes with the same op, the same operands and the same
attributes compute the same values (every IR op is pure), so later duplicates are replaced by
the first. Constants with identical dtype, shape and bytes are merged first, so duplicates
that differ only in which copy of a constant they read are found too."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from qcompiler.ir import Graph, Value
from qcompiler.pipeline import Pass, PassContext, register


def _merge_duplicate_constants(graph: Graph) -> bool:
    first: dict[tuple[Any, ...], Value] = {}
    replace: dict[Value, Value] = {}
    for name, array in graph.constants.items():
        key = (array.dtype.str, array.shape, array.tobytes())
        value = graph.constant_value(name)
        if key in first:
            replace[value] = first[key]
        else:
            first[key] = value
    for old, new in replace.items():
        graph.replace_all_uses(old, new)
    if replace:
        graph.remove_unused_constants()
    return bool(replace)


@register
@dataclass(frozen=True)
class EliminateCommonSubexpressions(Pass):
    name = "eliminate-common-subexpressions"
    summary = "merge identical constants and nodes computing the same op on the same operands"

    def run(self, graph: Graph, ctx: PassContext) -> bool:
        changed = _merge_duplicate_constants(graph)
        seen: dict[tuple[Any, ...], list[Value]] = {}
        for node in list(graph.nodes):
            key = (node.op, tuple(id(v) for v in node.inputs), tuple(sorted(node.attrs.items())))
            if key not in seen:
                seen[key] = node.outputs
                continue
            for old, new in zip(node.outputs, seen[key]):
                if old in graph.outputs:
                    break  # keep distinct graph outputs distinct
            else:
                for old, new in zip(node.outputs, seen[key]):
                    graph.replace_all_uses(old, new)
                graph.remove_node(node)
                changed = True
        return changed
