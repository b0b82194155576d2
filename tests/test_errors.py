"""Bad input gets one clear line: what and where, before anything runs."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

from qcompiler import InputError, ModelLoadError, UnsupportedOpError, from_onnx, from_torch


def _one_line(e: BaseException) -> str:
    text = str(e)
    assert text and "\n" not in text and "Traceback" not in text
    return text


def test_unsupported_onnx_ops_are_all_listed_with_node_names(tmp_path):
    nodes = [helper.make_node("Relu", ["x"], ["a"], name="ok"),
             helper.make_node("Unique", ["a"], ["b"], name="u1"),
             helper.make_node("Unique", ["b"], ["c"], name="u2"),
             helper.make_node("NonZero", ["c"], ["y"], name="nz")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.INT64, [2, "n"])])
    path = tmp_path / "m.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    with pytest.raises(UnsupportedOpError) as info:
        from_onnx(path)
    text = _one_line(info.value)
    assert "NonZero (e.g. node 'nz')" in text and "Unique (e.g. node 'u1', 2 nodes)" in text
    assert str(path) in text
    assert info.value.unsupported == {"NonZero": ["nz"], "Unique": ["u1", "u2"]}


def test_unsupported_torch_ops_are_all_listed_before_anything_runs():
    class M(torch.nn.Module):
        def forward(self, x):
            return torch.fft.fft(x).real + torch.lgamma(x) + torch.lgamma(x) * 2

    with pytest.raises(UnsupportedOpError) as info:
        from_torch(M(), (torch.randn(4),))
    text = _one_line(info.value)
    assert "aten.lgamma (e.g. node 'lgamma', 2 nodes)" in text and "aten.fft_fft (e.g. node 'fft_fft')" in text


def test_corrupt_and_non_onnx_files(tmp_path):
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\x00\xff not a protobuf at all \x13\x37" * 10)
    text_file = tmp_path / "notes.onnx"
    text_file.write_text("hello, I am a text file\n")
    for path in (garbage, text_file):
        with pytest.raises(ModelLoadError) as info:
            from_onnx(path)
        assert str(path) in _one_line(info.value)
    with pytest.raises(ModelLoadError, match="no such file"):
        from_onnx(tmp_path / "missing.onnx")


def test_dynamic_onnx_input_needs_a_shape(tmp_path):
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])])
    path = tmp_path / "dyn.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    with pytest.raises(ModelLoadError, match=r"input 'x' has dynamic shape \['batch', 3\]; fix it with "
                       r"--input-shape x=D0,D1,\.\.\. on the command line \(input_shapes=\{'x': \[\.\.\.\]\} in Python\)"):
        from_onnx(path)
    g = from_onnx(path, input_shapes={"x": [2, 3]})
    x = np.array([[-1, 2, -3], [4, -5, 6]], np.float32)
    np.testing.assert_array_equal(g(x)[0], np.maximum(x, 0))
    with pytest.raises(ModelLoadError, match="unknown input"):
        from_onnx(path, input_shapes={"x": [2, 3], "z": [1]})


def test_wrong_input_count_shape_and_dtype(digits):
    model, (_, _, x_test, _) = digits
    graph = from_torch(model, (torch.from_numpy(x_test[:4]),))
    with pytest.raises(InputError, match=r"takes 1 input\(s\) \(%x: f32\[4,1,8,8\]\), got 2"):
        graph(x_test[:4], x_test[:4])
    with pytest.raises(InputError, match=r"input %x: expected shape \[4, 1, 8, 8\], got \[5, 1, 8, 8\]"):
        graph(x_test[:5])
    with pytest.raises(InputError, match="input %x: expected f32, got bool"):
        graph(x_test[:4] > 0)
    np.testing.assert_allclose(graph(torch.from_numpy(x_test[:4]))[0], graph(x_test[:4])[0])  # torch accepted


def test_torch_export_failure_is_one_line():
    class DataDependent(torch.nn.Module):
        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow cannot be exported
                return x * 2
            return x

    with pytest.raises(ModelLoadError) as info:
        from_torch(DataDependent(), (torch.randn(3),))
    assert _one_line(info.value).startswith("torch.export failed for DataDependent:")


def test_not_a_module():
    with pytest.raises(ModelLoadError, match="expects a torch.nn.Module, got function"):
        from_torch(lambda x: x, (torch.randn(2),))


def test_kernel_failure_names_the_node():
    text = """\
func @main(%ids: i64[2]) -> f32[2,3] {
  const @table : f32[4,3] = [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0, 11.0]
  %0 = gather(@table, %ids) : f32[2,3] loc(#0 "embeddings")
  return %0
}
"""
    from qcompiler import parse_graph

    g = parse_graph(text)
    np.testing.assert_array_equal(g(np.array([3, -1]))[0], [[9, 10, 11], [9, 10, 11]])
    with pytest.raises(InputError, match=r"gather 'embeddings' \(%0\): index 7 out of range for axis of size 4"):
        g(np.array([0, 7]))
