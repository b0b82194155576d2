"""The real-model corpus: the ONNX light zoo (tests/models/light_zoo.py), each model imported,
checked against ONNX Runtime in float, quantized with the default config on real photos, built
for this CPU and checked against the interpreter. Minutes in all: marked ``corpus`` and run with
``pytest -m corpus`` (``make corpus``), not by ``make test``."""
from __future__ import annotations

import numpy as np
import pytest

import qcompiler
from qcompiler.examples import zoo
from tests.models.light_zoo import light_models, load_light

ort = pytest.importorskip("onnxruntime")
pytestmark = pytest.mark.corpus


@pytest.fixture(scope="module")
def photos() -> list[np.ndarray]:
    return [np.asarray(p, np.float32).reshape(1, 3, 224, 224) for p in zoo.photo_crops(4)]


@pytest.mark.parametrize("name", light_models())
def test_light_model_quantizes_and_builds(name, photos):
    model = load_light(name)
    graph = qcompiler.from_onnx(model)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    x = photos[-1]
    want = session.run(None, {model.graph.input[0].name: x})[0]
    got = graph(x)[0]
    assert np.abs(got - want.reshape(got.shape)).max() <= 1e-4 * np.abs(want).max()
    compiled = qcompiler.compile(model, calibration=photos[:3], target="llvm")
    report = compiled.report()
    assert report["quantized"] and report["ops"]["integer"] > 0
    # only the sensitivity check keeps a layer float (an add of a constant, LRN's bias, is quantized),
    # besides a result no reader takes as int8 (a final global pool read by the float output)
    wrong = [k for k in report["kept_float"] if not k["reason"].startswith("local SQNR")
             and not k["reason"].startswith("no reader takes its result as int8")]
    assert wrong == [], wrong
    y, reference = compiled(x), compiled.graph(x)[0]
    assert np.abs(y - reference).max() <= 1e-5 * np.abs(reference).max()  # integer parts exact, float tails to ulps
    assert report["fidelity"]["output_cosine"] > 0.99, report["fidelity"]
