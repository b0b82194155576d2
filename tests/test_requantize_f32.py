"""Requantization in float32 (``lower-integer{requantize=float32}``, ``QuantConfig.requantize``):
the op's definition against torch's float32 arithmetic, the rewrite from the fixed-point form,
and every kernel that absorbs it (AMX, VNNI, AVX2 convolutions and linears, attention matmuls,
the standalone op) bit for bit against the interpreter, ties to even included."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from int8_cases import assert_bit_exact, conv_graph, linear_graph, matmul_graph

import qcompiler
from qcompiler.ir import Graph, TensorType
from qcompiler.ir.ops import get_op
from qcompiler.pass_manager import run_pipeline
from qcompiler.pipeline import PassContext
from qcompiler.quant_config import QuantConfig
from qcompiler.targets.tvm import make_target
from qcompiler.targets.tvm.x86_amx import amx_usable, without_amx

LLVM = make_target("llvm")


def _in_float32(graph: Graph) -> Graph:
    """``graph`` with its fixed-point requantizes rewritten to requantize_f32."""
    run_pipeline(graph, "lower-integer")  # float32 is the default
    assert "requantize" not in graph.op_counts() and "requantize_f32" in graph.op_counts()
    return graph


def test_the_definition_is_float32_arithmetic_rounded_half_to_even():
    rng = np.random.default_rng(0)
    acc = np.concatenate([rng.integers(-2 ** 31, 2 ** 31, 5000), np.arange(-40, 40),
                          [2 ** 24 + 1, -(2 ** 24) - 3, 2 ** 31 - 1]]).astype(np.int32)
    scale = np.float32(0.25)  # products on .25 steps: ties (.5) are frequent
    zp = np.asarray(3, np.uint8)
    got = get_op("requantize_f32").run([acc, np.asarray(scale), zp], {"axis": 0, "input_zero_point": 0,
                                                                       "min": 0, "max": 255})[0]
    # torch: int32 -> float32 (nearest even), one float32 product, round half to even
    want = (torch.round(torch.from_numpy(acc).float() * torch.tensor(scale)) + 3).clamp(0, 255).to(torch.uint8)
    np.testing.assert_array_equal(got, want.numpy())
    assert list(get_op("requantize_f32").run([np.array([2, 6, 10], np.int32), np.asarray(scale), zp],
                                             {"axis": 0, "input_zero_point": 0, "min": 0, "max": 255})[0]) == [3, 5, 5]


def test_lower_integer_in_float32_keeps_the_model_within_a_level_of_fixed_point():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(16, 8, 3),
                                torch.nn.Flatten(), torch.nn.Linear(8 * 6 * 6, 10)).eval()
    rng = np.random.default_rng(0)
    calibration = [rng.standard_normal((2, 3, 8, 8)).astype(np.float32) for _ in range(4)]
    graph = qcompiler.from_torch(model, (torch.from_numpy(calibration[0]),))
    fixed = qcompiler.quantize(graph, calibration, QuantConfig(min_layer_sqnr_db=None, requantize="fixed"))
    floated = qcompiler.quantize(graph, calibration, QuantConfig(min_layer_sqnr_db=None))
    assert fixed.pipeline.endswith("lower-integer{requantize=fixed}") and floated.pipeline.endswith("lower-integer")
    assert "requantize" in fixed.graph.op_counts()
    assert floated.graph.op_counts().get("requantize_f32", 0) >= 2 and "requantize" not in floated.graph.op_counts()
    x = calibration[1]
    a, b = fixed.graph(x)[0], floated.graph(x)[0]
    assert np.abs(a - b).max() <= 2 * np.abs(a).max() / 127  # a level or two at the output, rarely
    again = run_pipeline(graph.copy(), floated.pipeline, context=PassContext(calibration=calibration))
    np.testing.assert_array_equal(again(x)[0], b)  # the pipeline string reproduces it
    with pytest.raises(qcompiler.QCompilerError, match="requantize 'half' is not one of fixed, float32"):
        QuantConfig(requantize="half")


TARGETS = {"amx": LLVM, "vnni": without_amx(LLVM), "avx2": make_target("llvm", arch="haswell")}


@pytest.mark.parametrize("kernels", list(TARGETS))
@pytest.mark.parametrize("case", ["conv3x3", "conv1x1", "depthwise", "linear", "matmul"])
def test_every_kernel_epilogue_requantizes_in_float32_bit_exactly(kernels, case):
    if kernels == "amx" and not amx_usable():
        pytest.skip("this CPU has no AMX")
    if case == "conv3x3":
        graph, inputs = conv_graph((1, 32, 12, 12), 40, (3, 3), (1, 1), (1, 1, 1, 1), 1, "u8", True)
    elif case == "conv1x1":
        graph, inputs = conv_graph((2, 64, 9, 9), 48, (1, 1), (2, 2), (0, 0, 0, 0), 1, "i8", True)
    elif case == "depthwise":
        graph, inputs = conv_graph((1, 32, 20, 20), 32, (3, 3), (1, 1), (1, 1, 1, 1), 32, "u8", True)
    elif case == "linear":
        graph, inputs = linear_graph((40, 96), 70, "u8", True)
    else:
        graph, inputs = matmul_graph((2,), 24, 40, 36, "u8", "i8", True)
    assert_bit_exact(_in_float32(graph), inputs, TARGETS[kernels])


def test_a_standalone_requantize_f32_is_bit_exact_ties_and_saturation_included():
    rng = np.random.default_rng(1)
    g = Graph("requantize_f32")
    x = g.add_input("x", TensorType((4, 6, 50), "i32"))
    scale = g.add_constant("scale", np.array([2.0 ** -6, 0.0371, 2.0 ** -3, 1.7e-4, 0.5, 3.0], np.float32))
    zp = g.add_constant("zp", np.array(-5, np.int8))
    g.set_outputs([g.add_node("requantize_f32", [x, scale, zp], {"axis": 1, "input_zero_point": 2,
                                                                 "min": -100, "max": 127}).output])
    values = rng.integers(-20000, 20000, (4, 6, 50)).astype(np.int32)
    values[0, :, :8] = np.array([2, 34, 66, 98, 130, -30, -62, 2 ** 31 - 1])[None, :]  # ties at 2^-6, saturation
    assert_bit_exact(g, [values], LLVM)


def _add_f32_oracle(a: np.ndarray, b: np.ndarray, attrs: dict, zp: int, lo: int, hi: int) -> np.ndarray:
    """add_int_f32 from its definition, written here: the two products exact (Python floats, then
    checked exact in float32), their sum rounded once to float32, rounded half to even."""
    out = []
    for x, y in zip(a.ravel().tolist(), np.broadcast_to(b, a.shape).ravel().tolist()):
        pa = (x - attrs["a_zero_point"]) * attrs["a_scale"]
        pb = (y - attrs["b_zero_point"]) * attrs["b_scale"]
        assert float(np.float32(pa)) == pa and float(np.float32(pb)) == pb  # 8 + 16 bits fit float32
        total = float(np.float32(pa + pb))  # pa + pb is exact in float64: one rounding, to float32
        out.append(min(hi, max(lo, round(total) + zp)))  # round: half to even
    return np.array(out).reshape(a.shape)


def test_add_int_f32_is_its_definition_and_within_a_level_of_add_int():
    from qcompiler.ir.ops.quant import ADD_SCALE_BITS, add_scale, quantize_multiplier

    rng = np.random.default_rng(2)
    a = rng.integers(0, 256, (3, 700)).astype(np.uint8)
    b = rng.integers(0, 256, (700,)).astype(np.uint8)
    ratios = (0.37, 1.9)
    scales = [add_scale(r) for r in ratios]
    for r, s in zip(ratios, scales):
        mantissa = np.frexp(s)[0] * 2 ** ADD_SCALE_BITS
        assert mantissa == int(mantissa) and abs(s - r) <= r * 2.0 ** -ADD_SCALE_BITS
    attrs = {"a_zero_point": 100, "a_scale": scales[0], "b_zero_point": 30, "b_scale": scales[1], "min": 0,
             "max": 255}
    zp = np.asarray(np.uint8(50))
    got = get_op("add_int_f32").run([a, b, zp], attrs)[0]
    np.testing.assert_array_equal(got, _add_f32_oracle(a, b, attrs, 50, 0, 255))
    (ma, sa), (mb, sb) = quantize_multiplier(np.array(ratios[0])), quantize_multiplier(np.array(ratios[1]))
    fixed = get_op("add_int").run([a, b, zp], {"a_zero_point": 100, "a_multiplier": int(ma), "a_shift": int(sa),
                                               "b_zero_point": 30, "b_multiplier": int(mb), "b_shift": int(sb),
                                               "min": 0, "max": 255})[0]
    assert np.abs(got.astype(int) - fixed.astype(int)).max() <= 1  # ties and 2^-17 of a scale apart, at most
    with pytest.raises(TypeError, match="more than 16 significant bits"):
        g = Graph("bad")
        va, vb = g.add_input("a", TensorType.of(a)), g.add_input("b", TensorType.of(b))
        g.add_node("add_int_f32", [va, vb, g.add_constant("z", zp)], {**attrs, "a_scale": 0.1})


@pytest.mark.parametrize("dtype", ["u8", "i8"])
@pytest.mark.parametrize("b_shape", [(1, 16, 9, 9), (1, 16, 1, 1), (9,)])
def test_a_quantized_add_in_float32_is_bit_exact_on_the_tvm_target(dtype, b_shape):
    from qcompiler.ir.ops.quant import add_scale

    rng = np.random.default_rng(len(b_shape) + (dtype == "i8"))
    info = np.iinfo(np.uint8 if dtype == "u8" else np.int8)
    g = Graph("add")
    va = g.add_input("a", TensorType((1, 16, 9, 9), dtype))
    vb = g.add_input("b", TensorType(b_shape, dtype))
    zp = int(rng.integers(info.min, info.max))
    attrs = {"a_zero_point": int(rng.integers(info.min, info.max)), "b_zero_point": int(rng.integers(info.min, info.max)),
             "a_scale": add_scale(0.5), "b_scale": add_scale(float(10 ** rng.uniform(-1, 0.5))),
             "min": zp, "max": int(info.max)}  # a fused relu: the clamp at the zero point
    z = g.add_constant("z", np.asarray(zp, info.dtype))
    g.set_outputs([g.add_node("add_int_f32", [va, vb, z], attrs).output])
    inputs = [rng.integers(info.min, info.max + 1, (1, 16, 9, 9)).astype(info.dtype),
              rng.integers(info.min, info.max + 1, b_shape).astype(info.dtype)]
    assert len(np.unique(g(*inputs)[0])) > 20  # ties (a_scale 0.5) and clamps both happen
    assert_bit_exact(g, inputs, LLVM)


def test_lower_integer_in_float32_makes_add_int_f32_and_fixed_keeps_add_int():
    torch.manual_seed(0)

    class Residual(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.Conv2d(8, 8, 3, padding=1)
            self.c = torch.nn.Conv2d(8, 4, 1)  # reads the sum as int8, as ResNet's next block does

        def forward(self, x):
            y = torch.relu(self.a(x))
            return self.c(torch.relu(self.b(y) + y))

    model = Residual().eval()
    rng = np.random.default_rng(0)
    calibration = [rng.standard_normal((1, 3, 8, 8)).astype(np.float32) for _ in range(4)]
    graph = qcompiler.from_torch(model, (torch.from_numpy(calibration[0]),))
    fixed = qcompiler.quantize(graph, calibration, QuantConfig(min_layer_sqnr_db=None, requantize="fixed"))
    floated = qcompiler.quantize(graph, calibration, QuantConfig(min_layer_sqnr_db=None))
    assert "add_int" in fixed.graph.op_counts() and "add_int_f32" not in fixed.graph.op_counts()
    assert floated.graph.op_counts().get("add_int_f32") == 1 and "add_int" not in floated.graph.op_counts()
    x = calibration[3]
    a, b = fixed.graph(x)[0], floated.graph(x)[0]
    assert np.abs(a - b).max() <= 2 * np.abs(a).max() / 127
