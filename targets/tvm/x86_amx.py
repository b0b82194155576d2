"""Int8 convolutions and linears on Intel AMX (Sapphire Rapids and later), scheduled by hand.

One ``tdpbusd`` / ``tdpbsud`` multiplies a 16 x 64 byte tile by a 64 x 16 byte tile into a
16 x 16 int32 tile: 16384 products, where one VNNI instruction does 64. Both kernels here are
the same GEMM over flat byte buffers: each task keeps a 32 x 32 block of accumulators in four
tile registers (the other four hold two tiles of each operand; for 16-31 rows, a 16 x 32
block in two), runs the whole reduction there, stores the accumulators to a 4 KB scratch and
applies the epilogue (bias, exact requantization) from it with vector code, a row of 32 at a
time (a convolution's row is one output channel: its parameters are loaded once).

- ``A`` (``M x K``): 16 rows of ``kbytes`` bytes, rows ``a_stride`` bytes apart.
- ``B`` (``K x N``, "VNNI layout"): ``kbytes / 4`` rows of 16 columns x 4 bytes (the bytes of
  4 consecutive ``k`` for each column), rows ``b_stride`` bytes apart.
- The last block of each dimension is moved back to end at ``M`` (``N``) and overlaps its
  neighbour: recomputed outputs are written twice with the same value, so nothing is padded.

A convolution is ``out[o, p] = W[o, (tap, c)] . X[(tap, c), p]`` over the flat input of
``x86_int8.FlatGeometry`` (every tap a constant offset, 4 channel bytes per position): A is the
weights (signed: ``tdpbsud``), B the input (unsigned). A linear is ``x[m, k] . w[k, n]``: A is
the activations (unsigned: ``tdpbusd``), B the weights packed as ``[K/4, N, 4]``.

:func:`dense` with ``bf16`` is the same GEMM over bfloat16 operands (AMX-BF16's ``tdpbf16ps``): a 4-byte
group of K holds two bf16 values instead of four bytes, so the tiles and offsets are the int8
linear's; the accumulators are float32 and the epilogue adds the bias.

The tile shapes are loaded into the tile configuration (``ldtilecfg``) once per parallel chunk
of tasks, as it costs a few hundred cycles. (No ``from __future__ import annotations`` here:
TVMScript reads the kernel's buffer annotations as values.) A process must ask Linux for the tile state
(``arch_prctl(ARCH_REQ_XCOMP_PERM)``) before its first AMX instruction, else that instruction
faults: :func:`amx_usable` does, and targets only get AMX where it succeeded."""

import ctypes
import functools
import sys
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import tvm
from tvm import te, tirx
from tvm.script import tirx as T
from tvm.target import Target

from qcompiler.cpu_features import cpu_flags, has_amx_bf16

from . import int_arith
from .int_arith import Requantize
from .tiling import mark_opaque, opaque
from .x86_int8 import GROUP, FlatGeometry, supports_vbmi

TILE = 16  # rows of a tile, and int32 columns of an accumulator tile
BLOCK = 2 * TILE  # outputs per task along M and along N
ROW_BYTES = 64  # bytes of a tile row
MIN_CHANNELS = 16  # fewer input channels fill under a quarter of a tile product: see taps_in_k
FEATURES = ("amx-tile", "amx-int8")
BF16_FEATURE = "amx-bf16"  # tdpbf16ps: the bf16 GEMM (dense with bf16)
_SYS_ARCH_PRCTL, _ARCH_REQ_XCOMP_PERM, _XFEATURE_XTILEDATA = 158, 0x1023, 18


@functools.cache
def amx_usable() -> bool:
    """Whether this process may run AMX instructions: the CPU has them and Linux granted the
    tile state (asked for here, once per process; harmless where it is granted already)."""
    if not sys.platform.startswith("linux") or not {"amx_tile", "amx_int8"} <= cpu_flags():
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    return libc.syscall(_SYS_ARCH_PRCTL, _ARCH_REQ_XCOMP_PERM, _XFEATURE_XTILEDATA) == 0


# linked into every exported library: a process that loads one with TVM alone (no qcompiler)
# gets the tile state before any kernel runs; where there is no AMX the call fails harmlessly
LIBRARY_CONSTRUCTOR = """#include <sys/syscall.h>
#include <unistd.h>
__attribute__((constructor)) static void qcompiler_request_amx_tile_state(void) {
  syscall(%d, %d, %d); /* arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) */
}
""" % (_SYS_ARCH_PRCTL, _ARCH_REQ_XCOMP_PERM, _XFEATURE_XTILEDATA)


def host_attributes() -> list[str]:
    """LLVM attributes for this machine's AMX: on where usable, else explicitly off (an ``mcpu``
    such as sapphirerapids implies it, and without Linux's permission it faults)."""
    sign = "+" if amx_usable() else "-"
    bf16 = "+" if amx_usable() and has_amx_bf16() else "-"
    return [sign + f for f in FEATURES] + [bf16 + BF16_FEATURE]


def without_amx(target: Target) -> Target:
    """``target`` with AMX turned off: the VNNI kernels then do all the int8 work."""
    spec = dict(target.export())
    spec["mattr"] = [a for a in spec.get("mattr", ()) if a.lstrip("+-") not in (*FEATURES, BF16_FEATURE)] + \
        ["-" + f for f in (*FEATURES, BF16_FEATURE)]
    return Target(spec)


def supports_amx(target: Target) -> bool:
    from tvm.target import codegen

    return supports_vbmi(target) and all(codegen.target_has_features(f, target) for f in FEATURES)


def supports_amx_bf16(target: Target) -> bool:
    from tvm.target import codegen

    return supports_amx(target) and codegen.target_has_features(BF16_FEATURE, target)


def addressable(*sizes: int) -> bool:
    """Whether buffers of these many elements are within the kernels' int32 offsets."""
    return max(sizes) < 2 ** 31


def k_chunks(groups: int) -> tuple[int, int]:
    """(steps, groups per step) to cover ``groups`` 4-byte groups of K with tile products of at
    most 16 groups (64 bytes) each, padding as little as possible."""
    steps = -(-groups // TILE)
    return steps, -(-groups // steps)


@dataclass(frozen=True)
class Gemm:
    """One AMX GEMM kernel's shape: ``out[b, m, n] = epilogue(sum_s A_s[m] . B_s[n])`` over
    ``steps`` tile products of ``kbytes`` bytes; the epilogue's per-channel parameters are
    indexed by ``m`` (``channel_axis`` 1) or ``n`` (2)."""
    batch: int
    m: int
    n: int
    steps: int
    kbytes: int
    a_size: int
    a_stride: int
    a_signed: bool
    b_size: int
    b_stride: int
    channel_axis: int
    requant: Requantize | None
    chunks: int  # parallel chunks of tasks (one tile configuration each)
    bf16: bool = False  # bfloat16 operands (2 per 4 bytes: tdpbf16ps), float32 accumulators, result + bias


def _intrin(name: str, *args) -> "tirx.PrimExpr":
    return T.call_llvm_intrin("void", f"llvm.x86.{name}", *args)


def gemm(shape: Gemm, a_offset: Callable, b_offset: Callable) -> tvm.tirx.PrimFunc:
    """The kernel ``(A, B, params, out)``: ``A``, ``B`` flat byte buffers read at
    ``a_offset(b, m0, s)`` and ``b_offset(b, n0, s)`` (byte offsets of the tile starting at row
    ``m0`` / column ``n0`` for step ``s``; column ``n0 + 16`` is 64 bytes on), ``params``
    ``[1 or 3, channels]`` (bias[, multiplier, shift]; float32 for bf16), ``out [batch, m, n]``."""
    g = shape
    assert g.m >= TILE and g.n >= BLOCK, "the GEMM needs 16 rows and 32 columns"
    assert addressable(g.a_size, g.b_size, g.batch * g.m * g.n), "offsets are int32"
    m_tiles = 2 if g.m >= BLOCK else 1  # accumulator tiles along M: 2 x 2, or 1 x 2 for 16-31 rows
    block_m = m_tiles * TILE
    m_blocks, n_blocks = -(-g.m // block_m), -(-g.n // BLOCK)
    tasks = g.batch * m_blocks * n_blocks
    chunks = max(1, min(g.chunks, tasks))
    per_chunk = -(-tasks // chunks)
    channels = g.m if g.channel_axis == 1 else g.n
    out_dtype = "float32" if g.bf16 else g.requant.dtype if g.requant else "int32"
    acc_dtype = "float32" if g.bf16 else "int32"
    product = "tdpbf16ps" if g.bf16 else "tdpbsud" if g.a_signed else "tdpbusd"
    a_dtype = "int8" if g.a_signed else "uint8"
    b_dtype = "uint8" if g.a_signed or g.bf16 else "int8"
    rows_of_b = g.kbytes // GROUP
    # tile configuration: palette 1; bytes per row (u16 at 16 + 2t) and rows (u8 at 48 + t):
    # tiles 0-3 the accumulators, 4-5 the A tiles, 6-7 the B tiles
    config = np.zeros(64, np.uint8)
    config[0] = 1
    for t, (row_bytes, rows) in enumerate([(ROW_BYTES, TILE)] * 4 + [(g.kbytes, TILE)] * 2 +
                                          [(ROW_BYTES, rows_of_b)] * 2):
        config[16 + 2 * t], config[48 + t] = row_bytes, rows
    config_words = [int(v) for v in config.view(np.uint64)]

    def epilogue(acc, m, n, params):
        channel = m if g.channel_axis == 1 else n
        if g.bf16:
            return acc + params[0, channel]
        return int_arith.epilogue(acc, channel, params, g.requant)

    @T.prim_func(private=True)
    def kernel(A: T.Buffer((g.a_size,), a_dtype),
               B: T.Buffer((g.b_size,), b_dtype),
               params: T.Buffer((3 if g.requant else 1, channels), acc_dtype),
               out: T.Buffer((g.batch, g.m, g.n), out_dtype)):
        T.func_attr({"tir.noalias": True})
        for chunk in T.parallel(chunks):
            cfg = T.alloc_buffer((8,), "uint64", scope="local")
            acc = T.alloc_buffer((block_m, BLOCK), acc_dtype, scope="local")
            for w in T.unroll(8):
                cfg[w] = T.uint64(0)
            cfg[0] = T.uint64(config_words[0])
            cfg[2] = T.uint64(config_words[2])
            cfg[3] = T.uint64(config_words[3])
            cfg[6] = T.uint64(config_words[6])
            T.evaluate(_intrin("ldtilecfg", T.address_of(cfg[0])))
            for task in range(chunk * per_chunk, T.min(chunk * per_chunk + per_chunk, tasks)):
                b = task // (m_blocks * n_blocks)
                m0 = T.min(task // n_blocks % m_blocks * block_m, g.m - block_m)
                n0 = T.min(task % n_blocks * BLOCK, g.n - BLOCK)
                for t in T.unroll(2 * m_tiles):  # accumulator (row t // 2, column t % 2)
                    T.evaluate(_intrin("tilezero", T.Cast("int8", t)))
                for s in range(g.steps):
                    for t in T.unroll(m_tiles):  # A tiles: 4, 5
                        T.evaluate(_intrin("tileloadd64", T.Cast("int8", 4 + t),
                                           T.address_of(A[a_offset(b, m0, s) + t * TILE * g.a_stride]),
                                           T.int64(g.a_stride)))
                    for t in T.unroll(2):  # B tiles: 6, 7
                        T.evaluate(_intrin("tileloadd64", T.Cast("int8", 6 + t),
                                           T.address_of(B[b_offset(b, n0, s) + t * ROW_BYTES]), T.int64(g.b_stride)))
                    for t in T.unroll(2 * m_tiles):
                        T.evaluate(_intrin(product, T.Cast("int8", t), T.Cast("int8", 4 + t // 2),
                                           T.Cast("int8", 6 + t % 2)))
                for t in T.unroll(2 * m_tiles):
                    T.evaluate(_intrin("tilestored64", T.Cast("int8", t),
                                       T.address_of(acc[t // 2 * TILE, t % 2 * TILE]), T.int64(BLOCK * 4)))
                for r in range(block_m):
                    for c in T.vectorized(BLOCK):
                        out[b, m0 + r, n0 + c] = epilogue(acc[r, c], m0 + r, n0 + c, params)
            T.evaluate(_intrin("tilerelease"))

    return mark_opaque(kernel)


@functools.cache
def conv(batch: int, blocks: int, geometry: FlatGeometry, out_channels: int, kernel: tuple[int, int],
         strides: tuple[int, int], out_height: int, requant: Requantize | None, chunks: int,
         bf16: bool = False) -> tvm.tirx.PrimFunc:
    """``out[b, o, p] = epilogue(sum W[o, i, j, c] X[b, c, i % sh, j % sw, p + (i // sh) * row + j // sw])``
    for ``p < out_height * row`` over the input of ``x86_int8.to_blocked_flat`` (``blocks`` 4-channel
    blocks, a whole number of :func:`k_chunks` steps) and the weights of :func:`pack_conv_weight`;
    columns ``x >= ow`` of each output row included, for the caller to drop."""
    (kh, kw), (sh, sw), row = kernel, strides, geometry.row
    steps, per_step = k_chunks(blocks)
    assert steps * per_step == blocks, "pad the input channels to whole tile products"
    kbytes, plane = per_step * GROUP, geometry.length * GROUP
    a_stride = kh * kw * steps * kbytes

    def a_offset(b, m0, s):
        return m0 * a_stride + s * kbytes

    def b_offset(b, n0, s):
        tap, c = s // steps, s % steps
        i, j = tap // kw, tap % kw
        return ((((b * blocks + c * per_step) * sh + i % sh) * sw + j % sw) * plane
                + (n0 + i // sh * row + j // sw) * GROUP)

    shape = Gemm(batch, out_channels, out_height * row, kh * kw * steps, kbytes, out_channels * a_stride, a_stride, True,
                 batch * blocks * sh * sw * plane, sh * sw * plane, 1, requant, chunks, bf16)
    return gemm(shape, a_offset, b_offset)


def pack_conv_weight(w: np.ndarray, blocks: int) -> np.ndarray:
    """``[O, C, kh, kw]`` -> flat ``[O, kh, kw, 4 * blocks]`` (channels past C zero): A's rows;
    float32 weights of bf16 values -> the bytes of ``[O, kh, kw, 2 * blocks]`` bf16 (a block is
    then two channels), as int8 for the kernel's A buffer."""
    out_channels, channels, kh, kw = w.shape
    bf16 = w.dtype == np.float32
    packed = np.zeros((out_channels, kh, kw, blocks * (2 if bf16 else GROUP)), np.uint16 if bf16 else np.int8)
    packed[..., :channels] = bf16_bits(w.transpose(0, 2, 3, 1)) if bf16 else w.transpose(0, 2, 3, 1)
    return packed.view(np.int8).reshape(-1)


@functools.cache
def dense(rows: int, n: int, k_groups: int, requant: Requantize | None, chunks: int,
          bf16: bool = False) -> tvm.tirx.PrimFunc:
    """``out[0, m, j] = epilogue(sum_k x[m, k] w[k, j])`` for activations ``x [rows, K']``
    (``K'`` bytes, ``k_groups`` 4-byte groups, a whole number of :func:`k_chunks` steps) and
    the weights of :func:`pack_dense_weight`: unsigned bytes and int8 weights, or with ``bf16``
    bfloat16 bit patterns (two per group) and float32 weights packed as bf16, summed
    in float32 plus the bias (``requant`` None)."""
    steps, per_step = k_chunks(k_groups)
    assert steps * per_step == k_groups, "pad K to whole tile products"
    kbytes = per_step * GROUP
    k_padded = steps * kbytes

    def a_offset(b, m0, s):
        return m0 * k_padded + s * kbytes

    def b_offset(b, n0, s):
        return s * per_step * n * GROUP + n0 * GROUP

    shape = Gemm(1, rows, n, steps, kbytes, rows * k_padded, k_padded, False, k_padded * n, n * GROUP, 2, requant,
                 chunks, bf16)
    return gemm(shape, a_offset, b_offset)


def pack_dense_weight(w: np.ndarray, k_padded: int) -> np.ndarray:
    """``[N, K]`` -> flat ``[K'/4, N, 4]`` (rows past K zero): B's VNNI layout, any 16 columns
    one tile; float32 weights of bf16 values -> the bytes of ``[K'/2, N, 2]`` bf16 (a 4-byte
    group is then two values)."""
    n, k = w.shape
    bf16 = w.dtype == np.float32
    per_group = 2 if bf16 else GROUP
    packed = np.zeros((n, k_padded), np.uint16 if bf16 else np.int8)
    packed[:, :k] = bf16_bits(w) if bf16 else w
    grouped = packed.reshape(n, k_padded // per_group, per_group).transpose(1, 0, 2)
    return np.ascontiguousarray(grouped).view(np.uint8 if bf16 else np.int8).reshape(-1)


def bf16_bits(w: np.ndarray) -> np.ndarray:
    """float32 values already rounded to bfloat16 -> their bf16 bit patterns (uint16)."""
    bits = np.ascontiguousarray(w, np.float32).view(np.uint32)
    assert not np.any(bits & 0xFFFF), "values not rounded to bfloat16"
    return (bits >> 16).astype(np.uint16)


def taps_in_k(channels: int, kernel_width: int) -> bool:
    """Whether a convolution with few channels puts a kernel row's taps in K (:func:`conv_tap_rows`):
    one tile product per kernel row, of ``kw`` times the 4-channel blocks."""
    return channels < MIN_CHANNELS and kernel_width * -(-channels // GROUP) <= TILE


@functools.cache
def tap_rows(batch: int, blocks: int, geometry: FlatGeometry, kernel: tuple[int, int], strides: tuple[int, int],
             out_hw: tuple[int, int]) -> tvm.tirx.PrimFunc:
    """``x86_int8.to_blocked_flat``'s planes ``[B, blocks, sh, sw, rows', row]`` -> ``[B, kw, blocks,
    sh, oh + (kh - 1) // sh, ow]`` words: plane ``(j, g, qr)`` holds, at ``(r, x)``, the padded
    image's ``(r*sh + qr, x*sw + j)`` (column phase ``j % sw`` at ``x + j // sw``). Rows of ``ow``
    outputs exactly, so that a kernel row's taps are ``kw`` tile rows at one offset."""
    from tvm.s_tir import Schedule

    (kh, kw), (sh, sw), (oh, ow) = kernel, strides, out_hw
    planes = te.placeholder((batch, blocks, sh, sw, geometry.length // geometry.row, geometry.row), "uint32", name="x")
    out = te.compute((batch, kw, blocks, sh, oh + (kh - 1) // sh, ow),
                     lambda b, j, g, qr, r, x: planes[b, g, qr, j % sw, r, x + j // sw], name="out")
    sch = Schedule(te.create_prim_func([planes, out]))
    b, j, g, qr, r, x = sch.get_loops(sch.get_sblock("out"))
    sch.parallel(sch.fuse(b, j, g, qr))
    sch.vectorize(x)
    return opaque(sch)


@functools.cache
def conv_tap_rows(batch: int, blocks: int, out_channels: int, kernel: tuple[int, int], strides: tuple[int, int],
                  out_hw: tuple[int, int], requant: Requantize | None, chunks: int) -> tvm.tirx.PrimFunc:
    """``out[b, o, y * ow + x] = epilogue(sum_i W[o, i, (j, g, c4)] X[b, (j, g), i % sh, y + i // sh,
    x][c4])`` over :func:`tap_rows`' input and :func:`pack_conv_weight`'s weights: one tile product
    of ``kw * blocks`` 4-byte rows per kernel row (ResNet's first 7x7: 28 of 64 bytes, where one
    per tap would fill 4). The output is NCHW, nothing to drop."""
    (kh, kw), (sh, _), (oh, ow) = kernel, strides, out_hw
    groups = kw * blocks
    kbytes, plane = groups * GROUP, (oh + (kh - 1) // sh) * ow * GROUP

    def a_offset(b, m0, s):
        return m0 * kh * kbytes + s * kbytes

    def b_offset(b, n0, s):
        return (b * groups * sh + s % sh) * plane + (n0 + s // sh * ow) * GROUP

    shape = Gemm(batch, out_channels, oh * ow, kh, kbytes, out_channels * kh * kbytes, kh * kbytes, True,
                 batch * groups * sh * plane, sh * plane, 1, requant, chunks)
    return gemm(shape, a_offset, b_offset)
