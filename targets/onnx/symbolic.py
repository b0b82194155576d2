"""One ONNX model for every size of a declared dynamic range: the buckets' exports (one per size,
each static) merged into one whose dynamic dims are symbolic, then checked against each bucket.

Identity relied on: the exports at two sizes are the same graph (same nodes, same names) whose
constants differ only where a size is written into them. A Reshape target holding the size at
one position is the same Reshape with -1 there (the other entries fix the rest), so that
constant becomes size-free; any other size-dependent constant (an Expand shape, a slice bound,
a mask) has no such rewrite here, and the merge refuses naming it rather than guess. The
merged model is then run by ONNX Runtime at every bucket's size against that bucket's own
export: a merge that changed an output is an error, never a silent artifact."""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np

from qcompiler.errors import QCompilerError

Key = tuple[int, ...]


def _load(model: bytes):
    import onnx

    return onnx.load_from_string(model)


def _size_positions(name: str, arrays: Mapping[Key, np.ndarray], reshape_shape: bool) -> list[int]:
    """The positions of a constant that hold a dynamic size (equal, in every export, to a size of
    its key); refuses a constant that differs otherwise or is not a Reshape target."""
    keys = list(arrays)
    first = arrays[keys[0]]
    if not reshape_shape or first.ndim != 1 or first.dtype != np.int64 \
            or any(a.shape != first.shape for a in arrays.values()):
        raise QCompilerError(f"onnx target, dynamic shapes: constant '{name}' depends on the size and is not a Reshape "
                             f"target (no symbolic form for it here); build the onnx target at a fixed size")
    positions = []
    for i in range(len(first)):
        column = [int(arrays[k][i]) for k in keys]
        if len(set(column)) == 1:
            continue
        if not any(all(v == k[d] for v, k in zip(column, keys)) for d in range(len(keys[0]))):
            raise QCompilerError(f"onnx target, dynamic shapes: Reshape target '{name}' entry {i} takes {column} at "
                                 f"the sizes {keys}, not a size itself; build the onnx target at a fixed size")
        positions.append(i)
    if len(positions) != 1 or -1 in first:
        raise QCompilerError(f"onnx target, dynamic shapes: Reshape target '{name}' has {len(positions)} "
                             f"size-dependent entries{' and a -1' if -1 in first else ''}: one -1 cannot stand for them")
    return positions


def merge(models: Mapping[Key, bytes], symbolic_axes: Sequence[Sequence[tuple[int, str]]],
          output_axes: Sequence[Sequence[tuple[int, str]]]) -> bytes:
    """The first export with every size-dependent Reshape target written with -1, inputs' and
    outputs' dynamic axes named (``symbolic_axes[i]``: (axis, name) pairs of input i;
    ``output_axes`` likewise for the outputs), and the intermediate shapes dropped."""
    import onnx
    from onnx import numpy_helper

    protos = {key: _load(m) for key, m in models.items()}
    base = next(iter(protos.values()))
    structure = [(n.op_type, tuple(n.input), tuple(n.output)) for n in base.graph.node]
    for key, proto in protos.items():
        if [(n.op_type, tuple(n.input), tuple(n.output)) for n in proto.graph.node] != structure:
            raise QCompilerError(f"onnx target, dynamic shapes: the export at {key} is not the same graph as at "
                                 f"{next(iter(protos))}; build the onnx target at a fixed size")
    reshape_targets = {n.input[1] for n in base.graph.node if n.op_type == "Reshape" and len(n.input) > 1}
    arrays = {init.name: {key: numpy_helper.to_array(next(i for i in proto.graph.initializer if i.name == init.name))
                          for key, proto in protos.items()} for init in base.graph.initializer}
    for index, init in enumerate(base.graph.initializer):
        values = arrays[init.name]
        first = next(iter(values.values()))
        if all(np.array_equal(first, v) for v in values.values()):
            continue
        general = first.copy()
        general[_size_positions(init.name, values, init.name in reshape_targets)] = -1
        base.graph.initializer[index].CopyFrom(numpy_helper.from_array(general, init.name))
    for values, named in ((base.graph.input, symbolic_axes), (base.graph.output, output_axes)):
        for value, axes in zip(values, named):
            for axis, name in axes:
                dim = value.type.tensor_type.shape.dim[axis]
                dim.ClearField("dim_value")
                dim.dim_param = name
    del base.graph.value_info[:]
    onnx.checker.check_model(base)
    return base.SerializeToString()


def check_merged(merged: bytes, models: Mapping[Key, bytes], inputs_at: Callable[[Key], list[np.ndarray]],
                 run: Callable[[bytes, list[np.ndarray]], list[np.ndarray]]) -> None:
    """The merged model's outputs at every bucket's size against that bucket's own export
    (``run``: a model's outputs on arrays, as the build runs it)."""
    for key, model in models.items():
        arrays = inputs_at(key)
        for index, (want, got) in enumerate(zip(run(model, arrays), run(merged, arrays))):
            scale = float(np.max(np.abs(want))) if want.size else 0.0
            if want.shape != got.shape or not np.allclose(got, want, rtol=0, atol=1e-5 * max(scale, 1.0)):
                raise QCompilerError(f"onnx target, dynamic shapes: the symbolic model's output {index} differs from "
                                     f"the export at sizes {key}; build the onnx target at a fixed size")
