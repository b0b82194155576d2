"""The CUDA int8 path (``targets/tvm/cuda_lower`` and ``cuda_int8``): integer convolutions and
linears on a dp4a GEMM.

Without a GPU, two checks: the lowering's arithmetic (signed shift, bias folding, im2col,
epilogue, layout back to NCHW) is run on the CPU with the GEMM's unscheduled definition and
compared bit-exactly with the interpreter; and the scheduled kernels are built for CUDA, must
call ``__dp4a`` and compile with nvcc. Schedule primitives preserve a kernel's meaning (TVM
checks each), so what the GPU run adds is the intrinsic itself: on a machine with a GPU the
built modules are run and compared too."""
from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pytest
import tvm
from int8_cases import conv_graph, linear_graph
from tvm import relax

from qcompiler.targets.tvm import TVMRunner, build, cuda_source, make_target, to_relax
from qcompiler.targets.tvm import cuda_lower
from qcompiler.targets.tvm.build import FUSE, int8_kernels
from qcompiler.targets.tvm.cpu_schedule import parallelize_cpu
from qcompiler.targets.tvm.cuda_int8 import gemm_definition

GPU = tvm.cuda(0).exist
CASES = [  # (graph, inputs): every case that changes the GEMM's tiling or the im2col
    conv_graph((2, 12, 16, 17), 24, (3, 3), (1, 1), (1, 1, 1, 1), 1, "i8", True),  # 544 rows: a partial row tile
    conv_graph((1, 3, 30, 30), 16, (7, 7), (2, 2), (3, 3, 3, 3), 1, "u8", False),  # K = 147, int32 result
    conv_graph((1, 8, 7, 7), 12, (3, 3), (2, 2), (0, 1, 1, 0), 1, "u8", True, per_channel=False),  # 16 rows
    conv_graph((1, 6, 12, 12), 8, (3, 3), (1, 1), (2, 2, 2, 2), 1, "u8", True, dilations=(2, 2)),
    linear_graph((3, 10, 64), 96, "u8", True),  # 30 rows, one per thread
    linear_graph((1, 30), 1000, "i8", False),  # one row; N not a multiple of the 64-column tile
    linear_graph((70, 40), 20, "i8", True),  # 70 rows: two row tiles, the second nearly empty
]
IDS = ["conv-batch2", "conv7x7-k147", "conv-16rows", "conv-dilated", "linear-30rows", "linear-1row", "linear-70rows"]


def _names(mod: tvm.IRModule) -> set[str]:
    return {gv.name_hint.rstrip("0123456789") for gv in mod.functions}


def _run_definitions_on_cpu(graph, inputs, monkeypatch) -> np.ndarray:
    """The dp4a lowering built for the CPU, the GEMM unscheduled (the CPU's default schedule)."""
    monkeypatch.setattr(cuda_lower, "gemm_s8s8",
                        lambda *shape: gemm_definition(*shape).without_attr("global_symbol").with_attr("op_pattern", 8))
    mod = to_relax(graph, int8_kernels="dp4a")
    assert "cuda_int8_gemm" in _names(mod)
    target = make_target("llvm")
    with target:
        mod = parallelize_cpu(tvm.transform.Sequential(FUSE)(mod))
    return TVMRunner(relax.build(mod, target=target), tvm.cpu(), 1)(inputs)[0]


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_dp4a_lowering_is_bit_exact_on_the_cpu(case, monkeypatch):
    graph, inputs = case
    want = graph(*inputs)[0]
    assert len(np.unique(want)) > min(20, want.size // 4)  # not saturated to a few values
    got = _run_definitions_on_cpu(graph, inputs, monkeypatch)
    assert got.dtype == want.dtype
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_dp4a_kernels_build_for_cuda_and_compile(case, tmp_path):
    graph, inputs = case
    executable = build(graph, make_target("cuda", "sm_75"))
    source = cuda_source(executable)
    assert "__dp4a(" in source and "__shared__" in source
    (tmp_path / "k.cu").write_text(source)
    nvcc = shutil.which("nvcc") or "/usr/local/cuda/bin/nvcc"
    done = subprocess.run([nvcc, "-arch=sm_75", "-c", str(tmp_path / "k.cu"), "-o", str(tmp_path / "k.o")],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    if GPU:
        np.testing.assert_array_equal(TVMRunner(executable, tvm.cuda(0), 1)(inputs)[0], graph(*inputs)[0])


def test_dp4a_only_where_the_gpu_has_it():
    """dp4a needs sm_61; older GPUs, depthwise convolutions and nonzero weight zero points keep
    the generic integer path (exact, no float fallback)."""
    assert int8_kernels(make_target("cuda", "sm_61")) == "dp4a"
    assert int8_kernels(make_target("cuda", "sm_90a")) == "dp4a"
    assert int8_kernels(make_target("cuda", "sm_52")) is None
    graph, _ = CASES[0]
    assert "__dp4a(" not in cuda_source(build(graph, make_target("cuda", "sm_52")))
    depthwise, _ = conv_graph((1, 8, 6, 6), 8, (3, 3), (1, 1), (1, 1, 1, 1), 8, "u8", True)
    assert "cuda_int8_gemm" not in _names(to_relax(depthwise, int8_kernels="dp4a"))
    graph, _ = linear_graph((4, 16), 16, "u8", True)
    graph.constants["wz"] = np.ones(16, np.int8)
    assert "cuda_int8_gemm" not in _names(to_relax(graph, int8_kernels="dp4a"))

