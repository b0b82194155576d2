"""Resizing NCHW images to a fixed output size (ONNX Resize, torch's interpolate): nearest
and bilinear, with ONNX's coordinate transformations.

An output pixel ``o`` of an axis resized from ``n`` to ``m`` reads input coordinate
``x = transform(o)``; ``scale = m / n``:

- ``half_pixel``: ``(o + 0.5) / scale - 0.5`` (torch ``align_corners=False``)
- ``pytorch_half_pixel``: the same, and 0 where ``m == 1``
- ``align_corners``: ``o * (n - 1) / (m - 1)`` (0 where ``m == 1``)
- ``asymmetric``: ``o / scale`` (torch's ``nearest``)
- ``tf_half_pixel_for_nn``: ``(o + 0.5) / scale`` (ONNX Resize-11, TensorFlow's nearest; nearest only)

Nearest rounds ``x`` by ``nearest_mode`` and clamps it into the axis; linear clamps ``x`` into
``[0, n - 1]`` and blends the two neighbours. Nearest only copies values, so it runs on
quantized integers as they are (``on_grid``)."""
from __future__ import annotations

import numpy as np

from ..types import TensorType
from .registry import Attr, Traits, declare

COORDINATE_MODES = ("half_pixel", "pytorch_half_pixel", "align_corners", "asymmetric", "tf_half_pixel_for_nn")
NEAREST_MODES = ("round_prefer_floor", "round_prefer_ceil", "floor", "ceil")


def _attrs(kind: str) -> dict[str, Attr]:
    attrs = {"size": Attr("ints", doc="output height and width"),
             "coordinate_transformation_mode": Attr("str", "asymmetric" if kind == "nearest" else "half_pixel"),
             "scales": Attr("floats", (), doc="the model's height and width scales, when it gave scales whose "
                                             "sizes are fractional (the transform uses them, not size / input)")}
    if kind == "nearest":
        attrs["nearest_mode"] = Attr("str", "floor")
    if kind == "cubic":
        attrs["cubic_coeff_a"] = Attr("float", -0.75)
    if kind != "nearest":
        attrs["exclude_outside"] = Attr("bool", False, "taps outside the image weigh 0, the rest renormalized")
        attrs["antialias"] = Attr("bool", False, "downscaling: the kernel stretched by 1 / scale (ONNX Resize-18)")
        attrs["rounding"] = Attr("str", "truncate", "integer inputs: 'truncate' (an imported model's integer "
                                                    "Resize, as the ONNX reference) or 'half_even' (quantized values)")
    return attrs


def _infer(name: str):
    def infer(types, attrs):
        x = types[0]
        if x.rank != 4 or len(attrs["size"]) != 2 or min(attrs["size"]) < 1 or len(attrs["scales"]) not in (0, 2):
            raise TypeError(f"{name}: needs an NCHW input, a positive [height, width] and 0 or 2 scales, got {x}, "
                            f"{list(attrs['size'])} and {list(attrs['scales'])}")
        if attrs["coordinate_transformation_mode"] not in COORDINATE_MODES or (
                attrs["coordinate_transformation_mode"] == "tf_half_pixel_for_nn" and "nearest_mode" not in attrs):
            raise TypeError(f"{name}: coordinate_transformation_mode must be one of {', '.join(COORDINATE_MODES)}")
        if attrs.get("nearest_mode", "floor") not in NEAREST_MODES:
            raise TypeError(f"{name}: nearest_mode must be one of {', '.join(NEAREST_MODES)}")
        return [TensorType((*x.shape[:2], *attrs["size"]), x.dtype)]
    return infer


def source_coordinates(n: int, m: int, mode: str, scale: float | None = None) -> np.ndarray:
    """The input coordinate each of ``m`` output positions reads, for an axis of ``n``; ``scale``
    the model's own when it gave one (else ``m / n``)."""
    o = np.arange(m, dtype=np.float64)
    scale = scale or m / n
    if mode == "align_corners":
        width = scale * n  # ONNX: the unrounded output width
        return o * (n - 1) / (width - 1) if width > 1 else np.zeros(m)
    if mode == "asymmetric":
        return o / scale
    if mode == "tf_half_pixel_for_nn":
        return (o + 0.5) / scale
    x = (o + 0.5) / scale - 0.5
    return np.zeros(m) if mode == "pytorch_half_pixel" and m == 1 else x


def nearest_indices(n: int, m: int, mode: str, rounding: str, scale: float | None = None) -> np.ndarray:
    x = source_coordinates(n, m, mode, scale)
    if rounding == "floor":
        i = np.floor(x)
    elif rounding == "ceil":
        i = np.ceil(x)
    elif rounding == "round_prefer_ceil":
        i = np.floor(x + 0.5)
    else:  # round_prefer_floor
        i = np.ceil(x - 0.5)
    return np.clip(i, 0, n - 1).astype(np.int64)


def given_scale(attrs: dict, axis: int) -> float | None:
    """The model's own scale for ``axis`` (0: height, 1: width), or None: ``size / input`` then."""
    return attrs["scales"][axis] if attrs["scales"] else None


def _cubic(d: np.ndarray, a: float) -> np.ndarray:
    """Keys' cubic convolution kernel at distance ``d`` (ONNX's coefficient ``a``, -0.75 as torch)."""
    d = np.abs(d)
    near = ((a + 2) * d - (a + 3)) * d * d + 1
    far = ((a * d - 5 * a) * d + 8 * a) * d - 4 * a
    return np.where(d <= 1, near, np.where(d < 2, far, 0.0))


def _antialiased_matrix(n: int, m: int, x: np.ndarray, scale: float, attrs: dict) -> np.ndarray:
    """ONNX's antialiased interpolation (Resize-18 ``antialias``): downscaling by ``scale < 1``
    stretches the kernel (triangle for linear, Keys' cubic) by ``1 / scale``, so each output
    averages the ``1 / scale`` inputs it covers instead of sampling two or four of them. The taps
    are the kernel's width of input positions around ``x`` (the left one ``floor(x)``, or
    ``x - 1`` where ``x`` is an integer, as the reference picks its neighbours), weighted by the
    kernel at ``scale * distance``, normalized to sum 1; outside taps read the edge, or drop out
    (``exclude_outside``) with the rest renormalized."""
    scale = min(scale, 1.0)
    cubic = "cubic_coeff_a" in attrs
    start = int(np.floor((-2.0 if cubic else -1.0) / scale) + 1)
    offsets = np.arange(start, (2 if cubic else 1) - start + (0 if cubic else 1))
    left = np.floor(x)
    left = np.where(left == x, x - 1, left)
    distance = (offsets[None, :] - (x - left)[:, None]) * scale
    weights = _cubic(distance, attrs["cubic_coeff_a"]) if cubic else np.clip(1 - np.abs(distance), 0, 1)
    weights = weights / weights.sum(1, keepdims=True)
    taps = left[:, None] + offsets[None, :]
    if attrs.get("exclude_outside"):
        weights = np.where((taps < 0) | (taps >= n), 0.0, weights)
        weights = weights / weights.sum(1, keepdims=True)
    matrix = np.zeros((m, n))
    np.add.at(matrix, (np.arange(m)[:, None], np.clip(taps, 0, n - 1).astype(np.int64)), weights)
    return matrix


def interpolation_matrix(n: int, m: int, attrs: dict, axis: int) -> np.ndarray:
    """The [m, n] matrix that resizes one axis (0: height, 1: width) by linear or cubic
    interpolation: row o holds the weights of the input positions output o blends. Outside
    taps read the edge, or (cubic ``exclude_outside``) drop out with the rest renormalized."""
    x = source_coordinates(n, m, attrs["coordinate_transformation_mode"], given_scale(attrs, axis))
    if attrs.get("antialias") and (given_scale(attrs, axis) or m / n) < 1:
        return _antialiased_matrix(n, m, x, given_scale(attrs, axis) or m / n, attrs)
    matrix = np.zeros((m, n))
    rows = np.arange(m)[:, None]
    if "cubic_coeff_a" not in attrs:  # linear: the two neighbours of x clamped into the axis (none outside)
        x = np.clip(x, 0, n - 1)
        low = np.floor(x).astype(np.int64)
        high = np.minimum(low + 1, n - 1)
        np.add.at(matrix, (rows, np.stack([low, high], 1)), np.stack([1 - (x - low), x - low], 1))
        return matrix
    base = np.floor(x)
    taps = base[:, None] + np.arange(-1, 3)[None, :]
    weights = _cubic(x[:, None] - taps, attrs["cubic_coeff_a"])
    if attrs["exclude_outside"]:
        weights = np.where((taps < 0) | (taps >= n), 0.0, weights)
        weights /= weights.sum(1, keepdims=True)
    np.add.at(matrix, (rows, np.clip(taps, 0, n - 1).astype(np.int64)), weights)
    return matrix


def _nearest_kernel(xs, attrs):
    x = xs[0]
    mode, rounding = attrs["coordinate_transformation_mode"], attrs["nearest_mode"]
    rows = nearest_indices(x.shape[2], attrs["size"][0], mode, rounding, given_scale(attrs, 0))
    cols = nearest_indices(x.shape[3], attrs["size"][1], mode, rounding, given_scale(attrs, 1))
    return x[:, :, rows][:, :, :, cols]


def _interpolating_kernel(xs, attrs):
    """Integer inputs: truncated (as the ONNX reference casts back), or, with ``rounding`` half_even,
    rounded: quantized values, where the linear weights summing to 1 make the input's grid the
    output's, q(resize(dq(x))) = round(resize(x)) (lower-integer's form)."""
    x = xs[0]
    rows = interpolation_matrix(x.shape[2], attrs["size"][0], attrs, 0)
    cols = interpolation_matrix(x.shape[3], attrs["size"][1], attrs, 1)
    y = np.einsum("oh,nchw,pw->ncop", rows, x.astype(np.float64), cols)
    if x.dtype.kind in "iu":
        info = np.iinfo(x.dtype)
        y = np.clip(np.rint(y) if attrs["rounding"] == "half_even" else np.trunc(y), info.min, info.max)
    return y.astype(x.dtype)


declare("resize_nearest", arity=1, attrs=_attrs("nearest"), infer=_infer("resize_nearest"), kernel=_nearest_kernel,
        traits=Traits("resize", quant="same_as_input", config_type="resize", on_grid=True, spatial_rank=2),
        doc="nearest-neighbour resize of an NCHW image to `size` (ONNX Resize mode=nearest)")
# the weights of each output (antialiased too) sum to 1: an average on the input's grid, rounded
declare("resize_linear", arity=1, attrs=_attrs("linear"), infer=_infer("resize_linear"), kernel=_interpolating_kernel,
        traits=Traits("resize", quant="same_as_input", config_type="resize", on_grid=True, spatial_rank=2,
                      integer_attrs=(("rounding", "half_even"),)),
        doc="bilinear resize of an NCHW image to `size` (ONNX Resize mode=linear; torch bilinear); integer "
            "inputs truncated or (`rounding`) rounded half to even")
declare("resize_cubic", arity=1, attrs=_attrs("cubic"), infer=_infer("resize_cubic"), kernel=_interpolating_kernel,
        traits=Traits("resize", spatial_rank=2),
        doc="bicubic resize of an NCHW image to `size` (ONNX Resize mode=cubic; torch bicubic with a=-0.75)")


GRID_SAMPLE_MODES = ("bilinear", "nearest", "bicubic")
GRID_PADDING_MODES = ("zeros", "border", "reflection")


def _grid_sample_infer(types, attrs):
    x, grid = types
    if x.rank != 4 or grid.rank != 4 or grid.shape[0] != x.shape[0] or grid.shape[3] != 2:
        raise TypeError(f"grid_sample: needs an NCHW input and an [N, H_out, W_out, 2] grid, got {x} and {grid}")
    if attrs["mode"] not in GRID_SAMPLE_MODES or attrs["padding_mode"] not in GRID_PADDING_MODES:
        raise TypeError(f"grid_sample: mode must be one of {', '.join(GRID_SAMPLE_MODES)} and padding_mode one of "
                        f"{', '.join(GRID_PADDING_MODES)}")
    return [TensorType((*x.shape[:2], *grid.shape[1:3]), x.dtype)]


declare("grid_sample", arity=2, infer=_grid_sample_infer,
        attrs={"mode": Attr("str", "bilinear"), "padding_mode": Attr("str", "zeros"),
               "align_corners": Attr("bool", False)},
        kernel=None,  # qcompiler.torch_kernels: torch's grid_sample, whose conventions ONNX GridSample shares
        traits=Traits("resize"),
        doc="sample an NCHW image at the (x, y) points of a grid in [-1, 1] (ONNX GridSample, torch's "
            "grid_sample; bicubic with A = -0.75)")
