"""The graph IR. Knows nothing of passes or targets."""
from . import ops
from .graph import Graph, Node, Value
from .text import load_graph, parse_graph, print_graph, save
from .types import DTYPES, TensorType, dtype_name
from .verify import verify_graph

__all__ = ["DTYPES", "Graph", "Node", "TensorType", "Value", "dtype_name", "load_graph", "ops",
           "parse_graph", "print_graph", "save", "verify_graph"]
