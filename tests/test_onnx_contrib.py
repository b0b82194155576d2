"""ONNX Runtime's fused ``com.microsoft`` ops, as its transformer optimizer writes them into the
"optimized" models people publish: each against ONNX Runtime itself (graph optimizations off,
so its own kernel for the op runs), on the interpreter and built for this CPU; and a BERT
optimized by ONNX Runtime end to end, quantized."""
from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

import qcompiler

ort = pytest.importorskip("onnxruntime")
rng = np.random.default_rng(0)
F = TensorProto.FLOAT


def _run_ort(model, feeds: dict) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"]).run(None, feeds)


def _model(node, inputs: dict, outputs: dict, initializers: dict | None = None, opset: int = 17):
    """One contrib node; ``inputs``/``outputs``: name -> (elem type, shape)."""
    graph = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info(n, t, s) for n, (t, s) in inputs.items()],
        [helper.make_tensor_value_info(n, t, s) for n, (t, s) in outputs.items()],
        initializer=[numpy_helper.from_array(a, n) for n, a in (initializers or {}).items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid("com.microsoft", 1)])


def _f32(*shape, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def _ms(op, inputs, outputs, **attrs):
    return helper.make_node(op, inputs, outputs, domain="com.microsoft", name=op.lower(), **attrs)


def _cases():
    h = 16
    x, skip = _f32(2, 5, h), _f32(2, 5, h)
    gamma, beta, bias = _f32(h) + 1, _f32(h), _f32(h)
    io = {"x": (F, [2, 5, h])}
    yield "Gelu", _model(_ms("Gelu", ["x"], ["y"]), io, {"y": (F, [2, 5, h])}), {"x": x}
    yield "FastGelu", _model(_ms("FastGelu", ["x", "b"], ["y"]), io, {"y": (F, [2, 5, h])}, {"b": bias}), {"x": x}
    yield "BiasGelu", _model(_ms("BiasGelu", ["x", "b"], ["y"]), io, {"y": (F, [2, 5, h])}, {"b": bias}), {"x": x}
    yield "QuickGelu", _model(_ms("QuickGelu", ["x"], ["y"], alpha=1.5), io, {"y": (F, [2, 5, h])}), {"x": x}
    yield "BiasAdd", _model(_ms("BiasAdd", ["x", "b", "s"], ["y"]), {**io, "s": (F, [2, 5, h])},
                            {"y": (F, [2, 5, h])}, {"b": bias}), {"x": x, "s": skip}
    yield "SkipLayerNormalization", _model(
        _ms("SkipLayerNormalization", ["x", "s", "g", "be", "b"], ["y", "", "", "sum"], epsilon=1e-5),
        {**io, "s": (F, [2, 5, h])}, {"y": (F, [2, 5, h]), "sum": (F, [2, 5, h])},
        {"g": gamma, "be": beta, "b": bias}), {"x": x, "s": skip}
    yield "SkipSimplifiedLayerNormalization", _model(
        _ms("SkipSimplifiedLayerNormalization", ["x", "s", "g"], ["y", "", "", "sum"], epsilon=1e-6),
        {**io, "s": (F, [2, 5, h])}, {"y": (F, [2, 5, h]), "sum": (F, [2, 5, h])}, {"g": gamma}), {"x": x, "s": skip}
    yield "SimplifiedLayerNormalization", _model(
        helper.make_node("SimplifiedLayerNormalization", ["x", "g"], ["y"], axis=-1, epsilon=1e-6, name="rms"),
        io, {"y": (F, [2, 5, h])}, {"g": gamma}), {"x": x}
    yield "LayerNormalization (ONNX Runtime's, at opset 14)", _model(
        helper.make_node("LayerNormalization", ["x", "g", "be"], ["y"], axis=-1, epsilon=1e-5, name="ln"),
        io, {"y": (F, [2, 5, h])}, {"g": gamma, "be": beta}, opset=14), {"x": x}
    yield "FusedMatMul", _model(_ms("FusedMatMul", ["a", "w"], ["y"], alpha=0.5, transA=1, transB=1),
                                {"a": (F, [2, h, 5])}, {"y": (F, [2, 5, 8])}, {"w": _f32(8, h)}), {"a": _f32(2, h, 5)}
    yield "FusedConv", _model(
        _ms("FusedConv", ["x", "w", "b", "z"], ["y"], activation="Clip", activation_params=[0.0, 6.0],
            pads=[1, 1, 1, 1]),
        {"x": (F, [1, 3, 8, 8]), "z": (F, [1, 4, 8, 8])}, {"y": (F, [1, 4, 8, 8])},
        {"w": _f32(4, 3, 3, 3), "b": _f32(4)}), {"x": _f32(1, 3, 8, 8), "z": _f32(1, 4, 8, 8)}
    lengths = np.array([5, 3], np.int32)
    raw = (np.arange(5)[None, :] < lengths[:, None]).astype(np.int32)
    for form, mask, attrs in (("lengths", lengths, {}), ("raw mask", raw, {}), ("causal", None, {"unidirectional": 1}),
                              ("uneven heads", raw, {"qkv_hidden_sizes": [16, 16, 8]})):
        sizes = attrs.get("qkv_hidden_sizes", [h, h, h])
        names = ["x", "w", "b"] + (["m"] if mask is not None else [])
        feeds = {"x": x} | ({"m": mask} if mask is not None else {})
        inputs = io | ({"m": (TensorProto.INT32, list(mask.shape))} if mask is not None else {})
        yield f"Attention ({form})", _model(
            _ms("Attention", names, ["y"], num_heads=2, **attrs), inputs, {"y": (F, [2, 5, sizes[2]])},
            {"w": _f32(h, sum(sizes), scale=0.3), "b": _f32(sum(sizes))}), feeds
    ids, segments = rng.integers(0, 30, (2, 5)).astype(np.int32), rng.integers(0, 2, (2, 5)).astype(np.int32)
    yield "EmbedLayerNormalization", _model(
        _ms("EmbedLayerNormalization", ["ids", "seg", "word", "pos", "segw", "g", "be", "m"], ["y", "index", "sum"],
            epsilon=1e-12),
        {"ids": (TensorProto.INT32, [2, 5]), "seg": (TensorProto.INT32, [2, 5]), "m": (TensorProto.INT32, [2, 5])},
        {"y": (F, [2, 5, h]), "index": (TensorProto.INT32, [2]), "sum": (F, [2, 5, h])},
        {"word": _f32(30, h), "pos": _f32(12, h), "segw": _f32(2, h), "g": gamma, "be": beta}), \
        {"ids": ids, "seg": segments, "m": raw}


CASES = {name: (model, feeds) for name, model, feeds in _cases()}


# ops ONNX Runtime runs on GPUs only: their documented definition instead
WITHOUT_CPU_KERNEL = {"BiasAdd": lambda model, feeds: [feeds["x"] + numpy_helper.to_array(model.graph.initializer[0])
                                                       + feeds["s"]]}


@pytest.mark.parametrize("name", list(CASES))
def test_contrib_op_matches_onnx_runtime_on_every_target(name):
    model, feeds = CASES[name]
    want = WITHOUT_CPU_KERNEL.get(name, _run_ort)(model, feeds)
    graph = qcompiler.from_onnx(model)
    compiled = qcompiler.compile(model, target="llvm")
    built = compiled(*feeds.values())
    built = list(built) if isinstance(built, (list, tuple)) else [built]
    for got in (graph(*feeds.values()), built):
        assert len(got) == len(want)
        for g, w in zip(got, want):
            assert g.dtype == w.dtype and g.shape == w.shape
            np.testing.assert_allclose(g, w, rtol=1e-5, atol=2e-5)


def test_unsupported_contrib_forms_are_one_line():
    model = _model(_ms("Attention", ["x", "w", "", "", "past"], ["y"], num_heads=2),
                   {"x": (F, [1, 4, 8]), "past": (F, [2, 1, 2, 3, 4])}, {"y": (F, [1, 4, 8])}, {"w": _f32(8, 24)})
    with pytest.raises(qcompiler.QCompilerError, match=r"Attention 'attention': past state .* not supported") as e:
        qcompiler.from_onnx(model)
    assert "\n" not in str(e.value)


def test_a_bert_optimized_by_onnx_runtime_imports_exactly_and_quantizes(tmp_path):
    """ONNX Runtime's transformer optimizer fuses a BERT into EmbedLayerNormalization, Attention,
    BiasGelu and SkipLayerNormalization (what its published "optimized" models hold); before,
    qcompiler refused all four. Now it imports to ONNX Runtime's own outputs and quantizes."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from onnxruntime.transformers import optimizer

    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=64, attn_implementation="eager")
    bert = transformers.BertModel(config).eval()

    class Encoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.bert = bert

        def forward(self, ids, mask, types):
            return self.bert(input_ids=ids, attention_mask=mask, token_type_ids=types).last_hidden_state

    names = ["input_ids", "attention_mask", "token_type_ids"]
    seq = 16
    example = (torch.ones(1, seq, dtype=torch.int64),) * 2 + (torch.zeros(1, seq, dtype=torch.int64),)
    exported = tmp_path / "bert.onnx"
    with torch.no_grad():
        torch.onnx.export(Encoder().eval(), example, str(exported), input_names=names, output_names=["y"], opset_version=14,
                          dynamo=False, dynamic_axes={n: {0: "batch", 1: "seq"} for n in names})
    optimized = optimizer.optimize_model(str(exported), model_type="bert", num_heads=2, hidden_size=32, opt_level=1)
    fused = {n.op_type for n in optimized.model.graph.node if n.domain == "com.microsoft"}
    assert fused >= {"Attention", "EmbedLayerNormalization", "SkipLayerNormalization"}, fused
    mask = np.ones((2, seq), np.int64)
    mask[1, 11:] = 0  # the second sentence has 11 tokens
    feeds = {"input_ids": rng.integers(1, 100, (2, seq)).astype(np.int64), "attention_mask": mask,
             "token_type_ids": np.zeros((2, seq), np.int64)}
    want = _run_ort(optimized.model, feeds)[0]
    shapes = {k: list(v.shape) for k, v in feeds.items()}
    got = qcompiler.from_onnx(optimized.model, input_shapes=shapes)(*feeds.values())[0]
    np.testing.assert_allclose(got[0], want[0], atol=1e-5)
    np.testing.assert_allclose(got[1, :11], want[1, :11], atol=1e-5)  # padding tokens' states are not compared
    calibration = [(rng.integers(1, 100, (2, seq)).astype(np.int64), mask, np.zeros((2, seq), np.int64))
                   for _ in range(4)]
    compiled = qcompiler.compile(optimized.model, calibration=calibration, target="llvm", input_shapes=shapes)
    quantized = np.asarray(compiled(*feeds.values()))
    real_got, real_want = np.concatenate([quantized[0], quantized[1, :11]]), np.concatenate([want[0], want[1, :11]])
    cosine = (real_got * real_want).sum(-1) / np.linalg.norm(real_got, axis=-1) / np.linalg.norm(real_want, axis=-1)
    assert cosine.min() > 0.99, cosine
    assert compiled.report()["ops"]["integer"] > 0

    # ONNX Runtime's quantize_dynamic of the optimized model (optimum's "optimized + quantized"
    # form): QAttention, QEmbedLayerNormalization and MatMulInteger fed DynamicQuantizeLinear
    from onnxruntime.quantization import QuantType, quantize_dynamic

    optimized.save_model_to_file(str(tmp_path / "optimized.onnx"))
    quantize_dynamic(str(tmp_path / "optimized.onnx"), str(tmp_path / "dynamic.onnx"), weight_type=QuantType.QInt8,
                     extra_options={"DefaultTensorType": TensorProto.FLOAT})
    import onnx

    dynamic = onnx.load(str(tmp_path / "dynamic.onnx"))
    assert {"QAttention", "QEmbedLayerNormalization"} <= {n.op_type for n in dynamic.graph.node}
    want = _run_ort(dynamic, feeds)[0]
    built = qcompiler.compile(dynamic, target="llvm", input_shapes=shapes)
    got = np.asarray(built(*feeds.values()))
    # float rounding of a run-time scale can move one code a step: a few tokens differ by 1e-4
    np.testing.assert_allclose(got, built.graph(*feeds.values())[0], rtol=0, atol=1e-3 * np.abs(want).max())
    for row, real in ((0, slice(None)), (1, slice(0, 11))):  # ONNX Runtime's kernels round a step apart at times
        assert np.abs(got[row, real] - want[row, real]).max() < 0.01 * np.abs(want).max()
    assert built.graph.op_counts().get("linear_int", 0) >= 8  # every projection, QAttention's included


@pytest.mark.parametrize("symmetric", [True, False])
def test_matmul_nbits_from_onnx_runtimes_quantizer_matches_it(symmetric, tmp_path):
    """ONNX Runtime's weight-only 4-bit form (MatMulNBits, as its quantizer and model builder
    write LLM linears): imported as the float weight it defines, equal to ONNX Runtime's output,
    and quantized again as 4-bit groups."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    import onnx

    k, n = 96, 24
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Relu", ["h"], ["y"])]
    model = helper.make_model(helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", F, [3, k])],
                                                [helper.make_tensor_value_info("y", F, [3, n])],
                                                initializer=[numpy_helper.from_array(_f32(k, n), "w")]),
                              opset_imports=[helper.make_opsetid("", 17)])
    quantizer = MatMulNBitsQuantizer(model, block_size=32, is_symmetric=symmetric)
    quantizer.process()
    quantized = quantizer.model.model
    assert [n.op_type for n in quantized.graph.node][0] == "MatMulNBits"
    x = _f32(3, k)
    want = _run_ort(quantized, {"x": x})[0]
    np.testing.assert_allclose(qcompiler.from_onnx(quantized)(x)[0], want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(qcompiler.compile(quantized, target="llvm")(x)), want, rtol=1e-5, atol=1e-5)
    path = tmp_path / "nbits.onnx"
    onnx.save(quantized, str(path))
    config = qcompiler.QuantConfig(weight_dtype="i4", weight_group_size=32)
    int4 = qcompiler.compile(str(path), calibration=[_f32(3, k) for _ in range(4)], config=config, target="llvm")
    assert int4.report()["int4_weights"] == 1
    assert np.abs(np.asarray(int4(x)) - want).max() < 0.1 * np.abs(want).max()
