"""The reference kernels that use torch's CPU ops, where numpy has no fast or no exact
equivalent: convolution (and transposed), PyTorch's adaptive-pooling bins, gelu and erf.

They live beside the interpreter, not in the IR: the op declarations (``qcompiler.ir.ops``)
leave their kernel empty, and importing this module (the interpreter does) installs it, so
``import qcompiler.ir`` never imports torch."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .ir.ops.nn import apply_activation
from .ir.ops.registry import set_kernel


def _t(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x))


def _conv_kernel(rank: int):
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[rank]

    def kernel(xs, attrs):
        x, w = _t(xs[0]), _t(xs[1])
        b = _t(xs[2]) if len(xs) == 3 else None
        pads = attrs["pads"]
        torch_pad: list[int] = []
        for i in reversed(range(rank)):  # F.pad wants last dim first
            torch_pad += [pads[i], pads[i + rank]]
        if any(torch_pad):
            x = F.pad(x, torch_pad)
        y = conv(x, w, b, stride=attrs["strides"], dilation=attrs["dilations"], groups=attrs["groups"])
        return apply_activation(y.numpy(), attrs)

    return kernel


def _conv_transpose_kernel(rank: int):
    """The full transposed convolution (no padding), extended by output_padding at the end and
    cropped by pads, plus the bias: ONNX's semantics, asymmetric pads included."""
    conv = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}[rank]

    def kernel(xs, attrs):
        y = conv(_t(xs[0]), _t(xs[1]), None, stride=attrs["strides"], dilation=attrs["dilations"],
                 groups=attrs["groups"])
        extend: list[int] = []
        for i in reversed(range(rank)):  # F.pad wants the last dim first
            extend += [0, attrs["output_padding"][i]]
        y = F.pad(y, extend)
        pads = attrs["pads"]
        crop = (slice(None), slice(None)) + tuple(slice(pads[i], y.shape[2 + i] - pads[i + rank]) for i in range(rank))
        y = y[crop].numpy()
        if len(xs) == 3:
            y = y + xs[2].reshape((1, -1) + (1,) * rank)
        return np.ascontiguousarray(y)

    return kernel


def _gelu(xs, attrs):
    return np.asarray(F.gelu(_t(xs[0]), approximate=attrs["approximate"]).numpy(), dtype=xs[0].dtype)


def _erf(xs, attrs):
    return np.asarray(torch.special.erf(_t(xs[0])).numpy(), dtype=xs[0].dtype)


def _adaptive_avg_pool2d(xs, attrs):
    return F.adaptive_avg_pool2d(_t(xs[0]), attrs["output_size"]).numpy()


def _grid_sample(xs, attrs):
    x = _t(xs[0])
    y = F.grid_sample(x, _t(xs[1]).to(x.dtype), mode=attrs["mode"], padding_mode=attrs["padding_mode"],
                      align_corners=attrs["align_corners"])
    return y.numpy()


set_kernel("conv1d", _conv_kernel(1))
set_kernel("conv2d", _conv_kernel(2))
set_kernel("conv3d", _conv_kernel(3))
set_kernel("conv_transpose1d", _conv_transpose_kernel(1))
set_kernel("conv_transpose2d", _conv_transpose_kernel(2))
set_kernel("conv_transpose3d", _conv_transpose_kernel(3))
set_kernel("adaptive_avg_pool2d", _adaptive_avg_pool2d)
set_kernel("gelu", _gelu)
set_kernel("erf", _erf)
set_kernel("grid_sample", _grid_sample)
