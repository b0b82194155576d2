"""Data-movement and reduction ops: reshape, transpose, concat, slice, gather, index, expand,
pad, split, reductions. Shapes are static, so targets (reshape's shape, slice bounds) are
attributes resolved at capture, never runtime tensors."""
from __future__ import annotations

import numpy as np

from ...errors import InputError
from ..types import TensorType
from .registry import Attr, Traits, broadcast_shapes, declare, norm_axis, same_dtype

LAYOUT = Traits("layout")
ON_GRID = Traits("layout", on_grid=True)  # moves values only: runs on quantized integers as they are
INDEX = Traits("index")  # reads at run-time indices (checked: an index out of range is bad input)


def _reshape_infer(types, attrs):
    x, shape = types[0], attrs["shape"]
    if any(d < 0 for d in shape) or int(np.prod(shape, dtype=np.int64)) != x.size:
        raise TypeError(f"reshape: cannot reshape {x} to {list(shape)}")
    return [TensorType(shape, x.dtype)]


declare("reshape", arity=1, attrs={"shape": Attr("ints")}, infer=_reshape_infer,
        kernel=lambda xs, a: xs[0].reshape(a["shape"]), traits=ON_GRID,
        doc="same elements, new static shape (flatten/squeeze/unsqueeze/view capture to this)")


def _transpose_infer(types, attrs):
    x, perm = types[0], attrs["perm"]
    if sorted(perm) != list(range(x.rank)):
        raise TypeError(f"transpose: perm {list(perm)} is not a permutation of {x.rank} axes")
    return [TensorType(tuple(x.shape[p] for p in perm), x.dtype)]


declare("transpose", arity=1, attrs={"perm": Attr("ints")}, infer=_transpose_infer,
        kernel=lambda xs, a: np.ascontiguousarray(np.transpose(xs[0], a["perm"])), traits=ON_GRID,
        doc="permute axes: out.shape[i] = x.shape[perm[i]]")


def _concat_infer(types, attrs):
    first = types[0]
    axis = norm_axis(attrs["axis"], first.rank, "concat")
    for t in types[1:]:
        if t.rank != first.rank or any(t.shape[i] != first.shape[i] for i in range(first.rank) if i != axis):
            raise TypeError(f"concat: {t} does not fit {first} along axis {axis}")
    shape = list(first.shape)
    shape[axis] = sum(t.shape[axis] for t in types)
    return [TensorType(tuple(shape), same_dtype(types, "concat"))]


declare("concat", arity=(1, 1 << 16), attrs={"axis": Attr("int")}, infer=_concat_infer,
        kernel=lambda xs, a: np.concatenate(xs, axis=a["axis"]),
        traits=Traits("layout", quant="shared_params", config_type="concat", on_grid=True),
        doc="join inputs along `axis`")


def _slices(shape, attrs) -> tuple[slice, ...]:
    index = [slice(None)] * len(shape)
    for start, end, axis, step in zip(attrs["starts"], attrs["ends"], attrs["axes"], attrs["steps"]):
        index[axis % len(shape)] = slice(start, end, step)
    return tuple(index)


def _slice_infer(types, attrs):
    x = types[0]
    n = len(attrs["starts"])
    if not (len(attrs["ends"]) == len(attrs["axes"]) == len(attrs["steps"]) == n):
        raise TypeError("slice: starts, ends, axes and steps must have the same length")
    if any(s == 0 for s in attrs["steps"]):
        raise TypeError("slice: step 0")
    for axis in attrs["axes"]:
        norm_axis(axis, x.rank, "slice")
    shape = tuple(len(range(*s.indices(d))) for s, d in zip(_slices(x.shape, attrs), x.shape))
    return [TensorType(shape, x.dtype)]


declare("slice", arity=1,
        attrs={"starts": Attr("ints"), "ends": Attr("ints"), "axes": Attr("ints"), "steps": Attr("ints")},
        infer=_slice_infer, kernel=lambda xs, a: np.ascontiguousarray(xs[0][_slices(xs[0].shape, a)]),
        traits=ON_GRID, doc="python slicing x[start:end:step] on each listed axis (bounds clamp)")


def _check_indices(t: TensorType, where: str) -> None:
    if t.dtype not in ("i64", "i32"):
        raise TypeError(f"{where}: indices must be i64 or i32, got {t.dtype}")


def _gather_infer(types, attrs):
    data, idx = types
    _check_indices(idx, "gather")
    axis = norm_axis(attrs["axis"], data.rank, "gather")
    return [TensorType(data.shape[:axis] + idx.shape + data.shape[axis + 1:], data.dtype)]


def wrapped_indices(idx: np.ndarray, size: int) -> np.ndarray:
    """``idx`` with negative entries counted from the end; ``InputError`` when one is out of
    ``[-size, size)`` (a token id past a vocabulary is bad input, not a crash)."""
    if idx.size and (idx.min() < -size or idx.max() >= size):
        bad = idx[(idx < -size) | (idx >= size)].flat[0]
        raise InputError(f"index {bad} out of range for axis of size {size}")
    return np.where(idx < 0, idx + size, idx)


def _gather_kernel(xs, attrs):
    data, idx = xs
    axis = attrs["axis"] % data.ndim
    return np.take(data, wrapped_indices(idx, data.shape[axis]), axis=axis)


declare("gather", arity=2, attrs={"axis": Attr("int", 0)}, infer=_gather_infer, kernel=_gather_kernel,
        traits=INDEX, doc="ONNX Gather / embedding lookup: take slices of `data` at `indices` on `axis`")


def _gather_elements_infer(types, attrs):
    data, idx = types
    _check_indices(idx, "gather_elements")
    norm_axis(attrs["axis"], data.rank, "gather_elements")
    if idx.rank != data.rank:
        raise TypeError(f"gather_elements: indices {idx} must have the rank of data {data}")
    return [TensorType(idx.shape, data.dtype)]


def _gather_elements_kernel(xs, attrs):
    data, idx = xs
    axis = attrs["axis"] % data.ndim
    return np.take_along_axis(data, wrapped_indices(idx, data.shape[axis]), axis=axis)


declare("gather_elements", arity=2, attrs={"axis": Attr("int", 0)}, infer=_gather_elements_infer,
        kernel=_gather_elements_kernel, traits=INDEX,
        doc="torch.gather / ONNX GatherElements: out[i][j] = data[i][idx[i][j]] on `axis`")


_SCATTER_REDUCTIONS = {"add": np.add, "mul": np.multiply, "max": np.maximum, "min": np.minimum}


def _scatter_elements_infer(types, attrs):
    data, idx, updates = types
    _check_indices(idx, "scatter_elements")
    norm_axis(attrs["axis"], data.rank, "scatter_elements")
    if idx.shape != updates.shape or idx.rank != data.rank:
        raise TypeError(f"scatter_elements: indices {idx} and updates {updates} must have one shape, of data's rank")
    return [TensorType(data.shape, same_dtype([data, updates], "scatter_elements"))]


def _scatter_elements_kernel(xs, attrs):
    """out = data; out[i][idx[i][j]] = updates[i][j] on ``axis`` (combined by ``reduction``)."""
    data, idx, updates = xs
    axis = attrs["axis"] % data.ndim
    where = list(np.indices(idx.shape, sparse=True))
    where[axis] = wrapped_indices(idx, data.shape[axis])
    out = data.copy()
    if attrs["reduction"] == "none":
        out[tuple(where)] = updates
    else:
        _SCATTER_REDUCTIONS[attrs["reduction"]].at(out, tuple(where), updates)
    return out


_REDUCTION = Attr("str", "none", "none (replace), add, mul, max or min")
declare("scatter_elements", arity=3, attrs={"axis": Attr("int", 0), "reduction": _REDUCTION},
        infer=_scatter_elements_infer, kernel=_scatter_elements_kernel, traits=INDEX,
        doc="ONNX ScatterElements / torch.scatter: data with updates written at `indices` along `axis`")


def _scatter_nd_infer(types, attrs):
    data, idx, updates = types
    _check_indices(idx, "scatter_nd")
    depth = idx.shape[-1] if idx.rank else 0
    if not 1 <= depth <= data.rank or updates.shape != idx.shape[:-1] + data.shape[depth:]:
        raise TypeError(f"scatter_nd: indices {idx} and updates {updates} do not fit data {data}")
    return [TensorType(data.shape, same_dtype([data, updates], "scatter_nd"))]


def _scatter_nd_kernel(xs, attrs):
    """out = data; out[idx[..., :]] = updates[...] for each index tuple, in order."""
    data, idx, updates = xs
    depth = idx.shape[-1]
    out = data.copy()
    tuples = np.stack([wrapped_indices(idx[..., k], data.shape[k]) for k in range(depth)], -1).reshape(-1, depth)
    combine = _SCATTER_REDUCTIONS.get(attrs["reduction"])
    for at, update in zip(map(tuple, tuples), updates.reshape((-1,) + data.shape[depth:])):
        out[at] = update if combine is None else combine(out[at], update)
    return out


declare("scatter_nd", arity=3, attrs={"reduction": _REDUCTION}, infer=_scatter_nd_infer, kernel=_scatter_nd_kernel,
        traits=INDEX, doc="ONNX ScatterND: data with update slices written at the index tuples of `indices`")


def _index_infer(types, attrs):
    data, idxs = types[0], types[1:]
    for t in idxs:
        _check_indices(t, "index")
    if len(idxs) > data.rank:
        raise TypeError(f"index: {len(idxs)} index tensors for rank-{data.rank} data")
    return [TensorType(broadcast_shapes(*(t.shape for t in idxs), where="index") + data.shape[len(idxs):],
                       data.dtype)]


def _index_kernel(xs, attrs):
    data, idxs = xs[0], xs[1:]
    return data[tuple(wrapped_indices(idx, size) for idx, size in zip(idxs, data.shape))]


declare("index", arity=(2, 64), infer=_index_infer, kernel=_index_kernel,
        traits=INDEX, doc="advanced indexing data[i0, i1, ...] on the leading axes (indices broadcast)")


def _expand_infer(types, attrs):
    x = types[0]
    shape = tuple(attrs["shape"])
    if broadcast_shapes(x.shape, shape, where="expand") != shape:
        raise TypeError(f"expand: {x} does not broadcast to {list(shape)}")
    return [TensorType(shape, x.dtype)]


declare("expand", arity=1, attrs={"shape": Attr("ints")}, infer=_expand_infer,
        kernel=lambda xs, a: np.ascontiguousarray(np.broadcast_to(xs[0], a["shape"])), traits=ON_GRID,
        doc="broadcast to a static shape")


def _tile_infer(types, attrs):
    x, reps = types[0], attrs["repeats"]
    if len(reps) != x.rank or any(r < 0 for r in reps):
        raise TypeError(f"tile: needs {x.rank} non-negative repeats, got {list(reps)}")
    return [TensorType(tuple(d * r for d, r in zip(x.shape, reps)), x.dtype)]


declare("tile", arity=1, attrs={"repeats": Attr("ints")}, infer=_tile_infer,
        kernel=lambda xs, a: np.tile(xs[0], a["repeats"]), traits=LAYOUT,
        doc="repeat the whole tensor `repeats[i]` times along each axis")


def _pad_infer(types, attrs):
    x, pads = types[0], attrs["pads"]
    if len(pads) != 2 * x.rank:
        raise TypeError(f"pad: needs {2 * x.rank} pad values for {x}, got {list(pads)}")
    if attrs["mode"] not in ("constant", "reflect", "edge"):
        raise TypeError(f"pad: unsupported mode '{attrs['mode']}'")
    shape = tuple(d + pads[i] + pads[i + x.rank] for i, d in enumerate(x.shape))
    if any(d < 0 for d in shape):
        raise TypeError(f"pad: negative result shape {shape}")
    return [TensorType(shape, x.dtype)]


def _pad_kernel(xs, attrs):
    x, pads, r = xs[0], attrs["pads"], xs[0].ndim
    crop = tuple(slice(max(0, -pads[i]), x.shape[i] - max(0, -pads[i + r]) or None) for i in range(r))
    x = x[crop]
    widths = [(max(0, pads[i]), max(0, pads[i + r])) for i in range(r)]
    if attrs["mode"] == "constant":
        return np.pad(x, widths, constant_values=np.asarray(attrs["value"]).astype(x.dtype))
    return np.pad(x, widths, mode=attrs["mode"])


declare("pad", arity=1, attrs={"pads": Attr("ints"), "mode": Attr("str", "constant"), "value": Attr("float", 0.0)},
        infer=_pad_infer, kernel=_pad_kernel, traits=LAYOUT,
        doc="pad (negative pads crop) with ONNX's [begins..., ends...] layout; modes constant/reflect/edge")


def _split_infer(types, attrs):
    x = types[0]
    axis = norm_axis(attrs["axis"], x.rank, "split")
    if sum(attrs["sizes"]) != x.shape[axis] or any(s < 0 for s in attrs["sizes"]):
        raise TypeError(f"split: sizes {list(attrs['sizes'])} do not add up to {x.shape[axis]} on axis {axis}")
    out = []
    for s in attrs["sizes"]:
        shape = list(x.shape)
        shape[axis] = s
        out.append(TensorType(tuple(shape), x.dtype))
    return out


def _split_kernel(xs, attrs):
    bounds = np.cumsum(attrs["sizes"])[:-1]
    return [np.ascontiguousarray(p) for p in np.split(xs[0], bounds, axis=attrs["axis"])]


declare("split", arity=1, attrs={"axis": Attr("int"), "sizes": Attr("ints")}, infer=_split_infer,
        kernel=_split_kernel, traits=LAYOUT, doc="cut into consecutive pieces of `sizes` along `axis`")


# ---- reductions -----------------------------------------------------------------------------
def _reduce_infer(name):
    def infer(types, attrs):
        x = types[0]
        axes = {norm_axis(a, x.rank, name) for a in attrs["axes"]} if attrs["axes"] else set(range(x.rank))
        shape = tuple(1 if i in axes else d for i, d in enumerate(x.shape) if attrs["keepdims"] or i not in axes)
        return [TensorType(shape, x.dtype)]
    return infer


_REDUCTIONS = {
    "reduce_mean": (np.mean, "mean"),
    "reduce_sum": (np.sum, "sum"),
    "reduce_max": (np.max, "maximum"),
    "reduce_min": (np.min, "minimum"),
    "reduce_prod": (np.prod, "product"),
}
def _reduce_kernel(fn, x: np.ndarray, attrs) -> np.ndarray:
    out = np.asarray(fn(x, axis=tuple(attrs["axes"]) or None, keepdims=attrs["keepdims"]))
    if fn is np.mean and x.dtype.kind in "iu":  # a quantized mean rounds half to even
        out = np.rint(out)
    return out.astype(x.dtype)


# a global average pool is a mean: quantized with its own (finer) scale, exact as an int32 sum
_REDUCE_TRAITS = {"reduce_mean": Traits("reduce", quant="own_params", config_type="pool", on_grid=True)}
for _name, (_fn, _what) in _REDUCTIONS.items():
    declare(_name, arity=1, attrs={"axes": Attr("ints", ()), "keepdims": Attr("bool", False)},
            infer=_reduce_infer(_name), traits=_REDUCE_TRAITS.get(_name, Traits("reduce")),
            kernel=lambda xs, a, fn=_fn: _reduce_kernel(fn, xs[0], a),
            doc=f"{_what} over `axes` (all axes when empty)")


def _argmax_infer(types, attrs):
    x = types[0]
    axis = norm_axis(attrs["axis"], x.rank, "argmax")
    shape = tuple(1 if i == axis else d for i, d in enumerate(x.shape) if attrs["keepdims"] or i != axis)
    return [TensorType(shape, "i64")]


declare("argmax", arity=1, attrs={"axis": Attr("int", 0), "keepdims": Attr("bool", False)}, infer=_argmax_infer,
        kernel=lambda xs, a: np.argmax(xs[0], axis=a["axis"], keepdims=a["keepdims"]).astype(np.int64),
        traits=Traits("reduce"), doc="index of the first maximum along `axis`")


# ---- einsum and top-k --------------------------------------------------------------------------
def _einsum_infer(types, attrs):
    equation = attrs["equation"].replace(" ", "")
    try:
        shape = np.einsum(equation, *[np.empty(t.shape, np.float32) for t in types]).shape
    except ValueError as e:
        raise TypeError(f"einsum '{equation}': {e}") from None
    return [TensorType(shape, same_dtype(types, "einsum"))]


declare("einsum", arity=(1, 8), attrs={"equation": Attr("str")}, infer=_einsum_infer,
        kernel=lambda xs, a: np.asarray(np.einsum(a["equation"].replace(" ", ""), *xs), dtype=xs[0].dtype),
        traits=Traits("matmul"), doc="Einstein summation of the operands by `equation` (ONNX Einsum, torch.einsum)")


def _topk_infer(types, attrs):
    x = types[0]
    axis = norm_axis(attrs["axis"], x.rank, "topk")
    if not 0 <= attrs["k"] <= x.shape[axis]:
        raise TypeError(f"topk: k={attrs['k']} for an axis of {x.shape[axis]}")
    shape = tuple(attrs["k"] if i == axis else d for i, d in enumerate(x.shape))
    return [TensorType(shape, x.dtype), TensorType(shape, "i64")]


def _topk_kernel(xs, attrs):
    """ONNX TopK: ties keep the lower index first (a stable sort of -x, or of x for smallest)."""
    x = xs[0]
    axis = attrs["axis"] % x.ndim
    keys = -x if attrs["largest"] else x
    if x.dtype.kind in "iu" and attrs["largest"]:
        keys = -x.astype(np.int64)
    order = np.argsort(keys, axis=axis, kind="stable")
    index = np.take(order, np.arange(attrs["k"]), axis=axis)
    return [np.take_along_axis(x, index, axis=axis), index.astype(np.int64)]


declare("topk", arity=1, attrs={"k": Attr("int"), "axis": Attr("int", -1), "largest": Attr("bool", True)},
        infer=_topk_infer, kernel=_topk_kernel, traits=Traits("index"),
        doc="the k largest (or smallest) values along `axis`, sorted, and their indices (ONNX TopK)")
