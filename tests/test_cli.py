"""The CLI: errors are one line with a non-zero exit; output files never replace the input."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from qcompiler import load_graph
from qcompiler.pipeline import Pass, register
from qcompiler.examples import zoo
from tests.conftest import cli_in_process as _main, export_onnx


def _run(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "qcompiler", *args], capture_output=True, text=True, cwd=cwd)


def test_import_onnx_writes_reloadable_ir(tmp_path):
    model = zoo.DigitsCNN().eval()
    x = torch.randn(2, 1, 8, 8)
    path = export_onnx(model, (x,), tmp_path / "d.onnx", ["image"])
    result = _run("import", path, "-o", str(tmp_path / "d.qir"))
    assert result.returncode == 0, result.stderr
    graph = load_graph(tmp_path / "d.qir")
    with torch.no_grad():
        want = model(x).numpy()
    assert abs(graph(x.numpy())[0] - want).max() < 1e-4 * abs(want).max()
    stats = _run("stats", str(tmp_path / "d.qir"))
    assert stats.returncode == 0 and "conv2d" in stats.stdout and "linear" in stats.stdout


def test_import_from_python_factory(tmp_path):
    (tmp_path / "mymodels.py").write_text(
        "import torch\n"
        "def tiny():\n"
        "    return torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU()).eval(), (torch.randn(2, 4),)\n")
    result = _run("import", "mymodels:tiny", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "linear(%input, @0.weight, @0.bias)" in result.stdout and "relu(" in result.stdout


def test_errors_are_one_line_and_nonzero(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x08\x01garbage" * 20)
    for args in (["import", str(bad)], ["stats", str(tmp_path / "none.onnx")], ["import", "nosuchmod:fn"],
                 ["import", str(bad), "--input-shape", "x"]):
        result = _run(*args)
        assert result.returncode == 2
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("qcompiler: error: "), result.stderr
        assert "Traceback" not in result.stderr


def test_output_never_overwrites_input(tmp_path):
    model = zoo.DigitsCNN().eval()
    path = tmp_path / "d.qir"
    from qcompiler import from_torch, save

    save(from_torch(model, (torch.randn(1, 1, 8, 8),)), path)
    before = path.read_bytes()
    result = _run("import", str(path), "-o", str(path))
    assert result.returncode == 2 and "refusing to overwrite the input" in result.stderr
    assert path.read_bytes() == before


def test_opt_runs_pipeline_with_instruments(tmp_path):
    model = zoo.DigitsCNN().eval()
    x = torch.randn(2, 1, 8, 8)
    path = export_onnx(model, (x,), tmp_path / "d.onnx", ["image"])
    from qcompiler import from_torch, save

    from qcompiler.passes import DEFAULT_FLOAT_PIPELINE

    save(from_torch(model, (x,)), tmp_path / "d.qir")  # the torch capture keeps its batch norms
    with torch.no_grad():
        want = model(x).numpy()
    for source in (path, str(tmp_path / "d.qir")):
        dump_dir = tmp_path / f"dumps_{source[-4:]}"
        result = _run("opt", source, "-p", DEFAULT_FLOAT_PIPELINE, "--print-ir-after-change", "--timing",
                      "--dump-dir", str(dump_dir), "-o", str(tmp_path / "out.qir"))
        assert result.returncode == 0, result.stderr
        assert "// ----- IR after fuse-activations -----" in result.stderr and "pass timing" in result.stderr
        out = load_graph(tmp_path / "out.qir")
        assert "batch_norm" not in out.op_counts() and "relu" not in out.op_counts()
        dumps = sorted(p.name for p in dump_dir.glob("*.qir"))
        assert len(dumps) == 8 and dumps[0] == "00_input.qir" and dumps[-1] == "07_eliminate-dead-code.qir"
        for dump in dumps:
            assert abs(load_graph(dump_dir / dump)(x.numpy())[0] - want).max() < 1e-4 * abs(want).max()
    bisect = _run("opt", path, "-p", "fold-constants,fold-batchnorm,eliminate-dead-code", "--bisect-limit", "2")
    assert bisect.returncode == 0
    assert [l for l in bisect.stderr.splitlines() if l.startswith("bisect:")] == [
        "bisect: running pass #1 (fold-constants)", "bisect: running pass #2 (fold-batchnorm)",
        "bisect: not running pass #3 (eliminate-dead-code)"]
    listing = _run("opt", "--list-passes")
    assert "fold-batchnorm: fold inference batch norm" in listing.stdout
    bad = _run("opt", path, "-p", "fold-everything")
    assert bad.returncode == 2 and bad.stderr.startswith("qcompiler: error: unknown pass 'fold-everything'")


def test_compare_cli_table_and_json(tmp_path, digits):
    import json

    import numpy as np

    model, (x_train, _, x_test, _) = digits
    path = export_onnx(model, (torch.from_numpy(x_test[:16]),), tmp_path / "d.onnx", ["image"])
    np.savez(tmp_path / "cal.npz", image=x_train[:64])  # 64 = 4 batches of the model's 16
    np.savez(tmp_path / "eval.npz", image=x_test[:16])
    common = ("compare", path, "--calibration", str(tmp_path / "cal.npz"), "--inputs", str(tmp_path / "eval.npz"))
    result = _run(*common)
    assert result.returncode == 0, result.stderr
    assert "worst layers by cumulative SQNR" in result.stdout and "output" in result.stdout
    as_json = _run(*common, "--json")
    assert as_json.returncode == 0, as_json.stderr
    layers = json.loads(as_json.stdout)  # JSON on stdout and nothing else
    assert {entry["op"] for entry in layers} >= {"conv2d", "linear"}
    assert all(entry["sqnr_db"] > 20 for entry in layers)
    bad = _run("compare", path, "--calibration", str(tmp_path / "eval.npz"), "--config", str(tmp_path / "none.json"))
    assert bad.returncode == 2 and "cannot read config" in bad.stderr
    wrong = tmp_path / "wrong.npz"
    np.savez(wrong, image=x_train[:5, :, :4])
    bad = _run("compare", path, "--calibration", str(wrong))
    assert bad.returncode == 2 and "does not fit input %image" in bad.stderr


@register
class _DoublesFirstWeight(Pass):
    name = "test-double-first-weight"
    summary = "test only: a wrong rewrite (the first conv/linear weight times two)"

    def run(self, graph, ctx):
        node = next(n for n in graph.nodes if n.op in ("conv2d", "linear"))
        node.inputs[1] = graph.add_constant("doubled", 2 * graph.constant_array(node.inputs[1]))
        return True


def test_compare_passes_finds_the_first_diverging_pass(tmp_path, digits):
    """``compare --passes`` replays the quantization pipeline and measures the outputs after each
    pass: the float passes are exact, the error appears where quantization does, and the last
    row is the lowered model's own error; a wrong rewrite slipped into a pipeline is named."""
    import json

    import numpy as np

    from qcompiler.compare import first_divergence, pass_divergence, sqnr_db
    from qcompiler.quantize import quantize

    model, (x_train, _, x_test, _) = digits
    path = export_onnx(model, (torch.from_numpy(x_test[:16]),), tmp_path / "d.onnx", ["image"])
    np.savez(tmp_path / "cal.npz", image=x_train[:64])
    common = ("compare", path, "--calibration", str(tmp_path / "cal.npz"), "--passes")
    table = _main(*common)
    assert table.returncode == 0, table.stderr
    # bias correction moves float biases by the expected quantization error: it is quantization,
    # and on some trained weights its shift is the larger share of the final error
    culprit_line = next(line for line in table.stdout.splitlines() if line.startswith("the pass that lost the most: "))
    assert "outputs after each pass" in table.stdout
    assert culprit_line.split(": ")[1] in ("bias-correction", "insert-qdq")
    found = json.loads(_main(*common, "--json").stdout)
    names = [p["name"] for p in found["passes"]]
    assert names[-2:] == ["insert-qdq", "lower-integer"] and "range-analysis" in names
    assert all(p["sqnr_db"] is None for p in found["passes"][:names.index("range-analysis") + 1])  # float: exact
    from qcompiler import from_onnx

    graph = from_onnx(path)
    batch = x_train[:16]
    lowered = quantize(graph, [x_train[i:i + 16] for i in range(0, 64, 16)]).graph
    assert found["passes"][-1]["sqnr_db"] == pytest.approx(sqnr_db(graph(batch)[0], lowered(batch)[0]), abs=1e-3)
    below = _main(*common, "--target-sqnr", "60")
    assert below.returncode == 0 and "first pass below 60 dB: " in below.stdout
    steps = pass_divergence(graph, "canonicalize,fold-constants,test-double-first-weight,fuse-activations", [batch])
    assert [s.name for s in steps] == ["canonicalize", "fold-constants", "test-double-first-weight",
                                       "fuse-activations"]
    culprit = first_divergence(steps, 40.0)
    assert culprit is not None and culprit.name == "test-double-first-weight" and culprit.sqnr_db < 40
    assert first_divergence(steps, None) is culprit
    bad = _main("compare", path, str(tmp_path / "d.onnx"), "--inputs", str(tmp_path / "cal.npz"), "--passes")
    assert bad.returncode == 2 and "--passes replays the quantization pipeline" in bad.stderr


def test_version_and_exit_codes_in_every_help():
    version = _run("--version")
    assert version.returncode == 0 and version.stdout.startswith("qcompiler 0.1.0 (TVM 0.27.0")
    for command in ("import", "opt", "compare", "compile", "run", "show", "stats", "inspect"):
        text = _run(command, "--help").stdout
        assert "exit codes:" in text and "3  compile: the build missed a gate" in text, command


def test_every_option_has_help_and_json_always_means_json_on_stdout():
    import argparse

    from qcompiler.cli import build_parser

    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    for name, command in commands.items():
        for action in command._actions:
            assert action.help and action.help != argparse.SUPPRESS, f"{name} {action.option_strings or action.dest}"
            if "--json" in action.option_strings:  # a switch everywhere: no file argument
                assert action.nargs == 0, name
    with_json = {name for name, c in commands.items() if any("--json" in a.option_strings for a in c._actions)}
    assert with_json >= {"compile", "compare", "inspect", "run", "stats"}


def test_run_on_images_applies_the_normalization_compile_recorded(tmp_path):
    """Before: the artifact forgot --image-mean/--image-std and `run` fed raw pixels, exit 0."""
    import numpy as np
    from PIL import Image

    import qcompiler
    from qcompiler.loading import load_data

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(),
                                torch.nn.Linear(4 * 6 * 6, 3)).eval()
    path = export_onnx(model, (torch.randn(1, 3, 8, 8),), tmp_path / "m.onnx", ["x"])
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(images / f"{i}.png")
    norm = ["--image-mean", "0.5", "0.4", "0.3", "--image-std", "0.2", "0.25", "0.3"]
    done = _main("compile", path, "--calibration", str(images), *norm, "-o", str(tmp_path / "art"), "--quiet")
    assert done.returncode == 0, done.stderr
    ran = _main("run", str(tmp_path / "art"), "--inputs", str(images), "-o", str(tmp_path / "out.npz"))
    assert ran.returncode == 0, ran.stderr
    loaded = qcompiler.load(tmp_path / "art")
    assert loaded.preprocessing == {"image_mean": [0.5, 0.4, 0.3], "image_std": [0.2, 0.25, 0.3]}
    batches = load_data(images, loaded.graph, [0.5, 0.4, 0.3], [0.2, 0.25, 0.3])
    with np.load(tmp_path / "out.npz") as out:
        np.testing.assert_array_equal(out["y" if "y" in out.files else out.files[0]],
                                      np.stack([loaded(*b) for b in batches]))


def test_inspect_lists_layers_and_what_would_be_quantized(tmp_path):
    import json

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(),
                                torch.nn.Linear(4 * 6 * 6, 3), torch.nn.Softmax(-1)).eval()
    path = export_onnx(model, (torch.randn(1, 3, 8, 8),), tmp_path / "m.onnx", ["x"])
    (tmp_path / "q.json").write_text(json.dumps({"op_types": ["conv"]}))
    done = _run("inspect", path, "--json", "--config", str(tmp_path / "q.json"))
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["inputs"] == [{"name": "x", "type": "f32[1,3,8,8]"}]
    layers = {layer["op"]: layer for layer in report["layers"]}
    assert layers["conv2d"]["int8"].startswith("int8 weights per channel") and layers["conv2d"]["output"] == "f32[1,4,6,6]"
    assert layers["linear"]["why_not"] == "op type 'linear' is not in QuantConfig.op_types"
    assert layers["softmax"]["why_not"].startswith("no integer form")
    table = _run("inspect", path)
    assert table.returncode == 0 and "layers would run in int8" in table.stdout


def test_synthetic_inputs_for_compile_run_and_compare(tmp_path):
    """Polygraphy's synthetic data: a smoke build, run and comparison without preparing any."""
    import numpy as np

    import qcompiler
    from qcompiler.loading import synthetic_batches

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3)).eval()
    path = export_onnx(model, (torch.randn(2, 6),), tmp_path / "m.onnx", ["x"])
    done = _run("compile", path, "--synthetic", "--seed", "1", "--target", "reference", "-o", str(tmp_path / "a"), "-q")
    assert done.returncode == 0, done.stderr
    outs = []
    for name in ("o1.npz", "o2.npz"):
        ran = _run("run", str(tmp_path / "a"), "--synthetic", "--seed", "7", "--val-range=-2,2", "-o", str(tmp_path / name))
        assert ran.returncode == 0, ran.stderr
        with np.load(tmp_path / name) as out:
            outs.append(out[out.files[0]])
    np.testing.assert_array_equal(outs[0], outs[1])  # the seed makes it repeatable
    loaded = qcompiler.load(tmp_path / "a")
    batch = synthetic_batches(loaded.graph, 1, 7, (-2.0, 2.0))[0]
    assert -2 <= batch[0].min() and batch[0].max() < 2
    np.testing.assert_array_equal(outs[0][0], loaded(*batch))
    compared = _run("compare", path, "--synthetic", "--top", "2")
    assert compared.returncode == 0 and "SQNR" in compared.stdout, compared.stderr
    neither = _run("run", str(tmp_path / "a"))
    assert neither.returncode == 2 and "--inputs" in neither.stderr and "--synthetic" in neither.stderr


def _tiny_cnn_onnx(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 6, 3), torch.nn.BatchNorm2d(6), torch.nn.ReLU(), torch.nn.Flatten(),
                                torch.nn.Linear(6 * 6 * 6, 4), torch.nn.Softmax(-1)).eval()
    return export_onnx(model, (torch.randn(2, 3, 8, 8),), tmp_path / "m.onnx", ["x"])


def test_saved_ranges_rebuild_the_same_model_without_data(tmp_path):
    """trtexec's calibration cache: --save-ranges once, then --ranges builds the same artifact
    outputs without the data (and without the calibration's time)."""
    import json

    import numpy as np

    import qcompiler

    path = _tiny_cnn_onnx(tmp_path)
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "cal.npz", x=rng.standard_normal((6, 2, 3, 8, 8)).astype(np.float32))
    first = _main("compile", path, "--calibration", str(tmp_path / "cal.npz"), "--save-ranges",
                  str(tmp_path / "ranges.json"), "-o", str(tmp_path / "a"), "--json", "-q", "--target", "reference")
    assert first.returncode == 0, first.stderr
    record = json.loads((tmp_path / "ranges.json").read_text())
    assert record["format"] == "qcompiler-ranges/1" and record["ranges"] and record["biases"]
    again = _main("compile", path, "--ranges", str(tmp_path / "ranges.json"), "-o", str(tmp_path / "b"), "--json", "-q",
                  "--target", "reference")
    assert again.returncode == 0, again.stderr
    report = json.loads(again.stdout)
    assert report["quantized"] and "apply-calibration{path=" in report["pipeline"]
    a, b = qcompiler.load(tmp_path / "a"), qcompiler.load(tmp_path / "b")
    assert qcompiler.ir.print_graph(a.graph) == qcompiler.ir.print_graph(b.graph)
    x = rng.standard_normal((2, 3, 8, 8)).astype(np.float32)
    np.testing.assert_array_equal(a(x), b(x))
    # the pipeline a --ranges build reports reproduces it through `qcompiler opt`
    replay = _main("opt", path, "-p", report["pipeline"], "-o", str(tmp_path / "replay.qir"))
    assert replay.returncode == 0, replay.stderr
    replayed = qcompiler.load_graph(tmp_path / "replay.qir")
    assert replayed.op_counts() == b.graph.op_counts()
    np.testing.assert_array_equal(replayed(x)[0], b.graph(x)[0])


def test_ranges_in_the_python_api_and_for_another_model(tmp_path):
    import numpy as np
    import pytest

    import qcompiler
    from qcompiler.errors import QCompilerError

    path = _tiny_cnn_onnx(tmp_path)
    rng = np.random.default_rng(1)
    batches = [rng.standard_normal((2, 3, 8, 8)).astype(np.float32) for _ in range(4)]
    config = qcompiler.QuantConfig(min_layer_sqnr_db=60)  # keeps some layers float: the record carries that
    compiled = qcompiler.compile(path, calibration=batches, config=config, target="reference")
    compiled.save_ranges(tmp_path / "r.json")
    again = qcompiler.compile(path, ranges=tmp_path / "r.json", config=config, target="reference")
    assert again.report()["kept_float"] == compiled.report()["kept_float"] != []
    np.testing.assert_array_equal(compiled(batches[0]), again(batches[0]))
    torch.manual_seed(5)
    other = export_onnx(torch.nn.Sequential(torch.nn.Conv2d(3, 6, 3)).eval(), (torch.randn(2, 3, 8, 8),),
                        tmp_path / "other.onnx", ["x"])
    with pytest.raises(QCompilerError, match="calibrated for another model"):
        qcompiler.compile(other, ranges=tmp_path / "r.json", target="reference")
    with pytest.raises(QCompilerError, match="calibrated for u8 activations"):
        qcompiler.compile(path, ranges=tmp_path / "r.json", config=qcompiler.QuantConfig(activation_dtype="i8"),
                          target="reference")
    with pytest.raises(QCompilerError, match="not calibrated"):
        qcompiler.compile(path, target="reference").save_ranges(tmp_path / "none.json")


def test_calibration_from_a_data_loader_function(tmp_path):
    """--calibration package.module:function: a generator function is called once per sweep."""
    import json

    path = _tiny_cnn_onnx(tmp_path)
    (tmp_path / "my_data.py").write_text(
        "import numpy as np\n"
        "def batches():\n"
        "    rng = np.random.default_rng(0)\n"
        "    for _ in range(3):\n"
        "        yield {'x': rng.standard_normal((2, 3, 8, 8)).astype(np.float32)}\n")
    done = _main("compile", path, "--calibration", "my_data:batches", "--target", "reference", "-o",
                str(tmp_path / "a"), "--json", "-q", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["quantized"] and report["passes"]["calibration"]["batches"] == 3


def test_compile_summary_is_readable_and_copyable(tmp_path):
    import numpy as np

    path = _tiny_cnn_onnx(tmp_path)
    np.savez(tmp_path / "cal.npz", x=np.random.default_rng(0).standard_normal((3, 2, 3, 8, 8)).astype(np.float32))
    (tmp_path / "q.json").write_text('{"exclude": ["*linear*", "*Conv*"]}')
    args = ("compile", path, "--calibration", str(tmp_path / "cal.npz"), "--config", str(tmp_path / "q.json"), "-q")
    done = _main(*args, "-o", str(tmp_path / "a"), "--target", "llvm")
    assert done.returncode == 0, done.stderr
    import os

    assert f", {os.cpu_count()} cores)" in done.stderr and '{"kind"' not in done.stderr  # not a JSON blob
    pipeline = next(line for line in done.stderr.splitlines() if line.startswith("pipeline: "))
    assert pipeline.endswith("lower-integer") and "exclude=" in pipeline  # one unwrapped line: it parses back
    from qcompiler.pipeline import parse_pipeline

    assert parse_pipeline(pipeline.removeprefix("pipeline: "))
    assert "kept float: 2 x excluded by QuantConfig.exclude" in done.stderr and "(-v lists each op)" in done.stderr
    from qcompiler.compiled import _bf16_native

    assert "precision │" not in done.stderr  # nothing quantized: no precision to state
    quantized = _main("compile", path, "--calibration", str(tmp_path / "cal.npz"), "-q", "-o", str(tmp_path / "c"),
                      "--target", "llvm")
    precision = "bf16" if _bf16_native("llvm", None) else "fp32"  # what auto resolves to for this CPU
    summary = " ".join(quantized.stderr.split())
    assert f"precision │ int8 (requantized in float32); layers kept out of int8: {precision}" in summary
    verbose = _main(*args, "-o", str(tmp_path / "b"), "--target", "reference", "-v")
    assert verbose.returncode == 0 and "kept float: conv2d 'node_Conv" in verbose.stderr and "reference (the interpreter)" in verbose.stderr


def test_stats_and_run_json(tmp_path):
    import json

    import numpy as np

    path = _tiny_cnn_onnx(tmp_path)
    stats = json.loads(_main("stats", path, "--json").stdout)
    assert stats["ops"]["conv2d"] == 1 and stats["nodes"] == sum(stats["ops"].values())
    assert _main("compile", path, "--synthetic", "--target", "reference", "-o", str(tmp_path / "a"), "-q").returncode == 0
    ran = _main("run", str(tmp_path / "a"), "--synthetic", "--json")
    assert ran.returncode == 0, ran.stderr
    out = json.loads(ran.stdout)
    assert out["digest"].startswith("sha256:") and list(out["outputs"].values()) == [{"shape": [2, 4], "dtype": "float32"}]
    np.testing.assert_equal(out["batches"], 1)


def test_run_checks_outputs_against_golden_ones(tmp_path):
    """Polygraphy's saved outputs: `run -o` writes golden outputs, `--expect-outputs` checks them."""
    import numpy as np

    path = _tiny_cnn_onnx(tmp_path)
    art = str(tmp_path / "a")
    assert _main("compile", path, "--synthetic", "--target", "reference", "-o", art, "-q").returncode == 0
    golden = tmp_path / "golden.npz"
    assert _main("run", art, "--synthetic", "-o", str(golden)).returncode == 0
    same = _main("run", art, "--synthetic", "--expect-outputs", str(golden))
    assert same.returncode == 0 and "max |difference|" in same.stdout and "within --atol 0" in same.stdout, same.stderr
    with np.load(golden) as g:
        shifted = {k: g[k] + np.float32(1e-3) for k in g.files}
    np.savez(tmp_path / "shifted.npz", **shifted)
    differs = _main("run", art, "--synthetic", "--expect-outputs", str(tmp_path / "shifted.npz"))
    assert differs.returncode == 3 and "outputs differ from" in differs.stderr
    assert _main("run", art, "--synthetic", "--expect-outputs", str(tmp_path / "shifted.npz"),
                "--atol", "0.01").returncode == 0
    other = _main("run", art, "--synthetic", "--seed", "3", "--expect-outputs", str(tmp_path / "missing.npz"))
    assert other.returncode == 2 and "missing.npz" in other.stderr


def test_kept_float_reasons_group_by_cause_and_show_a_shared_reason_whole():
    """Numbers are masked to group one cause on one line; where every member gives the same
    reason it is shown whole (the summary said 'u… activations: ... take … bits')."""
    from qcompiler.cli import kept_float_groups

    kept = [{"reason": "u16 activations: the integer kernels take 8 bits"}] * 3 + \
        [{"reason": "local SQNR 12.5 dB < 20"}, {"reason": "local SQNR 13.1 dB < 20", "precision": "bf16"},
         {"reason": "local SQNR 9.0 dB < 20"}]
    assert kept_float_groups(kept) == [(3, "kept float", "u16 activations: the integer kernels take 8 bits"),
                                       (2, "kept float", "local SQNR … dB < …"),
                                       (1, "kept bf16", "local SQNR 13.1 dB < 20")]
