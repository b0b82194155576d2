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

    def __init__(self, source: str, unsupported: dict[str, list[str]], bindable: list[str] | None = None):
        self.source = source
        self.unsupported = unsupported
        self.bindable = list(bindable or [])  # inputs whose fixed values would make the shapes static
        parts = [f"{op} (e.g. node '{names[0]}'" + (f", {len(names)} nodes)" if len(names) > 1 else ")")
                 for op, names in sorted(unsupported.items())]
        hint = (f"; fix the value of input(s) {', '.join(self.bindable)} with --input-value NAME=V0,V1,... "
                f"(input_values={{...}} in Python)") if self.bindable else ""
        super().__init__(f"{source}: unsupported op types: " + "; ".join(parts) + hint)


class ModelLoadError(QCompilerError):
    """A model file is missing, corrupt, not the format it claims, or fails to export."""


class InputError(QCompilerError):
    """Inputs given to a graph or compiled model do not match its signature."""
