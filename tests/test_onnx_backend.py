"""The single-layer ONNX tests shipped inside the onnx wheel (pytorch-converted,
pytorch-operator, simple). A model is in scope when the importer accepts its op types; every
in-scope model must import and match its stored outputs. Out-of-scope models are listed by
the importer's own UnsupportedOpError, never skipped silently."""
from __future__ import annotations

import glob
import os

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from qcompiler import UnsupportedOpError, from_onnx
from qcompiler.capture.from_onnx import _CONVERTERS

DATA = os.path.join(os.path.dirname(onnx.__file__), "backend", "test", "data")
SUITES = ("pytorch-converted", "pytorch-operator", "simple")


def _op_types(path: str) -> set[str]:
    model = onnx.load(path, load_external_data=False)
    return {n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}.{n.op_type}" for n in model.graph.node}


def _cases() -> tuple[list[str], list[str]]:
    in_scope, out_of_scope = [], []
    for suite in SUITES:
        for case in sorted(glob.glob(os.path.join(DATA, suite, "*"))):
            ops = _op_types(os.path.join(case, "model.onnx"))
            (in_scope if ops <= set(_CONVERTERS) else out_of_scope).append(case)
    return in_scope, out_of_scope


IN_SCOPE, OUT_OF_SCOPE = _cases()


def test_scope_report():
    print(f"\nONNX backend models: {len(IN_SCOPE)} in scope (run below), {len(OUT_OF_SCOPE)} out of scope")
    assert len(IN_SCOPE) >= 110, "the in-scope set shrank: an importer regression?"
    for case in OUT_OF_SCOPE:  # out of scope means the importer refuses clearly, not a crash
        try:
            from_onnx(os.path.join(case, "model.onnx"))
        except UnsupportedOpError as e:
            assert "unsupported op types" in str(e)
        else:
            raise AssertionError(f"{case}: out of scope by op type but imported")


@pytest.mark.parametrize("case", IN_SCOPE, ids=lambda c: f"{os.path.basename(os.path.dirname(c))}/{os.path.basename(c)}")
def test_in_scope_model_matches_stored_outputs(case):
    try:
        graph = from_onnx(os.path.join(case, "model.onnx"))
    except UnsupportedOpError as e:
        # only a run-time shape operand (dynamic shapes) may refuse an in-scope op type
        assert "run-time shape operand" in str(e), str(e)
        return
    sets = sorted(glob.glob(os.path.join(case, "test_data_set_*")))
    assert sets
    for data_set in sets:
        inputs = [numpy_helper.to_array(onnx.load_tensor(f)) for f in sorted(glob.glob(f"{data_set}/input_*.pb"))]
        wants = [numpy_helper.to_array(onnx.load_tensor(f)) for f in sorted(glob.glob(f"{data_set}/output_*.pb"))]
        gots = graph(*inputs)
        assert len(gots) == len(wants)
        for got, want in zip(gots, wants):
            assert got.shape == want.shape and got.dtype == want.dtype
            finite = np.abs(want[np.isfinite(want)]) if want.dtype.kind == "f" else np.abs(want)
            scale = max(float(finite.max()) if finite.size else 0.0, 1.0)
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * scale)
