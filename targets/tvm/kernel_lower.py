"""Convolutions, linears and max pooling lowered onto the hand-scheduled CPU kernels: integer
ones onto the VNNI kernels of ``x86_int8``, float ones onto ``cpu_float``, pooling onto
``cpu_pool``; their inputs re-laid out by ``layout`` kernels.

The identity used: with activations ``x`` (zero point ``z``) and weights ``w`` (zero point 0),
``sum_k (x - z) * w = sum_k x * w - z * sum_k w``. The second term is a per-output-channel
constant folded into the int32 bias at compile time, so the product runs on the raw bytes.
Signed activations are shifted to unsigned (``x + 128``, ``z + 128``), since VNNI multiplies
u8 by s8. A convolution is that product over its input padded with ``z`` (contributing
``(z - z) * w = 0``): read directly in 4-channel blocks (``conv_direct_u8s8``), or, for output
rows narrower than 14, flattened across rows (``conv_flat_u8s8``); dilated ones through an
im2col matrix; depthwise convolutions along output rows (``vpermb`` windows where the CPU has
AVX-512 VBMI). On AVX2 without VNNI (``"avx2"``) the same products run on ``vpmaddwd``
(``x86_int8.AVX2_DOT``): linears, attention products and im2col convolutions (the direct and
flat kernels read VNNI's 4-channel blocks), depthwise convolutions on the int16 kernel.

When the accumulator's only reader is a ``requantize`` with constant parameters, the kernel
does it in its epilogue and the ``requantize`` node lowers to that result. Results are
bit-exact with the interpreter's kernels."""
from __future__ import annotations

import numpy as np
from tvm import relax, te, tirx

from qcompiler.ir import Node, Value
from qcompiler.ir.packing import Int4Groups
from qcompiler.ir.types import DTYPES

from . import cpu_float, cpu_pool, layout
from .lowering import ConvGeometry, Fused, Lowerer
from .int_arith import Requantize
from .tiling import DENSE_ROWS, LANES, MAX_ACCUMULATORS, NARROW_DENSE_ROWS, padded
from .x86_int8 import (AVX2_DOT, GROUP, MAX_SLIDING_STRIDE, VNNI_DOT, WORD, DotProduct, FlatGeometry, as_unsigned,
                       batch_matmul_u8s8, conv_direct_u8s8, conv_flat_u8s8, conv_u8s8, dense_u8s4, dense_u8s4_vnni,
                       dense_u8s8, depthwise_sliding_u8s8, depthwise_u8s8, im2col_packed, pack_dense_int4,
                       pack_dense_int4_vnni, pack_dense_weight, pack_sliding_weight, to_blocked_flat,
                       to_blocked_phases, window_load)


R = relax.op
DIRECT_MIN_WIDTH = 14  # narrower output rows waste most of a 16-lane strip: the flat kernel packs them better


def applies(low: Lowerer, node: Node) -> bool:
    """u8/i8 activations with one zero point, constant i8 weights with zero points 0."""
    x, x_zp, w, w_zp = node.inputs[:4]
    if node.op == "conv2d_int" and node.attrs["groups"] != 1 and not _is_depthwise(node):
        return False
    return (x.dtype in ("u8", "i8") and w.dtype == "i8" and x_zp.is_constant and x_zp.type.rank == 0
            and w.is_constant and w_zp.is_constant and not low.array(w_zp).any())


def _is_depthwise(node: Node) -> bool:
    channels, groups = node.inputs[0].shape[1], node.attrs["groups"]
    return groups == channels == node.output.shape[1] and tuple(node.attrs["dilations"]) == (1, 1)


def activation_zero_point(low: Lowerer, node: Node) -> tuple[int, bool]:
    """The zero point in the unsigned domain, and whether activations need the +128 shift."""
    signed = node.inputs[0].dtype == "i8"
    return int(low.array(node.inputs[1])) + (128 if signed else 0), signed


def _absorbed_requantize(low: Lowerer, node: Node, channel_axis: int) -> Node | None:
    """The requantize matched after the product (``Lowerer.requantize_after``) where its
    parameters are per tensor or along this kernel's channel axis."""
    req = low.requantize_after(node)
    if req is None:
        return None
    rank = node.output.type.rank
    if req.inputs[1].type.rank == 1 and req.attrs["axis"] % rank != channel_axis % rank:
        return None
    return req


def epilogue_arrays(low: Lowerer, node: Node, bias: np.ndarray, channels: int, padded_channels: int,
                    channel_axis: int) -> tuple[list[np.ndarray], Requantize | None, Node | None]:
    """The epilogue's per-channel int32 parameters (bias, and multiplier and shift when a
    requantize is absorbed), zero past ``channels``."""
    def per_channel(values: np.ndarray) -> np.ndarray:
        full = np.zeros(padded_channels, np.int32)
        full[:channels] = np.broadcast_to(values, (channels,))
        return full

    arrays = [per_channel(bias.astype(np.int32))]
    req = _absorbed_requantize(low, node, channel_axis)
    if req is None:
        return arrays, None, None
    zp = req.inputs[-1]
    info = np.iinfo(DTYPES[zp.dtype])
    float32 = req.op == "requantize_f32"
    requant = Requantize(req.attrs["input_zero_point"], int(low.array(zp)), max(int(info.min), req.attrs["min"]),
                         min(int(info.max), req.attrs["max"]), np.dtype(DTYPES[zp.dtype]).name, float32)
    if float32:  # the scale's bits in the multiplier's row (the kernels take one int32 parameter array)
        arrays += [per_channel(np.asarray(low.array(req.inputs[1]), np.float32).view(np.int32)),
                   np.zeros(padded_channels, np.int32)]
    else:
        arrays += [per_channel(low.array(req.inputs[1])), per_channel(low.array(req.inputs[2]))]
    return arrays, requant, req


def epilogue_args(low: Lowerer, node: Node, bias: np.ndarray, channels: int, padded_channels: int,
                  channel_axis: int) -> tuple[list[relax.Expr], Requantize | None, Node | None]:
    """:func:`epilogue_arrays` as constant kernel arguments."""
    arrays, requant, req = epilogue_arrays(low, node, bias, channels, padded_channels, channel_axis)
    return [low.const(a) for a in arrays], requant, req


def folded_bias(low: Lowerer, node: Node, w2d: np.ndarray, zp: int) -> np.ndarray | None:
    """``bias - z * sum_k w`` (int64; wraps to int32 as the accumulator does)."""
    if len(node.inputs) > 4 and not node.inputs[4].is_constant:
        return None
    total = -zp * w2d.astype(np.int64).sum(axis=1)
    if len(node.inputs) > 4:
        total = total + low.array(node.inputs[4]).astype(np.int64).reshape(-1)
    return total.astype(np.int32)


def call_kernel(low: Lowerer, func, name: str, args: list[relax.Expr], shape: tuple[int, ...],
                dtype: str) -> relax.Expr:
    return low.emit(relax.call_tir(low.bb.add_func(func, name), args, relax.TensorType(shape, dtype)))


def result_dtype(requant: Requantize | None) -> str:
    """What an integer kernel writes: the requantized bytes, or the int32 accumulator."""
    return requant.dtype if requant else "int32"


def dot_product(low: Lowerer) -> DotProduct:
    """The instruction this target's kernels sum products with."""
    return AVX2_DOT if low.int8_variant == "avx2" else VNNI_DOT


def four_bit_groups(low: Lowerer, weight: Value) -> Int4Groups | None:
    """How ``weight`` is stored when it is 4-bit in groups a pair of inputs never straddles."""
    storage = low.graph.storage.get(weight.name)
    return storage if storage is not None and storage.group_size % 2 == 0 else None


def _dense_columns(n: int) -> int:
    """Output columns of a VNNI dense product, padded to its register blocks (1 or 2 x 16 lanes)."""
    return padded(n, 2 * LANES if n > LANES else LANES)


def unsigned_rows(low: Lowerer, rows: relax.Expr, k: int, k_padded: int, signed: bool) -> relax.Expr:
    """``[M, K]`` activations as VNNI's unsigned operand ``[M, K']`` (int8 shifted by +128),
    zero past ``K`` (their weights are zero); ``rows`` itself when nothing changes."""
    if not signed and k_padded == k:
        return rows
    return low.bb.emit_te(lambda t: te.compute((t.shape[0], k_padded), lambda i, j: tirx.if_then_else(
        j < k, as_unsigned(t[i, tirx.min(j, k - 1)], signed), tirx.const(0, "uint8")), name="to_u8"), rows,
        primfunc_name_hint="to_u8")


def kernel_result(y: relax.Expr, req: Node | None) -> relax.Expr | Fused:
    """``y``, which stands for the absorbed requantize's result too when there is one."""
    return y if req is None else Fused(y, req)


def linear(low: Lowerer, node: Node, xs: list[relax.Expr]) -> relax.Expr | Fused | None:
    x = node.inputs[0]
    w2d = low.array(node.inputs[2])
    zp, signed = activation_zero_point(low, node)
    bias = folded_bias(low, node, w2d, zp)
    if bias is None:
        return None
    n, k = w2d.shape
    dot = dot_product(low)
    rows = int(np.prod(x.shape[:-1], dtype=np.int64))
    four_bit = four_bit_groups(low, node.inputs[2])
    n_padded, k_padded = _dense_columns(n), padded(k, four_bit.group_size if four_bit else dot.group)
    a = unsigned_rows(low, low.emit(R.reshape(xs[0], (rows, k))), k, k_padded, signed)
    args, requant, req = epilogue_args(low, node, bias, n, n_padded, -1)
    if four_bit:  # kept 4-bit in the library, unpacked in the register
        g = four_bit.group_size
        if dot is VNNI_DOT and g % GROUP == 0:
            codes, multipliers = pack_dense_int4_vnni(w2d, four_bit.multipliers(w2d), g, n_padded, k_padded)
            func, name = dense_u8s4_vnni(rows, n, n_padded, k_padded, g, requant), "vnni_dense_4bit"
        else:  # AVX2's kernel (every x86 variant has AVX2): groups of an even size
            codes, multipliers = pack_dense_int4(w2d, four_bit.multipliers(w2d), g, n_padded, k_padded)
            func, name = dense_u8s4(rows, n, n_padded, k_padded, g, requant), "avx2_dense_4bit"
        weights = [low.const(codes), low.const(multipliers)]
    else:
        func = dense_u8s8(rows, n, n_padded, k_padded, requant, dot)
        weights, name = [low.const(pack_dense_weight(w2d, n_padded, k_padded, dot.group))], f"{dot.name}_dense"
    y = call_kernel(low, func, name, [a, *weights, *args], (rows, n), result_dtype(requant))
    return kernel_result(low.emit(R.reshape(y, x.shape[:-1] + (n,))), req)


def matmul_applies(low: Lowerer, node: Node) -> bool:
    """8-bit operands with constant per-tensor zero points, the same batch dimensions."""
    a, a_zp, b, b_zp = node.inputs
    return (a.dtype in ("u8", "i8") and b.dtype in ("u8", "i8") and a_zp.is_constant and b_zp.is_constant
            and a_zp.type.rank == 0 and b_zp.type.rank == 0 and a.type.rank >= 2
            and tuple(a.shape[:-2]) == tuple(b.shape[:-2]))


def matmul(low: Lowerer, node: Node, xs: list[relax.Expr]) -> relax.Expr | Fused:
    """``sum_k (a - za)(b - zb)`` of two runtime operands on VNNI. With ``a`` as unsigned bytes
    ``a'`` (zero point ``za'``) and ``b`` as signed ``b'`` (``b - 128`` when unsigned; ``zb'``):
    ``sum a'b' - za' sum_k b' - zb' sum_k a' + K za' zb'``. ``b'`` is packed per batch item
    and its column sums taken at run time (one kernel, fused with ``b``'s producer by Relax),
    as are the row sums of ``a'``; the product kernel adds both in its epilogue."""
    a, b = node.inputs[0], node.inputs[2]
    *batch_dims, m, k = a.shape
    n = b.shape[-1]
    batch = int(np.prod(batch_dims, dtype=np.int64))
    za, a_signed = activation_zero_point(low, node)
    b_unsigned = b.dtype == "u8"
    zb = int(low.array(node.inputs[3])) - (128 if b_unsigned else 0)
    dot = dot_product(low)
    group = dot.group
    n_padded, k_padded = _dense_columns(n), padded(k, group)

    def b_signed(t: te.Tensor, kk, j) -> tirx.PrimExpr:
        return t[kk, j].astype("int32") - (128 if b_unsigned else 0)

    def b_packed(t: te.Tensor) -> te.Tensor:  # [batch, N'/16, K'/g, 16, g] int8
        def element(bi, jb, kb, ji, ki):
            kk, j = kb * group + ki, jb * LANES + ji
            inside = tirx.all(kk < k, j < n)
            return tirx.if_then_else(inside, b_signed(t[bi], tirx.min(kk, k - 1), tirx.min(j, n - 1)),
                                     0).astype("int8")
        return te.compute((batch, n_padded // LANES, k_padded // group, LANES, group), element, name="b_s8")

    def column_term(t: te.Tensor) -> te.Tensor:  # -za' sum_k b' + K za' zb'
        r = te.reduce_axis((0, k), name="k")
        sums = te.compute((batch, n_padded), lambda bi, j: te.sum(
            b_signed(t[bi], r, tirx.min(j, n - 1)), axis=r), name="col_sum")
        return te.compute((batch, n_padded), lambda bi, j: tirx.if_then_else(
            j < n, sums[bi, j] * (-za) + k * za * zb, 0), name="col")

    def row_term(t: te.Tensor) -> te.Tensor:  # -zb' sum_k a' (over a' already unsigned)
        r = te.reduce_axis((0, k), name="k")
        sums = te.compute((batch * m,), lambda i: te.sum(t[i, r].astype("int32"), axis=r), name="row_sum")
        return te.compute((batch * m,), lambda i: sums[i] * (-zb), name="row")

    a_rows = unsigned_rows(low, low.emit(R.reshape(xs[0], (batch * m, k))), k, k_padded, a_signed)
    b_items = low.emit(R.reshape(xs[2], (batch, k, n)))
    operands = [a_rows, low.bb.emit_te(b_packed, b_items, primfunc_name_hint="b_s8"),
                low.bb.emit_te(column_term, b_items, primfunc_name_hint="col_term"),
                low.bb.emit_te(row_term, a_rows, primfunc_name_hint="row_term")]
    args, requant, req = epilogue_args(low, node, np.zeros(n, np.int32), n, n_padded, -1)
    y = call_kernel(low, batch_matmul_u8s8(batch, m, n, n_padded, k_padded, requant, dot), f"{dot.name}_matmul",
                    [*operands, *args], (batch * m, n), result_dtype(requant))
    return kernel_result(low.emit(R.reshape(y, tuple(node.output.shape))), req)


def conv2d(low: Lowerer, node: Node, xs: list[relax.Expr]) -> relax.Expr | Fused | None:
    g = ConvGeometry.of(node)
    zp, signed = activation_zero_point(low, node)
    w2d = low.array(node.inputs[2]).reshape(g.out_channels, -1)
    bias = folded_bias(low, node, w2d, zp)
    if bias is None:
        return None
    if g.groups != 1:
        return _depthwise(low, node, g, xs, zp, w2d, bias)
    dot = dot_product(low)
    if g.dilations == (1, 1):
        if g.ow >= DIRECT_MIN_WIDTH:
            return _direct_conv2d(low, node, g, xs, zp, signed, bias, dot)
        flat = None if dot is AVX2_DOT else _flat_conv2d(low, node, g, xs, zp, signed, bias)  # VNNI blocks only
        if flat is not None:
            return flat
    k_padded = padded(w2d.shape[1], dot.group)
    im2col = im2col_packed(g.batch, g.channels, g.height, g.width, (g.kh, g.kw), g.strides, g.dilations, g.pads,
                           zp, signed, dot.group)
    a = call_kernel(low, im2col, f"{dot.name}_im2col", [xs[0]],
                    (g.batch, padded(g.oh * g.ow, LANES) // LANES, k_padded // dot.group, LANES, dot.group), "uint8")
    weight = np.zeros((g.out_channels, k_padded), dot.conv_weight)
    weight[:, :w2d.shape[1]] = w2d
    args, requant, req = epilogue_args(low, node, bias, g.out_channels, g.out_channels, 1)
    y = call_kernel(low, conv_u8s8(g.batch, g.out_channels, g.oh * g.ow, k_padded, requant, dot), f"{dot.name}_conv2d",
                    [a, low.const(weight), *args], (g.batch, g.out_channels, g.oh * g.ow),
                    result_dtype(requant))
    return kernel_result(low.emit(R.reshape(y, (g.batch, g.out_channels, g.oh, g.ow))), req)


def _direct_conv2d(low: Lowerer, node: Node, g: ConvGeometry, xs: list[relax.Expr], zp: int, signed: bool,
                   bias: np.ndarray, dot: DotProduct) -> relax.Expr | Fused:
    """The input once re-laid out (padded with the zero point, channel blocks, column phases),
    then the direct kernel: one pass over the input instead of an im2col copy of kh*kw times it."""
    stride, group = g.strides[1], dot.group
    top, left, bottom, right = cpu_float.conv_input_padding(g.width, g.pads, g.ow, g.kw, stride)
    blocks = padded(g.channels, group) // group
    padded_h, padded_w = g.height + top + bottom, g.width + left + right
    layout = to_blocked_phases(g.batch, g.channels, g.height, g.width, (top, left, bottom, right), stride, zp, signed,
                               group)
    x = _blocked_input(low, layout, xs[0], (g.batch, blocks, padded_h, stride, padded_w // stride), group=group)
    args, requant, req = epilogue_args(low, node, bias, g.out_channels, g.out_channels, 1)
    func = conv_direct_u8s8(g.batch, blocks, (padded_h, padded_w), g.out_channels, (g.kh, g.kw), g.strides,
                            (g.oh, g.ow), requant, dot)
    weight = low.const(_packed_conv_weight(low.array(node.inputs[2]), blocks, group, dot.conv_weight))
    y = call_kernel(low, func, f"{dot.name}_conv2d_direct", [x, weight, *args],
                    (g.batch, g.out_channels, g.oh, g.ow), result_dtype(requant))
    return kernel_result(y, req)


def _blocked_input(low: Lowerer, layout, x: relax.Expr, shape: tuple[int, ...],
                   words_shape: tuple[int, ...] = (), group: int = GROUP) -> relax.Expr:
    """The layout kernel's words (``group`` channel bytes each; ``words_shape``, by default
    ``shape``), viewed as the bytes the convolution kernels read: ``shape + (group,)``."""
    name = "vnni_conv2d_input" if group == GROUP else "avx2_conv2d_input"
    words = call_kernel(low, layout, name, [x], words_shape or shape, WORD[group])
    return low.emit(R.memory.view(words, shape=shape + (group,), dtype="uint8"))


def _packed_conv_weight(w: np.ndarray, blocks: int, group: int = GROUP, dtype: str = "int8") -> np.ndarray:
    """``[O, C, kh, kw]`` -> ``[O, C'/g, kh, kw, g]`` (the extra channels zero)."""
    out_channels, channels, kh, kw = w.shape
    packed = np.zeros((out_channels, blocks * group, kh, kw), dtype)
    packed[:, :channels] = w
    return np.ascontiguousarray(packed.reshape(out_channels, blocks, group, kh, kw).transpose(0, 1, 3, 4, 2))


def _flat_conv2d(low: Lowerer, node: Node, g: ConvGeometry, xs: list[relax.Expr], zp: int, signed: bool,
                 bias: np.ndarray) -> relax.Expr | Fused | None:
    """Narrow outputs: the input re-laid out flat (``x86_int8.FlatGeometry``), then one register
    tile over all positions of a few channels; None where they would not fit a tile."""
    geometry = FlatGeometry.of(g.width, g.pads, (g.kh, g.kw), g.strides, (g.oh, g.ow))
    if geometry.positions // LANES > MAX_ACCUMULATORS:
        return None
    blocks = padded(g.channels, GROUP) // GROUP
    layout = to_blocked_flat(g.batch, g.channels, g.height, g.width, g.pads, g.strides, geometry, zp, signed)
    x = _blocked_input(low, layout, xs[0], (g.batch, blocks, *g.strides, geometry.length),
                      (g.batch, blocks, *g.strides, geometry.length // geometry.row, geometry.row))
    args, requant, req = epilogue_args(low, node, bias, g.out_channels, g.out_channels, 1)
    func = conv_flat_u8s8(g.batch, blocks, geometry, g.out_channels, (g.kh, g.kw), g.strides, (g.oh, g.ow), requant)
    row = geometry.row
    weight = low.const(_packed_conv_weight(low.array(node.inputs[2]), blocks))
    y = call_kernel(low, func, "vnni_conv2d_flat", [x, weight, *args],
                    (g.batch, g.out_channels, g.oh * row), result_dtype(requant))
    y = low.emit(R.reshape(y, (g.batch, g.out_channels, g.oh, row)))
    return kernel_result(low.emit(R.strided_slice(y, axes=[3], begin=[0], end=[g.ow])), req)


def _depthwise(low: Lowerer, node: Node, g: ConvGeometry, xs: list[relax.Expr], zp: int, w2d: np.ndarray,
               bias: np.ndarray) -> relax.Expr | Fused:
    batch, channels, oh, ow, kh, kw, strides = g.batch, g.channels, g.oh, g.ow, g.kh, g.kw, g.strides
    sliding = low.int8_variant in ("vnni-vbmi", "amx") and kw <= GROUP and strides[1] <= MAX_SLIDING_STRIDE
    if sliding:  # reads unsplit rows; the last strip loads window_load bytes
        reach = max(kw, window_load(strides[1]) - (LANES - 1) * strides[1])
        x, padded_hw = _phase_split(low, xs[0], node, (kh, kw), reach, zp, to_unsigned=True, split=False)
    else:
        x, padded_hw = _phase_split(low, xs[0], node, (kh, kw), kw, zp, to_unsigned=True)
    args, requant, req = epilogue_args(low, node, bias, channels, channels, 1)
    w3d = w2d.reshape(channels, kh, kw)
    if sliding:
        func = depthwise_sliding_u8s8(batch, channels, padded_hw, (kh, kw), strides, (oh, ow), requant)
        name, weight = "vnni_depthwise_sliding", low.const(pack_sliding_weight(w3d))
    else:
        func = depthwise_u8s8(batch, channels, padded_hw, (kh, kw), strides, (oh, ow), requant)
        name, weight = "vnni_depthwise", low.const(w3d.astype(np.int16))
    y = call_kernel(low, func, name, [x, weight, *args], (batch, channels, oh, ow),
                    result_dtype(requant))
    return kernel_result(y, req)


def _phase_split(low: Lowerer, x: relax.Expr, node: Node, kernel: tuple[int, int], reach: int, fill: float | int,
                 to_unsigned: bool = False, split: bool = True) -> tuple[relax.Expr, tuple[int, int]]:
    """``x`` padded with ``fill`` for row-strip kernels and split into column phases ``[b, c, h,
    phase, column // stride]`` (one phase unless ``split``), and the padded (h, w): wide enough
    for the last 16-wide output strip to read ``reach`` columns (``cpu_float.conv_input_padding``),
    tall enough for the last output row's window. ``to_unsigned``: int8 shifted to uint8
    (``fill`` already is)."""
    batch, channels, height, width = node.inputs[0].shape
    _, _, out_h, out_w = node.output.shape
    stride_h, stride = node.attrs["strides"]
    top, left, bottom, right = cpu_float.conv_input_padding(width, tuple(node.attrs["pads"]), out_w, reach, stride)
    bottom = max(bottom, (out_h - 1) * stride_h + kernel[0] - height - top)  # pooling's ceil mode
    padded_h, padded_w = height + top + bottom, width + left + right
    phases = stride if split else 1
    dtype = np.dtype(DTYPES[node.inputs[0].dtype]).name
    func = layout.phase_split(batch, channels, height, width, (top, left, bottom, right), phases, fill, dtype,
                              to_unsigned)
    shape = (batch, channels, padded_h, phases, padded_w // phases)
    out_dtype = "uint8" if to_unsigned else dtype
    return call_kernel(low, func, "phase_split", [x], shape, out_dtype), (padded_h, padded_w)


def max_pool_applies(node: Node) -> bool:
    return node.op == "max_pool2d" and tuple(node.attrs["dilations"]) == (1, 1)


def max_pool(low: Lowerer, node: Node, xs: list[relax.Expr]) -> relax.Expr:
    """Max pooling along output rows over an input padded with the dtype's lowest value (which
    never wins: every window holds an element of the image)."""
    batch, channels = node.inputs[0].shape[:2]
    _, _, oh, ow = node.output.shape
    kernel, strides = tuple(node.attrs["kernel"]), tuple(node.attrs["strides"])
    dtype = np.dtype(DTYPES[node.inputs[0].dtype])
    lowest = float("-inf") if dtype.kind == "f" else int(np.iinfo(dtype).min)
    strip_end = padded(ow, cpu_pool.lanes(dtype.name, ow))  # its strips can be wider than 16 for bytes
    reach = (strip_end - padded(ow, LANES)) * strides[1] + kernel[1]
    x, padded_hw = _phase_split(low, xs[0], node, kernel, reach, lowest)
    func = cpu_pool.max_pool_rows(batch, channels, padded_hw, kernel, strides, (oh, ow), dtype.name)
    return call_kernel(low, func, "cpu_max_pool", [x], (batch, channels, oh, ow), dtype.name)


def _clamp(node: Node) -> tuple[cpu_float.Clamp, bool]:
    """The fused activation as a clamp the kernel applies, and whether one remains to apply after."""
    act, args = node.attrs["activation"], node.attrs["activation_args"]
    if act == "none":
        return None, False
    if act == "relu":
        return (0.0, float("inf")), False
    if act == "clip":
        return (float(args[0]), float(args[1])), False
    return None, True


def float_applies(low: Lowerer, node: Node) -> bool:
    """Float32 data, constant weights and bias; convolutions ungrouped 2-D without dilation."""
    if node.inputs[0].dtype != "f32" or not all(v.is_constant and v.dtype == "f32" for v in node.inputs[1:]):
        return False
    return node.op == "linear" or (node.op == "conv2d" and node.attrs["groups"] == 1
                                   and tuple(node.attrs["dilations"]) == (1, 1))


def _float_bias(low: Lowerer, node: Node, channels: int, padded_channels: int) -> relax.Expr:
    bias = np.zeros(padded_channels, np.float32)
    if len(node.inputs) > 2:
        bias[:channels] = low.array(node.inputs[2]).reshape(-1)
    return low.const(bias)


def _wide_vectors(low: Lowerer) -> bool:
    """Whether the target has AVX-512's 32 registers of 16 float32 lanes (an AVX2 CPU has 16
    registers of 8: a 16-lane accumulator takes two, so its register tiles are a quarter)."""
    return low.int8_variant in ("amx", "vnni", "vnni-vbmi")


def float_linear(low: Lowerer, node: Node, xs: list[relax.Expr]) -> tuple[relax.Expr, bool]:
    """``clamp(x . w^T + b)``, and whether the node's activation is still to be applied."""
    x = node.inputs[0]
    w = low.array(node.inputs[1])
    n, k = w.shape
    rows = int(np.prod(x.shape[:-1], dtype=np.int64))
    n_padded = _dense_columns(n)
    clamp, rest = _clamp(node)
    tile_rows = DENSE_ROWS if _wide_vectors(low) else NARROW_DENSE_ROWS
    y = call_kernel(low, cpu_float.dense_f32(rows, n, n_padded, k, clamp, tile_rows), "cpu_dense_float",
                    [low.emit(R.reshape(xs[0], (rows, k))), low.const(cpu_float.pack_dense_weight(w, n_padded)),
                     _float_bias(low, node, n, n_padded)], (rows, n), "float32")
    return low.emit(R.reshape(y, x.shape[:-1] + (n,))), rest


def float_conv2d(low: Lowerer, node: Node, xs: list[relax.Expr]) -> tuple[relax.Expr, bool]:
    """Direct convolution over an input padded once; returns as :func:`float_linear`."""
    batch, channels, height, width = node.inputs[0].shape
    out_channels, _, kh, kw = node.inputs[1].shape
    _, _, oh, ow = node.output.shape
    x, padded_hw = _phase_split(low, xs[0], node, (kh, kw), kw, 0.0)
    clamp, rest = _clamp(node)
    func = cpu_float.conv2d_f32(batch, channels, padded_hw, out_channels, (kh, kw), tuple(node.attrs["strides"]),
                                (oh, ow), clamp, MAX_ACCUMULATORS if _wide_vectors(low) else AVX2_DOT.max_accumulators)
    bias = _float_bias(low, node, out_channels, out_channels)
    y = call_kernel(low, func, "cpu_conv2d_float", [x, xs[1], bias], (batch, out_channels, oh, ow), "float32")
    return y, rest
