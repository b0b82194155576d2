"""Capture: PyTorch (torch.export) and ONNX (onnx-graphsurgeon) models into the IR."""
from .from_onnx import from_onnx
from .from_torch import from_torch

__all__ = ["from_onnx", "from_torch"]
