"""The reference interpreter: runs a graph op by op with the registry's numpy kernels.

It is the oracle every pass and target is checked against, so it favours exactness over speed.
An observer sees every node's outputs as they are produced (range analysis, per-layer compare)."""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from .errors import InputError, QCompilerError
from .ir import graph as graph_module
from .ir.graph import Graph, Node, Value
from .ir.ops import registry
from .ir.ops import get_op

Observer = Callable[[Node, list[np.ndarray]], None]


def to_numpy(x: Any) -> np.ndarray:
    """numpy arrays pass through; torch tensors are detached and moved to the CPU."""
    if isinstance(x, np.ndarray):
        return x
    if hasattr(x, "detach") and hasattr(x, "numpy"):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def check_inputs(graph: Graph, inputs: Sequence[Any]) -> list[np.ndarray]:
    """Convert and check inputs against the graph's signature; errors name the input."""
    if len(inputs) != len(graph.inputs):
        names = ", ".join(f"%{v.name}: {v.type}" for v in graph.inputs)
        raise InputError(f"@{graph.name} takes {len(graph.inputs)} input(s) ({names}), got {len(inputs)}")
    arrays = []
    for value, x in zip(graph.inputs, inputs):
        a = to_numpy(x)
        if tuple(a.shape) != value.shape:
            raise InputError(f"input %{value.name}: expected shape {list(value.shape)}, got {list(a.shape)}")
        if a.dtype != value.type.np_dtype:
            if a.dtype.kind != value.type.np_dtype.kind and not (a.dtype.kind in "iu" and value.type.np_dtype.kind in "iu"):
                raise InputError(f"input %{value.name}: expected {value.type.dtype}, got {a.dtype}")
            a = a.astype(value.type.np_dtype)
        arrays.append(np.require(a, requirements="C"))  # C order; unlike ascontiguousarray, keeps 0-d arrays 0-d
    return arrays


def run(graph: Graph, inputs: Sequence[Any], observer: Observer | None = None) -> list[np.ndarray]:
    """Evaluate ``graph`` on ``inputs``; returns the outputs in order."""
    env: dict[int, np.ndarray] = {}
    for value, array in zip(graph.inputs, check_inputs(graph, inputs)):
        env[id(value)] = array

    def read(v: Value) -> np.ndarray:
        return graph.constants[v.name] if v.is_constant else env[id(v)]

    with np.errstate(all="ignore"):  # inf/nan follow IEEE as in the frameworks; no warnings spam
        for node in graph.nodes:
            try:
                outs = get_op(node.op).run([read(v) for v in node.inputs], node.attrs)
            except InputError as e:  # bad data (an index out of range): name the node it reached
                raise InputError(f"{node.describe()}: {e}") from None
            except QCompilerError:
                raise
            except Exception as e:  # a kernel failing on data (e.g. index out of range)
                raise QCompilerError(f"running {node.describe()}: {e}") from e
            for i, (value, array) in enumerate(zip(node.outputs, outs)):
                array = np.asarray(array)
                if tuple(array.shape) != value.shape:
                    raise QCompilerError(f"internal: kernel of {node.describe()} returned shape "
                                         f"{list(array.shape)}, type inference says {value.type}")
                if array.dtype != value.type.np_dtype:  # numpy promotion (e.g. f32 * f64 scalar)
                    array = array.astype(value.type.np_dtype)
                env[id(value)] = outs[i] = array
            if observer is not None:
                observer(node, outs)
    return [read(v) for v in graph.outputs]


def values_of(graph: Graph, inputs: Sequence[Any], wanted: Sequence[Value]) -> dict[int, np.ndarray]:
    """The arrays of the ``wanted`` values (graph inputs or node results) when ``graph`` runs on
    ``inputs``, by ``id(value)``: what a pass that studies some layers' inputs needs of a run."""
    ids = {id(v) for v in wanted}
    arrays = check_inputs(graph, inputs)
    seen = {id(v): a for v, a in zip(graph.inputs, arrays) if id(v) in ids}

    def observer(node: Node, outs: list[np.ndarray]) -> None:
        for v, a in zip(node.outputs, outs):
            if id(v) in ids:
                seen[id(v)] = a

    run(graph, arrays, observer=observer)
    return seen


def _load_torch_kernels() -> None:
    from . import torch_kernels  # noqa: F401  (installs them; imports torch, so only when first needed)


graph_module.EVALUATOR = run  # graph(x) runs this interpreter (the IR does not import it)
registry.KERNEL_LOADER = _load_torch_kernels
