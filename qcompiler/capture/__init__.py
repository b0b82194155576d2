"""Capture: PyTorch (torch.export) and ONNX (onnx-graphsurgeon) models into the IR.

The torch importer loads on first use: reading an ONNX file does not import torch (1.6 s of
every CLI command's start)."""
from __future__ import annotations

from typing import Any

from .from_onnx import from_onnx

__all__ = ["from_onnx", "from_torch"]


def __getattr__(name: str) -> Any:
    if name == "from_torch":
        from .torch_export import from_torch

        return from_torch
    raise AttributeError(f"module 'qcompiler.capture' has no attribute {name!r}")
