"""ONNX Runtime's ``com.microsoft`` fused ops that its transformer optimizer writes into published
"optimized" models (Attention, EmbedLayerNormalization, SkipLayerNormalization, Gelu, FastGelu,
BiasGelu, FusedMatMul, FusedConv, ...), and ``SimplifiedLayerNormalization``, which ONNX Runtime
registers in the default domain (``in_runtime_domain`` moves it to its own before the checker).
Each is the few standard ops ONNX Runtime's contrib-op documentation defines it as, built from
the standard ops' converters, so the passes see an ordinary layer norm, GELU, matmul or conv."""
from __future__ import annotations


import numpy as np
import onnx

from ..errors import QCompilerError
from ..ir import Value
from .from_onnx import _CONVERTERS, _attr, as_standard_op, converts
from .onnx_functions import all_graphs

MS = "com.microsoft."
# ops ONNX Runtime defines in the default domain, which the ONNX checker does not know, and the
# opset from which the standard has them (its transformer optimizer writes LayerNormalization
# into opset 11-16 models, where the standard has none)
RUNTIME_OPS_IN_DEFAULT_DOMAIN = {"SimplifiedLayerNormalization": None, "LayerNormalization": 17}


def _runtime_nodes(proto: onnx.ModelProto) -> list[onnx.NodeProto]:
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)
    return [node for graph in all_graphs(proto.graph) for node in graph.node
            if node.domain in ("", "ai.onnx") and node.op_type in RUNTIME_OPS_IN_DEFAULT_DOMAIN
            and opset < (RUNTIME_OPS_IN_DEFAULT_DOMAIN[node.op_type] or opset + 1)]


def in_runtime_domain(proto: onnx.ModelProto) -> onnx.ModelProto:
    """``proto`` with ONNX Runtime's default-domain ops (as its tools write them) moved to
    ``com.microsoft``, where the checker lets them be: a copy, where there are any."""
    if not _runtime_nodes(proto):
        return proto
    copied = onnx.ModelProto()
    copied.CopyFrom(proto)
    for node in _runtime_nodes(copied):
        node.domain = "com.microsoft"
    if not any(o.domain == "com.microsoft" for o in copied.opset_import):
        copied.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
    return copied


def _sum(ctx, *values: Value | None) -> Value:
    present = [v for v in values if v is not None]
    out = present[0]
    for v in present[1:]:
        out = ctx.emit1("add", [out, v])
    return out


@converts(MS + "Gelu", MS + "BiasGelu", MS + "FastGelu")
def _gelu(ctx, node, inputs):
    """Gelu(x) and BiasGelu(x, bias): the erf form of gelu(x + bias); FastGelu(x, bias?): the tanh form."""
    x = _sum(ctx, *inputs[:2])
    return ctx.emit1("gelu", [x], {"approximate": "tanh" if node.op == "FastGelu" else "none"})


@converts(MS + "QuickGelu")
def _quick_gelu(ctx, node, inputs):
    """x * sigmoid(alpha * x), alpha 1.702 by default (CLIP's GELU approximation)."""
    x = inputs[0]
    alpha = float(_attr(node, "alpha", 1.702))
    scaled = x if alpha == 1.0 else ctx.emit1("mul", [x, ctx.scalar_like(alpha, x.type)])
    return ctx.emit1("mul", [x, ctx.emit1("sigmoid", [scaled])])


@converts(MS + "BiasAdd")
def _bias_add(ctx, node, inputs):
    """x + bias + skip."""
    return _sum(ctx, *inputs[:3])


def _skip_norm(ctx, node, inputs, standard: str) -> list[Value | None]:
    """(Skip)LayerNormalization's and Skip(Simplified)LayerNormalization's outputs: the norm of
    input + skip + bias (by ``standard``'s converter, its mean and inverse deviation where read),
    and that sum, which the next block reads as its residual."""
    x, skip, gamma = inputs[0], inputs[1], inputs[2]
    simplified = standard == "RMSNormalization"
    beta = None if simplified or len(inputs) < 4 else inputs[3]
    bias = inputs[3 if simplified else 4] if len(inputs) > (3 if simplified else 4) else None
    total = _sum(ctx, x, skip, bias)
    wanted = list(node.outputs[:1 if simplified else 3])  # RMSNormalization has one output
    norm_inputs = [total, gamma] + ([] if beta is None else [beta])
    got = _CONVERTERS[standard](ctx, as_standard_op(node, standard, norm_inputs, wanted), norm_inputs)
    outputs: list[Value | None] = ((list(got) if isinstance(got, list) else [got]) + [None] * 3)[:3]
    if len(node.outputs) > 3:
        outputs.append(total)
    return outputs[:len(node.outputs)]


@converts(MS + "SkipLayerNormalization")
def _skip_layer_norm(ctx, node, inputs):
    """LayerNorm(input + skip + bias) * gamma + beta over the last axis."""
    return _skip_norm(ctx, node, inputs, "LayerNormalization")


@converts(MS + "SkipSimplifiedLayerNormalization")
def _skip_simplified_layer_norm(ctx, node, inputs):
    """RMSNorm(input + skip + bias) * gamma over the last axis (LLaMA-style blocks)."""
    if any(o.name for o in node.outputs[1:3]):
        raise QCompilerError(f"SkipSimplifiedLayerNormalization '{node.name}': its mean and inverse deviation "
                             f"outputs are not supported")
    return _skip_norm(ctx, node, inputs, "RMSNormalization")


@converts(MS + "LayerNormalization")
def _runtime_layer_norm(ctx, node, inputs):
    """ONNX Runtime's LayerNormalization before the standard had one (opset 17): the same op."""
    return _CONVERTERS["LayerNormalization"](ctx, as_standard_op(node, "LayerNormalization", inputs), inputs)


@converts(MS + "SimplifiedLayerNormalization")
def _simplified_layer_norm(ctx, node, inputs):
    """ONNX Runtime's RMSNorm in the default domain: x / sqrt(mean(x^2) + epsilon) * scale."""
    if len(node.outputs) > 1 and node.outputs[1].name:
        raise QCompilerError(f"SimplifiedLayerNormalization '{node.name}': its inverse deviation output is not "
                             f"supported")
    standard = as_standard_op(node, "RMSNormalization", inputs, node.outputs[:1])
    return _CONVERTERS["RMSNormalization"](ctx, standard, inputs)


def _swap_last_two(ctx, v: Value) -> Value:
    perm = list(range(v.type.rank))
    perm[-2:] = perm[-1], perm[-2]
    return ctx.emit1("transpose", [v], {"perm": perm})


@converts(MS + "FusedMatMul")
def _fused_matmul(ctx, node, inputs):
    """alpha * op(A) @ op(B), op transposing the last two axes where transA/transB say so."""
    if _attr(node, "transBatchA", 0) or _attr(node, "transBatchB", 0):
        raise QCompilerError(f"FusedMatMul '{node.name}': transBatchA/transBatchB are not supported")
    a, b = inputs
    a = _swap_last_two(ctx, a) if _attr(node, "transA", 0) else a
    b = _swap_last_two(ctx, b) if _attr(node, "transB", 0) else b
    y = ctx.emit1("matmul", [a, b])
    alpha = float(_attr(node, "alpha", 1.0))
    return y if alpha == 1.0 else ctx.emit1("mul", [y, ctx.scalar_like(alpha, y.type)])


def _activation(ctx, node, y: Value) -> Value:
    """FusedConv's ``activation`` with its ``activation_params``."""
    act = _attr(node, "activation", "")
    act = act.decode() if isinstance(act, bytes) else act
    params = [float(p) for p in _attr(node, "activation_params", [])]
    if act in ("", "Identity"):
        return y
    if act in ("Relu", "Tanh", "Sigmoid"):
        return ctx.emit1(act.lower(), [y])
    if act == "LeakyRelu":
        return ctx.emit1("leaky_relu", [y], {"alpha": params[0] if params else 0.01})
    if act == "Clip":
        return ctx.emit1("clip", [y], {"min": params[0], "max": params[1]})
    if act == "HardSigmoid":
        return ctx.emit1("hardsigmoid", [y], {"alpha": params[0] if params else 0.2,
                                              "beta": params[1] if len(params) > 1 else 0.5})
    raise QCompilerError(f"FusedConv '{node.name}': activation '{act}' is not supported")


@converts(MS + "FusedConv")
def _fused_conv(ctx, node, inputs):
    """activation(Conv(x, w, b) + z), z (a residual) optional."""
    conv_inputs = [v for v in inputs[:3] if v is not None]
    y = _CONVERTERS["Conv"](ctx, as_standard_op(node, "Conv", conv_inputs), conv_inputs)
    if len(inputs) > 3 and inputs[3] is not None:
        y = ctx.emit1("add", [y, inputs[3]])
    return _activation(ctx, node, y)


def _heads(ctx, v: Value, batch: int, seq: int, heads: int) -> Value:
    """[B, S, N * H] -> [B, N, S, H]."""
    split = ctx.reshape(v, [batch, seq, heads, v.shape[-1] // heads])
    return ctx.emit1("transpose", [split], {"perm": [0, 2, 1, 3]})


def _key_mask(ctx, node, mask: Value, batch: int, seq: int, keys: int, fill: float) -> Value:
    """An additive [B, 1, S or 1, T] score bias from Attention's ``mask_index``: 0 where a key
    is attended, ``fill`` where not. Forms: [B] (each row's length: keys at or past it are
    padding), [B, T] and [B, S, T] (1 attends, 0 does not)."""
    zero, masked = ctx.const(np.zeros((), np.float32), "zero"), ctx.const(np.array(fill, np.float32), "mask_fill")
    if mask.shape == (batch,):
        positions = ctx.const(np.arange(keys, dtype=np.int64).reshape(1, 1, 1, keys), "key_positions")
        lengths = ctx.reshape(ctx.cast(mask, "i64"), [batch, 1, 1, 1])
        return ctx.emit1("where", [ctx.emit1("less", [positions, lengths]), zero, masked])
    if mask.shape in ((batch, keys), (batch, seq, keys)):
        shaped = ctx.reshape(mask, [batch, 1, 1 if mask.type.rank == 2 else seq, keys])
        off = ctx.emit1("equal", [shaped, ctx.scalar_like(0, shaped.type)])
        return ctx.emit1("where", [off, masked, zero])
    raise QCompilerError(f"Attention '{node.name}': mask_index of shape {list(mask.shape)} is not supported "
                         f"([B], [B, T] and [B, S, T] are)")


@converts(MS + "Attention")
def _attention(ctx, node, inputs):
    """ONNX Runtime's fused self-attention (BERT-style optimized models): Q, K, V = split(x @ W +
    b); per head softmax(Q K^T * scale + mask + attention_bias) V, heads joined again. The masked
    scores get ``mask_filter_value`` (-10000) added, as ONNX Runtime does; ``unidirectional``
    masks the future the same way. Past state (generation) is not supported."""
    x, weights = inputs[0], inputs[1]
    padded = list(inputs) + [None] * (6 - len(inputs))
    bias, mask, past, attention_bias = padded[2], padded[3], padded[4], padded[5]
    if past is not None or any(v is not None for v in padded[6:]):
        raise QCompilerError(f"Attention '{node.name}': past state (incremental decoding) is not supported")
    if _attr(node, "do_rotary", 0):
        raise QCompilerError(f"Attention '{node.name}': do_rotary=1 is not supported")
    qkv = ctx.emit1("matmul", [x, weights])
    return _attend(ctx, node, qkv if bias is None else ctx.emit1("add", [qkv, bias]), mask, attention_bias)


def _attend(ctx, node, qkv: Value, mask: Value | None, attention_bias: Value | None) -> Value:
    """Attention's (and QAttention's) computation from the joined [B, S, Q + K + V] projections."""
    heads = int(_attr(node, "num_heads"))
    batch, seq = qkv.shape[0], qkv.shape[1]
    sizes = list(_attr(node, "qkv_hidden_sizes", [qkv.shape[2] // 3] * 3))
    q, k, v = (_heads(ctx, part, batch, seq, heads)
               for part in ctx.emit("split", [qkv], {"axis": 2, "sizes": sizes}))
    head_size = sizes[0] // heads
    scale = float(_attr(node, "scale", 0.0)) or 1.0 / float(np.sqrt(head_size))
    scores = ctx.emit1("mul", [ctx.emit1("matmul", [q, ctx.emit1("transpose", [k], {"perm": [0, 1, 3, 2]})]),
                               ctx.scalar_like(scale, qkv.type)])
    fill = float(_attr(node, "mask_filter_value", -10000.0))
    if mask is not None:
        scores = ctx.emit1("add", [scores, _key_mask(ctx, node, mask, batch, seq, seq, fill)])
    if _attr(node, "unidirectional", 0):
        future = np.triu(np.full((seq, seq), -10000.0, np.float32), 1)
        scores = ctx.emit1("add", [scores, ctx.const(future, "causal_mask")])
    if attention_bias is not None:
        scores = ctx.emit1("add", [scores, attention_bias])
    probs = ctx.emit1("softmax", [scores], {"axis": 3})
    out = ctx.emit1("transpose", [ctx.emit1("matmul", [probs, v])], {"perm": [0, 2, 1, 3]})
    return ctx.reshape(out, [batch, seq, sizes[2]])


@converts(MS + "QAttention")
def _qattention(ctx, node, inputs):
    """Attention whose input projection is quantized (ONNX Runtime's quantize_dynamic of an
    optimized model): QKV = (x_q - x_zp) @ (w_q - w_zp) * x_scale * w_scale + bias, the product
    an integer one (MatMulInteger's: on the int8 kernels for a constant weight), then Attention."""
    padded = list(inputs) + [None] * (9 - len(inputs))
    x, weights, bias, x_scale, w_scale, mask, x_zp, w_zp, past = padded[:9]
    if past is not None:
        raise QCompilerError(f"QAttention '{node.name}': past state (incremental decoding) is not supported")
    operands = [x, weights, x_zp, w_zp]
    product = _CONVERTERS["MatMulInteger"](ctx, as_standard_op(node, "MatMulInteger", operands), operands)
    scale = ctx.emit1("mul", [ctx.reshape(x_scale, []), w_scale])
    qkv = ctx.emit1("mul", [ctx.cast(product, scale.dtype), scale])
    return _attend(ctx, node, qkv if bias is None else ctx.emit1("add", [qkv, bias]), mask, None)


@converts(MS + "QEmbedLayerNormalization")
def _qembed_layer_norm(ctx, node, inputs):
    """EmbedLayerNormalization with its tables, gamma and beta stored 8-bit (inputs 8-12 their
    scales, 13-17 their zero points): dequantized now, exactly as defined."""
    padded = list(inputs) + [None] * (18 - len(inputs))
    tables = []
    for i, stored in enumerate(padded[2:7]):
        if stored is None:
            tables.append(None)
            continue
        codes = ctx.const_input(stored, node, "quantized table").astype(np.float32)
        scale = ctx.const_input(padded[8 + i], node, "scale").astype(np.float32)
        zero = ctx.const_input(padded[13 + i], node, "zero point")
        real = (codes - (0 if zero is None else zero.astype(np.float32))) * scale
        tables.append(ctx.const(real.astype(np.float32), "dequantized_table"))
    floats = [padded[0], padded[1], *tables, padded[7]]
    return _embed_layer_norm(ctx, as_standard_op(node, "EmbedLayerNormalization", floats), floats)


@converts(MS + "EmbedLayerNormalization")
def _embed_layer_norm(ctx, node, inputs):
    """BERT's embeddings as one op: LayerNorm(word[ids] + position[positions] + segment[segment
    ids]) with the mask's per-row count of ones as ``mask_index`` (what Attention reads as each
    row's length), and the sum before the norm when asked for."""
    padded = list(inputs) + [None] * (9 - len(inputs))
    ids, segment_ids, word, position, segment, gamma, beta, mask, position_ids = padded[:9]
    batch, seq = ids.shape
    if position_ids is not None:
        positions = ctx.emit1("gather", [position, position_ids], {"axis": 0})
    else:
        positions = ctx.reshape(ctx.emit1("slice", [position], {"starts": [0], "ends": [seq], "axes": [0],
                                                                 "steps": [1]}), [1, seq, position.shape[1]])
    total = _sum(ctx, ctx.emit1("gather", [word, ids], {"axis": 0}), positions,
                 None if segment is None or segment_ids is None else
                 ctx.emit1("gather", [segment, segment_ids], {"axis": 0}))
    normed = _CONVERTERS["LayerNormalization"](ctx, as_standard_op(node, "LayerNormalization", [total, gamma, beta],
                                                           node.outputs[:1], axis=-1), [total, gamma, beta])
    if mask is None:
        mask_index = ctx.const(np.zeros((batch,), np.int32), "mask_index")
    else:
        ones = ctx.cast(ctx.emit1("equal", [mask, ctx.scalar_like(1, mask.type)]), "i32")
        mask_index = ctx.emit1("reduce_sum", [ones], {"axes": [1], "keepdims": False})
    return [normed, mask_index, total][:len(node.outputs)]


def _unpack(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """``count`` ``bits``-wide unsigned values per row of bytes, the lowest bits first."""
    per_byte = 8 // bits
    shifts = (np.arange(per_byte) * bits).astype(np.uint8)
    values = (packed[..., None] >> shifts) & np.uint8((1 << bits) - 1)
    return values.reshape(*packed.shape[:-1], -1)[..., :count]


@converts(MS + "MatMulNBits")
def _matmul_nbits(ctx, node, inputs):
    """A @ W^T + bias with W [N, K] stored as ``bits``-wide codes in blocks of ``block_size``
    along K, each block with a scale and a zero point (2^(bits-1) when absent): ONNX Runtime's
    weight-only low-bit form (its MatMulNBits quantizer, LLMs exported by its model builder).
    W is dequantized now, exactly as defined, into a float weight: a float build computes what
    ONNX Runtime's default accuracy level does, and quantization quantizes it again (4-bit
    groups with ``QuantConfig(weight_dtype="i4")``)."""
    padded = list(inputs) + [None] * (6 - len(inputs))
    a, packed, scales, zero_points, g_idx, bias = padded[:6]
    if g_idx is not None:
        raise QCompilerError(f"MatMulNBits '{node.name}': g_idx (act-order block indices) is not supported")
    k, n, bits, block = (int(_attr(node, name, default)) for name, default in
                         (("K", 0), ("N", 0), ("bits", 4), ("block_size", 0)))
    if bits not in (2, 4, 8):
        raise QCompilerError(f"MatMulNBits '{node.name}': {bits}-bit weights are not supported (2, 4 and 8 are)")
    blocks = -(-k // block)
    codes = _unpack(ctx.const_input(packed, node, "weight").reshape(n, blocks, -1), bits, block)
    scale = ctx.const_input(scales, node, "scales").reshape(n, blocks).astype(np.float32)
    if zero_points is None:
        zp = np.full((n, blocks), 1 << (bits - 1), np.float32)
    else:
        given = ctx.const_input(zero_points, node, "zero points")
        zp = (_unpack(given.reshape(n, -1), bits, blocks) if given.dtype == np.uint8 else given.reshape(n, blocks))
        zp = zp.astype(np.float32)
    weight = ((codes.astype(np.float32) - zp[..., None]) * scale[..., None]).reshape(n, -1)[:, :k]
    w = ctx.const(weight.astype(a.type.np_dtype), "weight")
    return ctx.emit1("linear", [a, w] + ([bias] if bias is not None else []))
