"""The whole ONNX node test suite of the onnx wheel (1,884 cases from its generators) through the
importer and the interpreter: no case may crash or give a wrong result, and no case that passed
may regress (tests/onnx_node_expected.json lists each as pass or unsupported; the unsupported
ones must refuse in one line). Debian's libonnx-testdata is not installed here: see the README."""
from __future__ import annotations

import json

import pytest

from tests.onnx_node_cases import EXPECTED, cases, outcome

CASES = cases()
EXPECTED_OUTCOMES = json.loads(EXPECTED.read_text())


def test_the_expected_file_covers_the_suite():
    assert set(EXPECTED_OUTCOMES) == {tc.name for tc in CASES}
    passing = sum(1 for v in EXPECTED_OUTCOMES.values() if v == "pass")
    print(f"\nONNX node suite: {passing} of {len(CASES)} pass; the rest are refused in one line")
    assert set(EXPECTED_OUTCOMES.values()) <= {"pass", "unsupported"}


@pytest.mark.parametrize("tc", CASES, ids=lambda tc: tc.name)
def test_node_case(tc):
    got, detail = outcome(tc)
    assert got in ("pass", "unsupported"), f"{tc.name}: {got}: {detail}"
    if EXPECTED_OUTCOMES.get(tc.name) == "pass":
        assert got == "pass", f"{tc.name} passed before and is now {got}: {detail}"
