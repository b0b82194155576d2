"""Quantization-aware training: ``prepare`` turns a model into a torch module that computes what
its quantized build will compute, trainable with an ordinary torch loop; ``qcompiler.compile``
builds the trained module with what it learned (no calibration).

What the prepared module runs is qcompiler's own QDQ graph (capture, float passes with batch
norm folded at its current statistics, calibration, insert-qdq), executed with torch ops:

- weights are float parameters, quantized in every forward exactly as insert-qdq quantizes them
  (its own function: per-channel scales from the current weights, dead channels, the int32 bias
  floor, 4-bit groups), with straight-through gradients;
- every activation quantize/dequantize pair is a fake quantization with a learnable scale (LSQ,
  Esser et al. 2020: gradients through the rounding for the scale, straight through inside the
  range for the input) and its calibrated zero point; pairs insert-qdq ties (a pool or relu on
  its input's grid, a concat's operands) share one scale, so the build keeps them on one grid;
- rounding is round half to even, in float32, as the quantize kernel does;
- a batch norm that was folded into a conv or linear stays live for the first ``bn_steps``
  training steps (Jacob et al. 2018, sec. 3.2): the layer's weight is the unfolded one times
  gamma / sqrt(running_var + eps), quantized; its output is divided back by that factor and
  normalized with the batch's own statistics, which also update the running ones. From then on
  (and always in eval mode) the statistics are frozen and the layer computes the folded
  weight and bias from them, exactly what the build folds.

The build replaces the QDQ graph's weights, biases and scales with the trained ones and lowers
it (lower-integer); its outputs differ from the prepared module's only by the integer
requantization's rounding (fixed-point multipliers, int32 bias): within a quantization step."""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .errors import QCompilerError
from .ir import Graph, Node, Value
from .ir.ops import traits_of
from .quant_config import QuantConfig
from .registrar import registrar

TorchOp = Callable[[list[torch.Tensor], dict[str, Any], Node], torch.Tensor]
_OPS: dict[str, TorchOp] = {}
_op = registrar(_OPS)


def _activation(y: torch.Tensor, attrs: dict[str, Any]) -> torch.Tensor:
    act = attrs.get("activation", "none")
    if act == "none":
        return y
    if act == "relu":
        return F.relu(y)
    if act == "clip":
        lo, hi = attrs["activation_args"]
        return torch.clamp(y, lo, hi)
    if act in ("gelu", "gelu_tanh"):
        return F.gelu(y, approximate="tanh" if act == "gelu_tanh" else "none")
    if act in ("sigmoid", "tanh"):
        return getattr(torch, act)(y)
    raise QCompilerError(f"qat: fused activation '{act}' has no torch form yet")


@_op("conv2d")
def _conv2d(xs, a, node):
    top, left, bottom, right = a["pads"]
    x = F.pad(xs[0], (left, right, top, bottom)) if any(a["pads"]) else xs[0]
    y = F.conv2d(x, xs[1], xs[2] if len(xs) > 2 else None, stride=tuple(a["strides"]), dilation=tuple(a["dilations"]),
                 groups=a["groups"])
    return _activation(y, a)


@_op("linear")
def _linear(xs, a, node):
    return _activation(F.linear(xs[0], xs[1], xs[2] if len(xs) > 2 else None), a)


@_op("matmul")
def _matmul(xs, a, node):
    return _activation(torch.matmul(xs[0], xs[1]), a)


@_op("add", "sub", "mul", "div")
def _arith(xs, a, node):
    return {"add": torch.add, "sub": torch.sub, "mul": torch.mul, "div": torch.div}[node.op](xs[0], xs[1])


@_op("relu", "sigmoid", "tanh")
def _unary(xs, a, node):
    return getattr(torch, node.op)(xs[0])


@_op("gelu")
def _gelu(xs, a, node):
    return F.gelu(xs[0], approximate=a["approximate"])


@_op("max_pool2d")
def _max_pool(xs, a, node):
    top, left, bottom, right = a["pads"]
    x = F.pad(xs[0], (left, right, top, bottom), value=-math.inf) if any(a["pads"]) else xs[0]
    return F.max_pool2d(x, tuple(a["kernel"]), tuple(a["strides"]), dilation=tuple(a["dilations"]),
                        ceil_mode=a["ceil_mode"])


@_op("reduce_mean")
def _mean(xs, a, node):
    return torch.mean(xs[0], dim=tuple(a["axes"]) or None, keepdim=a["keepdims"])


@_op("reshape")
def _reshape(xs, a, node):
    """The captured shape, with its leading (batch) dimension following the input's when the
    capture's batch led both: the prepared module trains on any batch size."""
    return xs[0].reshape(_batch_led(a["shape"], node.inputs[0].shape, xs[0]))


@_op("transpose")
def _transpose(xs, a, node):
    return xs[0].permute(*a["perm"])


@_op("concat")
def _concat(xs, a, node):
    return torch.cat(xs, dim=a["axis"])


@_op("softmax")
def _softmax(xs, a, node):
    return torch.softmax(xs[0], dim=a["axis"])


@_op("layer_norm")
def _layer_norm(xs, a, node):
    axes = tuple(range(a["axis"] % xs[0].ndim, xs[0].ndim))
    mean = xs[0].mean(dim=axes, keepdim=True)
    var = ((xs[0] - mean) ** 2).mean(dim=axes, keepdim=True)
    y = (xs[0] - mean) / torch.sqrt(var + a["epsilon"])
    if len(xs) > 1:
        y = y * xs[1]
    return y + xs[2] if len(xs) > 2 else y


@_op("reduce_sum", "reduce_max")
def _reduce(xs, a, node):
    dims = tuple(a["axes"]) or tuple(range(xs[0].ndim))
    if node.op == "reduce_sum":
        return torch.sum(xs[0], dim=dims, keepdim=a["keepdims"])
    return torch.amax(xs[0], dim=dims, keepdim=a["keepdims"])


@_op("clip")
def _clip(xs, a, node):
    return torch.clamp(xs[0], a["min"], a["max"])


@_op("sqrt", "exp", "neg", "abs", "erf")
def _elementwise(xs, a, node):
    return getattr(torch, node.op)(xs[0])


@_op("where")
def _where(xs, a, node):
    return torch.where(xs[0], xs[1], xs[2])


@_op("logical_and", "logical_or")
def _logical(xs, a, node):
    return getattr(torch, node.op)(xs[0], xs[1])


@_op("cast")
def _cast(xs, a, node):
    dtype = torch.from_numpy(np.zeros(0, node.outputs[0].type.np_dtype)).dtype
    x = xs[0]
    if x.is_floating_point() and not dtype.is_floating_point and dtype != torch.bool:
        x = torch.trunc(x)  # float -> int truncates toward zero, as the kernel does
    return x.to(dtype)


@_op("gather")
def _gather(xs, a, node):
    data, idx = xs
    axis = a["axis"] % data.ndim
    idx = torch.where(idx < 0, idx + data.shape[axis], idx).long()
    return torch.index_select(data, axis, idx.reshape(-1)).reshape(
        data.shape[:axis] + idx.shape + data.shape[axis + 1:])


@_op("split")
def _split(xs, a, node):
    return list(torch.split(xs[0], list(a["sizes"]), dim=a["axis"]))


@_op("expand")
def _expand(xs, a, node):
    return xs[0].expand(*_batch_led(a["shape"], node.inputs[0].shape, xs[0]))  # a broadcast 1 stays captured


def _batch_led(shape: Sequence[int], captured: tuple[int, ...], x: torch.Tensor) -> list[int]:
    """``shape`` with its leading dimension following ``x``'s when the capture's batch led both."""
    shape = list(shape)
    if shape and x.ndim and captured and x.shape[0] != captured[0] and shape[0] == captured[0]:
        shape[0] = x.shape[0]
    return shape


class _FakeQuant(torch.autograd.Function):
    """saturate(round_half_even(x / s) + z) - z, times s, in float32 (the quantize and dequantize
    kernels' arithmetic). Backward (LSQ): x straight through inside the range; the scale gets
    round(x/s) - x/s inside and the clamped level outside, scaled by 1/sqrt(n * q_max)."""

    @staticmethod
    def forward(ctx, x, scale, zero_point: int, qmin: int, qmax: int):
        level = torch.round(x / scale) + zero_point
        ctx.save_for_backward(x, scale, level)
        ctx.zero_point, ctx.qmin, ctx.qmax = zero_point, qmin, qmax
        return (torch.clamp(level, qmin, qmax) - zero_point) * scale

    @staticmethod
    def backward(ctx, grad):
        x, scale, level = ctx.saved_tensors
        inside = (level >= ctx.qmin) & (level <= ctx.qmax)
        local = torch.where(inside, (level - ctx.zero_point) - x / scale,
                            torch.clamp(level, ctx.qmin, ctx.qmax) - ctx.zero_point)
        grad_scale = (grad * local).sum() / math.sqrt(x.numel() * max(ctx.qmax, 1))
        return grad * inside, grad_scale.reshape(scale.shape), None, None, None


def _activation_pairs(graph: Graph) -> list[Node]:
    """The quantize nodes of activation pairs (a run-time value quantized, then dequantized)."""
    return [n for n in graph.nodes if n.op == "quantize" and not n.inputs[0].is_constant]


def _ties(graph: Graph, pairs: list[Node]) -> list[int]:
    """For each pair, the index of the pair whose scale it shares: insert-qdq ties a pool's or
    relu's result to its input's grid and a concat's operands to its own (union-find)."""
    index = {id(q): i for i, q in enumerate(pairs)}
    parent = list(range(len(pairs)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    def pair_of(v: Value) -> int | None:
        dq = v.producer
        q = dq.inputs[0].producer if dq is not None and dq.op == "dequantize" else None
        return index.get(id(q)) if q is not None else None

    consumers = graph.users()
    for node in graph.nodes:
        if traits_of(node.op).quant not in ("same_as_input", "shared_params"):
            continue
        members = [pair_of(v) for v in node.inputs]
        out_pairs = [index[id(u)] for u in consumers.get(node.outputs[0], []) if id(u) in index]
        members = [m for m in members + out_pairs if m is not None]
        same = [m for m in members if _same_params(graph, pairs[m], pairs[members[0]])]
        for m in same[1:]:
            parent[find(m)] = find(same[0])
    return [find(i) for i in range(len(pairs))]


def _same_params(graph: Graph, a: Node, b: Node) -> bool:
    return all(np.array_equal(graph.constant_array(a.inputs[i]), graph.constant_array(b.inputs[i])) for i in (1, 2))


class _LiveBatchNorm(torch.nn.Module):
    """A batch norm folded into a layer, kept apart while its statistics train: gamma and beta
    learnable, running mean and variance updated from each training batch (torch's momentum and
    unbiased variance) until frozen."""

    def __init__(self, gamma: np.ndarray, beta: np.ndarray, mean: np.ndarray, var: np.ndarray, eps: float):
        super().__init__()
        self.gamma = torch.nn.Parameter(torch.from_numpy(gamma.astype(np.float32)))
        self.beta = torch.nn.Parameter(torch.from_numpy(beta.astype(np.float32)))
        self.register_buffer("running_mean", torch.from_numpy(mean.astype(np.float32)))
        self.register_buffer("running_var", torch.from_numpy(var.astype(np.float32)))
        self.eps, self.momentum = float(eps), 0.1

    def factor(self) -> torch.Tensor:
        """gamma / sqrt(running_var + eps), in float64: what folding multiplies the weight's rows by."""
        return self.gamma.double() / torch.sqrt(self.running_var.double() + self.eps)

    def fold(self, w: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The folded weight and bias: fold-batchnorm's identity and arithmetic (float64, then
        float32), with the running statistics."""
        s = self.factor()
        return (w.double() * _per_row(s, w.ndim)).float(), ((b.double() - self.running_mean.double()) * s
                                                             + self.beta.double()).float()

    def normalize(self, y: torch.Tensor) -> torch.Tensor:
        """y normalized with its batch statistics (channels on axis 1), which also update the
        running ones."""
        dims = [d for d in range(y.ndim) if d != 1]
        mean, var = y.mean(dim=dims), y.var(dim=dims, unbiased=False)
        with torch.no_grad():
            n = y.numel() // y.shape[1]
            self.running_mean.mul_(1 - self.momentum).add_(self.momentum * mean)
            self.running_var.mul_(1 - self.momentum).add_(self.momentum * var * n / max(n - 1, 1))
        shape = [1, -1] + [1] * (y.ndim - 2)
        return (y - mean.reshape(shape)) / torch.sqrt(var.reshape(shape) + self.eps) * self.gamma.reshape(shape) \
            + self.beta.reshape(shape)


def _folded_batch_norm(captured: Graph, node: Node, folded_weight: np.ndarray
                       ) -> tuple[np.ndarray, np.ndarray, _LiveBatchNorm] | None:
    """The unfolded weight and bias of ``node`` and the batch norm fold-batchnorm folded into it,
    when the captured graph has that layer feeding a batch norm of constants and folding them
    gives ``folded_weight`` back (no other pass changed the weight), else None."""
    layer = next((n for n in captured.nodes if n.meta.get("handle") == node.handle and n.op == node.op), None)
    if layer is None or layer.attrs.get("activation", "none") != "none":
        return None
    readers = captured.users_of(layer.outputs[0])
    if len(readers) != 1 or readers[0].op != "batch_norm" or not all(v.is_constant for v in readers[0].inputs[1:]) \
            or not all(v.is_constant for v in layer.inputs[1:]):
        return None
    bn = readers[0]
    w = captured.constant_array(layer.inputs[1]).astype(np.float32)
    b = captured.constant_array(layer.inputs[2]).astype(np.float32) if len(layer.inputs) > 2 else \
        np.zeros(w.shape[0], np.float32)
    live = _LiveBatchNorm(*(captured.constant_array(v) for v in bn.inputs[1:]), bn.attrs["epsilon"])
    with torch.no_grad():
        again = live.fold(torch.from_numpy(w), torch.from_numpy(b))[0].numpy()
    if again.shape != folded_weight.shape or not np.allclose(again, folded_weight, rtol=1e-4,
                                                             atol=1e-6 * max(np.abs(folded_weight).max(), 1e-30)):
        return None
    return w, b, live


class QATModel(torch.nn.Module):
    """The prepared module (see the module docstring). ``weights``/``biases``: the quantized
    layers' float parameters (unfolded where a batch norm is live); ``batch_norms``: those live
    batch norms, by layer index; ``scales``: one learnable scale per group of tied activation
    pairs; ``steps``: training forwards so far (batch norms freeze at ``bn_steps``)."""

    def __init__(self, captured: Graph, float_graph: Graph, qdq: Graph, config: QuantConfig, pipeline: str,
                 scheme: Any, bn_steps: int = 0):
        super().__init__()
        from .passes.insert_qdq import is_quantized_weight

        self.captured, self.qdq, self.config, self.pipeline = captured, qdq, config, pipeline
        self.bn_steps = int(bn_steps)
        self.register_buffer("steps", torch.tensor(0))
        self.scheme = scheme  # the config's, with the sensitivity check's decisions (int8 weights, weight-only)
        missing = sorted({n.op for n in qdq.nodes} - set(_OPS) - {"quantize", "dequantize"})
        if missing:
            raise QCompilerError(f"qat: op(s) {', '.join(missing)} have no torch form yet (the prepared module runs "
                                 f"the QDQ graph with torch ops)")
        self._layers = [n for n in qdq.nodes if traits_of(n.op).quant == "weighted" and traits_of(n.op).weight_slot
                        is not None and is_quantized_weight(n.inputs[traits_of(n.op).weight_slot])]
        floats = {n.handle: n for n in float_graph.nodes}
        self.weights = torch.nn.ParameterList()
        self.biases = torch.nn.ParameterList()
        self.batch_norms = torch.nn.ModuleDict()
        self._has_bias = []
        for i, node in enumerate(self._layers):  # training starts from the float weights, quantized each forward
            weight = float_graph.constant_array(floats[node.handle].inputs[traits_of(node.op).weight_slot]).copy()
            bias = node.inputs[2] if len(node.inputs) > 2 and node.inputs[2].is_constant else None
            live = _folded_batch_norm(captured, node, weight) if self.bn_steps > 0 and bias is not None \
                else None
            if live is not None:
                weight, unfolded_bias, bn = live
                with torch.no_grad():  # what quantization added to the folded bias (bias correction)
                    folded = bn.fold(torch.from_numpy(weight), torch.from_numpy(unfolded_bias))[1]
                bn.register_buffer("bias_correction", torch.from_numpy(qdq.constant_array(bias)) - folded)
                self.batch_norms[str(i)] = bn
            self.weights.append(torch.nn.Parameter(torch.from_numpy(weight)))
            self._has_bias.append(bias is not None)
            if bias is not None:
                self.biases.append(torch.nn.Parameter(torch.from_numpy(
                    unfolded_bias if live is not None else qdq.constant_array(bias).copy())))
        self._pairs = _activation_pairs(qdq)
        quantized = {id(q.outputs[0]) for q in self._pairs}
        for n in qdq.nodes:
            if n.op == "dequantize" and not n.inputs[0].is_constant and id(n.inputs[0]) not in quantized:
                raise QCompilerError(f"qat: {n.describe()} dequantizes a value no quantize in the graph made "
                                     f"(an imported integer input): not trainable")
        ties = _ties(qdq, self._pairs)
        groups = sorted(set(ties))
        self._scale_of = [groups.index(t) for t in ties]
        self.scales = torch.nn.ParameterList(
            torch.nn.Parameter(torch.tensor(float(qdq.constant_array(self._pairs[g].inputs[1])), dtype=torch.float32))
            for g in groups)
        self._constants = {id(n.outputs[0]): torch.from_numpy(_run_const(qdq, n)) for n in qdq.nodes
                           if n.op == "dequantize" and n.inputs[0].is_constant}

    def _bias(self, layer: int) -> torch.nn.Parameter | None:
        return self.biases[sum(self._has_bias[:layer])] if self._has_bias[layer] else None

    def _layer(self, layer: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The layer's float weight and bias as the build folds them (through its live batch
        norm's running statistics, if any)."""
        w, b = self.weights[layer], self._bias(layer)
        if str(layer) not in self.batch_norms:
            return w, b
        bn = self.batch_norms[str(layer)]
        w, b = bn.fold(w, b)
        return w, b + bn.bias_correction

    @property
    def batch_norms_live(self) -> bool:
        """Whether training forwards normalize with batch statistics now (before ``bn_steps``)."""
        return self.training and len(self.batch_norms) > 0 and int(self.steps) < self.bn_steps

    def _scale(self, pair: int) -> torch.Tensor:
        return torch.clamp(self.scales[self._scale_of[pair]], min=1e-12)

    def _quantized_weights(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """Each layer's weight quantized now as insert-qdq quantizes it (int8 values, scale): its
        own function, with the current bias and input scale (the int32 bias floor reads both)."""
        from .passes.insert_qdq import quantize_layer_weight

        pair_index = {id(q): i for i, q in enumerate(self._pairs)}
        out = []
        for i, node in enumerate(self._layers):
            _, bias = self._layer(i)
            dq = node.inputs[0].producer
            q = dq.inputs[0].producer if dq is not None and dq.op == "dequantize" else None
            x_scale = float(self._scale(pair_index[id(q)]).detach()) if id(q) in pair_index else 1.0
            out.append(quantize_layer_weight(node, self._layer(i)[0].detach().numpy(),
                                             bias.detach().numpy() if bias is not None else None, x_scale,
                                             self.scheme))
        return out

    def forward(self, *inputs: Any) -> Any:
        graph = self.qdq
        if len(inputs) != len(graph.inputs):
            raise QCompilerError(f"the prepared model takes {len(graph.inputs)} input(s), got {len(inputs)}")
        env: dict[int, torch.Tensor] = {id(v): torch.as_tensor(x) for v, x in zip(graph.inputs, inputs)}
        env.update(self._constants)
        layer_index = {id(n): i for i, n in enumerate(self._layers)}
        pair_index = {id(q): i for i, q in enumerate(self._pairs)}
        weights = self._quantized_weights()
        live = self.batch_norms_live
        if self.training:
            self.steps += 1

        def read(v: Value) -> torch.Tensor:
            return torch.from_numpy(graph.constant_array(v)) if v.is_constant else env[id(v)]

        for node in graph.nodes:
            if node.op == "quantize" or id(node.outputs[0]) in self._constants:
                continue  # a pair is computed by its dequantize; constants were dequantized once
            if node.op == "dequantize":
                q = node.inputs[0].producer
                zp = graph.constant_array(q.inputs[2])
                info = np.iinfo(zp.dtype)
                env[id(node.outputs[0])] = _FakeQuant.apply(read(q.inputs[0]), self._scale(pair_index[id(q)]),
                                                            int(zp), int(info.min), int(info.max))
                continue
            xs = [read(v) for v in node.inputs]
            if id(node) in layer_index:
                i = layer_index[id(node)]
                q, scale = weights[i]
                exact = torch.from_numpy((q.astype(np.float32) * _per_row(scale, q.ndim)).astype(np.float32))
                w, b = self._layer(i)
                xs[traits_of(node.op).weight_slot] = w + (exact - w).detach()  # straight-through
                if self._has_bias[i]:
                    xs[2] = b
                if live and str(i) in self.batch_norms:
                    env[id(node.outputs[0])] = self._batch_statistics_layer(node, i, xs)
                    continue
            results = _OPS[node.op](xs, node.attrs, node)
            for v, t in zip(node.outputs, results if isinstance(results, (list, tuple)) else [results]):
                env[id(v)] = t
        outs = [read(v) for v in graph.outputs]
        return outs[0] if len(outs) == 1 else tuple(outs)

    def _batch_statistics_layer(self, node: Node, layer: int, xs: list[torch.Tensor]) -> torch.Tensor:
        """A layer with its live batch norm in training: the quantized folded weight's product
        divided back by the folding factor (the unfolded layer, quantized), plus the unfolded
        bias, normalized with the batch's statistics, then the fused activation."""
        bn = self.batch_norms[str(layer)]
        factor = bn.factor().float()
        factor = torch.where(factor.abs() > 1e-30, factor, torch.ones_like(factor))  # a dead channel's product is 0
        plain = {**node.attrs, "activation": "none"}
        y = _OPS[node.op](xs[:2], plain, node)
        shape = [1, -1] + [1] * (y.ndim - 2)
        y = y / factor.reshape(shape) + self._bias(layer).reshape(shape)
        return _activation(bn.normalize(y), node.attrs)

    def trained_qdq_graph(self) -> Graph:
        """The QDQ graph with the trained weights (quantized as the forward quantizes them), biases
        and activation scales: what ``qcompiler.compile`` lowers."""
        from .pass_manager import Instruments, run_pipeline
        from .passes.insert_qdq import attach_quantized_weight

        graph = self.qdq.copy()
        position = {id(n): i for i, n in enumerate(self.qdq.nodes)}
        layers = [graph.nodes[position[id(n)]] for n in self._layers]
        pairs = [graph.nodes[position[id(q)]] for q in self._pairs]
        for i, (node, (q, scale)) in enumerate(zip(layers, self._quantized_weights())):
            attach_quantized_weight(graph, node, traits_of(node.op).weight_slot, q, scale,
                                    self.scheme.int4_groups(node))
            if self._has_bias[i]:
                node.inputs[2] = graph.add_constant(f"{node.inputs[2].name}.trained",
                                                    self._layer(i)[1].detach().numpy().astype(np.float32))
        for p, quantize in enumerate(pairs):
            scale = graph.add_constant(f"{quantize.inputs[1].name}.trained",
                                       np.asarray(self._scale(p).detach().numpy(), np.float32))
            for user in graph.users_of(quantize.outputs[0]):
                if user.op == "dequantize":
                    user.inputs[1] = scale
            quantize.inputs[1] = scale
        run_pipeline(graph, "eliminate-dead-code", Instruments(emit=lambda s: None))
        graph.remove_unused_constants()
        return graph


def _run_const(graph: Graph, node: Node) -> np.ndarray:
    """A node of constants, evaluated (a dequantized constant operand)."""
    from .ir.ops import get_op

    return get_op(node.op).run([graph.constant_array(v) for v in node.inputs], node.attrs)[0]


def _per_row(scale: np.ndarray, ndim: int) -> np.ndarray:
    return scale.reshape((-1,) + (1,) * (ndim - 1)) if scale.ndim else scale


def prepare(model: torch.nn.Module, example_inputs: Sequence[Any], calibration: Any,
            config: QuantConfig | None = None, bn_steps: int = 0) -> QATModel:
    """A torch module computing what ``model``'s quantized build computes, to fine-tune with an
    ordinary training loop; ``qcompiler.compile(prepared, example_inputs, target=...)`` builds it
    with what it learned. ``calibration`` sets the starting ranges (as for ``compile``).
    ``bn_steps``: for that many training forwards, batch norms folded into a conv or linear
    normalize with the batch's statistics and update their running ones (the data the model
    is fine-tuned on may not be the data it was trained on); then, and in eval mode, they are
    frozen and folded. 0: frozen from the start."""
    if bn_steps < 0:
        raise QCompilerError(f"qat: bn_steps must be >= 0, got {bn_steps}")
    from .capture import from_torch
    from .quantize import quantize

    config = config or QuantConfig()
    if config.gptq:
        raise QCompilerError("qat: gptq rounds weights once at build time; training rounds them every step: "
                             "turn one off")
    if config.per_token in ("fallback", "all"):
        raise QCompilerError("qat: per-token dynamic layers have no activation scale to learn: use "
                             "per_token 'off' (or 'auto', which QAT treats as 'off')")
    config = dataclasses.replace(config, per_token="off")  # training learns static scales
    captured = from_torch(model, tuple(example_inputs))
    result = quantize(captured, calibration, config, lower=False)
    record = result.calibration
    scheme = config.scheme(tuple(record.exclude), tuple(record.int8_weights))
    return QATModel(captured, result.float_graph, result.qdq_graph, config, result.pipeline, scheme, bn_steps)
