"""Neural-network ops: convolution, batch norm, pooling, linear/matmul, softmax, layer norm.

Padding is ONNX-style ``[begin_0, begin_1, ..., end_0, end_1, ...]`` so asymmetric padding
(ONNX ``SAME_UPPER``, TF-exported models) needs no separate pad node."""
from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from ..types import TensorType
from .registry import Attr, Traits, conv_out_dim, declare, get_op, norm_axis, same_dtype


# ---- fused activations ----------------------------------------------------------------------------
# conv/linear/matmul may carry the activation that followed them (fuse-activations): the
# `activation` attribute names it and `activation_args` holds clip's bounds.
ACTIVATIONS = ("none", "relu", "clip", "hardswish", "hardsigmoid", "sigmoid", "silu", "gelu", "gelu_tanh", "tanh")
ACTIVATION_ATTRS = {"activation": Attr("str", "none", "fused activation applied to the result"),
                    "activation_args": Attr("floats", (), "clip's [min, max] when activation='clip'")}


def check_activation(attrs, where: str) -> None:
    act = attrs["activation"]
    if act not in ACTIVATIONS:
        raise TypeError(f"{where}: unknown activation '{act}' (one of {', '.join(ACTIVATIONS)})")
    if (act == "clip") != bool(attrs["activation_args"]) or (act == "clip" and len(attrs["activation_args"]) != 2):
        raise TypeError(f"{where}: activation_args must be [min, max] for clip and empty otherwise")


def apply_activation(y: np.ndarray, attrs) -> np.ndarray:
    """Run the fused activation with the standalone op's own kernel, so fusing is exact."""
    act = attrs["activation"]
    if act == "none":
        return y
    if act == "clip":
        lo, hi = attrs["activation_args"]
        return get_op("clip").run([y], {"min": lo, "max": hi})[0]
    if act.startswith("gelu"):
        return get_op("gelu").run([y], {"approximate": "tanh" if act == "gelu_tanh" else "none"})[0]
    op = get_op(act)
    return op.run([y], op.normalize_attrs({}, act))[0]


def _window_attrs(rank: int, pool: bool) -> dict[str, Attr]:
    attrs = {
        "strides": Attr("ints", (1,) * rank),
        "pads": Attr("ints", (0,) * (2 * rank)),
        "dilations": Attr("ints", (1,) * rank),
    }
    if pool:
        attrs = {"kernel": Attr("ints"), **attrs, "ceil_mode": Attr("bool", False)}
    return attrs


def _check_window(attrs, rank: int, where: str) -> None:
    for key, n in (("strides", rank), ("pads", 2 * rank), ("dilations", rank), ("kernel", rank)):
        if key in attrs and len(attrs[key]) != n:
            raise TypeError(f"{where}: '{key}' needs {n} values, got {list(attrs[key])}")
    if any(s <= 0 for s in attrs["strides"]) or any(d <= 0 for d in attrs["dilations"]):
        raise TypeError(f"{where}: strides and dilations must be positive")


def _spatial_out(in_shape, kernel, attrs, rank: int, ceil_mode: bool = False) -> list[int]:
    pads = attrs["pads"]
    return [conv_out_dim(in_shape[i], kernel[i], attrs["strides"][i], pads[i], pads[i + rank],
                         attrs["dilations"][i], ceil_mode) for i in range(rank)]


# ---- convolution --------------------------------------------------------------------------
def _declare_conv(name: str, integer_form: str, rank: int) -> None:

    def infer(types, attrs):
        x, w = types[0], types[1]
        _check_window(attrs, rank, name)
        check_activation(attrs, name)
        if x.rank != rank + 2 or w.rank != rank + 2:
            raise TypeError(f"{name}: input and weight must have rank {rank + 2}, got {x} and {w}")
        groups = attrs["groups"]
        if x.shape[1] != w.shape[1] * groups or w.shape[0] % groups:
            raise TypeError(f"{name}: input {x} does not fit weight {w} with groups={groups}")
        if len(types) == 3 and types[2].shape != (w.shape[0],):
            raise TypeError(f"{name}: bias {types[2]} does not match {w.shape[0]} output channels")
        dtype = same_dtype(types, name)
        out = _spatial_out(x.shape[2:], w.shape[2:], attrs, rank)
        return [TensorType((x.shape[0], w.shape[0], *out), dtype)]

    declare(name, arity=(2, 3), attrs={**_window_attrs(rank, pool=False), "groups": Attr("int", 1), **ACTIVATION_ATTRS},
            infer=infer, kernel=None,  # qcompiler.torch_kernels: torch's convolution
            traits=Traits("conv", quant="weighted", config_type="conv", weight_slot=1, bias_slot=2, channel_axis=1,
                          integer_form=integer_form, fuses_activation=True, spatial_rank=rank),
            doc=f"{rank}-D convolution, NC{'DHW'[-rank:]} input, OI{'DHW'[-rank:]} weight, optional bias; "
                "grouped/depthwise via `groups`")


# ---- pooling ------------------------------------------------------------------------------
def _pool_windows(x: np.ndarray, attrs, rank: int, fill: float) -> tuple[np.ndarray, np.ndarray]:
    """Sliding windows over ``x`` padded with ``fill``, and a 0/1 mask of which window
    elements count for averaging (explicit padding counts; ceil-mode overhang never does)."""
    kernel, strides, dil, pads = attrs["kernel"], attrs["strides"], attrs["dilations"], attrs["pads"]
    out = _spatial_out(x.shape[2:], kernel, attrs, rank, attrs["ceil_mode"])
    widths = [(0, 0), (0, 0)]
    for i in range(rank):
        need = (out[i] - 1) * strides[i] + dil[i] * (kernel[i] - 1) + 1
        extra = max(0, need - (x.shape[2 + i] + pads[i] + pads[i + rank]))
        widths.append((pads[i], pads[i + rank] + extra))
    padded = np.pad(x, widths, constant_values=fill)
    mask = np.zeros(padded.shape[2:], np.float32)
    if attrs.get("count_include_pad"):
        mask[tuple(slice(0, x.shape[2 + i] + pads[i] + pads[i + rank]) for i in range(rank))] = 1
    else:
        mask[tuple(slice(pads[i], pads[i] + x.shape[2 + i]) for i in range(rank))] = 1

    def windows(a: np.ndarray, lead: int) -> np.ndarray:
        span = [dil[i] * (kernel[i] - 1) + 1 for i in range(rank)]
        v = sliding_window_view(a, span, axis=tuple(range(lead, lead + rank)))
        index = (slice(None),) * lead + tuple(slice(None, out[i] * strides[i], strides[i]) for i in range(rank))
        index += tuple(slice(None, None, dil[i]) for i in range(rank))
        return v[index]

    return windows(padded, 2), windows(mask, 0)


def _declare_pools(max_name: str, avg_name: str, rank: int) -> None:
    win_axes = tuple(range(-rank, 0))

    def infer_for(name):
        def infer(types, attrs):
            x = types[0]
            _check_window(attrs, rank, name)
            if x.rank != rank + 2:
                raise TypeError(f"{name}: input must have rank {rank + 2}, got {x}")
            out = _spatial_out(x.shape[2:], attrs["kernel"], attrs, rank, attrs["ceil_mode"])
            return [TensorType((*x.shape[:2], *out), x.dtype)]
        return infer

    def max_kernel(xs, attrs):
        win, _ = _pool_windows(xs[0], attrs, rank, -np.inf if xs[0].dtype.kind == "f" else np.iinfo(xs[0].dtype).min)
        return win.max(axis=win_axes)

    def avg_kernel(xs, attrs):
        win, mask = _pool_windows(xs[0], attrs, rank, 0)
        total = win.sum(axis=win_axes, dtype=np.float64)
        mean = total / mask.sum(axis=win_axes)
        return (np.rint(mean) if xs[0].dtype.kind in "iu" else mean).astype(xs[0].dtype)  # ints: half to even

    pool_traits = Traits("pool", quant="same_as_input", config_type="pool", on_grid=True, spatial_rank=rank)
    declare(max_name, arity=1, attrs=_window_attrs(rank, pool=True), infer=infer_for(max_name),
            kernel=max_kernel, traits=pool_traits, doc=f"{rank}-D max pooling; padding never wins the max")
    # on integers (quantized values) the average is rounded half to even
    declare(avg_name, arity=1,
            attrs={**_window_attrs(rank, pool=True), "count_include_pad": Attr("bool", False)},
            infer=infer_for(avg_name), kernel=avg_kernel, traits=pool_traits,
            doc=f"{rank}-D average pooling; `count_include_pad` counts explicit padding in the divisor")


def conv_transpose_out(size: int, kernel: int, stride: int, dilation: int, pad_begin: int, pad_end: int,
                       output_padding: int) -> int:
    """ONNX ConvTranspose's output extent: s (in - 1) + output_padding + d (k - 1) + 1 - pads."""
    return stride * (size - 1) + output_padding + dilation * (kernel - 1) + 1 - pad_begin - pad_end


def _declare_conv_transpose(name: str, rank: int) -> None:
    def infer(types, attrs):
        x, w = types[0], types[1]
        _check_window(attrs, rank, name)
        groups, out_pad = attrs["groups"], attrs["output_padding"]
        if x.rank != rank + 2 or w.rank != rank + 2 or x.shape[1] != w.shape[0] or w.shape[0] % groups:
            raise TypeError(f"{name}: input {x} does not fit weight {w} ([C_in, C_out / groups, ...]) with "
                            f"groups={groups}")
        if len(out_pad) != rank or any(not 0 <= p < max(s, d) for p, s, d in zip(out_pad, attrs["strides"],
                                                                                 attrs["dilations"])):
            raise TypeError(f"{name}: output_padding {list(out_pad)} must be below the stride or dilation")
        channels = w.shape[1] * groups
        if len(types) == 3 and types[2].shape != (channels,):
            raise TypeError(f"{name}: bias {types[2]} does not match {channels} output channels")
        pads = attrs["pads"]
        out = [conv_transpose_out(x.shape[2 + i], w.shape[2 + i], attrs["strides"][i], attrs["dilations"][i],
                                  pads[i], pads[i + rank], out_pad[i]) for i in range(rank)]
        if min(out) < 1:
            raise TypeError(f"{name}: pads {list(pads)} leave no output")
        return [TensorType((x.shape[0], channels, *out), same_dtype(types, name))]

    declare(name, arity=(2, 3), attrs={**_window_attrs(rank, pool=False), "groups": Attr("int", 1),
                                       "output_padding": Attr("ints", (0,) * rank)},
            infer=infer, kernel=None,  # qcompiler.torch_kernels: torch's transposed convolution, cropped
            traits=Traits("conv_transpose", spatial_rank=rank, quantized_as=f"conv{rank}d"),
            doc=f"{rank}-D transposed convolution (ONNX ConvTranspose), weight [C_in, C_out / groups, ...], "
                "optional bias; pads crop the full result, output_padding extends its end")


_declare_conv_transpose("conv_transpose1d", 1)
_declare_conv_transpose("conv_transpose2d", 2)
_declare_conv_transpose("conv_transpose3d", 3)
_declare_conv("conv1d", "conv1d_int", 1)
_declare_conv("conv2d", "conv2d_int", 2)
_declare_conv("conv3d", "conv3d_int", 3)
_declare_pools("max_pool1d", "avg_pool1d", 1)
_declare_pools("max_pool2d", "avg_pool2d", 2)
_declare_pools("max_pool3d", "avg_pool3d", 3)


def _adaptive_infer(types, attrs):
    x = types[0]
    if x.rank != 4 or len(attrs["output_size"]) != 2:
        raise TypeError(f"adaptive_avg_pool2d: needs a rank-4 input and two output sizes, got {x}")
    return [TensorType((*x.shape[:2], *attrs["output_size"]), x.dtype)]


declare("adaptive_avg_pool2d", arity=1, attrs={"output_size": Attr("ints")}, infer=_adaptive_infer,
        kernel=None,  # qcompiler.torch_kernels: torch's bin rule
        traits=Traits("pool", spatial_rank=2),
        doc="average pooling into a fixed output grid (PyTorch's bin rule)")


# ---- batch norm ---------------------------------------------------------------------------
def _bn_infer(types, attrs):
    x = types[0]
    if x.rank < 2 or any(t.shape != (x.shape[1],) for t in types[1:]):
        raise TypeError(f"batch_norm: parameters must be [{x.shape[1] if x.rank > 1 else '?'}], "
                        f"got {', '.join(map(str, types[1:]))}")
    return [TensorType(x.shape, same_dtype(types, "batch_norm"))]


def _bn_kernel(xs, attrs):
    x, scale, bias, mean, var = xs
    shape = (1, -1) + (1,) * (x.ndim - 2)
    inv = scale / np.sqrt(var + np.float32(attrs["epsilon"]))
    return (x - mean.reshape(shape)) * inv.reshape(shape) + bias.reshape(shape)


declare("batch_norm", arity=5, attrs={"epsilon": Attr("float", 1e-5)}, infer=_bn_infer, kernel=_bn_kernel,
        traits=Traits("norm"), doc="inference batch norm (x - mean) / sqrt(var + eps) * scale + bias, channel axis 1")


# ---- linear algebra -----------------------------------------------------------------------
def _matmul_shape(a: tuple[int, ...], b: tuple[int, ...], where: str) -> tuple[int, ...]:
    if not a or not b:
        raise TypeError(f"{where}: operands must have rank >= 1, got {a} and {b}")
    a2 = a if len(a) > 1 else (1,) + a
    b2 = b if len(b) > 1 else b + (1,)
    if a2[-1] != b2[-2]:
        raise TypeError(f"{where}: inner dimensions differ: {a} @ {b}")
    try:
        batch = np.broadcast_shapes(a2[:-2], b2[:-2])
    except ValueError:
        raise TypeError(f"{where}: batch dimensions {a2[:-2]} and {b2[:-2]} do not broadcast") from None
    out = tuple(batch) + (a2[-2], b2[-1])
    if len(a) == 1:
        out = out[:-2] + out[-1:]
    if len(b) == 1:
        out = out[:-1]
    return out


def _matmul_infer(types, attrs):
    check_activation(attrs, "matmul")
    return [TensorType(_matmul_shape(types[0].shape, types[1].shape, "matmul"), same_dtype(types, "matmul"))]


declare("matmul", arity=2, attrs=ACTIVATION_ATTRS, infer=_matmul_infer,
        kernel=lambda xs, a: apply_activation(np.matmul(xs[0], xs[1]), a),
        traits=Traits("matmul", quant="weighted", config_type="matmul", weight_slot=1, integer_form="matmul_int",
                      fuses_activation=True),
        doc="numpy matmul: batched, broadcasting, 1-D operands promoted; weights per tensor")


def _linear_infer(types, attrs):
    check_activation(attrs, "linear")
    x, w = types[0], types[1]
    if w.rank != 2 or not x.rank or x.shape[-1] != w.shape[1]:
        raise TypeError(f"linear: input {x} does not fit weight {w} ([out, in])")
    if len(types) == 3 and types[2].shape != (w.shape[0],):
        raise TypeError(f"linear: bias {types[2]} does not match {w.shape[0]} outputs")
    return [TensorType(x.shape[:-1] + (w.shape[0],), same_dtype(types, "linear"))]


def _linear_kernel(xs, attrs):
    y = np.matmul(xs[0], xs[1].T)
    return apply_activation(y + xs[2] if len(xs) == 3 else y, attrs)


declare("linear", arity=(2, 3), attrs=ACTIVATION_ATTRS, infer=_linear_infer, kernel=_linear_kernel,
        traits=Traits("linear", quant="weighted", config_type="linear", weight_slot=1, bias_slot=2, channel_axis=-1,
                      integer_form="linear_int", fuses_activation=True),
        doc="x @ w.T + b with w as [out_features, in_features] (PyTorch's layout)")


# ---- normalization and softmax --------------------------------------------------------------
def _softmax_kernel(log: bool):
    def kernel(xs, attrs):
        x = xs[0]
        axis = attrs["axis"]
        shifted = x - x.max(axis=axis, keepdims=True)
        e = np.exp(shifted)
        s = e.sum(axis=axis, keepdims=True)
        return (shifted - np.log(s)) if log else e / s
    return kernel


def _axis_infer(name):
    def infer(types, attrs):
        norm_axis(attrs["axis"], types[0].rank, name)
        return [types[0]]
    return infer


declare("softmax", arity=1, attrs={"axis": Attr("int", -1)}, infer=_axis_infer("softmax"),
        kernel=_softmax_kernel(False), traits=Traits("softmax"), doc="exp(x) / sum(exp(x)) along `axis`")
declare("log_softmax", arity=1, attrs={"axis": Attr("int", -1)}, infer=_axis_infer("log_softmax"),
        kernel=_softmax_kernel(True), traits=Traits("softmax"), doc="log(softmax(x)) along `axis`")


def _ln_infer(types, attrs):
    x = types[0]
    axis = norm_axis(attrs["axis"], x.rank, "layer_norm")
    for t in types[1:]:
        if t.shape != x.shape[axis:]:
            raise TypeError(f"layer_norm: scale/bias {t} must have the normalized shape {list(x.shape[axis:])}")
    return [TensorType(x.shape, same_dtype(types, "layer_norm"))]


def _ln_kernel(xs, attrs):
    x = xs[0]
    axes = tuple(range(attrs["axis"] % x.ndim, x.ndim))
    mean = x.mean(axis=axes, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=axes, keepdims=True)
    y = (x - mean) / np.sqrt(var + np.float32(attrs["epsilon"]))
    if len(xs) > 1:
        y = y * xs[1]
    if len(xs) > 2:
        y = y + xs[2]
    return y


declare("layer_norm", arity=(1, 3), attrs={"axis": Attr("int", -1), "epsilon": Attr("float", 1e-5)},
        infer=_ln_infer, kernel=_ln_kernel, traits=Traits("norm"),
        doc="normalize over dims axis..-1, then * scale + bias (both optional, trailing)")
