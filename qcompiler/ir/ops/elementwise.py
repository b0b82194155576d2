"""Elementwise ops: unary activations and math, broadcasting binary ops, where, cast."""
from __future__ import annotations

import numpy as np

from ..types import DTYPES, TensorType
from .registry import Attr, Traits, broadcast_shapes, declare, same_dtype

ELEMENTWISE = Traits("elementwise")
FUSIBLE = Traits("activation", fusible=True)  # fuse-activations folds it into the conv/linear/matmul before it
ACTIVATION = Traits("activation")


def _same_type(types, attrs):
    return [types[0]]


def _unary(name: str, fn, doc: str, attrs: dict[str, Attr] | None = None, traits: Traits = ELEMENTWISE) -> None:
    """``fn`` None: the kernel is torch's, installed by qcompiler.torch_kernels (numpy has no erf)."""
    kernel = None if fn is None else (lambda xs, a: np.asarray(fn(xs[0], a), dtype=xs[0].dtype))
    declare(name, arity=1, attrs=attrs, infer=_same_type, kernel=kernel, doc=doc, traits=traits)


_f32 = np.float32
_unary("relu", lambda x, a: np.maximum(x, 0), "max(x, 0)",
       traits=Traits("activation", quant="same_as_input", config_type="relu", fusible=True, on_grid=True))
_unary("clip", lambda x, a: np.clip(x, a["min"], a["max"]), "min(max(x, min), max); relu6 is clip{min=0, max=6}",
       {"min": Attr("float", -np.inf), "max": Attr("float", np.inf)}, traits=FUSIBLE)
_unary("sigmoid", lambda x, a: 1 / (1 + np.exp(-x)), "1 / (1 + exp(-x))", traits=FUSIBLE)
_unary("hardsigmoid", lambda x, a: np.clip(a["alpha"] * x + a["beta"], 0, 1), "clip(alpha*x + beta, 0, 1)",
       {"alpha": Attr("float", 1 / 6), "beta": Attr("float", 0.5)}, traits=FUSIBLE)
_unary("hardswish", lambda x, a: x * np.clip(x / 6 + 0.5, 0, 1), "x * relu6(x + 3) / 6",
       traits=FUSIBLE)
_unary("silu", lambda x, a: x / (1 + np.exp(-x)), "x * sigmoid(x)", traits=FUSIBLE)
_unary("gelu", None,
       "x * Phi(x); approximate='tanh' uses the tanh formula", {"approximate": Attr("str", "none")},
       traits=FUSIBLE)
_unary("leaky_relu", lambda x, a: np.where(x >= 0, x, x * _f32(a["alpha"])), "x if x >= 0 else alpha*x",
       {"alpha": Attr("float", 0.01)}, traits=ACTIVATION)
_unary("elu", lambda x, a: np.where(x > 0, x, _f32(a["alpha"]) * np.expm1(x)), "x if x > 0 else alpha*(exp(x)-1)",
       {"alpha": Attr("float", 1.0)}, traits=ACTIVATION)
_unary("selu", lambda x, a: _f32(a["gamma"]) * np.where(x > 0, x, _f32(a["alpha"]) * np.expm1(x)),
       "gamma * (x if x > 0 else alpha*(exp(x)-1))",
       {"alpha": Attr("float", 1.6732632423543772), "gamma": Attr("float", 1.0507009873554805)},
       traits=ACTIVATION)
_unary("sign", lambda x, a: np.sign(x), "-1, 0 or 1")
_unary("softplus", lambda x, a: np.logaddexp(x, 0), "log(1 + exp(x))")
_unary("tanh", lambda x, a: np.tanh(x), "tanh(x)", traits=FUSIBLE)
_unary("erf", None, "the error function")
_unary("exp", lambda x, a: np.exp(x), "e^x")
_unary("log", lambda x, a: np.log(x), "natural logarithm")
_unary("sqrt", lambda x, a: np.sqrt(x), "square root")
_unary("rsqrt", lambda x, a: 1 / np.sqrt(x), "1 / sqrt(x)")
_unary("reciprocal", lambda x, a: 1 / x, "1 / x")
_unary("neg", lambda x, a: -x, "-x")
_unary("abs", lambda x, a: np.abs(x), "|x|")
_unary("floor", lambda x, a: np.floor(x), "round toward -inf")
_unary("ceil", lambda x, a: np.ceil(x), "round toward +inf")
_unary("sin", lambda x, a: np.sin(x), "sine")
_unary("cos", lambda x, a: np.cos(x), "cosine")
_unary("tan", lambda x, a: np.tan(x), "tangent")
_unary("asin", lambda x, a: np.arcsin(x), "inverse sine")
_unary("acos", lambda x, a: np.arccos(x), "inverse cosine")
_unary("atan", lambda x, a: np.arctan(x), "inverse tangent")
_unary("sinh", lambda x, a: np.sinh(x), "hyperbolic sine")
_unary("cosh", lambda x, a: np.cosh(x), "hyperbolic cosine")
_unary("asinh", lambda x, a: np.arcsinh(x), "inverse hyperbolic sine")
_unary("acosh", lambda x, a: np.arccosh(x), "inverse hyperbolic cosine")
_unary("atanh", lambda x, a: np.arctanh(x), "inverse hyperbolic tangent")
_unary("round", lambda x, a: np.round(x), "round to the nearest integer, ties to even")
_unary("logical_not", lambda x, a: np.logical_not(x), "boolean not")
_unary("bitwise_not", lambda x, a: np.invert(x), "~x (integers: every bit flipped)")
_unary("identity", lambda x, a: x, "x (kept from the source model; canonicalization removes it)")
_unary("dropout", lambda x, a: x, "x at inference (kept from the source model; canonicalization removes it)")


def _bool_infer(types, attrs):
    return [TensorType(types[0].shape, "bool")]


declare("isnan", arity=1, infer=_bool_infer, kernel=lambda xs, a: np.isnan(xs[0]), doc="x is NaN",
        traits=ELEMENTWISE)
declare("isinf", arity=1, infer=_bool_infer, kernel=lambda xs, a: np.isinf(xs[0]), doc="x is +-inf",
        traits=ELEMENTWISE)


def _int_div(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Integer division truncating toward zero, as ONNX and C do (numpy's // floors)."""
    q = np.abs(a) // np.abs(b)
    return np.where((a < 0) != (b < 0), -q, q).astype(a.dtype)


def _shift(a: np.ndarray, b: np.ndarray, left: bool) -> np.ndarray:
    """a << b or a >> b (arithmetic for signed a); a shift by a negative amount or by the width
    or more shifts every bit out: 0, or -1 for a negative a shifted right."""
    bits = a.dtype.itemsize * 8
    out_of_range = (b < 0) | (b >= bits)
    amount = np.where(out_of_range, 0, b).astype(a.dtype)
    if left:
        return np.where(out_of_range, 0, np.left_shift(a, amount)).astype(a.dtype)
    return np.where(out_of_range, np.where(a < 0, -1, 0), np.right_shift(a, amount)).astype(a.dtype)


_ARITH = {
    "add": (np.add, "a + b"),
    "sub": (np.subtract, "a - b"),
    "mul": (np.multiply, "a * b"),
    "div": (lambda a, b: _int_div(a, b) if a.dtype.kind in "iu" else a / b, "a / b (integers truncate toward zero)"),
    "pow": (np.power, "a ^ b"),
    "maximum": (np.maximum, "max(a, b)"),
    "minimum": (np.minimum, "min(a, b)"),
    "fmod": (np.fmod, "C's fmod: a - trunc(a / b) * b computed exactly, the sign of a (integers: the truncated "
                      "remainder)"),
    "bitwise_and": (np.bitwise_and, "a & b (integers)"),
    "bitwise_or": (np.bitwise_or, "a | b (integers)"),
    "bitwise_xor": (np.bitwise_xor, "a ^ b (integers)"),
    "shift_left": (lambda a, b: _shift(a, b, True), "a << b (integers; out-of-range amounts shift every bit out)"),
    "shift_right": (lambda a, b: _shift(a, b, False),
                    "a >> b (integers, arithmetic for signed a; out-of-range amounts shift every bit out)"),
}
_COMPARE = {
    "equal": (np.equal, "a == b"),
    "less": (np.less, "a < b"),
    "less_equal": (np.less_equal, "a <= b"),
    "greater": (np.greater, "a > b"),
    "greater_equal": (np.greater_equal, "a >= b"),
    "logical_and": (np.logical_and, "a and b"),
    "logical_or": (np.logical_or, "a or b"),
    "logical_xor": (np.logical_xor, "a xor b"),
}


def _binary_infer(result_dtype: str | None):
    def infer(types, attrs):
        dtype = same_dtype(types, "binary op")
        return [TensorType(broadcast_shapes(types[0].shape, types[1].shape), result_dtype or dtype)]
    return infer


# add (residual connections) is quantized, its inputs and result each on their own grid
_ARITH_TRAITS = {"add": Traits("elementwise", quant="own_params", config_type="add")}
for _name, (_fn, _doc) in _ARITH.items():
    declare(_name, arity=2, infer=_binary_infer(None), doc=_doc + " (numpy broadcasting)",
            kernel=lambda xs, a, fn=_fn: np.asarray(fn(xs[0], xs[1]), dtype=xs[0].dtype),
            traits=_ARITH_TRAITS.get(_name, ELEMENTWISE))
for _name, (_fn, _doc) in _COMPARE.items():
    declare(_name, arity=2, infer=_binary_infer("bool"), doc=_doc + " (numpy broadcasting)",
            kernel=lambda xs, a, fn=_fn: np.asarray(fn(xs[0], xs[1])), traits=ELEMENTWISE)


def _where_infer(types, attrs):
    cond, a, b = types
    if cond.dtype != "bool":
        raise TypeError(f"where: condition must be bool, got {cond.dtype}")
    dtype = same_dtype([a, b], "where")
    return [TensorType(broadcast_shapes(cond.shape, a.shape, b.shape, where="where"), dtype)]


declare("where", arity=3, infer=_where_infer, doc="cond ? a : b (numpy broadcasting)",
        kernel=lambda xs, a: np.where(xs[0], xs[1], xs[2]).astype(xs[1].dtype), traits=ELEMENTWISE)


def _cast_infer(types, attrs):
    if attrs["to"] not in DTYPES:
        raise TypeError(f"cast: unknown dtype '{attrs['to']}'")
    return [TensorType(types[0].shape, attrs["to"])]


def _cast_kernel(xs, attrs):
    x, to = xs[0], DTYPES[attrs["to"]]
    if x.dtype.kind == "f" and to.kind in "iu":
        x = np.trunc(x)  # float -> int truncates toward zero, as ONNX Cast and torch do
    return x.astype(to)


declare("cast", arity=1, attrs={"to": Attr("str")}, infer=_cast_infer, kernel=_cast_kernel,
        doc="convert to dtype `to`", traits=ELEMENTWISE)


def _bitcast_infer(types, attrs):
    x, to = types[0], attrs["to"]
    if to not in DTYPES or DTYPES[to].itemsize != DTYPES[x.dtype].itemsize:
        raise TypeError(f"bitcast: {x.dtype} and '{to}' must be known dtypes of one width")
    return [TensorType(x.shape, to)]


declare("bitcast", arity=1, attrs={"to": Attr("str")}, infer=_bitcast_infer,
        kernel=lambda xs, attrs: np.asarray(xs[0], order="C").view(DTYPES[attrs["to"]]),
        doc="the same bits read as dtype `to` of the same width (ONNX BitCast)", traits=ELEMENTWISE)
