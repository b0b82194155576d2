"""ONNX LSTM, GRU and RNN, unrolled at import over their static sequence length into the ops the rest
of qcompiler already has: one ``linear`` for every step's input projection at once, one
``linear`` per step for the recurrence, then the gates elementwise. The weights are constants
of ``linear``s, so the default flow quantizes them (int8 per channel) like any other layer, and
every target runs the result. (BiLSTM + CTC text recognizers are the typical users.)

ONNX's equations, gate order i, o, f, c for LSTM and z, r, h for GRU (RNN: one, its activation
Tanh, Relu or Sigmoid), layout 0 (``[T, B, I]``)
or 1 (``[B, T, I]``); reverse runs the sequence backwards, bidirectional both ways.
Cell clipping, non-default activations, input_forget and sequence_lens shorter than
the sequence are refused with the node named."""
from __future__ import annotations

from typing import Any

import numpy as np

from ..errors import QCompilerError
from ..ir import Value


def _check(ctx, node, inputs, attr, gates: int) -> tuple[int, int]:
    what = f"{node.op} '{node.name}'"
    x, w = inputs[0], inputs[1]
    if not (w.is_constant and inputs[2].is_constant and (len(inputs) < 4 or inputs[3] is None or inputs[3].is_constant)):
        raise QCompilerError(f"{what}: weights computed at run time are not supported")
    if attr(node, "clip", None) is not None:
        raise QCompilerError(f"{what}: cell clipping is not supported")
    if attr(node, "input_forget", 0):
        raise QCompilerError(f"{what}: input_forget is not supported")
    default = {"LSTM": ["Sigmoid", "Tanh", "Tanh"], "GRU": ["Sigmoid", "Tanh"], "RNN": ["Tanh"]}[node.op]
    acts = _activations(node, attr)
    directions = 2 if _direction(node, attr) == "bidirectional" else 1
    rnn_choice = node.op == "RNN" and set(acts) <= set(RNN_ACTIVATIONS) and len(acts) in (0, directions)
    if acts and acts != default * directions and not rnn_choice:
        raise QCompilerError(f"{what}: activations {acts} are not supported (only the defaults {default})")
    if x.type.rank != 3:
        raise QCompilerError(f"{what}: input must be rank 3, got {x.type}")
    hidden = int(w.shape[1]) // gates
    return directions, hidden


RNN_ACTIVATIONS = {"Tanh": "tanh", "Relu": "relu", "Sigmoid": "sigmoid"}


def _activations(node, attr) -> list[str]:
    return [a.decode() if isinstance(a, bytes) else a for a in (attr(node, "activations", None) or [])]


def _direction(node, attr) -> str:
    d = attr(node, "direction", "forward")
    return d.decode() if isinstance(d, bytes) else d


def _initial(ctx, v: Value | None, d: int, batch: int, hidden: int, dtype) -> Value:
    if v is None:
        return ctx.const(np.zeros((batch, hidden), dtype), "zero_state")
    return ctx.reshape(ctx.emit1("slice", [v], {"starts": [d], "ends": [d + 1], "axes": [0], "steps": [1]}),
                       (batch, hidden))


def unroll(ctx, node: Any, inputs: list[Value | None], attr) -> list[Value]:
    """``[Y, Y_h, Y_c]`` (LSTM) or ``[Y, Y_h]`` (GRU, RNN) of an ONNX LSTM/GRU/RNN node."""
    lstm = node.op == "LSTM"
    gates = {"LSTM": 4, "GRU": 3, "RNN": 1}[node.op]
    activations = _activations(node, attr)
    directions, hidden = _check(ctx, node, inputs, attr, gates)
    x = inputs[0]
    layout = attr(node, "layout", 0)
    if layout:
        x = ctx.emit1("transpose", [x], {"perm": [1, 0, 2]})
    steps, batch, features = x.shape
    seq_lens = inputs[4] if len(inputs) > 4 else None
    if seq_lens is not None and not (seq_lens.is_constant and np.all(ctx.array(seq_lens) == steps)):
        raise QCompilerError(f"{node.op} '{node.name}': sequence_lens shorter than the sequence are not supported")
    dtype = x.type.np_dtype
    w, r = ctx.array(inputs[1]), ctx.array(inputs[2])
    b = ctx.array(inputs[3]) if len(inputs) > 3 and inputs[3] is not None else np.zeros((directions, 2 * gates * hidden),
                                                                                        dtype)
    before_reset = bool(attr(node, "linear_before_reset", 0))
    flat = ctx.reshape(x, (steps * batch, features))
    reverse = _direction(node, attr) == "reverse"
    ys, finals_h, finals_c = [], [], []
    for d in range(directions):
        backwards = reverse or d == 1
        wb, rb = b[d, :gates * hidden], b[d, gates * hidden:]
        # every step's input projection in one product; for LSTM (and GRU's z, r) both biases go here
        in_bias = np.concatenate([wb[:2 * hidden] + rb[:2 * hidden], wb[2 * hidden:]]) if node.op == "GRU" else wb + rb
        projected = ctx.reshape(ctx.emit1("linear", [flat, ctx.const(w[d], "W"), ctx.const(in_bias.astype(dtype), "Wb")]),
                                (steps, batch, gates * hidden))
        h = _initial(ctx, inputs[5] if len(inputs) > 5 else None, d, batch, hidden, dtype)
        c = _initial(ctx, inputs[6] if len(inputs) > 6 else None, d, batch, hidden, dtype) if lstm else None
        recurrent = ctx.const(r[d], "R")
        peepholes = _peepholes(ctx, inputs[7], d, hidden) if lstm and len(inputs) > 7 and inputs[7] is not None else None
        outputs: list[Value] = [None] * steps  # type: ignore[list-item]
        for t in (range(steps - 1, -1, -1) if backwards else range(steps)):
            x_t = ctx.reshape(ctx.emit1("slice", [projected], {"starts": [t], "ends": [t + 1], "axes": [0], "steps": [1]}),
                              (batch, gates * hidden))
            if lstm:
                h, c = _lstm_step(ctx, x_t, h, c, recurrent, hidden, peepholes)
            elif node.op == "RNN":  # h' = f(x W^T + h R^T + b)
                act = RNN_ACTIVATIONS[activations[d] if activations else "Tanh"]
                h = ctx.emit1(act, [ctx.emit1("add", [x_t, ctx.emit1("linear", [h, recurrent])])])
            else:
                h = _gru_step(ctx, x_t, h, recurrent, ctx.const(rb[2 * hidden:].astype(dtype), "Rbh"), hidden,
                              before_reset)
            outputs[t] = ctx.reshape(h, (1, 1, batch, hidden))
        ys.append(ctx.emit1("concat", outputs, {"axis": 0}) if steps > 1 else outputs[0])
        finals_h.append(ctx.reshape(h, (1, batch, hidden)))
        if lstm:
            finals_c.append(ctx.reshape(c, (1, batch, hidden)))
    y = ctx.emit1("concat", ys, {"axis": 1}) if directions > 1 else ys[0]
    if layout:  # [T, D, B, H] -> [B, T, D, H]; states [D, B, H] -> [B, D, H]
        y = ctx.emit1("transpose", [y], {"perm": [2, 0, 1, 3]})
    results = [y]
    for finals in ([finals_h, finals_c] if lstm else [finals_h]):
        state = ctx.emit1("concat", finals, {"axis": 0}) if directions > 1 else finals[0]
        results.append(ctx.emit1("transpose", [state], {"perm": [1, 0, 2]}) if layout else state)
    return results


def _gate(ctx, v: Value, index: int, hidden: int) -> Value:
    return ctx.emit1("slice", [v], {"starts": [index * hidden], "ends": [(index + 1) * hidden], "axes": [1],
                                    "steps": [1]})


def _peepholes(ctx, p: Value, d: int, hidden: int) -> list[Value] | None:
    """Direction ``d``'s peephole weights [P_i, P_o, P_f], each [hidden]; None when all zero."""
    if p.is_constant and not np.any(ctx.array(p)):
        return None
    row = ctx.reshape(ctx.emit1("slice", [p], {"starts": [d], "ends": [d + 1], "axes": [0], "steps": [1]}), (1, 3 * hidden))
    return [ctx.reshape(_gate(ctx, row, k, hidden), (hidden,)) for k in range(3)]


def _lstm_step(ctx, x_t: Value, h: Value, c: Value, recurrent: Value, hidden: int,
               peepholes: list[Value] | None) -> tuple[Value, Value]:
    """i, o, f = sigmoid, c~ = tanh of (x W^T + h R^T + b); c' = f c + i c~; h' = o tanh(c').
    Peepholes add P_i c and P_f c to i's and f's arguments, and P_o c' to o's."""
    g = ctx.emit1("add", [x_t, ctx.emit1("linear", [h, recurrent])])
    pre = [_gate(ctx, g, k, hidden) for k in range(4)]  # i, o, f, c~
    if peepholes is not None:
        pre[0] = ctx.emit1("add", [pre[0], ctx.emit1("mul", [peepholes[0], c])])
        pre[2] = ctx.emit1("add", [pre[2], ctx.emit1("mul", [peepholes[2], c])])
    i, f = ctx.emit1("sigmoid", [pre[0]]), ctx.emit1("sigmoid", [pre[2]])
    c = ctx.emit1("add", [ctx.emit1("mul", [f, c]), ctx.emit1("mul", [i, ctx.emit1("tanh", [pre[3]])])])
    if peepholes is not None:
        pre[1] = ctx.emit1("add", [pre[1], ctx.emit1("mul", [peepholes[1], c])])
    return ctx.emit1("mul", [ctx.emit1("sigmoid", [pre[1]]), ctx.emit1("tanh", [c])]), c


def _gru_step(ctx, x_t: Value, h: Value, recurrent: Value, rbh: Value, hidden: int, before_reset: bool) -> Value:
    """z, r = sigmoid(x W^T + h R^T + b); h~ = tanh(x Wh^T + (r h) Rh^T + Rbh) (or, linear_before_reset,
    r (h Rh^T + Rbh)); h' = (1 - z) h~ + z h."""
    rec = ctx.emit1("linear", [h, recurrent])  # h R^T, all three gates (h's part used unless reset first)
    z = ctx.emit1("sigmoid", [ctx.emit1("add", [_gate(ctx, x_t, 0, hidden), _gate(ctx, rec, 0, hidden)])])
    r = ctx.emit1("sigmoid", [ctx.emit1("add", [_gate(ctx, x_t, 1, hidden), _gate(ctx, rec, 1, hidden)])])
    if before_reset:
        hh = ctx.emit1("mul", [r, ctx.emit1("add", [_gate(ctx, rec, 2, hidden), rbh])])
    else:
        rh_weight = ctx.emit1("slice", [recurrent], {"starts": [2 * hidden], "ends": [3 * hidden], "axes": [0],
                                                     "steps": [1]})
        hh = ctx.emit1("add", [ctx.emit1("linear", [ctx.emit1("mul", [r, h]), rh_weight]), rbh])
    candidate = ctx.emit1("tanh", [ctx.emit1("add", [_gate(ctx, x_t, 2, hidden), hh])])
    one = ctx.const(np.ones((), candidate.type.np_dtype), "one")
    return ctx.emit1("add", [ctx.emit1("mul", [ctx.emit1("sub", [one, z]), candidate]), ctx.emit1("mul", [z, h])])
