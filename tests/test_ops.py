"""Reference kernels against PyTorch on the edge cases of each op family, plus the registry's
invariants (every op declares a kernel that agrees with its own type inference)."""
from __future__ import annotations

import ast
import pathlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from qcompiler import run
from qcompiler.ir import Graph, TensorType
from qcompiler.ir.ops import all_ops, get_op

rng = np.random.default_rng(0)


def _apply(op: str, arrays: list[np.ndarray], attrs: dict) -> list[np.ndarray]:
    g = Graph()
    values = [g.add_input(f"x{i}", TensorType.of(a)) for i, a in enumerate(arrays)]
    node = g.add_node(op, values, attrs)
    g.set_outputs(node.outputs)
    return run(g, arrays)


@pytest.mark.parametrize("kernel, stride, pad, ceil, include", [
    (3, 2, 1, True, False), (3, 2, 1, True, True), (2, 2, 0, True, True), (3, 1, 1, False, True), (5, 3, 2, True, False),
])
def test_avg_pool_matches_torch(kernel, stride, pad, ceil, include):
    x = rng.standard_normal((2, 3, 11, 10)).astype(np.float32)
    (got,) = _apply("avg_pool2d", [x], {"kernel": [kernel] * 2, "strides": [stride] * 2, "pads": [pad] * 4,
                                        "ceil_mode": ceil, "count_include_pad": include})
    want = F.avg_pool2d(torch.from_numpy(x), kernel, stride, pad, ceil_mode=ceil, count_include_pad=include).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kernel, stride, pad, dilation, ceil", [(3, 2, 1, 1, False), (3, 2, 1, 2, True), (2, 3, 1, 1, True)])
def test_max_pool_matches_torch(kernel, stride, pad, dilation, ceil):
    x = rng.standard_normal((1, 2, 12, 13)).astype(np.float32)
    (got,) = _apply("max_pool2d", [x], {"kernel": [kernel] * 2, "strides": [stride] * 2, "pads": [pad] * 4,
                                        "dilations": [dilation] * 2, "ceil_mode": ceil})
    want = F.max_pool2d(torch.from_numpy(x), kernel, stride, pad, dilation, ceil_mode=ceil).numpy()
    np.testing.assert_array_equal(got, want)


def test_conv_with_asymmetric_pads_equals_explicit_pad_then_conv():
    x = rng.standard_normal((1, 4, 7, 7)).astype(np.float32)
    w = rng.standard_normal((6, 2, 3, 3)).astype(np.float32)
    (got,) = _apply("conv2d", [x, w], {"pads": [0, 1, 2, 1], "groups": 2, "strides": [2, 1], "dilations": [1, 2]})
    padded = F.pad(torch.from_numpy(x), (1, 1, 0, 2))
    want = F.conv2d(padded, torch.from_numpy(w), stride=(2, 1), dilation=(1, 2), groups=2).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_layer_norm_softmax_gelu_match_torch():
    x = rng.standard_normal((2, 5, 8)).astype(np.float32)
    w, b = rng.standard_normal(8).astype(np.float32), rng.standard_normal(8).astype(np.float32)
    tx = torch.from_numpy(x)
    np.testing.assert_allclose(_apply("layer_norm", [x, w, b], {"epsilon": 1e-12})[0],
                               F.layer_norm(tx, (8,), torch.from_numpy(w), torch.from_numpy(b), 1e-12).numpy(),
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(_apply("softmax", [x], {"axis": 1})[0], torch.softmax(tx, 1).numpy(), rtol=1e-6)
    for approx in ("none", "tanh"):
        np.testing.assert_allclose(_apply("gelu", [x], {"approximate": approx})[0],
                                   F.gelu(tx, approximate=approx).numpy(), rtol=1e-6)


def test_slice_with_negative_step_through_zero():
    x = np.arange(10, dtype=np.float32)
    (got,) = _apply("slice", [x], {"starts": [8], "ends": [-11], "axes": [0], "steps": [-3]})
    np.testing.assert_array_equal(got, x[8::-3])


def test_integer_division_truncates_toward_zero():
    a, b = np.array([7, -7, 7, -7], np.int64), np.array([2, 2, -2, -2], np.int64)
    np.testing.assert_array_equal(_apply("div", [a, b], {})[0], [3, -3, -3, 3])


def test_observer_sees_every_node_in_order():
    g = Graph()
    x = g.add_input("x", TensorType((3,), "f32"))
    a = g.add_node("relu", [x]).output
    b = g.add_node("neg", [a]).output
    g.set_outputs([b])
    seen = []
    run(g, [np.array([-1, 0, 2], np.float32)], observer=lambda n, outs: seen.append((n.op, outs[0].tolist())))
    assert seen == [("relu", [0, 0, 2]), ("neg", [0, 0, -2])]


def test_every_op_documents_itself_and_declares_its_attributes():
    for name, opdef in all_ops().items():
        assert opdef.doc, name
        assert get_op(name) is opdef
        assert opdef.arity[0] <= opdef.arity[1]


def test_networkx_view_is_a_dag_with_edges_for_every_use():
    import networkx as nx

    g = Graph()
    x = g.add_input("x", TensorType((2,), "f32"))
    a = g.add_node("relu", [x]).output
    b = g.add_node("add", [a, a]).output
    g.set_outputs([b])
    view = g.to_networkx()
    assert nx.is_directed_acyclic_graph(view)
    assert view.number_of_edges() == 4  # in->relu, relu->add twice, add->out
    assert [view.nodes[n]["label"] for n in nx.topological_sort(view)] == ["x", "relu", "add", b.name]


def test_ir_package_imports_no_passes_or_targets():
    root = pathlib.Path(__file__).parents[1] / "qcompiler" / "ir"
    for path in root.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
                assert not any("passes" in n or "targets" in n for n in names), f"{path}: {ast.dump(node)}"
