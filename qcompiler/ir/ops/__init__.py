"""The op registry; importing this package declares every op."""
from . import elementwise, nn, quant, tensor  # noqa: F401  (declarations run on import)
from .registry import REQUIRED, Attr, OpDef, all_ops, declare, get_op

__all__ = ["REQUIRED", "Attr", "OpDef", "all_ops", "declare", "get_op"]
