"""ONNX's Scan and Loop, unrolled at import: with static shapes a Scan's step count is its scan
axis's extent, and a Loop's is known once its trip count and condition are (constants, or graph
inputs given with ``input_values``). Each step converts the body once more, its inputs bound to
the step's values, so the unrolled graph is ordinary IR every pass and target runs."""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from ..errors import QCompilerError
from ..ir import Value
from .from_onnx import _attr

RunBody = Callable[[Any, Sequence[Value]], list[Value]]  # (body graph, its input values) -> its outputs
MAX_STEPS = 4096  # an unrolled loop is a copy of its body per step


def _scan_steps(ctx, node, body, states: list[Value], scanned: list[Value], run_body: RunBody,
                in_axes: list[int], in_reverse: list[int], out_axes: list[int], out_reverse: list[int]):
    in_axes = [a % x.type.rank for x, a in zip(scanned, in_axes)]
    steps = {x.shape[a] for x, a in zip(scanned, in_axes)}
    if len(steps) != 1:
        raise QCompilerError(f"Scan '{node.name}': scan inputs of different lengths {sorted(steps)}")
    count = steps.pop()
    if not 0 < count <= MAX_STEPS:
        raise QCompilerError(f"Scan '{node.name}': {count} steps (1 to {MAX_STEPS} can be unrolled)")
    collected: list[list[Value]] = []
    for t in range(count):
        slices = [ctx.take(x, a, count - 1 - t if r else t) for x, a, r in zip(scanned, in_axes, in_reverse)]
        outs = run_body(body, states + slices)
        states, per_step = outs[:len(states)], outs[len(states):]
        collected.append(per_step)
    results = []
    for k in range(len(collected[0])):
        parts = [step[k] for step in collected]
        results.append(ctx.stack(parts[::-1] if out_reverse[k] else parts, out_axes[k] % (parts[0].type.rank + 1)))
    return states, results


def unroll_scan(ctx, node, inputs: list[Value | None], run_body: RunBody) -> list[Value]:
    """Scan (opset 9+): states threaded through the steps, each scan input sliced along its axis
    (from the end where its direction is 1), the per-step outputs stacked. Opset 8's form (a
    leading batch axis, optional sequence lengths) runs the same per batch element."""
    body = node.attrs["body"]
    m = int(_attr(node, "num_scan_inputs"))
    if ctx.opset < 9:
        if inputs[0] is not None:
            raise QCompilerError(f"Scan '{node.name}': sequence_lens (opset 8) is not supported")
        inputs = inputs[1:]
    n = len(inputs) - m
    k = len(body.outputs) - n

    def listed(key: str, count: int, default: int) -> list[int]:
        return [int(v) for v in _attr(node, key, [default] * count)]

    in_reverse = listed("scan_input_directions" if ctx.opset >= 9 else "directions", m, 0)
    out_reverse = listed("scan_output_directions", k, 0)
    if ctx.opset >= 9:
        states, results = _scan_steps(ctx, node, body, list(inputs[:n]), list(inputs[n:]), run_body,
                                      listed("scan_input_axes", m, 0), in_reverse, listed("scan_output_axes", k, 0),
                                      out_reverse)
        return states + results
    batches = inputs[0].shape[0] if n else inputs[n].shape[0]
    per_batch = []
    for b in range(batches):
        states, results = _scan_steps(ctx, node, body, [ctx.take(s, 0, b) for s in inputs[:n]],
                                      [ctx.take(x, 0, b) for x in inputs[n:]], run_body,
                                      [0] * m, in_reverse, [0] * k, [0] * k)
        per_batch.append(states + results)
    return [ctx.stack([outs[i] for outs in per_batch], 0) for i in range(n + k)]


def unroll_loop(ctx, node, inputs: list[Value | None], run_body: RunBody) -> list[Value]:
    """Loop: runs while the step is below the trip count (when given) and the condition holds;
    both must be known at import, and so must the condition each step computes. States are
    threaded through; scan outputs are stacked along a new first axis."""
    trip = ctx.const_input(inputs[0], node, "trip count (data-dependent control flow is not supported)")
    cond = ctx.const_input(inputs[1] if len(inputs) > 1 else None, node,
                           "condition (data-dependent control flow is not supported)")
    trip = None if trip is None else int(np.asarray(trip).reshape(-1)[0])
    going = True if cond is None else bool(np.asarray(cond).reshape(-1)[0])
    body = node.attrs["body"]
    states = list(inputs[2:])
    collected: list[list[Value]] = []
    step = 0
    while going and (trip is None or step < trip):
        if step >= MAX_STEPS:
            raise QCompilerError(f"Loop '{node.name}': more than {MAX_STEPS} steps cannot be unrolled")
        outs = run_body(body, [ctx.const(np.asarray(step, np.int64), "iteration"),
                               ctx.const(np.asarray(going), "condition")] + states)
        flag, states, per_step = outs[0], outs[1:1 + len(states)], outs[1 + len(states):]
        going = bool(np.asarray(ctx.const_input(flag, node, "condition computed by the body (data-dependent "
                                                           "control flow is not supported)")).reshape(-1)[0])
        collected.append(per_step)
        step += 1
    k = len(body.outputs) - 1 - len(states)
    if k and not collected:
        raise QCompilerError(f"Loop '{node.name}': runs no step, so its scan outputs have no known shape")
    return states + [ctx.stack([s[i] for s in collected], 0) for i in range(k)]
