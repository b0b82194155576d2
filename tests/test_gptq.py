"""gptq: the rounding against a brute-force check of its identity, a convolution's windows against
the interpreter's convolution, the output error it removes on held-out data (linears and
convolutions, int8 and int4), the grid it keeps (insert-qdq's own), its place in the pipeline,
the llvm build bit-exact with the interpreter, and its errors."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import qcompiler
from qcompiler import QuantConfig, from_torch
from qcompiler.compare import sqnr_db
from qcompiler.errors import QCompilerError
from qcompiler.ir.packing import Int4Groups
from qcompiler.ir.ops import get_op
from qcompiler.passes.gptq import conv_windows, gptq_round, output_error
from qcompiler.quantize import quantize

rng = np.random.default_rng(0)


def test_rounding_never_does_worse_than_nearest_on_its_inputs():
    """On the inputs whose X^T X it is given, the output error tr(E H E^T) of GPTQ's levels is at
    most rounding to nearest's, and far under it when the inputs are correlated."""
    mix = rng.standard_normal((48, 48))
    x = rng.standard_normal((2000, 48)) @ mix
    gram = x.T @ x
    w = rng.standard_normal((32, 48))
    step = np.full(w.shape, 0.25)
    limit = np.full(w.shape, 127)
    levels = gptq_round(w, step, limit, gram, damping=0.0, act_order=False)
    assert np.array_equal(levels, np.rint(levels)) and np.abs(levels).max() <= 127
    nearest = np.rint(w / step)
    ours, theirs = output_error(w, levels * step, gram), output_error(w, nearest * step, gram)
    assert ours < 0.6 * theirs
    direct = float(((x @ (w - levels * step).T) ** 2).sum())
    assert ours == pytest.approx(direct, rel=1e-6)  # the error it minimizes is the output's
    unseen = gram.copy()
    unseen[:, 3] = unseen[3, :] = 0  # an input never seen: its column is left at 0
    assert not gptq_round(w, step, limit, unseen, 0.01)[:, 3].any()


def test_act_order_helps_when_inputs_differ_in_scale():
    """Inputs whose scales span orders of magnitude (as transformer features do): rounding the
    most active columns first leaves less error, on the calibration rows and on others."""
    data = np.random.default_rng(3)
    mix = data.standard_normal((96, 96)) * np.exp(data.standard_normal(96))[None, :]
    seen, other = data.standard_normal((1000, 96)) @ mix, data.standard_normal((4000, 96)) @ mix
    w = data.standard_normal((48, 96))
    step, limit = np.full(w.shape, 0.3), np.full(w.shape, 7)
    gram = seen.T @ seen
    natural = gptq_round(w, step, limit, gram, 0.01, act_order=False) * step
    ordered = gptq_round(w, step, limit, gram, 0.01) * step
    for rows in (seen, other):
        assert output_error(w, ordered, rows.T @ rows) < 0.8 * output_error(w, natural, rows.T @ rows)


def _model_and_data():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(128, 256), nn.ReLU(), nn.Linear(256, 64)).eval()
    data = np.random.default_rng(1)
    mix = data.standard_normal((128, 128)).astype(np.float32) / 8  # correlated inputs, as real features are
    batches = [data.standard_normal((64, 128)).astype(np.float32) @ mix for _ in range(17)]
    return model, batches[:16], batches[16]


@pytest.mark.parametrize("weight_dtype, gain_db", [("i4", 1.0), ("i8", 0.1)])
def test_gptq_lowers_the_output_error_on_held_out_data(weight_dtype, gain_db):
    model, calibration, held_out = _model_and_data()
    graph = from_torch(model, (torch.from_numpy(calibration[0]),))
    reference = graph(held_out)[0]

    def build(gptq: bool):
        return quantize(graph, calibration, QuantConfig(weight_dtype=weight_dtype, gptq=gptq, min_layer_sqnr_db=None))

    nearest, rounded = build(False), build(True)
    assert sqnr_db(reference, rounded.graph(held_out)[0]) >= sqnr_db(reference, nearest.graph(held_out)[0]) + gain_db
    layers = rounded.report["gptq"]["layers"]
    assert len(layers) == 2 and all(0 < e["error_vs_nearest"] < 0.8 for e in layers)
    stage = "gptq" if weight_dtype == "i8" else "gptq{weight_dtype=i4}"
    assert f"range-analysis{{method=minmax}},{stage},bias-correction" in rounded.pipeline
    # insert-qdq's grid: the same channel scales as rounding to nearest, 4-bit values where asked
    scales = sorted(n for n in rounded.qdq_graph.constants if n.endswith(".scale") and "weight" in n)
    for name in scales:
        np.testing.assert_array_equal(rounded.qdq_graph.constants[name], nearest.qdq_graph.constants[name])
    packed = [n for n in rounded.graph.constants if n in rounded.graph.storage]
    assert len(packed) == (2 if weight_dtype == "i4" else 0)
    assert all(rounded.graph.storage[n] == Int4Groups(32) for n in packed)


def test_gptq_build_is_bit_exact_and_reports_it(tmp_path):
    model, calibration, held_out = _model_and_data()
    config = QuantConfig(weight_dtype="i4", gptq=True, float_precision="fp32")  # llvm and reference alike
    example = (torch.from_numpy(calibration[0]),)
    llvm = qcompiler.compile(model, example, calibration=calibration, config=config)
    reference = qcompiler.compile(model, example, calibration=calibration, config=config, target="reference")
    np.testing.assert_array_equal(llvm(held_out), reference(held_out))
    assert len(llvm.report()["gptq"]["layers"]) == 2
    result = quantize(from_torch(model, example), calibration, config)
    result.calibration.save(tmp_path / "ranges.json")
    with pytest.raises(QCompilerError, match="gptq rounds weights on calibration data"):
        quantize(from_torch(model, example), None, config, ranges=tmp_path / "ranges.json")


@pytest.mark.parametrize("rank, groups, stride, dilation, pads", [
    (2, 1, 1, 1, (1, 1, 1, 1)), (2, 2, 2, 1, (0, 1, 2, 0)), (2, 8, 1, 2, (2, 2, 2, 2)),
    (1, 1, 2, 1, (1, 0)), (3, 2, 1, 1, (1, 1, 1, 1, 1, 1))])
def test_a_convolution_is_its_windows_times_the_flattened_weight(rank, groups, stride, dilation, pads):
    """The identity gptq's X^T X for a convolution rests on: each group's windows times that
    group's flattened weight rows are the interpreter's convolution (any rank, stride, dilation,
    asymmetric padding, grouped and depthwise)."""
    x = rng.standard_normal((2, 8) + (9,) * rank).astype(np.float32)
    w = rng.standard_normal((16, 8 // groups) + (3,) * rank).astype(np.float32)
    op = f"conv{rank}d"
    attrs = get_op(op).normalize_attrs({"strides": (stride,) * rank, "dilations": (dilation,) * rank,
                                        "pads": pads, "groups": groups}, op)
    expected = get_op(op).run([x, w], attrs)[0]
    windows = conv_windows(x, w.shape[2:], attrs, groups)
    rows = w.reshape(groups, 16 // groups, -1)
    product = np.concatenate([windows[g] @ rows[g].T for g in range(groups)], axis=1)  # [samples x positions, O]
    np.testing.assert_allclose(np.moveaxis(product.reshape(2, *expected.shape[2:], 16), -1, 1), expected,
                               rtol=1e-5, atol=1e-4)


def _cnn_and_images():
    """A CNN with a plain, a strided grouped, a depthwise and a pointwise convolution, and smooth
    images (neighbouring pixels correlated, as in photographs)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(16, 32, 3, stride=2, padding=1, groups=2), nn.ReLU(),
                          nn.Conv2d(32, 32, 3, padding=1, groups=32), nn.ReLU(), nn.Conv2d(32, 48, 1)).eval()
    data = np.random.default_rng(1)

    def images() -> np.ndarray:
        noise = torch.from_numpy(data.standard_normal((16, 3, 20, 20)).astype(np.float32))
        return 3 * torch.nn.functional.avg_pool2d(noise, 5, 1)[:, :, :16, :16].contiguous().numpy()

    return model, [images() for _ in range(8)], images()


def test_gptq_rounds_convolutions_and_lowers_their_output_error():
    """int4: every convolution (grouped and depthwise included) is rounded on its windows' X^T X,
    each with less output error than rounding to nearest on the calibration data, the model's
    held-out SQNR higher, the channel scales insert-qdq's own, and the llvm build bit-exact."""
    model, calibration, held_out = _cnn_and_images()
    graph = from_torch(model, (torch.from_numpy(calibration[0]),))
    reference = graph(held_out)[0]

    def build(gptq: bool):
        return quantize(graph, calibration, QuantConfig(weight_dtype="i4", gptq=gptq, min_layer_sqnr_db=None))

    nearest, rounded = build(False), build(True)
    assert sqnr_db(reference, rounded.graph(held_out)[0]) >= sqnr_db(reference, nearest.graph(held_out)[0]) + 0.5
    layers = {e["layer"].split()[0] for e in rounded.report["gptq"]["layers"]}
    assert len(rounded.report["gptq"]["layers"]) == 4 and set(layers) == {"conv2d"}
    assert all(0 < e["error_vs_nearest"] < 0.9 for e in rounded.report["gptq"]["layers"])
    for name in (n for n in rounded.qdq_graph.constants if n.endswith(".scale") and "weight" in n):
        np.testing.assert_array_equal(rounded.qdq_graph.constants[name], nearest.qdq_graph.constants[name])
    config = QuantConfig(weight_dtype="i4", gptq=True, float_precision="fp32")
    example = (torch.from_numpy(calibration[0]),)
    llvm = qcompiler.compile(model, example, calibration=calibration, config=config)
    reference_build = qcompiler.compile(model, example, calibration=calibration, config=config, target="reference")
    np.testing.assert_array_equal(llvm(held_out), reference_build(held_out))


def test_gptq_moves_the_bias_by_the_mean_error_it_leaves():
    """GPTQ rounds on the centered X^T X (plus the input's rounding noise) and the bias absorbs
    the rest, b - (q(W) - W) m: after the pass alone (inputs still float), the first layer's
    outputs on the calibration data have the float layer's mean, channel by channel."""
    from qcompiler.interpreter import values_of
    from qcompiler.pass_manager import run_pipeline
    from qcompiler.pipeline import PassContext

    model, calibration, _ = _model_and_data()
    reference = from_torch(model, (torch.from_numpy(calibration[0]),))
    graph = from_torch(model, (torch.from_numpy(calibration[0]),))
    run_pipeline(graph, "range-analysis,gptq{weight_dtype=i4}", context=PassContext(calibration=calibration))
    assert graph.nodes[0].op == "dequantize"  # the first linear's weight, rounded

    def first_outputs(g):
        linear = next(n for n in g.nodes if n.op == "linear")
        return np.concatenate([values_of(g, [x], [linear.output])[id(linear.output)] for x in calibration])

    exact, rounded = first_outputs(reference), first_outputs(graph)
    shift = (rounded - exact).mean(axis=0)
    assert np.abs(shift).max() < 1e-3 * np.abs(exact).mean()  # the mean error: absorbed
    assert np.abs(rounded - exact).max() > 100 * np.abs(shift).max()  # while each output still differs
