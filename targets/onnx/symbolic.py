"""One ONNX model for every size of a declared dynamic range: the buckets' exports (one per size,
each static) merged into one whose dynamic dims are symbolic, then checked against each bucket.

The exports at two sizes are the same graph (same nodes, same names) whose constants differ only
where a size is written into them. Comparing them finds each such constant and what the size is
in it; three rules, each an identity, make it size-free:
- a Reshape target holding the size at one position: the same Reshape with -1 there (the other
  entries fix the rest);
- any other shape constant holding sizes (an Expand shape, ...): the same values with each size
  read off the graph input that carries it at run time (Shape, then Concat with the fixed runs);
- a constant that is, at every size, the prefix of the largest export's along one axis (a
  position table or a mask cut to the length): the largest one sliced to the size at run time,
  the size again read off its input (Slice).
Any other size-dependent constant is refused naming it rather than guessed. The merged model is
then run by ONNX Runtime at every bucket's size against that bucket's own export: a merge that
changed an output is an error, never a silent artifact."""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np

from qcompiler.errors import QCompilerError

Key = tuple[int, ...]
REFUSED = "onnx target, dynamic shapes: "
FIXED = "; build the onnx target at a fixed size"


def _load(model: bytes):
    import onnx

    return onnx.load_from_string(model)


def _varying_positions(name: str, arrays: Mapping[Key, np.ndarray]) -> list[tuple[int, int]]:
    """(position, dim index) of each entry of a 1-D int64 constant that differs between the
    exports, each equal to that dim's size in every one; refuses an entry that is not a size."""
    keys = list(arrays)
    found = []
    for i in range(len(arrays[keys[0]])):
        column = [int(arrays[k][i]) for k in keys]
        if len(set(column)) == 1:
            continue
        dims = [d for d in range(len(keys[0])) if all(v == k[d] for v, k in zip(column, keys))]
        if not dims:
            raise QCompilerError(f"{REFUSED}shape constant '{name}' entry {i} takes {column} at the sizes {keys}, "
                                 f"not a size itself{FIXED}")
        found.append((i, dims[0]))
    return found


def _prefix_axis(arrays: Mapping[Key, np.ndarray]) -> tuple[int, int, Key] | None:
    """(axis, dim index, the largest key) when every export's constant is the largest one's
    prefix along one axis whose extent is a dim's size; None otherwise."""
    keys = list(arrays)
    shapes = [arrays[k].shape for k in keys]
    if len({len(sh) for sh in shapes}) != 1:
        return None
    axes = [a for a in range(len(shapes[0])) if len({sh[a] for sh in shapes}) > 1]
    if len(axes) != 1:
        return None
    axis = axes[0]
    dims = [d for d in range(len(keys[0])) if all(sh[axis] == k[d] for sh, k in zip(shapes, keys))]
    if not dims:
        return None
    largest = max(keys, key=lambda k: k[dims[0]])
    full = arrays[largest]
    for k in keys:
        cut = (slice(None),) * axis + (slice(0, k[dims[0]]),)
        if not np.array_equal(full[cut], arrays[k]):
            return None
    return axis, dims[0], largest


def merge(models: Mapping[Key, bytes], symbolic_axes: Sequence[Sequence[tuple[int, str]]],
          output_axes: Sequence[Sequence[tuple[int, str]]], sources: Sequence[tuple[str, int]]) -> bytes:
    """The first export with its size-dependent constants made size-free (the module's rules),
    inputs' and outputs' dynamic axes named (``symbolic_axes[i]``: (axis, name) pairs of input
    i; ``output_axes`` likewise for the outputs; ``sources[d]``: the input name and axis that
    carry dim d), and the intermediate shapes dropped."""
    import onnx
    from onnx import helper, numpy_helper

    protos = {key: _load(m) for key, m in models.items()}
    base = next(iter(protos.values()))
    structure = [(n.op_type, tuple(n.input), tuple(n.output)) for n in base.graph.node]
    for key, proto in protos.items():
        if [(n.op_type, tuple(n.input), tuple(n.output)) for n in proto.graph.node] != structure:
            raise QCompilerError(f"{REFUSED}the export at {key} is not the same graph as at "
                                 f"{next(iter(protos))}{FIXED}")
    uses: dict[str, set[tuple[str, int]]] = {}
    for node in base.graph.node:
        for slot, name in enumerate(node.input):
            uses.setdefault(name, set()).add((node.op_type, slot))
    sizes = [f"{name}.dim{axis}.size" for name, axis in sources]  # each dim's size, a 1-D int64 of one
    computed = [helper.make_node("Shape", [name], [size], start=axis, end=axis + 1)
                for (name, axis), size in zip(sources, sizes)]  # nodes put first: the constants made at run time
    by_name = {key: {i.name: i for i in proto.graph.initializer} for key, proto in protos.items()}
    kept, added = [], []
    for init in base.graph.initializer:
        values = {key: numpy_helper.to_array(found[init.name]) for key, found in by_name.items()}
        first = next(iter(values.values()))
        if all(v.shape == first.shape and np.array_equal(first, v) for v in values.values()):
            kept.append(init)
            continue
        shape_like = first.ndim == 1 and first.dtype == np.int64 and all(v.shape == first.shape
                                                                         for v in values.values())
        positions = _varying_positions(init.name, values) if shape_like else []
        if shape_like and uses.get(init.name) == {("Reshape", 1)} and len(positions) == 1 and -1 not in first:
            general = first.copy()
            general[positions[0][0]] = -1  # Reshape: -1 stands for the one size
            kept.append(numpy_helper.from_array(general, init.name))
        elif shape_like:  # a shape read elsewhere (Expand, ConstantOfShape, ...): its sizes read at run time
            parts, start = [], 0
            for position, dim in positions:
                if position > start:
                    added.append(numpy_helper.from_array(first[start:position], f"{init.name}.part{len(parts)}"))
                    parts.append(added[-1].name)
                parts.append(sizes[dim])
                start = position + 1
            if start < len(first):
                added.append(numpy_helper.from_array(first[start:], f"{init.name}.part{len(parts)}"))
                parts.append(added[-1].name)
            computed.append(helper.make_node("Concat", parts, [init.name], axis=0))
        else:
            prefix = _prefix_axis(values)
            if prefix is None:
                raise QCompilerError(f"{REFUSED}constant '{init.name}' ({first.dtype} {list(first.shape)}) depends on "
                                     f"the size and is neither a shape nor, at every size, a prefix of the largest "
                                     f"size's{FIXED}")
            axis, dim, largest = prefix  # the largest size's constant, cut to the size at run time
            names = [f"{init.name}.all_sizes", f"{init.name}.start", f"{init.name}.axes"]
            added += [numpy_helper.from_array(values[largest], names[0]),
                      numpy_helper.from_array(np.zeros(1, np.int64), names[1]),
                      numpy_helper.from_array(np.asarray([axis], np.int64), names[2])]
            computed.append(helper.make_node("Slice", [names[0], names[1], sizes[dim], names[2]], [init.name]))
    del base.graph.initializer[:]
    base.graph.initializer.extend(kept + added)
    nodes = computed + list(base.graph.node)
    del base.graph.node[:]
    base.graph.node.extend(nodes)
    for values, named in ((base.graph.input, symbolic_axes), (base.graph.output, output_axes)):
        for value, axes in zip(values, named):
            for axis, name in axes:
                dim = value.type.tensor_type.shape.dim[axis]
                dim.ClearField("dim_value")
                dim.dim_param = name
    del base.graph.value_info[:]
    onnx.checker.check_model(base)
    return base.SerializeToString()


# ONNX Runtime may run a float op of the fixed-size export on another kernel than the symbolic
# model's (its fusions differ with what it knows of the shapes): 6e-5 of the output's scale seen
# on a float layer-norm path; a wrong merge (a constant of the wrong size) is off by O(1)
MERGE_TOLERANCE = 5e-4


def check_merged(merged: bytes, models: Mapping[Key, bytes], inputs_at: Callable[[Key], list[np.ndarray]],
                 run: Callable[[bytes, list[np.ndarray]], list[np.ndarray]]) -> None:
    """The merged model's outputs at every bucket's size against that bucket's own export
    (``run``: a model's outputs on arrays, as the build runs it)."""
    for key, model in models.items():
        arrays = inputs_at(key)
        for index, (want, got) in enumerate(zip(run(model, arrays), run(merged, arrays))):
            scale = float(np.max(np.abs(want))) if want.size else 0.0
            if want.shape != got.shape or not np.allclose(got, want, rtol=0, atol=MERGE_TOLERANCE * max(scale, 1.0)):
                raise QCompilerError(f"onnx target, dynamic shapes: the symbolic model's output {index} differs from "
                                     f"the export at sizes {key}; build the onnx target at a fixed size")
