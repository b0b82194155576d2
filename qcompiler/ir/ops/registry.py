"""The op registry: each op is declared once with its attribute schema, type inference and
reference kernel, and everything else (printer, parser, verifier, interpreter, passes,
targets) reads it from here."""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..types import TensorType

REQUIRED = object()

# attribute kinds and their python representation in the IR
_SCALAR_KINDS = {"int": int, "float": float, "str": str, "bool": bool}
_LIST_KINDS = {"ints": int, "floats": float}


@dataclass(frozen=True)
class Attr:
    kind: str  # int | float | str | bool | ints | floats
    default: Any = REQUIRED
    doc: str = ""

    def coerce(self, value: Any, where: str) -> Any:
        """Check ``value`` against the kind and return its canonical form (lists become tuples)."""
        if self.kind in _LIST_KINDS:
            if not isinstance(value, (list, tuple)):
                raise TypeError(f"{where}: expected a list of {_LIST_KINDS[self.kind].__name__}, got {value!r}")
            return tuple(_coerce_scalar(_LIST_KINDS[self.kind], v, where) for v in value)
        return _coerce_scalar(_SCALAR_KINDS[self.kind], value, where)


def _coerce_scalar(py: type, value: Any, where: str) -> Any:
    if py is bool:
        if isinstance(value, (bool, np.bool_)):
            return bool(value)
    elif py is int:
        if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
            return int(value)
    elif py is float:
        if isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool):
            return float(value)
    elif py is str and isinstance(value, str):
        return value
    raise TypeError(f"{where}: expected {py.__name__}, got {value!r}")


Infer = Callable[[list[TensorType], dict[str, Any]], list[TensorType]]
Kernel = Callable[[list[np.ndarray], dict[str, Any]], "np.ndarray | list[np.ndarray]"]


@dataclass(frozen=True)
class OpDef:
    name: str
    arity: tuple[int, int]  # min and max number of inputs (optional inputs are trailing)
    attrs: dict[str, Attr]
    infer_fn: Infer
    kernel_fn: Kernel
    doc: str = ""
    tags: frozenset[str] = field(default_factory=frozenset)

    def normalize_attrs(self, attrs: dict[str, Any], where: str) -> dict[str, Any]:
        unknown = set(attrs) - set(self.attrs)
        if unknown:
            raise TypeError(f"{where}: unknown attribute(s) {sorted(unknown)} for op '{self.name}'")
        out: dict[str, Any] = {}
        for key, spec in self.attrs.items():
            if key in attrs:
                out[key] = spec.coerce(attrs[key], f"{where}: attribute '{key}'")
            elif spec.default is REQUIRED:
                raise TypeError(f"{where}: op '{self.name}' requires attribute '{key}'")
            else:
                out[key] = spec.coerce(spec.default, f"{where}: default of '{key}'")
        return out

    def is_default(self, key: str, value: Any) -> bool:
        spec = self.attrs.get(key)
        return spec is not None and spec.default is not REQUIRED and spec.coerce(spec.default, key) == value

    def check_arity(self, n: int, where: str) -> None:
        lo, hi = self.arity
        if not lo <= n <= hi:
            want = str(lo) if lo == hi else f"{lo} to {hi}"
            raise TypeError(f"{where}: op '{self.name}' takes {want} inputs, got {n}")

    def infer(self, types: Sequence[TensorType], attrs: dict[str, Any]) -> list[TensorType]:
        self.check_arity(len(types), self.name)
        return self.infer_fn(list(types), attrs)

    def run(self, arrays: Sequence[np.ndarray], attrs: dict[str, Any]) -> list[np.ndarray]:
        out = self.kernel_fn(list(arrays), attrs)
        return list(out) if isinstance(out, (list, tuple)) else [out]


_REGISTRY: dict[str, OpDef] = {}


def declare(name: str, *, arity: int | tuple[int, int], infer: Infer, kernel: Kernel,
            attrs: dict[str, Attr] | None = None, doc: str = "", tags: Sequence[str] = ()) -> OpDef:
    if name in _REGISTRY:
        raise ValueError(f"op '{name}' declared twice")
    lo_hi = (arity, arity) if isinstance(arity, int) else arity
    opdef = OpDef(name, lo_hi, dict(attrs or {}), infer, kernel, doc, frozenset(tags))
    _REGISTRY[name] = opdef
    return opdef


def get_op(name: str) -> OpDef:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown op '{name}'") from None


def all_ops() -> dict[str, OpDef]:
    return dict(sorted(_REGISTRY.items()))


# ---- inference helpers shared by the op families ---------------------------------------------
def broadcast_shapes(*shapes: tuple[int, ...], where: str = "") -> tuple[int, ...]:
    try:
        return tuple(np.broadcast_shapes(*shapes))
    except ValueError:
        raise TypeError(f"{where}: shapes {' and '.join(map(str, shapes))} do not broadcast") from None


def same_dtype(types: Sequence[TensorType], where: str) -> str:
    dtypes = {t.dtype for t in types}
    if len(dtypes) != 1:
        raise TypeError(f"{where}: operand dtypes differ: {sorted(dtypes)}")
    return dtypes.pop()


def norm_axis(axis: int, rank: int, where: str) -> int:
    if not -max(rank, 1) <= axis < max(rank, 1):
        raise TypeError(f"{where}: axis {axis} out of range for rank {rank}")
    return axis % max(rank, 1)


def conv_out_dim(size: int, kernel: int, stride: int, pad_begin: int, pad_end: int,
                 dilation: int = 1, ceil_mode: bool = False) -> int:
    """Output extent of a sliding window (conv or pool), with PyTorch/ONNX ceil-mode rules."""
    pad_total = pad_begin + pad_end
    effective = dilation * (kernel - 1) + 1
    span = size + pad_total - effective
    if span < 0:
        raise TypeError(f"window {effective} larger than padded input {size + pad_total}")
    out = (math.ceil if ceil_mode else math.floor)(span / stride) + 1
    if ceil_mode and (out - 1) * stride >= size + pad_begin:
        out -= 1  # the last window must start inside the input or its begin padding
    return out
