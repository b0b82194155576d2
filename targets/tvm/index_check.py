"""Index operands checked inside the compiled module: a small kernel that wraps negative
indices (``i < 0`` means ``i + size``) and stops the call with an error naming the node when
one is out of range.

TVM's gathers (``R.take``, ``gather_elements``, ``index_tensor``) read whatever the index
points at: a token id past a vocabulary returned heap contents or crashed the process. The
check runs once per index element, before the gather, as an assertion compiled into the
kernel (a TIR ``assert``), so it costs one compare per index and no pass over the data in
Python. The error's text starts with :data:`MARKER`; :func:`raise_input_error` turns it into
the ``InputError`` a user sees. (No ``from __future__ import annotations``: TVMScript reads
the buffer annotations as values.)"""
import functools

import tvm
from tvm.script import tirx as T

from qcompiler.errors import InputError

from .tiling import mark_opaque

MARKER = "qcompiler input error: "


@functools.cache
def checked_indices(count: int, size: int, dtype: str, message: str) -> tvm.tirx.PrimFunc:
    """``out[i] = idx[i] + size if idx[i] < 0 else idx[i]`` for a flat ``idx`` of ``count``
    elements, asserting ``-size <= idx[i] < size``; the assertion's text is ``MARKER + message``."""
    text = MARKER + message

    @T.prim_func(private=True, s_tir=True)
    def kernel(idx: T.Buffer((count,), dtype), out: T.Buffer((count,), dtype)):
        T.func_attr({"tirx.noalias": True})
        for i in range(count):
            with T.sblock("check"):
                v = T.axis.remap("S", [i])
                assert idx[v] >= T.Cast(dtype, -size) and idx[v] < T.Cast(dtype, size), text
                out[v] = T.if_then_else(idx[v] < T.Cast(dtype, 0), idx[v] + T.Cast(dtype, size), idx[v])

    return mark_opaque(kernel)


def raise_input_error(error: BaseException) -> None:
    """Re-raise a failed module call as ``InputError`` when a compiled check failed (its text
    carries :data:`MARKER`); return otherwise, so the caller re-raises the original error."""
    text = str(error)
    start = text.find(MARKER)
    if start < 0:
        return
    message = text[start + len(MARKER):].splitlines()[0].strip()
    raise InputError(message) from None
