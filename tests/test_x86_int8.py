"""The hand-scheduled VNNI kernels (``targets/tvm/x86_int8``) against the reference interpreter,
bit-exact: every shape case that changes the schedule (K and N not multiples of the vector
blocks, output positions not a multiple of 16, strides, padding, batch > 1, signed
activations, a requantize absorbed into the epilogue or not, per-tensor or per-channel)."""
from __future__ import annotations

import numpy as np
import pytest
from int8_cases import assert_bit_exact, conv_graph, linear_graph, matmul_graph

from qcompiler.ir import Graph
from qcompiler.ir.types import TensorType
from qcompiler.targets.tvm import TVMRunner, build, device_for, make_target, to_relax
from qcompiler.targets.tvm.build import int8_kernels
from qcompiler.targets.tvm.x86_amx import without_amx
from qcompiler.targets.tvm.x86_int8 import supports_vbmi, supports_vnni

LLVM = without_amx(make_target("llvm"))  # these test the VNNI kernels, which AMX would take over from
VNNI = supports_vnni(LLVM)
VBMI = supports_vbmi(LLVM)
needs_vnni = pytest.mark.skipif(not VNNI, reason="this CPU has no AVX-512 VNNI: the generic integer path is used")


def _kernels(graph: Graph, vnni: bool = True) -> set[str]:
    """The hand-scheduled kernels the lowering calls."""
    variant = ("vnni-vbmi" if VBMI else "vnni") if vnni else None
    module = to_relax(graph, int8_kernels=variant, cpu_kernels=True)
    names = {gv.name_hint.rstrip("0123456789") for gv in module.functions}
    return {n for n in names if n.startswith(("vnni_", "cpu_"))}


def _bit_exact(graph: Graph, inputs) -> None:
    assert_bit_exact(graph, inputs, LLVM)


IM2COL, DIRECT, FLAT = {"vnni_im2col", "vnni_conv2d"}, {"vnni_conv2d_direct"}, {"vnni_conv2d_flat"}
CONVS = [  # x shape, out channels, kernel, strides, pads, x dtype, requantize absorbed, kernels used, dilations
    ((1, 3, 20, 20), 24, (7, 7), (2, 2), (3, 3, 3, 3), "u8", True, FLAT, (1, 1)),  # 3 channels, 2x2 phases, 10 x 13
    ((2, 16, 9, 9), 40, (3, 3), (1, 1), (1, 1, 1, 1), "i8", True, FLAT, (1, 1)),  # batch 2, 9 x 11, signed input
    ((1, 32, 8, 8), 16, (1, 1), (1, 1), (0, 0, 0, 0), "u8", False, FLAT, (1, 1)),  # int32 result, 1x1
    ((1, 8, 7, 7), 12, (3, 3), (2, 2), (0, 1, 1, 0), "u8", True, FLAT, (1, 1)),  # asymmetric padding, stride 2
    ((1, 20, 14, 14), 24, (3, 3), (2, 2), (1, 1, 1, 1), "u8", True, FLAT, (1, 1)),  # ResNet's 14 -> 7 shape
    ((1, 3, 20, 20), 24, (7, 7), (2, 2), (3, 3, 3, 3), "u8", True, IM2COL, (2, 2)),  # dilated: K = 147, padded
    ((1, 8, 60, 10), 8, (3, 3), (1, 1), (1, 1, 1, 1), "i8", True, IM2COL, (1, 1)),  # 60 x 12 positions: no one tile
    ((1, 3, 30, 30), 16, (7, 7), (2, 2), (3, 3, 3, 3), "u8", True, DIRECT, (1, 1)),  # 3 channels, 2 phases
    ((2, 12, 16, 17), 24, (3, 3), (1, 1), (1, 1, 1, 1), "i8", True, DIRECT, (1, 1)),  # rows of 17: two strips, a tail
    ((1, 16, 14, 14), 8, (1, 1), (1, 1), (0, 0, 0, 0), "u8", False, DIRECT, (1, 1)),  # int32 result
    ((1, 8, 29, 29), 16, (3, 3), (2, 2), (1, 0, 0, 1), "u8", True, DIRECT, (1, 1)),  # asymmetric padding, stride 2
    ((1, 6, 28, 28), 16, (1, 1), (2, 2), (0, 0, 0, 0), "i8", True, DIRECT, (1, 1)),  # stride 2, no padding
]


@needs_vnni
@pytest.mark.parametrize("x_shape,channels,kernel,strides,pads,dtype,requant,kernels,dilations", CONVS)
def test_conv2d_kernel_is_bit_exact(x_shape, channels, kernel, strides, pads, dtype, requant, kernels, dilations):
    graph, inputs = conv_graph(x_shape, channels, kernel, strides, pads, 1, dtype, requant, dilations=dilations)
    assert kernels <= _kernels(graph)
    _bit_exact(graph, inputs)


@needs_vnni
@pytest.mark.parametrize("cpu", [None, "cascadelake"], ids=["host", "no-vbmi"])
@pytest.mark.parametrize("kernel,strides,dtype,per_channel,sliding", [
    ((3, 3), (1, 1), "u8", True, True),
    ((3, 3), (2, 2), "i8", False, True),  # two phases: taps 0 and 2, then tap 1
    ((3, 3), (3, 3), "u8", True, True),  # 16 windows span 51 bytes: still one register
    ((5, 5), (1, 1), "u8", True, False),  # 5 taps of a row do not fit 4 bytes
])
def test_depthwise_kernel_is_bit_exact(cpu, kernel, strides, dtype, per_channel, sliding):
    """The sliding-window kernel (vpermb + vpdpbusd) where the CPU has AVX-512 VBMI, a kernel
    row's taps fit 4 bytes and the stride is at most 4; the int16 kernel otherwise (Cascade Lake
    has VNNI without VBMI: built for it, run here)."""
    pads = tuple(k // 2 for k in kernel) * 2
    graph, inputs = conv_graph((2, 24, 15, 15), 24, kernel, strides, pads, 24, dtype, True, per_channel)
    target = make_target("llvm", arch=cpu) if cpu else LLVM
    variant = "vnni-vbmi" if supports_vbmi(target) else "vnni"
    names = {gv.name_hint.rstrip("0123456789") for gv in to_relax(graph, int8_kernels=variant).functions}
    assert ("vnni_depthwise_sliding" in names) == (sliding and cpu is None and VBMI)
    assert "vnni_depthwise" in names or "vnni_depthwise_sliding" in names
    got = TVMRunner(build(graph, target), device_for("llvm"), 1)(inputs)[0]
    want = graph(*inputs)[0]
    assert len(np.unique(want)) > 20
    np.testing.assert_array_equal(got, want)


@needs_vnni
@pytest.mark.parametrize("x_shape,features,dtype,requant", [
    ((3, 10, 64), 96, "u8", True),  # rows 30, 3 column blocks (padded to 4)
    ((7, 30), 1000, "i8", True),  # K = 30: padded to 32; N padded to 1024
    ((5, 16), 8, "u8", False),  # N < 16, int32 result
])
def test_dense_kernel_is_bit_exact(x_shape, features, dtype, requant):
    graph, inputs = linear_graph(x_shape, features, dtype, requant)
    assert "vnni_dense" in _kernels(graph)
    _bit_exact(graph, inputs)


@needs_vnni
@pytest.mark.parametrize("batch_dims,m,k,n,a_dtype,b_dtype,requant,seed", [
    ((1, 12), 128, 32, 128, "u8", "u8", True, 0),  # MiniLM's QK^T
    ((1, 12), 128, 128, 32, "u8", "u8", True, 0),  # and AV
    ((2, 3), 7, 30, 20, "i8", "u8", False, 0),  # K not a multiple of 4, N of 16; int32 result
    ((5,), 9, 17, 40, "u8", "i8", True, 1),  # signed right operand (seed 0 saturates every output)
])
def test_matmul_of_runtime_operands_is_bit_exact(batch_dims, m, k, n, a_dtype, b_dtype, requant, seed):
    """Attention products on VNNI: the right operand packed and both zero-point sums taken at
    run time."""
    graph, inputs = matmul_graph(batch_dims, m, k, n, a_dtype, b_dtype, requant, seed)
    assert "vnni_matmul" in _kernels(graph)
    _bit_exact(graph, inputs)


@needs_vnni
def test_epilogue_rounds_ties_to_even():
    """Tiny weights make small accumulators, divided by 2^bits with bits small: ties are common."""
    graph, inputs = linear_graph((64, 8), 32, "u8", True, weight_range=2)
    const = graph.constant_array
    acc = ((inputs[0].astype(np.int64) - const(graph.constant_value("xz"))) @ const(graph.constant_value("w")).T
           + const(graph.constant_value("b")) - 3)  # the requantize's input zero point
    mult, shift = const(graph.constant_value("m")).astype(np.int64), const(graph.constant_value("s")).astype(np.int64)
    ties = (acc * mult) % (1 << shift) == 1 << (shift - 1)
    assert ties.sum() > 20
    assert "vnni_dense" in _kernels(graph)
    _bit_exact(graph, inputs)


def test_vnni_lowering_only_for_what_it_supports():
    """Nonzero weight zero points and grouped (not depthwise) convolutions keep the generic path."""
    graph, _ = conv_graph((1, 8, 6, 6), 8, (3, 3), (1, 1), (1, 1, 1, 1), 2, "u8", True)
    assert not _kernels(graph)
    graph, _ = linear_graph((4, 16), 16, "u8", True)
    graph.constants["wz"] = np.ones(16, np.int8)
    assert not _kernels(graph)
    graph.constants["wz"] = np.zeros(16, np.int8)
    assert _kernels(graph) and not _kernels(graph, vnni=False)  # a CPU without VNNI


@pytest.mark.parametrize("amx", [True, False], ids=["amx", "vnni"])
def test_kernels_schedule_for_a_vnni_cpu_anywhere(amx):
    """The kernels are built for a named VNNI CPU (with AMX or without), so the schedules are
    checked on any host."""
    graph, _ = conv_graph((1, 16, 8, 8), 32, (3, 3), (1, 1), (1, 1, 1, 1), 1, "u8", True)
    target = make_target("llvm", arch="sapphirerapids")
    target = target if amx else without_amx(target)
    assert int8_kernels(target) == ("amx" if amx else "vnni-vbmi")
    assert build(graph, target) is not None


@pytest.mark.parametrize("x_shape,features,act", [((7, 50), 1000, "relu"), ((2, 3, 64), 8, "gelu")])
def test_float_linear_kernel_matches(x_shape, features, act):
    """Float linears (what int8 models keep float) use the register-tiled kernel on any CPU."""
    rng = np.random.default_rng(1)
    g = Graph("linear")
    x = g.add_input("x", TensorType(x_shape, "f32"))
    w = g.add_constant("w", rng.standard_normal((features, x_shape[-1])).astype(np.float32))
    b = g.add_constant("b", rng.standard_normal(features).astype(np.float32))
    g.set_outputs([g.add_node("linear", [x, w, b], {"activation": act}).output])
    assert _kernels(g) == {"cpu_dense_float"}
    inputs = [rng.standard_normal(x_shape).astype(np.float32)]
    got = TVMRunner(build(g, LLVM), device_for("llvm"), 1)(inputs)[0]
    want = g(*inputs)[0]
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()


@needs_vnni
def test_profile_times_the_kernels_of_a_direct_convolution():
    """The direct convolution's input arrives through a view of its layout kernel's words: the
    view is the VM's own call, not a kernel, and both kernels are timed."""
    from qcompiler.targets.tvm.profile import kernel_times

    graph, inputs = conv_graph((1, 8, 16, 16), 16, (3, 3), (1, 1), (1, 1, 1, 1), 1, "u8", True)
    times = {k.name.rstrip("0123456789"): k for k in kernel_times(build(graph, LLVM), inputs)}
    assert {"vnni_conv2d_input", "vnni_conv2d_direct"} <= set(times)
    assert all(k.calls == 1 and k.ms > 0 for k in times.values())


@pytest.mark.parametrize("dtype,shape,kernel,stride,pad,ceil", [
    ("u8", (1, 8, 112, 112), 3, 2, 1, False),  # ResNet's stem pool: 56 outputs, one 64-byte strip
    ("i8", (2, 3, 17, 70), 3, 1, 1, False),  # 70 outputs: a second strip
    ("u8", (1, 4, 15, 15), 3, 2, 0, True),  # ceil mode: the last window hangs over the image
    ("f32", (1, 5, 20, 20), 2, 2, 0, False),
    ("f32", (1, 2, 9, 11), 3, 2, 1, True),
])
def test_max_pool_kernel_matches(dtype, shape, kernel, stride, pad, ceil):
    """Any CPU: the row-wise max pool, over an input padded with the dtype's lowest value."""
    rng = np.random.default_rng(3)
    g = Graph("pool")
    x = g.add_input("x", TensorType(shape, dtype))
    g.set_outputs([g.add_node("max_pool2d", [x], {"kernel": [kernel] * 2, "strides": [stride] * 2, "pads": [pad] * 4,
                                                 "ceil_mode": ceil}).output])
    assert _kernels(g) == {"cpu_max_pool"}
    if dtype == "f32":
        inputs = [rng.standard_normal(shape).astype(np.float32) - 5]  # all negative: zero padding would win
    else:
        info = np.iinfo(np.uint8 if dtype == "u8" else np.int8)
        inputs = [rng.integers(info.min, int(info.max) + 1, shape).astype(info.dtype)]
    got = TVMRunner(build(g, LLVM), device_for("llvm"), 1)(inputs)[0]
    want = g(*inputs)[0]
    assert got.shape == want.shape
    np.testing.assert_array_equal(got, want)


def test_report_warns_where_the_target_has_no_int8_kernels():
    """A quantized build for a CPU without VNNI or AVX2 (x86-64 v1) is exact but slow: the
    report says so."""
    from qcompiler.compiled import _int8_kernels_report

    baseline = make_target("llvm", arch="x86-64")
    assert int8_kernels(baseline) is None
    assert "generic integer kernels" in _int8_kernels_report(baseline, quantized=True)["warning"]
    assert "warning" not in _int8_kernels_report(baseline, quantized=False)
    assert _int8_kernels_report(make_target("cuda", "sm_80"), quantized=True) == {"kernels": "dp4a"}


def test_profile_times_every_kernel_of_a_build(digits, tmp_path):
    """``CompiledModel.profile``: the kernels a run calls, each timed, for a build and its reload."""
    import torch

    import qcompiler

    model, (x_train, _, x_test, _) = digits
    compiled = qcompiler.compile(model, (torch.from_numpy(x_test[:8]),), calibration=[x_train[:8]])
    assert compiled.report()["int8_kernels"]["kernels"] == int8_kernels(make_target("llvm"))
    assert ("warning" in compiled.report()["int8_kernels"]) == (int8_kernels(make_target("llvm")) is None)
    kernels = compiled.profile(x_test[:8])
    assert kernels and all(k["ms"] > 0 and k["calls"] >= 1 for k in kernels)
    assert [k["ms"] for k in kernels] == sorted((k["ms"] for k in kernels), reverse=True)
    if VNNI:
        assert any(k["kernel"].startswith(("vnni_", "amx_")) for k in kernels)
    compiled.save(tmp_path / "a")
    assert {k["kernel"] for k in qcompiler.load(tmp_path / "a").profile(x_test[:8])} == {k["kernel"] for k in kernels}
    with pytest.raises(qcompiler.QCompilerError, match="profile.. needs a build for the llvm target"):
        qcompiler.compile(model, (torch.from_numpy(x_test[:8]),), target="reference").profile(x_test[:8])
