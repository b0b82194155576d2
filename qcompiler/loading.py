"""Turning what a user names on the command line into a Graph: an ONNX file, a saved IR file,
or ``package.module:function`` returning ``(torch_module, example_inputs)``."""
from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from .errors import ModelLoadError
from .ir import Graph, load_graph


def load_model(spec: str, input_shapes: Mapping[str, Sequence[int]] | None = None) -> Graph:
    path = Path(spec)
    if path.suffix == ".onnx":
        from .capture import from_onnx

        return from_onnx(path, input_shapes)
    if path.suffix in (".qir", ".mlir", ".txt"):
        return load_graph(path)
    if ":" in spec and not path.exists():
        return _from_python(spec)
    if not path.exists():
        raise ModelLoadError(f"{spec}: no such file")
    raise ModelLoadError(f"{spec}: unknown model kind (expected .onnx, .qir, or module:function)")


def _from_python(spec: str) -> Graph:
    from .capture import from_torch

    module_name, _, func_name = spec.partition(":")
    sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except Exception as e:
        raise ModelLoadError(f"{spec}: cannot import {module_name} ({type(e).__name__}: {e})") from None
    finally:
        sys.path.pop(0)
    factory = getattr(module, func_name, None)
    if not callable(factory):
        raise ModelLoadError(f"{spec}: {module_name} has no function {func_name}")
    result = factory()
    if not (isinstance(result, tuple) and len(result) == 2):
        raise ModelLoadError(f"{spec}: must return (torch_module, example_inputs)")
    model, example = result
    return from_torch(model, example)


def parse_shapes(items: Sequence[str]) -> dict[str, list[int]]:
    """``["x=1,3,224,224"]`` -> ``{"x": [1, 3, 224, 224]}``."""
    shapes: dict[str, list[int]] = {}
    for item in items:
        name, sep, dims = item.partition("=")
        try:
            if not sep or not name:
                raise ValueError
            shapes[name] = [int(d) for d in dims.split(",")]
        except ValueError:
            raise ModelLoadError(f"--input-shape {item!r}: expected NAME=D0,D1,...") from None
    return shapes
