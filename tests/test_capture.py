"""Capture from PyTorch and from ONNX (exported from the same module): the interpreter's
outputs match PyTorch (and ONNX Runtime on the ONNX path) within 1e-4 of the largest output,
and every captured graph prints and parses back identically."""
from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch

import qcompiler
from qcompiler import from_onnx, from_torch, parse_graph, print_graph
from qcompiler.examples import zoo
from tests.conftest import export_onnx, rel_err

TOL = 1e-4


def _round_trips(graph) -> None:
    text = print_graph(graph, elide_above=16)
    assert print_graph(parse_graph(text, graph.constants)) == text


def _ort(path: str, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    return ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, feeds)


CNNS = {"resnet18": zoo.resnet18, "mobilenet_v2": zoo.mobilenet_v2}


@pytest.mark.parametrize("name", sorted(CNNS))
def test_cnn_from_torch_matches_pytorch(name, image_batch):
    model = CNNS[name]()
    graph = from_torch(model, (image_batch,))
    with torch.no_grad():
        want = model(image_batch).numpy()
    assert rel_err(graph(image_batch.numpy())[0], want) < TOL
    counts = graph.op_counts()
    assert counts["conv2d"] == (20 if name == "resnet18" else 52) and counts["batch_norm"] == counts["conv2d"]
    _round_trips(graph)


@pytest.mark.parametrize("name", sorted(CNNS))
def test_cnn_from_onnx_matches_pytorch_and_onnxruntime(name, image_batch, tmp_path):
    model = CNNS[name]()
    path = export_onnx(model, (image_batch,), tmp_path / f"{name}.onnx", ["x"])
    graph = from_onnx(path)
    got = graph(image_batch.numpy())[0]
    with torch.no_grad():
        assert rel_err(got, model(image_batch).numpy()) < TOL
    assert rel_err(got, _ort(path, {"x": image_batch.numpy()})[0]) < TOL
    _round_trips(graph)


def test_mobilenet_has_depthwise_relu6_and_residuals(image_batch):
    graph = from_torch(zoo.mobilenet_v2(), (image_batch,))
    depthwise = [n for n in graph.nodes if n.op == "conv2d" and n.attrs["groups"] > 1]
    assert depthwise and all(n.attrs["groups"] == n.inputs[1].shape[0] for n in depthwise)
    assert all(n.attrs == {"min": 0.0, "max": 6.0} for n in graph.nodes if n.op == "clip")
    assert graph.op_counts()["add"] == 10  # the residual connections


def test_trained_digits_cnn_both_paths_keep_accuracy(digits, tmp_path):
    model, (_, _, x_test, y_test) = digits
    with torch.no_grad():
        want = model(torch.from_numpy(x_test)).numpy()
    assert zoo.accuracy(want, y_test) > 0.9  # it did learn
    from_t = from_torch(model, (torch.from_numpy(x_test),))
    path = export_onnx(model, (torch.from_numpy(x_test),), tmp_path / "digits.onnx", ["image"])
    from_o = from_onnx(path)
    for graph in (from_t, from_o):
        got = graph(x_test)[0]
        assert rel_err(got, want) < TOL
        assert zoo.accuracy(got, y_test) == zoo.accuracy(want, y_test)
        _round_trips(graph)
    assert rel_err(from_o(x_test)[0], _ort(path, {"image": x_test})[0]) < TOL


def test_minilm_from_torch_matches_pytorch(minilm):
    encoder, ids, mask = minilm
    graph = from_torch(encoder, (ids, mask))
    with torch.no_grad():
        want = encoder(ids, mask).numpy()
    got = graph(ids.numpy(), mask.numpy())[0]
    assert rel_err(got, want) < TOL
    counts = graph.op_counts()
    assert counts["linear"] == 36 and counts["layer_norm"] == 13 and counts["softmax"] == 6 and counts["gelu"] == 6
    _round_trips(graph)


def test_minilm_from_onnx_matches_pytorch_and_onnxruntime(minilm, tmp_path):
    encoder, ids, mask = minilm
    path = export_onnx(encoder, (ids, mask), tmp_path / "minilm.onnx", ["input_ids", "attention_mask"])
    graph = from_onnx(path)
    got = graph(ids.numpy(), mask.numpy())[0]
    with torch.no_grad():
        assert rel_err(got, encoder(ids, mask).numpy()) < TOL
    assert rel_err(got, _ort(path, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})[0]) < TOL
    _round_trips(graph)


class _Ops(torch.nn.Module):
    """The op families of the foundation issue not covered by the models above."""

    def __init__(self):
        super().__init__()
        self.conv1d = torch.nn.Conv1d(4, 6, 3, padding=2, dilation=2)
        self.grouped = torch.nn.Conv2d(4, 8, 3, stride=2, padding=1, groups=2)
        self.avg = torch.nn.AvgPool2d(3, 2, 1, ceil_mode=True, count_include_pad=False)
        self.fc = torch.nn.Linear(8, 5)

    def forward(self, x, seq):
        y = self.grouped(x)
        y = torch.nn.functional.hardswish(y) + torch.sigmoid(y) * torch.tanh(y) - torch.nn.functional.silu(y)
        y = self.avg(torch.nn.functional.gelu(y, approximate="tanh"))
        y = torch.cat([y, torch.nn.functional.max_pool2d(y, 3, 1, 1, dilation=1)], dim=1)
        y = y.permute(0, 2, 3, 1)[..., ::2]  # strided slice
        z = self.conv1d(seq).mean(-1)
        s = torch.softmax(self.fc(y), dim=-1) + torch.nn.functional.layer_norm(self.fc(y), (5,))
        return s.flatten(1), torch.bmm(z.unsqueeze(1), z.unsqueeze(2)).squeeze(-1), torch.erf(z)


def test_op_families_match_pytorch_on_both_paths(tmp_path):
    torch.manual_seed(0)
    model = _Ops().eval()
    x, seq = torch.randn(2, 4, 9, 9), torch.randn(2, 4, 10)
    with torch.no_grad():
        want = [t.numpy() for t in model(x, seq)]
    path = export_onnx(model, (x, seq), tmp_path / "ops.onnx", ["x", "seq"])
    for graph in (from_torch(model, (x, seq)), from_onnx(path)):
        got = graph(x.numpy(), seq.numpy())
        for g, w in zip(got, want):
            assert rel_err(g, w) < TOL
        _round_trips(graph)


class _RunningSums(torch.nn.Module):
    """RoBERTa's position ids (a running count of the non-padding tokens: cumsum over an int
    mask) and float running sums along a middle and the first axis."""

    def forward(self, ids, x):
        mask = ids.ne(1).int()
        positions = torch.cumsum(mask, dim=1).type_as(mask) * mask + 1
        return positions.long(), torch.cumsum(x, dim=1), torch.cumsum(x, 0)


def test_cumsum_matches_pytorch_on_both_paths_and_tvm(tmp_path):
    torch.manual_seed(0)
    ids = torch.tensor([[5, 7, 9, 1, 1], [4, 1, 6, 8, 2]])
    x = torch.randn(2, 5, 3)
    model = _RunningSums().eval()
    want = [t.numpy() for t in model(ids, x)]
    path = export_onnx(model, (ids, x), tmp_path / "sums.onnx", ["ids", "x"])
    built = qcompiler.compile(model, (ids, x))
    for run in (from_torch(model, (ids, x)), from_onnx(path), built):
        got = run(ids.numpy(), x.numpy())
        np.testing.assert_array_equal(got[0], want[0])
        for g, w in zip(got[1:], want[1:]):
            assert rel_err(g, w) < TOL


class _PublishedModelOps(torch.nn.Module):
    """Ops published transformers and audio/vision models use: group norm (wav2vec2's feature
    extractor), instance norm with input and with running statistics, roll (Swin's shifted
    windows: by dims, and flattened), baddbmm with alpha (BLOOM's attention scores) and addmm
    with alpha and beta."""

    def __init__(self):
        super().__init__()
        self.group = torch.nn.GroupNorm(2, 4)
        self.bare_group = torch.nn.GroupNorm(4, 4, affine=False)
        self.instance = torch.nn.InstanceNorm2d(4, affine=True)
        self.tracked = torch.nn.InstanceNorm2d(4, affine=True, track_running_stats=True)
        with torch.no_grad():
            for norm in (self.group, self.instance, self.tracked):
                norm.weight.uniform_(0.5, 2.0)
                norm.bias.uniform_(-1.0, 1.0)
            self.tracked.running_mean.uniform_(-1, 1)
            self.tracked.running_var.uniform_(0.5, 2)

    def forward(self, x, q, k, bias):
        y = self.group(x) + self.bare_group(x) * self.instance(x) - self.tracked(x)
        y = torch.roll(y, shifts=(-1, 2), dims=(2, 3)) + torch.roll(x, 3)
        scores = torch.baddbmm(bias, q, k.transpose(1, 2), alpha=0.125)
        flat = torch.addmm(bias[0], q[0], k[0].t(), beta=0.5, alpha=2.0)
        return y, scores, flat


def test_published_model_ops_match_pytorch_on_both_paths_and_tvm(tmp_path):
    torch.manual_seed(0)
    model = _PublishedModelOps().eval()
    args = (torch.randn(2, 4, 5, 6) * 3 + 1, torch.randn(3, 7, 8), torch.randn(3, 9, 8), torch.randn(3, 7, 9))
    with torch.no_grad():
        want = [t.numpy() for t in model(*args)]
    path = export_onnx(model, args, tmp_path / "published.onnx", ["x", "q", "k", "bias"])
    arrays = [a.numpy() for a in args]
    for run in (from_torch(model, args), from_onnx(path), qcompiler.compile(model, args)):
        for g, w in zip(run(*arrays), want):
            assert rel_err(g, w) < TOL


class _IndexingAndPatchOps(torch.nn.Module):
    """More of what published models call: stack (GPT-J's rotary), softplus with beta and
    threshold (Mamba), index_select (XLNet), repeat_interleave (Canine), indexing past skipped
    axes (Falcon: ``x[:, idx]``; non-adjacent index tensors go first, as in torch), multiply,
    and unfold/fold (ConvBERT's span convolution, MobileViTV2)."""

    def __init__(self):
        super().__init__()
        self.unfold = torch.nn.Unfold(kernel_size=(2, 3), dilation=(1, 2), padding=1, stride=(2, 1))
        self.fold = torch.nn.Fold(output_size=(5, 6), kernel_size=(2, 3), dilation=(1, 2), padding=1, stride=(2, 1))

    def forward(self, x, idx):
        stacked = torch.stack([x, torch.multiply(x, 2.0), -x], dim=2)
        soft = torch.nn.functional.softplus(x, beta=2.0, threshold=3.0)
        picked = torch.index_select(x, 1, idx) + x[:, idx] + torch.repeat_interleave(x, 2, dim=3)[..., ::2]
        apart = x[idx[:2], :, idx[:2]]  # non-adjacent: the index's axis first
        patches = self.unfold(x)
        return stacked, soft, picked, apart, patches, self.fold(patches)


def test_indexing_and_patch_ops_match_pytorch_on_both_paths_and_tvm(tmp_path):
    torch.manual_seed(0)
    model = _IndexingAndPatchOps().eval()
    args = (torch.randn(4, 4, 5, 6) * 3, torch.tensor([2, 0, 3, 3]))
    with torch.no_grad():
        want = [t.numpy() for t in model(*args)]
    path = export_onnx(model, args, tmp_path / "indexing.onnx", ["x", "idx"])
    arrays = [a.numpy() for a in args]
    for run in (from_torch(model, args), from_onnx(path), qcompiler.compile(model, args)):
        got = run(*arrays)
        for g, w in zip(got, want):
            assert g.shape == w.shape and rel_err(g, w) < TOL


class _VideoAndTrigOps(torch.nn.Module):
    """Tensor.repeat with a new leading axis (TimeSformer's class token per frame), a 3-D
    convolution (VideoMAE's tubelet embedding) and the inverse trigonometric and hyperbolic
    functions (YOSO's acos), sign."""

    def __init__(self):
        super().__init__()
        self.tubelets = torch.nn.Conv3d(3, 4, (2, 3, 3), stride=(2, 2, 2), padding=(0, 1, 1))

    def forward(self, video, x):
        tiled = x.repeat(2, 1, 3)
        y = torch.tanh(x) * 0.9
        trig = torch.acos(y) + torch.asin(y) * torch.atan(x) - torch.atanh(y) + torch.sinh(y) * torch.cosh(y)
        hyperbolic = torch.asinh(x) + torch.acosh(1 + x * x) + torch.tan(y) * torch.sign(x)
        return self.tubelets(video), tiled, trig + hyperbolic


def test_video_and_trig_ops_match_pytorch_on_both_paths_and_tvm(tmp_path):
    torch.manual_seed(0)
    model = _VideoAndTrigOps().eval()
    args = (torch.randn(2, 3, 4, 8, 8), torch.randn(4, 5))
    with torch.no_grad():
        want = [t.numpy() for t in model(*args)]
    path = export_onnx(model, args, tmp_path / "video.onnx", ["video", "x"])
    arrays = [a.numpy() for a in args]
    for run in (from_torch(model, args), from_onnx(path), qcompiler.compile(model, args)):
        for g, w in zip(run(*arrays), want):
            assert g.shape == w.shape and rel_err(g, w) < TOL


class _Interpolate(torch.nn.Module):
    def __init__(self, mode: str, factor: float, align_corners: bool | None):
        super().__init__()
        self.mode, self.factor, self.align = mode, factor, align_corners

    def forward(self, x):
        return torch.nn.functional.interpolate(x, scale_factor=self.factor, mode=self.mode, align_corners=self.align)


INTERPOLATIONS = [("nearest", None), ("nearest-exact", None), ("bilinear", False), ("bilinear", True),
                  ("bicubic", False), ("bicubic", True)]


@pytest.mark.parametrize("mode, align", INTERPOLATIONS, ids=[f"{m}-align{a}" for m, a in INTERPOLATIONS])
def test_interpolate_by_fractional_factors_matches_pytorch_on_both_paths_and_tvm(mode, align, tmp_path):
    """torch maps coordinates by the scale factor it was given, not by out / in, when the sizes
    are fractional (0.6 of 7 rows is 4); an output of one pixel has no special case."""
    from tests.test_tvm import run_llvm

    torch.manual_seed(0)
    for factor, shape in ((0.6, (7, 9)), (1.7, (5, 11)), (0.35, (5, 6))):
        model, x = _Interpolate(mode, factor, align), torch.randn(1, 2, *shape)
        want = model(x).numpy()
        graph = from_torch(model, (x,))
        assert np.abs(graph(x.numpy())[0] - want).max() < 1e-5, (factor, shape)
        if factor == 0.35:  # one output row
            assert np.abs(run_llvm(graph, [x.numpy()])[0] - want).max() < 1e-5
    if mode != "nearest-exact" and not align:  # the ONNX exporter's Resize with scales
        path = export_onnx(model, (x,), tmp_path / "resize.onnx", ["x"])
        assert np.abs(from_onnx(path)(x.numpy())[0] - want).max() < 1e-5


class _EdgeRolls(torch.nn.Module):
    """Rolls that move nothing: a whole turn, and an axis of length zero (a modulo by zero once)."""

    def forward(self, x, empty):
        return torch.roll(x, shifts=(5, -5), dims=(1, 2)), torch.roll(empty, 2, dims=1)


def test_rolls_that_move_nothing_match_pytorch():
    x, empty = torch.randn(2, 5, 5), torch.randn(2, 0, 3)
    got = from_torch(_EdgeRolls().eval(), (x, empty))(x.numpy(), empty.numpy())
    np.testing.assert_array_equal(got[0], x.numpy())
    assert got[1].shape == (2, 0, 3)
