"""ONNX Runtime's QOperator models (``com.microsoft`` QLinear* ops) import as dequantize -> op ->
quantize and give ONNX Runtime's own results: each op alone against ONNX Runtime's kernel, and a
CNN quantized by ``quantize_static(quant_format=QOperator)`` end to end, then lowered to integer ops."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from qcompiler import from_onnx
from qcompiler.pass_manager import run_pipeline

ort = pytest.importorskip("onnxruntime")
rng = np.random.default_rng(0)
SHAPE = [2, 4, 6, 6]


def _const(name: str, value, dtype) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(value, dtype), name)


def _model(node: onnx.NodeProto, inputs: list[tuple[str, list[int]]], out_shape: list[int] | None = None,
           initializers: list | None = None) -> onnx.ModelProto:
    graph = helper.make_graph(
        [node], "q", [helper.make_tensor_value_info(n, TensorProto.UINT8, s) for n, s in inputs],
        [helper.make_tensor_value_info(node.output[0], TensorProto.UINT8, out_shape)], initializer=initializers or [])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])


def _triple(prefix: str, scale: float, zp: int) -> tuple[list[str], list]:
    return ([prefix, f"{prefix}_s", f"{prefix}_z"],
            [_const(f"{prefix}_s", scale, np.float32), _const(f"{prefix}_z", zp, np.uint8)])


def _check(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> None:
    """qcompiler's interpreter against ONNX Runtime's kernel: equal, or one step apart where the
    two round a value lying on a half step differently (ONNX Runtime's table/float paths)."""
    want = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    got = from_onnx(model)(*feeds.values())[0]
    assert got.dtype == want.dtype and got.shape == want.shape
    diff = np.abs(got.astype(np.int32) - want.astype(np.int32))
    assert diff.max() <= 1 and (diff == 0).mean() >= 0.95, (diff.max(), (diff == 0).mean())


def _u8(shape):
    return rng.integers(0, 256, shape, dtype=np.uint8)


@pytest.mark.parametrize("op", ["QLinearAdd", "QLinearMul"])
def test_binary_qlinear_ops(op):
    a, a_init = _triple("a", 0.05, 120)
    b, b_init = _triple("b", 0.03, 100)
    y, y_init = _triple("y", 0.08 if op == "QLinearAdd" else 0.2, 128)
    node = helper.make_node(op, a + b + y[1:], ["y"], domain="com.microsoft")
    _check(_model(node, [("a", SHAPE), ("b", SHAPE)], SHAPE, a_init + b_init + y_init),
           {"a": _u8(SHAPE), "b": _u8(SHAPE)})


@pytest.mark.parametrize("op,attrs,out", [
    ("QLinearSigmoid", {}, SHAPE), ("QLinearLeakyRelu", {"alpha": 0.1}, SHAPE),
    ("QLinearAveragePool", {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1]}, [2, 4, 3, 3]),
    ("QLinearGlobalAveragePool", {}, [2, 4, 1, 1]), ("QLinearSoftmax", {"axis": -1, "opset": 13}, SHAPE)])
def test_unary_qlinear_ops(op, attrs, out):
    x, x_init = _triple("x", 0.04, 128)
    y, y_init = _triple("y", 1 / 256 if op in ("QLinearSigmoid", "QLinearSoftmax") else 0.04, 0 if "oid" in op or
                        "Soft" in op else 128)
    node = helper.make_node(op, x + y[1:], ["y"], domain="com.microsoft", **attrs)
    _check(_model(node, [("x", SHAPE)], out, x_init + y_init), {"x": _u8(SHAPE)})


def test_qlinear_concat_requantizes_each_input():
    y, y_init = _triple("y", 0.1, 100)
    a, a_init = _triple("a", 0.05, 120)
    b, b_init = _triple("b", 0.2, 90)
    node = helper.make_node("QLinearConcat", y[1:] + a + b, ["y"], domain="com.microsoft", axis=1)
    _check(_model(node, [("a", SHAPE), ("b", SHAPE)], [2, 8, 6, 6], y_init + a_init + b_init),
           {"a": _u8(SHAPE), "b": _u8(SHAPE)})


def test_run_time_scales_are_refused_with_the_node_named():
    from qcompiler.errors import QCompilerError

    node = helper.make_node("QLinearSigmoid", ["x", "x_s", "x_z", "y_s", "y_z"], ["y"], domain="com.microsoft",
                            name="sig_1")
    graph = helper.make_graph([node], "q", [helper.make_tensor_value_info("x", TensorProto.UINT8, SHAPE),
                                            helper.make_tensor_value_info("x_s", TensorProto.FLOAT, [])],
                              [helper.make_tensor_value_info("y", TensorProto.UINT8, SHAPE)],
                              initializer=[_const("x_z", 0, np.uint8), _const("y_s", 0.1, np.float32),
                                           _const("y_z", 0, np.uint8)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    with pytest.raises(QCompilerError, match=r"QLinearSigmoid.*sig_1.*scale"):
        from_onnx(model)


class _Net(torch.nn.Module):
    """What QOperator quantization turns into com.microsoft ops: residual add, concat, pooling,
    sigmoid gating, a classifier."""

    def __init__(self):
        super().__init__()
        self.c1 = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = torch.nn.Conv2d(8, 8, 3, padding=1)
        self.c3 = torch.nn.Conv2d(8, 8, 1)
        self.fc = torch.nn.Linear(16, 5)

    def forward(self, x):
        a = torch.relu(self.c1(x))
        b = torch.relu(self.c2(a)) + a
        c = torch.cat([b, self.c3(b) * torch.sigmoid(b)], 1)
        c = torch.nn.functional.avg_pool2d(c, 2)
        return self.fc(torch.nn.functional.adaptive_avg_pool2d(c, 1).flatten(1))


def test_onnxruntime_qoperator_model_end_to_end(tmp_path):
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    torch.manual_seed(0)
    net = _Net().eval()
    x = torch.randn(1, 3, 8, 8)
    torch.onnx.export(net, (x,), str(tmp_path / "f.onnx"), input_names=["x"], output_names=["y"], dynamo=False)
    batches = [rng.standard_normal((1, 3, 8, 8)).astype(np.float32) for _ in range(16)]

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter([{"x": b} for b in batches])

        def get_next(self):
            return next(self.it, None)

    quantize_static(str(tmp_path / "f.onnx"), str(tmp_path / "q.onnx"), Reader(), quant_format=QuantFormat.QOperator,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, per_channel=True,
                    reduce_range=True)  # 7-bit weights: ONNX Runtime's u8 x s8 kernels saturate on CPUs without VNNI
    model = onnx.load(tmp_path / "q.onnx")
    ms_ops = {n.op_type for n in model.graph.node if n.domain == "com.microsoft"}
    assert {"QLinearAdd", "QLinearConcat", "QLinearSigmoid"} <= ms_ops, ms_ops
    session = ort.InferenceSession(str(tmp_path / "q.onnx"), providers=["CPUExecutionProvider"])
    step = float(numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == "y_scale")))
    graph = from_onnx(tmp_path / "q.onnx")
    outputs = [graph(b)[0] for b in batches[:8]]
    for b, got in zip(batches, outputs):
        want = session.run(None, {"x": b})[0]
        assert np.abs(got - want).max() <= step * 1.001  # at most one output step (a half-step tie rounded apart)
    run_pipeline(graph, "canonicalize,lower-integer")  # the sandwiches become integer ops
    counts = graph.op_counts()
    assert counts.get("conv2d_int", 0) == 3 and counts.get("add_int_f32", 0) >= 1, counts
    for b, before in zip(batches, outputs):
        after = graph(b)[0]
        assert np.abs(after - before).max() <= 0.05 * np.abs(before).max() + 1e-6
