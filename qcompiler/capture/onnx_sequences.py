"""ONNX sequences and optionals, resolved at import: with static shapes a sequence's length is
known, so a sequence is a Python list of IR values while importing (never an IR type), and an
optional is its value or ``EMPTY``. Sequence ops (construct, insert, erase, at, length, split,
concat, map) become list operations and the ordinary IR ops they imply. A sequence graph input
is given as its elements' shapes (``input_shapes={"x": [[2, 3], [2, 3]]}``) and becomes one IR
input per element (``x.0``, ``x.1``); a sequence output becomes one output per element."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx

from ..errors import ModelLoadError, QCompilerError
from ..ir import Graph, TensorType, Value, dtype_name
from .from_onnx import _attr, converts


class _Empty:
    """An optional without a value."""

    def __repr__(self) -> str:
        return "EMPTY"


EMPTY = _Empty()
MISSING = object()  # what ``structured_input`` is given when the user gave no shapes for the input


def value_kind(type_proto: Any) -> tuple[str, ...]:
    """("tensor",), ("sequence", "tensor"), ("optional", "sequence", "tensor"), ..."""
    kind = type_proto.WhichOneof("value")
    if kind in ("sequence_type", "optional_type"):
        return (kind[:-len("_type")], *value_kind(getattr(type_proto, kind).elem_type))
    return ("tensor",) if kind in ("tensor_type", None) else (kind[:-len("_type")],)


def _element_dtype(type_proto: Any) -> int:
    kind = type_proto.WhichOneof("value")
    return type_proto.tensor_type.elem_type if kind == "tensor_type" else _element_dtype(getattr(type_proto, kind).elem_type)


def structured_input(graph: Graph, proto_input: Any, given: Any, where: str) -> Any:
    """The IR inputs standing for a sequence or optional graph input, from the shapes given
    (a list of element shapes; None for an empty optional), as the importer's value."""
    name, kind = proto_input.name, value_kind(proto_input.type)
    if kind[-1] != "tensor":
        raise ModelLoadError(f"{where}: input '{name}' is a {'/'.join(kind)}: not supported (tensors, sequences and "
                             f"optionals of tensors)")
    dtype = dtype_name(onnx.helper.tensor_dtype_to_np_dtype(_element_dtype(proto_input.type)))
    example = "[[2, 3], [2, 3]]" if "sequence" in kind else "[2, 3] (or None: no value)"
    if given is MISSING:
        raise ModelLoadError(f"{where}: input '{name}' is a {' of '.join(kind)}s: give its shape{'s' if 'sequence' in kind else ''} "
                             f"with input_shapes={{'{name}': {example}}} (static shapes)")

    def build(kind: tuple[str, ...], given: Any, label: str) -> Any:
        if kind[0] == "optional":
            return EMPTY if given is None else build(kind[1:], given, label)
        if kind[0] == "sequence":
            if not isinstance(given, (list, tuple)) or not all(isinstance(s, (list, tuple)) for s in given):
                raise ModelLoadError(f"{where}: input '{name}' is a sequence: give a list of its elements' shapes, "
                                     f"e.g. {example}")
            return [build(kind[1:], shape, f"{label}.{i}") for i, shape in enumerate(given)]
        return graph.add_input(label, TensorType(tuple(int(d) for d in given), dtype))

    return build(kind, given, name)


def flattened_outputs(name: str, value: Any, where: str) -> list[tuple[str, Value]]:
    """A graph output's IR values with their names: a tensor as itself, a sequence's elements as
    ``name.0``, ``name.1``, ... (an empty optional has nothing to return: refused)."""
    if value is EMPTY:
        raise QCompilerError(f"{where}: graph output '{name}' is an optional without a value")
    if isinstance(value, list):
        return [pair for i, v in enumerate(value) for pair in flattened_outputs(f"{name}.{i}", v, where)]
    return [(name, value)]


def _position(ctx, node, v: Value | None, length: int, default: int, insert: bool = False) -> int:
    if v is None:
        return default
    p = int(np.asarray(ctx.const_input(v, node, "position")).reshape(-1)[0])
    if not -length <= p < length + insert:  # an insert may also go after the last element
        raise QCompilerError(f"{node.op} '{node.name}': position {p} is outside a sequence of {length}")
    return p + length if p < 0 else p  # counted from the back, as Python's list.insert does


def _sequence(node, v: Any) -> list:
    if not isinstance(v, list):
        raise QCompilerError(f"{node.op} '{node.name}': expected a sequence operand")
    return v


@converts("SequenceConstruct")
def _construct(ctx, node, inputs):
    return [list(inputs)]  # one output: the list


@converts("SequenceEmpty")
def _empty(ctx, node, inputs):
    return [[]]


@converts("SequenceInsert")
def _insert(ctx, node, inputs):
    seq = list(_sequence(node, inputs[0]))
    seq.insert(_position(ctx, node, inputs[2] if len(inputs) > 2 else None, len(seq), len(seq), insert=True), inputs[1])
    return [seq]


@converts("SequenceErase")
def _erase(ctx, node, inputs):
    seq = list(_sequence(node, inputs[0]))
    del seq[_position(ctx, node, inputs[1] if len(inputs) > 1 else None, len(seq), len(seq) - 1)]
    return [seq]


@converts("SequenceAt")
def _at(ctx, node, inputs):
    seq = _sequence(node, inputs[0])
    return seq[_position(ctx, node, inputs[1], len(seq), 0)]


@converts("SequenceLength")
def _length(ctx, node, inputs):
    return ctx.const(np.asarray(len(_sequence(node, inputs[0])), np.int64), "sequence_length")


@converts("SplitToSequence")
def _split_to_sequence(ctx, node, inputs):
    """Pieces along ``axis``: of the sizes ``split`` lists, of ``split`` each (the last one
    shorter), or of 1 each with the axis dropped unless ``keepdims``."""
    x = inputs[0]
    axis = int(_attr(node, "axis", 0)) % x.type.rank
    split = ctx.const_input(inputs[1], node, "split") if len(inputs) > 1 else None
    size = x.shape[axis]
    if split is None:
        sizes, squeeze = [1] * size, not _attr(node, "keepdims", 1)
    elif np.ndim(split) == 0:
        step = int(split)
        sizes, squeeze = [min(step, size - s) for s in range(0, size, step)], False
    else:
        sizes, squeeze = [int(s) for s in np.asarray(split).reshape(-1)], False
    pieces, start = [], 0
    for s in sizes:
        piece = ctx.emit1("slice", [x], {"starts": [start], "ends": [start + s], "axes": [axis], "steps": [1]})
        pieces.append(ctx.reshape(piece, x.shape[:axis] + x.shape[axis + 1:]) if squeeze else piece)
        start += s
    return [pieces]


@converts("ConcatFromSequence")
def _concat_from_sequence(ctx, node, inputs):
    seq = _sequence(node, inputs[0])
    if not seq:
        raise QCompilerError(f"ConcatFromSequence '{node.name}': the sequence is empty")
    rank = seq[0].type.rank
    if _attr(node, "new_axis", 0):
        return ctx.stack(seq, int(_attr(node, "axis")) % (rank + 1))
    axis = int(_attr(node, "axis")) % rank
    return ctx.emit1("concat", seq, {"axis": axis}) if len(seq) > 1 else ctx.emit1("identity", seq)


@converts("Optional")
def _optional(ctx, node, inputs):
    return [inputs[0] if inputs and inputs[0] is not None else EMPTY]


@converts("OptionalHasElement")
def _has_element(ctx, node, inputs):
    present = bool(inputs) and inputs[0] is not None and inputs[0] is not EMPTY
    return ctx.const(np.asarray(present), "has_element")


@converts("OptionalGetElement")
def _get_element(ctx, node, inputs):
    if inputs[0] is EMPTY:
        raise QCompilerError(f"OptionalGetElement '{node.name}': the optional has no value")
    return [inputs[0]]


def map_sequences(ctx, node, inputs: Sequence[Any], run_body) -> list[list]:
    """SequenceMap: the body once per position of the sequences (tensor operands passed whole
    to every step); each body output gathered into a sequence."""
    seqs = [v for v in inputs if isinstance(v, list)]
    lengths = {len(s) for s in seqs}
    if len(lengths) != 1:
        raise QCompilerError(f"SequenceMap '{node.name}': sequences of different lengths {sorted(lengths)}")
    body = node.attrs["body"]
    results: list[list] = [[] for _ in body.outputs]
    for i in range(lengths.pop()):
        outs = run_body(body, [v[i] if isinstance(v, list) else v for v in inputs])
        for collected, out in zip(results, outs):
            collected.append(out)
    return results
