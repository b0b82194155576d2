"""Resizing NCHW images to a fixed output size (ONNX Resize, torch's interpolate): nearest
and bilinear, with ONNX's coordinate transformations.

An output pixel ``o`` of an axis resized from ``n`` to ``m`` reads input coordinate
``x = transform(o)``; ``scale = m / n``:

- ``half_pixel``: ``(o + 0.5) / scale - 0.5`` (torch ``align_corners=False``)
- ``pytorch_half_pixel``: the same, and 0 where ``m == 1``
- ``align_corners``: ``o * (n - 1) / (m - 1)`` (0 where ``m == 1``)
- ``asymmetric``: ``o / scale`` (torch's ``nearest``)

Nearest rounds ``x`` by ``nearest_mode`` and clamps it into the axis; linear clamps ``x`` into
``[0, n - 1]`` and blends the two neighbours. Nearest only copies values, so it runs on
quantized integers as they are (``on_grid``)."""
from __future__ import annotations

import numpy as np

from ..types import TensorType
from .registry import Attr, Traits, declare

COORDINATE_MODES = ("half_pixel", "pytorch_half_pixel", "align_corners", "asymmetric")
NEAREST_MODES = ("round_prefer_floor", "round_prefer_ceil", "floor", "ceil")


def _attrs(nearest: bool) -> dict[str, Attr]:
    attrs = {"size": Attr("ints", doc="output height and width"),
             "coordinate_transformation_mode": Attr("str", "asymmetric" if nearest else "half_pixel")}
    if nearest:
        attrs["nearest_mode"] = Attr("str", "floor")
    return attrs


def _infer(name: str):
    def infer(types, attrs):
        x = types[0]
        if x.rank != 4 or len(attrs["size"]) != 2 or min(attrs["size"]) < 1:
            raise TypeError(f"{name}: needs an NCHW input and a positive [height, width], got {x} and "
                            f"{list(attrs['size'])}")
        if attrs["coordinate_transformation_mode"] not in COORDINATE_MODES:
            raise TypeError(f"{name}: coordinate_transformation_mode must be one of {', '.join(COORDINATE_MODES)}")
        if attrs.get("nearest_mode", "floor") not in NEAREST_MODES:
            raise TypeError(f"{name}: nearest_mode must be one of {', '.join(NEAREST_MODES)}")
        return [TensorType((*x.shape[:2], *attrs["size"]), x.dtype)]
    return infer


def source_coordinates(n: int, m: int, mode: str) -> np.ndarray:
    """The input coordinate each of ``m`` output positions reads, for an axis of ``n``."""
    o = np.arange(m, dtype=np.float64)
    scale = m / n
    if mode == "align_corners":
        return o * (n - 1) / (m - 1) if m > 1 else np.zeros(m)
    if mode == "asymmetric":
        return o / scale
    x = (o + 0.5) / scale - 0.5
    return np.zeros(m) if mode == "pytorch_half_pixel" and m == 1 else x


def nearest_indices(n: int, m: int, mode: str, rounding: str) -> np.ndarray:
    x = source_coordinates(n, m, mode)
    if rounding == "floor":
        i = np.floor(x)
    elif rounding == "ceil":
        i = np.ceil(x)
    elif rounding == "round_prefer_ceil":
        i = np.floor(x + 0.5)
    else:  # round_prefer_floor
        i = np.ceil(x - 0.5)
    return np.clip(i, 0, n - 1).astype(np.int64)


def _nearest_kernel(xs, attrs):
    x = xs[0]
    mode, rounding = attrs["coordinate_transformation_mode"], attrs["nearest_mode"]
    rows = nearest_indices(x.shape[2], attrs["size"][0], mode, rounding)
    cols = nearest_indices(x.shape[3], attrs["size"][1], mode, rounding)
    return x[:, :, rows][:, :, :, cols]


def _linear_axis(x: np.ndarray, axis: int, m: int, mode: str) -> np.ndarray:
    n = x.shape[axis]
    pos = np.clip(source_coordinates(n, m, mode), 0, n - 1)
    low = np.floor(pos).astype(np.int64)
    high = np.minimum(low + 1, n - 1)
    shape = [1] * x.ndim
    shape[axis] = m
    weight = (pos - low).reshape(shape)
    return np.take(x, low, axis=axis) * (1 - weight) + np.take(x, high, axis=axis) * weight


def _linear_kernel(xs, attrs):
    x = xs[0].astype(np.float64)
    mode = attrs["coordinate_transformation_mode"]
    y = _linear_axis(_linear_axis(x, 2, attrs["size"][0], mode), 3, attrs["size"][1], mode)
    return y.astype(xs[0].dtype)


declare("resize_nearest", arity=1, attrs=_attrs(nearest=True), infer=_infer("resize_nearest"), kernel=_nearest_kernel,
        traits=Traits("resize", quant="same_as_input", config_type="resize", on_grid=True, spatial_rank=2),
        doc="nearest-neighbour resize of an NCHW image to `size` (ONNX Resize mode=nearest)")
declare("resize_linear", arity=1, attrs=_attrs(nearest=False), infer=_infer("resize_linear"), kernel=_linear_kernel,
        traits=Traits("resize", spatial_rank=2),
        doc="bilinear resize of an NCHW image to `size` (ONNX Resize mode=linear; torch bilinear)")
