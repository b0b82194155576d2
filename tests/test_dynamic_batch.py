"""Dynamic batch (``qcompiler.batching``): one compiled model and artifact for any batch in a
declared range, built per bucket and dispatched with padding. Per sample, every batch size gives
exactly what the model gives that sample alone (int8: bit for bit, against a static batch-1
build and the reference interpreter), compiled and after loading in a fresh process; from torch
(``dynamic_shapes``) and ONNX with a symbolic batch (``input_shapes``, CLI ``--input-shape
x=1:32,...``); calibration batches of mixed sizes; clear errors."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

import qcompiler
from qcompiler.batching import default_buckets
from qcompiler.errors import InputError, QCompilerError
from tests.conftest import cli_in_process, export_onnx

BATCH = torch.export.Dim("batch", min=1, max=32)
BUCKETS = (1, 8, 32)


@pytest.fixture(scope="module")
def digits_dynamic(digits, tmp_path_factory):
    model, (x_train, _, x_test, _) = digits
    calibration = [x_train[i:i + n] for i, n in ((0, 3), (3, 8), (11, 1), (12, 20), (32, 32))]  # mixed sizes
    compiled = qcompiler.compile(model, (torch.from_numpy(x_test[:2]),), calibration=calibration,
                                 dynamic_shapes={"x": {0: BATCH}}, batch_buckets=BUCKETS)
    folder = compiled.save(tmp_path_factory.mktemp("dynamic") / "artifact")
    return compiled, calibration, folder


def test_any_batch_in_range_gives_each_sample_what_it_gets_alone(digits, digits_dynamic):
    model, (_, _, x_test, _) = digits
    compiled, calibration, _ = digits_dynamic
    report = compiled.report()
    (dim,) = report["dynamic"]["dims"]
    assert dim["buckets"] == list(BUCKETS) and dim["per_sample_exact"] is True
    assert report["quantized"] and report["ops"]["integer"] >= 4
    static = qcompiler.compile(model, (torch.from_numpy(x_test[:1]),), calibration=calibration)  # batch 1, same data
    reference = qcompiler.compile(model, (torch.from_numpy(x_test[:1]),), calibration=calibration, target="reference")
    alone = np.concatenate([np.asarray(static(x_test[i:i + 1])) for i in range(32)])
    np.testing.assert_array_equal(alone[:4], np.concatenate([np.asarray(reference(x_test[i:i + 1])) for i in range(4)]))
    for n in (1, 5, 8, 9, 32):
        np.testing.assert_array_equal(np.asarray(compiled(x_test[:n])), alone[:n])
    assert compiled(torch.from_numpy(x_test[:3])).shape == (3, 10)


def test_the_artifact_takes_any_batch_in_a_fresh_process(digits, digits_dynamic, tmp_path):
    _, (_, _, x_test, _) = digits
    compiled, _, folder = digits_dynamic
    np.save(tmp_path / "x.npy", x_test[:5])
    script = (f"import numpy as np, qcompiler; m = qcompiler.load({str(folder)!r}); "
              f"np.save({str(tmp_path / 'y.npy')!r}, np.asarray(m(np.load({str(tmp_path / 'x.npy')!r}))))")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    np.testing.assert_array_equal(np.load(tmp_path / "y.npy"), np.asarray(compiled(x_test[:5])))
    loaded = qcompiler.load(folder)
    np.testing.assert_array_equal(np.asarray(loaded(x_test[:32])), np.asarray(compiled(x_test[:32])))
    with pytest.raises(InputError, match=r"batch 33 is outside dimension 0's range 'batch' 1\.\.32"):
        loaded(np.concatenate([x_test[:32], x_test[:1]]))
    resaved = loaded.save(tmp_path / "again")  # a loaded dynamic artifact saves whole
    np.testing.assert_array_equal(np.asarray(qcompiler.load(resaved)(x_test[:9])), np.asarray(compiled(x_test[:9])))


def test_onnx_with_a_symbolic_batch_from_python_and_the_cli(digits, tmp_path):
    model, (x_train, _, x_test, y_test) = digits
    path = tmp_path / "d.onnx"
    torch.onnx.export(model, (torch.from_numpy(x_test[:2]),), str(path), input_names=["x"], output_names=["y"],
                      dynamic_axes={"x": {0: "n"}, "y": {0: "n"}}, dynamo=False)
    compiled = qcompiler.compile(str(path), calibration=[x_train[:16]], input_shapes={"x": [(1, 32), 1, 8, 8]},
                                 batch_buckets=(1, 32))
    alone = np.concatenate([np.asarray(compiled(x_test[i:i + 1])) for i in range(6)])
    np.testing.assert_array_equal(np.asarray(compiled(x_test[:6])), alone)
    np.savez(tmp_path / "cal.npz", x=x_train[:64])
    np.savez(tmp_path / "five.npz", x=x_test[:5])
    np.savez(tmp_path / "eval.npz", x=x_test[:40], labels=y_test[:40])
    built = cli_in_process("compile", str(path), "--input-shape", "x=1:16,1,8,8", "--calibration",
                           str(tmp_path / "cal.npz"), "--eval", str(tmp_path / "eval.npz"), "--max-accuracy-drop", "2",
                           "-o", str(tmp_path / "art"))
    assert built.returncode == 0, built.stderr
    assert "any of 1..16" in built.stderr + built.stdout
    ran = cli_in_process("run", str(tmp_path / "art"), "--inputs", str(tmp_path / "five.npz"), "-o",
                         str(tmp_path / "out.npz"))
    assert ran.returncode == 0 and "5 sample(s) of [10]" in ran.stdout
    loaded = qcompiler.load(tmp_path / "art")
    np.testing.assert_array_equal(np.load(tmp_path / "out.npz")["y"],
                                  np.concatenate([np.asarray(loaded(x_test[i:i + 1])) for i in range(5)]))
    bad = cli_in_process("compile", str(path), "--input-shape", "x=1:16,1,8:9,8:9", "-o", str(tmp_path / "b"))
    assert bad.returncode == 2 and "at most two dynamic dimensions" in bad.stderr


class _BatchCentered(nn.Module):
    """Subtracts the batch mean: a sample's output depends on the rest of its batch."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 4)

    def forward(self, x):
        return self.fc(x - x.mean(dim=0, keepdim=True))


def test_declarations_and_models_that_cannot_be_padded_are_refused_in_one_line(digits):
    model, (x_train, _, x_test, _) = digits
    example = (torch.from_numpy(x_test[:2]),)
    with pytest.raises(QCompilerError, match="at most two dynamic dimensions"):
        qcompiler.compile(model, example, dynamic_shapes={"x": {2: torch.export.Dim("h", min=4, max=8),
                                                                3: torch.export.Dim("w", min=4, max=8)}})
    with pytest.raises(QCompilerError, match="input 0 has 4 dimensions, not a dimension 5"):
        qcompiler.compile(model, example, dynamic_shapes={"x": {5: torch.export.Dim("h", min=4, max=8)}})
    with pytest.raises(QCompilerError, match="not inputs of DigitsCNN.forward"):
        qcompiler.compile(model, example, dynamic_shapes={"images": {0: BATCH}})
    with pytest.raises(QCompilerError, match="must lie in 1..32, include both ends"):
        qcompiler.compile(model, example, dynamic_shapes={"x": {0: BATCH}}, batch_buckets=(2, 32))
    with pytest.raises(QCompilerError, match="batch_buckets / sequence_buckets apply to a dynamic dimension"):
        qcompiler.compile(model, example, batch_buckets=(1, 4))
    x = np.random.default_rng(0).standard_normal((4, 6)).astype(np.float32)
    with pytest.raises(QCompilerError, match="mixes the samples of a batch"):
        qcompiler.compile(_BatchCentered().eval(), (torch.from_numpy(x),), target="reference",
                          dynamic_shapes=({0: torch.export.Dim("n", min=1, max=4)},))


def test_the_onnx_target_writes_one_model_with_a_symbolic_batch(digits, tmp_path):
    """The buckets' exports merged into one model.onnx whose batch is symbolic: ONNX Runtime runs
    it at a size no bucket has, equal per sample to batch-1 runs; the artifact loads and runs."""
    import onnx
    import onnxruntime as ort

    model, (x_train, _, x_test, _) = digits
    compiled = qcompiler.compile(model, (torch.from_numpy(x_test[:2]),), calibration=[x_train[:8], x_train[8:16]],
                                 target="onnx", dynamic_shapes={"x": {0: BATCH}})
    assert compiled.report()["onnx_symbolic_dims"] == ["batch"]
    compiled.save(tmp_path / "art")
    exported = onnx.load(tmp_path / "art" / "model.onnx")
    assert exported.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    session = ort.InferenceSession(str(tmp_path / "art" / "model.onnx"), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    seven = session.run(None, {name: x_test[:7]})[0]
    one_by_one = np.concatenate([session.run(None, {name: x_test[i:i + 1]})[0] for i in range(7)])
    np.testing.assert_allclose(seven, one_by_one, rtol=0, atol=1e-5 * np.abs(one_by_one).max())
    loaded = qcompiler.load(tmp_path / "art")
    np.testing.assert_array_equal(np.asarray(loaded(x_test[:5])), np.asarray(compiled(x_test[:5])))


def test_default_buckets_span_the_range_by_powers_of_four():
    assert default_buckets(1, 32) == (1, 4, 16, 32)
    assert default_buckets(1, 1) == (1,)
    assert default_buckets(3, 64) == (3, 4, 16, 64)
    assert default_buckets(8, 8) == (8,)


def test_input_shapes_of_numbers_pin_a_static_build(tmp_path):
    """``input_shapes`` of plain numbers pins an ONNX input: a static build, as before."""
    model = nn.Sequential(nn.Linear(6, 3)).eval()
    path = export_onnx(model, (torch.zeros(2, 6),), tmp_path / "s.onnx", ["x"])
    compiled = qcompiler.compile(path, input_shapes={"x": [2, 6]}, target="reference")
    assert "dynamic" not in compiled.report()
    with torch.no_grad():
        want = model(torch.ones(2, 6)).numpy()
    np.testing.assert_allclose(np.asarray(compiled(np.ones((2, 6), np.float32))), want, rtol=1e-5)
