"""A detector with the structure of the most published one (Ultralytics YOLOv8: C2f blocks that
split a tensor and join its parts, SPPF's chained max pools, nearest upsampling in the neck, a
decoupled head whose box branch is a distribution over 16 bins (DFL: softmax, then a 1x1 conv
with 0..15), and boxes in pixels joined with sigmoid class scores in one output), written here
with YOLOv8n's widths at 320 px and random weights (no hub download). Exported both ways torch
exports, quantized with the default config, built for this CPU: the detections a float run
keeps must survive, boxes within a few pixels. Marked ``corpus`` (about a minute)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import qcompiler
from qcompiler.compare import sqnr_db

pytestmark = pytest.mark.corpus


class ConvBnSiLU(nn.Sequential):
    def __init__(self, cin: int, cout: int, k: int = 1, s: int = 1):
        super().__init__(nn.Conv2d(cin, cout, k, s, k // 2, bias=False), nn.BatchNorm2d(cout), nn.SiLU())


class Bottleneck(nn.Module):
    def __init__(self, c: int, shortcut: bool):
        super().__init__()
        self.cv1, self.cv2, self.add = ConvBnSiLU(c, c, 3), ConvBnSiLU(c, c, 3), shortcut

    def forward(self, x):
        y = self.cv2(self.cv1(x))
        return x + y if self.add else y


class C2f(nn.Module):
    """cv1 to 2c channels, split in two halves, n bottlenecks on the second, all parts joined."""

    def __init__(self, cin: int, cout: int, n: int = 1, shortcut: bool = False):
        super().__init__()
        self.c = cout // 2
        self.cv1, self.cv2 = ConvBnSiLU(cin, 2 * self.c), ConvBnSiLU((2 + n) * self.c, cout)
        self.m = nn.ModuleList(Bottleneck(self.c, shortcut) for _ in range(n))

    def forward(self, x):
        parts = list(self.cv1(x).chunk(2, 1))
        for m in self.m:
            parts.append(m(parts[-1]))
        return self.cv2(torch.cat(parts, 1))


class SPPF(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.cv1, self.cv2 = ConvBnSiLU(cin, cin // 2), ConvBnSiLU(cin * 2, cout)
        self.pool = nn.MaxPool2d(5, 1, 2)

    def forward(self, x):
        y = [self.cv1(x)]
        for _ in range(3):
            y.append(self.pool(y[-1]))
        return self.cv2(torch.cat(y, 1))


class Detector(nn.Module):
    """YOLOv8n's layout: widths 16..256, strides 8/16/32, 16 DFL bins, ``classes`` classes."""

    def __init__(self, classes: int = 8, size: int = 320):
        super().__init__()
        w = [16, 32, 64, 128, 256]
        self.stem = nn.Sequential(ConvBnSiLU(3, w[0], 3, 2), ConvBnSiLU(w[0], w[1], 3, 2), C2f(w[1], w[1], 1, True))
        self.p3 = nn.Sequential(ConvBnSiLU(w[1], w[2], 3, 2), C2f(w[2], w[2], 2, True))
        self.p4 = nn.Sequential(ConvBnSiLU(w[2], w[3], 3, 2), C2f(w[3], w[3], 2, True))
        self.p5 = nn.Sequential(ConvBnSiLU(w[3], w[4], 3, 2), C2f(w[4], w[4], 1, True), SPPF(w[4], w[4]))
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.n4, self.n3 = C2f(w[4] + w[3], w[3]), C2f(w[3] + w[2], w[2])
        self.d3, self.o4 = ConvBnSiLU(w[2], w[2], 3, 2), C2f(w[2] + w[3], w[3])
        self.d4, self.o5 = ConvBnSiLU(w[3], w[3], 3, 2), C2f(w[3] + w[4], w[4])
        self.bins, self.classes = 16, classes
        self.box = nn.ModuleList(nn.Sequential(ConvBnSiLU(c, 64, 3), ConvBnSiLU(64, 64, 3), nn.Conv2d(64, 64, 1))
                                 for c in w[2:])
        self.cls = nn.ModuleList(nn.Sequential(ConvBnSiLU(c, 64, 3), ConvBnSiLU(64, 64, 3), nn.Conv2d(64, classes, 1))
                                 for c in w[2:])
        for conv in self.modules():  # variance-keeping init: PyTorch's default shrinks it ~3x a layer, and
            if isinstance(conv, nn.Conv2d):  # 60 layers deep every position would look the same
                nn.init.kaiming_normal_(conv.weight, nonlinearity="relu")
        self.dfl = nn.Conv2d(self.bins, 1, 1, bias=False).requires_grad_(False)
        self.dfl.weight.data[:] = torch.arange(self.bins, dtype=torch.float32).view(1, self.bins, 1, 1)
        anchors, strides = [], []
        for stride in (8, 16, 32):
            n = size // stride
            ys, xs = torch.meshgrid(torch.arange(n) + 0.5, torch.arange(n) + 0.5, indexing="ij")
            anchors.append(torch.stack([xs, ys], 0).reshape(2, -1))
            strides.append(torch.full((1, n * n), float(stride)))
        self.register_buffer("anchors", torch.cat(anchors, 1))
        self.register_buffer("strides", torch.cat(strides, 1))

    def forward(self, x):
        p3 = self.p3(self.stem(x))
        p4 = self.p4(p3)
        p5 = self.p5(p4)
        n4 = self.n4(torch.cat([self.up(p5), p4], 1))
        o3 = self.n3(torch.cat([self.up(n4), p3], 1))
        o4 = self.o4(torch.cat([self.d3(o3), n4], 1))
        o5 = self.o5(torch.cat([self.d4(o4), p5], 1))
        b = x.shape[0]
        levels = [torch.cat([self.box[i](f), self.cls[i](f)], 1).view(b, 4 * self.bins + self.classes, -1)
                  for i, f in enumerate((o3, o4, o5))]
        box, cls = torch.cat(levels, 2).split((4 * self.bins, self.classes), 1)
        a = box.shape[-1]
        dist = self.dfl(box.view(b, 4, self.bins, a).transpose(2, 1).softmax(1)).view(b, 4, a)
        lt, rb = dist.chunk(2, 1)
        x1y1, x2y2 = self.anchors - lt, self.anchors + rb
        xywh = torch.cat([(x1y1 + x2y2) / 2, x2y2 - x1y1], 1) * self.strides
        return torch.cat([xywh, cls.sigmoid()], 1)  # [B, 4 + classes, anchors], pixels then scores


def _scene(rng: np.random.Generator, size: int = 320) -> np.ndarray:
    """A picture with things in it: a shaded background and a dozen coloured boxes of any size."""
    y, x = np.mgrid[0:size, 0:size] / size
    image = np.stack([0.3 + 0.2 * x, 0.3 + 0.2 * y, 0.4 - 0.1 * x * y])
    for _ in range(12):
        x0, y0 = rng.integers(0, size - 16, 2)
        w, h = rng.integers(12, 120, 2)
        image[:, y0:y0 + h, x0:x0 + w] = rng.uniform(0, 1, (3, 1, 1))
    return (image + rng.normal(0, 0.02, image.shape))[None].astype(np.float32)


def _like_a_trained_head(model: Detector, image: torch.Tensor) -> None:
    """Random weights give every anchor the same score (~0.52); a trained head's class logits
    spread (most anchors background, a few confident): each level's last conv is rescaled so
    each class's logits have a spread of 2.5 around -3."""
    logits = {}
    hooks = [head[-1].register_forward_hook(lambda m, i, o, k=k: logits.__setitem__(k, o))
             for k, head in enumerate(model.cls)]
    with torch.no_grad():
        model(image)
        for k, head in enumerate(model.cls):
            mean, std = logits[k].mean(dim=(0, 2, 3)), logits[k].std(dim=(0, 2, 3))  # per class, over positions
            head[-1].weight.mul_((2.5 / std).view(-1, 1, 1, 1))
            head[-1].bias.copy_((head[-1].bias - mean) * 2.5 / std - 3.0)
    for hook in hooks:
        hook.remove()


def _detections(out: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    scores = out[:, 4:]
    return scores.max(1) > threshold, scores.argmax(1)


@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript", "dynamo"])
def test_a_yolo_style_detector_keeps_its_detections(dynamo, tmp_path):
    torch.manual_seed(0)
    model = Detector().eval()
    rng = np.random.default_rng(0)
    images = [_scene(rng) for _ in range(5)]
    _like_a_trained_head(model, torch.from_numpy(images[0]))
    path = tmp_path / "detector.onnx"
    with torch.no_grad():
        torch.onnx.export(model, (torch.from_numpy(images[0]),), str(path), input_names=["images"],
                          output_names=["output0"], opset_version=17 if not dynamo else 18, dynamo=dynamo)
        want = model(torch.from_numpy(images[0])).numpy()
    graph = qcompiler.from_onnx(path)
    assert sqnr_db(want, graph(images[0])[0]) > 90
    compiled = qcompiler.compile(path, calibration=images[1:])
    got = np.asarray(compiled(images[0]))
    threshold = float(np.quantile(want[:, 4:].max(1), 0.98))  # the top 2 % of anchors are "detections"
    found, label = _detections(want, threshold)
    kept, kept_label = _detections(got, threshold * 0.9)
    assert found.sum() >= 20
    assert (kept & (kept_label == label))[found].mean() >= 0.9
    boxes = np.abs(got[:, :4] - want[:, :4])[np.broadcast_to(found[:, None, :], got[:, :4].shape)]
    assert np.median(boxes) < 4.0  # pixels, at 320 px
    report = compiled.report()
    allowed = ("min_layer_sqnr_db", "one int8 grid", "fused activation has no integer form",  # SiLU: float epilogue
               "no reader takes its result as int8")  # the heads' joins, read by float decoding
    unexplained = [e for e in report["kept_float"] if not any(why in e["reason"] for why in allowed)]
    assert unexplained == [], unexplained
    assert report["ops"]["by_op"].get("conv2d_int", 0) >= 60 and "conv2d" not in report["ops"]["by_op"]
