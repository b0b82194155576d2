"""Passes in the IR's own text: input IR, pipeline, expected IR (as LLVM's lit tests), plus a
numeric check that the interpreter gives the same outputs before and after."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from qcompiler import from_torch, parse_graph, print_graph
from qcompiler.examples import zoo
from qcompiler.pass_manager import Instruments, PassFailure, run_pipeline
from qcompiler.pipeline import Pass, PassContext, PipelineError, parse_pipeline, print_pipeline, register
from tests.conftest import rel_err

rng = np.random.default_rng(0)


def _random_inputs(graph):
    return [rng.standard_normal(v.shape).astype(v.type.np_dtype) for v in graph.inputs]


def check_pass(text: str, pipeline: str, expected: str, constants=None) -> None:
    """Run ``pipeline`` on ``text``; the result must print as ``expected`` and compute the same."""
    graph = parse_graph(text, constants)
    inputs = _random_inputs(graph)
    before = graph(*inputs)
    run_pipeline(graph, pipeline, Instruments(verify_each=True))
    assert print_graph(graph) == expected
    for got, want in zip(graph(*inputs), before):
        assert rel_err(got, want) < 1e-5


def test_pipeline_strings_round_trip():
    text = "fold-constants{max_elements=64},eliminate-dead-code,fold-batchnorm"
    assert print_pipeline(parse_pipeline(text)) == text
    assert print_pipeline(parse_pipeline("fold-constants{max_elements=4194304}")) == "fold-constants"
    with pytest.raises(PipelineError, match="unknown pass 'fold-everything'"):
        parse_pipeline("fold-everything")
    with pytest.raises(PipelineError, match="has no option 'size'"):
        parse_pipeline("fold-constants{size=3}")
    with pytest.raises(PipelineError, match="bad value 'lots' for option 'max_elements'"):
        parse_pipeline("fold-constants{max_elements=lots}")


DEAD = """\
func @main(%x: f32[4]) -> f32[4] {
  const @c : f32[4] = [1.0, 2.0, 3.0, 4.0]
  const @unused : f32[] = [7.0]
  %0 = relu(%x) : f32[4] loc(#0)
  %1 = mul(%x, @c) : f32[4] loc(#1)
  %2 = neg(%1) : f32[4] loc(#2)
  return %0
}
"""


def test_dead_code_removes_unused_chains_and_constants():
    check_pass(DEAD, "eliminate-dead-code", """\
func @main(%x: f32[4]) -> f32[4] {
  %0 = relu(%x) : f32[4] loc(#0)
  return %0
}
""")


FOLD = """\
func @main(%x: f32[2,3]) -> f32[2,2] {
  const @w : f32[3,2] = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
  %0 = transpose(@w) {perm=[1,0]} : f32[2,3] loc(#0 "fc")
  %1 = linear(%x, %0) : f32[2,2] loc(#1 "fc")
  return %1
}
"""


def test_fold_constants_evaluates_weight_transposes():
    check_pass(FOLD, "fold-constants", """\
func @main(%x: f32[2,3]) -> f32[2,2] {
  const @fc.folded : f32[2,3] = [1.0, 3.0, 5.0, 2.0, 4.0, 6.0]
  %1 = linear(%x, @fc.folded) : f32[2,2] loc(#1 "fc")
  return %1
}
""")


def test_fold_constants_respects_the_size_limit():
    check_pass(FOLD, "fold-constants{max_elements=4}", FOLD)


BN = """\
func @main(%x: f32[1,2,3,3]) -> f32[1,2,3,3] {
  const @w : f32[2,2,1,1] = [1.0, 2.0, -1.0, 0.5]
  const @g : f32[2] = [2.0, 0.5]
  const @b : f32[2] = [0.125, -0.25]
  const @m : f32[2] = [0.25, -0.5]
  const @v : f32[2] = [4.0, 0.25]
  %0 = conv2d(%x, @w) : f32[1,2,3,3] loc(#0 "conv")
  %1 = batch_norm(%0, @g, @b, @m, @v) {epsilon=0.0} : f32[1,2,3,3] loc(#1 "bn")
  return %1
}
"""


def test_fold_batchnorm_into_conv_without_bias():
    # s = g / sqrt(v) = [1, 1]; w' = w * s; b' = (0 - m) * s + b = [-0.125, 0.25]
    check_pass(BN, "fold-batchnorm", """\
func @main(%x: f32[1,2,3,3]) -> f32[1,2,3,3] {
  const @w.bn_folded : f32[2,2,1,1] = [1.0, 2.0, -1.0, 0.5]
  const @g.bias_folded : f32[2] = [-0.125, 0.25]
  %0 = conv2d(%x, @w.bn_folded, @g.bias_folded) : f32[1,2,3,3] loc(#0 "conv")
  return %0
}
""")


def test_fold_batchnorm_refuses_when_conv_output_has_another_use():
    text = BN.replace("-> f32[1,2,3,3] {", "-> (f32[1,2,3,3], f32[1,2,3,3]) {").replace("return %1", "return %1, %0")
    check_pass(text, "fold-batchnorm", text)


FUSE = """\
func @main(%x: f32[2,3]) -> (f32[2,3], f32[2,3], f32[2,3]) {
  const @w : f32[3,3] = [1.0, -2.0, 3.0, -4.0, 5.0, -6.0, 7.0, -8.0, 9.0]
  %0 = linear(%x, @w) : f32[2,3] loc(#0 "fc1")
  %1 = clip(%0) {max=6.0, min=0.0} : f32[2,3] loc(#1 "relu6")
  %2 = matmul(%x, @w) : f32[2,3] loc(#2 "mm")
  %3 = gelu(%2) {approximate="tanh"} : f32[2,3] loc(#3 "gelu")
  %4 = linear(%x, @w) : f32[2,3] loc(#4 "fc2")
  %5 = relu(%4) : f32[2,3] loc(#5)
  %6 = add(%5, %4) : f32[2,3] loc(#6)
  return %1, %3, %6
}
"""


def test_fuse_activations_folds_activation_into_producer():
    check_pass(FUSE, "fuse-activations", """\
func @main(%x: f32[2,3]) -> (f32[2,3], f32[2,3], f32[2,3]) {
  const @w : f32[3,3] = [1.0, -2.0, 3.0, -4.0, 5.0, -6.0, 7.0, -8.0, 9.0]
  %0 = linear(%x, @w) {activation="clip", activation_args=[0.0,6.0]} : f32[2,3] loc(#0 "fc1")
  %2 = matmul(%x, @w) {activation="gelu_tanh"} : f32[2,3] loc(#2 "mm")
  %4 = linear(%x, @w) : f32[2,3] loc(#4 "fc2")
  %5 = relu(%4) : f32[2,3] loc(#5)
  %6 = add(%5, %4) : f32[2,3] loc(#6)
  return %0, %2, %6
}
""")


def test_fuse_activations_only_the_ops_asked_for():
    graph = parse_graph(FUSE)
    run_pipeline(graph, "fuse-activations{ops=gelu,relu}")
    assert [n.op for n in graph.nodes].count("clip") == 1
    assert graph.nodes[2].attrs["activation"] == "gelu_tanh"


CSE = """\
func @main(%x: f32[4]) -> f32[4] {
  const @a : f32[] = [2.0]
  const @b : f32[] = [2.0]
  %0 = mul(%x, @a) : f32[4] loc(#0)
  %1 = mul(%x, @b) : f32[4] loc(#1)
  %2 = softmax(%0) : f32[4] loc(#2)
  %3 = softmax(%1) : f32[4] loc(#3)
  %4 = softmax(%1) {axis=0} : f32[4] loc(#4)
  %5 = add(%2, %3) : f32[4] loc(#5)
  %6 = add(%5, %4) : f32[4] loc(#6)
  return %6
}
"""


def test_cse_merges_identical_constants_and_nodes():
    # softmax{axis=0} on a rank-1 tensor is the same computation but not the same attributes: kept
    check_pass(CSE, "eliminate-common-subexpressions", """\
func @main(%x: f32[4]) -> f32[4] {
  const @a : f32[] = [2.0]
  %0 = mul(%x, @a) : f32[4] loc(#0)
  %2 = softmax(%0) : f32[4] loc(#2)
  %4 = softmax(%0) {axis=0} : f32[4] loc(#4)
  %5 = add(%2, %2) : f32[4] loc(#5)
  %6 = add(%5, %4) : f32[4] loc(#6)
  return %6
}
""")


CANON = """\
func @main(%x: f32[2,3]) -> (f32[3,2], f32[2,4]) {
  const @one : f32[] = [1.0]
  const @zero : f32[3] = [0.0, 0.0, 0.0]
  const @w : f32[3,4] = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0, 11.0, 12.0]
  const @b : f32[4] = [0.5, -0.5, 1.5, -1.5]
  %0 = identity(%x) : f32[2,3] loc(#0)
  %1 = mul(%0, @one) : f32[2,3] loc(#1)
  %2 = add(@zero, %1) : f32[2,3] loc(#2)
  %3 = reshape(%2) {shape=[6]} : f32[6] loc(#3)
  %4 = reshape(%3) {shape=[2,3]} : f32[2,3] loc(#4)
  %5 = transpose(%4) {perm=[1,0]} : f32[3,2] loc(#5)
  %6 = transpose(%5) {perm=[1,0]} : f32[2,3] loc(#6)
  %7 = dropout(%6) : f32[2,3] loc(#7)
  %8 = matmul(%7, @w) : f32[2,4] loc(#8 "fc")
  %9 = add(%8, @b) : f32[2,4] loc(#9 "fc")
  %10 = cast(%5) {to="f32"} : f32[3,2] loc(#10)
  return %10, %9
}
"""


def test_canonicalize_rules():
    check_pass(CANON, "canonicalize", """\
func @main(%x: f32[2,3]) -> (f32[3,2], f32[2,4]) {
  const @b : f32[4] = [0.5, -0.5, 1.5, -1.5]
  const @w.T : f32[4,3] = [1.0, 5.0, 9.0, 2.0, 6.0, 10.0, 3.0, 7.0, 11.0, 4.0, 8.0, 12.0]
  %5 = transpose(%x) {perm=[1,0]} : f32[3,2] loc(#5)
  %9 = linear(%x, @w.T, @b) : f32[2,4] loc(#9 "fc")
  %10 = cast(%5) {to="f32"} : f32[3,2] loc(#10)
  return %10, %9
}
""")


def test_canonicalize_keeps_broadcasting_neutral_ops_and_square_transposes():
    text = """\
func @main(%x: f32[2], %y: f32[2,2]) -> (f32[3,2], f32[2,2]) {
  const @ones : f32[3,2] = [1.0, 1.0, 1.0, 1.0, 1.0, 1.0]
  %0 = mul(%x, @ones) : f32[3,2] loc(#0)
  %1 = transpose(%y) {perm=[1,0]} : f32[2,2] loc(#1)
  return %0, %1
}
"""
    check_pass(text, "canonicalize", text)


def _foldable(graph) -> list[str]:
    return [n.describe() for n in graph.nodes if n.inputs and all(v.is_constant for v in n.inputs)]


@pytest.mark.parametrize("which", ["resnet18", "mobilenet_v2", "minilm"])
def test_default_float_pipeline_on_real_models(which, minilm, image_batch):
    from qcompiler.passes import DEFAULT_FLOAT_PIPELINE

    if which == "minilm":
        encoder, ids, mask = minilm
        graph, inputs = from_torch(encoder, (ids, mask)), [ids.numpy(), mask.numpy()]
    else:
        graph, inputs = from_torch(getattr(zoo, which)(), (image_batch,)), [image_batch.numpy()]
    want = graph(*inputs)[0]
    inst = Instruments()
    run_pipeline(graph, DEFAULT_FLOAT_PIPELINE, inst)
    assert rel_err(graph(*inputs)[0], want) < 1e-5
    counts = graph.op_counts()
    assert "batch_norm" not in counts and not _foldable(graph)
    assert not parse_pipeline("eliminate-dead-code")[0].run(graph, PassContext())  # no dead node left
    fused = [n.attrs["activation"] for n in graph.nodes if n.op == "conv2d"]
    if which == "resnet18":  # the stem and each block's first conv; the 8 relus after residual adds stay
        assert fused.count("relu") == 9 and counts["relu"] == 8
    elif which == "mobilenet_v2":  # every relu6 follows a conv
        assert fused.count("clip") == 35 and "clip" not in counts
    else:
        assert "gelu" not in counts  # fused into the intermediate linear layers
    assert print_pipeline(parse_pipeline(DEFAULT_FLOAT_PIPELINE)) == DEFAULT_FLOAT_PIPELINE


def test_instruments_print_dump_and_bisect(tmp_path):
    lines: list[str] = []
    graph = parse_graph(DEAD)
    inst = Instruments(print_after_change=True, dump_dir=tmp_path / "dumps", bisect_limit=1, emit=lines.append)
    run_pipeline(graph, "eliminate-dead-code,fold-constants", inst)
    assert lines[0] == "bisect: running pass #1 (eliminate-dead-code)"
    assert lines[1].startswith("// ----- IR after eliminate-dead-code -----")
    assert lines[2] == "bisect: not running pass #2 (fold-constants)"
    assert sorted(p.name for p in (tmp_path / "dumps").iterdir()) == ["00_input.qir", "01_eliminate-dead-code.qir"]
    from qcompiler import load_graph

    assert print_graph(load_graph(tmp_path / "dumps" / "01_eliminate-dead-code.qir")) == print_graph(graph)


@register
class _BreaksGraph(Pass):
    name = "test-break-graph"
    summary = "test only: leaves a dangling use"

    def run(self, graph, ctx):
        del graph.nodes[1]  # bypasses remove_node, which would refuse: its result is still read
        return True


def test_failing_pass_is_reported_with_a_reproducer(tmp_path):
    graph = parse_graph(DEAD)
    with pytest.raises(PassFailure) as info:
        run_pipeline(graph, "fold-constants,test-break-graph,eliminate-dead-code",
                     Instruments(reproducer_dir=tmp_path, emit=lambda s: None))
    text = str(info.value)
    assert text.startswith("pass test-break-graph failed after [fold-constants]: after pass test-break-graph: "
                           "invalid graph at neg (%2): uses %1 before (or without) its definition")
    assert "reproduce with: qcompiler opt" in text and "-p 'test-break-graph,eliminate-dead-code'" in text
    from qcompiler import load_graph

    assert print_graph(load_graph(tmp_path / "reproducer_test-break-graph.qir")) == DEAD  # the IR it received


# ---- activations written in pieces ------------------------------------------------------------------
DECOMPOSED = {
    "hardswish": lambda x: x * torch.clamp(x + 3, 0, 6) / 6,  # Paddle's hard-swish
    "hardsigmoid": lambda x: torch.clamp(x + 3, 0, 6) / 6,
    "hardswish_via_hardsigmoid": lambda x: x * (torch.nn.functional.relu6(x + 3) * (1 / 6)),
    "silu": lambda x: x * torch.sigmoid(x),
    "gelu": lambda x: 0.5 * x * (1 + torch.erf(x / 1.4142135623730951)),
    "gelu_regrouped": lambda x: x * (0.5 * (torch.erf(x * 0.7071067811865476) + 1)),
    # tanh-GELU as HF's NewGELU (GPT-2, ALBERT) and torch's opset-17 export write it, cubed by
    # multiplication, and as HF's FastGELU
    "gelu_tanh": lambda x: 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0)))),
    "gelu_tanh_cubed": lambda x: x * 0.5 * (1 + torch.tanh(0.7978845608 * (x + 0.044715 * (x * x * x)))),
    "gelu_tanh_fast": lambda x: 0.5 * x * (1.0 + torch.tanh(x * 0.7978845608 * (1.0 + 0.044715 * x * x))),
}
FUSED_AS = {"gelu_tanh": "gelu_tanh", "gelu_tanh_cubed": "gelu_tanh", "gelu_tanh_fast": "gelu_tanh"}


@pytest.mark.parametrize("name", list(DECOMPOSED))
def test_activations_written_in_pieces_become_their_op_and_fuse(name, tmp_path):
    """canonicalize recognises them (from torch and from ONNX), fuse-activations then folds them
    into the convolution; the result matches the original to float rounding."""
    from tests.conftest import export_onnx

    from qcompiler import from_onnx
    from qcompiler.passes import DEFAULT_FLOAT_PIPELINE

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)

        def forward(self, x):
            return DECOMPOSED[name](self.conv(x))

    torch.manual_seed(0)
    model, x = Block().eval(), torch.randn(1, 3, 6, 6) * 4
    with torch.no_grad():
        want = model(x).numpy()
    fused = FUSED_AS.get(name, name.split("_")[0])
    for graph in (from_torch(model, (x,)), from_onnx(export_onnx(model, (x,), tmp_path / "b.onnx", ["x"]))):
        run_pipeline(graph, DEFAULT_FLOAT_PIPELINE)
        assert [n.op for n in graph.nodes] == ["conv2d"], str(graph)
        assert graph.nodes[0].attrs["activation"] == fused
        np.testing.assert_allclose(graph(x.numpy())[0], want, rtol=1e-5, atol=1e-5)


def test_a_tanh_gelu_lookalike_is_left_alone_and_its_quantize_chain_builds(tmp_path):
    """0.5 * x * (1 + tanh(0.8 * (x + 0.044715 x^3))) is not tanh-GELU (0.8, not sqrt(2/pi)):
    it stays in pieces, and quantized, its chain of quantizes fuses into one kernel that builds
    for llvm (rounding that read its operand seven times grew such a chain 7^3-fold, past what
    TVM's simplifier finishes: GPT-2 and ALBERT never compiled) and matches the interpreter."""
    import qcompiler

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.linear, self.out = torch.nn.Linear(16, 32), torch.nn.Linear(32, 8)

        def forward(self, x):  # quantized three times between the linears: after pow, tanh and the product
            y = self.linear(x)
            return self.out(0.5 * y * (1.0 + torch.tanh(0.8 * (y + 0.044715 * torch.pow(y, 3.0)))))

    torch.manual_seed(0)
    model = Block().eval()
    data = [np.random.default_rng(i).standard_normal((2, 8, 16)).astype(np.float32) for i in range(4)]
    example = (torch.from_numpy(data[0]),)
    config = qcompiler.QuantConfig(min_layer_sqnr_db=None)
    built = qcompiler.compile(model, example, calibration=data[1:], config=config)
    assert "gelu" not in str(built.graph) and "tanh(" in str(built.graph)
    reference = qcompiler.compile(model, example, calibration=data[1:], config=config, target="reference")
    np.testing.assert_array_equal(built(data[0]), reference(data[0]))


def test_lookalikes_are_left_alone():
    """x * clip(x + 3, 0, 6) / 5 is not hard-swish; y * sigmoid(x) is not SiLU."""
    text = """
func @main(%x: f32[4], %y: f32[4]) -> (f32[4], f32[4]) {
  const @three : f32[] = [3.0]
  const @five : f32[] = [5.0]
  %0 = add(%x, @three) : f32[4]
  %1 = clip(%0) {min=0.0, max=6.0} : f32[4]
  %2 = mul(%x, %1) : f32[4]
  %3 = div(%2, @five) : f32[4]
  %4 = sigmoid(%x) : f32[4]
  %5 = mul(%y, %4) : f32[4]
  return %3, %5
}
"""
    graph = parse_graph(text)
    before = str(graph)
    assert not run_pipeline(graph, "canonicalize") or str(graph) == before
    assert "hardswish" not in str(graph) and "silu" not in str(graph)


def test_rules_are_offered_only_the_ops_they_declare():
    from qcompiler.pipeline import apply_rules, matches

    seen = []

    @matches("relu")
    def watch(graph, node):
        seen.append(node.op)
        return False

    graph = parse_graph(DEAD)
    apply_rules(graph, [watch])
    assert seen == [n.op for n in graph.nodes if n.op == "relu"] and seen


def test_each_rules_declared_ops_cover_every_node_it_rewrites(digits):
    """A rule offered a node outside its @matches ops must not fire there: the index skips
    nothing a rule would have rewritten (checked on float, QDQ and integer graphs)."""
    import qcompiler
    from qcompiler.passes import activation_patterns, canonicalize, fold_batchnorm, lower_integer

    model, (x_train, _, x_test, _) = digits
    result = qcompiler.quantize(qcompiler.from_torch(model, (torch.from_numpy(x_test[:8]),)), [x_train[:8]])
    graphs = [qcompiler.from_torch(model, (torch.from_numpy(x_test[:8]),)), result.float_graph, result.qdq_graph,
              result.graph, qcompiler.from_torch(zoo.mobilenet_v2().eval(), (torch.randn(1, 3, 32, 32),))]
    rules = canonicalize.RULES + activation_patterns.RULES + lower_integer.RULES + [
        fold_batchnorm.fold_bn_into_producer, fold_batchnorm.fold_channel_affine_into_producer]
    checked = 0
    for rule in rules:
        assert rule.ops, rule.__name__
        for graph in graphs:
            for node in list(graph.nodes):
                if node.op not in rule.ops:  # a rule that fired here would fail the test anyway: no copy
                    assert not rule(graph, node), (rule.__name__, node.describe())
                    checked += 1
    assert checked > 1000


def test_fold_batchnorm_folds_per_channel_scales_and_shifts():
    """Caffe's BatchNorm + Scale (ONNX BatchNormalization, Mul, Add by [C,1,1] constants), after
    a conv and after a concat: the conv absorbs its Mul/Add (and its batch norm), the batch norm
    after the concat absorbs its own; a scale that varies along another axis is left alone."""
    rng = np.random.default_rng(0)
    text = """\
func @main(%x: f32[1,2,5,5]) -> f32[1,4,3,5] {
  const @w : f32[2,2,3,3] = [WEIGHTS]
  const @k : f32[2,1,1] = [1.5, -0.5]
  const @c : f32[2,1,1] = [0.25, 2.0]
  const @g : f32[4] = [1.0, 2.0, 0.5, 1.0]
  const @b : f32[4] = [0.0, 0.1, 0.2, 0.3]
  const @m : f32[4] = [0.1, 0.0, -0.1, 0.2]
  const @v : f32[4] = [1.0, 0.5, 2.0, 1.5]
  const @k4 : f32[4,1,1] = [2.0, 1.0, 0.5, 3.0]
  const @c4 : f32[4,1,1] = [1.0, -1.0, 0.0, 0.5]
  const @rows : f32[3,1] = [1.0, 2.0, 3.0]
  %0 = conv2d(%x, @w) : f32[1,2,3,3]
  %1 = mul(%0, @k) : f32[1,2,3,3]
  %2 = add(@c, %1) : f32[1,2,3,3]
  %3 = pad(%x) {pads=[0,0,-1,-1,0,0,-1,-1]} : f32[1,2,3,3]
  %4 = concat(%2, %3) {axis=1} : f32[1,4,3,3]
  %5 = batch_norm(%4, @g, @b, @m, @v) : f32[1,4,3,3]
  %6 = mul(%5, @k4) : f32[1,4,3,3]
  %7 = add(%6, @c4) : f32[1,4,3,3]
  %8 = pad(%7) {pads=[0,0,0,1,0,0,0,1]} : f32[1,4,3,5]
  %9 = mul(%8, @rows) : f32[1,4,3,5]
  return %9
}
""".replace("WEIGHTS", ", ".join(f"{v:.3f}" for v in rng.standard_normal(36)))
    graph = parse_graph(text)
    x = rng.standard_normal((1, 2, 5, 5)).astype(np.float32)
    want = graph(x)[0]
    run_pipeline(graph, "fold-batchnorm")
    assert graph.op_counts() == {"pad": 2, "batch_norm": 1, "conv2d": 1, "concat": 1, "mul": 1}, graph.op_counts()
    np.testing.assert_allclose(graph(x)[0], want, rtol=1e-5, atol=1e-5)


HALF = """\
func @main(%x: f16[2,3], %k: f16[2,3]) -> (f16[2,3], f32[2,3], f16[2,3]) {
  const @w : f16[3,3] = [1.0, 0.5, -0.25, 2.0, 0.0, 1.5, -1.0, 0.125, 3.0]
  const @b : f16[3] = [0.5, -0.5, 0.25]
  %0 = linear(%x, @w, @b) : f16[2,3] loc(#0 "fc")
  %1 = relu(%0) : f16[2,3] loc(#1)
  %2 = cast(%1) {to="f32"} : f32[2,3] loc(#2)
  %3 = add(%1, %k) : f16[2,3] loc(#3)
  %4 = cast(%3) {to="f16"} : f16[2,3] loc(#4)
  return %1, %2, %4
}
"""


def test_widen_float16_computes_in_float32_behind_the_float16_interface():
    """Constants and inputs widen exactly; a cast to f16 inside becomes one to f32; outputs that
    were f16 are cast back (the value the float32 one was renamed from keeps the output's name)."""
    graph = parse_graph(HALF)
    inputs = [rng.standard_normal(v.shape).astype(np.float16) for v in graph.inputs]
    before = graph(*inputs)
    run_pipeline(graph, "widen-float16", Instruments(verify_each=True))
    assert print_graph(graph) == """\
func @main(%x: f16[2,3], %k: f16[2,3]) -> (f16[2,3], f32[2,3], f16[2,3]) {
  const @w.f32 : f32[3,3] = [1.0, 0.5, -0.25, 2.0, 0.0, 1.5, -1.0, 0.125, 3.0]
  const @b.f32 : f32[3] = [0.5, -0.5, 0.25]
  %x.f32 = cast(%x) {to="f32"} : f32[2,3] loc(#5)
  %k.f32 = cast(%k) {to="f32"} : f32[2,3] loc(#6)
  %0 = linear(%x.f32, @w.f32, @b.f32) : f32[2,3] loc(#0 "fc")
  %1_0 = relu(%0) : f32[2,3] loc(#1)
  %2 = cast(%1_0) {to="f32"} : f32[2,3] loc(#2)
  %3 = add(%1_0, %k.f32) : f32[2,3] loc(#3)
  %4_1 = cast(%3) {to="f32"} : f32[2,3] loc(#4)
  %1 = cast(%1_0) {to="f16"} : f16[2,3] loc(#7)
  %4 = cast(%4_1) {to="f16"} : f16[2,3] loc(#8)
  return %1, %2, %4
}
"""
    after = graph(*inputs)
    for got, want in zip(after, before):
        assert got.dtype == want.dtype
        # float16's rounding of each intermediate is gone: a few half-precision steps at most
        np.testing.assert_allclose(got.astype(np.float32), want.astype(np.float32), rtol=4e-3, atol=4e-3)
    widened = [n.output.dtype for n in graph.nodes[:7]]  # all but the two casts back
    assert widened == ["f32"] * 7


def test_widen_float16_leaves_float32_graphs_and_float16_bitcasts_alone():
    check_pass(BN, "widen-float16", print_graph(parse_graph(BN)))
    text = """\
func @main(%x: f16[4]) -> i16[4] {
  %0 = bitcast(%x) {to="i16"} : i16[4] loc(#0)
  return %0
}
"""
    graph = parse_graph(text)
    ctx = PassContext()
    run_pipeline(graph, "widen-float16", Instruments(), ctx)
    assert print_graph(graph) == text
    assert "reinterprets float16 bits" in ctx.report["widen_float16"]["refused"]


@pytest.mark.parametrize("rank, kwargs", [
    (2, dict(kernel_size=2, stride=2)), (2, dict(kernel_size=3, stride=2, padding=1, output_padding=1)),
    (2, dict(kernel_size=3, stride=(2, 3), padding=(0, 2), dilation=(1, 2), output_padding=(1, 0))),
    (2, dict(kernel_size=4, stride=2, padding=1, groups=4)), (2, dict(kernel_size=5, stride=1, padding=3)),
    (1, dict(kernel_size=4, stride=3, padding=1)), (3, dict(kernel_size=2, stride=2, padding=0))])
def test_conv_transpose_as_conv_computes_the_same(rank, kwargs):
    """Every stride, padding (cropping included), output padding, dilation and grouping gives
    the interpreter's conv_transpose result, and no transposed convolution is left."""
    torch.manual_seed(0)
    layer = getattr(torch.nn, f"ConvTranspose{rank}d")(4, 8, bias=True, **kwargs).eval()
    x = torch.randn(1, 4, *[5, 6, 4][:rank])
    graph = from_torch(layer, (x,))
    before = graph(x.numpy())[0]
    run_pipeline(graph, "conv-transpose-as-conv", Instruments(verify_each=True))
    assert not any(n.op.startswith("conv_transpose") for n in graph.nodes)
    assert rel_err(graph(x.numpy())[0], before) < 1e-5
