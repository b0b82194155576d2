"""The AMX kernels (``targets/tvm/x86_amx``) against the reference interpreter, bit-exact, on
every shape case that changes their addressing: K not a whole tile (channel blocks and rows
padded), M and N not multiples of the 32-wide blocks (the last block overlapping), strides
(phase planes), batch > 1, signed activations, requantize absorbed or not; which layers the
lowering gives them and which stay on VNNI; and what a process without AMX does with a module
that uses it."""
from __future__ import annotations

import numpy as np
import pytest
from int8_cases import assert_bit_exact, conv_graph, linear_graph

from qcompiler.ir import Graph
from qcompiler.targets.tvm import make_target, to_relax
from qcompiler.targets.tvm.build import int8_kernels, missing_cpu_features
from qcompiler.targets.tvm.x86_amx import (addressable, amx_usable, k_chunks, pack_dense_weight, supports_amx,
                                           without_amx)

LLVM = make_target("llvm")
needs_amx = pytest.mark.skipif(not amx_usable(), reason="this CPU (or OS) has no AMX: the VNNI kernels run instead")


def _kernels(graph: Graph) -> set[str]:
    """The hand-scheduled kernels the lowering calls."""
    names = {gv.name_hint.rstrip("0123456789") for gv in to_relax(graph, int8_kernels="amx", cores=2).functions}
    return {n for n in names if n.startswith(("amx_", "vnni_"))}


def _bit_exact(graph: Graph, inputs) -> None:
    assert_bit_exact(graph, inputs, LLVM)


CONVS = [  # x shape, out channels, kernel, strides, pads, x dtype, requantize absorbed
    ((1, 16, 9, 9), 40, (3, 3), (1, 1), (1, 1, 1, 1), "i8", True),  # K 16 bytes; M 40, N 99: overlapping blocks
    ((2, 64, 14, 14), 64, (3, 3), (2, 2), (1, 1, 1, 1), "u8", True),  # batch 2, 2 x 2 phase planes
    ((1, 32, 8, 8), 48, (1, 1), (1, 1), (0, 0, 0, 0), "u8", False),  # int32 result, no columns to drop
    ((1, 144, 14, 14), 40, (1, 1), (1, 1), (0, 0, 0, 0), "u8", True),  # 36 channel blocks: 3 steps of 12
    ((1, 18, 12, 12), 32, (3, 3), (1, 1), (0, 1, 1, 0), "u8", True),  # channels not a multiple of 4, asymmetric pads
    ((1, 68, 10, 10), 36, (5, 5), (1, 1), (2, 2, 2, 2), "i8", True),  # 17 blocks: 2 steps of 9, one block padded
    ((2, 96, 10, 10), 24, (1, 1), (1, 1), (0, 0, 0, 0), "u8", True),  # 24 outputs: 16-row blocks, overlapping
]
TAP_ROWS = [  # under 16 channels: a kernel row's taps in K
    ((1, 3, 30, 30), 64, (7, 7), (2, 2), (3, 3, 3, 3), "u8", True),  # ResNet's first layer: 7 rows of 28 bytes
    ((2, 8, 20, 20), 24, (3, 3), (1, 1), (1, 1, 1, 1), "i8", False),  # 2 blocks x 3 taps, batch 2, int32 result
    ((1, 3, 33, 33), 32, (3, 3), (2, 2), (1, 0, 0, 1), "u8", True),  # MobileNet's first layer, asymmetric pads
]


@needs_amx
@pytest.mark.parametrize("x_shape,channels,kernel,strides,pads,dtype,requant", CONVS + TAP_ROWS)
def test_conv2d_kernel_is_bit_exact(x_shape, channels, kernel, strides, pads, dtype, requant):
    graph, inputs = conv_graph(x_shape, channels, kernel, strides, pads, 1, dtype, requant)
    tap_rows = {"amx_conv2d_tap_rows"} if x_shape[1] < 16 else set()
    assert _kernels(graph) == {"amx_conv2d", "amx_conv2d_input"} | tap_rows
    _bit_exact(graph, inputs)


@needs_amx
@pytest.mark.parametrize("x_shape,features,dtype,requant", [
    ((128, 384), 384, "u8", True),  # MiniLM's shape
    ((2, 40, 100), 70, "i8", False),  # K 100: 2 steps of 52 bytes; N 70: overlapping blocks
    ((33, 64), 32, "i8", True),  # M 33: the last block overlaps all but one row
    ((20, 48), 40, "u8", True),  # M 20: 16-row blocks
])
def test_dense_kernel_is_bit_exact(x_shape, features, dtype, requant):
    graph, inputs = linear_graph(x_shape, features, dtype, requant)
    assert _kernels(graph) == {"amx_dense"}
    _bit_exact(graph, inputs)


@pytest.mark.parametrize("graph_args,kept", [
    (((1, 24, 15, 15), 24, (3, 3), (1, 1), (1, 1, 1, 1), 24, "u8", True), "vnni_depthwise_sliding"),
    (((1, 12, 30, 30), 64, (7, 7), (1, 1), (3, 3, 3, 3), 1, "u8", True), "vnni_conv2d_direct"),  # 3 blocks x 7 taps
    (((1, 32, 20, 20), 64, (3, 3), (1, 1), (2, 2, 2, 2), 1, "u8", True, True, 0, (2, 2)), "vnni_im2col"),  # dilated
    (((1, 64, 30, 30), 8, (1, 1), (1, 1), (0, 0, 0, 0), 1, "u8", True), "vnni_conv2d_direct"),  # 8 outputs
    (((1, 64, 4, 4), 64, (3, 3), (2, 2), (1, 1, 1, 1), 1, "u8", True), "vnni_conv2d_flat"),  # 2 x 3 positions
])
def test_layers_amx_does_not_pay_for_stay_on_vnni(graph_args, kept):
    graph, _ = conv_graph(*graph_args)
    assert kept in _kernels(graph) and not any(k.startswith("amx_") for k in _kernels(graph))


def test_linears_with_under_16_rows_stay_on_vnni():
    graph, _ = linear_graph((8, 512), 1000, "u8", True)  # a classifier at batch 8
    assert _kernels(graph) == {"vnni_dense"}


def test_targets_choose_amx_by_their_features():
    """Named CPUs get AMX exactly when LLVM says they have it; this machine's target says
    whatever this process may run."""
    assert int8_kernels(make_target("llvm", arch="sapphirerapids")) == "amx"
    assert int8_kernels(without_amx(make_target("llvm", arch="sapphirerapids"))) == "vnni-vbmi"
    assert int8_kernels(make_target("llvm", arch="icelake-server")) == "vnni-vbmi"
    assert supports_amx(LLVM) == amx_usable()


def test_tile_products_cover_k_with_the_least_padding():
    assert k_chunks(16) == (1, 16) and k_chunks(36) == (3, 12) and k_chunks(17) == (2, 9) and k_chunks(1) == (1, 1)
    w = np.arange(-60, 60, dtype=np.int8).reshape(3, 40)  # N 3, K 40 -> [K'/4, N, 4]
    packed = pack_dense_weight(w, 44).reshape(11, 3, 4)
    np.testing.assert_array_equal(packed.transpose(1, 0, 2).reshape(3, 44)[:, :40], w)
    assert not packed.reshape(11, 3, 4)[10].any()


def test_loading_refuses_a_build_for_instructions_this_machine_lacks(digits, tmp_path, monkeypatch):
    """An artifact built here, loaded where the CPU has only baseline x86-64: a clear error
    naming what is missing, where running it would die on an illegal instruction."""
    import importlib

    import torch

    import qcompiler
    from qcompiler.errors import ModelLoadError

    build_module = importlib.import_module("qcompiler.targets.tvm.build")  # the package exports its build()

    model, (x_train, _, x_test, _) = digits
    compiled = qcompiler.compile(model, (torch.from_numpy(x_test[:8]),), calibration=[x_train[:8]])
    compiled.save(tmp_path / "a")
    assert missing_cpu_features(compiled.report()["target_spec"]) == []
    monkeypatch.setattr(build_module, "make_target", lambda kind: make_target(kind, arch="x86-64"))
    with pytest.raises(ModelLoadError, match="built for a CPU with avx2.*compile the model again here"):
        qcompiler.load(tmp_path / "a")
    assert missing_cpu_features(str(make_target("cuda", "sm_80"))) == []


def test_tensors_beyond_int32_offsets_stay_on_vnni():
    """The AMX kernels address with int32 offsets: a layer with over 2^31 bytes of input goes
    to the VNNI kernels (lowered only: nothing that big is built)."""
    huge, _ = conv_graph((256, 64, 224, 224), 64, (3, 3), (1, 1), (1, 1, 1, 1), 1, "u8", True, with_inputs=False)
    assert not any(k.startswith("amx_") for k in _kernels(huge))
    assert addressable(2 ** 31 - 1) and not addressable(1, 2 ** 31)
