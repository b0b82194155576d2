"""Stress cases real published models contain and the models qcompiler was built around do not:
dead and subnormal channels after batch-norm folding, biases too large for int32 at the
accumulator's scale, multi-output ops whose parts are joined again, and wide images. Each is
quantized with the default config, built for llvm, and checked against the interpreter; no
layer may stay float for any reason but the sensitivity check."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import qcompiler
from qcompiler.compare import sqnr_db
from qcompiler.passes.insert_qdq import quantize_weight


def _calibration(shape, n=4, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(shape).astype(np.float32) for _ in range(n)]


def _check(model, shape, targets=("reference", "llvm")):
    """Quantize and build ``model``; every layer integer, the build equal to its interpreter run."""
    x = _calibration(shape, 1, seed=9)[0]
    for target in targets:
        compiled = qcompiler.compile(model, (torch.from_numpy(x),), calibration=_calibration(shape), target=target)
        report = compiled.report()
        assert report["quantized"]
        assert all("min_layer_sqnr_db" in e["reason"] for e in report["kept_float"]), report["kept_float"]
        np.testing.assert_array_equal(np.asarray(compiled(x)), compiled.graph(x)[0])
        assert report["fidelity"]["output_cosine"] > 0.99, report["fidelity"]
    return compiled


def _dead_channel_net(dead_scales, bias=0.5):
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.BatchNorm2d(16), torch.nn.ReLU(),
                            torch.nn.Conv2d(16, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(),
                            torch.nn.Linear(8 * 8 * 8, 10)).eval()
    with torch.no_grad():
        k = len(dead_scales)
        m[1].weight[:k] = torch.tensor(dead_scales, dtype=torch.float32)  # gamma ~ 0: the channel is dead
        m[1].bias[:k] = bias
    return m


@pytest.mark.parametrize("dead", [[1e-12, 1e-20, 1e-30], [1e-38, 1e-40, 1e-42]], ids=["tiny", "subnormal"])
def test_dead_and_subnormal_channels_quantize_as_zero_channels(dead):
    """Before: scales of ~1e-41 crashed lower-integer or overflowed the int32 bias, and the conv
    was silently kept float with a false reason."""
    compiled = _check(_dead_channel_net(dead), (1, 3, 8, 8))
    assert compiled.report()["kept_float"] == []
    assert compiled.graph.op_counts().get("conv2d_int") == 2


@pytest.mark.parametrize("gain", [1e-20, 1e-43, 0.0], ids=["dust", "subnormal-dust", "zero"])
def test_a_whole_layer_of_subnormal_or_zero_activations_quantizes_to_its_zero_point(gain):
    """A block whose weights (random-init MobileViT's deeper stages, a dead branch) leave every
    activation at 1e-40 or exactly 0: before, its range gave a scale that float32 flushed to 0 and
    insert-qdq made an invalid graph. Its scale is 1 now: each value is its zero point (which it
    is, to float32's resolution) and the rest of the model quantizes and builds."""
    from qcompiler.ir.ops.quant import choose_qparams

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.Conv2d(8, 8, 1), torch.nn.Conv2d(8, 8, 1),
                                torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(8 * 8 * 8, 10)).eval()
    with torch.no_grad():
        for conv in (model[1], model[2]):
            conv.weight *= gain ** 0.5
            conv.bias.zero_()
        model[5].bias.fill_(0.25)
    compiled = qcompiler.compile(model, (torch.zeros(1, 3, 8, 8),), calibration=_calibration((1, 3, 8, 8)))
    x = _calibration((1, 3, 8, 8), 1, seed=9)[0]
    np.testing.assert_array_equal(np.asarray(compiled(x)), compiled.graph(x)[0])
    np.testing.assert_allclose(np.asarray(compiled(x)), 0.25, atol=1e-3)  # float: the bias
    for lo, hi in ((-1e-41, 1e-41), (0.0, 1e-45), (0.0, 0.0)):
        for dtype in ("u8", "i8"):
            assert choose_qparams(lo, hi, dtype)[0] == 1.0


def test_quantize_weight_zeroes_dead_channels_with_a_sane_scale():
    w = np.random.default_rng(0).standard_normal((4, 3, 3, 3)).astype(np.float32)
    w[1] *= 1e-12
    w[2] = 1e-41  # subnormal
    q, scale = quantize_weight(w, per_channel=True)
    assert not q[1].any() and not q[2].any() and q[0].any() and q[3].any()
    assert scale[1] == scale[2] == scale.max()  # the largest channel's: requantization stays in range
    # live channels keep their own scale (max |w| / 127)
    np.testing.assert_allclose(scale[[0, 3]], np.abs(w[[0, 3]]).reshape(2, -1).max(1) / 127, rtol=1e-6)
    q, scale = quantize_weight(np.full((2, 3), 1e-40, np.float32), per_channel=True)
    assert not q.any() and np.all(scale == 1.0)


def test_a_bias_too_large_for_int32_coarsens_that_channel_instead_of_keeping_the_layer_float():
    """A tiny-weight channel with a bias of 300: round(b / (s_x s_w)) was past 2^31."""
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(16, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4)).eval()
    with torch.no_grad():
        m[0].weight[2] *= 1e-5
        m[0].bias[2] = 300.0
    compiled = _check(m, (2, 16))
    assert compiled.report()["kept_float"] == []
    bias = next(compiled.graph.constant_array(n.inputs[4]) for n in compiled.graph.nodes if n.op == "linear_int")
    # about 2^30 (float32 scales and the bias correction's shift round it): room left for the sum below 2^31
    assert np.abs(bias.astype(np.int64)).max() <= 1.001 * 2 ** 30


class _SplitJoin(torch.nn.Module):
    """A detector block: split a tensor in two, a branch on each part, join them again."""

    def __init__(self):
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 16, 3, padding=1)
        self.a = torch.nn.Conv2d(8, 8, 3, padding=1)
        self.b = torch.nn.Conv2d(8, 8, 1)
        self.head = torch.nn.Linear(16 * 8 * 8, 10)

    def forward(self, x):
        y = torch.relu(self.stem(x))
        p, q = torch.split(y, 8, dim=1)
        return self.head(torch.cat([torch.relu(self.a(p)), self.b(q)], 1).flatten(1))


def test_multi_output_split_then_join_quantizes_everywhere(tmp_path):
    """Before: insert-qdq crashed on the split (``node.output`` of a two-output node), and the
    sensitivity check read the split's first half for its second."""
    from tests.conftest import export_onnx

    torch.manual_seed(0)
    model = _SplitJoin().eval()
    _check(model, (1, 3, 8, 8))
    path = export_onnx(model, (torch.randn(1, 3, 8, 8),), tmp_path / "split.onnx", ["x"])
    compiled = qcompiler.compile(path, calibration=_calibration((1, 3, 8, 8)), target="onnx")
    assert compiled.report()["kept_float"] == []
    x = _calibration((1, 3, 8, 8), 1, seed=3)[0]
    reference = compiled.graph(x)[0]  # the head's result is not quantized: float rounding apart, the same
    assert np.abs(compiled(x) - reference).max() <= 1e-4 * np.abs(reference).max()


@pytest.mark.parametrize("width", [144, 320, 17 * 16])
def test_wide_images_build_and_match(width):
    """Rows wider than a tile's accumulators (a 320-pixel image, a text line): max pooling here,
    and the int8 depthwise kernels built for VNNI and AMX CPUs (checked where this CPU runs them)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.ReLU(),
                                torch.nn.Conv2d(16, 16, 3, padding=1, groups=16), torch.nn.ReLU(),
                                torch.nn.MaxPool2d(2)).eval()
    shape = (1, 3, 6, width)
    x = _calibration(shape, 1, seed=5)[0]
    _check(model, shape, targets=("llvm",))
    for cpu in ("icelake-server", "sapphirerapids"):
        compiled = qcompiler.compile(model, (torch.from_numpy(x),), calibration=_calibration(shape), cpu=cpu)
        assert compiled.report()["int8_kernels"]["kernels"] in ("vnni-vbmi", "amx")
        if compiled.runs_here:
            np.testing.assert_array_equal(compiled(x), compiled.graph(x)[0])


def _onnx_model(nodes, inputs, outputs, initializers=(), opset=17):
    from onnx import helper

    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(initializers))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


@pytest.mark.parametrize("axis", [-1, -2, 0, 1, 3])
def test_flatten_with_a_negative_axis_matches_onnx_reference(axis):
    """Before: axis -1 on a rank-3 tensor flattened everything (wrong shape, silently)."""
    from onnx import TensorProto, helper
    from onnx.reference import ReferenceEvaluator

    model = _onnx_model([helper.make_node("Flatten", ["x"], ["y"], axis=axis)],
                        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 4])],
                        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["a", "b"])])
    x = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    want = ReferenceEvaluator(model).run(None, {"x": x})[0]
    got = qcompiler.from_onnx(model)(x)[0]
    assert got.shape == want.shape
    np.testing.assert_array_equal(got, want)


def test_dropout_in_training_mode_is_refused_and_its_mask_is_all_true():
    from onnx import TensorProto, helper, numpy_helper

    def dropout(training: bool):
        return _onnx_model(
            [helper.make_node("Dropout", ["x", "ratio", "training"], ["y", "mask"])],
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3]),
             helper.make_tensor_value_info("mask", TensorProto.BOOL, [2, 3])],
            [numpy_helper.from_array(np.array(0.3, np.float32), "ratio"),
             numpy_helper.from_array(np.array(training), "training")])

    with pytest.raises(qcompiler.QCompilerError, match="Dropout.*training_mode is true"):
        qcompiler.from_onnx(dropout(True))
    x = np.ones((2, 3), np.float32)
    y, mask = qcompiler.from_onnx(dropout(False))(x)
    np.testing.assert_array_equal(y, x)
    assert mask.dtype == np.bool_ and mask.all()


def _if_model(threshold: int, data_dependent: bool = False):
    """``y = relu(x) * 2 if cond else -relu(x)``: cond from the input's static shape (known once
    shapes are fixed), or from its values; the branches read ``r`` from the enclosing graph."""
    from onnx import TensorProto, helper, numpy_helper

    nodes = [helper.make_node("Relu", ["x"], ["r"])]
    if data_dependent:
        nodes += [helper.make_node("ReduceSum", ["x"], ["t"], keepdims=0),
                  helper.make_node("Greater", ["t", "zero"], ["cond"])]
    else:
        nodes += [helper.make_node("Shape", ["x"], ["s"]), helper.make_node("ReduceProd", ["s"], ["n"], keepdims=0),
                  helper.make_node("Greater", ["n", "limit"], ["cond"])]
    branch = lambda op, out, extra: helper.make_graph(  # noqa: E731
        [helper.make_node(op, ["r", *extra], [out])], out, [], [helper.make_tensor_value_info(out, TensorProto.FLOAT,
                                                                                             [2, 3])])
    nodes.append(helper.make_node("If", ["cond"], ["y"], name="the_if", then_branch=branch("Mul", "a", ["two"]),
                                  else_branch=branch("Neg", "b", [])))
    return _onnx_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
                       [numpy_helper.from_array(np.array(threshold, np.int64), "limit"),
                        numpy_helper.from_array(np.array(2.0, np.float32), "two"),
                        numpy_helper.from_array(np.array(0.0, np.float32), "zero")])


@pytest.mark.parametrize("threshold", [5, 7], ids=["then", "else"])
def test_if_with_a_condition_known_once_shapes_are_fixed_is_inlined(threshold):
    """Before: a raw onnx.reference RuntimeError (the branch's read of 'r' was not seen)."""
    from onnx.reference import ReferenceEvaluator

    model = _if_model(threshold)
    x = np.random.default_rng(0).standard_normal((2, 3)).astype(np.float32)
    graph = qcompiler.from_onnx(model)
    assert "If" not in str(graph)
    want = ReferenceEvaluator(model).run(None, {"x": x})[0]
    np.testing.assert_array_equal(graph(x)[0], want)
    np.testing.assert_array_equal(qcompiler.compile(model, target="llvm")(x), want)


def test_if_on_the_input_values_is_one_clear_error():
    with pytest.raises(qcompiler.UnsupportedOpError, match=r"If \(condition computed from the inputs\).*the_if"):
        qcompiler.from_onnx(_if_model(5, data_dependent=True))


@pytest.mark.parametrize("dtype", ["UINT16", "UINT32", "INT4", "UINT4", "BFLOAT16", "FLOAT8E4M3FN", "FLOAT8E5M2"])
def test_narrow_and_exotic_constants_are_widened_exactly(dtype):
    """Before: a bare ValueError ('unsupported dtype int4'), and float8 named as a number.
    Unsigned 16 and 32-bit integers are IR dtypes: kept as they are, and taken as inputs."""
    from onnx import TensorProto, helper
    from onnx.reference import ReferenceEvaluator

    values = [1, 2, 3] if "INT" in dtype else [1.5, -2.0, 0.25]
    weight = helper.make_tensor("w", getattr(TensorProto, dtype), [3], values)
    model = _onnx_model([helper.make_node("Cast", ["w"], ["wf"], to=TensorProto.FLOAT),
                         helper.make_node("Add", ["x", "wf"], ["y"])],
                        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3])],
                        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3])], [weight], opset=21)
    x = np.array([10.0, 20.0, 30.0], np.float32)
    np.testing.assert_array_equal(qcompiler.from_onnx(model)(x)[0], ReferenceEvaluator(model).run(None, {"x": x})[0])
    as_input = _onnx_model([helper.make_node("Cast", ["x"], ["y"], to=TensorProto.FLOAT)],
                           [helper.make_tensor_value_info("x", getattr(TensorProto, dtype), [3])],
                           [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3])], opset=21)
    if dtype in ("UINT16", "UINT32"):
        given = np.array([0, 7, 2 ** (16 if dtype == "UINT16" else 32) - 1], helper.tensor_dtype_to_np_dtype(
            getattr(TensorProto, dtype)))
        np.testing.assert_array_equal(qcompiler.from_onnx(as_input)(given)[0],
                                      ReferenceEvaluator(as_input).run(None, {"x": given})[0])
        return
    with pytest.raises(qcompiler.ModelLoadError, match=f"input 'x' has unsupported dtype {dtype.lower()} \\(inputs"):
        qcompiler.from_onnx(as_input)


def test_int4_weights_behind_dequantize_linear_import_and_quantize():
    """Opset 21's int4 block-quantized weights: DequantizeLinear of int4 with per-row scales."""
    from onnx import TensorProto, helper, numpy_helper
    from onnx.reference import ReferenceEvaluator

    rng = np.random.default_rng(0)
    w4 = helper.make_tensor("w4", TensorProto.INT4, [4, 6], rng.integers(-8, 8, 24).tolist())
    scale = numpy_helper.from_array(rng.uniform(0.01, 0.1, (4, 1)).astype(np.float32), "ws")
    model = _onnx_model([helper.make_node("DequantizeLinear", ["w4", "ws"], ["w"], axis=1, block_size=6),
                         helper.make_node("MatMul", ["x", "w"], ["y"])],
                        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
                        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 6])], [w4, scale], opset=21)
    x = rng.standard_normal((2, 4)).astype(np.float32)
    want = ReferenceEvaluator(model).run(None, {"x": x})[0]
    np.testing.assert_allclose(qcompiler.from_onnx(model)(x)[0], want, rtol=1e-6, atol=1e-6)
    compiled = qcompiler.compile(model, calibration=[rng.standard_normal((2, 4)).astype(np.float32) for _ in range(4)])
    assert compiled.report()["quantized"]
    np.testing.assert_array_equal(compiled(x), compiled.graph(x)[0])
    assert np.abs(compiled(x) - want).max() < 0.05 * np.abs(want).max()


class _Interpolate(torch.nn.Module):
    def __init__(self, **kwargs):
        super().__init__()
        self.kwargs = kwargs
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        return torch.nn.functional.interpolate(self.conv(x), **self.kwargs)


RESIZES = [dict(scale_factor=2, mode="nearest"), dict(size=(9, 12), mode="nearest"),
           dict(size=(11, 13), mode="nearest-exact"), dict(scale_factor=2, mode="bilinear"),
           dict(size=(9, 12), mode="bilinear", align_corners=True), dict(size=(3, 4), mode="bilinear")]


@pytest.mark.parametrize("kwargs", RESIZES, ids=lambda k: f"{k['mode']}-{k.get('size', k.get('scale_factor'))}")
def test_resize_from_torch_and_onnx_matches_the_frameworks_on_every_target(kwargs, tmp_path):
    """Every FPN neck and segmentation head upsamples: interpolate and ONNX Resize, nearest and
    bilinear with their coordinate rules; the interpreter against torch and ONNX Runtime, TVM
    and the exported ONNX against the interpreter."""
    import onnxruntime as ort

    from tests.conftest import export_onnx

    model = _Interpolate(**kwargs).eval()
    x = torch.randn(1, 3, 5, 7)
    with torch.no_grad():
        want = model(x).numpy()
    graph = qcompiler.from_torch(model, (x,))
    np.testing.assert_allclose(graph(x.numpy())[0], want, atol=1e-5)
    path = export_onnx(model, (x,), tmp_path / "r.onnx", ["x"])
    from_onnx = qcompiler.from_onnx(path)
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(from_onnx(x.numpy())[0], session.run(None, {"x": x.numpy()})[0], atol=1e-5)
    for target in ("llvm", "onnx"):
        np.testing.assert_allclose(qcompiler.compile(graph, target=target)(x.numpy()), graph(x.numpy())[0], atol=1e-5)


@pytest.mark.parametrize("mode", ["nearest", "bilinear"])
def test_fpn_neck_upsampling_quantizes_end_to_end(mode):
    """A top-down FPN step: upsample the coarse map, add the lateral 1x1 conv, smooth with a 3x3.
    Nearest upsampling only copies values; bilinear averages them with weights summing to 1, so
    the input's grid is the output's and it runs on the integers rounded half to even (before,
    bilinear stayed float between quantized neighbours). Nothing stays float."""

    class Neck(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.c4 = torch.nn.Conv2d(3, 8, 3, stride=2, padding=1)
            self.lateral = torch.nn.Conv2d(3, 8, 1)
            self.smooth = torch.nn.Conv2d(8, 8, 3, padding=1)

        def forward(self, x):
            top = torch.relu(self.c4(x))
            merged = torch.nn.functional.interpolate(top, scale_factor=2, mode=mode) + self.lateral(x)
            return self.smooth(merged)

    torch.manual_seed(0)
    compiled = _check(Neck().eval(), (1, 3, 16, 16))
    assert compiled.report()["kept_float"] == []
    op = "resize_nearest" if mode == "nearest" else "resize_linear"
    resize = next(n for n in compiled.graph.nodes if n.op == op)
    assert resize.inputs[0].dtype == "u8"  # on the integers


def _resize_model(mode: str, scales: list[float], **attrs):
    from onnx import TensorProto, helper, numpy_helper

    return _onnx_model([helper.make_node("Resize", ["x", "", "scales"], ["y"], name="up", mode=mode, **attrs)],
                       [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 5, 5])],
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", "c", "h", "w"])],
                       [numpy_helper.from_array(np.array(scales, np.float32), "scales")], opset=18)


@pytest.mark.parametrize("mode, scale", [("cubic", 2.0), ("linear", 2.5), ("nearest", 0.7), ("cubic", 1.3)])
def test_cubic_and_fractional_resizes_match_the_onnx_reference(mode, scale):
    """Before: refused. Fractional sizes round down and the transform uses the given scale."""
    from onnx.reference import ReferenceEvaluator

    model = _resize_model(mode, [1.0, 1.0, scale, scale])
    x = np.random.default_rng(0).standard_normal((1, 2, 5, 5)).astype(np.float32)
    want = ReferenceEvaluator(model).run(None, {"x": x})[0]
    np.testing.assert_allclose(qcompiler.from_onnx(model)(x)[0], want, atol=1e-5)
    np.testing.assert_allclose(qcompiler.compile(model, target="llvm")(x), want, atol=1e-5)


@pytest.mark.parametrize("mode, attrs", [("linear", {}), ("cubic", {}), ("cubic", {"exclude_outside": 1})])
@pytest.mark.parametrize("transform", ["half_pixel", "align_corners", "asymmetric", "pytorch_half_pixel"])
@pytest.mark.parametrize("scales", [[0.6, 0.45], [0.4, 1.6]])
def test_antialiased_downscaling_matches_the_onnx_reference(mode, attrs, transform, scales):
    """Before: refused. Downscaling averages the inputs an output covers (the kernel stretched by
    1 / scale); upscaling an axis is plain interpolation. The interpreter and the TVM build."""
    from onnx.reference import ReferenceEvaluator

    model = _resize_model(mode, [1.0, 1.0, *scales], antialias=1, coordinate_transformation_mode=transform, **attrs)
    x = np.random.default_rng(1).standard_normal((1, 2, 5, 5)).astype(np.float32)
    want = ReferenceEvaluator(model).run(None, {"x": x})[0]
    np.testing.assert_allclose(qcompiler.from_onnx(model)(x)[0], want, atol=1e-5)
    np.testing.assert_allclose(qcompiler.compile(model, target="llvm")(x), want, atol=1e-5)


@pytest.mark.parametrize("mode", ["bilinear", "bicubic"])
@pytest.mark.parametrize("how", [{"size": (5, 7)}, {"size": (9, 30)}, {"scale_factor": 0.37}])
def test_torch_antialiased_interpolate_matches_torch(mode, how):
    """torch's ``antialias=True`` (PIL's filters): ONNX's antialias with outside taps dropped and,
    for bicubic, a = -0.5; upscaled axes plain interpolation with the same kernel."""
    module = _Interpolate(mode=mode, antialias=True, **how)
    x = torch.randn(1, 3, 17, 23)
    with torch.no_grad():
        want = module(x).numpy()
    graph = qcompiler.from_torch(module, (x,))
    np.testing.assert_allclose(graph(x.numpy())[0], want, atol=2e-5)
    np.testing.assert_allclose(qcompiler.compile(module, (x,), target="llvm")(x.numpy()), want, atol=2e-5)


class _Interpolate(torch.nn.Module):
    def __init__(self, **kwargs):
        super().__init__()
        self.kwargs = kwargs

    def forward(self, x):
        return torch.nn.functional.interpolate(x, **self.kwargs)


@pytest.mark.parametrize("mode, attrs, why", [("nearest", {"antialias": 1}, "antialias applies to linear and cubic"),
                                              ("linear", {"coordinate_transformation_mode": "tf_crop_and_resize"},
                                               "tf_crop_and_resize needs a roi")])
def test_resizes_qcompiler_cannot_do_are_one_clear_error(mode, attrs, why):
    with pytest.raises(qcompiler.QCompilerError, match=f"Resize 'up': .*{why}"):
        qcompiler.from_onnx(_resize_model(mode, [1.0, 1.0, 2.0, 2.0], **attrs))


CONV_TRANSPOSES = [dict(kernel_size=2, stride=2), dict(kernel_size=3, stride=2, padding=1, output_padding=1),
                   dict(kernel_size=3, padding=1, groups=2, dilation=2), dict(kernel_size=4, stride=2, padding=1, bias=False)]


@pytest.mark.parametrize("rank", [1, 2])
@pytest.mark.parametrize("kwargs", CONV_TRANSPOSES, ids=lambda k: ",".join(f"{a}={b}" for a, b in k.items()))
def test_conv_transpose_matches_torch_from_both_captures_on_every_target(kwargs, rank, tmp_path):
    """Segmentation and text-detection heads upsample with transposed convolutions."""
    from tests.conftest import export_onnx

    torch.manual_seed(0)
    layer = (torch.nn.ConvTranspose1d if rank == 1 else torch.nn.ConvTranspose2d)(4, 8, **kwargs).eval()
    x = torch.randn(*([1, 4, 7] if rank == 1 else [1, 4, 5, 7]))
    with torch.no_grad():
        want = layer(x).numpy()
    graph = qcompiler.from_torch(layer, (x,))
    np.testing.assert_allclose(graph(x.numpy())[0], want, atol=1e-5)
    np.testing.assert_allclose(qcompiler.from_onnx(export_onnx(layer, (x,), tmp_path / "t.onnx", ["x"]))(x.numpy())[0],
                               want, atol=1e-5)
    for target in ("llvm", "onnx"):
        np.testing.assert_allclose(qcompiler.compile(graph, target=target)(x.numpy()), graph(x.numpy())[0], atol=1e-5)


@pytest.mark.parametrize("attrs", [{"output_shape": [10, 14]}, {"auto_pad": "SAME_UPPER"}, {"auto_pad": "SAME_LOWER"},
                                   {"pads": [0, 1, 1, 0], "output_padding": [1, 0]}])
def test_onnx_conv_transpose_padding_forms_match_onnx_runtime(attrs):
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((3, 2, 3, 3)).astype(np.float32), "w")
    model = _onnx_model([helper.make_node("ConvTranspose", ["x", "w"], ["y"], strides=[2, 2], **attrs)],
                        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 5, 7])],
                        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", "c", "h", "w"])], [w])
    x = rng.standard_normal((1, 3, 5, 7)).astype(np.float32)
    want = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(qcompiler.from_onnx(model)(x)[0], want, atol=1e-5)


@pytest.mark.parametrize("kwargs", [dict(kernel_size=2, stride=2), dict(kernel_size=3, stride=2, padding=1,
                                                                         output_padding=1),
                                    dict(kernel_size=4, stride=2, padding=1, groups=2)])
def test_a_segmentation_head_with_a_transposed_convolution_runs_it_in_int8(kwargs):
    """Before: the transposed convolution stayed float between quantized neighbours. Now
    conv-transpose-as-conv makes it the convolution it equals, on the int8 kernels."""
    torch.manual_seed(0)
    head = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, stride=2, padding=1), torch.nn.ReLU(),
                               torch.nn.ConvTranspose2d(8, 8, **kwargs), torch.nn.ReLU(),
                               torch.nn.Conv2d(8, 2, 1)).eval()
    compiled = _check(head, (1, 3, 16, 16))
    counts = compiled.graph.op_counts()
    assert counts.get("conv2d_int") == 3 and not any(op.startswith("conv_transpose") for op in counts), counts


@pytest.mark.parametrize("largest", [True, False])
def test_topk_two_outputs_match_onnx_runtime_and_every_target(largest):
    """A detector's top-scoring boxes: values and indices, ties keeping the lower index first."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    model = _onnx_model([helper.make_node("TopK", ["x", "k"], ["v", "i"], axis=1, largest=int(largest)),
                         helper.make_node("Relu", ["v"], ["y"])],
                        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 10])],
                        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 4]),
                         helper.make_tensor_value_info("i", TensorProto.INT64, [3, 4])],
                        [numpy_helper.from_array(np.array([4], np.int64), "k")])
    x = np.random.default_rng(0).integers(-3, 3, (3, 10)).astype(np.float32)  # many ties
    want = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    graph = qcompiler.from_onnx(model)
    for got, expected in zip(graph(x), want):
        np.testing.assert_array_equal(got, expected)
    for target in ("llvm", "onnx"):
        values, indices = qcompiler.compile(graph, target=target)(x)
        np.testing.assert_array_equal(values, want[0])
        np.testing.assert_array_equal(indices, want[1])


def test_einsum_and_topk_from_torch_on_every_target():
    class Attend(torch.nn.Module):
        def forward(self, q, k):
            scores = torch.einsum("bhqd,bhkd->bhqk", q, k)
            values, indices = torch.topk(scores, 3, dim=-1)
            return values, indices

    q, k = torch.randn(1, 2, 5, 4), torch.randn(1, 2, 6, 4)
    with torch.no_grad():
        want_values, want_indices = Attend()(q, k)
    graph = qcompiler.from_torch(Attend(), (q, k))
    assert {"einsum", "topk"} <= set(graph.op_counts())
    for run in (graph, qcompiler.compile(graph, target="llvm"), qcompiler.compile(graph, target="onnx")):
        values, indices = run(q.numpy(), k.numpy())
        np.testing.assert_allclose(values, want_values.numpy(), rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(indices, want_indices.numpy())


def _with_initializers(tc):
    """The onnx wheel's LSTM/GRU case with its weights (inputs 2..n) made initializers, as
    exported models have them; returns the model, its X and the stored outputs."""
    import onnx
    from onnx import numpy_helper

    model = onnx.ModelProto()
    model.CopyFrom(tc.model)
    inputs, outputs = tc.data_sets[0]
    names = [i.name for i in model.graph.input]
    for name, array in zip(names[1:], inputs[1:]):
        model.graph.initializer.append(numpy_helper.from_array(np.asarray(array), name))
    keep = model.graph.input[0]
    del model.graph.input[:]
    model.graph.input.append(keep)
    return model, inputs[0], outputs


def _recurrent_cases():
    from tests.onnx_node_cases import wheel_cases as cases

    return [tc for tc in cases() if tc.name.startswith(("test_lstm", "test_gru", "test_simple_rnn"))]


@pytest.mark.parametrize("tc", _recurrent_cases(), ids=lambda tc: tc.name)
def test_onnx_lstm_and_gru_unrolled_match_the_reference(tc):
    """ONNX's own LSTM/GRU cases with their weights as initializers: unrolled over the sequence
    into linear + gates, equal to the stored outputs (or refused in one line: peepholes, RNN)."""
    model, x, outputs = _with_initializers(tc)
    try:
        graph = qcompiler.from_onnx(model)
    except qcompiler.QCompilerError as e:
        assert "\n" not in str(e) and ("peephole" in str(e) or "RNN" in str(e)), str(e)
        return
    for got, want in zip(graph(x), outputs):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    if tc.name in ("test_lstm_bidirectional", "test_gru_batchwise"):  # TVM builds of unrolled graphs take a while
        compiled = qcompiler.compile(graph, target="llvm")(x)
        for got, want in zip(compiled if isinstance(compiled, list) else [compiled], outputs):
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_a_bilstm_text_recognizer_from_torch_quantizes_its_recurrent_weights(tmp_path):
    """CRNN-style: conv features -> BiLSTM over the width -> per-step classes (a CTC head),
    through torch's ONNX export; the LSTM weights become int8 linears."""
    from tests.conftest import export_onnx

    class Recognizer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(1, 8, 3, padding=1)
            self.rnn = torch.nn.LSTM(8 * 4, 16, bidirectional=True)
            self.head = torch.nn.Linear(32, 11)

        def forward(self, x):
            f = torch.relu(self.conv(x))  # [B, 8, 4, W]
            seq = f.flatten(1, 2).permute(2, 0, 1)  # [W, B, 32]
            y, _ = self.rnn(seq)
            return self.head(y).log_softmax(-1)

    torch.manual_seed(0)
    model, x = Recognizer().eval(), torch.randn(1, 1, 4, 12)
    with torch.no_grad():
        want = model(x).numpy()
    path = export_onnx(model, (x,), tmp_path / "crnn.onnx", ["x"])
    graph = qcompiler.from_onnx(path)
    np.testing.assert_allclose(graph(x.numpy())[0], want, rtol=1e-4, atol=1e-4)
    calibration = [np.random.default_rng(i).standard_normal((1, 1, 4, 12)).astype(np.float32) for i in range(4)]
    # the reference target: a quantized TVM build of the unrolled recurrence takes minutes (see README)
    compiled = qcompiler.compile(path, calibration=calibration, target="reference")
    ints = compiled.graph.op_counts().get("linear_int", 0)
    assert ints >= 2 * 12, compiled.report()["kept_float"]  # the recurrence's linears, both directions
    assert (compiled(x.numpy()).argmax(-1) == want.argmax(-1)).mean() > 0.9
    np.testing.assert_allclose(qcompiler.compile(graph, target="llvm")(x.numpy()), want, rtol=1e-4, atol=1e-4)


def _reshape_by_input_model():
    """y = relu(reshape(x, shape)) with the target shape a graph input, as ONNX's node tests and
    some exporters write it."""
    from onnx import TensorProto, helper

    return _onnx_model([helper.make_node("Reshape", ["x", "shape"], ["r"], name="the_reshape"),
                        helper.make_node("Relu", ["r"], ["y"])],
                       [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 6]),
                        helper.make_tensor_value_info("shape", TensorProto.INT64, [2])],
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["a", "b"])])


def test_a_shape_given_as_an_input_is_fixed_by_its_value(tmp_path):
    """Static shapes need the shape at import: the error names the input and the fix; given its
    value (Python input_values, CLI --input-value) the input becomes a constant."""
    from tests.conftest import cli_in_process

    with pytest.raises(qcompiler.UnsupportedOpError, match=r"Reshape \(run-time shape operand\).*the_reshape.*"
                                                           r"fix the value of input\(s\) shape with --input-value") as e:
        qcompiler.from_onnx(_reshape_by_input_model())
    assert e.value.bindable == ["shape"]
    graph = qcompiler.from_onnx(_reshape_by_input_model(), input_values={"shape": [3, -1]})
    assert [v.name for v in graph.inputs] == ["x"] and graph.outputs[0].shape == (3, 4)
    x = np.arange(-6, 6, dtype=np.float32).reshape(2, 6)
    np.testing.assert_array_equal(graph(x)[0], np.maximum(x.reshape(3, 4), 0))
    for wrong, why in (({"shape": [1.5, 8]}, "not whole"), ({"shap": [3, 4]}, "unknown input")):
        with pytest.raises(qcompiler.ModelLoadError, match=why):
            qcompiler.from_onnx(_reshape_by_input_model(), input_values=wrong)

    import onnx

    onnx.save(_reshape_by_input_model(), tmp_path / "m.onnx")
    refused = cli_in_process("import", str(tmp_path / "m.onnx"))
    assert refused.returncode != 0 and "--input-value" in refused.stderr and "Traceback" not in refused.stderr
    imported = cli_in_process("import", str(tmp_path / "m.onnx"), "--input-value", "shape=3,-1")
    assert imported.returncode == 0 and "f32[3,4]" in imported.stdout and "%shape" not in imported.stdout


def test_tf_half_pixel_nearest_by_a_fractional_scale_matches_through_every_target():
    """Resize-11's tf_half_pixel_for_nn with scales whose sizes are fractional: the transform
    uses the given scale in the interpreter, the TVM build and the ONNX export (two Gathers)."""
    from onnx import TensorProto, helper, numpy_helper
    from onnx.reference import ReferenceEvaluator

    from qcompiler.targets.onnx import export

    model = _onnx_model([helper.make_node("Resize", ["x", "roi", "scales"], ["y"], name="up", mode="nearest",
                                          coordinate_transformation_mode="tf_half_pixel_for_nn")],
                        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 5, 5])],
                        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", "c", "h", "w"])],
                        [numpy_helper.from_array(np.zeros(0, np.float32), "roi"),
                         numpy_helper.from_array(np.array([1, 1, 0.7, 1.3], np.float32), "scales")], opset=11)
    x = np.random.default_rng(0).standard_normal((1, 2, 5, 5)).astype(np.float32)
    # (onnx.reference dropped this mode) rows: (o + 0.5) / 0.7 = 0.71, 2.14, 3.57 for floor(3.5) = 3
    # outputs, rounded half down: 1, 2, 4; columns: (o + 0.5) / 1.3 for 6 outputs: 0, 1, 2, 3, 3, 4
    want = x[:, :, [1, 2, 4]][:, :, :, [0, 1, 2, 3, 3, 4]]
    graph = qcompiler.from_onnx(model)
    np.testing.assert_array_equal(graph(x)[0], want)
    np.testing.assert_array_equal(qcompiler.compile(graph, target="llvm")(x), want)
    np.testing.assert_array_equal(ReferenceEvaluator(export.to_onnx(graph)).run(None, {"x": x})[0], want)


@pytest.mark.parametrize("alpha", [1.0, 1.7])
def test_swiglu_and_swish_build_and_match_the_onnx_reference(alpha):
    """SwiGLU (opset 28: LLaMA-style gated FFNs) and Swish (24), on the
    interpreter and the TVM target."""
    from onnx import TensorProto, helper
    from onnx.reference import ReferenceEvaluator

    nodes = [helper.make_node("SwiGLU", ["a", "b"], ["g"], alpha=alpha),
             helper.make_node("Swish", ["g"], ["y"], alpha=alpha)]
    model = _onnx_model(nodes, [helper.make_tensor_value_info(n, TensorProto.FLOAT, [2, 8, 16]) for n in "ab"],
                        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 8, 16])], [], opset=28)
    rng = np.random.default_rng(3)
    a, b = (rng.standard_normal((2, 8, 16)).astype(np.float32) * 3 for _ in range(2))
    want = ReferenceEvaluator(model).run(None, {"a": a, "b": b})[0]
    np.testing.assert_allclose(qcompiler.from_onnx(model)(a, b)[0], want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(qcompiler.compile(model, target="llvm")(a, b), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("source, to", [(np.float32, "int32"), (np.int64, "float64"), (np.uint16, "int16"),
                                        (np.bool_, "uint8"), (np.float16, "int16")])
def test_bitcast_reads_the_same_bits_on_every_target(source, to):
    """ONNX BitCast (opset 26), against numpy's view, on the interpreter and the TVM target."""
    from onnx import helper

    rng = np.random.default_rng(0)
    x = (rng.standard_normal((3, 5)) * 1e3).astype(source) if source is not np.bool_ else rng.random((3, 5)) > 0.5
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(source))
    target = helper.np_dtype_to_tensor_dtype(np.dtype(to))
    model = _onnx_model([helper.make_node("BitCast", ["x"], ["y"], to=target)],
                        [helper.make_tensor_value_info("x", elem, [3, 5])],
                        [helper.make_tensor_value_info("y", target, [3, 5])], opset=26)
    want = x.view(to)
    np.testing.assert_array_equal(qcompiler.from_onnx(model)(x)[0], want)
    np.testing.assert_array_equal(np.asarray(qcompiler.compile(model, target="llvm")(x)), want)


def _through_every_target(model, feeds: dict, exact: bool):
    """``model`` on the interpreter, built for llvm, and exported back to ONNX, each against the
    ONNX reference; ``exact`` for integer results."""
    from onnx.reference import ReferenceEvaluator

    from qcompiler.targets.onnx import export

    want = ReferenceEvaluator(model).run(None, feeds)[0]
    graph = qcompiler.from_onnx(model)
    check = np.testing.assert_array_equal if exact else \
        (lambda got, ref: np.testing.assert_allclose(got, ref, rtol=1e-6, atol=0))
    check(graph(*feeds.values())[0], want)
    check(np.asarray(qcompiler.compile(model, target="llvm")(*feeds.values())), want)
    check(ReferenceEvaluator(export.to_onnx(graph)).run(None, dict(zip((v.name for v in graph.inputs), feeds.values())))[0],
          want)


def _mod_operands(dtype):
    rng = np.random.default_rng(3)
    if np.dtype(dtype).kind == "f":
        edges = np.array([0.0, -0.0, 5.5, -5.5, np.inf, -np.inf, np.nan, 1e30, -7.25, 3.0], dtype)
        divisors = np.array([3.0, -3.0, np.inf, -np.inf, 2.0, 0.0, 1.5, 7.0, 0.5, -0.75], dtype)
        a = np.concatenate([edges, (rng.standard_normal(30) * 20).astype(dtype)])
        b = np.concatenate([divisors, (rng.standard_normal(30) * 4).astype(dtype)])
    else:
        lo = -50 if np.dtype(dtype).kind == "i" else 0
        a = np.concatenate([np.array([7, 0, 49, 3], dtype), rng.integers(lo, 50, 36).astype(dtype)])
        b = np.concatenate([np.array([0, 5, 7, 3], dtype), rng.integers(1, 9, 36).astype(dtype)])
        if lo < 0:
            b = b * np.where(rng.random(40) < 0.5, -1, 1).astype(dtype)
    return a.reshape(4, 10), b.reshape(4, 10)


@pytest.mark.parametrize("fmod", [0, 1])
@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16, np.int32, np.int8, np.uint16])
def test_mod_in_both_sign_conventions_matches_the_reference_on_every_target(dtype, fmod):
    """Before: fmod=0 on floats (Python's %, torch.remainder) was refused, and fmod=1 on floats
    was a - trunc(a / b) * b, which is off wherever a / b rounds. Now the IR's ``fmod`` is C's
    (LLVM's frem) and fmod=0 adds b where the signs differ: infinities, NaN, zero divisors and
    signed zeros as numpy has them."""
    from onnx import helper

    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    model = _onnx_model([helper.make_node("Mod", ["a", "b"], ["y"], fmod=fmod)],
                        [helper.make_tensor_value_info(n, elem, [4, 10]) for n in "ab"],
                        [helper.make_tensor_value_info("y", elem, [4, 10])], opset=13)
    a, b = _mod_operands(dtype)
    with np.errstate(all="ignore"):
        _through_every_target(model, {"a": a, "b": b}, exact=np.dtype(dtype).kind != "f")


@pytest.mark.parametrize("op", ["BitwiseAnd", "BitwiseOr", "BitwiseXor", "BitwiseNot"])
@pytest.mark.parametrize("dtype", [np.int32, np.uint8, np.int64])
def test_bitwise_ops_match_the_reference_on_every_target(op, dtype):
    from onnx import helper

    rng = np.random.default_rng(1)
    info = np.iinfo(dtype)
    a = rng.integers(max(info.min, -2**40), min(info.max, 2**40), (3, 4, 5), endpoint=True).astype(dtype)
    b = rng.integers(max(info.min, -2**40), min(info.max, 2**40), (4, 5), endpoint=True).astype(dtype)  # broadcasts
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    names = ["a"] if op == "BitwiseNot" else ["a", "b"]
    shapes = {"a": [3, 4, 5], "b": [4, 5]}
    model = _onnx_model([helper.make_node(op, names, ["y"])],
                        [helper.make_tensor_value_info(n, elem, shapes[n]) for n in names],
                        [helper.make_tensor_value_info("y", elem, [3, 4, 5])], opset=18)
    _through_every_target(model, {n: {"a": a, "b": b}[n] for n in names}, exact=True)


def test_torch_remainder_fmod_and_integer_bitwise_ops_match_torch():
    """Before: ``&``/``|`` on integer tensors were captured as logical and/or (6 & 3 gave 1, not
    2: silently wrong), ``^`` and ``~`` on integers, ``%`` and torch.fmod on floats refused."""

    class Arith(torch.nn.Module):
        def forward(self, x, k):
            bits = (k & 6) | (k ^ 5) | ~k
            return x % 1.5 + torch.fmod(x, -0.7) + torch.remainder(-x, 2.0) + bits.float()

    rng = np.random.default_rng(2)
    x = (rng.standard_normal((2, 16)) * 5).astype(np.float32)
    k = rng.integers(-20, 20, (2, 16)).astype(np.int64)
    model = Arith().eval()
    want = model(torch.from_numpy(x), torch.from_numpy(k)).numpy()
    graph = qcompiler.from_torch(model, (torch.from_numpy(x), torch.from_numpy(k)))
    assert {"bitwise_and", "bitwise_or", "bitwise_xor", "bitwise_not", "fmod"} <= {n.op for n in graph.nodes}
    np.testing.assert_allclose(graph(x, k)[0], want, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(qcompiler.compile(model, (torch.from_numpy(x), torch.from_numpy(k)), target="llvm")(x, k),
                               want, rtol=1e-6, atol=1e-6)


def _float16_onnx(model: torch.nn.Module, shape, path):
    """``model`` exported to ONNX and converted to float16 the way published fp16 models are
    (every float initializer and every float input, output and intermediate type halved)."""
    import onnx
    from onnx import TensorProto, numpy_helper

    torch.onnx.export(model, (torch.zeros(shape),), str(path), dynamo=False, opset_version=17,
                      input_names=["x"], output_names=["y"])
    proto = onnx.load(str(path))
    for init in proto.graph.initializer:
        if init.data_type == TensorProto.FLOAT:
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init).astype(np.float16), init.name))
    for node in proto.graph.node:  # Clip's bounds and other Constant nodes
        for attr in node.attribute:
            if attr.name == "value" and attr.t.data_type == TensorProto.FLOAT:
                attr.t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(attr.t).astype(np.float16), attr.t.name))
    for v in (*proto.graph.input, *proto.graph.output, *proto.graph.value_info):
        if v.type.tensor_type.elem_type == TensorProto.FLOAT:
            v.type.tensor_type.elem_type = TensorProto.FLOAT16
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path))
    return proto


def test_a_float16_model_quantizes_with_its_float16_interface(tmp_path):
    """Before: every float16 model failed in bias-correction ('conv2d: operand dtypes differ:
    f16, f32'): published models often ship halved. Now widen-float16 computes it in float32
    between its float16 input and output; every layer is int8, the build equals its
    interpreter run, and the output is ONNX Runtime's float16 result to int8 accuracy."""
    import onnxruntime as ort

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.BatchNorm2d(16), torch.nn.ReLU(),
                                torch.nn.Conv2d(16, 16, 3, padding=1, groups=16), torch.nn.ReLU6(),
                                torch.nn.Conv2d(16, 8, 1), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                                torch.nn.Linear(8, 10)).eval()
    path = tmp_path / "half.onnx"
    _float16_onnx(model, (1, 3, 24, 24), path)
    calibration = [x.astype(np.float16) for x in _calibration((1, 3, 24, 24), 8)]
    x = _calibration((1, 3, 24, 24), 1, seed=9)[0].astype(np.float16)
    want = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    compiled = qcompiler.compile(str(path), calibration=calibration, target="llvm")
    report = compiled.report()
    assert report["kept_float"] == [] and report["quantized"] and report["widen_float16"] == {"widened": True}
    got = np.asarray(compiled(x))
    assert got.dtype == np.float16 and got.shape == want.shape
    np.testing.assert_array_equal(got, compiled.graph(x)[0])
    assert sqnr_db(got.astype(np.float32), want.astype(np.float32)) > 30
    assert {n.op for n in compiled.graph.nodes} >= {"conv2d_int", "linear_int"}
