"""Dynamic sequence length (``qcompiler.batching``): a transformer encoder compiled once runs at
any token count in its range, on the smallest bucket that holds it, zero-padded with the
attention mask excluding the padding; token-level outputs come back at the call's own length.
Checked against PyTorch fp32 at each real length, the reference interpreter, a fresh process
after loading, ONNX with a symbolic sequence axis, a batch x sequence grid, and the refusals."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

import qcompiler
from qcompiler.errors import InputError, QCompilerError
from tests.conftest import cli_in_process

SEQ = torch.export.Dim("seq", min=8, max=32)
BUCKETS = (8, 16, 32)
VOCAB = 50


class TinyEncoder(nn.Module):
    """A two-layer BERT (random weights) with masked mean pooling: the pooled sentence vector
    (no sequence axis) and the token states (the sequence at dimension 1)."""

    def __init__(self):
        super().__init__()
        from transformers import BertConfig, BertModel

        torch.manual_seed(0)
        config = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                            intermediate_size=64, max_position_embeddings=64)
        self.bert = BertModel(config, add_pooling_layer=False)

    def forward(self, input_ids, attention_mask):
        hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9), hidden


def tokens(count: int, length: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``count`` random sentences of ``length`` tokens (ids 1.., never the padding id 0)."""
    rng = np.random.default_rng(seed)
    return rng.integers(1, VOCAB, (count, length)).astype(np.int64), np.ones((count, length), np.int64)


def float_outputs(model: nn.Module, ids: np.ndarray, mask: np.ndarray) -> list[np.ndarray]:
    with torch.no_grad():
        return [o.numpy() for o in model(torch.from_numpy(ids), torch.from_numpy(mask))]


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


@pytest.fixture(scope="module")
def encoder():
    return TinyEncoder().eval()


@pytest.fixture(scope="module")
def calibration():
    # mixed lengths: each batch is zero-padded (mask 0) to the longest bucket for calibration
    return [tokens(1, length, seed) for seed, length in enumerate((32, 20, 9, 32, 27, 14))]


@pytest.fixture(scope="module")
def dynamic(encoder, calibration):
    example = tokens(1, 32, 99)
    return qcompiler.compile(encoder, tuple(torch.from_numpy(a) for a in example), calibration=calibration,
                             dynamic_shapes={"input_ids": {1: SEQ}, "attention_mask": {1: SEQ}},
                             sequence_buckets=BUCKETS)


def test_any_length_in_range_runs_at_its_own_length(encoder, dynamic):
    report = dynamic.report()
    (dim,) = report["dynamic"]["dims"]
    assert dim["buckets"] == list(BUCKETS) and dim["axis"] == 1 and dim["outputs"] == [None, 1]
    assert dim["padding_max_relative_error"] <= 1e-3 and report["dynamic"]["calibrated_at"] == [32]
    assert report["quantized"] and report["ops"]["integer"] >= 8
    for length in (8, 11, 16, 17, 25, 32):
        ids, mask = tokens(1, length, length)
        pooled, hidden = dynamic(ids, mask)
        want_pooled, want_hidden = float_outputs(encoder, ids, mask)
        assert hidden.shape == (1, length, 32) and pooled.shape == (1, 32)
        assert cosine(pooled, want_pooled) > 0.995 and cosine(hidden, want_hidden) > 0.99
        # the bucket's own run, padded by hand, cut back: what the dispatch promises
        bucket = next(b for b in BUCKETS if b >= length)
        padded = [np.pad(a, ((0, 0), (0, bucket - length))) for a in (ids, mask)]
        by_hand = dynamic.builds[(bucket,)](*padded)
        np.testing.assert_array_equal(pooled, by_hand[0])
        np.testing.assert_array_equal(hidden, by_hand[1][:, :length])


def test_every_bucket_matches_the_reference_interpreter(encoder, calibration, dynamic):
    reference = qcompiler.compile(encoder, tuple(torch.from_numpy(a) for a in tokens(1, 32, 99)),
                                  calibration=calibration, target="reference",
                                  dynamic_shapes={"input_ids": {1: SEQ}, "attention_mask": {1: SEQ}},
                                  sequence_buckets=BUCKETS)
    for length in (8, 13, 32):
        x = tokens(1, length, 7)
        for got, want in zip(dynamic(*x), reference(*x)):
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * float(np.max(np.abs(want))))


def test_the_buckets_replay_the_calibrated_buckets_smoothing(encoder, calibration):
    """SmoothQuant's factors are chosen once, on the calibrated bucket's data, and the other
    buckets replay them from its calibration record: the same groups, the same strengths, and
    each bucket's outputs those of its padded run (the report's padding check)."""
    config = qcompiler.QuantConfig(per_token="all", smooth_quant=True)
    built = qcompiler.compile(encoder, tuple(torch.from_numpy(a) for a in tokens(1, 32, 99)), calibration=calibration,
                              config=config, target="reference", sequence_buckets=BUCKETS,
                              dynamic_shapes={"input_ids": {1: SEQ}, "attention_mask": {1: SEQ}})
    chosen = [g["alpha"] for g in built.builds[(32,)].report()["smooth_quant"]["groups"] if g["alpha"] is not None]
    assert chosen
    for key in ((8,), (16,)):
        replayed = built.builds[key].report()["smooth_quant"]
        assert replayed["alpha"] == "from a calibration record"
        assert [g["alpha"] for g in replayed["groups"]] == chosen
    assert built.report()["dynamic"]["dims"][0]["padding_max_relative_error"] <= 1e-3
    ids, mask = tokens(1, 11, 5)
    pooled, _ = built(ids, mask)
    assert cosine(pooled, float_outputs(encoder, ids, mask)[0]) > 0.995


def test_the_artifact_takes_any_length_in_a_fresh_process(dynamic, tmp_path):
    folder = dynamic.save(tmp_path / "artifact")
    ids, mask = tokens(1, 21, 3)
    np.savez(tmp_path / "x.npz", ids=ids, mask=mask)
    script = (f"import numpy as np, qcompiler; m = qcompiler.load({str(folder)!r}); "
              f"x = np.load({str(tmp_path / 'x.npz')!r}); p, h = m(x['ids'], x['mask']); "
              f"np.savez({str(tmp_path / 'y.npz')!r}, p=p, h=h)")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    pooled, hidden = dynamic(ids, mask)
    with np.load(tmp_path / "y.npz") as y:
        np.testing.assert_array_equal(y["p"], pooled)
        np.testing.assert_array_equal(y["h"], hidden)
    loaded = qcompiler.load(folder)
    with pytest.raises(InputError, match=r"sequence 33 is outside dimension 1's range 'seq' 8\.\.32"):
        loaded(*tokens(1, 33, 0))
    with pytest.raises(InputError, match="share the sequence 'seq'"):
        loaded(tokens(1, 12, 0)[0], tokens(1, 13, 0)[1])


def test_a_batch_and_a_sequence_make_a_grid(encoder, calibration):
    batch = torch.export.Dim("batch", min=1, max=4)
    compiled = qcompiler.compile(encoder, tuple(torch.from_numpy(a) for a in tokens(2, 32, 5)),
                                 calibration=calibration,
                                 dynamic_shapes={"input_ids": {0: batch, 1: SEQ}, "attention_mask": {0: batch, 1: SEQ}},
                                 batch_buckets=(1, 4), sequence_buckets=(16, 32))  # 8..15: padded to 16
    assert len(compiled.builds) == 4 and compiled.report()["dynamic"]["calibrated_at"] == [1, 32]
    ids, mask = tokens(3, 12, 11)
    pooled, hidden = compiled(ids, mask)
    assert pooled.shape == (3, 32) and hidden.shape == (3, 12, 32)
    for i in range(3):  # each sentence alone: the same, bit for bit
        alone = compiled(ids[i:i + 1], mask[i:i + 1])
        np.testing.assert_array_equal(alone[0], pooled[i:i + 1])
        np.testing.assert_array_equal(alone[1], hidden[i:i + 1])


def test_onnx_with_a_symbolic_sequence_from_python_and_the_cli(encoder, calibration, dynamic, tmp_path):
    path = tmp_path / "enc.onnx"
    example = tuple(torch.from_numpy(a) for a in tokens(1, 16, 0))
    torch.onnx.export(encoder, example, str(path), input_names=["ids", "mask"], output_names=["pooled", "hidden"],
                      dynamic_axes={"ids": {1: "seq"}, "mask": {1: "seq"}, "hidden": {1: "seq"}}, dynamo=False)
    compiled = qcompiler.compile(str(path), calibration=calibration,
                                 input_shapes={"ids": [1, (8, 32)], "mask": [1, (8, 32)]}, sequence_buckets=BUCKETS)
    x = tokens(1, 19, 4)
    got, want = compiled(*x), dynamic(*x)
    assert got[1].shape == (1, 19, 32)
    for g, w in zip(got, want):
        assert cosine(g, w) > 0.999
    np.savez(tmp_path / "cal.npz", ids=np.concatenate([c[0] for c in calibration if c[0].shape[1] == 32]),
             mask=np.concatenate([c[1] for c in calibration if c[1].shape[1] == 32]))
    built = cli_in_process("compile", str(path), "--input-shape", "ids=1,8:32", "--input-shape", "mask=1,8:32",
                           "--calibration", str(tmp_path / "cal.npz"), "-o", str(tmp_path / "art"))
    assert built.returncode == 0, built.stderr
    assert "sequence" in built.stdout + built.stderr and "any of 8..32" in built.stdout + built.stderr
    loaded = qcompiler.load(tmp_path / "art")
    assert [d.buckets for d in loaded.dims] == [(8, 16, 32)]
    assert loaded(*x)[1].shape == (1, 19, 32)
    # `qcompiler run` reads data of any length in the range: here two batches of 19 tokens
    two = [tokens(1, 19, 5), tokens(1, 19, 6)]
    np.savez(tmp_path / "in.npz", ids=np.stack([t[0] for t in two]), mask=np.stack([t[1] for t in two]))
    ran = cli_in_process("run", str(tmp_path / "art"), "--inputs", str(tmp_path / "in.npz"), "-o",
                         str(tmp_path / "out.npz"))
    assert ran.returncode == 0, ran.stderr
    with np.load(tmp_path / "out.npz") as out:
        assert out["hidden"].shape == (2, 1, 19, 32)
        for i, t in enumerate(two):
            np.testing.assert_array_equal(out["hidden"][i], loaded(*t)[1])
    np.savez(tmp_path / "long.npz", ids=tokens(1, 40, 7)[0], mask=tokens(1, 40, 7)[1])
    refused = cli_in_process("run", str(tmp_path / "art"), "--inputs", str(tmp_path / "long.npz"))
    assert refused.returncode != 0 and "axis 1 any of 8..32" in refused.stderr


class _Unmasked(nn.Module):
    """Averages over every position, padding included: its output sees the padding."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 8)

    def forward(self, input_ids, attention_mask):
        return (self.embed(input_ids) * attention_mask.unsqueeze(-1)).mean(1)


def test_the_onnx_target_writes_one_model_with_a_symbolic_sequence(encoder, calibration, dynamic, tmp_path):
    """The BERT exports at 8 and 32 tokens differ in Reshape targets (-1), Expand shapes (their
    sizes read off the input at run time) and the position table and mask cut to the length
    (the longest one sliced at run time): one model.onnx with a symbolic 'seq', which ONNX Runtime
    runs at a length no bucket has, at the float model's outputs as closely as the llvm build."""
    import onnx
    import onnxruntime as ort

    compiled = qcompiler.compile(encoder, tuple(torch.from_numpy(a) for a in tokens(1, 16, 99)),
                                 calibration=calibration, target="onnx", sequence_buckets=(8, 32),
                                 dynamic_shapes={"input_ids": {1: SEQ}, "attention_mask": {1: SEQ}})
    assert compiled.report()["onnx_symbolic_dims"] == ["seq"]
    compiled.save(tmp_path / "art")
    exported = onnx.load(tmp_path / "art" / "model.onnx")
    assert [i.type.tensor_type.shape.dim[1].dim_param for i in exported.graph.input] == ["seq", "seq"]
    session = ort.InferenceSession(str(tmp_path / "art" / "model.onnx"), providers=["CPUExecutionProvider"])
    ids, mask = tokens(1, 19, 4)
    pooled, hidden = session.run(None, {"input_ids": ids, "attention_mask": mask})
    assert hidden.shape == (1, 19, 32)
    want = float_outputs(encoder, ids, mask)
    assert cosine(pooled, want[0]) > 0.99 and cosine(hidden, want[1]) > 0.99
    assert cosine(pooled, dynamic(ids, mask)[0]) > 0.99


def test_models_that_see_the_padding_and_bad_declarations_are_refused_in_one_line():
    model = _Unmasked().eval()
    example = tuple(torch.from_numpy(a) for a in tokens(1, 16, 0))
    short = torch.export.Dim("seq", min=8, max=16)
    with pytest.raises(QCompilerError, match="real positions see the padding"):
        qcompiler.compile(model, example, target="reference",
                          dynamic_shapes={"input_ids": {1: short}, "attention_mask": {1: short}})
    other = torch.export.Dim("other", min=8, max=32)
    with pytest.raises(QCompilerError, match="at most two dynamic dimensions"):
        qcompiler.compile(model, example, dynamic_shapes={"input_ids": {1: SEQ}, "attention_mask": {1: other}})
    with pytest.raises(QCompilerError, match="sequence_buckets given, but no sequence dimension is dynamic"):
        qcompiler.compile(model, example, dynamic_shapes={"input_ids": {0: torch.export.Dim("b", min=1, max=2)},
                                                          "attention_mask": {0: torch.export.Dim("b", min=1, max=2)}},
                          sequence_buckets=(8, 32))
    with pytest.raises(QCompilerError, match=r"dynamic dimension 'open' needs a max"):
        qcompiler.compile(model, example, dynamic_shapes={"input_ids": {1: torch.export.Dim("open")},
                                                          "attention_mask": {1: torch.export.Dim("open")}})
    with pytest.raises(QCompilerError, match=r"buckets \[9, 16\] of 'seq' must lie in 8..32, and end at 32"):
        qcompiler.compile(model, example, dynamic_shapes={"input_ids": {1: SEQ}, "attention_mask": {1: SEQ}},
                          sequence_buckets=(9, 16))


def test_a_size_dependent_constant_with_no_symbolic_form_is_refused_naming_it():
    """Two exports whose added constant is not, at the shorter length, the longer one's prefix:
    no rule makes it size-free, so the merge names it instead of guessing."""
    import onnx
    from onnx import helper, numpy_helper

    from qcompiler.targets.onnx.symbolic import merge

    def export(length: int, seed: int) -> bytes:
        table = np.random.default_rng(seed).standard_normal((1, length)).astype(np.float32)
        graph = helper.make_graph([helper.make_node("Add", ["x", "table"], ["y"])], "g",
                                  [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, length])],
                                  [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, length])],
                                  [numpy_helper.from_array(table, "table")])
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]).SerializeToString()

    with pytest.raises(QCompilerError, match="constant 'table' .* depends on the size"):
        merge({(8,): export(8, 0), (16,): export(16, 1)}, [[(1, "seq")]], [[(1, "seq")]], [("x", 1)])
