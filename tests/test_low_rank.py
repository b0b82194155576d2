"""Quantized low-rank factorization (``factorize-low-rank``, ``QuantConfig(low_rank=LowRank(...))``):
the factors against numpy's truncated SVD through the interpreter, what is left alone and why, and
the digits MLP built for llvm: smaller than the plain int8 build at equal accuracy."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

import qcompiler
from qcompiler import LowRank, QuantConfig, from_torch
from qcompiler.errors import QCompilerError
from qcompiler.examples import zoo
from qcompiler.pass_manager import Instruments, run_pipeline
from qcompiler.pipeline import PassContext
from tests.conftest import cli_in_process
from qcompiler.passes.factorize_low_rank import rank_for

rng = np.random.default_rng(0)


def _low_rank(shape: tuple[int, ...], rank: int, noise: float = 0.0) -> np.ndarray:
    out, fan_in = shape[0], int(np.prod(shape[1:]))
    w = rng.standard_normal((out, rank)) @ rng.standard_normal((rank, fan_in)) / np.sqrt(rank)
    w += noise * rng.standard_normal(w.shape)
    return w.reshape(shape).astype(np.float32)


def _truncated(w: np.ndarray, rank: int) -> np.ndarray:
    """Numpy's best rank-``rank`` approximation (the reference the pass is checked against)."""
    u, s, vt = np.linalg.svd(w.reshape(w.shape[0], -1).astype(np.float64), full_matrices=False)
    return ((u[:, :rank] * s[:rank]) @ vt[:rank]).reshape(w.shape).astype(np.float32)


def _factorize(graph, energy: float) -> dict:
    ctx = PassContext()
    run_pipeline(graph, f"factorize-low-rank{{energy={energy}}}", Instruments(verify_each=True), ctx)
    return ctx.report["low_rank"]


def test_rank_for_keeps_the_asked_energy():
    s = np.array([4.0, 2.0, 1.0, 1.0])  # squares 16, 4, 1, 1 of 22
    assert rank_for(s, 0.7) == 1 and rank_for(s, 16 / 22) == 1 and rank_for(s, 0.75) == 2
    assert rank_for(s, 1.0) == 4 and rank_for(np.zeros(3), 0.95) == 0


def test_linear_factors_compute_the_truncated_svd():
    """A nearly rank-6 weight (plus noise) with a bias and a fused relu: the factored graph computes
    relu(x @ W_6^T + b) with W_6 numpy's truncated SVD, through the interpreter."""
    model = nn.Sequential(nn.Linear(48, 64), nn.ReLU()).eval()
    w = _low_rank((64, 48), 6, noise=1e-3)
    with torch.no_grad():
        model[0].weight.copy_(torch.from_numpy(w))
    x = rng.standard_normal((5, 48)).astype(np.float32)
    graph = run_pipeline(from_torch(model, (torch.from_numpy(x),)), "fuse-activations", Instruments())
    report = _factorize(graph, 0.999)
    (entry,) = report["layers"]
    assert entry["rank"] == 6 and entry["full_rank"] == 48 and entry["energy_kept"] >= 0.999
    assert entry["params_before"] == 64 * 48 and entry["params_after"] == 6 * (48 + 64)
    assert graph.op_counts()["linear"] == 2
    expected = np.maximum(x @ _truncated(w, 6).T + model[0].bias.detach().numpy(), 0)
    np.testing.assert_allclose(graph(x)[0], expected, rtol=1e-4, atol=1e-4)


def test_conv_becomes_a_thin_conv_and_a_pointwise_one():
    """Strides, padding and dilation stay on the first factor; the 1x1 second one carries the bias."""
    conv = nn.Conv2d(16, 32, 3, stride=2, padding=2, dilation=2).eval()
    w = _low_rank((32, 16, 3, 3), 4)
    with torch.no_grad():
        conv.weight.copy_(torch.from_numpy(w))
    x = rng.standard_normal((2, 16, 11, 11)).astype(np.float32)
    graph = from_torch(conv, (torch.from_numpy(x),))
    (entry,) = _factorize(graph, 0.9999)["layers"]
    assert entry["rank"] == 4 and entry["params_after"] == 4 * (16 * 9 + 32)
    assert entry["macs_after"] / entry["macs_before"] == pytest.approx(entry["params_after"] / entry["params_before"])
    first, second = [n for n in graph.nodes if n.op == "conv2d"]
    assert first.inputs[1].shape == (4, 16, 3, 3) and tuple(first.attrs["strides"]) == (2, 2)
    assert second.inputs[1].shape == (32, 4, 1, 1) and len(second.inputs) == 3
    expected = torch.nn.functional.conv2d(torch.from_numpy(x), torch.from_numpy(_truncated(w, 4)), conv.bias,
                                          stride=2, padding=2, dilation=2).detach().numpy()
    np.testing.assert_allclose(graph(x)[0], expected, rtol=1e-4, atol=1e-4)


def test_full_rank_and_grouped_layers_are_left_alone_with_the_reason():
    model = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.Flatten(), nn.Linear(8 * 16, 32)).eval()
    x = rng.standard_normal((1, 8, 4, 4)).astype(np.float32)
    graph = from_torch(model, (torch.from_numpy(x),))
    before = graph(x)[0]
    report = _factorize(graph, 0.95)  # a random 32x128 weight needs nearly every direction
    assert report["layers"] == []
    (alone,) = report["left_alone"]  # the depthwise conv is not a candidate at all
    assert alone["op"] == "linear" and "its factors would hold" in alone["why"]
    np.testing.assert_array_equal(graph(x)[0], before)


@pytest.fixture(scope="module")
def digits_mlp():
    return zoo.train_digits_mlp()


def test_digits_mlp_low_rank_int8_is_smaller_at_equal_accuracy(digits_mlp):
    """The issue's bar: at energy 0.95 the weights shrink >= 20 % against the plain int8 build,
    accuracy within 1 point of float; built for llvm and checked against the interpreter."""
    model, (x_train, _, x_test, y_test) = digits_mlp
    example = (torch.from_numpy(x_test[:72]),)
    calibration = [x_train[i:i + 72] for i in range(0, 576, 72)]
    plain = qcompiler.compile(model, example, calibration=calibration)
    factored = qcompiler.compile(model, example, calibration=calibration,
                                 config=QuantConfig(low_rank=LowRank(energy=0.95)))
    report = factored.report()
    assert [e["layer"] for e in report["low_rank"]["layers"]], report["low_rank"]
    assert "factorize-low-rank{energy=0.95}" in factored.pipeline
    assert report["size_bytes"]["compiled"] <= 0.8 * plain.report()["size_bytes"]["compiled"]
    batches = [x_test[i:i + 72] for i in range(0, 360, 72)]
    with torch.no_grad():
        float_acc = zoo.accuracy(np.concatenate([model(torch.from_numpy(b)).numpy() for b in batches]), y_test[:360])
    outputs = [factored(b) for b in batches]
    assert float_acc - zoo.accuracy(np.concatenate(outputs), y_test[:360]) <= 0.01
    np.testing.assert_array_equal(outputs[0], factored.graph(batches[0])[0])  # llvm == the interpreter
    assert report["fidelity"]["output_cosine"] > 0.99  # against the model as given, not the factored one


def test_low_rank_config_round_trips_and_refuses_nonsense(tmp_path):
    config = QuantConfig.from_dict({"low_rank": {"energy": 0.9}})
    assert config.low_rank == LowRank(0.9) and QuantConfig.from_dict(config.to_dict()) == config
    for data, message in [({"low_rank": {"energy": 0}}, r"low_rank.energy must be in \(0, 1\]"),
                          ({"low_rank": {"rank": 3}}, "'low_rank' takes keys energy"),
                          ({"low_rank": 0.9}, "must be a LowRank")]:
        with pytest.raises(QCompilerError, match=message):
            QuantConfig.from_dict(data)


def test_cli_config_asks_for_low_rank(digits_mlp, tmp_path):
    model, (x_train, _, x_test, _) = digits_mlp
    qcompiler.save(from_torch(model, (torch.from_numpy(x_test[:8]),)), tmp_path / "mlp.qir")
    np.savez(tmp_path / "cal.npz", x=x_train[:64])
    (tmp_path / "q.json").write_text(json.dumps({"low_rank": {"energy": 0.95}}))
    result = cli_in_process("compile", str(tmp_path / "mlp.qir"), "--calibration", str(tmp_path / "cal.npz"),
                            "--config", str(tmp_path / "q.json"), "-o", str(tmp_path / "out"), "--json")
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout)
    assert {e["layer"] for e in report["low_rank"]["layers"]} and report["quantized"]
    loaded = qcompiler.load(tmp_path / "out")
    assert loaded.config.low_rank == LowRank(0.95)
