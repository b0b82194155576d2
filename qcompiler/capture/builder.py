"""What both importers share: emitting IR nodes with a source location, making constants,
and evaluating ops whose inputs are all constants at import time (shape arithmetic, masks
built from buffers), so the captured graph carries only computation that depends on inputs."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from ..ir import Graph, TensorType, Value
from ..ir.ops import get_op


# the IR op for each spatial rank (names spelled out: grep finds every use of an op)
CONV = {1: "conv1d", 2: "conv2d", 3: "conv3d"}
CONV_TRANSPOSE = {1: "conv_transpose1d", 2: "conv_transpose2d", 3: "conv_transpose3d"}
CONV_INT = {1: "conv1d_int", 2: "conv2d_int", 3: "conv3d_int"}
MAX_POOL = {1: "max_pool1d", 2: "max_pool2d", 3: "max_pool3d"}
AVG_POOL = {1: "avg_pool1d", 2: "avg_pool2d", 3: "avg_pool3d"}


class GraphBuilder:
    def __init__(self, graph: Graph):
        self.graph = graph
        self.source = ""  # the source name stamped on nodes emitted now

    def const(self, array: Any, hint: str = "const", dtype: Any = None) -> Value:
        return self.graph.add_constant(hint, np.asarray(array, dtype=dtype))

    def is_const(self, v: Value) -> bool:
        return v.is_constant

    def array(self, v: Value) -> np.ndarray:
        return self.graph.constant_array(v)

    def emit(self, op: str, inputs: Sequence[Value], attrs: dict[str, Any] | None = None, *,
             name: str | None = None, fold: bool = True) -> list[Value]:
        """Add ``op``; when every input is a constant (and ``fold``), evaluate it now and
        return constants instead of a node."""
        if fold and inputs and all(v.is_constant for v in inputs):
            opdef = get_op(op)
            attrs = opdef.normalize_attrs(dict(attrs or {}), op)
            types = opdef.infer([v.type for v in inputs], attrs)
            outs = opdef.run([self.array(v) for v in inputs], attrs)
            return [self.const(np.asarray(o, dtype=t.np_dtype).reshape(t.shape), name or op)
                    for o, t in zip(outs, types)]
        node = self.graph.add_node(op, list(inputs), attrs, name=name, meta={"source": self.source})
        return node.outputs

    def emit1(self, op: str, inputs: Sequence[Value], attrs: dict[str, Any] | None = None, *,
              name: str | None = None) -> Value:
        return self.emit(op, inputs, attrs, name=name)[0]

    def cast(self, v: Value, dtype: str) -> Value:
        return v if v.dtype == dtype else self.emit1("cast", [v], {"to": dtype})

    def reshape(self, v: Value, shape: Sequence[int]) -> Value:
        shape = tuple(int(d) for d in shape)
        return v if v.shape == shape else self.emit1("reshape", [v], {"shape": shape})

    def take(self, v: Value, axis: int, index: int) -> Value:
        """v[..., index, ...] along ``axis``, that axis removed."""
        part = self.emit1("slice", [v], {"starts": [index], "ends": [index + 1], "axes": [axis], "steps": [1]})
        return self.reshape(part, v.shape[:axis] + v.shape[axis + 1:])

    def stack(self, parts: Sequence[Value], axis: int) -> Value:
        """Same-shaped values joined along a new ``axis``."""
        shape = list(parts[0].shape)
        shape.insert(axis, 1)
        return self.emit1("concat", [self.reshape(p, shape) for p in parts], {"axis": axis})

    def scalar_like(self, value: float | int | bool, like: TensorType) -> Value:
        return self.const(np.asarray(value, dtype=like.np_dtype), "scalar")

    def running_sum(self, x: Value, axis: int, exclusive: bool = False, reverse: bool = False) -> Value:
        """The cumulative sum along a static ``axis`` (ONNX CumSum, torch.cumsum) as a product
        with a constant 0/1 matrix: out[i] = sum of x[j] for j <= i (j < i ``exclusive``; the
        mirror image ``reverse``). Exact for integers (a position count from a mask, RoBERTa's
        position ids); float sums in another order."""
        axis %= x.type.rank
        n = x.shape[axis]
        lower = np.tril(np.ones((n, n)), -1 if exclusive else 0)
        weights = lower[::-1, ::-1] if reverse else lower
        last = x.type.rank - 1
        moved = x if axis == last else self.emit1("transpose", [x], {"perm": [i for i in range(last + 1) if i != axis]
                                                                     + [axis]})
        summed = self.emit1("matmul", [moved, self.const(weights.T.astype(x.type.np_dtype), "running_sum")])
        if axis == last:
            return summed
        back = list(range(last))
        back.insert(axis, last)
        return self.emit1("transpose", [summed], {"perm": back})

    def group_normalized(self, x: Value, groups: int, epsilon: float, scale: Value | None = None,
                         bias: Value | None = None) -> Value:
        """Group normalization of ``x`` [N, C, ...]: each sample's channels in ``groups`` runs
        normalized over the run and its positions (biased variance), then ``scale[c]`` and
        ``bias[c]``. As the layer norm of the [N, groups, rest] view over its last axis, so it
        runs on the layer-norm kernel; instance norm is ``groups`` = C."""
        n, c = x.shape[0], x.shape[1]
        normed = self.emit1("layer_norm", [self.reshape(x, (n, groups, x.type.size // (n * groups)))],
                            {"axis": -1, "epsilon": float(epsilon)})
        y = self.reshape(normed, x.shape)
        per_channel = (c,) + (1,) * (x.type.rank - 2)
        if scale is not None:
            y = self.emit1("mul", [y, self.reshape(scale, per_channel)])
        if bias is not None:
            y = self.emit1("add", [y, self.reshape(bias, per_channel)])
        return y

    def rolled(self, x: Value, shifts: Sequence[int], axes: Sequence[int]) -> Value:
        """``x`` rotated by ``shifts[i]`` places along ``axes[i]`` (torch.roll: element j moves to
        j + shift, wrapping), as a slice of each end joined in the other order."""
        for shift, axis in zip(shifts, axes):
            axis %= x.type.rank
            n = x.shape[axis]
            if n == 0 or int(shift) % n == 0:
                continue
            cut = n - int(shift) % n
            parts = [self.emit1("slice", [x], {"starts": [start], "ends": [end], "axes": [axis], "steps": [1]})
                     for start, end in ((cut, n), (0, cut))]
            x = self.emit1("concat", parts, {"axis": axis})
        return x

    def unfolded(self, x: Value, kernel: Sequence[int], dilations: Sequence[int], pads: Sequence[int],
                 strides: Sequence[int]) -> Value:
        """im2col of ``x`` [N, C, H, W] (torch's unfold): [N, C*kh*kw, positions], row c*kh*kw +
        i*kw + j holding tap (i, j) of channel c. A grouped convolution with one-hot filters, each
        copying one tap of one channel: exact (one product by 1, the rest by 0), and quantizable."""
        w = self.const(_one_hot_taps(x.shape[1], kernel, x.type.np_dtype), "unfold_taps")
        y = self.emit1("conv2d", [x, w], {"strides": list(strides), "pads": list(pads), "dilations": list(dilations),
                                          "groups": x.shape[1]})
        return self.reshape(y, (y.shape[0], y.shape[1], y.shape[2] * y.shape[3]))

    def folded(self, cols: Value, size: Sequence[int], kernel: Sequence[int], dilations: Sequence[int],
               pads: Sequence[int], strides: Sequence[int]) -> Value:
        """col2im (torch's fold, ONNX Col2Im): the columns of :meth:`unfolded` added back onto the
        taps they came from in a [N, C, *size] image, as the transposed convolution of the same
        one-hot filters (``pads``: begin values, then end values)."""
        channels = cols.shape[1] // (kernel[0] * kernel[1])
        grid = [(size[i] + pads[i] + pads[i + 2] - dilations[i] * (kernel[i] - 1) - 1) // strides[i] + 1
                for i in range(2)]
        extra = [size[i] - ((grid[i] - 1) * strides[i] - pads[i] - pads[i + 2] + dilations[i] * (kernel[i] - 1) + 1)
                 for i in range(2)]
        w = self.const(_one_hot_taps(channels, kernel, cols.type.np_dtype), "fold_taps")
        return self.emit1("conv_transpose2d", [self.reshape(cols, (cols.shape[0], cols.shape[1], *grid)), w],
                          {"strides": list(strides), "pads": list(pads), "dilations": list(dilations),
                           "groups": channels, "output_padding": extra})

    def python_remainder(self, a: Value, b: Value) -> Value:
        """a mod b with the sign of b (Python's %, numpy's mod, torch.remainder, ONNX Mod fmod=0):
        C's remainder ``fmod`` plus b where it is nonzero and its sign differs from b's, numpy's
        own definition, its NaN and infinity cases included (fmod(-1, inf) = -1 becomes inf)."""
        remainder = self.emit1("fmod", [a, b])
        zero = self.scalar_like(0, a.type)
        signs_differ = self.emit1("logical_xor", [self.emit1("less", [remainder, zero]), self.emit1("less", [b, zero])])
        nonzero = self.emit1("logical_not", [self.emit1("equal", [remainder, zero])])
        return self.emit1("where", [self.emit1("logical_and", [nonzero, signs_differ]),
                                    self.emit1("add", [remainder, b]), remainder])


def _one_hot_taps(channels: int, kernel: Sequence[int], dtype: Any) -> np.ndarray:
    """[channels * kh * kw, 1, kh, kw]: filter c*kh*kw + i*kw + j picks tap (i, j) of channel c."""
    taps = kernel[0] * kernel[1]
    return np.tile(np.eye(taps, dtype=dtype), (channels, 1)).reshape(channels * taps, 1, kernel[0], kernel[1])


def resolve_shape(shape: Sequence[int], total: int, where: str) -> tuple[int, ...]:
    """Resolve ONNX/torch reshape targets: one -1 is inferred (0 is handled by the caller)."""
    shape = [int(d) for d in shape]
    if shape.count(-1) > 1:
        raise ValueError(f"{where}: more than one -1 in shape {shape}")
    if -1 in shape:
        known = int(np.prod([d for d in shape if d != -1], dtype=np.int64))
        shape[shape.index(-1)] = total // known if known else 0
    return tuple(shape)

