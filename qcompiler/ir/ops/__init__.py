"""The op registry; importing this package declares every op."""
from . import elementwise, nn, quant, resize, tensor  # noqa: F401  (declarations run on import)
from .registry import REQUIRED, Attr, OpDef, Traits, all_ops, declare, get_op, ops_where, traits_of

__all__ = ["REQUIRED", "Attr", "OpDef", "Traits", "all_ops", "declare", "get_op", "ops_where", "traits_of"]
