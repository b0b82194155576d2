"""The ONNX "light" model zoo shipped in the onnx wheel (AlexNet, DenseNet-121, Inception v1/v2,
ResNet-50, ShuffleNet, SqueezeNet, VGG-19, ZFNet-512): the published architectures with their
weights replaced by ConstantOfShape fills. Each weight is re-materialized here with seeded random
values (He-scaled for weights, near one for scales and variances, near zero for biases and
means), so that the models compute something worth quantizing."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

LIGHT = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light"


def light_models() -> list[str]:
    return sorted(p.stem.removeprefix("light_") for p in LIGHT.glob("light_*.onnx"))


def _shape_of(graph: onnx.GraphProto, name: str) -> np.ndarray:
    for init in graph.initializer:
        if init.name == name:
            return numpy_helper.to_array(init)
    producer = next(n for n in graph.node if name in n.output and n.op_type == "Constant")
    return numpy_helper.to_array(producer.attribute[0].t)


def load_light(name: str, seed: int = 0) -> onnx.ModelProto:
    """The model with every ConstantOfShape weight an initializer of seeded random values."""
    model = onnx.load(LIGHT / f"light_{name}.onnx")
    graph, rng = model.graph, np.random.default_rng(seed)
    # scales and variances (BatchNormalization's operands 1 and 4, a Mul's constant) near one, so
    # that fifty layers neither vanish nor overflow; biases and means near zero
    near_one = {n.input[i] for n in graph.node if n.op_type == "BatchNormalization" for i in (1, 4)}
    near_one |= {name for n in graph.node if n.op_type == "Mul" for name in n.input}
    # residual sums (ResNet, ShuffleNet) add each block's variance to its input's: batch-norm
    # scales of one half keep sixteen blocks from compounding it past max_abs_range
    residual = any(n.op_type == "Sum" for n in graph.node)
    gammas = {n.input[1] for n in graph.node if n.op_type == "BatchNormalization"} if residual else set()
    kept = []
    for node in graph.node:
        if node.op_type != "ConstantOfShape":
            kept.append(node)
            continue
        shape = tuple(int(d) for d in _shape_of(graph, node.input[0]))
        if len(shape) > 1:  # a weight: He initialization over its fan-in
            values = rng.standard_normal(shape) * np.sqrt(2.0 / max(int(np.prod(shape[1:])), 1))
        elif node.output[0] in near_one:
            values = (0.5 if node.output[0] in gammas else 1.0) + 0.1 * np.abs(rng.standard_normal(shape))
        else:  # a bias or a mean
            values = 0.1 * rng.standard_normal(shape)
        graph.initializer.append(numpy_helper.from_array(values.astype(np.float32), node.output[0]))
    del graph.node[:]
    graph.node.extend(kept)
    weights = {init.name for init in graph.initializer}
    data = [i for i in graph.input if i.name not in weights]
    del graph.input[:]
    graph.input.extend(data)
    model.ir_version = max(model.ir_version, 4)  # initializers that are not inputs
    return model
