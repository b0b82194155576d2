"""qcompiler: a quantizing model compiler. PyTorch or ONNX in; IR, passes, TVM modules out.

    import qcompiler
    graph = qcompiler.from_torch(model, (example,))     # or qcompiler.from_onnx("model.onnx")
    outputs = graph(example.numpy())                    # the reference interpreter
    qcompiler.save(graph, "model.qir")                  # text + model.npz; load_graph() reads it
"""
from .capture import from_onnx, from_torch
from .compare import LayerError, compare
from .compiled import CompiledModel, compile, load
from .errors import (InputError, ModelLoadError, ParseError, QCompilerError, UnsupportedOpError,
                     VerificationError)
from .interpreter import run
from .ir import Graph, Node, TensorType, Value, load_graph, parse_graph, print_graph, save, verify_graph
from .quant_config import CalibrationConfig, QuantConfig
from .quantize import QuantizeResult, quantize

__version__ = "0.1.0"

__all__ = ["CompiledModel", "compile", "load", "CalibrationConfig", "LayerError", "QuantConfig", "QuantizeResult", "compare", "quantize",
           "Graph", "InputError", "ModelLoadError", "Node", "ParseError", "QCompilerError", "TensorType",
           "UnsupportedOpError", "Value", "VerificationError", "from_onnx", "from_torch", "load_graph",
           "parse_graph", "print_graph", "run", "save", "verify_graph"]
