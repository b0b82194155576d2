"""Issue 13's defects, each a test that failed before its fix: threads, out-of-range indices,
artifacts that replace a user's folder or run a swapped library, calibration held in memory,
renamed outputs, untyped configs, NaN through integer arithmetic, silent progress."""
from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import textwrap
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch

import qcompiler
from qcompiler import InputError, ModelLoadError, QCompilerError, QuantConfig, parse_graph
from qcompiler.artifact import artifact_digest

# ---- 1. threads -------------------------------------------------------------------------------------
THREADS_SCRIPT = textwrap.dedent("""
    import sys, threading
    import numpy as np, torch, qcompiler
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(),
                            torch.nn.Linear(8 * 12 * 12, 10)).eval()
    compiled = qcompiler.compile(m, (torch.randn(1, 3, 12, 12),),
                                 calibration=[torch.randn(1, 3, 12, 12) for _ in range(4)], target="llvm")
    compiled.save(sys.argv[1])
    rng = np.random.default_rng(0)
    inputs = [rng.standard_normal((1, 3, 12, 12)).astype(np.float32) for _ in range(16)]
    for model in (compiled, qcompiler.load(sys.argv[1])):
        want = [model(a) for a in inputs]
        problems = []
        def work(t):
            try:
                for i in range(150):
                    k = (i + t) % len(inputs)
                    if not np.array_equal(model(inputs[k]), want[k]):
                        problems.append("mismatch")
            except Exception as e:
                problems.append(repr(e)[:200])
        threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
        [t.start() for t in threads]
        [t.join() for t in threads]
        assert not problems, problems[:3]
    print("threads ok")
""")


@pytest.mark.slow
def test_one_model_called_from_eight_threads_is_bit_exact(tmp_path):
    """In a subprocess: a crash (SIGSEGV in the shared VM, as before) fails the test, not pytest."""
    done = subprocess.run([sys.executable, "-c", THREADS_SCRIPT, str(tmp_path / "art")], capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0 and "threads ok" in done.stdout, (done.returncode, done.stderr[-2000:])


# ---- 2. out-of-range indices --------------------------------------------------------------------------
INDEX_GRAPHS = {  # a 50-row table read at run-time indices
    "gather": """
        func @main(%ids: i64[2,3]) -> f32[2,3,4] {
          const @table : f32[50,4]
          %y = gather(@table, %ids) {axis=0} : f32[2,3,4]
          return %y
        }""",
    "gather_elements": """
        func @main(%ids: i64[5,2]) -> f32[5,2] {
          const @table : f32[50,2]
          %y = gather_elements(@table, %ids) {axis=0} : f32[5,2]
          return %y
        }""",
    "index": """
        func @main(%ids: i64[3]) -> f32[3,4] {
          const @table : f32[50,4]
          %y = index(@table, %ids) : f32[3,4]
          return %y
        }""",
}


def _index_graph(op: str) -> qcompiler.Graph:
    columns = 2 if op == "gather_elements" else 4
    table = np.arange(50 * columns, dtype=np.float32).reshape(50, columns)
    return parse_graph(textwrap.dedent(INDEX_GRAPHS[op]).strip(), {"table": table})


@pytest.fixture(scope="module")
def index_models():
    return {(op, target): qcompiler.compile(_index_graph(op), target=target)
            for op in INDEX_GRAPHS for target in ("reference", "llvm", "onnx")}


@pytest.mark.parametrize("target", ["reference", "llvm", "onnx"])
@pytest.mark.parametrize("op", list(INDEX_GRAPHS))
def test_index_out_of_range_is_an_input_error_on_every_target(index_models, op, target):
    model = index_models[op, target]
    shape = model.graph.inputs[0].shape
    rng = np.random.default_rng(1)
    good = rng.integers(-50, 50, size=shape)  # negative indices count from the end
    want = _index_graph(op)(good)[0]
    np.testing.assert_array_equal(model(good), want)
    for bad in (50, 60, 10 ** 6, -51):
        ids = good.copy()
        ids.flat[1] = bad
        with pytest.raises(InputError, match="(?i)out of (range|data bounds)|invalid index"):
            model(ids)


def test_run_cli_exits_2_on_a_token_id_past_the_vocabulary(index_models, tmp_path):
    index_models["gather", "llvm"].save(tmp_path / "art")
    np.savez(tmp_path / "ids.npz", ids=np.array([[1, 2, 3], [4, 60, 5]]))
    done = subprocess.run([sys.executable, "-m", "qcompiler", "run", str(tmp_path / "art"), "--inputs",
                           str(tmp_path / "ids.npz")], capture_output=True, text=True)
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("\n") == 1 and "index out of range for axis of size 50" in done.stderr


# ---- 3, 4, 8. artifacts on disk ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def small_llvm_model():
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3)).eval()
    x = torch.randn(2, 6)
    compiled = qcompiler.compile(m, (x,), calibration=[torch.randn(2, 6) for _ in range(4)], target="llvm")
    return compiled, x.numpy()


def test_save_never_replaces_a_folder_that_is_not_an_artifact(small_llvm_model, tmp_path):
    compiled, _ = small_llvm_model
    webapp = tmp_path / "site"
    webapp.mkdir()
    (webapp / "manifest.json").write_text('{"name": "my web app"}')
    (webapp / "index.html").write_text("<html>")
    with pytest.raises(QCompilerError, match="not a qcompiler manifest"):
        compiled.save(webapp)
    assert sorted(p.name for p in webapp.iterdir()) == ["index.html", "manifest.json"]
    compiled.save(tmp_path / "art")  # an artifact is replaced; one holding a file it does not list is not
    compiled.save(tmp_path / "art")
    (tmp_path / "art" / "notes.txt").write_text("mine")
    with pytest.raises(QCompilerError, match="does not list"):
        compiled.save(tmp_path / "art")
    assert (tmp_path / "art" / "notes.txt").read_text() == "mine"
    with pytest.raises(QCompilerError, match="name a new folder"):
        compiled.save(Path("."))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art", "site"]  # no staging left behind


def test_stale_staging_from_a_killed_save_is_removed_and_replacement_is_atomic(small_llvm_model, tmp_path):
    compiled, x = small_llvm_model
    compiled.save(tmp_path / "art")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".art.qcompiler-staging-{dead.stdout.strip()}-abc123"
    stale.mkdir()
    (stale / "graph.qir").write_text("half")
    unrelated = tmp_path / ".art.mine"
    unrelated.mkdir()
    compiled.save(tmp_path / "art")
    assert not stale.exists() and unrelated.exists()
    np.testing.assert_array_equal(qcompiler.load(tmp_path / "art")(x), compiled(x))


def test_artifacts_follow_the_umask_and_a_loaded_model_saves_again(small_llvm_model, tmp_path):
    compiled, x = small_llvm_model
    old = os.umask(0o022)
    try:
        compiled.save(tmp_path / "art")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "art").stat().st_mode) == 0o755
    for path in (tmp_path / "art").iterdir():
        assert stat.S_IMODE(path.stat().st_mode) & 0o044 == 0o044, path  # others can read (and load) it
    loaded = qcompiler.load(tmp_path / "art")
    loaded.save(tmp_path / "again")
    for path in (tmp_path / "art").iterdir():
        assert (tmp_path / "again" / path.name).read_bytes() == path.read_bytes(), path.name
    assert loaded.digest == artifact_digest(tmp_path / "again") == compiled.digest
    np.testing.assert_array_equal(qcompiler.load(tmp_path / "again")(x), compiled(x))


def test_a_pinned_digest_refuses_a_swapped_library_before_loading_it(small_llvm_model, tmp_path):
    import hashlib
    import json

    compiled, x = small_llvm_model
    compiled.save(tmp_path / "art")
    digest = compiled.digest
    assert digest == artifact_digest(tmp_path / "art") and digest.startswith("sha256:")
    np.testing.assert_array_equal(qcompiler.load(tmp_path / "art", expect_digest=digest)(x), compiled(x))
    # an attacker swaps the library and rewrites its checksum: integrity holds, the pin does not
    library = tmp_path / "art" / "model.so"
    library.write_bytes(library.read_bytes() + b"\0")
    manifest = json.loads((tmp_path / "art" / "manifest.json").read_text())
    manifest["files"]["model.so"] = hashlib.sha256(library.read_bytes()).hexdigest()
    (tmp_path / "art" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ModelLoadError, match="not the artifact you pinned"):
        qcompiler.load(tmp_path / "art", expect_digest=digest)


def test_quantized_builds_keep_the_model_output_names(tmp_path):
    from tests.conftest import export_onnx

    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(),
                            torch.nn.Linear(4 * 6 * 6, 5)).eval()
    path = export_onnx(m, (torch.randn(1, 3, 8, 8),), tmp_path / "m.onnx", ["x"])
    graph = qcompiler.from_onnx(path)
    names = [v.name for v in graph.outputs]
    calibration = [np.random.default_rng(i).standard_normal((1, 3, 8, 8)).astype(np.float32) for i in range(3)]
    for target in ("reference", "llvm"):
        compiled = qcompiler.compile(path, calibration=calibration, target=target)
        assert compiled.report()["quantized"]
        assert [v.name for v in compiled.graph.outputs] == names
        compiled.save(tmp_path / target)
        manifest = (tmp_path / target / "manifest.json").read_text()
        assert f'"name": "{names[0]}"' in manifest


# ---- 6. calibration as a stream ----------------------------------------------------------------------
def _conv_graph():
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(),
                            torch.nn.Linear(8 * 32 * 32, 10)).eval()
    return qcompiler.from_torch(m, (torch.randn(1, 3, 32, 32),))


def _batches(n):
    rng = np.random.default_rng(0)
    for _ in range(n):
        yield rng.standard_normal((1, 3, 32, 32)).astype(np.float32)


def test_calibration_memory_does_not_grow_with_the_number_of_batches():
    graph = _conv_graph()
    config = QuantConfig(calibration=qcompiler.CalibrationConfig(method="percentile"))  # two sweeps + bias correction
    peaks = {}
    for n in (10, 400):  # 400 batches of 12 KB: 4.8 MB if they were all held
        tracemalloc.start()
        result = qcompiler.quantize(graph, _batches(n), config)
        peaks[n] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert result.report["calibration"]["batches"] == n
    assert peaks[400] < peaks[10] + 2_000_000, peaks


def test_generators_callables_and_lists_calibrate_identically():
    graph = _conv_graph()
    as_list = qcompiler.quantize(graph, list(_batches(6)))
    for data in (_batches(6), lambda: _batches(6)):
        other = qcompiler.quantize(graph, data)
        assert qcompiler.print_graph(other.graph) == qcompiler.print_graph(as_list.graph)
    with pytest.raises(QCompilerError, match="calibration data is empty"):
        qcompiler.quantize(graph, iter([]))
    with pytest.raises(QCompilerError, match="calibration batch 2, input %.*: contains NaN"):
        qcompiler.quantize(graph, ([np.full((1, 3, 32, 32), np.nan if i == 2 else 0.5, np.float32)]
                                   for i in range(4)))


# ---- 8. smaller defects ------------------------------------------------------------------------------
@pytest.mark.parametrize("data, message", [
    ({"per_channel": "no"}, "per_channel must be true or false"),
    ({"max_abs_range": float("nan")}, "max_abs_range must be a finite number"),
    ({"bias_correction": 1}, "bias_correction must be true or false"),
    ({"min_layer_sqnr_db": "20"}, "min_layer_sqnr_db must be a finite number or null"),
    ({"smooth_quant": "auto"}, "smooth_quant must be true, false or null"),
    ({"exclude": [3]}, "exclude must be a list of strings"),
    ({"calibration": {"bins": 2048.5}}, "bins must be an integer"),
])
def test_quant_config_values_are_type_checked(data, message):
    with pytest.raises(QCompilerError, match=message):
        QuantConfig.from_dict(data)


def test_smooth_quants_auto_is_null_in_json():
    assert QuantConfig.from_dict({"smooth_quant": None}).smooth_quant is None
    assert QuantConfig.from_dict(json.loads(QuantConfig(smooth_quant=True).to_json())).smooth_quant is True


def test_nan_or_inf_input_to_a_quantized_build_is_refused(small_llvm_model):
    compiled, x = small_llvm_model
    for bad in (np.nan, np.inf):
        y = x.copy()
        y[0, 2] = bad
        with pytest.raises(InputError, match="NaN|inf"):
            compiled(y)
    assert np.isfinite(compiled(x)).all()


def test_huge_constants_are_refused_before_they_are_materialized(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    shape = helper.make_tensor("shape", TensorProto.INT64, [2], [1 << 20, 1 << 20])
    node = helper.make_node("ConstantOfShape", ["shape"], ["big"], name="bomb",
                            value=helper.make_tensor("v", TensorProto.FLOAT, [1], [0.0]))
    add = helper.make_node("Add", ["x", "big"], ["y"])
    graph = helper.make_graph([node, add], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["a", "b"])], initializer=[shape])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "bomb.onnx")
    with pytest.raises(QCompilerError, match="ConstantOfShape node 'bomb'.*larger than"):
        qcompiler.from_onnx(tmp_path / "bomb.onnx")
    # an .npz beside IR text: the header's shape is checked against the text before decompressing
    (tmp_path / "g.qir").write_text("func @main(%x: f32[4]) -> f32[4] {\n  const @w : f32[4]\n"
                                    "  %y = add(%x, @w) : f32[4]\n  return %y\n}\n")
    np.savez_compressed(tmp_path / "g.npz", w=np.zeros((4096, 4096), np.float32))
    with pytest.raises(QCompilerError, match=r"constant @w: data is f32\[4096,4096\], text says f32\[4\]"):
        qcompiler.load_graph(tmp_path / "g.qir")


def test_a_model_path_with_a_colon_never_imports_code(tmp_path):
    (tmp_path / "model.py").write_text("open('imported', 'w').write('yes')\n")
    done = subprocess.run([sys.executable, "-m", "qcompiler", "import", "model.onnx:v2"], cwd=tmp_path,
                          capture_output=True, text=True)
    assert done.returncode == 2 and "model.onnx:v2: no such file" in done.stderr
    assert not (tmp_path / "imported").exists()


# ---- 9. progress when stderr is a log ----------------------------------------------------------------
def test_compile_prints_one_line_per_phase_to_a_log_and_nothing_with_quiet(tmp_path):
    from tests.conftest import export_onnx

    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3)).eval()
    path = export_onnx(m, (torch.randn(2, 6),), tmp_path / "m.onnx", ["x"])
    np.savez(tmp_path / "cal.npz", x=np.random.default_rng(0).standard_normal((4, 2, 6)).astype(np.float32))
    base = [sys.executable, "-m", "qcompiler", "compile", path, "--calibration", str(tmp_path / "cal.npz"),
            "--target", "reference"]
    done = subprocess.run(base + ["-o", str(tmp_path / "a")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    phases = [line.split("] ")[1].split(":")[0] for line in done.stderr.splitlines()
              if line.startswith("qcompiler: [")]
    assert phases == ["capture", "optimize", "calibrate", "quantize", "build", "check", "done"], done.stderr
    assert "digest: sha256:" in done.stderr
    quiet = subprocess.run(base + ["-o", str(tmp_path / "b"), "--quiet", "--json"], capture_output=True, text=True)
    assert quiet.returncode == 0 and "qcompiler: [" not in quiet.stderr
    assert '"digest": "sha256:' in quiet.stdout


def test_cuda_builds_clamp_indices_on_the_device_and_check_inputs_on_the_host():
    """Built here without a GPU: the gather reads clamped indices, and a bad id is refused before
    the (here unavailable) device is asked to run anything."""
    from qcompiler.targets.tvm import cuda_source

    model = qcompiler.compile(_index_graph("gather"), target="cuda")
    source = cuda_source(model._executable)
    assert "take_kernel" in source and ("min(" in source or "max(" in source)
    with pytest.raises(InputError, match=r"gather \(%y\): index 60 out of range for axis of size 50"):
        model(np.array([[1, 2, 3], [4, 60, 5]]))
    if not model.runs_here:
        with pytest.raises(QCompilerError, match="no device"):
            model(np.array([[1, 2, 3], [4, -50, 5]]))
