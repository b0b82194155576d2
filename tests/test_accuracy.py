"""Accuracy where a per-layer view misses the loss: outputs judged as the user reads them.

Each test builds the float model, quantizes it with the default config (no exclusions by
hand) and checks the quantized model against the float one on what the output means."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import qcompiler


class _JoinedBoxesAndScores(torch.nn.Module):
    """A detector head as real ones end: box coordinates (0..320 px) and class scores (0..1)
    joined in one tensor, [N, anchors, 4 + classes]; ``refined``: the joined tensor is also read
    by a 1x1 convolution (a second output), so that an int8 reader wants it quantized."""

    def __init__(self, classes: int = 4, refined: bool = False):
        super().__init__()
        self.backbone = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, padding=1, stride=2), torch.nn.ReLU(),
                                            torch.nn.Conv2d(16, 32, 3, padding=1), torch.nn.ReLU())
        self.box = torch.nn.Conv2d(32, 4, 1)
        self.cls = torch.nn.Conv2d(32, classes, 1)
        self.refine = torch.nn.Conv2d(4 + classes, 4 + classes, 1) if refined else None

    def forward(self, x):
        f = self.backbone(x)
        joined = torch.cat([torch.sigmoid(self.box(f)) * 320.0, torch.sigmoid(self.cls(f))], 1)
        detections = joined.flatten(2).transpose(1, 2)
        return detections if self.refine is None else (detections, self.refine(joined).flatten(1))


def _kept_detections(reference: np.ndarray, got: np.ndarray, threshold: float = 0.5) -> float:
    """The share of anchors whose best float score is above ``threshold`` that stay above it
    with the same class."""
    ref_scores, got_scores = reference[..., 4:], got[..., 4:]
    above = ref_scores.max(-1) > threshold
    kept = (got_scores.max(-1) > threshold) & (got_scores.argmax(-1) == ref_scores.argmax(-1))
    return float(kept[above].mean())


@pytest.mark.parametrize("refined", [False, True], ids=["output-only", "also-read-by-a-conv"])
@pytest.mark.parametrize("target", ["reference", "llvm"])
def test_a_joined_box_and_score_output_keeps_its_scores(target, refined):
    """Before: the join shared one uint8 grid over 0..320 (1.25 per step) and every score became
    0 or 1.25 (ONNX Runtime's static flow does the same), while each layer's local SQNR looked
    fine. The join now stays float, reported with why: nothing reads it as int8 (the output
    alone), or, where a convolution would, one grid would crush the scores."""
    torch.manual_seed(0)
    model = _JoinedBoxesAndScores(refined=refined).eval()
    rng = np.random.default_rng(0)
    calibration = [rng.standard_normal((2, 3, 32, 32)).astype(np.float32) for _ in range(4)]
    x = rng.standard_normal((2, 3, 32, 32)).astype(np.float32)
    compiled = qcompiler.compile(model, (torch.from_numpy(x),), calibration=calibration, target=target)
    with torch.no_grad():
        reference = model(torch.from_numpy(x))
    reference = (reference[0] if refined else reference).numpy()
    got = np.asarray(compiled(x)[0] if refined else compiled(x))
    assert (reference[..., 4:].max(-1) > 0.5).sum() >= 20  # the check has anchors to judge
    assert _kept_detections(reference, got) >= 0.9
    np.testing.assert_allclose(got[..., :4], reference[..., :4], atol=0.02 * 320)  # int8 convs before the sigmoid
    joins = [e for e in compiled.report()["kept_float"] if e["node"].startswith("concat")]
    why = "one int8 grid would leave it" if refined else "no reader takes its result as int8"
    assert len(joins) == 1 and why in joins[0]["reason"], compiled.report()["kept_float"]
    convs = compiled.graph.op_counts().get("conv2d_int", 0) if target == "reference" else None
    assert convs in (None, 5 if refined else 4)


def test_output_sqnr_judges_each_channel_group_of_an_output():
    """Scores lost next to boxes: the whole tensor's SQNR stays high, the scores' group is judged
    on its own."""
    from qcompiler.compare import sqnr_db
    from qcompiler.precision_search import channel_groups, output_sqnr_db

    rng = np.random.default_rng(0)
    reference = np.concatenate([rng.uniform(0, 320, (2, 50, 4)), rng.uniform(0, 1, (2, 50, 3))], -1)
    got = reference.copy()
    got[..., 4:] = 0.0  # every score rounded away
    assert sqnr_db(reference, got) > 40
    groups = channel_groups(reference, 2)
    assert sorted(map(sorted, groups)) == [[0, 1, 2, 3], [4, 5, 6]]
    assert output_sqnr_db([reference], [got]) == pytest.approx(sqnr_db(reference[..., 4:], got[..., 4:]))
    assert output_sqnr_db([reference], [got]) < 1
    assert channel_groups(rng.standard_normal((4, 10)), 1)[0].size == 10  # similar channels: one group
    # one sample's logits: magnitudes from ~0 to a few, a continuum with ratios > 10 near zero
    logits = rng.standard_normal((1, 1000))
    logits[0, :3] = [1e-6, -1e-4, 1e-2]  # neighbours 100x apart, yet no structure
    assert [g.size for g in channel_groups(logits, 1)] == [1000]
    assert output_sqnr_db([logits], [logits + 1e-3]) == pytest.approx(sqnr_db(logits, logits + 1e-3))
    # a dead output channel (zero in float, a rounding's worth in int8) is not a group of its own to "fix"
    dead = rng.standard_normal((8, 6))
    dead[:, 2] = 0.0
    noisy = dead + 1e-4
    assert output_sqnr_db([dead], [noisy]) == pytest.approx(sqnr_db(dead, noisy))


def test_the_precision_search_finds_a_loss_only_the_output_shows(monkeypatch):
    """With the join rule off, the crushed scores show nowhere but at the output: the search
    keeps the join (or its int8 reader) float and reports what that bought."""
    import qcompiler.passes.insert_qdq as insert_qdq

    monkeypatch.setattr(insert_qdq, "JOIN_SPREAD", float("inf"))
    torch.manual_seed(0)
    model = _JoinedBoxesAndScores(refined=True).eval()  # a convolution reads the join: it is quantized
    rng = np.random.default_rng(0)
    calibration = [rng.standard_normal((2, 3, 32, 32)).astype(np.float32) for _ in range(4)]
    x = torch.from_numpy(calibration[0])
    plain = qcompiler.compile(model, (x,), calibration=calibration, target="reference")
    with torch.no_grad():
        reference = model(x)[0].numpy()
    assert _kept_detections(reference, np.asarray(plain(calibration[0])[0])) < 0.5  # the loss is real
    config = qcompiler.QuantConfig(target_output_sqnr_db=30.0)
    compiled = qcompiler.compile(model, (x,), calibration=calibration, target="reference", config=config)
    found = compiled.report()["precision_search"]
    assert found["met"] and found["before_db"] < 30 <= found["after_db"]
    # one promotion restores it: the join, or the convolution reading it (with no int8 reader
    # left, the join is not quantized either)
    assert [[n.split()[0] for n in p["nodes"]] for p in found["promoted"]] in ([["concat"]], [["conv2d"]])
    assert found["promoted"][0]["gain_db"] > 0 and found["promoted"][0]["cost"] > 0
    assert _kept_detections(reference, np.asarray(compiled(calibration[0])[0])) >= 0.9
    reasons = [e["reason"] for e in compiled.report()["kept_float"] if e["node"].startswith("concat")]
    assert len(reasons) == 1 and any(why in reasons[0] for why in ("target_output_sqnr_db 30", "int8"))


class _Outliers(torch.nn.Module):
    """An MLP whose first layer's outputs hold two channels 100x the rest (as transformers'
    hidden states do): per-tensor int8 on that tensor crushes the other 62."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = torch.nn.Linear(16, 64), torch.nn.Linear(64, 64), torch.nn.Linear(64, 8)
        with torch.no_grad():
            self.a.weight[:2] *= 100.0

    def forward(self, x):
        return self.c(torch.relu(self.b(torch.relu(self.a(x)))))


def _outliers_case():
    torch.manual_seed(0)
    model = _Outliers().eval()
    rng = np.random.default_rng(1)
    calibration = [rng.standard_normal((16, 16)).astype(np.float32) for _ in range(4)]
    return model, calibration


def test_the_precision_search_meets_the_target_keeping_few_layers_float():
    from qcompiler.compare import sqnr_db

    model, calibration = _outliers_case()
    x = torch.from_numpy(calibration[0])
    with torch.no_grad():
        reference = model(x).numpy()
    base = qcompiler.compile(model, (x,), calibration=calibration, target="reference",
                             config=qcompiler.QuantConfig(min_layer_sqnr_db=None))
    before = sqnr_db(reference, np.asarray(base(calibration[0])))
    target = before + 3.0
    config = qcompiler.QuantConfig(min_layer_sqnr_db=None, target_output_sqnr_db=target)
    compiled = qcompiler.compile(model, (x,), calibration=calibration, target="reference", config=config)
    found = compiled.report()["precision_search"]
    assert found["before_db"] == pytest.approx(before, abs=0.2) and found["met"]  # QDQ vs integer rounding
    # the first linear's result is the crushed tensor: it and its reader go float together; the last stays int8
    assert [p["nodes"] for p in found["promoted"]] == [["linear 'a' (%0)", "linear 'b' (%2)"]]
    assert found["layers_measured"] == 3
    # what the search measured is what ships: the compiled model itself, measured here
    after = sqnr_db(reference, np.asarray(compiled(calibration[0])))
    assert after >= target and found["after_db"] == pytest.approx(after, abs=0.01)
    assert compiled.graph.op_counts().get("linear_int", 0) >= 1  # not everything went back to float


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_target_sqnr_from_the_cli(tmp_path, precision):
    import json

    from tests.conftest import cli_in_process, export_onnx

    model, calibration = _outliers_case()
    np.savez(tmp_path / "cal.npz", x=np.stack(calibration))
    path = export_onnx(model, (torch.zeros(16, 16),), tmp_path / "m.onnx", ["x"])
    done = cli_in_process("compile", path, "--calibration", str(tmp_path / "cal.npz"), "--target", "reference",
                          "--target-sqnr", "35", "--float-precision", precision, "-o", str(tmp_path / "art"), "--json")
    assert done.returncode == 0, done.stderr
    assert "search precision: target 35 dB at the outputs" in done.stderr  # a CI log shows the long step
    report = json.loads(done.stdout)
    found = report["precision_search"]
    assert found["met"] and found["before_db"] < 35 <= found["after_db"] and found["action"] == (
        "bf16" if precision == "bf16" else "keeping it float")
    promoted = {e["node"] for e in report["kept_float"] if "target_output_sqnr_db 35" in e["reason"]}
    assert promoted and {e["precision"] for e in report["kept_float"] if e["node"] in promoted} == {precision}
    assert found["promoted"] and {n.split()[0] for p in found["promoted"] for n in p["nodes"]} == {"linear"}
    compared = cli_in_process("compare", path, "--calibration", str(tmp_path / "cal.npz"), "--target-sqnr", "35",
                              "--float-precision", precision, "--json")
    assert compared.returncode == 0, compared.stderr
    report = json.loads(compared.stdout)
    assert report["precision_search"] == found  # the same search, as a debugging table
    assert {e["op"] for e in report["layers"]} >= {"linear"}
    assert cli_in_process("compare", path, "--calibration", str(tmp_path / "cal.npz"), "--target-sqnr",
                          "35").returncode == 0
    refused = cli_in_process("compile", path, "--target-sqnr", "25", "-o", str(tmp_path / "art3"))
    assert refused.returncode != 0 and "--target-sqnr" in refused.stderr and len(refused.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "art3").exists()


def test_a_target_only_float_meets_keeps_every_layer_float_and_says_so():
    model, calibration = _outliers_case()
    config = qcompiler.QuantConfig(target_output_sqnr_db=500.0)
    compiled = qcompiler.compile(model, (torch.from_numpy(calibration[0]),), calibration=calibration,
                                 target="reference", config=config)
    found = compiled.report()["precision_search"]
    assert found["met"] and found["after_db"] is None  # no error at all (JSON has no infinity)
    kept = [e for e in compiled.report()["kept_float"] if "target_output_sqnr_db 500" in e["reason"]]
    assert len(kept) == sum(len(p["nodes"]) for p in found["promoted"]) == 3
    assert "linear_int" not in compiled.graph.op_counts()


class _QuietRows(torch.nn.Module):
    """A residual block closed by a layer norm, over tokens whose sizes span 1000x (a transformer's
    residual stream: a few tokens carry most of the magnitude); the sum is also read by a linear
    head (a second output), which takes it as int8, so the add is quantized."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.proj, self.norm = torch.nn.Linear(32, 32, bias=False), torch.nn.LayerNorm(32)
        self.head = torch.nn.Linear(32, 8)

    def forward(self, x):
        h = x + self.proj(x)
        return self.norm(h), self.head(h)


def test_a_result_a_layer_norm_rescales_is_judged_row_by_row():
    """The add's int8 grid, set by the large tokens, wipes out the quiet ones; by the tensor's
    energy its SQNR looks fine, but the layer norm scales each row back to unit size. compare()
    measures such a result row by row (each row divided by its float RMS), the sensitivity
    check then keeps the add float, and the quiet tokens come out right."""
    from qcompiler.compare import compare
    from qcompiler.interpreter import values_of
    from qcompiler.ir.ops import get_op
    from qcompiler.quant_config import QuantConfig

    rng = np.random.default_rng(0)
    scales = np.logspace(-3, 0, 16)[None, :, None]
    calibration = [(rng.standard_normal((2, 16, 32)) * scales).astype(np.float32) for _ in range(3)]
    model = _QuietRows().eval()
    graph = qcompiler.from_torch(model, (torch.from_numpy(calibration[0]),))
    plain = qcompiler.quantize(graph, calibration, QuantConfig(min_layer_sqnr_db=None, per_token="off"))
    add = next(n for n in plain.float_graph.nodes if n.op == "add")
    entry = next(e for e in compare(plain.float_graph, plain.qdq_graph, (calibration[0],)) if e.handle == add.handle)
    # the oracle: the add alone on its float operands through their quantize/dequantize pairs, its
    # result through its own, rows normalized here
    qdq = plain.qdq_graph

    def fake_quantized(v, params_of) -> np.ndarray:
        params = [qdq.constant_array(c) for c in params_of.inputs[1:]]
        codes = get_op("quantize").run([v.astype(np.float32), *params], params_of.attrs)[0]
        return get_op("dequantize").run([codes, *params], params_of.attrs)[0].astype(np.float64)

    seen = values_of(plain.float_graph, [calibration[0]], [*add.inputs, add.output])
    q_add = next(n for n in qdq.nodes if n.handle == add.handle)
    operands = [fake_quantized(seen[id(f)], q.producer) for f, q in zip(add.inputs, q_add.inputs)]
    x = seen[id(add.output)].astype(np.float64)
    fake = fake_quantized(operands[0] + operands[1], next(u for u in qdq.users_of(q_add.output) if u.op == "quantize"))
    rms = np.sqrt(np.mean(x ** 2, axis=-1, keepdims=True))
    by_rows = 10 * np.log10(np.sum((x / rms) ** 2) / np.sum(((x - fake) / rms) ** 2))
    whole = 10 * np.log10(np.sum(x ** 2) / np.sum((x - fake) ** 2))
    assert entry.local_sqnr_db == pytest.approx(by_rows, abs=0.01) and whole > by_rows + 10, (whole, by_rows)
    checked = qcompiler.quantize(graph, calibration, QuantConfig(per_token="off", float_precision="fp32"))
    assert any(e["node"].startswith("add") for e in checked.report["kept_float"])
    sample = calibration[1]
    with torch.no_grad():
        want = model(torch.from_numpy(sample))[0].numpy()

    def worst_row_sqnr(got: np.ndarray) -> float:
        err = ((want - got.reshape(want.shape)) ** 2).sum(-1)
        return float(10 * np.log10((want ** 2).sum(-1) / err).min())

    assert worst_row_sqnr(checked.graph(sample)[0]) > worst_row_sqnr(plain.graph(sample)[0]) + 10
