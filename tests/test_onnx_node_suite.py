"""The ONNX backend node test suite through the importer and the interpreter, from two sources:
the onnx wheel's generators (1,884 cases) and Debian's libonnx-testdata (932 stored cases, which
``make test`` unpacks where apt is available). No case may crash or give a wrong result, and no
case that passed may regress: tests/onnx_node_expected*.json list each as pass or unsupported,
and the unsupported ones must refuse in one line."""
from __future__ import annotations

import json

import pytest

from tests.onnx_node_cases import DEBIAN_NODE_DATA, EXPECTED, OUTCOMES, SUITES, outcome

CASES = {suite: collect() for suite, collect in SUITES.items()}
EXPECTED_OUTCOMES = {suite: json.loads(path.read_text()) for suite, path in EXPECTED.items()}
ALL = [pytest.param(suite, tc, id=f"{suite}-{tc.name}") for suite, found in CASES.items() for tc in found]


@pytest.mark.parametrize("suite", list(SUITES))
def test_the_expected_file_covers_the_suite(suite):
    if not CASES[suite]:
        pytest.skip(f"Debian's libonnx-testdata is not unpacked at {DEBIAN_NODE_DATA} (make test fetches it "
                    f"with apt-get download; this machine has no apt or no network to the Debian mirror)")
    expected = EXPECTED_OUTCOMES[suite]
    assert set(expected) == {tc.name for tc in CASES[suite]}
    count = {kind: sum(1 for v in expected.values() if v == kind) for kind in OUTCOMES}
    print(f"\nONNX node suite ({suite}): {count['pass']} of {len(expected)} pass, {count['pass-with-values']} more "
          f"given the values of their shape inputs; the rest are refused in one line")
    assert set(expected.values()) <= set(OUTCOMES)


@pytest.mark.parametrize("suite, tc", ALL)
def test_node_case(suite, tc):
    got, detail = outcome(tc)
    assert got in OUTCOMES, f"{tc.name}: {got}: {detail}"
    expected = EXPECTED_OUTCOMES[suite].get(tc.name)
    if expected != "unsupported":  # a pass may become a pass without values, never worse
        assert OUTCOMES.index(got) <= OUTCOMES.index(expected), f"{tc.name} was {expected} and is now {got}: {detail}"


# ONNX ops whose conversion builds new IR (composites, new ops): each one's first passing case in
# the wheel's suite (given the values of shape inputs where it needs them), and the named cases,
# also go through TVM and through ONNX export, against the stored outputs
THROUGH_TARGETS = ("Acos", "Acosh", "Adagrad", "Adam", "Asin", "Asinh", "Atan", "Atanh", "Attention", "BitShift",
                   "BitwiseAnd", "BitwiseNot", "BitwiseOr", "BitwiseXor", "Celu", "CenterCropPad", "Clip", "Col2Im",
                   "Compress", "Cosh", "CumProd", "DFT", "DepthToSpace", "Det", "DynamicQuantizeLinear", "EyeLike",
                   "GridSample", "GroupNormalization", "Hardmax", "InstanceNormalization", "Loop", "LpNormalization",
                   "LpPool", "MaxUnpool", "MeanVarianceNormalization", "Mish", "Mod", "Momentum",
                   "NegativeLogLikelihoodLoss", "OneHot", "ReverseSequence", "RoiAlign", "RotaryEmbedding", "Round",
                   "STFT", "Scan", "Scatter", "ScatterElements", "ScatterND", "Shrink", "Sinh",
                   "SoftmaxCrossEntropyLoss", "Softsign", "SpaceToDepth", "Tan", "TfIdfVectorizer",
                   "ThresholdedRelu", "Trilu", "Xor")
NAMED_CASES = ("test_resize_downsample_scales_cubic", "test_resize_downsample_scales_linear",
               "test_resize_downsample_sizes_nearest_tf_half_pixel_for_nn",
               "test_resize_upsample_scales_cubic_align_corners",
               "test_attention_23_boolmask_fullymasked_row_nan_robustness_expanded",  # TVM gave NaN
               "test_batchnorm_example_training_mode", "test_convtranspose_3d", "test_convtranspose_output_shape",
               "test_dft_irfft", "test_gathernd_example_int32_batch_dim1", "test_lstm_with_peepholes",
               "test_maxpool_with_argmax_2d_precomputed_strides", "test_resize_tf_crop_and_resize_axes_3_2",
               "test_roialign_mode_max")


def _through_targets() -> list:
    chosen = {}
    for tc in CASES["wheel"]:
        if EXPECTED_OUTCOMES["wheel"].get(tc.name) == "unsupported" or tc.name.endswith("_zero"):
            continue
        for op in sorted({n.op_type for n in tc.model.graph.node} & set(THROUGH_TARGETS) - set(chosen)):
            chosen[op] = tc
        if tc.name in NAMED_CASES:
            chosen[tc.name] = tc
    return [pytest.param(tc, id=f"{key}-{tc.name}" if key != tc.name else key) for key, tc in sorted(chosen.items())]


@pytest.mark.parametrize("tc", _through_targets())
def test_node_case_through_tvm_and_onnx_export(tc):
    from onnx.reference import ReferenceEvaluator

    from qcompiler.targets.onnx import export
    from tests.onnx_node_cases import close, first_data_set_graph
    from tests.test_tvm import run_llvm

    graph, inputs, outputs = first_data_set_graph(tc)
    exported = ReferenceEvaluator(export.to_onnx(graph)).run(None, dict(zip([v.name for v in graph.inputs], inputs)))
    for target, got in (("tvm", run_llvm(graph, inputs)), ("onnx export", exported)):
        assert len(got) == len(outputs) and all(close(g, w) for g, w in zip(got, outputs)), f"{tc.name} via {target}"
