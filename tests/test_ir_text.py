"""The textual IR: exact round trips, readable errors, files with weights beside them."""
from __future__ import annotations

import numpy as np
import pytest

from qcompiler import ParseError, VerificationError, load_graph, parse_graph, print_graph, save
from qcompiler.ir import Graph, TensorType

SMALL = """\
func @main(%x: f32[1,2,4,4], %"odd/name": f32[1,2,4,4]) -> (f32[1,2,2,2], bool[1,2,4,4]) {
  const @w : f32[2,2,1,1] = [1.0, -0.5, 0.25, 2.0]
  const @lo : f32[] = [-inf]
  %0 = conv2d(%x, @w) : f32[1,2,4,4] loc(#0 "block.conv")
  %1 = add(%0, %"odd/name") : f32[1,2,4,4] loc(#1)
  %2 = max_pool2d(%1) {ceil_mode=true, kernel=[3,3], strides=[2,2]} : f32[1,2,2,2] loc(#2 "pool")
  %3 = greater(%1, @lo) : bool[1,2,4,4] loc(#7)
  return %2, %3
}
"""


def test_small_graph_round_trips_exactly():
    g = parse_graph(SMALL)
    assert print_graph(g) == SMALL
    assert g.nodes[0].meta == {"handle": 0, "source": "block.conv"}
    assert g.nodes[2].attrs["ceil_mode"] is True and g.nodes[2].attrs["pads"] == (0, 0, 0, 0)


def test_parsed_graph_computes_what_the_text_says():
    g = parse_graph(SMALL)
    x = np.random.default_rng(0).standard_normal((1, 2, 4, 4)).astype(np.float32)
    y = np.ones_like(x)
    pooled, flags = g(x, y)
    w = np.array([[1.0, -0.5], [0.25, 2.0]], np.float32)
    summed = np.einsum("oc,nchw->nohw", w, x) + y
    expected = np.stack([summed[..., i:i + 3, j:j + 3].max(axis=(-1, -2)) for i in (0, 2) for j in (0, 2)], -1)
    np.testing.assert_allclose(pooled, expected.reshape(1, 2, 2, 2), rtol=1e-6)
    assert flags.all()


def test_new_nodes_get_fresh_handles_after_parse():
    g = parse_graph(SMALL)
    node = g.add_node("relu", [g.nodes[0].output])
    assert node.handle == 8


def test_big_constants_are_elided_and_saved_beside(tmp_path):
    g = Graph()
    x = g.add_input("x", TensorType((2, 64), "f32"))
    w = g.add_constant("layer/weight", np.arange(64 * 3, dtype=np.float32).reshape(3, 64))
    g.set_outputs([g.add_node("linear", [x, w]).output])
    text = print_graph(g)
    assert 'const @"layer/weight" : f32[3,64]\n' in text
    path = save(g, tmp_path / "m.qir")
    assert (tmp_path / "m.npz").exists()
    back = load_graph(path)
    assert print_graph(back) == text
    np.testing.assert_array_equal(back.constants["layer/weight"], g.constants["layer/weight"])


def test_copy_is_independent():
    g = parse_graph(SMALL)
    c = g.copy()
    c.nodes.pop()  # an edit to the copy (remove_node would refuse: its result is the output)
    assert len(g.nodes) == 4 and print_graph(g) == SMALL


def test_a_copy_is_the_same_graph_built_directly_and_shares_only_constant_arrays():
    """``Graph.copy`` builds the twin without the text form (the searches copy per trial): it
    prints the same, computes the same, keeps ranges, meta and use lists, and nothing but the
    constant arrays is shared, so edits to one never reach the other."""
    g = parse_graph(SMALL)
    g.nodes[0].output.range = (-1.5, 2.0)
    g.nodes[1].meta["note"] = "kept"
    before = print_graph(g)
    c = g.copy()
    assert print_graph(c) == before
    assert c.constants["w"] is g.constants["w"] and c.nodes[1].meta == g.nodes[1].meta
    assert c.users_of(c.nodes[0].output) == [c.nodes[1]]
    x, y = (np.random.default_rng(1).standard_normal((1, 2, 4, 4)).astype(np.float32) for _ in range(2))
    for got, want in zip(c(x, y), g(x, y)):
        np.testing.assert_array_equal(got, want)
    c.nodes[1].inputs[1] = c.inputs[0]
    c.nodes[2].attrs["kernel"] = (2, 2)
    c.nodes[0].output.range = None
    c.nodes[1].meta["note"] = "changed"
    assert print_graph(g) == before and g.nodes[0].output.range == (-1.5, 2.0)
    assert g.nodes[1].inputs[1].name == "odd/name" and g.nodes[2].attrs["kernel"] == (3, 3)
    assert g.nodes[1].meta["note"] == "kept" and g.users_of(g.inputs[0]) == [g.nodes[0]]
    assert c.add_node("relu", [c.nodes[0].output]).handle == g.add_node("relu", [g.nodes[0].output]).handle == 8


def test_a_copy_reads_a_replaced_constant_by_its_name_as_the_text_form_does():
    g = parse_graph(SMALL)
    g.add_constant("w", np.full((2, 2, 1, 1), 3.0, np.float32), unique=False)  # the conv keeps the old value object
    c = g.copy()
    assert c.nodes[0].inputs[1] is c.constant_value("w")
    x, y = (np.ones((1, 2, 4, 4), np.float32) for _ in range(2))
    np.testing.assert_array_equal(c(x, y)[0], parse_graph(print_graph(g), g.constants)(x, y)[0])


@pytest.mark.parametrize("text, message", [
    (SMALL.replace("%0 = conv2d", "%0 = conv9d"), "<string>:4:8: unknown op 'conv9d'"),
    (SMALL.replace("add(%0,", "add(%9,"), "<string>:5:12: use of undefined value %9"),
    (SMALL.replace("%\"odd/name\") : f32[1,2,4,4]", "%\"odd/name\") : f32[1,2,4,5]"),
     "add (%1): recorded result types f32[1,2,4,5] but the op infers f32[1,2,4,4]"),
    (SMALL.replace("= [1.0, -0.5, 0.25, 2.0]", "= [1.0]"), "constant @w has 1 values for type f32[2,2,1,1]"),
    (SMALL.replace("kernel=[3,3]", "kernel=[3,3], bogus=1"), "unknown attribute(s) ['bogus']"),
    (SMALL.replace("return %2, %3", "return %2"), "return types f32[1,2,2,2] differ from the signature"),
    (SMALL.replace("%1 = add", "%0 = add"), "value %0 is defined twice"),
    (SMALL + "junk", "expected end of file"),
    ("func @main(%x: f32[2]) -> f32[2] {\n  const @w : f32[100]\n  return %x\n}\n", "constant @w has no data"),
])
def test_parse_errors_point_at_the_problem(text, message):
    with pytest.raises((ParseError, VerificationError)) as info:
        parse_graph(text)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_verifier_catches_dangling_use_after_bad_edit():
    g = parse_graph(SMALL)
    with pytest.raises(ValueError, match=r"remove_node: .* is still read by .*; replace its uses first"):
        g.remove_node(g.nodes[0])  # %1 still reads %0: refused where the edit is made
    del g.nodes[0]  # an edit that bypasses remove_node is still caught by the verifier
    with pytest.raises(VerificationError, match=r"uses %0 before \(or without\) its definition"):
        from qcompiler import verify_graph
        verify_graph(g)


def test_verifier_rejects_bad_quant_scale():
    text = """\
func @main(%x: f32[4]) -> u8[4] {
  const @s : f32[] = [0.0]
  const @z : u8[] = [128]
  %0 = quantize(%x, @s, @z) {axis=0} : u8[4] loc(#0)
  return %0
}
"""
    with pytest.raises(VerificationError, match="scale @s must be finite and positive"):
        parse_graph(text)


def test_load_graph_missing_file_is_one_line(tmp_path):
    from qcompiler import QCompilerError

    with pytest.raises(QCompilerError, match="cannot read IR file"):
        load_graph(tmp_path / "nope.qir")


def test_use_lists_are_kept_as_nodes_are_edited():
    """users_of(v) is kept by the graph as edits happen (item assignment, append, reassignment,
    removal), and agrees with a full scan after a whole quantization pipeline."""
    import collections

    import torch

    import qcompiler

    g = parse_graph(SMALL)
    first, second = g.nodes[0], g.nodes[1]
    x = g.inputs[0]
    assert first in g.users_of(x)
    second.inputs[0] = x  # item assignment
    assert second in g.users_of(x) and second not in g.users_of(first.output)
    second.inputs.append(x)
    assert g.users_of(x).count(second) == 2
    second.inputs = second.inputs[:1]  # reassignment
    assert g.users_of(x).count(second) == 1

    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4)).eval()
    batches = [np.random.default_rng(i).standard_normal((4, 8)).astype(np.float32) for i in range(3)]
    graph = qcompiler.quantize(qcompiler.from_torch(mlp, (torch.randn(4, 8),)), batches).graph
    scanned = graph.users()
    values = [v for n in graph.nodes for v in n.inputs + n.outputs] + graph.inputs
    for v in values:
        assert collections.Counter(map(id, graph.users_of(v))) == collections.Counter(map(id, scanned.get(v, [])))
