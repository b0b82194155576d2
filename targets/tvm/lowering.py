"""The lowering interface: what ``relax_lower`` and the kernel modules (``kernel_lower``,
``amx_lower``, ``cuda_lower``) share.

- :class:`Lowerer`: the state of one graph's lowering (the Relax block builder, the graph, the
  kernels this target has, the requantizes a kernel may absorb), with helpers to emit.
- :class:`Int8Kernels`: the protocol each int8 kernel module implements.
- :class:`Fused`: what a kernel returns when it also computed the ``requantize`` after it.
- :class:`ConvGeometry`: the sizes a convolution kernel is generated from.

Fusing a requantize into a kernel's epilogue is decided by a pattern matched before any node
is lowered (:func:`absorbable_requantizes`: an integer product whose only reader is a
requantize with constant parameters); a kernel that takes it says so in its result, and the
lowering loop binds the requantize to that result instead of lowering it."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np
from tvm import relax

from qcompiler.ir import Graph, Node, Value

R = relax.op
REQUANTIZES = ("requantize", "requantize_f32")  # the rescalings a kernel epilogue computes
ACCUMULATING = ("conv2d_int", "linear_int", "matmul_int")  # whose int32 result a kernel epilogue can requantize


def absorbable_requantizes(graph: Graph) -> dict[int, Node]:
    """``id(product) -> requantize`` for each integer product whose only reader is a requantize
    with constant multiplier, shift and zero point (and which is not a graph output)."""
    users = graph.users()
    found = {}
    for node in graph.nodes:
        readers = users.get(node.output, []) if node.op in ACCUMULATING else []
        if len(readers) != 1 or readers[0].op not in REQUANTIZES or node.output in graph.outputs:
            continue
        req = readers[0]
        if all(v.is_constant for v in req.inputs[1:]):
            found[id(node)] = req
    return found


class Lowerer:
    """One graph's lowering to Relax: ``bb`` (the block builder), ``graph``, ``int8_variant``
    (``vnni``, ``vnni-vbmi``, ``amx``, ``dp4a`` or None: which int8 kernels the target has),
    ``cpu_kernels`` (the hand-written float CPU kernels apply), ``bf16_variant`` (``amx`` or None:
    the bf16 kernels), ``cores`` (the threads parallel
    loops are cut for), and ``requantize_after(node)`` (the requantize a kernel may absorb)."""

    def __init__(self, graph: Graph, int8_kernels: str | None = None, cpu_kernels: bool = False, cores: int = 1,
                 int8_modules: dict[str, Int8Kernels] | None = None, bf16_kernels: str | None = None):
        self.graph = graph
        self.int8_variant = int8_kernels
        self.bf16_variant = bf16_kernels
        self.cpu_kernels = cpu_kernels
        self.cores = cores
        self.bb = relax.BlockBuilder()
        self._int8_modules = int8_modules or {}
        self._absorbable = absorbable_requantizes(graph)

    @property
    def int8_kernels(self) -> Int8Kernels | None:
        """The int8 kernel module of this target, or None."""
        return self._int8_modules[self.int8_variant] if self.int8_variant else None

    def requantize_after(self, node: Node) -> Node | None:
        """The requantize the pattern matched after ``node`` (see :func:`absorbable_requantizes`)."""
        return self._absorbable.get(id(node))

    def emit(self, expr: relax.Expr) -> relax.Expr:
        return self.bb.emit(expr)

    def const(self, array: Any, dtype: str | None = None) -> relax.Expr:
        array = np.asarray(array, dtype=dtype)
        return relax.const(array, dtype=array.dtype.name)  # 0-d arrays would otherwise become float32

    def scalar(self, value: Any, dtype: str) -> relax.Expr:
        return self.const(value, dtype)

    def cast(self, x: relax.Expr, dtype: str) -> relax.Expr:
        return self.emit(R.astype(x, dtype))

    def array(self, v: Value) -> np.ndarray:
        return self.graph.constant_array(v)


@dataclass(frozen=True)
class Fused:
    """A kernel's result that is also the result of ``requantize`` (absorbed in its epilogue)."""

    expr: relax.Expr
    requantize: Node


@runtime_checkable
class Int8Kernels(Protocol):
    """An int8 kernel module: ``applies`` says whether its conv2d/linear take a node, which
    return None where a finer condition fails (the generic lowering then runs); ``matmul`` takes
    a product of two run-time operands where ``matmul_applies``. Each may return :class:`Fused`."""

    def applies(self, low: Lowerer, node: Node) -> bool: ...

    def conv2d(self, low: Lowerer, node: Node, xs: list[relax.Expr]) -> relax.Expr | Fused | None: ...

    def linear(self, low: Lowerer, node: Node, xs: list[relax.Expr]) -> relax.Expr | Fused | None: ...

    def matmul_applies(self, low: Lowerer, node: Node) -> bool: ...

    def matmul(self, low: Lowerer, node: Node, xs: list[relax.Expr]) -> relax.Expr | Fused: ...


@dataclass(frozen=True)
class ConvGeometry:
    """A 2-D convolution's sizes, read once from its node (input ``[batch, channels, height,
    width]``, weight ``[out_channels, channels / groups, kh, kw]``, output ``[.., oh, ow]``)."""

    batch: int
    channels: int
    height: int
    width: int
    out_channels: int
    kh: int
    kw: int
    oh: int
    ow: int
    strides: tuple[int, int]
    pads: tuple[int, int, int, int]
    dilations: tuple[int, int]
    groups: int

    @classmethod
    def of(cls, node: Node) -> ConvGeometry:
        batch, channels, height, width = node.inputs[0].shape
        weight = node.inputs[2] if node.op == "conv2d_int" else node.inputs[1]
        out_channels, _, kh, kw = weight.shape
        _, _, oh, ow = node.output.shape
        return cls(batch, channels, height, width, out_channels, kh, kw, oh, ow, tuple(node.attrs["strides"]),
                   tuple(node.attrs["pads"]), tuple(node.attrs["dilations"]), node.attrs["groups"])
