"""The TVM target against the reference interpreter: integer graphs bit-exact, float graphs
within 1e-4 of the largest output; CUDA modules built and their source compiled with nvcc
(run on a GPU when there is one); libraries exported and loaded in a fresh process."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

import qcompiler
from qcompiler import from_onnx, from_torch
from qcompiler.examples import zoo
from qcompiler.ir import Graph, TensorType
from qcompiler.targets.tvm import TVMRunner, build, cuda_source, device_for, export, make_target, to_relax
from tests.conftest import rel_err
from tests.test_onnx_backend import IN_SCOPE
from tests.test_onnx_quant_conformance import CASES, _freeze_parameters
from tests.test_quantization import RESIDUAL_INTO_NORM

LLVM = make_target("llvm")


def run_llvm(graph, inputs):
    return TVMRunner(build(graph, LLVM), device_for("llvm"), len(graph.outputs))(inputs)


def check(graph, inputs):
    got, want = run_llvm(graph, inputs), graph(*inputs)
    for g, w in zip(got, want):
        assert g.dtype == w.dtype and g.shape == w.shape
        if w.dtype.kind in "iub":
            np.testing.assert_array_equal(g, w)
        else:
            assert rel_err(g, w) < 1e-4


@pytest.fixture(scope="module")
def quantized_digits(digits):
    model, (x_train, _, x_test, _) = digits
    graph = from_torch(model, (torch.from_numpy(x_test[:32]),))
    return qcompiler.quantize(graph, [x_train[:32], x_train[32:64]]), x_test[:32]


def test_digits_float_and_integer_graphs(quantized_digits):
    result, x = quantized_digits
    check(result.float_graph, [x])
    check(result.graph, [x])
    check(result.qdq_graph, [x])


def test_resnet18_integer_graph_is_bit_exact():
    model = zoo.resnet18()
    x = zoo.photo_crops(1, seed=1)[0]
    result = qcompiler.quantize(from_torch(model, (torch.from_numpy(x),)), zoo.photo_crops(2, seed=0))
    out = result.graph.outputs[0].producer  # integer all the way to the logits' int32 accumulator
    assert out.op == "dequantize" and out.inputs[0].dtype == "i32" and out.inputs[0].producer.op == "linear_int"
    check(result.graph, [x])


def test_a_result_read_as_float_is_the_dequantized_accumulator_on_llvm():
    """A linear read by a float residual add: linear_int's int32 accumulator dequantized, then the
    float add and layer norm, as the interpreter computes them."""
    from qcompiler.ir import parse_graph
    from qcompiler.pass_manager import run_pipeline

    graph = parse_graph(RESIDUAL_INTO_NORM)
    run_pipeline(graph, "insert-qdq,lower-integer")
    assert graph.op_counts().get("linear_int") == 1 and graph.op_counts().get("add") == 1
    check(graph, [np.array([[-1.0, 0.5, 2.0, 3.0], [0.25, -0.75, 1.0, 0.0]], np.float32)])


def test_minilm_float_and_integer_graphs(minilm):
    """The integer MiniLM keeps float islands (layer norm, softmax, GELU) whose last bits differ
    between TVM and numpy; a quantize right after one can land a step apart, and from there the
    two runs carry different (equally valid) rounding noise. So the compiled integer model is
    held to the quantization bar itself: cosine >= 0.99 against the float model."""
    encoder, ids, mask = minilm
    inputs = [ids[:2].numpy(), mask[:2].numpy()]
    graph = from_torch(encoder, (ids[:2], mask[:2]))
    _, tokenizer = zoo.load_minilm()
    cal_ids, cal_mask = zoo.tokenize(tokenizer, zoo.CALIBRATION_SENTENCES, 128)
    calibration = [(cal_ids[i:i + 2].numpy(), cal_mask[i:i + 2].numpy()) for i in range(0, 8, 2)]
    result = qcompiler.quantize(graph, calibration)
    check(result.float_graph, inputs)
    got, want = run_llvm(result.graph, inputs)[0], result.float_graph(*inputs)[0]
    cosine = (got * want).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(want, axis=1)
    assert cosine.min() >= 0.99


def test_onnx_backend_models_through_tvm():
    """Every in-scope single-layer model of the onnx wheel, compiled for the CPU."""
    import glob

    import onnx
    from onnx import numpy_helper

    ran = 0
    for case in IN_SCOPE:
        try:
            graph = from_onnx(os.path.join(case, "model.onnx"))
        except qcompiler.UnsupportedOpError:
            continue
        data = sorted(glob.glob(os.path.join(case, "test_data_set_*")))[0]
        inputs = [numpy_helper.to_array(onnx.load_tensor(f)) for f in sorted(glob.glob(f"{data}/input_*.pb"))]
        got, want = run_llvm(graph, inputs), graph(*inputs)
        for g, w in zip(got, want):
            assert g.shape == w.shape, case
            np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5 * max(1.0, float(np.nanmax(np.abs(w))) if w.size else 1),
                                       err_msg=case)
        ran += 1
    print(f"\n{ran} ONNX backend models compiled with TVM and matched")
    assert ran >= 110


def test_onnx_quant_conformance_through_tvm():
    for case in CASES:
        inputs, outputs = case.data_sets[0]
        model, runtime = _freeze_parameters(case.model, list(inputs))
        graph = from_onnx(model)
        for g, w in zip(run_llvm(graph, runtime), outputs):
            np.testing.assert_array_equal(g, w, err_msg=case.name)


def assert_nvcc_compiles(source: str, tmp_path) -> None:
    nvcc = shutil.which("nvcc") or "/usr/local/cuda/bin/nvcc"
    if not os.path.exists(nvcc):
        pytest.fail("nvcc is part of this machine's toolchain and should be present")
    (tmp_path / "k.cu").write_text(source)
    done = subprocess.run([nvcc, "-arch=sm_80", "-c", str(tmp_path / "k.cu"), "-o", str(tmp_path / "k.o")],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]


def test_cuda_build_generates_compilable_source(quantized_digits, tmp_path):
    result, x = quantized_digits
    for graph in (result.float_graph, result.graph):
        executable = build(graph, make_target("cuda", "sm_80"))
        source = cuda_source(executable)
        assert source.count("__global__") >= 3
        assert_nvcc_compiles(source, tmp_path)
        export(executable, tmp_path / "cuda_model.so")  # exports without a GPU
        assert (tmp_path / "cuda_model.so").stat().st_size > 0
        import tvm

        if tvm.cuda(0).exist:  # on a GPU machine, run it too
            got = TVMRunner(executable, tvm.cuda(0), 1)([x])[0]
            want = graph(x)[0]
            if want.dtype.kind == "f":
                assert rel_err(got, want) < 1e-4
            else:
                np.testing.assert_array_equal(got, want)


def test_export_and_load_in_a_fresh_process(quantized_digits, tmp_path):
    result, x = quantized_digits
    export(build(result.graph, LLVM), tmp_path / "model.so")
    np.save(tmp_path / "x.npy", x)
    script = textwrap.dedent(f"""
        import numpy as np, tvm
        from tvm import relax
        lib = tvm.runtime.load_module({str(tmp_path / "model.so")!r})
        vm = relax.VirtualMachine(lib, tvm.cpu())
        out = vm["main"](tvm.runtime.tensor(np.load({str(tmp_path / "x.npy")!r})))
        np.save({str(tmp_path / "y.npy")!r}, out.numpy())
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    np.testing.assert_array_equal(np.load(tmp_path / "y.npy"), result.graph(x)[0])


def test_requantize_with_runtime_parameters_is_bit_exact():
    """Multiplier, shift and zero point as graph inputs rather than constants."""
    from qcompiler.ir import Graph
    from qcompiler.ir.types import TensorType

    g = Graph("requantize")
    x = g.add_input("x", TensorType((2, 3, 50), "i32"))
    mult, shift = g.add_input("m", TensorType((3,), "i32")), g.add_input("s", TensorType((3,), "i32"))
    zp = g.add_input("z", TensorType((), "u8"))
    g.set_outputs([g.add_node("requantize", [x, mult, shift, zp], {"axis": 1, "input_zero_point": 5,
                                                                     "min": 0, "max": 255}).output])
    rng = np.random.default_rng(0)
    inputs = [rng.integers(-40000, 40000, (2, 3, 50)).astype(np.int32), np.full(3, 1 << 30, np.int32),
              np.array([38, 39, 40], np.int32), np.array(100, np.uint8)]
    check(g, inputs)


@pytest.mark.parametrize("op", ["softmax", "log_softmax"])
def test_softmax_with_masked_scores_matches(op):
    """Attention-style scores: a wide range, and positions masked with the float32 minimum
    (``exp`` of them must come out as 0, not as a NaN or a denormal that shifts the sum)."""
    from qcompiler.ir import Graph
    from qcompiler.ir.types import TensorType

    g = Graph(op)
    x = g.add_input("x", TensorType((2, 3, 5, 40), "f32"))
    g.set_outputs([g.add_node(op, [x], {"axis": -1}).output])
    scores = np.random.default_rng(0).standard_normal((2, 3, 5, 40)).astype(np.float32) * 30
    scores[..., 30:] = np.finfo(np.float32).min
    assert f"cpu_{op}" in {gv.name_hint for gv in to_relax(g, cpu_kernels=True).functions}  # 30 rows: pairs
    (got,), (want,) = run_llvm(g, [scores]), g(scores)
    if op == "softmax":
        assert rel_err(got, want) < 1e-5 and np.all(got[..., 30:] == 0)
    else:
        finite = want > -1e30
        assert rel_err(got[finite], want[finite]) < 1e-5


def test_fast_exp_is_accurate_to_float32_rounding():
    """The softmax kernel's ``exp`` over every argument it can get (``x - max <= 0``): within
    3e-7 relative of float64 ``exp`` while the result is a normal float32, 0 below that."""
    import tvm
    from tvm import te

    from qcompiler.targets.tvm.cpu_softmax import EXP_MIN, fast_exp

    x = te.placeholder((200000,), "float32", name="x")
    y = te.compute(x.shape, lambda i: fast_exp(x[i]), name="y")
    lib = tvm.compile(te.create_prim_func([x, y]), target=make_target("llvm"))
    args = np.concatenate([np.linspace(-100, 0, 199990), [0.0, -1e-30, -0.5, -87.0, -87.4, -1e30, -3.4e38, -88.0,
                                                           -20.0, -1e-8]]).astype(np.float32)
    out = tvm.runtime.tensor(np.zeros_like(args))
    lib(tvm.runtime.tensor(args), out)
    got, want = out.numpy().astype(np.float64), np.exp(args.astype(np.float64))
    normal = args >= EXP_MIN
    assert np.abs(got[normal] / want[normal] - 1).max() < 3e-7
    assert np.all(got[~normal] == 0)


def test_int8_kernel_modules_implement_the_protocol_and_requantizes_are_matched_up_front():
    """The lowering interface (targets/tvm/lowering.py): every int8 kernel module implements
    Int8Kernels, and the requantize a kernel may absorb is found by a pattern before lowering:
    an integer product read only by a requantize with constant parameters."""
    import qcompiler
    from qcompiler.targets.tvm.lowering import Int8Kernels, absorbable_requantizes
    from qcompiler.targets.tvm.relax_lower import INT8_KERNELS

    for name, module in INT8_KERNELS.items():
        assert isinstance(module, Int8Kernels), name
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 16), torch.nn.ReLU(),
                              torch.nn.Linear(16, 4)).eval()
    batches = [np.random.default_rng(i).standard_normal((4, 8)).astype(np.float32) for i in range(3)]
    graph = qcompiler.quantize(qcompiler.from_torch(mlp, (torch.randn(4, 8),)), batches).graph
    matched = absorbable_requantizes(graph)
    *inner, last = [n for n in graph.nodes if n.op == "linear_int"]
    products = inner
    assert len(products) == 2 and all(matched[id(n)].op == "requantize_f32" for n in products)
    assert all(matched[id(n)].inputs[0] is n.output for n in products)
    # the model's output: its accumulator is dequantized, not requantized
    assert id(last) not in matched and graph.users_of(last.output)[0].op == "dequantize"
    reader = graph.add_node("relu", [products[0].output])  # a second reader: the epilogue cannot take it
    graph.set_outputs(graph.outputs + [reader.output])
    assert id(products[0]) not in absorbable_requantizes(graph) and id(products[1]) in absorbable_requantizes(graph)


def test_a_wide_join_is_not_fused_with_its_operands_tails():
    """An unrolled recurrence concatenates every step's output: fused, all the steps' elementwise
    tails became one function whose scheduling grew quadratically with the sequence (minutes at
    24 steps). A join of more than WIDE_JOIN operands stays its own kernel; results unchanged."""
    from qcompiler.targets.tvm.build import WIDE_JOIN, lower

    steps = WIDE_JOIN + 2
    lines = [f"  %{i} = relu(%x{i}) : f32[1,4]" for i in range(steps)]
    text = ("func @main(" + ", ".join(f"%x{i}: f32[1,4]" for i in range(steps)) + ") -> f32[1,40] {\n"
            + "\n".join(lines) + "\n  %y = concat(" + ", ".join(f"%{i}" for i in range(steps))
            + ") {axis=1} : f32[1,40]\n  return %y\n}\n")
    graph = qcompiler.parse_graph(text)
    names = [gv.name_hint for gv in lower(graph, LLVM).functions]
    joins = [n for n in names if "concatenate" in n]
    assert joins and all(n.startswith("concatenate") for n in joins), names
    rng = np.random.default_rng(0)
    check(graph, [rng.standard_normal((1, 4)).astype(np.float32) for _ in range(steps)])


@pytest.mark.parametrize("op, bound", [("reduce_max", -np.inf), ("reduce_min", np.inf)])
def test_a_float_max_over_nothing_but_infinities_is_that_infinity(op, bound):
    """TOPI's max starts at the lowest finite float: a fully masked row gave -3.4e38, ONNX's
    masked-attention guard (row max == -inf) missed it, and the build returned NaN."""
    graph = qcompiler.parse_graph(f"func @main(%x: f32[3,4]) -> f32[3,1] {{\n"
                                  f"  %y = {op}(%x) {{axes=[1], keepdims=true}} : f32[3,1]\n  return %y\n}}\n")
    x = np.array([[1, 2, 3, 4], [bound] * 4, [bound, bound, 5, bound]], np.float32)
    np.testing.assert_array_equal(run_llvm(graph, [x])[0], graph(x)[0])
    assert graph(x)[0][1, 0] == bound


def test_hardswish_rounds_as_the_interpreter_does():
    """hardswish is x * clip(x / 6 + 0.5, 0, 1) in both, rounding for rounding: its result often
    feeds a quantize (MobileNetV3's and PP-OCR's blocks), where an ulp decides a level. Lowered as
    x * (1/6), 22 % of these values differed by an ulp and PP-OCRv4's recognizer flipped 8-bit
    levels between the llvm build and the interpreter."""
    from qcompiler.ir import Graph
    from qcompiler.ir.types import TensorType

    g = Graph("hardswish")
    x = g.add_input("x", TensorType((64, 4096), "f32"))
    g.set_outputs([g.add_node("hardswish", [x], {}).output])
    values = np.random.default_rng(0).uniform(-4, 4, (64, 4096)).astype(np.float32)
    values[0, :7] = [-3, 3, 0, -0.0, 2.9999998, -3.0000002, 6]  # the clip's corners
    np.testing.assert_array_equal(run_llvm(g, [values])[0], g(values)[0])


def test_a_chain_of_roundings_fused_into_one_kernel_builds_and_rounds_ties_to_even(tmp_path):
    """round, 32-bit quantize and rescale each read their operand once: rounding from floor and
    parity read it seven times, so a chain fused into one kernel grew 7^n-fold (the int8 quantize
    chain of GPT-2's GELU never finished building). Ties go to even, as in the interpreter, on
    CUDA too."""
    from qcompiler.ir import Graph
    from qcompiler.ir.types import TensorType

    g = Graph("roundings")
    x = g.add_input("x", TensorType((4, 64), "f32"))
    y = x
    for i in range(6):
        scaled = g.add_node("mul", [y, g.add_constant("half", np.array(0.5 + 0.25 * i, np.float32))], {}).output
        y = g.add_node("round", [scaled], {}).output
    q = g.add_node("quantize", [y, g.add_constant("s", np.array(0.5, np.float32)),
                                g.add_constant("z", np.array(3, np.int32))], {"axis": 1}).output
    r = g.add_node("rescale", [q, g.add_constant("m", np.array(0.5, np.float32)),
                               g.add_constant("zr", np.array(-1, np.int8))], {"axis": 1}).output
    g.set_outputs([y, q, r])
    values = np.random.default_rng(0).uniform(-300, 300, (4, 64)).astype(np.float32)
    values[0, :8] = [0.5, 1.5, 2.5, -0.5, -2.5, 1e9, -1e9, 0.0]
    got, want = run_llvm(g, [values]), g(values)
    for a, b in zip(got, want):
        np.testing.assert_array_equal(a, b)
    ties = np.tile(np.array([0.5, 1.5, 2.5, -2.5], np.float32), (4, 16))
    plain = Graph("round")
    v = plain.add_input("x", TensorType((4, 64), "f32"))
    plain.set_outputs([plain.add_node("round", [v], {}).output])
    np.testing.assert_array_equal(run_llvm(plain, [ties])[0][0, :4], [0, 2, 2, -2])
    source = cuda_source(build(g, make_target("cuda", "sm_80")))  # nearbyint, not round (ties away)
    assert "nearbyint" in source and "round(" not in source
    assert_nvcc_compiles(source, tmp_path)


@pytest.mark.parametrize("rounding", ["truncate", "half_even"])
def test_bilinear_resize_of_integers_truncates_or_rounds_like_the_interpreter(rounding):
    """An imported model's integer Resize truncates (as the ONNX reference); lower-integer's
    resize of quantized values rounds half to even (x2 upsampling makes exact .5 ties)."""
    g = Graph()
    x = g.add_input("x", TensorType((1, 2, 5, 7), "u8"))
    g.set_outputs([g.add_node("resize_linear", [x], {"size": [10, 14], "rounding": rounding}).output])
    image = np.random.default_rng(0).integers(0, 256, (1, 2, 5, 7)).astype(np.uint8)
    real = Graph()
    xf = real.add_input("x", TensorType((1, 2, 5, 7), "f64"))
    real.set_outputs([real.add_node("resize_linear", [xf], {"size": [10, 14]}).output])
    exact = real(image.astype(np.float64))[0]
    want = np.rint(exact) if rounding == "half_even" else np.trunc(exact)
    assert np.any(exact % 1 == 0.5)  # ties, where the two roundings differ from rounding half up
    np.testing.assert_array_equal(g(image)[0], want.astype(np.uint8))
    check(g, [image])
