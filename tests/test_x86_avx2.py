"""The AVX2 int8 kernels (``x86_int8.AVX2_DOT``: ``vpmaddwd`` on bytes widened in the register),
which CPUs without AVX-512 VNNI run (AMD Zen 2/3, Intel before Ice Lake), against the reference
interpreter, bit-exact: dense, attention products, direct and im2col convolutions, depthwise, and
4-bit weights unpacked in the register. Built for Haswell (AVX2, no VNNI) and run wherever the
host has its instruction sets; the weights stay 8-bit (4-bit where stored so) in the library."""
from __future__ import annotations

import os
import tempfile

import numpy as np
import pytest
import torch
from int8_cases import assert_bit_exact, conv_graph, linear_graph, matmul_graph

import qcompiler
from qcompiler.ir import Graph, TensorType
from qcompiler.ir.packing import Int4Groups
from qcompiler.targets.tvm import make_target, to_relax
from qcompiler.targets.tvm.build import int8_kernels, missing_cpu_features

HASWELL = make_target("llvm", arch="haswell")
needs_avx2 = pytest.mark.skipif(bool(missing_cpu_features(str(HASWELL))), reason="this CPU lacks Haswell's AVX2")


def _kernels(graph: Graph) -> set[str]:
    return {gv.name_hint.rstrip("0123456789") for gv in to_relax(graph, int8_kernels="avx2").functions} - {"main"}


def test_a_cpu_with_avx2_and_no_vnni_gets_the_avx2_kernels():
    assert int8_kernels(HASWELL) == "avx2"
    assert int8_kernels(make_target("llvm", arch="znver3")) == "avx2"
    assert int8_kernels(make_target("llvm", arch="icelake-server")) == "vnni-vbmi"


DIRECT, IM2COL = {"avx2_conv2d_input", "avx2_conv2d_direct"}, {"avx2_im2col", "avx2_conv2d"}


@needs_avx2
@pytest.mark.parametrize("x_shape,channels,kernel,strides,pads,dtype,requant,kernels,dilations", [
    ((1, 3, 30, 30), 16, (7, 7), (2, 2), (3, 3, 3, 3), "u8", True, DIRECT, (1, 1)),  # 3 channels: one padded pair
    ((2, 12, 16, 17), 24, (3, 3), (1, 1), (1, 1, 1, 1), "i8", True, DIRECT, (1, 1)),  # rows of 17, batch 2, signed
    ((1, 16, 14, 14), 8, (1, 1), (1, 1), (0, 0, 0, 0), "u8", False, DIRECT, (1, 1)),  # int32 result
    ((1, 8, 29, 29), 16, (3, 3), (2, 2), (1, 0, 0, 1), "u8", True, DIRECT, (1, 1)),  # asymmetric padding, stride 2
    ((1, 5, 28, 28), 64, (1, 1), (2, 2), (0, 0, 0, 0), "i8", True, DIRECT, (1, 1)),  # odd channels, 64 outputs
    ((1, 8, 7, 7), 12, (3, 3), (2, 2), (0, 1, 1, 0), "u8", True, IM2COL, (1, 1)),  # narrow rows
    ((1, 3, 20, 20), 24, (7, 7), (2, 2), (3, 3, 3, 3), "u8", True, IM2COL, (2, 2)),  # dilated: K = 147, odd
])
def test_conv2d_is_bit_exact(x_shape, channels, kernel, strides, pads, dtype, requant, kernels, dilations):
    graph, inputs = conv_graph(x_shape, channels, kernel, strides, pads, 1, dtype, requant, dilations=dilations)
    assert kernels <= _kernels(graph)
    assert_bit_exact(graph, inputs, HASWELL)


@needs_avx2
@pytest.mark.parametrize("kernel,strides,dtype", [((3, 3), (1, 1), "u8"), ((3, 3), (2, 2), "i8"), ((5, 5), (1, 1), "u8")])
def test_depthwise_is_bit_exact(kernel, strides, dtype):
    pads = tuple(k // 2 for k in kernel) * 2
    graph, inputs = conv_graph((2, 24, 15, 15), 24, kernel, strides, pads, 24, dtype, True)
    assert "vnni_depthwise" in _kernels(graph)  # the int16 kernel: no VNNI instruction in it
    assert_bit_exact(graph, inputs, HASWELL)


@needs_avx2
@pytest.mark.parametrize("x_shape,features,dtype,requant", [
    ((3, 10, 64), 96, "u8", True),  # rows 30
    ((7, 31), 1000, "i8", True),  # K odd: padded to a pair; N padded to 1008
    ((5, 16), 8, "u8", False),  # N < 16, int32 result
    ((1, 100), 1000, "u8", True),  # one row (a batch-1 head): its 63 column blocks split over the cores
])
def test_dense_is_bit_exact(x_shape, features, dtype, requant):
    graph, inputs = linear_graph(x_shape, features, dtype, requant)
    assert "avx2_dense" in _kernels(graph)
    assert_bit_exact(graph, inputs, HASWELL)


@needs_avx2
@pytest.mark.parametrize("batch_dims,m,k,n,a_dtype,b_dtype,requant,seed", [
    ((1, 12), 128, 32, 128, "u8", "u8", True, 0),  # MiniLM's QK^T
    ((2, 3), 7, 31, 20, "i8", "u8", False, 0),  # K odd, N not a multiple of 16; int32 result
    ((5,), 9, 17, 40, "u8", "i8", True, 1),  # signed right operand
])
def test_matmul_of_runtime_operands_is_bit_exact(batch_dims, m, k, n, a_dtype, b_dtype, requant, seed):
    graph, inputs = matmul_graph(batch_dims, m, k, n, a_dtype, b_dtype, requant, seed)
    assert "avx2_matmul" in _kernels(graph)
    assert_bit_exact(graph, inputs, HASWELL)


def _four_bit_linear(x_shape, features: int, group: int, seed: int = 0) -> tuple[Graph, list[np.ndarray]]:
    """A linear whose weight is 4-bit in groups (codes in [-7, 7] times a multiplier in [1, 18]
    per group, the extreme ones included), stored packed."""
    graph, inputs = linear_graph(x_shape, features, "u8", True, seed=seed)
    rng = np.random.default_rng(seed)
    k = x_shape[-1]
    groups = -(-k // group)
    q = rng.integers(-7, 8, (features, k))
    q[0, :] = 7  # the largest product: 7 * 18
    m = rng.integers(1, 19, (features, groups))
    m[0, :] = 18
    m[1, :] = 1
    w = (q * np.repeat(m, group, axis=1)[:, :k]).astype(np.int8)
    graph.add_constant("w", w, unique=False, storage=Int4Groups(group))
    graph.nodes[0].inputs[2] = graph.constant_value("w")
    return graph, inputs


ICELAKE = make_target("llvm", arch="icelake-server")


@pytest.mark.parametrize("variant,group,kernel", [("avx2", 32, "avx2_dense_4bit"), ("vnni", 32, "vnni_dense_4bit"),
                                                  ("vnni-vbmi", 8, "vnni_dense_4bit"), ("amx", 32, "vnni_dense_4bit"),
                                                  ("vnni", 6, "avx2_dense_4bit")])
def test_four_bit_linears_take_a_4_bit_kernel_on_every_x86_variant(variant, group, kernel):
    """Every x86 build keeps 4-bit weights 4-bit: VNNI (AMX too: its size rules would take this
    32-row linear otherwise) unpacks 4 inputs to a byte each, AVX2 (and VNNI for groups that
    are not a multiple of 4) pairs of inputs."""
    graph, _ = _four_bit_linear((32, 60), 48, group)
    kernels = {gv.name_hint.rstrip("0123456789") for gv in to_relax(graph, int8_kernels=variant).functions}
    assert kernel in kernels and not any(k.endswith("_dense") for k in kernels)


@pytest.mark.parametrize("target", [pytest.param(HASWELL, marks=needs_avx2, id="haswell"),
                                    pytest.param(ICELAKE, id="icelake", marks=pytest.mark.skipif(
                                        bool(missing_cpu_features(str(ICELAKE))), reason="this CPU lacks VNNI"))])
@pytest.mark.parametrize("x_shape,features,group", [((6, 64), 48, 32), ((9, 70), 20, 16), ((4, 40), 16, 8),
                                                    ((3, 2, 36), 40, 12), ((5, 30), 24, 6), ((1, 64), 200, 32)])
def test_four_bit_dense_unpacks_in_the_register_bit_exact(x_shape, features, group, target):
    """Last groups shorter than the others (70 = 4 x 16 + 6, 36 = 3 x 12), groups of 8 and 12,
    6 (a multiple of 2, not of 4: AVX2's kernel on VNNI too), 2 x 3 rows, one row (its column
    blocks split over the cores); built for an AVX2 CPU and for a VNNI one."""
    graph, inputs = _four_bit_linear(x_shape, features, group)
    assert_bit_exact(graph, inputs, target)


def _library_bytes(model: torch.nn.Module, example: torch.Tensor, config: qcompiler.QuantConfig,
                   cpu: str) -> int:
    compiled = qcompiler.compile(model, (example,), calibration=[example], config=config, cpu=cpu)
    with tempfile.TemporaryDirectory() as folder:
        compiled.save(folder)
        return os.path.getsize(os.path.join(folder, "model.so"))


@pytest.mark.parametrize("cpu", ["haswell", "icelake-server"])
def test_the_library_holds_8_bit_and_4_bit_weights_not_int32(cpu):
    """A 1M-weight MLP: int8 weights take 1 MB in the shared library (on AVX2 they were folded
    into 4 MB of int32 by the generic integer path); 4-bit ones save half a byte per weight
    (less one multiplier byte per group of 32), on an AVX2 CPU and on a VNNI one."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(512, 1024), torch.nn.ReLU(), torch.nn.Linear(1024, 512)).eval()
    weights = 2 * 512 * 1024
    int8 = _library_bytes(model, torch.randn(4, 512), qcompiler.QuantConfig(), cpu)
    int4 = _library_bytes(model, torch.randn(4, 512), qcompiler.QuantConfig(weight_dtype="i4", weight_group_size=32),
                          cpu)
    assert weights < int8 < 1.25 * weights
    assert int8 - int4 > 0.45 * weights


@needs_avx2
@pytest.mark.parametrize("x_shape,out_channels,kernel,stride,pad", [
    ((1, 3, 30, 30), 16, 7, 2, 3),  # a stem: stride 2 (phases), 7x7
    ((2, 12, 9, 21), 18, 3, 1, 1),  # 18 channels: tiles of 6, a row of two strips
])
def test_float_conv_with_avx2s_register_tile_matches(x_shape, out_channels, kernel, stride, pad):
    """The float32 direct convolution (what fp32 builds and int8 builds' float layers run) keeps
    AVX2's 6 accumulators of 16 lanes (12 of the 16 registers; AVX-512's 28 spilled on AVX2),
    built for Haswell, within float32 rounding of the interpreter."""
    from qcompiler.targets.tvm import TVMRunner, build, device_for

    rng = np.random.default_rng(2)
    g = Graph("conv")
    x = g.add_input("x", TensorType(x_shape, "f32"))
    w = g.add_constant("w", rng.standard_normal((out_channels, x_shape[1], kernel, kernel)).astype(np.float32))
    b = g.add_constant("b", rng.standard_normal(out_channels).astype(np.float32))
    g.set_outputs([g.add_node("conv2d", [x, w, b], {"strides": [stride] * 2, "pads": [pad] * 4, "groups": 1,
                                                   "dilations": [1, 1], "activation": "relu"}).output])
    assert "cpu_conv2d_float" in {gv.name_hint.rstrip("0123456789") for gv in
                                  to_relax(g, int8_kernels="avx2", cpu_kernels=True).functions}
    inputs = [rng.standard_normal(x_shape).astype(np.float32)]
    got = TVMRunner(build(g, HASWELL), device_for("llvm"), 1)(inputs)[0]
    want = g(*inputs)[0]
    assert got.shape == want.shape and (want > 0).mean() > 0.2
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()
