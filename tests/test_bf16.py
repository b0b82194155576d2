"""bfloat16 layers: the IR's rounding against torch's, the TVM target's rounding bit for bit,
the AMX-BF16 GEMM against exact products, insert-qdq's bf16 layers, and the quantization flow
choosing bf16 (sensitivity check, precision search, then float32 where bf16 falls short).

A bf16 layer's operands are rounded to bfloat16 and its products summed in float32: every
product of two bf16 values is exact in float32, so a kernel can differ from the interpreter
only in the order of its float32 sums. The oracle for the kernels is therefore the float64 sum
of the rounded operands' products, within K float32 roundings of the sum of |products|."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

import qcompiler
from qcompiler.ir import Graph, TensorType
from qcompiler.ir.ops.quant import round_to_bf16
from qcompiler.pass_manager import run_pipeline
from qcompiler.pipeline import PassContext
from qcompiler.quant_config import QuantConfig
from qcompiler.targets.tvm import TVMRunner, build, device_for, make_target, to_relax
from qcompiler.targets.tvm.x86_amx import amx_usable, without_amx
from qcompiler.compare import sqnr_db
from qcompiler.cpu_features import has_amx_bf16

LLVM = make_target("llvm")
needs_amx_bf16 = pytest.mark.skipif(not (amx_usable() and has_amx_bf16()),
                                    reason="this CPU has no AMX-BF16: bf16 layers run on the float32 kernels")


def _edge_values(rng) -> np.ndarray:
    """Normal values across float32's exponent range, ties (half-way words), subnormals, the
    largest finite values (which round to infinity), infinities, NaN and signed zeros."""
    with np.errstate(over="ignore"):
        spread = (rng.standard_normal(20000) * 10.0 ** rng.integers(-44, 39, 20000)).astype(np.float32)
    ties = (rng.integers(0, 2 ** 31, 2000, dtype=np.uint32) & np.uint32(0xFFFF0000) | np.uint32(0x8000)).view(
        np.float32)
    special = np.array([np.nan, -np.nan, np.inf, -np.inf, 3.4028235e38, -3.39e38, 1e-40, -1e-45, 0.0, -0.0],
                       np.float32)
    return np.concatenate([spread, ties, special])


def test_round_bf16_is_torchs_rounding():
    x = _edge_values(np.random.default_rng(0))
    ours = round_to_bf16(x)
    theirs = torch.from_numpy(x).to(torch.bfloat16).float().numpy()
    same = (ours.view(np.uint32) == theirs.view(np.uint32)) | (np.isnan(ours) & np.isnan(theirs))
    assert same.all(), x[~same][:5]
    assert np.isinf(round_to_bf16(np.float32(3.4028235e38)))  # past bf16's largest: the carry reaches infinity


def _round_graph(shape) -> Graph:
    g = Graph("round")
    x = g.add_input("x", TensorType(shape, "f32"))
    g.set_outputs([g.add_node("round_bf16", [x]).output])
    return g


def test_round_bf16_on_the_tvm_target_is_bit_exact():
    x = _edge_values(np.random.default_rng(1)).reshape(-1, 2)
    g = _round_graph(x.shape)
    got = TVMRunner(build(g, LLVM), device_for("llvm"), 1)([x])[0]
    want = g(x)[0]
    assert np.array_equal(np.isnan(got), np.isnan(want))
    finite = ~np.isnan(want)
    assert np.array_equal(got[finite].view(np.uint32), want[finite].view(np.uint32))


def _bf16_linear(rows: tuple[int, ...], k: int, n: int, bias: bool, activation: str = "none", seed: int = 0):
    rng = np.random.default_rng(seed)
    g = Graph("bf16_linear")
    x = g.add_input("x", TensorType((*rows, k), "f32"))
    operands = [g.add_node("round_bf16", [x]).output,
                g.add_constant("w", round_to_bf16(rng.standard_normal((n, k)).astype(np.float32)))]
    if bias:
        operands.append(g.add_constant("b", rng.standard_normal(n).astype(np.float32)))
    g.set_outputs([g.add_node("linear", operands, {"activation": activation}).output])
    return g, rng.standard_normal((*rows, k)).astype(np.float32) * 4


def _assert_exact_products(g: Graph, x: np.ndarray, got: np.ndarray) -> None:
    """``got`` is the float32 sum of the exactly rounded products (any order)."""
    xr = round_to_bf16(x).astype(np.float64)
    w = g.constant_array(g.nodes[1].inputs[1]).astype(np.float64)
    exact = xr @ w.T
    magnitude = np.abs(xr) @ np.abs(w).T
    if len(g.nodes[1].inputs) > 2:
        bias = g.constant_array(g.nodes[1].inputs[2]).astype(np.float64)
        exact, magnitude = exact + bias, magnitude + np.abs(bias)
    if g.nodes[1].attrs["activation"] == "relu":
        exact = np.maximum(exact, 0.0)
    bound = (x.shape[-1] + 2) * 2.0 ** -24 * magnitude
    assert np.all(np.abs(got - exact) <= bound), np.max(np.abs(got - exact) / (magnitude + 1e-30))
    assert np.all(np.abs(g(x)[0] - exact) <= bound)  # the interpreter: the same arithmetic


def _kernels(g: Graph, bf16: str | None) -> set[str]:
    return {gv.name_hint for gv in to_relax(g, cpu_kernels=True, cores=2, bf16_kernels=bf16).functions
            if gv.name_hint.startswith("amx_")}


@needs_amx_bf16
@pytest.mark.parametrize("rows,k,n,bias,activation", [
    ((128,), 384, 1536, True, "none"),  # MiniLM's FFN: K and N whole tiles
    ((2, 37), 100, 70, True, "relu"),  # K not whole tile pairs (padded), M and N blocks overlapping, 3-D input
    ((16,), 33, 32, False, "none"),  # the smallest block, odd K, no bias
    ((300,), 1100, 48, True, "none"),  # several K steps (1100 = 2 x 544 + 12 padded)
])
def test_the_amx_bf16_gemm_sums_exact_products(rows, k, n, bias, activation):
    g, x = _bf16_linear(rows, k, n, bias, activation)
    assert _kernels(g, "amx") == {"amx_dense_bf16"}
    got = TVMRunner(build(g, LLVM), device_for("llvm"), 1)([x])[0]
    _assert_exact_products(g, x, got)


def test_a_bf16_linear_without_amx_runs_the_float32_kernels():
    """Where the CPU has no AMX-BF16 (or the GEMM does not apply: under 16 rows), the rounded
    operands go through the float32 kernels: the same products, the same result."""
    for rows, bf16 in (((64,), None), ((4,), "amx")):
        g, x = _bf16_linear(rows, 96, 40, True)
        assert _kernels(g, bf16) == set()
        got = TVMRunner(build(g, without_amx(LLVM)), device_for("llvm"), 1)([x])[0]
        _assert_exact_products(g, x, got)


def _mlp_case():
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4)).eval()
    rng = np.random.default_rng(0)
    calibration = [rng.standard_normal((16, 8)).astype(np.float32) for _ in range(4)]
    return mlp, calibration


def test_insert_qdq_runs_named_layers_in_bf16():
    """The layer reads its activation through round_bf16 and a rounded weight; its result is the
    float32 layer on rounded operands (numpy here), and it is reported kept out of int8 in bf16."""
    mlp, calibration = _mlp_case()
    graph = qcompiler.from_torch(mlp, (torch.from_numpy(calibration[0]),))
    first = graph.nodes[0].outputs[0].name
    ctx = PassContext(calibration=calibration)
    run_pipeline(graph, f"range-analysis,insert-qdq{{exclude={first},bf16={first}}},lower-integer", context=ctx)
    linear = next(n for n in graph.nodes if n.op == "linear")
    assert linear.inputs[0].producer.op == "round_bf16"
    w = graph.constant_array(linear.inputs[1])
    assert np.array_equal(w, round_to_bf16(mlp[0].weight.detach().numpy()))
    x = calibration[1]
    xr = round_to_bf16(x)
    want = xr.astype(np.float64) @ w.T.astype(np.float64) + mlp[0].bias.detach().numpy()
    if linear.attrs["activation"] == "relu":
        want = np.maximum(want, 0.0)
    np.testing.assert_allclose(_cut_at(graph, linear.output)(x)[0], want, rtol=1e-6, atol=1e-6)
    kept = {e["node"]: e for e in ctx.report["kept_float"]}
    assert [e["precision"] for e in kept.values() if e["node"].startswith("linear")] == ["bf16"]
    assert "linear_int" in graph.op_counts()  # the second layer stays int8


def _cut_at(graph: Graph, value) -> Graph:
    """A copy of ``graph`` whose output is ``value`` (by name)."""
    g = graph.copy()
    g.set_outputs([next(o for n in g.nodes for o in n.outputs if o.name == value.name)])
    return g


def test_the_sensitivity_check_puts_weak_layers_in_bf16_and_the_record_keeps_them(tmp_path):
    mlp, calibration = _mlp_case()
    graph = qcompiler.from_torch(mlp, (torch.from_numpy(calibration[0]),))
    config = QuantConfig(min_layer_sqnr_db=1000.0, float_precision="bf16")  # no layer is good enough for int8
    result = qcompiler.quantize(graph, calibration, config)
    assert [e["precision"] for e in result.report["kept_float"]] == ["bf16", "bf16"]
    assert result.report["float_precision"] == {"config": "bf16", "resolved": "bf16",
                                                "bf16_layers": list(result.calibration.bf16)}
    assert "insert-qdq{exclude=" in result.pipeline and ",bf16=" in result.pipeline
    x = calibration[2]
    with torch.no_grad():  # torch's own bf16 rounding of each layer's operands, float32 products
        h = torch.relu(torch.nn.functional.linear(torch.from_numpy(x).bfloat16().float(),
                                                  mlp[0].weight.bfloat16().float(), mlp[0].bias))
        want = torch.nn.functional.linear(h.bfloat16().float(), mlp[2].weight.bfloat16().float(), mlp[2].bias).numpy()
    np.testing.assert_allclose(result.graph(x)[0], want, rtol=1e-5, atol=1e-5)
    assert not np.allclose(result.graph(x)[0], result.float_graph(x)[0], rtol=1e-5, atol=1e-5)  # bf16 is not fp32
    # the pipeline string reproduces the graph, and a saved record brings the same bf16 layers back
    again = run_pipeline(graph.copy(), result.pipeline, context=PassContext(calibration=calibration))
    np.testing.assert_array_equal(again(x)[0], result.graph(x)[0])
    result.calibration.save(tmp_path / "ranges.json")
    replayed = qcompiler.quantize(graph, config=config, ranges=tmp_path / "ranges.json")
    np.testing.assert_array_equal(replayed.graph(x)[0], result.graph(x)[0])


def test_the_precision_search_promotes_to_bf16_then_float32():
    """A target bf16 meets: layers go to bf16, none to float32. A target only float32 meets: the
    second search moves bf16 layers to float32, and says so."""
    from tests.test_accuracy import _outliers_case

    model, calibration = _outliers_case()
    x = torch.from_numpy(calibration[0])
    with torch.no_grad():
        reference = model(x).numpy()
    modest = QuantConfig(min_layer_sqnr_db=None, target_output_sqnr_db=40.0, float_precision="bf16")
    compiled = qcompiler.compile(model, (x,), calibration=calibration, target="reference", config=modest)
    report = compiled.report()
    assert report["precision_search"]["action"] == "bf16" and report["precision_search"]["met"]
    assert "float32_search" not in report
    kept = [e for e in report["kept_float"] if "target_output_sqnr_db 40" in e["reason"]]
    assert kept and {e["precision"] for e in kept} == {"bf16"}
    assert sqnr_db(reference, np.asarray(compiled(calibration[0]))) >= 40.0
    strict = dataclasses.replace(modest, target_output_sqnr_db=90.0)
    compiled = qcompiler.compile(model, (x,), calibration=calibration, target="reference", config=strict)
    report = compiled.report()
    assert not report["precision_search"]["met"] and report["float32_search"]["met"]
    assert report["float32_search"]["action"] == "float32"
    assert {e["precision"] for e in report["kept_float"] if "float32 gained" in e["reason"]} == {"fp32"}
    assert sqnr_db(reference, np.asarray(compiled(calibration[0]))) >= 90.0


def test_auto_precision_follows_the_build_cpu():
    from qcompiler.compiled import _bf16_native

    assert _bf16_native("llvm", "sapphirerapids") and not _bf16_native("llvm", "znver4")
    assert not _bf16_native("reference", None) and not _bf16_native("onnx", None)
    assert QuantConfig().resolved_float_precision(True) == "bf16"
    assert QuantConfig().resolved_float_precision(False) == "fp32"
    assert QuantConfig(float_precision="fp32").resolved_float_precision(True) == "fp32"
    assert QuantConfig(weight_only_fallback=True).resolved_float_precision(True) == "fp32"
    with pytest.raises(qcompiler.QCompilerError, match="float_precision 'fp16' is not one of auto, bf16, fp32"):
        QuantConfig(float_precision="fp16")
    with pytest.raises(qcompiler.QCompilerError, match="choose one"):
        QuantConfig(float_precision="bf16", weight_only_fallback=True)


def test_bf16_exports_to_onnx_as_a_cast_pair_onnx_runtime_rounds_alike():
    pytest.importorskip("onnxruntime")
    import onnxruntime as ort

    from qcompiler.targets.onnx import to_onnx

    x = _edge_values(np.random.default_rng(2))
    x = x[np.isfinite(x) & (np.abs(x) < 3e38)].reshape(1, -1)  # ONNX Runtime's Cast saturates NaN/inf alike
    g = _round_graph(x.shape)
    model = to_onnx(g)
    assert [n.op_type for n in model.graph.node][:2] == ["Cast", "Cast"]
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    got = session.run(None, {"x": x})[0]
    assert np.array_equal(got.view(np.uint32), g(x)[0].view(np.uint32))


def test_an_onnx_cast_pair_through_bfloat16_imports_as_a_bf16_operand(tmp_path):
    """Mixed-precision ONNX models (and qcompiler's own exported bf16 layers) mark a bf16 operand
    with Cast(to=bfloat16) -> Cast(to=float): imported as round_bf16. A bf16 tensor read by
    anything but a Cast, or returned, is refused in one line naming the node."""
    import onnx
    from onnx import TensorProto, helper

    from qcompiler.errors import QCompilerError

    def model(after_cast: str, output_type: int = TensorProto.FLOAT):
        nodes = [helper.make_node("Cast", ["x"], ["h"], to=TensorProto.BFLOAT16, name="to_bf16")]
        nodes.append(helper.make_node("Cast", ["h"], ["y"], to=TensorProto.FLOAT, name="back") if after_cast == "Cast"
                     else helper.make_node(after_cast, ["h"], ["y"], name="reader"))
        graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 8])],
                                  [helper.make_tensor_value_info("y", output_type, [4, 8])])
        path = tmp_path / f"{after_cast}.onnx"
        onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
        return path

    g = qcompiler.from_onnx(model("Cast"))
    assert [n.op for n in g.nodes if n.op != "identity"] == ["round_bf16"]
    x = _edge_values(np.random.default_rng(3))[:32].reshape(4, 8)
    np.testing.assert_array_equal(g(x)[0], round_to_bf16(x))
    with pytest.raises(QCompilerError, match="Relu 'reader' reads the bfloat16 tensor 'h'"):
        qcompiler.from_onnx(model("Relu", TensorProto.BFLOAT16))


def test_where_bf16_is_cheap_the_sensitivity_floor_rises():
    """Keeping a linear out of int8 costs little in bf16: linears below bf16_min_layer_sqnr_db go
    to bf16 (named in the reason); in float32 the floor stays min_layer_sqnr_db."""
    mlp, calibration = _mlp_case()
    graph = qcompiler.from_torch(mlp, (torch.from_numpy(calibration[0]),))
    strict = QuantConfig(bf16_min_layer_sqnr_db=1000.0)  # every layer is below it
    in_bf16 = qcompiler.quantize(graph, calibration, dataclasses.replace(strict, float_precision="bf16"))
    assert [e["precision"] for e in in_bf16.report["kept_float"]] == ["bf16", "bf16"]
    assert all("< bf16_min_layer_sqnr_db 1000" in e["reason"] for e in in_bf16.report["kept_float"])
    in_fp32 = qcompiler.quantize(graph, calibration, dataclasses.replace(strict, float_precision="fp32"))
    assert in_fp32.report["kept_float"] == [] and "linear_int" in in_fp32.graph.op_counts()
    assert QuantConfig().sensitivity_floor("bf16", "linear") == (30.0, "bf16_min_layer_sqnr_db")
    assert QuantConfig().sensitivity_floor("bf16", "conv2d") == (20.0, "min_layer_sqnr_db")  # no bf16 conv kernel
    assert QuantConfig().sensitivity_floor("fp32", "linear") == (20.0, "min_layer_sqnr_db")
    assert QuantConfig(bf16_min_layer_sqnr_db=None).sensitivity_floor("bf16", "linear")[0] == 20.0


def _bf16_conv(x_shape, out_channels, kernel, strides, pads, activation="none", seed=0):
    rng = np.random.default_rng(seed)
    g = Graph("bf16_conv")
    x = g.add_input("x", TensorType(x_shape, "f32"))
    w = g.add_constant("w", round_to_bf16(rng.standard_normal((out_channels, x_shape[1]) + kernel).astype(np.float32)))
    b = g.add_constant("b", rng.standard_normal(out_channels).astype(np.float32))
    g.set_outputs([g.add_node("conv2d", [g.add_node("round_bf16", [x]).output, w, b],
                              {"strides": strides, "pads": pads, "activation": activation}).output])
    return g, rng.standard_normal(x_shape).astype(np.float32) * 3


@needs_amx_bf16
@pytest.mark.parametrize("x_shape,channels,kernel,strides,pads,activation", [
    ((1, 64, 14, 14), 64, (3, 3), (1, 1), (1, 1, 1, 1), "relu"),  # ResNet's 3x3: K 576 = 18 tile pairs
    ((2, 48, 16, 16), 40, (1, 1), (2, 2), (0, 0, 0, 0), "none"),  # batch 2, 2 x 2 phase planes, M blocks overlapping
    ((1, 18, 12, 12), 32, (5, 5), (1, 1), (2, 1, 2, 1), "none"),  # odd channel pairs (9), asymmetric pads
])
def test_the_amx_bf16_convolution_sums_exact_products(x_shape, channels, kernel, strides, pads, activation):
    g, x = _bf16_conv(x_shape, channels, kernel, strides, pads, activation)
    assert _kernels(g, "amx") == {"amx_conv2d_bf16", "amx_conv2d_bf16_input"}
    got = TVMRunner(build(g, LLVM), device_for("llvm"), 1)([x])[0]
    conv = g.nodes[1]
    xr = torch.from_numpy(round_to_bf16(x)).double()
    w = torch.from_numpy(g.constant_array(conv.inputs[1])).double()
    bias = torch.from_numpy(g.constant_array(conv.inputs[2])).double()
    left, top, right, bottom = pads[1], pads[0], pads[3], pads[2]
    padded = torch.nn.functional.pad(xr, (left, right, top, bottom))
    exact = torch.nn.functional.conv2d(padded, w, bias, stride=strides).numpy()
    magnitude = torch.nn.functional.conv2d(padded.abs(), w.abs(), bias.abs(), stride=strides).numpy()
    if activation == "relu":
        exact = np.maximum(exact, 0.0)
    bound = (np.prod(w.shape[1:]) + 2) * 2.0 ** -24 * magnitude
    assert np.all(np.abs(got - exact) <= bound), np.max(np.abs(got - exact) / (magnitude + 1e-30))
    assert np.all(np.abs(g(x)[0] - exact) <= bound)
