"""Int8 kernels for CUDA GPUs (sm_61 and newer), scheduled by hand around ``__dp4a``.

``__dp4a(a, b, c)`` adds to the int32 ``c`` the four products of the signed bytes packed in
the words ``a`` and ``b``. Linears and convolutions (through an im2col matrix) are one GEMM,
``out[m, n] = epilogue(sum_k A[m, k] * W[n, k])``, both operands int8: activations arrive in
the signed domain (uint8 shifted by -128, folded into the bias as the zero point is), weights
are constants padded to the tile.

The schedule: a thread block computes a 64-column tile of 64 rows (or of all rows, when there
are fewer) with 16 x 16 threads, each holding 4 x 4 int32 accumulators in registers. K is
walked in 32-byte slices staged in shared memory k-major (``[K/4, rows, 4]``): the 16 threads
of a row read words 4 apart (2-way bank conflicts, where row-major staging gives 8-way). The
epilogue (bias, requantization) runs on the registers before the one store.

TVM's ``tvm.s_tir.tensor_intrin`` registers the same dp4a intrinsic, but importing it costs
~30 s (DESIGN.md); it is registered here."""
from __future__ import annotations

import functools
import re

import tvm
from tvm import te
from tvm.script import tirx as T
from tvm.target import Target

from . import int_arith
from .int_arith import Requantize
from .tiling import opaque, padded

DP4A = "qcompiler.dp4a_s8s8s32"
GROUP = 4  # bytes per dp4a word
K_SLICE = 32  # bytes of K staged in shared memory per step
THREADS = 16  # threads along each tile axis
PER_THREAD = 4  # accumulators along each tile axis per thread
MIN_ARCH = 61  # dp4a appeared with Pascal's sm_61


def supports_dp4a(target: Target) -> bool:
    arch = re.fullmatch(r"sm_(\d+)[a-z]?", str(target.attrs.get("arch", ""))) if target.kind.name == "cuda" else None
    return arch is not None and int(arch.group(1)) >= MIN_ARCH


@functools.cache
def register_dp4a() -> None:
    from tvm.s_tir import TensorIntrin

    @T.prim_func(s_tir=True)
    def desc(a: T.Buffer((4,), "int8", offset_factor=1, align=4, scope="shared"),
             b: T.Buffer((4,), "int8", offset_factor=1, align=4, scope="shared"),
             c: T.Buffer((1,), "int32", offset_factor=1, align=4, scope="local")) -> None:
        with T.sblock("root"):
            T.reads(c[0], a[0:4], b[0:4])
            T.writes(c[0])
            for k in range(4):
                with T.sblock("update"):
                    vk = T.axis.remap("R", [k])
                    c[0] = c[0] + T.cast(a[vk], "int32") * T.cast(b[vk], "int32")

    @T.prim_func(s_tir=True)
    def impl(a: T.Buffer((4,), "int8", offset_factor=1, align=4, scope="shared"),
             b: T.Buffer((4,), "int8", offset_factor=1, align=4, scope="shared"),
             c: T.Buffer((1,), "int32", offset_factor=1, align=4, scope="local")) -> None:
        with T.sblock("root"):
            T.reads(c[0], a[0:4], b[0:4])
            T.writes(c[0])
            c[0] = T.call_pure_extern("__dp4a", a.vload([0], "int8x4"), b.vload([0], "int8x4"), c[0], dtype="int32")

    TensorIntrin.register(DP4A, desc, impl, override=True)


def rows_per_thread(m: int) -> tuple[int, int]:
    """(threads, accumulators per thread) along M: 16 x 4, or one row per thread for small M."""
    return (THREADS, PER_THREAD) if m >= THREADS * PER_THREAD else (m, 1)


def gemm_shape(m: int, n: int, k: int) -> tuple[int, int, int]:
    """The padded (M, N, K) the GEMM's operands are laid out in: whole tiles and K slices."""
    threads, per_thread = rows_per_thread(m)
    return padded(m, threads * per_thread), padded(n, THREADS * PER_THREAD), padded(k, K_SLICE)


def gemm_definition(m: int, n: int, k: int, requant: Requantize | None) -> tvm.tirx.PrimFunc:
    """The GEMM unscheduled: arguments ``A [M', K'] (i8), W [N', K'] (i8), bias[, multiplier,
    shift] (N'), out [m, n]`` with the padded sizes of :func:`gemm_shape`."""
    m_padded, n_padded, k_padded = gemm_shape(m, n, k)
    a = te.placeholder((m_padded, k_padded), "int8", name="A")
    w = te.placeholder((n_padded, k_padded), "int8", name="W")
    params = int_arith.epilogue_inputs(n_padded, requant)
    r = te.reduce_axis((0, k_padded), name="k")
    c = te.compute((m_padded, n_padded), lambda i, j: te.sum(a[i, r].astype("int32") * w[j, r].astype("int32"), axis=r),
                   name="C")
    out = te.compute((m, n), lambda i, j: int_arith.epilogue(c[i, j], j, params, requant), name="out")
    return te.create_prim_func([a, w, *params, out])


@functools.cache
def gemm_s8s8(m: int, n: int, k: int, requant: Requantize | None) -> tvm.tirx.PrimFunc:
    """:func:`gemm_definition` scheduled for the GPU (module docstring)."""
    from tvm.s_tir import Schedule

    register_dp4a()
    row_threads, rows_each = rows_per_thread(m)
    sch = Schedule(gemm_definition(m, n, k, requant))
    gemm, out = sch.get_sblock("C"), sch.get_sblock("out")
    i, j = sch.get_loops(out)
    i_block, i_thread, i_each = sch.split(i, [None, row_threads, rows_each])
    j_block, j_thread, j_each = sch.split(j, [None, THREADS, PER_THREAD])
    sch.reorder(i_block, j_block, i_thread, j_thread, i_each, j_each)
    sch.bind(i_block, "blockIdx.y")
    sch.bind(j_block, "blockIdx.x")
    sch.bind(i_thread, "threadIdx.y")
    sch.bind(j_thread, "threadIdx.x")
    sch.set_scope(gemm, 0, "local")
    sch.compute_at(gemm, j_thread)
    *tile, gk = sch.get_loops(gemm)[4:]  # under the block and thread loops; unit loops are gone
    k_outer, k_inner, k_word = sch.split(gk, [None, K_SLICE // GROUP, GROUP])
    sch.reorder(k_outer, k_inner, *tile, k_word)
    for operand in (0, 1):
        staged = sch.cache_read(gemm, operand, "shared")
        sch.compute_at(staged, k_outer)
        sch.transform_layout(staged, ("write", 0), lambda r, c: (c // GROUP, r, c % GROUP))
        fused = sch.fuse(*sch.get_loops(staged)[5:])  # under k_outer
        _, ty, tx, word = sch.split(fused, [None, row_threads, THREADS, GROUP])
        sch.bind(ty, "threadIdx.y")
        sch.bind(tx, "threadIdx.x")
        sch.vectorize(word)
    sch.decompose_reduction(gemm, k_outer)
    for loop in tile:
        sch.unroll(loop)
    sch.tensorize(k_word, DP4A)
    return opaque(sch)
