"""Integer convolution and linear graphs with random data, for the int8 kernel tests: every shape
case a schedule cares about is a parameter."""
from __future__ import annotations

import numpy as np

from qcompiler.ir import Graph
from qcompiler.ir.types import TensorType


def requantize(g: Graph, acc, channels: int, per_channel: bool, out_dtype: str, rng, k: int, lo=-128, hi=255):
    """Multipliers that spread random accumulators (std ~ 74 * 74 * sqrt(k)) over ~40 steps,
    so that the result is not all saturated; even channels multiply by exactly 2^30, which
    makes rounding ties frequent when the shift is small."""
    shape = (channels,) if per_channel else ()
    mult = rng.integers(1 << 30, (1 << 31) - 1, shape)
    mult = np.where(np.arange(channels if per_channel else 1).reshape(shape) % 2 == 0, 1 << 30, mult)
    bits = max(1, round(np.log2(74 * 74 * np.sqrt(k) / 40)))
    mult = g.add_constant("m", mult.astype(np.int32))
    shift = g.add_constant("s", np.full(shape, 30 + bits, np.int32))
    zp = g.add_constant("zo", np.array(7 if out_dtype == "u8" else -3, np.uint8 if out_dtype == "u8" else np.int8))
    return g.add_node("requantize", [acc, mult, shift, zp], {"axis": 1 if acc.type.rank == 4 else -1,
                                                             "input_zero_point": 3, "min": lo, "max": hi}).output


def conv_graph(x_shape, out_channels, kernel, strides, pads, groups, x_dtype, requant, per_channel=True, seed=0,
               dilations=(1, 1), with_inputs=True):
    rng = np.random.default_rng(seed)
    g = Graph("conv")
    x = g.add_input("x", TensorType(x_shape, x_dtype))
    info = np.iinfo(np.uint8 if x_dtype == "u8" else np.int8)
    x_zp = g.add_constant("xz", np.array(rng.integers(info.min, info.max), info.dtype))
    w = g.add_constant("w", rng.integers(-128, 128, (out_channels, x_shape[1] // groups) + kernel).astype(np.int8))
    w_zp = g.add_constant("wz", np.zeros(out_channels, np.int8))
    bias = g.add_constant("b", rng.integers(-5000, 5000, out_channels).astype(np.int32))
    acc = g.add_node("conv2d_int", [x, x_zp, w, w_zp, bias], {"strides": strides, "pads": pads, "groups": groups,
                                                               "dilations": dilations}).output
    k = int(np.prod(w.shape[1:]))
    g.set_outputs([requantize(g, acc, out_channels, per_channel, "u8", rng, k) if requant else acc])
    inputs = [rng.integers(info.min, int(info.max) + 1, x_shape).astype(info.dtype)] if with_inputs else []
    return g, inputs


def linear_graph(x_shape, out_features, x_dtype, requant, seed=0, weight_range=128):
    rng = np.random.default_rng(seed)
    g = Graph("linear")
    x = g.add_input("x", TensorType(x_shape, x_dtype))
    info = np.iinfo(np.uint8 if x_dtype == "u8" else np.int8)
    x_zp = g.add_constant("xz", np.array(rng.integers(info.min, info.max), info.dtype))
    w = g.add_constant("w", rng.integers(-weight_range, weight_range, (out_features, x_shape[-1])).astype(np.int8))
    w_zp = g.add_constant("wz", np.zeros(out_features, np.int8))
    bias = g.add_constant("b", rng.integers(-5000, 5000, out_features).astype(np.int32))
    acc = g.add_node("linear_int", [x, x_zp, w, w_zp, bias]).output
    k = x_shape[-1] * (weight_range / 74) ** 2  # the accumulators' spread, in the units _requantize expects
    g.set_outputs([requantize(g, acc, out_features, True, "i8", rng, k, lo=-100, hi=127) if requant else acc])
    return g, [rng.integers(info.min, int(info.max) + 1, x_shape).astype(info.dtype)]


def matmul_graph(batch_dims, m, k, n, a_dtype, b_dtype, requant, seed=0):
    """``matmul_int`` of two runtime operands (attention's QK^T and AV), zero points per tensor."""
    rng = np.random.default_rng(seed)
    g = Graph("matmul")
    inputs, operands = [], []
    for name, shape, dtype in (("a", (*batch_dims, m, k), a_dtype), ("b", (*batch_dims, k, n), b_dtype)):
        info = np.iinfo(np.uint8 if dtype == "u8" else np.int8)
        operands += [g.add_input(name, TensorType(shape, dtype)),
                     g.add_constant(f"{name}z", np.array(rng.integers(info.min, info.max), info.dtype))]
        inputs.append(rng.integers(info.min, int(info.max) + 1, shape).astype(info.dtype))
    acc = g.add_node("matmul_int", operands).output
    g.set_outputs([requantize(g, acc, n, False, "u8", rng, k) if requant else acc])
    return g, inputs


def assert_bit_exact(graph: Graph, inputs, target) -> None:
    """``graph`` built for ``target`` and run here gives exactly the interpreter's output, which
    is not saturated to a few values (so that the check means something)."""
    from qcompiler.targets.tvm import TVMRunner, build, device_for

    got = TVMRunner(build(graph, target), device_for("llvm"), 1)(inputs)[0]
    want = graph(*inputs)[0]
    assert got.dtype == want.dtype and got.shape == want.shape
    assert len(np.unique(want)) > min(20, want.size // 4)
    np.testing.assert_array_equal(got, want)
