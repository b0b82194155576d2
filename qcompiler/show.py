"""``qcompiler show``: the graph as one self-contained HTML page (inline SVG, no scripts or
downloads), laid out in layers by longest path from the inputs (networkx), nodes coloured by
quantization error when a ``compare`` report is given."""
from __future__ import annotations

import html
import math
from typing import Any

import networkx as nx

from .ir import Graph

BOX_W, BOX_H, GAP_X, GAP_Y = 180, 46, 30, 40


def _colour(sqnr: float | None) -> str:
    """Green at >= 40 dB, through yellow, to red at <= 10 dB; grey without data."""
    if sqnr is None or (isinstance(sqnr, float) and math.isnan(sqnr)):
        return "#e8e8e8"
    t = max(0.0, min(1.0, (sqnr - 10.0) / 30.0))
    red, green = (255, int(80 + 175 * t / 0.5)) if t < 0.5 else (int(255 - 200 * (t - 0.5) / 0.5), 220)
    return f"rgb({red},{min(green, 230)},90)"


def render_html(graph: Graph, errors: dict[int, dict[str, Any]] | None = None, title: str = "graph") -> str:
    view = graph.to_networkx()
    depth: dict[Any, int] = {}
    for n in nx.topological_sort(view):
        preds = list(view.predecessors(n))
        depth[n] = 1 + max(depth[p] for p in preds) if preds else 0
    layers: dict[int, list[Any]] = {}
    for n, d in depth.items():
        layers.setdefault(d, []).append(n)
    pos = {}
    width = max(len(v) for v in layers.values()) * (BOX_W + GAP_X) + GAP_X
    for d, members in layers.items():
        offset = (width - len(members) * (BOX_W + GAP_X)) / 2
        for i, n in enumerate(members):
            pos[n] = (offset + i * (BOX_W + GAP_X) + GAP_X / 2, GAP_Y + d * (BOX_H + GAP_Y))
    height = (max(layers) + 1) * (BOX_H + GAP_Y) + GAP_Y
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0f}" height="{height:.0f}" '
             f'font-family="monospace" font-size="11">']
    for a, b, data in view.edges(data=True):
        (x1, y1), (x2, y2) = pos[a], pos[b]
        parts.append(f'<line x1="{x1 + BOX_W / 2:.0f}" y1="{y1 + BOX_H:.0f}" x2="{x2 + BOX_W / 2:.0f}" y2="{y2:.0f}" '
                     f'stroke="#888"><title>%{html.escape(data["value"].name)}: {data["value"].type}</title></line>')
    for n, (x, y) in pos.items():
        attrs = view.nodes[n]
        node = attrs.get("node")
        if node is None:
            fill, label, sub, tip = "#cfe3ff", attrs["label"], attrs["kind"], attrs["label"]
        else:
            err = (errors or {}).get(node.handle)
            sqnr = err.get("sqnr_db") if err else None
            fill = _colour(sqnr) if errors is not None else "#f4f4f4"
            label, sub = node.op, node.source[-24:]
            tip = f"{node.describe()} : {', '.join(str(v.type) for v in node.outputs)}"
            if err:
                tip += f"\\nSQNR {sqnr:.1f} dB, cosine {err.get('cosine', float('nan')):.5f}" if sqnr is not None else ""
        parts.append(f'<g><title>{html.escape(tip)}</title><rect x="{x:.0f}" y="{y:.0f}" width="{BOX_W}" '
                     f'height="{BOX_H}" rx="6" fill="{fill}" stroke="#555"/>'
                     f'<text x="{x + 8:.0f}" y="{y + 18:.0f}" font-weight="bold">{html.escape(label)}</text>'
                     f'<text x="{x + 8:.0f}" y="{y + 35:.0f}" fill="#444">{html.escape(sub)}</text></g>')
    parts.append("</svg>")
    legend = ("<p>Colour: output SQNR against the float model (green &ge; 40 dB, red &le; 10 dB, grey: not "
              "compared). Hover a node for its types and errors.</p>" if errors is not None else "")
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title></head>"
            f"<body><h3>{html.escape(title)}: {len(graph.nodes)} nodes</h3>{legend}{''.join(parts)}</body></html>")
