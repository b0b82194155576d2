"""Quantize/dequantize semantics and import of QDQ models as ONNX Runtime writes them."""
from __future__ import annotations

import numpy as np
import pytest
import onnx
from onnx import TensorProto, helper
from onnx.reference import ReferenceEvaluator

from qcompiler import from_onnx, parse_graph
from tests.conftest import rel_err


def test_quantize_rounds_half_to_even_and_saturates():
    g = parse_graph("""\
func @main(%x: f32[8]) -> (u8[8], i8[8], f32[8]) {
  const @s : f32[] = [0.5]
  const @zu : u8[] = [10]
  const @zi : i8[] = [0]
  %0 = quantize(%x, @s, @zu) {axis=0} : u8[8] loc(#0)
  %1 = quantize(%x, @s, @zi) {axis=0} : i8[8] loc(#1)
  %2 = dequantize(%1, @s, @zi) {axis=0} : f32[8] loc(#2)
  return %0, %1, %2
}
""")
    x = np.array([0.25, 0.75, -0.25, -0.75, 1000.0, -1000.0, 1.25, 2.0], np.float32)
    qu, qi, dq = g(x)
    # x / 0.5 = [0.5, 1.5, -0.5, -1.5, 2000, -2000, 2.5, 4]: half to even -> [0, 2, -0, -2, sat, sat, 2, 4]
    np.testing.assert_array_equal(qu, [10, 12, 10, 8, 255, 0, 12, 14])
    np.testing.assert_array_equal(qi, [0, 2, 0, -2, 127, -128, 2, 4])
    np.testing.assert_array_equal(dq, np.array([0, 2, 0, -2, 127, -128, 2, 4], np.float32) * 0.5)


def test_per_axis_quantize_matches_onnx_reference():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((4, 3, 2, 2)).astype(np.float32)
    scale = np.abs(w).reshape(4, -1).max(1).astype(np.float32) / 127
    zp = np.zeros(4, np.int8)
    nodes = [helper.make_node("QuantizeLinear", ["w", "s", "z"], ["q"], axis=0),
             helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"], axis=0)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("w", TensorProto.FLOAT, w.shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, w.shape)],
                              initializer=[onnx.numpy_helper.from_array(scale, "s"),
                                           onnx.numpy_helper.from_array(zp, "z")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])
    g = from_onnx(model)
    assert [n.op for n in g.nodes] == ["quantize", "dequantize"]
    np.testing.assert_array_equal(g(w)[0], ReferenceEvaluator(model).run(None, {"w": w})[0])


def test_onnxruntime_qdq_model_imports_with_quant_ops(digits, ort_qdq_digits):
    _, (_, _, x_test, y_test) = digits
    qdq_path = ort_qdq_digits
    g = from_onnx(qdq_path)
    counts = g.op_counts()
    assert counts["quantize"] >= 3 and counts["dequantize"] >= 5
    reference = ReferenceEvaluator(qdq_path)
    correct = 0
    for i in range(32):
        got = g(x_test[i:i + 1])[0]
        want = reference.run(None, {"image": x_test[i:i + 1]})[0]
        assert rel_err(got, want) < 1e-4
        correct += int(got.argmax() == y_test[i])
    assert correct >= 28  # the quantized digits model still classifies


@pytest.mark.parametrize("op", ["ConvInteger", "MatMulInteger"])
def test_integer_ops_take_zero_points_computed_at_run_time_on_every_target(op):
    """ONNX Runtime's quantize_dynamic feeds ConvInteger/MatMulInteger a DynamicQuantizeLinear's
    zero point; here both zero points are graph inputs (the weight's per channel for the conv),
    against the ONNX reference on the interpreter and the TVM build."""
    rng = np.random.default_rng(0)
    if op == "ConvInteger":
        x, w = rng.integers(0, 256, (1, 3, 7, 7)).astype(np.uint8), rng.integers(0, 256, (4, 3, 3, 3)).astype(np.uint8)
        x_zp, w_zp = np.array(131, np.uint8), rng.integers(100, 156, (4,)).astype(np.uint8)
        node = helper.make_node(op, ["x", "w", "xz", "wz"], ["y"], pads=[1, 1, 1, 1])
        out = [1, 4, 7, 7]
    else:
        x, w = rng.integers(0, 256, (2, 5, 16)).astype(np.uint8), rng.integers(-128, 128, (2, 16, 6)).astype(np.int8)
        x_zp, w_zp = np.array(77, np.uint8), np.array(-3, np.int8)
        node = helper.make_node(op, ["x", "w", "xz", "wz"], ["y"])
        out = [2, 5, 6]
    _matches_the_reference_everywhere(node, {"x": x, "w": w, "xz": x_zp, "wz": w_zp}, TensorProto.INT32, out)


def _matches_the_reference_everywhere(node, feeds: dict, out_type: int, out_shape: list) -> None:
    """A one-node model fed ``feeds`` (every operand a graph input): the interpreter and the TVM
    build give the ONNX reference's integers exactly."""
    import qcompiler

    inputs = [helper.make_tensor_value_info(k, helper.np_dtype_to_tensor_dtype(v.dtype), list(v.shape))
              for k, v in feeds.items()]
    model = helper.make_model(helper.make_graph([node], "g", inputs, [helper.make_tensor_value_info(
        "y", out_type, out_shape)]), opset_imports=[helper.make_opsetid("", 17)])
    want = ReferenceEvaluator(model).run(None, feeds)[0]
    np.testing.assert_array_equal(qcompiler.from_onnx(model)(*feeds.values())[0], want)
    np.testing.assert_array_equal(np.asarray(qcompiler.compile(model, target="llvm")(*feeds.values())), want)


@pytest.mark.parametrize("op", ["QLinearMatMul", "QLinearConv"])
def test_qlinear_ops_take_scales_and_zero_points_given_at_run_time(op):
    """Every quantization parameter a graph input (refused before: 'quantization parameters
    computed at run time'): the multiplier s_a * s_b / s_y is computed at run time, in float32
    as the reference does; interpreter and TVM build against the ONNX reference."""
    rng = np.random.default_rng(1)
    if op == "QLinearMatMul":
        a, b = rng.integers(0, 256, (2, 4, 16)).astype(np.uint8), rng.integers(-128, 128, (16, 5)).astype(np.int8)
        b_scale, b_zp, out = np.array(0.02, np.float32), np.array(3, np.int8), [2, 4, 5]
        node = helper.make_node(op, ["a", "as", "az", "b", "bs", "bz", "ys", "yz"], ["y"])
    else:
        a, b = rng.integers(0, 256, (1, 3, 6, 6)).astype(np.uint8), rng.integers(-128, 128, (4, 3, 3, 3)).astype(np.int8)
        b_scale, b_zp, out = rng.uniform(0.01, 0.03, 4).astype(np.float32), np.zeros(4, np.int8), [1, 4, 6, 6]
        node = helper.make_node(op, ["a", "as", "az", "b", "bs", "bz", "ys", "yz"], ["y"], pads=[1, 1, 1, 1])
    feeds = {"a": a, "as": np.array(0.05, np.float32), "az": np.array(120, np.uint8), "b": b, "bs": b_scale,
             "bz": b_zp, "ys": np.array(0.4, np.float32), "yz": np.array(100, np.uint8)}
    _matches_the_reference_everywhere(node, feeds, TensorProto.UINT8, out)
