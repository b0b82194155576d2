"""The ONNX target: the QDQ graph as an ONNX model, for ONNX Runtime or TensorRT."""
from .export import OPSET, supported_ops, to_onnx

__all__ = ["OPSET", "supported_ops", "to_onnx"]
