"""Error types. Every error the user can cause is one of these, and its text is one line
saying what went wrong and where (op, node, file, line), so the CLI can print it verbatim."""
from __future__ import annotations


class QCompilerError(Exception):
    """Base of every error qcompiler raises on purpose; ``str(e)`` is the one-line message."""


class ParseError(QCompilerError):
    """The textual IR is malformed; the message carries ``file:line:col``."""


class VerificationError(QCompilerError):
    """A graph breaks an IR invariant (SSA, types, dangling uses, quantization parameters)."""


class UnsupportedOpError(QCompilerError):
    """The model uses ops qcompiler cannot capture. Lists every offending op type with a node
    name for each, so the user sees the whole problem at once, not one op per attempt."""

    def __init__(self, source: str, unsupported: dict[str, list[str]]):
        self.source = source
        self.unsupported = unsupported
        parts = [f"{op} (e.g. node '{names[0]}'" + (f", {len(names)} nodes)" if len(names) > 1 else ")")
                 for op, names in sorted(unsupported.items())]
        super().__init__(f"{source}: unsupported op types: " + "; ".join(parts))


class ModelLoadError(QCompilerError):
    """A model file is missing, corrupt, not the format it claims, or fails to export."""


class InputError(QCompilerError):
    """Inputs given to a graph or compiled model do not match its signature."""
