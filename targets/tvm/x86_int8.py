"""Int8 kernels for x86 CPUs with AVX-512 VNNI, scheduled by hand.

One ``vpdpbusd`` adds, into each of 16 int32 lanes, four products of unsigned bytes with signed
bytes. Two kernels use it, differing in what the 16 lanes hold:

- ``dense_u8s8`` (linears): lanes are 16 output columns. The 4 activation bytes of a row are
  broadcast; the weights are packed at compile time as ``[N/16, K/4, 16, 4]`` so that each
  instruction reads one 64-byte block (an unpacked ``[N, K]`` weight is what made MetaSchedule's
  VNNI kernels silently wrong, DESIGN.md).
- ``conv_u8s8`` (NCHW convolutions): lanes are 16 output positions of one channel, read from an
  im2col matrix packed as ``[B, P/16, K/4, 16, 4]``; the 4 weight bytes are broadcast. The result
  is NCHW already, with 16 consecutive positions per vector store.

CPUs with AVX2 but no VNNI (AMD Zen 2/3, Intel before Ice Lake) run ``dense_u8s8``,
``conv_u8s8`` and ``batch_matmul_u8s8`` on ``vpmaddwd`` instead (:data:`AVX2_DOT`): bytes
widened to int16 in the register, two products summed into each of 8 int32 lanes, so weights
pack in pairs (``[N/16, K/2, 16, 2]``) and a 16-lane vector is two instructions. Products of
u8 and s8 fit int16 and their pair sums int32: exact, like ``vpdpbusd``. The dense kernels
widen each task's rows of activations to int16 once (``A_wide``), so that a broadcast pair is
one load, and sweep the column blocks with those rows (:func:`tiling.tile_dense_by_rows`).

Each kernel keeps a register tile of int32 accumulators, reduces over all of K inside it and
ends with its epilogue on the tile before the single store: bias, then (when the graph
requantizes the result) the exact fixed-point requantization to 8 bits. Tiles are spread over
the cores.

TVM 0.27 registers ``dot_16x4_vnni`` with ``<16 x i32>`` operands, which LLVM 22's
``vpdpbusd.512`` (``<64 x i8>`` operands) rejects, and importing ``tvm.s_tir.tensor_intrin``
costs ~30 s; so the intrinsics are registered here, with byte-vector operands."""
from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import tvm
from tvm import te, tirx
from tvm.script import tirx as T
from tvm.target import Target

from . import int_arith
from .int_arith import Requantize, as_unsigned
from .layout import flat_phases, padded_phases
from .tiling import (DENSE_ROWS, LANES, MAX_ACCUMULATORS, accumulate_in_registers, finalize, im2col_element, opaque, padded, pick, row_tile,
                     tile_dense, tile_dense_by_rows, tile_rows, tile_window_rows)

GROUP = 4  # bytes summed into each int32 lane
LANES_ARE_COLUMNS = "qcompiler.vnni_16x4.broadcast_u8"  # C[16] += A[4] (broadcast) . B[16, 4]
NIBBLES_ARE_COLUMNS = "qcompiler.vnni_16x4.broadcast_u8.u4"  # the same, B 4-bit codes in [0, 15]
LANES_ARE_ROWS = "qcompiler.vnni_16x4.broadcast_s8"  # C[16] += A[16, 4] . B[4] (broadcast)
PAIRS_ARE_COLUMNS = "qcompiler.avx2_16x2.broadcast_i16"  # C[16] += A[2] (int16, broadcast) . B[16, 2]
PAIRS_ARE_ROWS = "qcompiler.avx2_16x2.broadcast_s8"  # C[16] += A[16, 2] . B[2] (broadcast)
NIBBLE_PAIRS_ARE_COLUMNS = "qcompiler.avx2_16x2.broadcast_i16.s4"  # the same, B 4-bit codes times a multiplier
WORD = {4: "uint32", 2: "uint16"}  # the word holding one pixel's channel block in the blocked layouts
MAX_SLIDING_STRIDE = 4  # 16 windows at stride s span 15*s + 4 bytes: one 64-byte register


def supports_vnni(target: Target) -> bool:
    from tvm.target import codegen

    return target.kind.name == "llvm" and bool(codegen.target_has_features("avx512vnni", target))


@dataclass(frozen=True)
class DotProduct:
    """The instruction a kernel sums ``group`` u8 x s8 products per int32 lane with (its two
    tensor intrinsics), and the register tiles that fit its register file: dense tiles of
    ``dense_rows`` x ``dense_blocks`` 16-lane vectors, convolution tiles of ``conv_rows``
    channels x ``conv_blocks`` vectors of positions (the first choice dividing the extent).
    ``conv_weight``: the dtype a convolution's weights are stored in (the broadcast operand:
    AVX2 widens bytes to int16 with two more instructions per broadcast, so they are stored
    widened). ``max_accumulators``: 16-lane int32 vectors a direct convolution's tile keeps.
    ``row_dtype``: the dtype a dense kernel's broadcast activations are read as (AVX2 widens
    each row tile to int16 once, :func:`dense_u8s8`); a dense kernel with widened rows is tiled
    by :func:`tiling.tile_dense_by_rows`, one 16-lane block wide, so AVX2's ``dense_blocks`` is
    not read."""

    name: str
    group: int
    lanes_are_columns: str
    lanes_are_rows: str
    dense_rows: tuple[int, ...]
    dense_blocks: tuple[int, ...]
    conv_rows: tuple[int, ...]
    conv_blocks: tuple[int, ...]
    conv_weight: str
    max_accumulators: int
    row_dtype: str = "uint8"


# 32 zmm registers for VNNI; AVX2 has 16 ymm, and a 16-lane int32 vector takes two of them
VNNI_DOT = DotProduct("vnni", 4, LANES_ARE_COLUMNS, LANES_ARE_ROWS, DENSE_ROWS, (2, 1),
                      (8, 6, 4, 7, 5, 3, 2, 1), (2, 4, 3, 1), "int8", MAX_ACCUMULATORS)
AVX2_DOT = DotProduct("avx2", 2, PAIRS_ARE_COLUMNS, PAIRS_ARE_ROWS, (6, 4, 5, 3, 2, 1), (1,), (6, 4, 5, 3, 2, 1),
                      (1,), "int16", 6, "int16")


def supports_avx2(target: Target) -> bool:
    from tvm.target import codegen

    return target.kind.name == "llvm" and bool(codegen.target_has_features("avx2", target))


def supports_vbmi(target: Target) -> bool:
    """``vpermb`` (AVX-512 VBMI), which the depthwise kernel uses to build its sliding windows."""
    from tvm.target import codegen

    return supports_vnni(target) and bool(codegen.target_has_features("avx512vbmi", target))


def _vpdpbusd(acc, unsigned_bytes, signed_bytes):
    return T.call_llvm_pure_intrin(T.llvm_lookup_intrinsic_id("llvm.x86.avx512.vpdpbusd.512"),
                                   acc, unsigned_bytes, signed_bytes, dtype="int32x16")


def _broadcast4(buffer, dtype: str):
    """The 4 bytes at ``buffer[0:4]`` repeated over 64 bytes."""
    word = T.reinterpret(buffer.vload([0], f"{dtype}x4"), dtype="int32")
    return T.reinterpret(T.broadcast(word, 16), dtype=f"{dtype}x64")


def _columns_desc(group: int, a_dtype: str = "uint8"):
    """What a lanes-are-columns intrinsic computes: ``C[16] += A[group] . B[16, group]``."""
    @T.prim_func(s_tir=True)
    def desc(a: T.Buffer((group,), a_dtype, offset_factor=1), b: T.Buffer((16, group), "int8", offset_factor=1),
             c: T.Buffer((16,), "int32", offset_factor=1, scope="local")) -> None:
        with T.sblock("root"):
            T.reads(c[0:16], a[0:group], b[0:16, 0:group])
            T.writes(c[0:16])
            for i, k in T.grid(16, group):
                with T.sblock("update"):
                    vi, vk = T.axis.remap("SR", [i, k])
                    c[vi] = c[vi] + T.cast(a[vk], "int32") * T.cast(b[vi, vk], "int32")

    return desc


def _rows_desc(group: int, weight_dtype: str):
    """What a lanes-are-rows intrinsic computes: ``C[16] += A[16, group] . B[group]``."""
    @T.prim_func(s_tir=True)
    def desc(a: T.Buffer((16, group), "uint8", offset_factor=1), b: T.Buffer((group,), weight_dtype, offset_factor=1),
             c: T.Buffer((16,), "int32", offset_factor=1, scope="local")) -> None:
        with T.sblock("root"):
            T.reads(c[0:16], a[0:16, 0:group], b[0:group])
            T.writes(c[0:16])
            for i, k in T.grid(16, group):
                with T.sblock("update"):
                    vi, vk = T.axis.remap("SR", [i, k])
                    c[vi] = c[vi] + T.cast(a[vi, vk], "int32") * T.cast(b[vk], "int32")

    return desc


@functools.cache
def register_intrinsics() -> None:
    from tvm.s_tir import TensorIntrin

    @T.prim_func(s_tir=True)
    def columns_impl(a: T.Buffer((4,), "uint8", offset_factor=1), b: T.Buffer((16, 4), "int8", offset_factor=1),
                     c: T.Buffer((16,), "int32", offset_factor=1, scope="local")) -> None:
        with T.sblock("root"):
            T.reads(c[0:16], a[0:4], b[0:16, 0:4])
            T.writes(c[0:16])
            c[T.ramp(T.int32(0), 1, 16)] = _vpdpbusd(c.vload([0], dtype="int32x16"), _broadcast4(a, "uint8"),
                                                     b.vload([0, 0], dtype="int8x64"))


    @T.prim_func(s_tir=True)
    def rows_impl(a: T.Buffer((16, 4), "uint8", offset_factor=1), b: T.Buffer((4,), "int8", offset_factor=1),
                  c: T.Buffer((16,), "int32", offset_factor=1, scope="local")) -> None:
        with T.sblock("root"):
            T.reads(c[0:16], a[0:16, 0:4], b[0:4])
            T.writes(c[0:16])
            c[T.ramp(T.int32(0), 1, 16)] = _vpdpbusd(c.vload([0], dtype="int32x16"), a.vload([0, 0], dtype="uint8x64"),
                                                     _broadcast4(b, "int8"))

    TensorIntrin.register(LANES_ARE_COLUMNS, _columns_desc(4), columns_impl, override=True)
    TensorIntrin.register(LANES_ARE_ROWS, _rows_desc(4, "int8"), rows_impl, override=True)
    _register_vnni_nibble_intrinsic()
    _register_pair_intrinsics()


def _register_vnni_nibble_intrinsic() -> None:
    """:data:`LANES_ARE_COLUMNS` on 4-bit codes (``dense_u8s4_vnni``): 32 bytes hold a block's
    64 codes, column ``j``'s in the low nibbles of bytes ``(j, 0..3)`` and column ``j + 8``'s in
    their high nibbles; the block is the two halves of nibbles side by side, in the register."""
    from tvm.s_tir import TensorIntrin

    @T.prim_func(s_tir=True)
    def desc(a: T.Buffer((4,), "uint8", offset_factor=1), b: T.Buffer((8, 4), "uint8", offset_factor=1),
             c: T.Buffer((16,), "int32", offset_factor=1, scope="local")) -> None:
        with T.sblock("root"):
            T.reads(c[0:16], a[0:4], b[0:8, 0:4])
            T.writes(c[0:16])
            for i, k in T.grid(16, 4):
                with T.sblock("update"):
                    vi, vk = T.axis.remap("SR", [i, k])
                    c[vi] = c[vi] + T.cast(a[vk], "int32") * T.bitwise_and(
                        T.shift_right(T.cast(b[vi % 8, vk], "int32"), vi // 8 * 4), 15)

    @T.prim_func(s_tir=True)
    def impl(a: T.Buffer((4,), "uint8", offset_factor=1), b: T.Buffer((8, 4), "uint8", offset_factor=1),
             c: T.Buffer((16,), "int32", offset_factor=1, scope="local")) -> None:
        with T.sblock("root"):
            T.reads(c[0:16], a[0:4], b[0:8, 0:4])
            T.writes(c[0:16])
            c[T.ramp(T.int32(0), 1, 16)] = _vpdpbusd(c.vload([0], dtype="int32x16"), _broadcast4(a, "uint8"), T.reinterpret(
                T.Shuffle([T.bitwise_and(b.vload([0, 0], "uint8x32"), T.Broadcast(T.uint8(15), 32)),
                           T.shift_right(b.vload([0, 0], "uint8x32"), T.Broadcast(T.uint8(4), 32))], list(range(64))),
                dtype="int8x64"))

    TensorIntrin.register(NIBBLES_ARE_COLUMNS, desc, impl, override=True)


def _pmaddwd(pairs, other_pairs):
    """8 int32 lanes, each the sum of two adjacent int16 products."""
    return T.call_llvm_pure_intrin(T.llvm_lookup_intrinsic_id("llvm.x86.avx2.pmadd.wd"), pairs, other_pairs,
                                   dtype="int32x8")


def _broadcast_pair(buffer):
    """The int16 pair at ``buffer[0:2]`` repeated over 16 int16 lanes (one load)."""
    return T.reinterpret(T.broadcast(T.reinterpret(buffer.vload([0], "int16x2"), dtype="int32"), 8),
                         dtype="int16x16")


def _register_pair_intrinsics() -> None:
    """``vpmaddwd`` forms of the two VNNI intrinsics (two instructions per 16 lanes); the
    broadcast operand is an int16 pair already (a convolution's weights are stored widened, a
    dense kernel widens its row tile once), so each broadcast is one load."""
    from tvm.s_tir import TensorIntrin

    @T.prim_func(s_tir=True)
    def columns_impl(a: T.Buffer((2,), "int16", offset_factor=1), b: T.Buffer((16, 2), "int8", offset_factor=1),
                     c: T.Buffer((16,), "int32", offset_factor=1, scope="local")) -> None:
        with T.sblock("root"):
            T.reads(c[0:16], a[0:2], b[0:16, 0:2])
            T.writes(c[0:16])
            c[T.ramp(T.int32(0), 1, 8)] = c.vload([0], dtype="int32x8") + _pmaddwd(
                _broadcast_pair(a), T.cast(b.vload([0, 0], dtype="int8x16"), "int16x16"))
            c[T.ramp(T.int32(8), 1, 8)] = c.vload([8], dtype="int32x8") + _pmaddwd(
                _broadcast_pair(a), T.cast(b.vload([8, 0], dtype="int8x16"), "int16x16"))

    @T.prim_func(s_tir=True)
    def rows_impl(a: T.Buffer((16, 2), "uint8", offset_factor=1), b: T.Buffer((2,), "int16", offset_factor=1),
                  c: T.Buffer((16,), "int32", offset_factor=1, scope="local")) -> None:
        with T.sblock("root"):
            T.reads(c[0:16], a[0:16, 0:2], b[0:2])
            T.writes(c[0:16])
            c[T.ramp(T.int32(0), 1, 8)] = c.vload([0], dtype="int32x8") + _pmaddwd(
                T.cast(a.vload([0, 0], dtype="uint8x16"), "int16x16"), _broadcast_pair(b))
            c[T.ramp(T.int32(8), 1, 8)] = c.vload([8], dtype="int32x8") + _pmaddwd(
                T.cast(a.vload([8, 0], dtype="uint8x16"), "int16x16"), _broadcast_pair(b))

    TensorIntrin.register(PAIRS_ARE_COLUMNS, _columns_desc(2, "int16"), columns_impl, override=True)
    TensorIntrin.register(PAIRS_ARE_ROWS, _rows_desc(2, "int16"), rows_impl, override=True)
    _register_nibble_intrinsic()


def _nibble_weights(codes, multipliers, start: int):
    """Columns ``start .. start+7`` of a 4-bit weight pair as ``vpmaddwd``'s int16 operand: byte
    ``j`` holds column ``j``'s two codes (``q + 8``, low nibble first), one multiplier per column;
    lanes ``2j, 2j+1`` get ``(code - 8) * m`` of column ``j`` (exact: ``|q m| <= 126``)."""
    words = T.cast(codes.vload([start], dtype="uint8x8"), "int32x8")
    low = T.bitwise_and(words, T.broadcast(T.int32(15), 8))
    high = T.shift_left(T.shift_right(words, T.broadcast(T.int32(4), 8)), T.broadcast(T.int32(16), 8))
    q = T.reinterpret(T.bitwise_or(low, high), dtype="int16x16") - T.broadcast(T.int16(8), 16)
    m = T.cast(multipliers.vload([start], dtype="uint8x8"), "int32x8")
    m = T.reinterpret(T.bitwise_or(m, T.shift_left(m, T.broadcast(T.int32(16), 8))), dtype="int16x16")
    return q * m


def _register_nibble_intrinsic() -> None:
    """:data:`PAIRS_ARE_COLUMNS` with 4-bit weights unpacked in the register (``dense_u8s4``)."""
    from tvm.s_tir import TensorIntrin

    @T.prim_func(s_tir=True)
    def desc(a: T.Buffer((2,), "int16", offset_factor=1), b: T.Buffer((16,), "uint8", offset_factor=1),
             m: T.Buffer((16,), "uint8", offset_factor=1),
             c: T.Buffer((16,), "int32", offset_factor=1, scope="local")) -> None:
        with T.sblock("root"):
            T.reads(c[0:16], a[0:2], b[0:16], m[0:16])
            T.writes(c[0:16])
            for i, k in T.grid(16, 2):
                with T.sblock("update"):
                    vi, vk = T.axis.remap("SR", [i, k])
                    c[vi] = c[vi] + T.cast(a[vk], "int32") * (
                        (T.bitwise_and(T.shift_right(T.cast(b[vi], "int32"), vk * 4), 15) - 8) * T.cast(m[vi], "int32"))

    @T.prim_func(s_tir=True)
    def impl(a: T.Buffer((2,), "int16", offset_factor=1), b: T.Buffer((16,), "uint8", offset_factor=1),
             m: T.Buffer((16,), "uint8", offset_factor=1),
             c: T.Buffer((16,), "int32", offset_factor=1, scope="local")) -> None:
        with T.sblock("root"):
            T.reads(c[0:16], a[0:2], b[0:16], m[0:16])
            T.writes(c[0:16])
            c[T.ramp(T.int32(0), 1, 8)] = c.vload([0], dtype="int32x8") + _pmaddwd(
                _broadcast_pair(a), _nibble_weights(b, m, 0))
            c[T.ramp(T.int32(8), 1, 8)] = c.vload([8], dtype="int32x8") + _pmaddwd(
                _broadcast_pair(a), _nibble_weights(b, m, 8))

    TensorIntrin.register(NIBBLE_PAIRS_ARE_COLUMNS, desc, impl, override=True)


def pack_dense_weight(w: np.ndarray, n_padded: int, k_padded: int, group: int = GROUP) -> np.ndarray:
    """``[N, K]`` int8 -> ``[N'/16, K'/g, 16, g]`` (``g`` the instruction's group), zero-padded
    to N' and K' (zero weights add nothing, whatever the activations in the padded columns hold)."""
    n, k = w.shape
    full = np.zeros((n_padded, k_padded), np.int8)
    full[:n, :k] = w
    return np.ascontiguousarray(full.reshape(n_padded // LANES, LANES, k_padded // group, group).transpose(0, 2, 1, 3))


@functools.cache
def dense_u8s8(m: int, n: int, n_padded: int, k_padded: int, requant: Requantize | None,
               dot: DotProduct = VNNI_DOT) -> tvm.tirx.PrimFunc:
    """``out[m, n] = epilogue(A[m, k] (u8) . W[n, k] (s8))``, ``W`` packed by
    :func:`pack_dense_weight` for ``dot``; arguments ``A, W, bias[, multiplier, shift], out``."""
    register_intrinsics()
    g = dot.group
    a = te.placeholder((m, k_padded), "uint8", name="A")
    rows = _rows_read_as(a, dot)
    w = te.placeholder((n_padded // LANES, k_padded // g, LANES, g), "int8", name="W")
    params = int_arith.epilogue_inputs(n_padded, requant)
    r = te.reduce_axis((0, k_padded), name="k")
    c = te.compute((m, n_padded), lambda i, j: te.sum(
        rows[i, r].astype("int32") * w[j // LANES, r // g, j % LANES, r % g].astype("int32"), axis=r), name="C")
    out = te.compute((m, n), lambda i, j: int_arith.epilogue(c[i, j], j, params, requant),
                     name="out")
    return _scheduled_dense(te.create_prim_func([a, w, *params, out]), m, n_padded, dot)


def _rows_read_as(a: te.Tensor, dot: DotProduct) -> te.Tensor:
    """The activations ``A`` as ``dot`` broadcasts them: ``A`` itself, or widened (stage ``A_wide``,
    computed once per row tile by :func:`_scheduled_dense`)."""
    if dot.row_dtype == a.dtype:
        return a
    return te.compute(a.shape, lambda i, k: a[i, k].astype(dot.row_dtype), name="A_wide")


def _tile_widened_rows(sch, m: int, n_padded: int, row_choices: tuple[int, ...], k_group: int | None = None) -> tuple:
    """:func:`tiling.tile_dense_by_rows`, the rows widened (``A_wide``) once per task."""
    block, epilogue, k_outer, lanes, task = tile_dense_by_rows(sch, m, n_padded, row_choices, k_group)
    widen = sch.get_sblock("A_wide")
    sch.compute_at(widen, task)
    k = sch.get_loops(widen)[-1]
    sch.vectorize(sch.split(k, [None, pick(sch.get(k).extent.value, (32, 16, 8, 4, 2, 1))])[-1])
    return block, epilogue, k_outer, lanes


def _scheduled_dense(func: tvm.tirx.PrimFunc, rows: int, n_padded: int, dot: DotProduct) -> tvm.tirx.PrimFunc:
    """A dense product ``C`` over loops ``[i, j, k]`` (``j`` the lanes, weights packed
    ``[N/16, K/g, 16, g]``) with its epilogue ``out``, register-tiled and on ``dot``. With
    widened rows (AVX2), row tiles are outermost and each widens its rows once, before sweeping
    the column blocks: one ``vpbroadcastd`` per broadcast pair instead of four instructions
    (load, move, widen, broadcast); on MiniLM's linears 62-67 -> 96-99 GMAC/s on a 2-core Zen 2
    (the widening alone gave 74-81, the order alone 68-70)."""
    from tvm.s_tir import Schedule

    sch = Schedule(func)
    if dot.row_dtype == "uint8":
        block, epilogue, k_outer, lanes = tile_dense(sch, rows, n_padded, dot.group, dot.dense_rows, dot.dense_blocks)
    else:
        block, epilogue, k_outer, lanes = _tile_widened_rows(sch, rows, n_padded, dot.dense_rows, dot.group)
    sch.decompose_reduction(block, k_outer)
    sch.tensorize(lanes, dot.lanes_are_columns)
    return finalize(sch, epilogue)


def _int4_codes(w: np.ndarray, multipliers: np.ndarray, group_size: int, n_padded: int,
                k_padded: int) -> tuple[np.ndarray, np.ndarray]:
    """A 4-bit weight ``[N, K]`` (int8 values ``q * m``, ``m`` per row and group of ``group_size``
    inputs: ``ir.packing``) as codes ``q + 8`` ``[N', K']`` and multipliers ``[N', K'/G]``, both
    uint8; padding has code 8 (``q = 0``) and multiplier 1."""
    n, k = w.shape
    m = np.ones((n_padded, k_padded // group_size), np.int32)
    m[:n, :multipliers.shape[1]] = multipliers
    q = np.zeros((n_padded, k_padded), np.int32)
    q[:n, :k] = w
    q //= np.repeat(m, group_size, axis=1)
    return (q + 8).astype(np.uint8), m.astype(np.uint8)


def _lanes_last(x: np.ndarray) -> np.ndarray:
    """``[N', X]`` -> ``[N'/16, X, 16]``: 16 consecutive columns' values side by side."""
    return np.ascontiguousarray(x.reshape(x.shape[0] // LANES, LANES, -1).transpose(0, 2, 1))


def pack_dense_int4(w: np.ndarray, multipliers: np.ndarray, group_size: int, n_padded: int,
                    k_padded: int) -> tuple[np.ndarray, np.ndarray]:
    """``dense_u8s4``'s operands (:func:`_int4_codes`): codes ``[N'/16, K'/2, 16]`` (byte
    ``(j, k/2)`` holds the codes of inputs ``k`` and ``k + 1`` of column ``j``, low nibble
    first) and multipliers ``[N'/16, K'/G, 16]``."""
    codes, m = _int4_codes(w, multipliers, group_size, n_padded, k_padded)
    return _lanes_last(codes[:, 0::2] | (codes[:, 1::2] << 4)), _lanes_last(m)


def pack_dense_int4_vnni(w: np.ndarray, multipliers: np.ndarray, group_size: int, n_padded: int,
                         k_padded: int) -> tuple[np.ndarray, np.ndarray]:
    """``dense_u8s4_vnni``'s operands (:func:`_int4_codes`): codes ``[N'/16, K'/4, 8, 4]``, the
    64 codes of a ``vpdpbusd`` block (16 columns x 4 inputs) in 32 bytes: byte ``(j, t)`` holds
    column ``j``'s code of input ``t`` in its low nibble and column ``j + 8``'s in its high one
    (so the block unpacks as two 32-byte halves); multipliers ``[N'/16, K'/G, 16]``."""
    codes, m = _int4_codes(w, multipliers, group_size, n_padded, k_padded)
    blocks = codes.reshape(n_padded // LANES, 2, 8, k_padded // GROUP, GROUP).transpose(0, 3, 1, 2, 4)
    return np.ascontiguousarray(blocks[:, :, 0] | (blocks[:, :, 1] << 4)), _lanes_last(m)


@functools.cache
def dense_u8s4_vnni(m: int, n: int, n_padded: int, k_padded: int, group_size: int,
                    requant: Requantize | None) -> tvm.tirx.PrimFunc:
    """:func:`dense_u8s8` on VNNI with a 4-bit weight (:func:`pack_dense_int4_vnni`), unpacked to
    bytes in the register and the group multipliers applied per group, on the accumulators:
    ``out[i, j] = epilogue(sum_g mult[j, g] * (D[i, j, g] - 8 S[i, g]))``, where
    ``D = sum_{k in g} A[i, k] code[j, k]`` (one ``vpdpbusd`` per 4 inputs; codes ``q + 8`` are
    in [0, 15], valid signed bytes) and ``S = sum_{k in g} A[i, k]`` (so ``D - 8 S`` is
    ``sum A q``, exact: padded inputs have code 8 and cancel whatever ``A`` holds there).
    ``group_size`` a multiple of 4; arguments ``A, codes, multipliers, bias[, multiplier, shift],
    out``."""
    from tvm.s_tir import Schedule

    register_intrinsics()
    steps = group_size // GROUP
    a = te.placeholder((m, k_padded), "uint8", name="A")
    codes = te.placeholder((n_padded // LANES, k_padded // GROUP, 8, GROUP), "uint8", name="W")
    mult = te.placeholder((n_padded // LANES, k_padded // group_size, LANES), "uint8", name="M")
    params = int_arith.epilogue_inputs(n_padded, requant)
    r = te.reduce_axis((0, group_size), name="r")
    d = te.compute((m, k_padded // group_size, n_padded), lambda i, g, j: te.sum(
        a[i, g * group_size + r].astype("int32") * tirx.bitwise_and(tirx.shift_right(
            codes[j // LANES, g * steps + r // GROUP, j % 8, r % GROUP].astype("int32"), j % LANES // 8 * 4), 15),
        axis=r), name="D")
    rs = te.reduce_axis((0, group_size), name="rs")
    row_sums = te.compute((m, k_padded // group_size), lambda i, g: te.sum(
        a[i, g * group_size + rs].astype("int32"), axis=rs), name="S")
    kg = te.reduce_axis((0, k_padded // group_size), name="kg")
    c = te.compute((m, n_padded), lambda i, j: te.sum(
        mult[j // LANES, kg, j % LANES].astype("int32") * (d[i, kg, j] - 8 * row_sums[i, kg]), axis=kg), name="C")
    out = te.compute((m, n), lambda i, j: int_arith.epilogue(c[i, j], j, params, requant), name="out")
    sch = Schedule(te.create_prim_func([a, codes, mult, *params, out]))
    sch.parallel(sch.get_loops(sch.get_sblock("S"))[0])
    block = sch.get_sblock("C")
    i, j, g = sch.get_loops(block)
    rows, blocks = pick(m, VNNI_DOT.dense_rows), pick(n_padded // LANES, VNNI_DOT.dense_blocks)
    i_outer, i_inner = sch.split(i, [None, rows])
    j_outer, j_mid, j_inner = sch.split(j, [None, blocks, LANES])
    sch.reorder(j_outer, i_outer, g, i_inner, j_mid, j_inner)
    tile = sch.fuse(j_outer, i_outer)
    sch.parallel(tile)
    group = sch.get_sblock("D")
    sch.compute_at(group, g, preserve_unit_loops=True)
    sch.set_scope(group, 0, "local")
    *_, di, _, dj, dr = sch.get_loops(group)
    d_mid, d_lanes = sch.split(dj, [None, LANES])
    step, element = sch.split(dr, [None, GROUP])
    sch.reorder(step, di, d_mid, d_lanes, element)
    sch.unroll(di)
    sch.unroll(d_mid)
    sch.decompose_reduction(group, step)
    sch.tensorize(d_lanes, NIBBLES_ARE_COLUMNS)
    epilogue = accumulate_in_registers(sch, block, tile, (i_inner, j_mid))
    sch.vectorize(j_inner)
    sch.decompose_reduction(block, g)
    return finalize(sch, epilogue)


@functools.cache
def dense_u8s4(m: int, n: int, n_padded: int, k_padded: int, group_size: int,
               requant: Requantize | None) -> tvm.tirx.PrimFunc:
    """:func:`dense_u8s8` on AVX2 with a 4-bit weight (:func:`pack_dense_int4`), unpacked in the
    register: ``out[m, n] = epilogue(sum_k A[m, k] (u8) * (q[n, k] * mult[n, k / G]))``, the
    reduction split as (group, pair, element) so that a pair never straddles a group;
    arguments ``A, codes, multipliers, bias[, multiplier, shift], out``."""
    from tvm.s_tir import Schedule

    register_intrinsics()
    half = group_size // 2
    a = te.placeholder((m, k_padded), "uint8", name="A")
    codes = te.placeholder((n_padded // LANES, k_padded // 2, LANES), "uint8", name="W")
    mult = te.placeholder((n_padded // LANES, k_padded // group_size, LANES), "uint8", name="M")
    params = int_arith.epilogue_inputs(n_padded, requant)
    rg, rp, rt = (te.reduce_axis((0, k_padded // group_size), name="kg"), te.reduce_axis((0, half), name="kp"),
                  te.reduce_axis((0, 2), name="kt"))

    rows = _rows_read_as(a, AVX2_DOT)

    def product(i, j):
        code = codes[j // LANES, rg * half + rp, j % LANES].astype("int32")
        weight = (tirx.bitwise_and(tirx.shift_right(code, rt * 4), 15) - 8) * mult[j // LANES, rg, j % LANES].astype(
            "int32")
        return rows[i, rg * group_size + rp * 2 + rt].astype("int32") * weight

    c = te.compute((m, n_padded), lambda i, j: te.sum(product(i, j), axis=[rg, rp, rt]), name="C")
    out = te.compute((m, n), lambda i, j: int_arith.epilogue(c[i, j], j, params, requant), name="out")
    sch = Schedule(te.create_prim_func([a, codes, mult, *params, out]))
    block, epilogue, k_outer, lanes = _tile_widened_rows(sch, m, n_padded, AVX2_DOT.dense_rows)
    sch.decompose_reduction(block, k_outer)
    sch.tensorize(lanes, NIBBLE_PAIRS_ARE_COLUMNS)
    return finalize(sch, epilogue)


@functools.cache
def batch_matmul_u8s8(batch: int, m: int, n: int, n_padded: int, k_padded: int,
                      requant: Requantize | None, dot: DotProduct = VNNI_DOT) -> tvm.tirx.PrimFunc:
    """Products of runtime operands: ``out[b*m + i, j] = epilogue(sum_k A[b*m + i, k] (u8) *
    B[b, k, j] (s8) + col[b, j] + row[b*m + i])`` with ``B`` packed per batch item like
    :func:`pack_dense_weight` (``[batch, N/16, K/4, 16, 4]``) and ``col``, ``row`` the
    zero-point corrections computed at run time; arguments ``A, B, col, row, bias[, multiplier,
    shift], out``."""
    register_intrinsics()
    g = dot.group
    a = te.placeholder((batch * m, k_padded), "uint8", name="A")
    w = te.placeholder((batch, n_padded // LANES, k_padded // g, LANES, g), "int8", name="B")
    col, row = te.placeholder((batch, n_padded), "int32", name="col"), te.placeholder((batch * m,), "int32", name="row")
    params = int_arith.epilogue_inputs(n_padded, requant)
    r = te.reduce_axis((0, k_padded), name="k")
    rows = _rows_read_as(a, dot)
    c = te.compute((batch * m, n_padded), lambda i, j: te.sum(
        rows[i, r].astype("int32") * w[i // m, j // LANES, r // g, j % LANES, r % g].astype("int32"), axis=r),
        name="C")
    out = te.compute((batch * m, n), lambda i, j: int_arith.epilogue(
        int_arith.wrapping_add(int_arith.wrapping_add(c[i, j], col[i // m, j]), row[i]), j, params, requant),
        name="out")
    return _scheduled_dense(te.create_prim_func([a, w, col, row, *params, out]), batch * m, n_padded, dot)


@functools.cache
def conv_u8s8(batch: int, channels: int, positions: int, k_padded: int,
              requant: Requantize | None, dot: DotProduct = VNNI_DOT) -> tvm.tirx.PrimFunc:
    """``out[b, o, p] = epilogue(sum_k A[b, p, k] (u8) * W[o, k] (s8))`` with ``A`` the im2col
    matrix packed as ``[B, P'/16, K'/g, 16, g]`` (:func:`im2col_packed`); arguments
    ``A, W, bias[, multiplier, shift], out``."""
    from tvm.s_tir import Schedule

    register_intrinsics()
    g = dot.group
    p_padded = padded(positions, LANES)
    a = te.placeholder((batch, p_padded // LANES, k_padded // g, LANES, g), "uint8", name="A")
    w = te.placeholder((channels, k_padded), dot.conv_weight, name="W")
    params = int_arith.epilogue_inputs(channels, requant)
    r = te.reduce_axis((0, k_padded), name="k")
    c = te.compute((batch, channels, p_padded), lambda b, o, p: te.sum(
        a[b, p // LANES, r // g, p % LANES, r % g].astype("int32") * w[o, r].astype("int32"), axis=r),
        name="C")
    out = te.compute((batch, channels, positions),
                     lambda b, o, p: int_arith.epilogue(c[b, o, p], o, params, requant),
                     name="out")
    sch = Schedule(te.create_prim_func([a, w, *params, out]))
    block = sch.get_sblock("C")
    b, o, p, kk = sch.get_loops(block)
    rows = pick(channels, dot.conv_rows)
    blocks = pick(p_padded // LANES, dot.conv_blocks)
    o_outer, o_inner = sch.split(o, [None, rows])
    p_outer, p_mid, p_inner = sch.split(p, [None, blocks, LANES])
    k_outer, k_inner = sch.split(kk, [None, g])
    sch.reorder(b, o_outer, p_outer, k_outer, o_inner, p_mid, p_inner, k_inner)
    tile = sch.fuse(b, o_outer, p_outer)
    sch.parallel(tile)
    epilogue = accumulate_in_registers(sch, block, tile, (o_inner, p_mid))
    sch.decompose_reduction(block, k_outer)
    sch.tensorize(p_inner, dot.lanes_are_rows)
    return finalize(sch, epilogue)


@functools.cache
def im2col_packed(batch: int, channels: int, height: int, width: int, kernel: tuple[int, int],
                  strides: tuple[int, int], dilations: tuple[int, int], pads: tuple[int, int, int, int],
                  fill: int, signed: bool, group: int = GROUP) -> tvm.tirx.PrimFunc:
    """``x [B, C, H, W]`` (u8, or i8 shifted by +128) -> ``A [B, P'/16, K'/g, 16, g]`` (``g`` = ``group``) u8 with
    ``A[b, p, k] = x[b, c, h, w]`` for output position ``p`` and ``k = (c, kh, kw)``; ``fill``
    (the activations' zero point) where the window leaves the image and in the padding rows
    and columns. A kernel of its own, never fused: recomputing a producer nine times over is
    worse than one pass over bytes."""
    from tvm.s_tir import Schedule

    (kh, kw), (sh, sw), (dh, dw), (top, left, bottom, right) = kernel, strides, dilations, pads
    oh = (height + top + bottom - dh * (kh - 1) - 1) // sh + 1
    ow = (width + left + right - dw * (kw - 1) - 1) // sw + 1
    k_padded, p_padded = padded(channels * kh * kw, group), padded(oh * ow, LANES)
    x = te.placeholder((batch, channels, height, width), "int8" if signed else "uint8", name="x")

    def element(b, pb, kb, pi, ki):
        return im2col_element(x, b, pb * LANES + pi, kb * group + ki, kernel, strides, dilations, pads, (oh, ow),
                              lambda v: as_unsigned(v, signed), tirx.const(fill, "uint8"))

    a = te.compute((batch, p_padded // LANES, k_padded // group, LANES, group), element, name="A")
    sch = Schedule(te.create_prim_func([x, a]))
    block = sch.get_sblock("A")
    loops = sch.get_loops(block)
    sch.parallel(sch.fuse(loops[0], loops[1]))
    return opaque(sch)


@functools.cache
def depthwise_u8s8(batch: int, channels: int, padded_hw: tuple[int, int], kernel: tuple[int, int],
                   strides: tuple[int, int], out_hw: tuple[int, int], requant: Requantize | None) -> tvm.tirx.PrimFunc:
    """Depthwise convolution ``out[b, c, y, x] = epilogue(sum_ij X[b, c, y*sy + i, q, x + j // sx] * W[c, i, j])``
    (``q = j % sx``) over an input padded with the activations' zero point and split into
    column phases (``cpu_float.conv_input_padding``); arguments ``X, W (int16), bias[,
    multiplier, shift], out``. Vectors run along the output row; each u8 x s8 product fits in
    int16 (|255 * 128| < 2^15), which multiplies twice as fast as int32, before the int32 sum."""
    from tvm.s_tir import Schedule

    (kh, kw), (sh, sw), (oh, ow) = kernel, strides, out_hw
    ow_padded = padded(ow, LANES)
    x = te.placeholder((batch, channels, padded_hw[0], sw, padded_hw[1] // sw), "uint8", name="X")
    w = te.placeholder((channels, kh, kw), "int16", name="W")
    params = int_arith.epilogue_inputs(channels, requant)
    i = te.reduce_axis((0, kh), name="i")
    j = te.reduce_axis((0, kw), name="j")
    c = te.compute((batch, channels, oh, ow_padded), lambda b, ch, y, v: te.sum(
        (x[b, ch, y * sh + i, j % sw, v + j // sw].astype("int16") * w[ch, i, j]).astype("int32"), axis=[i, j]),
        name="C")
    out = te.compute((batch, channels, oh, ow),
                     lambda b, ch, y, v: int_arith.epilogue(c[b, ch, y, v], ch, params, requant),
                     name="out")
    return tile_window_rows(Schedule(te.create_prim_func([x, w, *params, out])), LANES)


def window_load(stride: int) -> int:
    """Bytes the sliding intrinsic loads at a strip's start: 32 (zero-extended) when its 16
    windows fit them, else 64."""
    return 32 if (LANES - 1) * stride + GROUP <= 32 else 64


@functools.cache
def sliding_intrinsic(stride: int) -> str:
    """``C[16] += A[i*s : i*s + 4] . B[4]`` for ``i < 16``: ``vpermb`` (AVX-512 VBMI) gathers the
    16 windows of 4 bytes from one load, ``vpdpbusd`` adds their products with ``B``."""
    from tvm.s_tir import TensorIntrin

    span, load = (LANES - 1) * stride + GROUP, window_load(stride)
    lane = T.Ramp(T.int8(0), T.int8(1), 64)
    windows = ((lane >> T.Broadcast(T.int8(2), 64)) * T.Broadcast(T.int8(stride), 64)
               + (lane & T.Broadcast(T.int8(3), 64)))  # byte 4i + k of the result: a[i*s + k]

    @T.prim_func(s_tir=True)
    def desc(a: T.Buffer((span,), "uint8", offset_factor=1), b: T.Buffer((4,), "int8", offset_factor=1),
             c: T.Buffer((16,), "int32", offset_factor=1, scope="local")) -> None:
        with T.sblock("root"):
            T.reads(c[0:16], a[0:span], b[0:4])
            T.writes(c[0:16])
            for i, k in T.grid(16, 4):
                with T.sblock("update"):
                    vi, vk = T.axis.remap("SR", [i, k])
                    c[vi] = c[vi] + T.cast(a[vi * stride + vk], "int32") * T.cast(b[vk], "int32")

    @T.prim_func(s_tir=True)
    def impl(a: T.Buffer((span,), "uint8", offset_factor=1), b: T.Buffer((4,), "int8", offset_factor=1),
             c: T.Buffer((16,), "int32", offset_factor=1, scope="local")) -> None:
        with T.sblock("root"):
            T.reads(c[0:16], a[0:span], b[0:4])
            T.writes(c[0:16])
            # no let-bound vectors here: each became a heap workspace allocated per call
            c[T.ramp(T.int32(0), 1, 16)] = _vpdpbusd(c.vload([0], dtype="int32x16"), T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id("llvm.x86.avx512.permvar.qi.512"),
                T.Shuffle([a.vload([0], "uint8x32"), T.Broadcast(T.uint8(0), 32)], list(range(64)))
                if load == 32 else a.vload([0], "uint8x64"), windows, dtype="uint8x64"), _broadcast4(b, "int8"))

    name = f"qcompiler.vnni_16x4.sliding_u8_stride{stride}"
    TensorIntrin.register(name, desc, impl, override=True)
    return name


def pack_sliding_weight(w: np.ndarray) -> np.ndarray:
    """``[C, kh, kw]`` -> ``[C, kh, 4]``, the taps past ``kw`` zero."""
    channels, kh, kw = w.shape
    packed = np.zeros((channels, kh, GROUP), np.int8)
    packed[:, :, :kw] = w
    return packed


@functools.cache
def depthwise_sliding_u8s8(batch: int, channels: int, padded_hw: tuple[int, int], kernel: tuple[int, int],
                           strides: tuple[int, int], out_hw: tuple[int, int],
                           requant: Requantize | None) -> tvm.tirx.PrimFunc:
    """Depthwise convolution on VNNI: ``out[b, c, y, x] = epilogue(sum_{i,t} X[b, c, y*sy + i, 0,
    x*sx + t] * W[c, i, t])`` over the input padded with the zero point (one phase) and weights
    from :func:`pack_sliding_weight` (kernel width <= 4, stride <= 4). For 16 neighbouring
    outputs one load, one ``vpermb`` and one ``vpdpbusd`` per kernel row (the int16 kernel takes 5
    instructions per tap). Rows must hold :func:`window_load` bytes from the last strip's start."""
    from tvm.s_tir import Schedule

    (kh, _), (sh, sw), (oh, ow) = kernel, strides, out_hw
    intrinsic = sliding_intrinsic(sw)
    ow_padded = padded(ow, LANES)
    x = te.placeholder((batch, channels, padded_hw[0], 1, padded_hw[1]), "uint8", name="X")
    w = te.placeholder((channels, kh, GROUP), "int8", name="W")
    params = int_arith.epilogue_inputs(channels, requant)
    ri, rt = te.reduce_axis((0, kh), name="i"), te.reduce_axis((0, GROUP), "t")
    c = te.compute((batch, channels, oh, ow_padded), lambda b, ch, y, v: te.sum(
        x[b, ch, y * sh + ri, 0, v * sw + rt].astype("int32") * w[ch, ri, rt].astype("int32"), axis=[ri, rt]),
        name="C")
    out = te.compute((batch, channels, oh, ow),
                     lambda b, ch, y, v: int_arith.epilogue(c[b, ch, y, v], ch, params, requant), name="out")
    return tile_window_rows(Schedule(te.create_prim_func([x, w, *params, out])), LANES, intrinsic)


@functools.cache
def conv_direct_u8s8(batch: int, channel_blocks: int, padded_hw: tuple[int, int], out_channels: int,
                     kernel: tuple[int, int], strides: tuple[int, int], out_hw: tuple[int, int],
                     requant: Requantize | None, dot: DotProduct = VNNI_DOT) -> tvm.tirx.PrimFunc:
    """Direct convolution without im2col: ``out[b, o, y, x] = epilogue(sum_{g,i,j,c4}
    X[b, g, y*sy + i, q, x + j // sx, c4] * W[o, g, i, j, c4])`` where ``X`` is the input padded
    with the zero point, in blocks of ``g`` channels (NCHW4c for VNNI, NCHW2c for AVX2) and split into ``sx`` column phases
    (``q = j % sx``; column ``x*sx + q``) so that 16 neighbouring outputs read ``16 g`` contiguous
    bytes; the ``g`` weights of a channel block are broadcast. Arguments ``X, W, bias[, multiplier,
    shift], out``."""
    from tvm.s_tir import Schedule

    register_intrinsics()
    g = dot.group
    (kh, kw), (sh, sw), (oh, ow) = kernel, strides, out_hw
    ow_padded = padded(ow, LANES)
    x = te.placeholder((batch, channel_blocks, padded_hw[0], sw, padded_hw[1] // sw, g), "uint8", name="X")
    w = te.placeholder((out_channels, channel_blocks, kh, kw, g), dot.conv_weight, name="W")
    params = int_arith.epilogue_inputs(out_channels, requant)
    rg, ri, rj, rc = (te.reduce_axis((0, channel_blocks), name="g"), te.reduce_axis((0, kh), name="i"),
                      te.reduce_axis((0, kw), name="j"), te.reduce_axis((0, g), name="c4"))
    c = te.compute((batch, out_channels, oh, ow_padded), lambda b, o, y, v: te.sum(
        x[b, rg, y * sh + ri, rj % sw, v + rj // sw, rc].astype("int32") * w[o, rg, ri, rj, rc].astype("int32"),
        axis=[rg, ri, rj, rc]), name="C")
    out = te.compute((batch, out_channels, oh, ow),
                     lambda b, o, y, v: int_arith.epilogue(c[b, o, y, v], o, params, requant),
                     name="out")
    sch = Schedule(te.create_prim_func([x, w, *params, out]))
    block, epilogue, first_reduction, lanes = tile_rows(sch, out_channels, ow_padded, inner_reductions=1,
                                                        max_accumulators=dot.max_accumulators)
    sch.decompose_reduction(block, first_reduction)
    sch.tensorize(lanes, dot.lanes_are_rows)
    return finalize(sch, epilogue)


def _word(x: te.Tensor, b, g, row, col, signed: bool, fill: int, group: int = GROUP) -> tirx.PrimExpr:
    """The bytes of channels ``group*g ..`` at ``(row, col)`` as one word (uint32 for 4, uint16 for
    2; channel ``group*g + c4`` in bits ``8*c4``), ``fill`` for channels past the last."""
    channels, dtype = x.shape[1], WORD[group]
    word = tirx.const(0, dtype)
    for c4 in range(group):
        c = g * group + c4
        byte = as_unsigned(x[b, tirx.min(c, channels - 1), row, col], signed).astype(dtype)
        if channels % group:
            byte = tirx.if_then_else(c < channels, byte, tirx.const(fill, dtype))
        word = word | (byte << tirx.const(8 * c4, dtype))
    return word


@dataclass(frozen=True)
class FlatGeometry:
    """A convolution input padded, split into row and column phases (strides ``sh``, ``sw``) and
    flattened: phase plane ``(qr, qc)`` holds the padded image's ``(r*sh + qr, c*sw + qc)`` at
    ``f = r * row + c``. Output ``(y, x)`` sits at ``p = y * row + x``, and tap ``(i, j)`` reads
    plane ``(i % sh, j % sw)`` at ``p + (i // sh) * row + j // sw``: a constant offset, so that
    16 neighbouring ``p`` read 64 contiguous bytes, across output rows (the ``x >= ow`` positions
    in between are computed and dropped). ``length`` (whole rows of ``row``) covers the last
    strip's reads."""
    row: int  # columns of a phase plane's row
    positions: int  # oh * row, padded to 16
    length: int

    @staticmethod
    def of(width: int, pads: tuple[int, int, int, int], kernel: tuple[int, int], strides: tuple[int, int],
           out_hw: tuple[int, int]) -> "FlatGeometry":
        (_, left, _, _), (kh, kw), (sh, sw), (oh, ow) = pads, kernel, strides, out_hw
        row = -(-max(width + left, (ow - 1) * sw + kw) // sw)
        positions = padded(oh * row, LANES)
        return FlatGeometry(row, positions, padded(positions + (kh - 1) // sh * row + (kw - 1) // sw, row))


@functools.cache
def to_blocked_flat(batch: int, channels: int, height: int, width: int, pads: tuple[int, int, int, int],
                    strides: tuple[int, int], geometry: FlatGeometry, fill: int, signed: bool,
                    blocks: int | None = None) -> tvm.tirx.PrimFunc:
    """``x [B, C, H, W]`` -> ``[B, blocks, sh, sw, length / row, row]`` uint32 words of 4 channel
    bytes (as in :func:`to_blocked_phases`; ``blocks`` at least ``C/4``, by default just that),
    the planes of :class:`FlatGeometry`; ``fill`` outside the image."""
    x = te.placeholder((batch, channels, height, width), "int8" if signed else "uint8", name="x")
    return flat_phases(x, blocks or padded(channels, GROUP) // GROUP, pads, strides, geometry.length // geometry.row,
                       geometry.row, lambda b, g, row, col: _word(x, b, g, row, col, signed, fill),
                       tirx.const(fill * 0x01010101, "uint32"))


@functools.cache
def conv_flat_u8s8(batch: int, channel_blocks: int, geometry: FlatGeometry, out_channels: int,
                   kernel: tuple[int, int], strides: tuple[int, int], out_hw: tuple[int, int],
                   requant: Requantize | None) -> tvm.tirx.PrimFunc:
    """Direct convolution for narrow outputs (rows under 16): ``out[b, o, y, x] = epilogue(sum
    X[b, g, i % sh, j % sw, y*row + x + (i // sh)*row + j // sw, c4] * W[o, g, i, j, c4])`` over
    :func:`to_blocked_flat`'s input: a register tile holds every position of a few channels,
    so a 7x7 output takes 4 strips (as an im2col matrix would) without the 9x im2col copy. The
    result is ``[B, O, oh * row]``, columns ``x >= ow`` of each row included (dropped by the
    caller: an epilogue addressed by ``y * row + x`` defeats TVM's compute-at)."""
    from tvm.s_tir import Schedule

    register_intrinsics()
    (kh, kw), (sh, sw), (oh, _) = kernel, strides, out_hw
    row = geometry.row
    x = te.placeholder((batch, channel_blocks, sh, sw, geometry.length, GROUP), "uint8", name="X")
    w = te.placeholder((out_channels, channel_blocks, kh, kw, GROUP), "int8", name="W")
    params = int_arith.epilogue_inputs(out_channels, requant)
    rg, ri, rj, rc = (te.reduce_axis((0, channel_blocks), name="g"), te.reduce_axis((0, kh), name="i"),
                      te.reduce_axis((0, kw), name="j"), te.reduce_axis((0, GROUP), name="c4"))
    c = te.compute((batch, out_channels, geometry.positions), lambda b, o, p: te.sum(
        x[b, rg, ri % sh, rj % sw, p + ri // sh * row + rj // sw, rc].astype("int32")
        * w[o, rg, ri, rj, rc].astype("int32"), axis=[rg, ri, rj, rc]), name="C")
    out = te.compute((batch, out_channels, oh * row),
                     lambda b, o, p: int_arith.epilogue(c[b, o, p], o, params, requant), name="out")
    sch = Schedule(te.create_prim_func([x, w, *params, out]))
    block = sch.get_sblock("C")
    b, o, p, *reductions = sch.get_loops(block)
    rows, strips = row_tile(out_channels, geometry.positions // LANES)
    o_outer, o_inner = sch.split(o, [None, rows])
    p_outer, p_mid, p_inner = sch.split(p, [None, strips, LANES])
    sch.reorder(b, o_outer, p_outer, *reductions[:-1], o_inner, p_mid, p_inner, reductions[-1])
    tile = sch.fuse(b, o_outer, p_outer)
    sch.parallel(tile)
    epilogue = accumulate_in_registers(sch, block, tile, (o_inner, p_mid))
    sch.decompose_reduction(block, reductions[0])
    sch.tensorize(p_inner, LANES_ARE_ROWS)
    return finalize(sch, epilogue)


@functools.cache
def to_blocked_phases(batch: int, channels: int, height: int, width: int, pads: tuple[int, int, int, int],
                      stride: int, fill: int, signed: bool, group: int = GROUP) -> tvm.tirx.PrimFunc:
    """``x [B, C, H, W]`` -> the direct kernel's input, padded by ``pads`` with ``fill``, channels
    in blocks of ``group`` (the extra ones ``fill`` too: their weights are zero), columns split
    into ``s`` phases: ``[B, C'/g, H', s, W'/s]`` words (uint32 for 4, uint16 for 2), each the
    channel bytes of one pixel (byte ``c4`` is bits ``8*c4``; on little-endian x86 the words
    read as ``[..., g]`` bytes).
    Building words, a row of 16 pixels is four 16-byte row loads, shifts and ors and one
    64-byte store, where writing the 4-byte-interleaved layout byte by byte gathers every
    element. The window's border is a partition of its own, so the interior runs without bounds
    checks."""
    x = te.placeholder((batch, channels, height, width), "int8" if signed else "uint8", name="x")
    return padded_phases(x, padded(channels, group) // group, pads, stride,
                         lambda b, g, row, col: _word(x, b, g, row, col, signed, fill, group),
                         tirx.const(fill * (0x01010101 if group == 4 else 0x0101), WORD[group]))
