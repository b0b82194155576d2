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


QUANT_ROLES = ("weighted", "own_params", "shared_params", "same_as_input", "float", "integer")


@dataclass(frozen=True)
class Traits:
    """What passes and targets know about an op, declared with it: no pass or target keeps a
    list of op names of its own (tests/test_op_coverage.py checks what each op declares).

    ``quant`` is the op's role for insert-qdq: ``weighted`` (conv, linear, matmul: int8
    weights in ``weight_slot``, activations and result per tensor), ``own_params`` (add,
    reduce_mean: each input and the result their own parameters), ``shared_params`` (concat:
    one scale for all, so it stays a copy), ``same_as_input`` (relu, pooling: the result on
    the input's grid), ``float`` (left as is), ``integer`` (already quantized arithmetic)."""

    family: str = "other"  # conv, linear, matmul, pool, activation, elementwise, layout, index, reduce, ...
    quant: str = "float"
    config_type: str | None = None  # its name in QuantConfig.op_types
    weight_slot: int | None = None  # the weight operand of a weighted op (matmul: when it is a constant)
    bias_slot: int | None = None  # the optional bias operand (bias correction, int32 bias)
    channel_axis: int | None = None  # the output channel axis: per-channel weights and requantization
    integer_form: str | None = None  # the integer op lower-integer makes of a weighted op
    fuses_activation: bool = False  # takes an `activation` attribute (fuse-activations folds into it)
    fusible: bool = False  # an activation fuse-activations may fold into its producer
    on_grid: bool = False  # exact on the integers when input and output share parameters
    spatial_rank: int | None = None  # 1, 2, 3 for convolutions and pooling
    quantized_as: str | None = None  # the op quantization rewrites it into first (conv_transpose: conv)
    integer_attrs: tuple[tuple[str, Any], ...] = ()  # an on-grid op's attributes on the integers (rounding)

    def __post_init__(self) -> None:
        if self.quant not in QUANT_ROLES:
            raise ValueError(f"unknown quantization role '{self.quant}' (one of {', '.join(QUANT_ROLES)})")


@dataclass(frozen=True)
class OpDef:
    name: str
    arity: tuple[int, int]  # min and max number of inputs (optional inputs are trailing)
    attrs: dict[str, Attr]
    infer_fn: Infer
    kernel_fn: Kernel | None  # None until installed (set_kernel): qcompiler.torch_kernels
    doc: str = ""
    traits: Traits = field(default_factory=Traits)

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
        if self.kernel_fn is None and KERNEL_LOADER is not None:
            KERNEL_LOADER()  # the kernels that need torch, installed on first use
        if self.kernel_fn is None:
            raise RuntimeError(f"op '{self.name}' has no kernel: import qcompiler (it installs the kernels that "
                               f"need torch)")
        out = self.kernel_fn(list(arrays), attrs)
        return list(out) if isinstance(out, (list, tuple)) else [out]


_REGISTRY: dict[str, OpDef] = {}


def declare(name: str, *, arity: int | tuple[int, int], infer: Infer, kernel: Kernel | None,
            attrs: dict[str, Attr] | None = None, doc: str = "", traits: Traits = Traits()) -> OpDef:
    if name in _REGISTRY:
        raise ValueError(f"op '{name}' declared twice")
    lo_hi = (arity, arity) if isinstance(arity, int) else arity
    opdef = OpDef(name, lo_hi, dict(attrs or {}), infer, kernel, doc, traits)
    _REGISTRY[name] = opdef
    return opdef


# installs the kernels declared without one (set by qcompiler.interpreter: the IR does not import it)
KERNEL_LOADER: Callable[[], None] | None = None


def set_kernel(name: str, kernel: Kernel) -> None:
    """Install the reference kernel of an op declared without one: kernels that need torch live
    outside the IR (qcompiler.torch_kernels), so that importing the IR does not import torch."""
    op = get_op(name)
    if op.kernel_fn is not None and op.kernel_fn is not kernel:
        raise ValueError(f"op '{name}' already has a kernel")
    object.__setattr__(op, "kernel_fn", kernel)


def get_op(name: str) -> OpDef:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown op '{name}'") from None


def all_ops() -> dict[str, OpDef]:
    return dict(sorted(_REGISTRY.items()))


def ops_where(**traits: object) -> tuple[str, ...]:
    """The names of the ops whose traits have these values, sorted: ``ops_where(quant="weighted")``."""
    return tuple(name for name, op in sorted(_REGISTRY.items())
                 if all(getattr(op.traits, key) == value for key, value in traits.items()))


def traits_of(name: str) -> Traits:
    """An op's traits; an op not in the registry (a name in a user's pipeline) has the defaults."""
    op = _REGISTRY.get(name)
    return op.traits if op is not None else Traits()


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
