"""One decorator factory for the tables that map a name to a function (importers' converters,
targets' lowering rules)."""
from __future__ import annotations

from collections.abc import Callable


def registrar(table: dict[str, Callable]) -> Callable[..., Callable[[Callable], Callable]]:
    """``@registers("OpA", "OpB")`` files the decorated function in ``table`` under each name."""
    def registers(*names: str) -> Callable[[Callable], Callable]:
        def register(fn: Callable) -> Callable:
            for name in names:
                table[name] = fn
            return fn
        return register
    return registers
