"""qcompiler: a quantizing model compiler. PyTorch or ONNX in; IR, passes, TVM modules out.

    import qcompiler
    graph = qcompiler.from_torch(model, (example,))     # or qcompiler.from_onnx("model.onnx")
    outputs = graph(example.numpy())                    # the reference interpreter
    qcompiler.save(graph, "model.qir")                  # text + model.npz; load_graph() reads it
"""
from . import interpreter  # noqa: F401  (installs itself as the IR's evaluator: graph(x))
from .compare import LayerError, compare  # (modules named like their functions load eagerly: the module
from .quantize import QuantizeResult, quantize  # would otherwise shadow the function once imported)
from .errors import (InputError, ModelLoadError, ParseError, QCompilerError, UnsupportedOpError,
                     VerificationError)
from .interpreter import run
from .ir import Graph, Node, TensorType, Value, load_graph, parse_graph, print_graph, save, verify_graph
from .quant_config import CalibrationConfig, LowRank, QuantConfig
from .rpc import RPC

__version__ = "0.1.0"

# what needs torch, TVM or onnx loads on first use: `import qcompiler.ir` stays light
_LAZY = {"from_onnx": "capture", "from_torch": "capture", "CompiledModel": "compiled", "compile": "compiled",
         "load": "compiled"}


def __getattr__(name: str):
    if name == "qat":  # a submodule that imports torch: qcompiler.qat.prepare(...) without importing it first
        import importlib

        return importlib.import_module(".qat", __name__)
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'qcompiler' has no attribute {name!r}")


__all__ = ["CompiledModel", "compile", "load", "CalibrationConfig", "LayerError", "LowRank", "QuantConfig", "QuantizeResult", "RPC",
           "compare", "quantize", "Graph", "InputError", "ModelLoadError", "Node", "ParseError", "QCompilerError",
           "TensorType", "UnsupportedOpError", "Value", "VerificationError", "from_onnx", "from_torch", "load_graph",
           "parse_graph", "print_graph", "run", "save", "verify_graph"]
