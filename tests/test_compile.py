"""compile -> save -> load in a fresh process -> same outputs; broken artifacts fail clearly;
the build gate passes and fails on the right side of its threshold; same inputs, same artifact."""
from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

import qcompiler
from qcompiler import ModelLoadError, QCompilerError
from qcompiler.examples import zoo
from tests.conftest import cli_in_process, export_onnx

ROOT = Path(__file__).resolve().parents[1]


def _cli(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "qcompiler", *args], capture_output=True, text=True, cwd=cwd)


@pytest.fixture(scope="module")
def digits_files(digits, tmp_path_factory):
    model, (x_train, _, x_test, y_test) = digits
    tmp = tmp_path_factory.mktemp("digits")
    onnx_path = export_onnx(model, (torch.from_numpy(x_test[:40]),), tmp / "digits.onnx", ["image"])
    np.savez(tmp / "cal.npz", image=x_train[:320])
    np.savez(tmp / "eval.npz", image=x_test[:360], labels=y_test[:360])
    return tmp, onnx_path


def test_compile_save_load_in_a_fresh_process(digits, tmp_path):
    model, (x_train, _, x_test, y_test) = digits
    calibration = [x_train[i:i + 40] for i in range(0, 320, 40)]
    compiled = qcompiler.compile(model, (torch.from_numpy(x_test[:40]),), calibration=calibration)
    outputs = compiled(x_test[:40])
    assert np.array_equal(compiled(torch.from_numpy(x_test[:40])), outputs)  # torch tensors too
    report = compiled.report()
    assert report["quantized"] and report["ops"]["integer"] >= 6 and report["kept_float"] == []
    assert report["size_bytes"]["compiled"] < report["size_bytes"]["float"] / 3
    assert report["fidelity"]["output_cosine"] > 0.999
    assert compiled.pipeline.endswith("insert-qdq,lower-integer")
    compiled.save(tmp_path / "artifact")
    manifest = json.loads((tmp_path / "artifact" / "manifest.json").read_text())
    assert manifest["inputs"] == [{"name": "x", "shape": [40, 1, 8, 8], "dtype": "f32"}]
    assert manifest["pipeline"] == compiled.pipeline and manifest["quant_config"]["activation_dtype"] == "u8"
    assert set(manifest["files"]) == {"graph.qir", "graph.npz", "model.so", "report.json"}
    assert any(p["dtype"] == "u8" for p in manifest["quantization_parameters"].values())
    assert set(manifest["versions"]) >= {"qcompiler", "tvm", "torch", "onnx"}
    np.save(tmp_path / "x.npy", x_test[:40])
    script = textwrap.dedent(f"""
        import numpy as np, qcompiler
        model = qcompiler.load({str(tmp_path / "artifact")!r})
        np.save({str(tmp_path / "y.npy")!r}, model(np.load({str(tmp_path / "x.npy")!r})))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    np.testing.assert_array_equal(np.load(tmp_path / "y.npy"), outputs)


def test_reference_and_float_builds_are_reported(digits):
    model, (_, _, x_test, _) = digits
    example = (torch.from_numpy(x_test[:8]),)
    float_build = qcompiler.compile(model, example, target="reference")
    assert not float_build.report()["quantized"] and "no calibration data" in float_build.report()["note"]
    with torch.no_grad():
        assert np.abs(float_build(x_test[:8]) - model(example[0]).numpy()).max() < 1e-4
    with pytest.raises(QCompilerError, match="needs example_inputs"):
        qcompiler.compile(model)
    with pytest.raises(QCompilerError, match="unknown target 'tpu'"):
        qcompiler.compile(model, example, target="tpu")


def test_a_given_pipeline_with_calibration_is_the_build(digits):
    """compile(pipeline=..., calibration=...) runs that pipeline on the data and nothing else: here
    quantize/dequantize pairs without integer lowering, as the pipeline says."""
    model, (x_train, _, x_test, _) = digits
    pipeline = "canonicalize,fold-batchnorm,fuse-activations,range-analysis{method=minmax},insert-qdq"
    compiled = qcompiler.compile(model, (torch.from_numpy(x_test[:40]),), calibration=[x_train[:40]],
                                 pipeline=pipeline, target="reference")
    assert compiled.pipeline == pipeline and compiled.report()["pipeline"] == pipeline
    ops = compiled.graph.op_counts()
    assert ops.get("quantize", 0) > 0 and not any(op.endswith("_int") for op in ops)


def test_broken_artifacts_fail_clearly(digits_files, tmp_path):
    tmp, onnx_path = digits_files
    art = tmp_path / "art"
    done = cli_in_process("compile", onnx_path, "--calibration", str(tmp / "cal.npz"), "-o", str(art), "--target", "reference")
    assert done.returncode == 0, done.stderr
    ok = cli_in_process("run", str(art), "--inputs", str(tmp / "eval.npz"), "-o", str(tmp_path / "out.npz"))
    assert ok.returncode == 0, ok.stderr
    with np.load(tmp_path / "out.npz") as out:
        assert [a.shape for a in out.values()] == [(9, 40, 10)]  # 360 images in batches of 40
    (art / "manifest.json").write_text("{ not json")
    bad = cli_in_process("run", str(art), "--inputs", str(tmp / "eval.npz"))
    assert bad.returncode == 2 and "corrupt manifest" in bad.stderr and "Traceback" not in bad.stderr
    llvm_art = tmp_path / "llvm_art"
    assert cli_in_process("compile", onnx_path, "--calibration", str(tmp / "cal.npz"), "-o", str(llvm_art)).returncode == 0
    (llvm_art / "model.so").unlink()
    bad = cli_in_process("run", str(llvm_art), "--inputs", str(tmp / "eval.npz"))
    assert bad.returncode == 2 and "model.so: missing from the artifact" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1
    with pytest.raises(ModelLoadError, match="not a qcompiler artifact"):
        qcompiler.load(tmp_path)


def test_gate_passes_and_fails_on_the_right_side(digits_files, tmp_path):
    tmp, onnx_path = digits_files
    base = ["compile", onnx_path, "--calibration", str(tmp / "cal.npz"), "--eval", str(tmp / "eval.npz"), "--json"]
    first = cli_in_process(*base, "-o", str(tmp_path / "a"))
    assert first.returncode == 0, first.stderr
    sqnr = json.loads(first.stdout)["eval_output_sqnr_db"]
    passing = cli_in_process(*base, "--min-sqnr", str(sqnr - 0.5), "--max-accuracy-drop", "0.5", "-o", str(tmp_path / "b"))
    assert passing.returncode == 0, passing.stderr
    report = json.loads(passing.stdout)
    assert report["gate"]["sqnr"]["passed"] and report["gate"]["accuracy"]["passed"]
    failing = cli_in_process(*base, "--min-sqnr", str(sqnr + 0.5), "-o", str(tmp_path / "c"))
    assert failing.returncode == 3 and "gate failed: sqnr" in failing.stderr
    gate = json.loads(failing.stdout)["gate"]["sqnr"]
    assert not gate["passed"] and gate["margin_db"] == pytest.approx(-0.5, abs=1e-3)
    assert not (tmp_path / "c").exists()  # a failed gate leaves no artifact for make to take as built


def test_same_inputs_give_the_same_artifact(digits_files, tmp_path):
    tmp, onnx_path = digits_files
    for name in ("one", "two"):
        assert _cli("compile", onnx_path, "--calibration", str(tmp / "cal.npz"), "-o", str(tmp_path / name)).returncode == 0
    one, two = ((tmp_path / n / "manifest.json").read_text() for n in ("one", "two"))
    assert one == two
    outs = [cli_in_process("run", str(tmp_path / n), "--inputs", str(tmp / "eval.npz"), "-o", str(tmp_path / f"{n}.npz"))
            for n in ("one", "two")]
    assert all(o.returncode == 0 for o in outs)
    a, b = np.load(tmp_path / "one.npz"), np.load(tmp_path / "two.npz")
    assert all(np.array_equal(a[k], b[k]) for k in a.files)


def test_failed_save_keeps_the_good_artifact(digits, tmp_path, monkeypatch):
    model, (x_train, _, x_test, _) = digits
    compiled = qcompiler.compile(model, (torch.from_numpy(x_test[:8]),), calibration=[x_train[:8]])
    compiled.save(tmp_path / "art")
    before = {p.name: p.read_bytes() for p in (tmp_path / "art").iterdir()}

    def broken_export(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("qcompiler.targets.tvm.export", broken_export)
    with pytest.raises(OSError, match="disk full"):
        compiled.save(tmp_path / "art")
    assert {p.name: p.read_bytes() for p in (tmp_path / "art").iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["art"]  # no staging folder left behind
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("precious")
    monkeypatch.undo()
    with pytest.raises(QCompilerError, match="not a qcompiler artifact; refusing to replace it"):
        compiled.save(tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "precious"


def test_show_colours_nodes_by_compare_errors(digits_files, tmp_path):
    tmp, onnx_path = digits_files
    compared = _cli("compare", onnx_path, "--calibration", str(tmp / "cal.npz"), "--json")
    assert compared.returncode == 0, compared.stderr
    (tmp_path / "layers.json").write_text(compared.stdout)
    done = _cli("show", onnx_path, "--compare", str(tmp_path / "layers.json"), "-o", str(tmp_path / "g.html"))
    assert done.returncode == 0, done.stderr
    page = (tmp_path / "g.html").read_text()
    assert page.startswith("<!DOCTYPE html>") and "<svg" in page and "conv2d" in page
    assert re.search(r'fill="rgb\(\d+,\d+,90\)"', page) and "SQNR" in page


def test_demo_prints_the_comparison_table():
    done = subprocess.run([sys.executable, "-m", "qcompiler.examples.demo"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    for row in ("PyTorch fp32", "qcompiler int8", "ONNX Runtime int8"):
        assert row in done.stdout
    assert re.search(r"qcompiler int8.*\d+\.\d+%.*KiB.*ms", done.stdout)
    assert re.search(r"int8 kernels\s+for\s+this\s+CPU:\s+(amx|vnni|avx2|none)", done.stdout)  # rich may wrap lines


def test_onnx_target_exports_a_qdq_model_onnxruntime_runs(digits, tmp_path):
    import onnx

    model, (x_train, _, x_test, y_test) = digits
    calibration = [x_train[i:i + 40] for i in range(0, 320, 40)]
    compiled = qcompiler.compile(model, (torch.from_numpy(x_test[:40]),), calibration=calibration, target="onnx")
    assert compiled.report()["quantized"]
    compiled.save(tmp_path / "onnx_art")
    exported = onnx.load(str(tmp_path / "onnx_art" / "model.onnx"))
    ops = {n.op_type for n in exported.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Conv", "Gemm"} <= ops
    loaded = qcompiler.load(tmp_path / "onnx_art")
    qdq = compiled.graph(x_test[:40])[0]  # the float simulation of the same decisions
    got = loaded(x_test[:40])
    # ONNX Runtime's integer kernels round where the float simulation does not: within a few steps of the
    # last layer's input (its result, the model's output, is not quantized)
    out = compiled.graph.outputs[0].producer
    assert out.op == "linear" and out.inputs[0].producer.op == "dequantize"
    step = float(compiled.graph.constant_array(out.inputs[0].producer.inputs[1]))
    weights = np.abs(compiled.graph.constant_array(out.inputs[1].producer.inputs[0]).astype(np.float64)
                     * compiled.graph.constant_array(out.inputs[1].producer.inputs[1])[:, None]).sum(1).max()
    assert np.abs(got - qdq).max() <= 3 * step * weights
    assert zoo.accuracy(got, y_test[:40]) >= zoo.accuracy(qdq, y_test[:40]) - 0.05


def test_onnx_export_of_float_models_matches_the_interpreter(minilm):
    import onnxruntime as ort

    from qcompiler.pass_manager import run_pipeline
    from qcompiler.passes import DEFAULT_FLOAT_PIPELINE
    from qcompiler.targets.onnx import to_onnx
    from tests.conftest import rel_err

    encoder, ids, mask = minilm
    models = [(qcompiler.from_torch(encoder, (ids[:2], mask[:2])), [ids[:2].numpy(), mask[:2].numpy()])]
    resnet = zoo.resnet18()
    x = zoo.photo_crops(1, seed=3)[0]
    models.append((qcompiler.from_torch(resnet, (torch.from_numpy(x),)), [x]))
    for graph, inputs in models:
        run_pipeline(graph, DEFAULT_FLOAT_PIPELINE)
        session = ort.InferenceSession(to_onnx(graph).SerializeToString(), providers=["CPUExecutionProvider"])
        got = session.run(None, {v.name: a for v, a in zip(graph.inputs, inputs)})[0]
        assert rel_err(got, graph(*inputs)[0]) < 1e-4


def test_cuda_target_builds_and_saves_without_a_gpu(digits, tmp_path):
    import tvm

    model, (x_train, _, x_test, _) = digits
    compiled = qcompiler.compile(model, (torch.from_numpy(x_test[:8]),), calibration=[x_train[:8]], target="cuda")
    compiled.save(tmp_path / "cuda_art")
    manifest = json.loads((tmp_path / "cuda_art" / "manifest.json").read_text())
    assert manifest["target"] == "cuda" and "model.so" in manifest["files"]
    if tvm.cuda(0).exist:
        assert compiled(x_test[:8]).shape == (8, 10)
    else:
        assert "fidelity" not in compiled.report()  # nothing ran, so nothing is claimed
        with pytest.raises(QCompilerError, match="no device for target 'cuda'"):
            compiled(x_test[:8])


def test_builds_for_another_cpu(digits, tmp_path, monkeypatch):
    """``cpu=``: the kernels that CPU has (AMX only where it has it); the build runs here when this
    machine has every instruction it uses, and otherwise is built, saved and reported, not run."""
    import importlib

    from qcompiler.targets.tvm import make_target
    from qcompiler.targets.tvm.build import missing_cpu_features

    model, (x_train, _, x_test, _) = digits
    example, calibration = (torch.from_numpy(x_test[:8]),), [x_train[:8]]
    compiled = qcompiler.compile(model, example, calibration=calibration, cpu="icelake-server")
    report = compiled.report()
    assert '"mcpu":"icelake-server"' in report["target_spec"] and report["int8_kernels"]["kernels"] == "vnni-vbmi"
    if compiled.runs_here:  # any AVX-512 VNNI machine
        np.testing.assert_array_equal(compiled(x_test[:8]), compiled.graph(x_test[:8])[0])
    with pytest.raises(QCompilerError, match="unknown CPU 'pentium9'"):
        qcompiler.compile(model, example, calibration=calibration, cpu="pentium9")
    with pytest.raises(QCompilerError, match="cpu applies to the llvm target"):
        qcompiler.compile(model, example, calibration=calibration, target="reference", cpu="znver4")

    build_module = importlib.import_module("qcompiler.targets.tvm.build")  # the package exports its build()
    monkeypatch.setattr(build_module, "make_target", lambda kind, arch=None: make_target(kind, arch or "x86-64"))
    elsewhere = qcompiler.compile(model, example, calibration=calibration, cpu="icelake-server")
    assert not elsewhere.runs_here and "fidelity" not in elsewhere.report()
    assert "avx512vnni" in elsewhere.report()["note_runs_elsewhere"]
    assert "avx512vnni" in missing_cpu_features(elsewhere.report()["target_spec"])
    with pytest.raises(QCompilerError, match="this machine cannot run the build: built for a CPU with avx2"):
        elsewhere(x_test[:8])
    elsewhere.save(tmp_path / "for_icelake")
    assert (tmp_path / "for_icelake" / "model.so").exists()


def test_cli_builds_for_a_named_cpu(digits_files, tmp_path):
    tmp, onnx_path = digits_files
    base = ["compile", onnx_path, "--calibration", str(tmp / "cal.npz"), "--json"]
    built = cli_in_process(*base, "--cpu", "icelake-server", "-o", str(tmp_path / "a"))
    assert built.returncode == 0, built.stderr
    assert json.loads(built.stdout)["int8_kernels"]["kernels"] == "vnni-vbmi"
    bad = cli_in_process(*base, "--cpu", "pentium9", "-o", str(tmp_path / "b"))
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0 and "unknown CPU 'pentium9'" in bad.stderr
    assert not (tmp_path / "b").exists()


def test_cli_build_for_a_cpu_this_machine_lacks(digits_files, tmp_path, monkeypatch, capsys):
    """In-process, with this machine made to look like baseline x86-64: the build is saved and
    the table says it does not run here; a gate, which would have to run it, is a clear error."""
    import importlib

    from qcompiler.cli import main
    from qcompiler.targets.tvm import make_target

    build_module = importlib.import_module("qcompiler.targets.tvm.build")
    monkeypatch.setattr(build_module, "make_target", lambda kind, arch=None: make_target(kind, arch or "x86-64"))
    tmp, onnx_path = digits_files
    base = ["compile", onnx_path, "--calibration", str(tmp / "cal.npz"), "--cpu", "icelake-server"]
    assert main([*base, "-o", str(tmp_path / "a")]) == 0
    assert "not here" in capsys.readouterr().err and (tmp_path / "a" / "model.so").exists()
    assert main([*base, "--min-sqnr", "20", "-o", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err
    assert "the gates run the build, and this machine cannot" in err and not (tmp_path / "b").exists()
