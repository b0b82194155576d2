"""Quantization-aware training (``qcompiler.qat.prepare``): the prepared module computes the QDQ
graph the build lowers; its fake quantization is the quantize kernel's arithmetic with LSQ
gradients; two epochs on the digits CNN with 4-bit weights end within 0.5 points of float; the
build of the trained module agrees with it (argmax >= 99.5 %, logits within 1 % of their range);
errors are one line."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import qcompiler
from qcompiler import QuantConfig
from qcompiler.errors import QCompilerError
from qcompiler.examples import zoo
from qcompiler.ir.ops import get_op
from qcompiler.qat import _FakeQuant

BATCH = 40


def test_fake_quantization_is_the_kernels_arithmetic_with_lsq_gradients():
    x = torch.tensor([-1.3, -0.05, 0.0, 0.049999, 0.25, 0.75, 2.5, 9.0], dtype=torch.float32, requires_grad=True)
    scale = torch.tensor(0.1, requires_grad=True)
    y = _FakeQuant.apply(x, scale, 10, 0, 255)
    q = get_op("quantize").run([x.detach().numpy(), np.float32(0.1), np.uint8(10)], {"axis": 0})[0]
    want = get_op("dequantize").run([q, np.float32(0.1), np.uint8(10)], {"axis": 0})[0]
    np.testing.assert_array_equal(y.detach().numpy(), want)  # round half to even, saturating, float32
    y.sum().backward()
    ratio = x.detach().numpy() / np.float32(0.1)  # float32, as the kernel divides
    levels = np.rint(ratio)
    inside = (levels + 10 >= 0) & (levels + 10 <= 255)
    np.testing.assert_array_equal(x.grad.numpy(), inside.astype(np.float32))  # -1.3 saturates at 0: no gradient
    local = np.where(inside, levels - ratio, np.clip(levels + 10, 0, 255) - 10)
    assert scale.grad.item() == pytest.approx(local.sum() / np.sqrt(8 * 255), rel=1e-4)


@pytest.fixture(scope="module")
def digits_qat(digits):
    model, (x_train, y_train, x_test, y_test) = digits
    calibration = [x_train[i:i + BATCH] for i in range(0, 8 * BATCH, BATCH)]
    example = (torch.from_numpy(x_test[:BATCH]),)
    config = QuantConfig(weight_dtype="i4")
    prepared = qcompiler.qat.prepare(model, example, calibration, config)
    untrained = qcompiler.compile(model, example, calibration=calibration, config=config, target="reference")
    first = prepared(torch.from_numpy(x_test[:BATCH])).detach().numpy()
    before = [s.item() for s in prepared.scales]
    zoo.fine_tune(prepared, x_train, y_train, epochs=2, batch=BATCH)
    return prepared, untrained, first, before, example


def test_the_prepared_module_starts_as_the_qdq_graph(digits, digits_qat):
    """Before training it computes the QDQ graph insert-qdq made from the calibration (to float
    rounding: torch's matmul against numpy's), and so agrees with the post-training build."""
    _, (_, _, x_test, _) = digits
    prepared, untrained, first, _, _ = digits_qat
    want = prepared.qdq(x_test[:BATCH])[0]
    np.testing.assert_allclose(first, want, atol=1e-3 * np.abs(want).max())
    assert (first.argmax(1) == np.asarray(untrained(x_test[:BATCH])).argmax(1)).mean() >= 0.975


def test_two_epochs_end_within_half_a_point_and_the_build_agrees(digits, digits_qat, tmp_path):
    model, (_, _, x_test, y_test) = digits
    prepared, _, _, before, example = digits_qat
    assert [s.item() for s in prepared.scales] != before  # the ranges were learned
    tests = [x_test[i:i + BATCH] for i in range(0, 360, BATCH)]
    with torch.no_grad():
        float_logits = np.concatenate([model(torch.from_numpy(b)).numpy() for b in tests])
        trained = np.concatenate([prepared(torch.from_numpy(b)).numpy() for b in tests])
    float_top1 = float((float_logits.argmax(1) == y_test[:360]).mean())
    assert float((trained.argmax(1) == y_test[:360]).mean()) >= float_top1 - 0.005
    built = qcompiler.compile(prepared, example)  # llvm: the learned weights and scales, no calibration
    report = built.report()
    assert report["qat"]["layers"] == 4 and report["qat"]["learned_scales"] >= 3
    assert report["size_bytes"]["compiled"] <= 0.16 * report["size_bytes"]["float"]
    assert report["fidelity"]["output_cosine"] > 0.999
    logits = np.concatenate([np.asarray(built(b)) for b in tests])
    assert (logits.argmax(1) == trained.argmax(1)).mean() >= 0.995
    assert np.abs(logits - trained).max() <= 0.01 * (trained.max() - trained.min())
    reference = qcompiler.compile(prepared, example, target="reference")
    np.testing.assert_array_equal(np.asarray(built(tests[0])), np.asarray(reference(tests[0])))
    # tied grids stay tied: the pool runs on the integers as in a post-training build
    assert built.graph.op_counts().get("max_pool2d", 0) == 1
    assert all(v.dtype == "u8" for n in built.graph.nodes if n.op == "max_pool2d" for v in n.inputs)
    built.save(tmp_path / "art")
    np.testing.assert_array_equal(np.asarray(qcompiler.load(tmp_path / "art")(tests[0])), np.asarray(built(tests[0])))
    assert prepared(torch.from_numpy(x_test[:7])).shape == (7, 10)  # trains on any batch size


def test_errors_are_one_line(digits, digits_qat):
    model, (x_train, _, x_test, _) = digits
    prepared, _, _, _, example = digits_qat
    with pytest.raises(QCompilerError, match="carries its learned ranges"):
        qcompiler.compile(prepared, example, calibration=[x_train[:BATCH]])
    with pytest.raises(QCompilerError, match=r"captured at input shapes \[\(40, 1, 8, 8\)\]"):
        qcompiler.compile(prepared, (torch.from_numpy(x_test[:8]),))
    with pytest.raises(QCompilerError, match="gptq rounds weights once"):
        qcompiler.qat.prepare(model, example, [x_train[:BATCH]], QuantConfig(gptq=True))
    odd = nn.Sequential(nn.Linear(8, 8), nn.LogSoftmax(dim=-1)).eval()
    x = np.random.default_rng(0).standard_normal((4, 8)).astype(np.float32)
    with pytest.raises(QCompilerError, match="qat: op\\(s\\) log_softmax have no torch form yet"):
        qcompiler.qat.prepare(odd, (torch.from_numpy(x),), [x])


def _brighter(x: np.ndarray) -> np.ndarray:
    return (0.8 * x + 0.5).astype(np.float32)  # data unlike the training data: stale batch-norm statistics


def test_batch_norms_train_their_statistics_for_bn_steps_then_freeze(digits):
    """With ``bn_steps`` the folded batch norms normalize with each batch's statistics and update
    their running ones for that many steps, then freeze: fine-tuned on brighter digits, the
    running means move to the conv outputs' true means, the module beats the frozen one, and the
    build (folding the learned statistics) agrees with the module in eval mode."""
    model, (x_train, y_train, x_test, y_test) = digits
    calibration = [x_train[i:i + BATCH] for i in range(0, 8 * BATCH, BATCH)]
    example = (torch.from_numpy(x_test[:BATCH]),)
    config = QuantConfig(weight_dtype="i4")
    live = qcompiler.qat.prepare(model, example, calibration, config, bn_steps=20)
    frozen = qcompiler.qat.prepare(model, example, calibration, config)
    assert sorted(live.batch_norms) == ["0", "1"] and not frozen.batch_norms  # the two conv+bn layers
    with torch.no_grad():  # in eval mode (frozen, folded) both compute the same QDQ graph
        np.testing.assert_array_equal(live.eval()(example[0]).numpy(), frozen.eval()(example[0]).numpy())
    conv = model.features[0]
    with torch.no_grad():
        true_mean = conv(torch.from_numpy(_brighter(x_train))).mean(dim=(0, 2, 3)).numpy()
    start = live.batch_norms["0"].running_mean.numpy().copy()
    torch.manual_seed(0)
    optimizer = torch.optim.Adam(live.parameters(), lr=1e-4)
    x, y = torch.from_numpy(_brighter(x_train)), torch.from_numpy(y_train)
    snapshot = None
    live.train()
    for step in range(30):
        batch = slice((step * BATCH) % 1200, (step * BATCH) % 1200 + BATCH)
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(live(x[batch]), y[batch]).backward()
        optimizer.step()
        if step + 1 == 20:
            snapshot = [bn.running_var.clone() for bn in live.batch_norms.values()]
            assert not live.batch_norms_live
    assert int(live.steps) == 30
    assert all(torch.equal(a, bn.running_var) for a, bn in zip(snapshot, live.batch_norms.values()))  # frozen
    moved = live.batch_norms["0"].running_mean.numpy()
    assert np.abs(moved - true_mean).max() < 0.3 * np.abs(start - true_mean).max()
    zoo.fine_tune(frozen, _brighter(x_train), y_train, epochs=1, batch=BATCH)
    live.eval()
    with torch.no_grad():
        shifted = torch.from_numpy(_brighter(x_test))
        accuracy = {name: float((m(shifted).numpy().argmax(1) == y_test).mean()) for name, m in
                    (("live", live), ("frozen", frozen))}
        trained = live(shifted[:BATCH]).numpy()
    assert accuracy["live"] > accuracy["frozen"], accuracy
    built = qcompiler.compile(live, example, target="reference")
    logits = np.asarray(built(_brighter(x_test[:BATCH])))
    assert (logits.argmax(1) == trained.argmax(1)).mean() >= 0.975
    assert np.abs(logits - trained).max() <= 0.02 * (trained.max() - trained.min())
    with pytest.raises(QCompilerError, match="bn_steps must be >= 0"):
        qcompiler.qat.prepare(model, example, calibration, config, bn_steps=-1)


class _TinyEncoder(nn.Module):
    """An embedding, one attention block with layer norm and a gelu feed-forward, a mean over the
    tokens and a classifier: the ops a transformer brings to the torch side."""

    def __init__(self, vocab: int = 50, width: int = 32):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.qkv, self.out = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.ff = nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width))
        self.head = nn.Linear(width, 4)

    def forward(self, ids):
        x = self.embed(ids)
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        attention = torch.softmax(q @ k.transpose(1, 2) / 32 ** 0.5, dim=-1)
        x = self.norm1(x + self.out(attention @ v))
        x = self.norm2(x + self.ff(x))
        return self.head(x.mean(dim=1))


def test_a_transformer_block_trains_and_builds():
    """Embedding, layer norm, attention products, softmax and gelu run on the torch side; a few
    steps on a toy task (is token 7 in the sentence?) lower the loss; the build agrees."""
    torch.manual_seed(0)
    model = _TinyEncoder().eval()
    data = np.random.default_rng(6)
    ids = data.integers(0, 50, (256, 12)).astype(np.int64)
    labels = (ids == 7).any(axis=1).astype(np.int64) + 2 * (ids == 9).any(axis=1)
    example = (torch.from_numpy(ids[:16]),)
    prepared = qcompiler.qat.prepare(model, example, [ids[i:i + 16] for i in range(0, 64, 16)],
                                     QuantConfig(min_layer_sqnr_db=None))
    np.testing.assert_allclose(prepared(torch.from_numpy(ids[:16])).detach().numpy(), prepared.qdq(ids[:16])[0],
                               atol=1e-3)

    def loss() -> float:
        with torch.no_grad():
            return float(nn.functional.cross_entropy(prepared(torch.from_numpy(ids)), torch.from_numpy(labels)))

    before = loss()
    zoo.fine_tune(prepared, ids, labels, epochs=3, batch=16, lr=3e-3)
    assert loss() < before
    built = qcompiler.compile(prepared, example, target="reference")
    with torch.no_grad():
        want = prepared(torch.from_numpy(ids[:16])).numpy()
    got = np.asarray(built(ids[:16]))
    assert (got.argmax(1) == want.argmax(1)).mean() >= 0.9
    assert built.graph.op_counts().get("linear_int", 0) >= 4


def test_low_rank_factors_fine_tuned_recover_the_accuracy():
    """The weight-decay digits MLP factored at energy 0.9 (a third of the int8 bytes) loses points
    after post-training quantization; two epochs of QAT on the factors win them back."""
    model, (x_train, y_train, x_test, y_test) = zoo.train_digits_mlp()
    calibration = [x_train[i:i + 72] for i in range(0, 576, 72)]
    example = (torch.from_numpy(x_test[:72]),)
    tests = [x_test[i:i + 72] for i in range(0, 360, 72)]

    def accuracy(run) -> float:
        return zoo.accuracy(np.concatenate([np.asarray(run(b)) for b in tests]), y_test[:360])

    with torch.no_grad():
        float_top1 = accuracy(lambda b: model(torch.from_numpy(b)).numpy())
    config = QuantConfig(low_rank=qcompiler.LowRank(energy=0.9))
    post_training = qcompiler.compile(model, example, calibration=calibration, config=config, target="reference")
    prepared = qcompiler.qat.prepare(model, example, calibration, config)
    assert prepared.qdq.op_counts()["linear"] > 3  # the factors are what trains
    zoo.fine_tune(prepared, x_train, y_train, epochs=2, batch=72, lr=1e-3)
    built = qcompiler.compile(prepared, example, target="reference")
    assert accuracy(post_training) < float_top1 - 0.01
    assert accuracy(built) >= float_top1 - 0.005
    assert built.report()["size_bytes"]["compiled"] == post_training.report()["size_bytes"]["compiled"]
