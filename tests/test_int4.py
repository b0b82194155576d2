"""4-bit weights (``QuantConfig(weight_dtype="i4", weight_group_size=G)``): the packed storage
round-trips exactly through text, files, artifacts and ONNX; the group values against a numpy
reference; the llvm build bit-exact with the reference interpreter; the digits CNN meets the
size and accuracy bar; layers int4 cannot carry take int8 weights before float."""
from __future__ import annotations

import json
import re
import zipfile

import numpy as np
import onnx
import pytest
import torch
from torch import nn

import qcompiler
from qcompiler import QuantConfig, from_torch
from qcompiler.errors import ParseError, QCompilerError
from qcompiler.ir import Graph, TensorType, load_graph, parse_graph, print_graph, save
from qcompiler.ir.packing import M_MAX, Q_MAX, Int4Groups
from qcompiler.passes.insert_qdq import quantize_weight
from qcompiler.quantize import quantize
from tests.conftest import cli_in_process

rng = np.random.default_rng(0)


def _int4_array(shape: tuple[int, ...], group: int) -> np.ndarray:
    """Random 4-bit values times random group multipliers: what insert-qdq stores."""
    rows, cols = shape[0], int(np.prod(shape[1:]))
    q = rng.integers(-Q_MAX, Q_MAX + 1, (rows, cols))
    m = rng.integers(1, M_MAX + 1, (rows, -(-cols // group)))
    return (q * np.repeat(m, group, axis=1)[:, :cols]).astype(np.int8).reshape(shape)


@pytest.mark.parametrize("shape, group", [((8, 64), 32), ((6, 5, 3, 3), 32), ((3, 7), 4), ((4, 9), 1)])
def test_packing_round_trips_at_half_a_byte_per_weight(shape, group):
    storage = Int4Groups(group)
    w = _int4_array(shape, group)
    nibbles, multipliers = storage.pack(w)
    assert nibbles.dtype == np.uint8 and nibbles.size == (w.size + 1) // 2
    assert storage.nbytes(w) == nibbles.nbytes + multipliers.nbytes
    np.testing.assert_array_equal(storage.unpack(nibbles, multipliers, shape), w)


def test_packing_refuses_what_is_not_four_bit():
    storage = Int4Groups(4)
    assert storage.multipliers(np.array([[127, 0, 0, 0]], np.int8)) is None  # 127 is prime and > 7 * 18
    assert storage.multipliers(np.array([[8, 1, 0, 0]], np.int8)) is None  # 8 needs m >= 2, 1 needs m = 1
    assert storage.multipliers(np.array([[1.0, 2.0]], np.float32)) is None
    w = _int4_array((2, 8), 4)
    nibbles, multipliers = storage.pack(w)
    with pytest.raises(ValueError, match="do not describe"):
        storage.unpack(nibbles[:-1], multipliers, w.shape)
    with pytest.raises(ValueError, match="outside"):
        storage.unpack(np.zeros_like(nibbles), multipliers, w.shape)  # code 0 is -8, not a symmetric value
    with pytest.raises(ValueError, match="does not fit"):
        Graph().add_constant("w", np.full((2, 4), 127, np.int8), storage=storage)


def _reference_error(w: np.ndarray, scale: np.ndarray, group: int) -> np.ndarray:
    """Squared error per [row, group] of the plain choice: the smallest multiplier covering the
    group's range, values rounded to it (numpy, independent of the pass)."""
    rows = w.reshape(w.shape[0], -1).astype(np.float64)
    errors = []
    for start in range(0, rows.shape[1], group):
        block = rows[:, start:start + group]
        m = np.clip(np.ceil(np.abs(block).max(axis=1) / (Q_MAX * scale) - 1e-9), 1, M_MAX)[:, None]
        step = scale[:, None] * m
        q = np.clip(np.rint(block / step), -Q_MAX, Q_MAX)
        errors.append(((block - q * step) ** 2).sum(axis=1))
    return np.stack(errors, axis=1)


def test_group_values_beat_the_covering_choice_and_per_channel_int4():
    """Groups of very different magnitudes in one channel: each group's error is at most the
    covering multiplier's, and the whole is far better than one 4-bit scale per channel."""
    w = (rng.standard_normal((16, 128)) * np.repeat(rng.uniform(0.05, 1.0, (16, 4)), 32, axis=1)).astype(np.float32)
    q, scale = quantize_weight(w, True, groups=Int4Groups(32))
    assert Int4Groups(32).multipliers(q) is not None
    assert np.allclose(scale, np.abs(w).max(axis=1) / (Q_MAX * M_MAX), rtol=1e-6)
    dequantized = q.astype(np.float64) * scale[:, None]
    ours = ((w - dequantized) ** 2).reshape(16, 4, 32).sum(axis=2)
    assert (ours <= _reference_error(w, scale.astype(np.float64), 32) * (1 + 1e-9)).all()
    channel_step = np.abs(w).max(axis=1, keepdims=True) / Q_MAX
    per_channel = np.clip(np.rint(w / channel_step), -Q_MAX, Q_MAX) * channel_step
    assert ours.sum() < 0.5 * ((w - per_channel) ** 2).sum()


def test_dead_channels_stay_zero_with_a_sane_scale():
    w = rng.standard_normal((4, 64)).astype(np.float32)
    w[1] = 1e-40
    q, scale = quantize_weight(w, True, groups=Int4Groups(32))
    assert not q[1].any() and scale[1] == pytest.approx(np.abs(w).max() / (Q_MAX * M_MAX), rel=1e-6)


def _packed_graph() -> tuple[Graph, np.ndarray]:
    g = Graph()
    x = g.add_input("x", TensorType((2, 64), "f32"))
    w = _int4_array((8, 64), 32)
    q = g.add_constant("w.quantized", w, storage=Int4Groups(32))
    s = g.add_constant("w.scale", np.full(8, 0.01, np.float32))
    z = g.add_constant("w.zero_point", np.zeros(8, np.int8))
    dq = g.add_node("dequantize", [q, s, z], {"axis": 0})
    g.set_outputs([g.add_node("linear", [x, dq.output]).output])
    return g, w


def test_text_and_files_keep_the_packed_storage(tmp_path):
    g, w = _packed_graph()
    text = print_graph(g)
    assert 'const @w.quantized : i8[8,64] stored "i4/32"' in text
    assert g.copy().storage == {"w.quantized": Int4Groups(32)}
    again = parse_graph(text, {"w.quantized": w, "w.scale": g.constants["w.scale"]})
    assert again.storage == g.storage
    save(g, tmp_path / "g.qir")
    with zipfile.ZipFile(tmp_path / "g.npz") as z:
        assert sorted(z.namelist()) == ["w.quantized#i4.npy", "w.quantized#i4m.npy"]  # no int8 copy
    loaded = load_graph(tmp_path / "g.qir")
    np.testing.assert_array_equal(loaded.constants["w.quantized"], w)
    assert loaded.storage == g.storage and g.constant_nbytes("w.quantized") == 8 * 32 + 8 * 2
    x = rng.standard_normal((2, 64)).astype(np.float32)
    np.testing.assert_array_equal(loaded(x)[0], g(x)[0])
    with pytest.raises(ParseError, match=r"stored i4/32.*does not fit|does not fit storage"):
        parse_graph(text, {"w.quantized": np.full((8, 64), 127, np.int8), "w.scale": g.constants["w.scale"]})
    with pytest.raises(ParseError, match="unknown packed storage"):
        parse_graph(text.replace('"i4/32"', '"i3/32"'), {"w.quantized": w, "w.scale": g.constants["w.scale"]})


def test_config_checks_its_fields():
    assert QuantConfig(weight_dtype="i4").scheme().weight_group_size == 32
    with pytest.raises(QCompilerError, match="weight_dtype 'i3' is not one of i8, i4"):
        QuantConfig(weight_dtype="i3")
    with pytest.raises(QCompilerError, match="needs per_channel=true"):
        QuantConfig(weight_dtype="i4", per_channel=False)
    with pytest.raises(QCompilerError, match="weight_group_size must be in 1..4096"):
        QuantConfig(weight_dtype="i4", weight_group_size=0)
    assert QuantConfig.from_dict({"weight_dtype": "i4", "weight_group_size": 16}).weight_group_size == 16


@pytest.fixture(scope="module")
def digits_int4(digits):
    model, (x_train, _, x_test, y_test) = digits
    example = (torch.from_numpy(x_test[:1]),)
    calibration = [x_train[i:i + 1] for i in range(64)]
    config = QuantConfig(weight_dtype="i4", weight_group_size=32)
    return {t: qcompiler.compile(model, example, calibration=calibration, config=config, target=t)
            for t in ("llvm", "reference", "onnx")}


def test_digits_cnn_int4_is_small_accurate_and_bit_exact(digits, digits_int4, tmp_path):
    """Weight bytes <= 0.16x float32 and top-1 within 2 points of float; the llvm build computes
    exactly what the reference interpreter does; the artifact's weights are stored packed."""
    model, (x_train, _, x_test, y_test) = digits
    llvm, reference = digits_int4["llvm"], digits_int4["reference"]
    report = llvm.report()
    assert report["size_bytes"]["compiled"] <= 0.16 * report["size_bytes"]["float"]
    assert "insert-qdq{weight_dtype=i4}" in llvm.pipeline
    with torch.no_grad():
        float_top1 = float((model(torch.from_numpy(x_test)).argmax(1).numpy() == y_test).mean())
    logits = np.concatenate([llvm(x_test[i:i + 1]) for i in range(len(x_test))])
    assert float((logits.argmax(1) == y_test).mean()) >= float_top1 - 0.02
    for i in range(0, len(x_test), 37):
        np.testing.assert_array_equal(llvm(x_test[i:i + 1]), reference(x_test[i:i + 1]))
    packed = [n for n in llvm.graph.constants if n in llvm.graph.storage]
    assert len(packed) >= 3  # both convs and the linears
    llvm.save(tmp_path / "art")
    with zipfile.ZipFile(tmp_path / "art" / "graph.npz") as z:
        assert all(f"{name}#i4.npy" in z.namelist() for name in packed)
    loaded = qcompiler.load(tmp_path / "art")
    assert loaded.graph.storage == llvm.graph.storage
    np.testing.assert_array_equal(loaded(x_test[:1]), llvm(x_test[:1]))


def test_onnx_target_writes_int4_blocked_dequantize(digits, digits_int4):
    """Opset 21 INT4 initializers dequantized in blocks of the group size; ONNX Runtime's outputs
    agree with the reference interpreter to float rounding of the group scales."""
    _, (_, _, x_test, _) = digits
    compiled, reference = digits_int4["onnx"], digits_int4["reference"]
    model = onnx.load_from_string(compiled._executable)
    assert model.opset_import[0].version == 21
    int4 = [t for t in model.graph.initializer if t.data_type == onnx.TensorProto.INT4]
    assert len(int4) >= 6  # values and zero points of three layers
    blocked = [n for n in model.graph.node if n.op_type == "DequantizeLinear"
               and any(a.name == "block_size" and a.i == 32 for a in n.attribute)]
    assert len(blocked) == len(int4) // 2
    got = np.concatenate([compiled(x_test[i:i + 1]) for i in range(60)])
    want = np.concatenate([reference(x_test[i:i + 1]) for i in range(60)])
    assert (got.argmax(1) == want.argmax(1)).mean() >= 0.98
    assert np.abs(got - want).max() <= 0.05 * np.abs(want).max()


class _TwoLayers(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(64, 64), nn.Linear(64, 8)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def test_layers_int4_cannot_carry_take_int8_weights_first(tmp_path):
    """With a local-SQNR floor int4 weights miss but int8 ones meet, the layers keep int8 weights
    (reported with the reason, in the pipeline, in the calibration record) rather than going float."""
    torch.manual_seed(0)
    model = _TwoLayers().eval()
    x = rng.standard_normal((16, 64)).astype(np.float32)
    graph = from_torch(model, (torch.from_numpy(x),))
    config = QuantConfig(weight_dtype="i4", min_layer_sqnr_db=30.0)
    result = quantize(graph, [x], config)
    report = result.report
    kept = {e["layer"] for e in report.get("int8_weights", [])}
    assert kept and all("with int4 weights" in e["reason"] for e in report["int8_weights"])
    assert not [e for e in report.get("not_quantized", []) if "SQNR" in e["reason"]]
    assert "int8_weights=" in result.pipeline
    assert len(result.graph.storage) == 2 - len(kept)
    int8_only = quantize(graph, [x], QuantConfig(min_layer_sqnr_db=30.0))
    assert not int8_only.report.get("not_quantized")  # int8 weights meet the floor: what int4 fell back to
    result.calibration.save(tmp_path / "ranges.json")
    assert json.loads((tmp_path / "ranges.json").read_text())["int8_weights"]
    replayed = quantize(graph, None, config, ranges=tmp_path / "ranges.json")
    assert "int8_weights=" in replayed.pipeline
    assert replayed.graph.storage == result.graph.storage
    np.testing.assert_array_equal(replayed.graph(x)[0], result.graph(x)[0])


def test_cli_config_json_builds_int4(digits, tmp_path):
    model, (x_train, _, x_test, _) = digits
    onnx_path = tmp_path / "digits.onnx"
    torch.onnx.export(model, (torch.from_numpy(x_test[:4]),), str(onnx_path), input_names=["image"], dynamo=False)
    np.savez(tmp_path / "cal.npz", image=x_train[:64])
    (tmp_path / "config.json").write_text(json.dumps({"weight_dtype": "i4", "weight_group_size": 16, "gptq": True,
                                                      "target_output_sqnr_db": 30.0}))
    done = cli_in_process("compile", str(onnx_path), "--calibration", str(tmp_path / "cal.npz"), "--config",
                          str(tmp_path / "config.json"), "-o", str(tmp_path / "art"), "--target", "reference")
    assert done.returncode == 0, done.stderr
    manifest = json.loads((tmp_path / "art" / "manifest.json").read_text())
    assert manifest["quant_config"]["weight_dtype"] == "i4" and "weight_group_size=16" in manifest["pipeline"]
    assert "gptq{weight_dtype=i4,weight_group_size=16," in manifest["pipeline"]  # then the int8-weight layers
    summary = " ".join((done.stdout + done.stderr).split())
    assert re.search(r"gptq │ \d+ of 4 layers rounded", summary) and "int8-weight search │ output SQNR" in summary
    assert re.search(r"4-bit weights │ \d+ layers; \d+ kept int8 weights", summary)
    (tmp_path / "bad.json").write_text(json.dumps({"weight_dtype": "i2"}))
    bad = cli_in_process("compile", str(onnx_path), "--calibration", str(tmp_path / "cal.npz"), "--config",
                         str(tmp_path / "bad.json"), "-o", str(tmp_path / "art2"))
    assert bad.returncode != 0 and "weight_dtype 'i2' is not one of i8, i4" in bad.stderr
    assert "Traceback" not in bad.stderr and not (tmp_path / "art2").exists()


class _Deep(nn.Module):
    """Six linears of equal width: 4-bit error spread evenly, no layer much worse than another."""

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(64, 64) for _ in range(6))

    def forward(self, x):
        for layer in self.layers:
            x = torch.relu(layer(x))
        return x


def test_an_output_target_gives_int8_weights_before_float():
    """A target between the int4 and int8 builds' output SQNR is met by int8 weights on some
    layers (the search bisects when each layer alone gains little), none kept float, and what
    ships measures what the search said."""
    from qcompiler.compare import sqnr_db

    torch.manual_seed(0)
    model = _Deep().eval()
    data = np.random.default_rng(0)  # its own data: the test's outcome must not depend on which tests ran first
    calibration = [data.standard_normal((32, 64)).astype(np.float32) for _ in range(2)]
    x = torch.from_numpy(calibration[0])
    with torch.no_grad():
        reference = model(x).numpy()

    def build(**fields):
        config = QuantConfig(min_layer_sqnr_db=None, **fields)
        return qcompiler.compile(model, (x,), calibration=calibration, target="reference", config=config)

    int4 = sqnr_db(reference, np.asarray(build(weight_dtype="i4")(calibration[0])))
    int8 = sqnr_db(reference, np.asarray(build()(calibration[0])))
    assert int8 > int4 + 6
    target = (int4 + int8) / 2
    compiled = build(weight_dtype="i4", target_output_sqnr_db=target)
    report = compiled.report()
    found = report["int8_weight_search"]
    assert found["met"] and found["before_db"] < target <= found["after_db"]
    assert "precision_search" not in report or not report["precision_search"]["promoted"]
    assert 0 < len(report["int8_weights"]) < 6 and not report["kept_float"]
    assert all("int8 weights gained" in e["reason"] for e in report["int8_weights"])
    assert 0 < len(compiled.graph.storage) < 6  # the rest stay 4-bit
    after = sqnr_db(reference, np.asarray(compiled(calibration[0])))
    assert after >= target - 0.3  # the search measured the QDQ graph; this is the integer one


@pytest.mark.parametrize("weight_dtype", ["i8", "i4"])
def test_weight_only_fallback_keeps_the_weights_small(weight_dtype):
    """A floor no layer meets with int8 activations: with ``weight_only_fallback`` every layer keeps
    quantized weights and float activations (an i4 layer climbs int4 -> int8 weights -> weight-only
    int4 -> weight-only int8, one step a round), says so, and computes float activations times the
    quantized weights; without it, everything is float."""
    from qcompiler.compare import sqnr_db

    torch.manual_seed(0)
    model = _TwoLayers().eval()
    x = np.random.default_rng(2).standard_normal((16, 64)).astype(np.float32)
    example = (torch.from_numpy(x),)

    def build(fallback: bool, target: str = "reference"):
        config = QuantConfig(weight_dtype=weight_dtype, min_layer_sqnr_db=80.0, weight_only_fallback=fallback)
        return qcompiler.compile(model, example, calibration=[x], config=config, target=target)

    all_float, weight_only = build(False), build(True)
    assert all_float.report()["size_bytes"]["compiled"] >= all_float.report()["size_bytes"]["float"]
    report = weight_only.report()
    assert report["size_bytes"]["compiled"] < 0.3 * report["size_bytes"]["float"]
    reasons = [e["reason"] for e in report["kept_float"] if e["node"].startswith("linear")]
    assert len(reasons) == 2 and all("weight-only (weights quantized, activations float)" in r for r in reasons)
    if weight_dtype == "i4":
        assert all("weight-only with int4 weights < min_layer_sqnr_db 80" in r for r in reasons)
        assert len(report["int8_weights"]) == 2
    graph = weight_only.graph
    linears = [n for n in graph.nodes if n.op == "linear"]
    assert len(linears) == 2 and all(n.inputs[0].dtype == "f32" for n in linears)
    weights = [n.inputs[1].producer for n in linears]
    assert all(w.op == "dequantize" and w.inputs[0].dtype == "i8" for w in weights)
    with torch.no_grad():
        reference = model(torch.from_numpy(x)).numpy()
    expected = graph(x)[0]  # the interpreter: float activations, dequantized weights
    np.testing.assert_allclose(np.asarray(build(True, "llvm")(x)), expected, rtol=1e-4, atol=1e-4)
    assert sqnr_db(reference, expected) > 35.0


def test_weight_only_layers_keep_four_bit_weights_when_activations_were_at_fault():
    """An outlier input channel 10^3 times the rest: int8 activations crush the layer, int8 weights
    do not help, 4-bit weights with float activations meet the floor: the layer ships weight-only
    at 4 bits."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32)).eval()
    data = np.random.default_rng(4)
    x = data.standard_normal((64, 64)).astype(np.float32)
    x[:, 0] *= 1e3  # a wide input channel the layer all but ignores: its range crushes the others
    with torch.no_grad():
        model[0].weight[:, 0] *= 1e-3
    config = QuantConfig(weight_dtype="i4", min_layer_sqnr_db=15.0, weight_only_fallback=True)
    compiled = qcompiler.compile(model, (torch.from_numpy(x),), calibration=[x], config=config, target="reference")
    (reason,) = [e["reason"] for e in compiled.report()["kept_float"] if e["node"].startswith("linear")]
    assert "with int8 weights < min_layer_sqnr_db 15: weight-only" in reason
    assert len(compiled.graph.storage) == 1 and not compiled.report().get("int8_weights")
