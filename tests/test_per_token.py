"""Per-token dynamic int8 (linears and attention matmuls): ``quantize_rows`` / ``dequantize_rows``
against torch's arithmetic, the TVM kernels bit for bit (codes, scales) or to float32 rounding (the scaled
product) against the interpreter, insert-qdq and lower-integer against the reference
interpreter, the quantization flow choosing per-token scales for a linear a static scale cannot
carry (and the record, the pipeline string and the ONNX export keeping it), QAT refusing them.

A transformer's linear sees rows (tokens) whose ranges differ by orders of magnitude: one
static scale spends the int8 grid on the largest rows, so the small ones round to a few
levels. The model here makes that happen on purpose: rows scaled by 10^-2 .. 10^2."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

import qcompiler
from qcompiler.compare import compare, sqnr_db
from qcompiler.ir import Graph, TensorType
from qcompiler.ir.ops import get_op
from qcompiler.pass_manager import run_pipeline
from qcompiler.pipeline import PassContext
from qcompiler.quant_config import QuantConfig
from qcompiler.targets.tvm import TVMRunner, build, device_for, make_target
from qcompiler.targets.tvm.x86_amx import amx_usable, without_amx

LLVM = make_target("llvm")


def _rows(shape, seed: int = 0, spread: float = 2.0) -> np.ndarray:
    """Normal values whose rows (last axis) are scaled by 10^-spread .. 10^spread."""
    rng = np.random.default_rng(seed)
    scale = 10.0 ** rng.uniform(-spread, spread, shape[:-1] + (1,))
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def _quantize_rows_graph(shape) -> Graph:
    g = Graph("rows")
    x = g.add_input("x", TensorType(shape, "f32"))
    codes, scales = g.add_node("quantize_rows", [x]).outputs
    g.set_outputs([codes, scales])
    return g


def _edge_rows(shape, seed: int) -> np.ndarray:
    """Rows across float32's range, a zero row, a row of subnormals, a row at float32's largest."""
    x = _rows(shape, seed, spread=30.0)
    flat = x.reshape(-1, shape[-1])
    flat[0] = 0.0
    flat[1] = 0.0
    flat[1, :3] = [1e-45, -3e-45, 1e-40]
    flat[2] = np.float32(3.4e38) * np.sign(flat[2] + 0.5)
    return x


def test_quantize_rows_is_torchs_per_row_symmetric_int8():
    x = _edge_rows((6, 5, 37), 0)
    codes, scales = get_op("quantize_rows").run([x], {})
    t = torch.from_numpy(x)
    amax = t.abs().amax(-1, keepdim=True)
    factor = torch.where(amax > 0, (127.0 / amax).clamp(max=torch.finfo(torch.float32).max), torch.zeros(()))
    want = (torch.round(t * factor).clamp(-127, 127) + 128).to(torch.uint8)  # torch.round: half to even
    assert np.array_equal(codes, want.numpy())
    want_scales = torch.where(amax / 127.0 > 0, amax / 127.0, torch.ones(()))
    assert np.array_equal(scales, want_scales.numpy())
    assert (codes.reshape(-1, 37)[0] == 128).all() and scales.reshape(-1)[0] == 1.0  # a zero row
    real = get_op("dequantize_rows").run([codes, scales], {"zero_point": 128})[0]
    normal = np.abs(x).max(-1) > 1e-30  # away from subnormal rows, every value within half a step
    assert (np.abs(real - x)[normal] <= scales[normal] * 0.5001).all()


@pytest.mark.parametrize("shape", [(128, 1536), (5, 3, 37), (7, 16), (1, 1)])
def test_quantize_rows_on_the_tvm_target_is_bit_exact(shape):
    g = _quantize_rows_graph(shape)
    x = _edge_rows(shape, 1) if shape[-1] > 3 and int(np.prod(shape[:-1])) > 3 else _rows(shape, 1)
    got = TVMRunner(build(g, LLVM), device_for("llvm"), 2)([x])
    want = g(x)
    assert np.array_equal(got[0], want[0])
    assert np.array_equal(got[1].view(np.uint32), want[1].view(np.uint32))


def _dynamic_linear(rows=(2, 40), k: int = 64, n: int = 96, activation: str = "gelu", bias: bool = True,
                    seed: int = 0) -> tuple[Graph, np.ndarray]:
    rng = np.random.default_rng(seed)
    g = Graph("dynamic_linear")
    x = g.add_input("x", TensorType((*rows, k), "f32"))
    operands = [x, g.add_constant("w", (rng.standard_normal((n, k)) / np.sqrt(k)).astype(np.float32))]
    if bias:
        operands.append(g.add_constant("b", rng.standard_normal(n).astype(np.float32)))
    g.set_outputs([g.add_node("linear", operands, {"activation": activation}).output])
    return g, _rows((*rows, k), seed + 1)


def _insert(graph: Graph, x: np.ndarray, options: str = "dynamic=*") -> tuple[Graph, Graph, PassContext]:
    ctx = PassContext(calibration=[(x,)])
    qdq = run_pipeline(graph.copy(), f"range-analysis,insert-qdq{{{options}}}", context=ctx)
    return qdq, run_pipeline(qdq.copy(), "lower-integer", context=ctx), ctx


def test_insert_qdq_and_lower_integer_keep_the_per_token_numerics():
    """The QDQ graph (quantize_rows -> dequantize_rows -> linear) and the integer graph
    (linear_int over the codes, dequantize_rows by row and column, the bias and GELU in float)
    compute the same values up to float32 rounding; per-token scales beat one static scale."""
    graph, x = _dynamic_linear()
    qdq, lowered, _ = _insert(graph, x)
    assert [n.op for n in qdq.nodes][:2] == ["quantize_rows", "dequantize_rows"]
    assert lowered.op_counts().get("linear_int") == 1 and "linear" not in lowered.op_counts()
    acc = next(n for n in lowered.nodes if n.op == "linear_int")
    assert acc.inputs[0].producer.op == "quantize_rows" and len(acc.inputs) == 4  # the bias is added in float
    exact, simulated, integer = graph(x)[0], qdq(x)[0], lowered(x)[0]
    np.testing.assert_allclose(integer, simulated, rtol=1e-5, atol=1e-5 * np.abs(exact).max())
    static = _insert(graph, x, "")[1](x)[0]
    assert sqnr_db(exact, integer) > sqnr_db(exact, static) + 5


@pytest.mark.parametrize("bias", [True, False])
def test_the_integer_graph_matches_a_float64_product_of_the_codes(bias):
    """The lowered layer against an oracle written here: codes and scales from quantize_rows,
    the weight's int8 values and scales, the product summed in float64."""
    graph, x = _dynamic_linear(activation="none", bias=bias)
    qdq, lowered, _ = _insert(graph, x)
    codes, scales = get_op("quantize_rows").run([x], {})
    w_dq = next(n for n in qdq.nodes if n.op == "dequantize" and n.inputs[0].is_constant)
    w_q, w_s = (qdq.constant_array(v).astype(np.float64) for v in w_dq.inputs[:2])
    want = (codes.astype(np.float64) - 128) @ w_q.T * scales * w_s
    if bias:
        want = want + graph.constant_array(graph.nodes[0].inputs[2])
    np.testing.assert_allclose(lowered(x)[0], want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def _targets() -> list:
    found = [pytest.param(LLVM, id="host"), pytest.param(make_target("llvm", arch="haswell"), id="avx2")]
    if amx_usable():
        found.append(pytest.param(without_amx(LLVM), id="vnni-without-amx"))
    return found


@pytest.mark.parametrize("target", _targets())
@pytest.mark.parametrize("rows", [(2, 40), (3,)])
def test_the_tvm_target_runs_the_integer_graph(target, rows):
    """On the host's int8 kernels (AMX for 16 rows or more where the CPU has it, VNNI otherwise),
    on the VNNI kernels with AMX turned off, and on the AVX2 kernels: the codes' product is
    exact, so the result differs from the interpreter's only by the float32 rounding of the
    scaling."""
    graph, x = _dynamic_linear(rows=rows)
    _, lowered, _ = _insert(graph, x)
    got = TVMRunner(build(lowered, target), device_for("llvm"), 1)([x])[0]
    want = lowered(x)[0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_dequantize_rows_on_the_tvm_target():
    rng = np.random.default_rng(3)
    g = Graph("scale")
    acc = g.add_input("acc", TensorType((4, 9, 48), "i32"))
    row = g.add_input("row", TensorType((4, 9, 1), "f32"))
    y = g.add_node("dequantize_rows", [acc, row, g.add_constant("col", rng.uniform(1e-3, 1, 48).astype(np.float32)),
                                       g.add_constant("b", rng.standard_normal(48).astype(np.float32))],
                   {"zero_point": 0}).output
    g.set_outputs([y])
    arrays = [rng.integers(-2 ** 31, 2 ** 31 - 1, (4, 9, 48), dtype=np.int64).astype(np.int32),
              rng.uniform(1e-6, 1, (4, 9, 1)).astype(np.float32)]
    got = TVMRunner(build(g, LLVM), device_for("llvm"), 1)(arrays)[0]
    want = g(*arrays)[0]
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6 * np.abs(want).max())


class _RowsMLP(torch.nn.Module):
    """Two linears over rows of very different magnitudes (as a transformer's tokens)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.up, self.down = torch.nn.Linear(32, 64), torch.nn.Linear(64, 16)

    def forward(self, x):
        return self.down(torch.nn.functional.gelu(self.up(x)))


def _rows_case():
    model = _RowsMLP().eval()
    calibration = [_rows((2, 24, 32), seed, spread=3.0) for seed in range(3)]
    return model, calibration


def test_the_sensitivity_check_gives_weak_linears_per_token_scales_and_the_record_keeps_them(tmp_path):
    model, calibration = _rows_case()
    graph = qcompiler.from_torch(model, (torch.from_numpy(calibration[0]),))
    config = QuantConfig(min_layer_sqnr_db=38.0, per_token="fallback", float_precision="fp32")
    result = qcompiler.quantize(graph, calibration, config)
    dynamic = result.report["per_token"]
    assert [e["node"] for e in dynamic] == ["linear 'up' (%0)"]  # the one under 38 dB with a static scale
    assert "with a static scale: per-token scales at run time" in dynamic[0]["reason"]
    assert result.report["kept_float"] == []  # per-token scales carry it: nothing left float
    assert result.graph.op_counts()["linear_int"] == 2 and result.graph.op_counts()["quantize_rows"] == 1
    local = {e.handle: e.local_sqnr_db for e in compare(result.float_graph, result.qdq_graph, (calibration[0],))}
    assert all(local[int(e["handle"])] >= 38.0 for e in dynamic)  # measured with per-token scales
    x = calibration[1]
    with torch.no_grad():
        reference = model(torch.from_numpy(x)).numpy()
    off = qcompiler.quantize(graph, calibration, dataclasses.replace(config, per_token="off"))
    assert off.report["per_token"] == [] and [e["node"] for e in off.report["kept_float"]] == \
        ["linear 'up' (%0)"]
    assert sqnr_db(reference, result.graph(x)[0]) > 30.0
    # the pipeline string reproduces the graph; a saved record brings the same layers back
    assert "bias-correction{dynamic=0},insert-qdq{dynamic=0}" in result.pipeline
    again = run_pipeline(graph.copy(), result.pipeline, context=PassContext(calibration=calibration))
    np.testing.assert_array_equal(again(x)[0], result.graph(x)[0])
    result.calibration.save(tmp_path / "ranges.json")
    assert set(json.loads((tmp_path / "ranges.json").read_text())["dynamic"]) == set(result.calibration.dynamic)
    replayed = qcompiler.quantize(graph, config=config, ranges=tmp_path / "ranges.json")
    np.testing.assert_array_equal(replayed.graph(x)[0], result.graph(x)[0])


def test_auto_tries_per_token_scales_only_where_float_would_be_fp32():
    model, calibration = _rows_case()
    graph = qcompiler.from_torch(model, (torch.from_numpy(calibration[0]),))
    auto = QuantConfig(min_layer_sqnr_db=38.0)
    assert auto.per_token == "auto"
    fp32 = qcompiler.quantize(graph, calibration, auto, bf16_native=False)
    assert len(fp32.report["per_token"]) == 1
    bf16 = qcompiler.quantize(graph, calibration, auto, bf16_native=True)
    assert bf16.report["per_token"] == [] and {e["precision"] for e in bf16.report["kept_float"]} == {"bf16"}
    every = qcompiler.quantize(graph, calibration, QuantConfig(per_token="all", min_layer_sqnr_db=None))
    assert len(every.report["per_token"]) == 2
    with pytest.raises(qcompiler.QCompilerError, match="per_token 'some' is not one of auto, off"):
        QuantConfig(per_token="some")


def test_bias_correction_measures_a_dynamic_layer_with_per_token_scales():
    """The corrected bias removes the mean error of the layer as it will run (per-token codes):
    the mean output error over the calibration data falls to float rounding."""
    graph, x = _dynamic_linear(activation="none", rows=(4, 64))
    ctx = PassContext(calibration=[(x,)])
    corrected = run_pipeline(graph.copy(), "range-analysis,bias-correction{dynamic=*},insert-qdq{dynamic=*}",
                             context=ctx)
    plain = _insert(graph, x)[0]
    exact = graph(x)[0].reshape(-1, 96)

    def mean_error(g: Graph) -> float:
        return float(np.abs((exact - g(x)[0].reshape(-1, 96)).mean(axis=0)).max())

    assert mean_error(corrected) < mean_error(plain) / 4


def test_the_onnx_export_computes_the_same_codes():
    ort = pytest.importorskip("onnxruntime")
    from qcompiler.targets.onnx import to_onnx

    graph, x = _dynamic_linear()
    qdq = _insert(graph, x)[0]
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC  # its fusions re-quantize
    session = ort.InferenceSession(to_onnx(qdq).SerializeToString(), options, providers=["CPUExecutionProvider"])
    want = qdq(x)[0]
    np.testing.assert_allclose(session.run(None, {"x": x})[0], want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    rows = _quantize_rows_graph((7, 33))
    xr = _edge_rows((7, 33), 4)
    xr = xr[np.abs(xr).max(-1) < 1e38]  # ONNX Runtime's Abs/ReduceMax agree; its Clip of x * inf does not matter
    rows = _quantize_rows_graph(xr.shape)
    session = ort.InferenceSession(to_onnx(rows).SerializeToString(), options, providers=["CPUExecutionProvider"])
    got = session.run(None, {"x": xr})
    want = rows(xr)
    assert np.array_equal(got[0], want[0]) and np.array_equal(got[1], want[1])


def test_qat_refuses_per_token_linears_and_treats_auto_as_off():
    from qcompiler.qat import prepare

    model, calibration = _rows_case()
    example = (torch.from_numpy(calibration[0]),)
    with pytest.raises(qcompiler.QCompilerError, match="per-token dynamic layers have no activation scale"):
        prepare(model, example, calibration, QuantConfig(per_token="all"))
    prepared = prepare(model, example, calibration, QuantConfig(min_layer_sqnr_db=38.0, float_precision="fp32"))
    assert not any(n.op == "quantize_rows" for n in prepared.qdq.nodes)


def test_the_cli_reports_per_token_linears(tmp_path):
    from tests.conftest import cli_in_process, export_onnx

    model, calibration = _rows_case()
    path = export_onnx(model, (torch.from_numpy(calibration[0]),), tmp_path / "mlp.onnx", ["x"])
    np.savez(tmp_path / "cal.npz", x=np.stack(calibration))
    done = cli_in_process("compile", path, "--calibration", str(tmp_path / "cal.npz"), "--target", "reference",
                          "-o", str(tmp_path / "a"), "--per-token", "all")
    assert done.returncode == 0, done.stderr
    assert "per-token int8" in done.stderr + done.stdout and "2 linears/matmuls" in done.stderr + done.stdout
    report = json.loads((tmp_path / "a" / "report.json").read_text())
    assert len(report["per_token"]) == 2


def test_the_portable_lowering_is_bit_exact_on_the_cpu():
    """quantize_rows as TE (what CUDA builds: no hand-written CPU kernel), on the CPU's default
    schedule: the same codes and scales as the interpreter."""
    import tvm
    from tvm import relax

    from qcompiler.targets.tvm import to_relax
    from qcompiler.targets.tvm.build import FUSE
    from qcompiler.targets.tvm.cpu_schedule import parallelize_cpu

    shape = (6, 5, 37)
    g, x = _quantize_rows_graph(shape), _edge_rows(shape, 5)
    mod = to_relax(g)
    with LLVM:
        mod = parallelize_cpu(tvm.transform.Sequential(FUSE)(mod))
    got = TVMRunner(relax.build(mod, target=LLVM), tvm.cpu(), 2)([x])
    want = g(x)
    assert np.array_equal(got[0], want[0]) and np.array_equal(got[1].view(np.uint32), want[1].view(np.uint32))


def test_a_dynamic_linear_builds_for_cuda_and_compiles(tmp_path):
    import shutil
    import subprocess

    import tvm

    from qcompiler.targets.tvm import cuda_source

    graph, x = _dynamic_linear(rows=(3, 10))
    lowered = _insert(graph, x)[1]
    executable = build(lowered, make_target("cuda", "sm_75"))
    source = cuda_source(executable)
    assert "__dp4a(" in source
    (tmp_path / "k.cu").write_text(source)
    nvcc = shutil.which("nvcc") or "/usr/local/cuda/bin/nvcc"
    done = subprocess.run([nvcc, "-arch=sm_75", "-c", str(tmp_path / "k.cu"), "-o", str(tmp_path / "k.o")],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    if tvm.cuda(0).exist:
        want = lowered(x)[0]
        got = TVMRunner(executable, tvm.cuda(0), 1)([x])[0]
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_a_per_token_build_saves_and_loads(tmp_path):
    model, calibration = _rows_case()
    compiled = qcompiler.compile(model, (torch.from_numpy(calibration[0]),), calibration=calibration,
                                 config=QuantConfig(per_token="all"))
    assert len(compiled.report()["per_token"]) == 2
    compiled.save(tmp_path / "art")
    loaded = qcompiler.load(tmp_path / "art")
    x = calibration[2]
    np.testing.assert_array_equal(np.asarray(loaded(x)), np.asarray(compiled(x)))
    want = compiled.graph(x)[0]  # the integer graph on the interpreter
    np.testing.assert_allclose(np.asarray(compiled(x)).reshape(want.shape), want, rtol=1e-5,
                               atol=1e-5 * np.abs(want).max())


def _attention_scores(rows=16) -> tuple[Graph, list[np.ndarray]]:
    """matmul of two run-time operands (queries by keys), the queries' rows spanning 100x."""
    g = Graph("scores")
    q = g.add_input("q", TensorType((2, 4, rows, 32), "f32"))
    k = g.add_input("k", TensorType((2, 4, 32, 24), "f32"))
    g.set_outputs([g.add_node("matmul", [q, k]).output])
    rng = np.random.default_rng(7)
    return g, [_rows((2, 4, rows, 32), 7), rng.standard_normal((2, 4, 32, 24)).astype(np.float32)]


@pytest.mark.parametrize("target", _targets())
def test_a_matmul_of_two_run_time_operands_takes_per_token_scales(target):
    """The left operand per row (quantize_rows), the right per tensor: matmul_int over the codes,
    dequantize_rows by row scale and the right operand's scale; per-token beats static, and the
    TVM kernels agree with the interpreter to float32 rounding."""
    graph, inputs = _attention_scores()
    ctx = PassContext(calibration=[tuple(inputs)])
    qdq = run_pipeline(graph.copy(), "range-analysis,insert-qdq{dynamic=*}", context=ctx)
    lowered = run_pipeline(qdq.copy(), "lower-integer", context=ctx)
    counts = lowered.op_counts()
    assert counts.get("matmul_int") == 1 and counts.get("quantize_rows") == 1 and "matmul" not in counts
    exact, simulated, integer = graph(*inputs)[0], qdq(*inputs)[0], lowered(*inputs)[0]
    np.testing.assert_allclose(integer, simulated, rtol=1e-5, atol=1e-5 * np.abs(exact).max())
    static = run_pipeline(graph.copy(), "range-analysis,insert-qdq,lower-integer", context=ctx)(*inputs)[0]
    assert sqnr_db(exact, integer) > sqnr_db(exact, static) + 5
    got = TVMRunner(build(lowered, target), device_for("llvm"), 1)(inputs)[0]
    np.testing.assert_allclose(got, integer, rtol=1e-5, atol=1e-5 * np.abs(integer).max())
