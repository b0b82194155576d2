"""What a model is and what quantizing it would do, before any calibration: its inputs and
outputs, each layer with its shapes, and for each whether the default flow would run it in
int8 and, if not, why (``qcompiler inspect``). Decisions that need data (a range beyond
``max_abs_range``, the sensitivity check) are made by ``compile`` and reported there."""
from __future__ import annotations

from dataclasses import asdict, dataclass

from .ir import Graph, Node
from .ir.ops import traits_of
from .quant_config import QuantConfig, layer_names


@dataclass
class Layer:
    name: str  # the value it defines (%name)
    op: str
    source: str  # the torch/ONNX name
    inputs: list[str]  # the types of its operands
    output: str
    int8: str  # how the default flow would quantize it, or "" when it stays float
    why_not: str  # why it stays float ("" when it is quantized)


_HOW = {"weighted": "int8 weights {weights}, {activations} activations",
        "own_params": "int8, its own scale", "shared_params": "int8, one scale for all inputs",
        "same_as_input": "int8, on its input's grid"}


def plan(graph: Graph, config: QuantConfig | None = None) -> list[Layer]:
    """Each node of ``graph`` (run through the default float passes first, as compile does)."""
    from .pass_manager import run_pipeline
    from .passes import DEFAULT_FLOAT_PIPELINE

    config = config or QuantConfig()
    scheme = config.scheme()
    graph = run_pipeline(graph.copy(), DEFAULT_FLOAT_PIPELINE)
    return [_layer(node, scheme) for node in graph.nodes]


def _layer(node: Node, scheme) -> Layer:
    traits = traits_of(node.op)
    how, why = "", ""
    if traits.quant == "integer":
        how = "already integer"
    elif traits.quant == "float" and traits.on_grid:
        how = "on the integers (moves values) where its neighbours share a scale"
    elif traits.quant == "float":
        why = "no integer form: runs in float between quantized neighbours"
    elif not scheme.quantizes(node.op):
        why = f"op type '{node.op}' is not in QuantConfig.op_types"
    elif scheme.excluded(*layer_names(node)):
        why = "excluded by QuantConfig.exclude"
    elif traits.quant == "weighted" and traits.channel_axis is not None \
            and not node.inputs[traits.weight_slot].is_constant:
        why = "its weight is computed at run time"
    else:
        per = "per channel" if scheme.per_channel and traits.channel_axis is not None else "per tensor"
        how = _HOW[traits.quant].format(weights=per, activations={"u8": "uint8", "i8": "int8"}[scheme.activation_dtype])
    return Layer(", ".join("%" + v.name for v in node.outputs), node.op, node.source,
                 [str(v.type) for v in node.inputs], ", ".join(str(v.type) for v in node.outputs), how, why)


def as_dict(graph: Graph, layers: list[Layer]) -> dict:
    return {"inputs": [{"name": v.name, "type": str(v.type)} for v in graph.inputs],
            "outputs": [{"name": v.name, "type": str(v.type)} for v in graph.outputs],
            "layers": [asdict(layer) for layer in layers]}


def int8_form(op: str) -> str:
    """How the default flow quantizes ``op``, in words, from its traits."""
    traits = traits_of(op)
    if traits.quantized_as is not None:
        return f"as the `{traits.quantized_as}` it equals (constant weights): {int8_form(traits.quantized_as)}"
    if traits.quant == "weighted":
        return f"int8 weights per channel, uint8 activations: `{traits.integer_form}` + requantize"
    if traits.quant == "integer":
        return "integer arithmetic (made by lower-integer, or imported from a quantized model)"
    if traits.quant == "float":
        return "moves int8 values where its neighbours share a scale" if traits.on_grid else \
            "float, between quantized neighbours"
    return _HOW[traits.quant]


def ops_table() -> str:
    """The README's table of ops (``python -c "from qcompiler.inspection import ops_table;
    print(ops_table())"``): generated from the registry, so it is never out of date."""
    from .ir.ops import all_ops

    rows = ["| op | family | `op_types` name | in a quantized build |", "|---|---|---|---|"]
    for op in all_ops():
        traits = traits_of(op)
        rows.append(f"| `{op}` | {traits.family} | {traits.config_type or ''} | {int8_form(op)} |")
    return "\n".join(rows) + "\n"
