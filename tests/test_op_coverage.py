"""Every op the registry declares is complete: a reference kernel, a TVM lowering (or a reason
on that target), an ONNX export rule (or a reason), and a place that makes it (a capture
table, or the pass that lowers to it). An op added and forgotten somewhere fails here, naming
the file to change, not at a user's model."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

import qcompiler.torch_kernels  # noqa: F401  (installs the kernels that need torch, as the interpreter does)
from qcompiler.ir.ops import Traits, all_ops, declare
from qcompiler.ir.ops.registry import _REGISTRY
from qcompiler.targets.onnx import export
from qcompiler.targets.tvm import relax_lower

ROOT = Path(__file__).resolve().parents[1]
CAPTURE = ROOT / "qcompiler" / "capture"
PASSES = ROOT / "passes"


def _literals(folder: Path) -> set[str]:
    """Every quoted string in the Python files of ``folder``: where op names are spelled out."""
    text = "\n".join(p.read_text() for p in folder.glob("*.py"))
    return set(re.findall(r'"([A-Za-z0-9_]+)"', text))


def coverage_problems() -> list[str]:
    captured, made_by_passes = _literals(CAPTURE), _literals(PASSES)
    integer_forms = {op.traits.integer_form for op in all_ops().values()}
    tvm, tvm_missing = relax_lower.supported_ops(), relax_lower.not_lowered()
    onnx, onnx_missing = export.supported_ops(), export.not_exported()
    problems = []
    for name, op in all_ops().items():
        if not callable(op.kernel_fn):
            problems.append(f"{name}: no reference kernel (its declaration in qcompiler/ir/ops/, or "
                            f"qcompiler/torch_kernels.py)")
        if name not in tvm and not tvm_missing.get(name):
            problems.append(f"{name}: no TVM lowering (targets/tvm/relax_lower.py: @lowers, or a reason in "
                            f"not_lowered())")
        if name not in onnx and not onnx_missing.get(name):
            problems.append(f"{name}: no ONNX export (targets/onnx/export.py: @exports, or a reason in not_exported())")
        if name not in captured and name not in made_by_passes and name not in integer_forms:
            problems.append(f"{name}: nothing makes it (a converter in qcompiler/capture/, or a pass in passes/)")
    return problems


def test_every_op_is_complete_everywhere():
    assert coverage_problems() == []


def test_traits_are_consistent():
    """What the passes rely on: a weighted op names its weight and its integer form, which exists."""
    ops = all_ops()
    for name, op in ops.items():
        t = op.traits
        assert t.quantized_as is None or t.quantized_as in ops, name
        if t.quant == "weighted":
            assert t.weight_slot is not None and t.integer_form in ops, name
            assert t.fuses_activation, name
        if t.spatial_rank is not None:
            assert t.spatial_rank in (1, 2, 3), name
        if t.config_type is not None:
            assert t.quant != "float", name


@pytest.fixture
def toy_op():
    """An op declared in this test alone, removed again afterwards."""
    declare("toy_square", arity=1, infer=lambda types, attrs: [types[0]], kernel=lambda xs, attrs: xs[0] * xs[0],
            traits=Traits("elementwise"), doc="x * x (a test's op)")
    yield "toy_square"
    del _REGISTRY["toy_square"]


def test_a_new_op_names_every_file_that_must_change(toy_op):
    problems = [p for p in coverage_problems() if p.startswith(toy_op)]
    assert problems == [
        "toy_square: no TVM lowering (targets/tvm/relax_lower.py: @lowers, or a reason in not_lowered())",
        "toy_square: no ONNX export (targets/onnx/export.py: @exports, or a reason in not_exported())",
        "toy_square: nothing makes it (a converter in qcompiler/capture/, or a pass in passes/)",
    ]
