"""ONNX constructs resolved at import (unrolled Scan and Loop, sequences, n-gram counting, the
DFT as products, RoiAlign from gathers), beyond what the node suite's cases reach: checked
against the ONNX reference (and TVM), and the one-line refusals where static shapes cannot
hold them."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from onnx.reference import ReferenceEvaluator

from qcompiler import ModelLoadError, QCompilerError, from_onnx
from tests.test_tvm import run_llvm


def _model(nodes, inputs, outputs, opset=18, domains=()) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs)
    imports = [helper.make_opsetid("", opset)] + [helper.make_opsetid(d, 1) for d in domains]
    model = helper.make_model(graph, opset_imports=imports)
    model.ir_version = 8
    return model


def _same_as_reference(model, feeds: dict, through_tvm: bool = True) -> None:
    want = ReferenceEvaluator(model).run(None, feeds)
    graph = from_onnx(model)
    inputs = [feeds[v.name] for v in graph.inputs]
    targets = {"interpreter": graph(*inputs)} | ({"tvm": run_llvm(graph, inputs)} if through_tvm else {})
    for where, got in targets.items():
        assert len(got) == len(want)
        for g, w in zip(got, want):
            np.testing.assert_allclose(np.asarray(g, np.float64), np.asarray(w, np.float64), rtol=1e-4, atol=1e-4,
                                       err_msg=where)


def _one_line(e: pytest.ExceptionInfo) -> str:
    text = str(e.value)
    assert text and "\n" not in text
    return text


@pytest.mark.parametrize("mode", ["TF", "IDF", "TFIDF"])
def test_tfidf_vectorizer_modes_and_weights(mode):
    node = helper.make_node("TfIdfVectorizer", ["x"], ["y"], mode=mode, min_gram_length=1, max_gram_length=3,
                            max_skip_count=2, ngram_counts=[0, 3, 7], ngram_indexes=[4, 0, 2, 1, 5, 3],
                            pool_int64s=[2, 3, 5, 2, 3, 3, 5, 2, 3, 5], weights=[0.5, 1, 2, 3, 4, 5])
    model = _model([node], [helper.make_tensor_value_info("x", TensorProto.INT64, [3, 9])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 6])], opset=9)
    x = np.random.default_rng(0).integers(1, 6, size=(3, 9)).astype(np.int64)
    _same_as_reference(model, {"x": x})


def test_scan_reverse_directions_and_axes():
    """A running sum and product scanned backwards over axis 1, its per-step outputs stacked
    on axis 1 in reverse."""
    body = helper.make_graph(
        [helper.make_node("Add", ["s_in", "v"], ["s_out"]), helper.make_node("Mul", ["s_out", "v"], ["p"])], "body",
        [helper.make_tensor_value_info("s_in", TensorProto.FLOAT, [2]),
         helper.make_tensor_value_info("v", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("s_out", TensorProto.FLOAT, [2]),
         helper.make_tensor_value_info("p", TensorProto.FLOAT, [2])])
    node = helper.make_node("Scan", ["init", "x"], ["final", "steps"], body=body, num_scan_inputs=1,
                            scan_input_axes=[1], scan_input_directions=[1], scan_output_axes=[1],
                            scan_output_directions=[1])
    model = _model([node], [helper.make_tensor_value_info("init", TensorProto.FLOAT, [2]),
                            helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 5])],
                   [helper.make_tensor_value_info("final", TensorProto.FLOAT, [2]),
                    helper.make_tensor_value_info("steps", TensorProto.FLOAT, [2, 5])])
    rng = np.random.default_rng(1)
    init, x = rng.standard_normal(2).astype(np.float32), rng.standard_normal((2, 5)).astype(np.float32)
    total, products = init.copy(), np.zeros_like(x)  # the ONNX reference has no reverse scans: by hand
    for t in reversed(range(5)):  # steps run from the end; stacking in reverse puts step t's output at t
        total = total + x[:, t]
        products[:, t] = total * x[:, t]
    graph = from_onnx(model)
    for got in (graph(init, x), run_llvm(graph, [init, x])):
        np.testing.assert_allclose(got[0], total, rtol=1e-5)
        np.testing.assert_allclose(got[1], products, rtol=1e-5)


def test_dft_of_a_long_complex_signal_matches_numpy():
    node = helper.make_node("DFT", ["x", "", "axis"], ["y"], inverse=0, onesided=0)
    axis = helper.make_tensor("axis", TensorProto.INT64, [], [1])
    model = _model([node], [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 96, 2])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 96, 2])], opset=20)
    model.graph.initializer.append(axis)
    x = np.random.default_rng(2).standard_normal((2, 96, 2)).astype(np.float32)
    want = np.fft.fft(x[..., 0] + 1j * x[..., 1], axis=1)
    graph = from_onnx(model)
    for got in (graph(x)[0], run_llvm(graph, [x])[0]):
        np.testing.assert_allclose(got[..., 0] + 1j * got[..., 1], want, atol=2e-4 * np.abs(want).max())


def test_loop_whose_condition_is_computed_from_data_is_refused_in_one_line():
    body = helper.make_graph(
        [helper.make_node("Add", ["y_in", "y_in"], ["y_out"]),
         helper.make_node("ReduceSum", ["y_out"], ["total"], keepdims=0),
         helper.make_node("Less", ["total", "limit"], ["again"])], "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []),
         helper.make_tensor_value_info("c", TensorProto.BOOL, []),
         helper.make_tensor_value_info("y_in", TensorProto.FLOAT, [3])],
        [helper.make_tensor_value_info("again", TensorProto.BOOL, []),
         helper.make_tensor_value_info("y_out", TensorProto.FLOAT, [3])])
    node = helper.make_node("Loop", ["", "", "y"], ["y_final"], name="doubling", body=body)
    model = _model([node], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3])],
                   [helper.make_tensor_value_info("y_final", TensorProto.FLOAT, [3])])
    model.graph.initializer.append(helper.make_tensor("limit", TensorProto.FLOAT, [], [100.0]))
    with pytest.raises(QCompilerError) as e:
        from_onnx(model)
    assert "doubling" in _one_line(e) and "data-dependent" in _one_line(e)


def test_sequence_input_needs_its_element_shapes_and_then_runs():
    node = helper.make_node("ConcatFromSequence", ["seq"], ["y"], axis=0, new_axis=1)
    seq = helper.make_tensor_sequence_value_info("seq", TensorProto.FLOAT, ["rows", "columns"])
    model = _model([node], [seq], [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", "rows", "columns"])])
    with pytest.raises(ModelLoadError) as e:
        from_onnx(model)
    assert "'seq'" in _one_line(e) and "input_shapes" in _one_line(e)
    parts = [np.full((2, 3), k, np.float32) for k in range(4)]
    graph = from_onnx(model, input_shapes={"seq": [[2, 3]] * 4})
    assert [v.name for v in graph.inputs] == ["seq.0", "seq.1", "seq.2", "seq.3"]
    np.testing.assert_array_equal(graph(*parts)[0], np.stack(parts))


def test_split_to_sequence_output_becomes_one_output_per_element():
    node = helper.make_node("SplitToSequence", ["x"], ["pieces"], axis=1, keepdims=0)
    model = _model([node], [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
                   [helper.make_tensor_sequence_value_info("pieces", TensorProto.FLOAT, [2])])
    graph = from_onnx(model)
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    assert [v.name for v in graph.outputs] == ["pieces.0", "pieces.1", "pieces.2"]
    for k, got in enumerate(run_llvm(graph, [x])):
        np.testing.assert_array_equal(got, x[:, k])


@pytest.mark.parametrize("case", ["adaptive RoiAlign", "large Det"])
def test_what_static_shapes_cannot_hold_is_refused_in_one_line(case):
    if case == "adaptive RoiAlign":
        node = helper.make_node("RoiAlign", ["x", "rois", "b"], ["y"], name="heads", sampling_ratio=0,
                                output_height=2, output_width=2)
        inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 8, 8]),
                  helper.make_tensor_value_info("rois", TensorProto.FLOAT, [3, 4]),
                  helper.make_tensor_value_info("b", TensorProto.INT64, [3])]
        shape = [3, 1, 2, 2]
    else:
        node = helper.make_node("Det", ["x"], ["y"], name="heads")
        inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [6, 6])]
        shape = []
    model = _model([node], inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)])
    with pytest.raises(QCompilerError) as e:
        from_onnx(model)
    assert "heads" in _one_line(e)


# ---- ops defined as functions of other ops ---------------------------------------------------------
def _attention_model(opset: int = 23) -> onnx.ModelProto:
    """Grouped-query causal attention (4 query heads sharing 2 key/value heads) on 3-D inputs,
    as torch.onnx.export(dynamo=True, opset_version=23) writes scaled_dot_product_attention."""
    node = helper.make_node("Attention", ["q", "k", "v"], ["y"], q_num_heads=4, kv_num_heads=2, is_causal=1)
    inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [2, 6, w]) for n, w in (("q", 32), ("k", 16),
                                                                                         ("v", 16))]
    return _model([node], inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 6, 32])], opset=opset)


def test_an_op_defined_as_a_function_imports_as_its_body():
    """Attention has no converter: its schema's own body (built for these heads and types) is
    what imports, so it means exactly what the op means, through the interpreter and TVM."""
    rng = np.random.default_rng(0)
    _same_as_reference(_attention_model(), {n: rng.standard_normal((2, 6, w)).astype(np.float32)
                                            for n, w in (("q", 32), ("k", 16), ("v", 16))})


def test_expanding_a_function_leaves_the_callers_model_unchanged():
    model = _attention_model()
    before = model.SerializeToString()
    from_onnx(model)
    assert model.SerializeToString() == before


def test_a_model_with_function_ops_quantizes_and_builds():
    """A transformer block as exported at opset 23 (linears around an Attention node) quantizes
    to int8 and its llvm build matches the reference build of the same quantized graph (to float32
    rounding: its attention gives the linears per-token scales, whose products are float)."""
    import qcompiler
    from onnx import numpy_helper

    rng = np.random.default_rng(1)
    weights = {f"w{n}": rng.standard_normal((32, width)).astype(np.float32) / 6
               for n, width in (("q", 32), ("k", 16), ("v", 16))}
    nodes = [helper.make_node("MatMul", ["x", f"w{n}"], [n]) for n in "qkv"]
    nodes.append(helper.make_node("Attention", ["q", "k", "v"], ["y"], q_num_heads=4, kv_num_heads=2, is_causal=1))
    graph = helper.make_graph(nodes, "block", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 6, 32])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 6, 32])],
                              [numpy_helper.from_array(w, name) for name, w in weights.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)])
    data = [rng.standard_normal((2, 6, 32)).astype(np.float32) for _ in range(4)]
    config = qcompiler.QuantConfig(min_layer_sqnr_db=None)
    built = qcompiler.compile(model, calibration=data[1:], config=config)
    reference = qcompiler.compile(model, calibration=data[1:], config=config, target="reference")
    want = reference(data[0])
    assert built.report()["per_token"]
    np.testing.assert_allclose(built(data[0]), want, rtol=2e-6, atol=2e-6 * np.abs(want).max())
    want = ReferenceEvaluator(model).run(None, {"x": data[0]})[0]
    assert np.abs(built(data[0]) - want).max() < 0.05 * np.abs(want).max()


def test_empty_parts_of_a_split_or_a_join_are_not_built():
    """Split into [6, 0] and a Concat with an empty operand (what a full-width RotaryEmbedding's
    body does): the empty tensors are never read, so TVM (which cannot build a tensor with no
    elements) builds the rest, and both match the reference."""
    split = helper.make_node("Split", ["x", "sizes"], ["a", "empty"], axis=1)
    join = helper.make_node("Concat", ["a", "empty", "x"], ["y"], axis=1)
    model = _model([split, join], [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 6])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 12])])
    model.graph.initializer.append(onnx.numpy_helper.from_array(np.array([6, 0], np.int64), "sizes"))
    graph = from_onnx(model)
    assert all(0 not in v.shape for n in graph.nodes if n.op == "concat" for v in n.inputs)
    _same_as_reference(model, {"x": np.arange(12, dtype=np.float32).reshape(2, 6)})
