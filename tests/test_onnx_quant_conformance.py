"""ONNX conformance for the quantized ops: the node-test generators shipped in the onnx wheel
(onnx.backend.test.case) for QuantizeLinear, DequantizeLinear, QLinearConv, QLinearMatMul,
ConvInteger and MatMulInteger, int8/uint8, per-tensor and per-axis. The interpreter must
reproduce their reference outputs exactly."""
from __future__ import annotations

import copy
import warnings

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from qcompiler import from_onnx

OPS = ("quantizelinear", "dequantizelinear", "qlinearconv", "qlinearmatmul", "convinteger", "matmulinteger")
# variants outside int8/uint8 (float8, int4, int2, 16-bit, blocked) are not part of the IR's quantization
OUT_OF_SCOPE = ("e4m3fn", "e5m2", "uint16", "int16", "uint4", "int4", "uint2", "int2", "float4e2m1", "blocked")


def _cases():
    from onnx.backend.test.case import node

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cases = node.collect_testcases(None)
    return [c for c in cases if c.name.split("_")[1] in OPS and not any(t in c.name for t in OUT_OF_SCOPE)]


CASES = _cases()


def test_every_quantized_op_has_cases():
    names = {c.name.split("_")[1] for c in CASES}
    assert names == set(OPS), names
    print(f"\n{len(CASES)} ONNX quantized-op conformance cases")


# input positions holding scales and zero points: qcompiler compiles them in as constants,
# so each data set's values for them become initializers of the model under test
PARAMETERS = {"QuantizeLinear": (1, 2), "DequantizeLinear": (1, 2), "QLinearConv": (1, 2, 4, 5, 6, 7),
              "QLinearMatMul": (1, 2, 4, 5, 6, 7), "ConvInteger": (2, 3), "MatMulInteger": (2, 3)}


def _freeze_parameters(model: onnx.ModelProto, inputs: list[np.ndarray]) -> tuple[onnx.ModelProto, list[np.ndarray]]:
    model = copy.deepcopy(model)
    node = model.graph.node[0]
    frozen = {node.input[i] for i in PARAMETERS[node.op_type] if i < len(node.input) and node.input[i]}
    runtime = []
    graph_inputs = list(model.graph.input)
    del model.graph.input[:]
    for info, array in zip(graph_inputs, inputs):
        if info.name in frozen:
            model.graph.initializer.append(numpy_helper.from_array(array, info.name))
        else:
            model.graph.input.append(info)
            runtime.append(array)
    return model, runtime


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_matches_onnx_reference_exactly(case):
    for inputs, outputs in case.data_sets:
        model, runtime = _freeze_parameters(case.model, list(inputs))
        got = from_onnx(model)(*runtime)
        for g, w in zip(got, outputs):
            assert g.dtype == w.dtype and g.shape == w.shape
            np.testing.assert_array_equal(g, w)
