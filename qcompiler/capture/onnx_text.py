"""ONNX's TfIdfVectorizer on token ids, as comparisons and sums: the count of an n-gram is the
number of windows (start, stride) whose n tokens equal it, a fixed set of windows once the row
length is known; counts land in their output columns by a product with a 0/1 matrix."""
from __future__ import annotations

import numpy as np

from ..errors import QCompilerError
from .from_onnx import _attr, converts


def _pool_ngrams(node) -> dict[int, np.ndarray]:
    """The pool's n-grams by length n: ngram_counts[n - 1] is where the n-grams start in it."""
    if _attr(node, "pool_strings", None) is not None:
        raise QCompilerError(f"TfIdfVectorizer '{node.name}': string pools are not supported (token ids only)")
    pool = np.asarray(_attr(node, "pool_int64s"), np.int64)
    starts = [int(s) for s in _attr(node, "ngram_counts")] + [pool.size]
    return {n + 1: pool[starts[n]:starts[n + 1]].reshape(-1, n + 1) for n in range(len(starts) - 1)}


def _window_counts(ctx, x, grams: np.ndarray, stride: int):
    """[..., G]: for each n-gram, the windows of n tokens ``stride`` apart that equal it."""
    n, length = grams.shape[1], x.shape[-1]
    windows = length - (n - 1) * stride
    if windows <= 0:
        return None
    positions = np.arange(windows)[:, None] + stride * np.arange(n)[None, :]
    taken = ctx.emit1("gather", [x, ctx.const(positions.astype(np.int64), "ngram_positions")], {"axis": x.type.rank - 1})
    taken = ctx.reshape(taken, list(taken.shape[:-1]) + [1, n])  # [..., windows, 1, n]
    equal = ctx.emit1("equal", [taken, ctx.const(grams.astype(x.type.np_dtype), "ngrams")])
    whole = ctx.emit1("reduce_min", [ctx.cast(equal, "i32")], {"axes": [-1], "keepdims": False})
    return ctx.emit1("reduce_sum", [whole], {"axes": [-2], "keepdims": False})


@converts("TfIdfVectorizer")
def _tfidf_vectorizer(ctx, node, inputs):
    """Counts of the pool's n-grams (min_gram_length..max_gram_length; n > 1 with 0..max_skip_count
    tokens skipped between items, each skip counted) in each row of token ids, in the columns
    ngram_indexes gives; TF: the counts, IDF: weight (1) where present, TFIDF: weight * count."""
    x = inputs[0]
    if x.type.rank not in (1, 2) or x.dtype not in ("i32", "i64"):
        raise QCompilerError(f"TfIdfVectorizer '{node.name}': input must be [C] or [N, C] token ids, got {x.type}")
    low, high, skips = (int(_attr(node, k)) for k in ("min_gram_length", "max_gram_length", "max_skip_count"))
    mode = _attr(node, "mode")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    columns = np.asarray(_attr(node, "ngram_indexes"), np.int64)
    weights = _attr(node, "weights", None)
    pieces = []
    for n, grams in _pool_ngrams(node).items():
        total = None
        for stride in ([1] if n == 1 else range(1, skips + 2)) if low <= n <= high else []:
            counted = _window_counts(ctx, x, grams, stride)
            if counted is not None:
                total = counted if total is None else ctx.emit1("add", [total, counted])
        pieces.append(ctx.cast(total, "f32") if total is not None else
                      ctx.const(np.zeros(x.shape[:-1] + (len(grams),), np.float32), "no_ngrams"))
    counts = ctx.emit1("concat", pieces, {"axis": x.type.rank - 1}) if len(pieces) > 1 else pieces[0]
    placement = np.zeros((columns.size, int(columns.max()) + 1), np.float32)
    placement[np.arange(columns.size), columns] = 1
    y = ctx.emit1("matmul", [counts, ctx.const(placement, "ngram_columns")])
    w = ctx.const(np.asarray(weights if weights is not None else np.ones(placement.shape[1]), np.float32), "idf")
    if mode == "TF":
        return y
    if mode == "IDF":
        return ctx.emit1("where", [ctx.emit1("greater", [y, ctx.const(np.float32(0), "zero")]), w,
                                   ctx.const(np.float32(0), "zero")])
    if mode == "TFIDF":
        return ctx.emit1("mul", [y, w])
    raise QCompilerError(f"TfIdfVectorizer '{node.name}': unknown mode '{mode}' (TF, IDF or TFIDF)")
