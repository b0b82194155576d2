"""Passes as values: a pass is a frozen dataclass whose fields are its options, registered
under its CLI name. A pipeline string parses to passes and prints back to the same string:

    fold-constants{max_elements=4096},eliminate-dead-code,fold-batchnorm

Rewrites are small rules (match a node, build a replacement) run to a fixpoint by one driver
that counts hits per rule; each rule's docstring states the identity it relies on."""
from __future__ import annotations

import dataclasses
import typing
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from .errors import QCompilerError
from .ir import Graph, Node


class PipelineError(QCompilerError):
    """A pipeline string names an unknown pass or a bad option."""


@dataclass
class PassContext:
    """What passes need beyond their options (which are their fields, and nothing else):
    calibration data for range analysis, and a report that passes append to (ops kept in
    float, rule hits)."""

    calibration: Any = None  # calibration batches (see qcompiler.calibration)
    progress: bool = False  # show progress bars (CLI) or stay quiet (tests, API default)
    report: dict[str, Any] = field(default_factory=dict)
    # what a pass decided from the data that a calibration record keeps (smooth-quant's factors)
    decisions: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Pass:
    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""

    def run(self, graph: Graph, ctx: PassContext) -> bool:
        """Transform ``graph`` in place; return whether anything changed."""
        raise NotImplementedError

    def __str__(self) -> str:
        opts = []
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value != f.default:
                opts.append(f"{f.name}={','.join(map(str, value)) if isinstance(value, tuple) else _fmt(value)}")
        return self.name + ("{" + ",".join(opts) + "}" if opts else "")


def _fmt(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


_PASSES: dict[str, type[Pass]] = {}


def register(cls: type[Pass]) -> type[Pass]:
    if not cls.name or cls.name in _PASSES:
        raise ValueError(f"pass {cls.__name__} needs a unique name")
    _PASSES[cls.name] = cls
    return cls


def registered_passes() -> dict[str, type[Pass]]:
    """The passes registered so far, by name. This module imports no pass: the standard ones
    register when ``qcompiler.passes`` is imported (``qcompiler.pass_manager`` does), a test's
    or a user's own with ``@register`` wherever they are defined."""
    return dict(sorted(_PASSES.items()))


def _convert(cls: type[Pass], key: str, raw: list[str]) -> Any:
    hints = typing.get_type_hints(cls)
    if key not in hints or key not in {f.name for f in dataclasses.fields(cls)}:
        raise PipelineError(f"pass '{cls.name}' has no option '{key}'")
    kind = hints[key]
    try:
        if kind is bool:
            if raw[0] not in ("true", "false"):
                raise ValueError
            return raw[0] == "true"
        if kind in (int, float, str):
            if len(raw) != 1:
                raise ValueError
            return kind(raw[0])
        return tuple(raw)  # tuple[str, ...]
    except ValueError:
        raise PipelineError(f"pass '{cls.name}': bad value {','.join(raw)!r} for option '{key}'") from None


def parse_pipeline(text: str, registry: Mapping[str, type[Pass]] | None = None) -> list[Pass]:
    """``"a,b{k=v,list=x,y}"`` -> ``[A(), B(k=v, list=("x", "y"))]``, the names looked up in
    ``registry`` (by default, the passes registered so far)."""
    return [pass_ for pass_, _ in parse_pipeline_given(text, registry)]


def parse_pipeline_given(text: str, registry: Mapping[str, type[Pass]] | None = None
                         ) -> list[tuple[Pass, frozenset[str]]]:
    """Each pass with the names of the options the text gives it (a default written out counts)."""
    passes = dict(registry) if registry is not None else registered_passes()
    result: list[tuple[Pass, frozenset[str]]] = []
    i, text = 0, text.strip()
    while i < len(text):
        j = i
        while j < len(text) and text[j] not in ",{":
            j += 1
        name = text[i:j].strip()
        if name not in passes:
            raise PipelineError(f"unknown pass '{name}' (known: {', '.join(passes)})" if passes else
                                f"unknown pass '{name}': no pass is registered (import qcompiler.passes)")
        options: dict[str, list[str]] = {}
        if j < len(text) and text[j] == "{":
            end = text.find("}", j)
            if end < 0:
                raise PipelineError(f"pass '{name}': unclosed '{{'")
            key = None
            for item in filter(None, (s.strip() for s in text[j + 1:end].split(","))):
                if "=" in item:
                    key, value = (s.strip() for s in item.split("=", 1))
                    options[key] = [value]
                elif key is None:
                    raise PipelineError(f"pass '{name}': option '{item}' needs a name (name=value)")
                else:
                    options[key].append(item)  # a list option: ops=relu,relu6
            j = end + 1
        cls = passes[name]
        result.append((cls(**{k: _convert(cls, k, v) for k, v in options.items()}), frozenset(options)))
        if j < len(text) and text[j] != ",":
            raise PipelineError(f"expected ',' after pass '{name}'")
        i = j + 1
    return result


def print_pipeline(passes: Iterable[Pass]) -> str:
    return ",".join(str(p) for p in passes)


# ---- the rewrite driver ------------------------------------------------------------------------------
Rule = Callable[[Graph, Node], bool]


def matches(*ops: str) -> Callable[[Rule], Rule]:
    """Declare the ops a rule can fire on (the root node's op): ``apply_rules`` offers it only
    nodes of those ops. A rule without the declaration is offered every node."""
    def declare(rule: Rule) -> Rule:
        rule.ops = frozenset(ops)  # type: ignore[attr-defined]
        return rule
    return declare


def apply_rules(graph: Graph, rules: Sequence[Rule], max_rounds: int = 100) -> dict[str, int]:
    """Offer every node to the rules that match its op (``@matches``), in order, until none
    fires; a rule returns True when it rewrote. Returns hits per rule name (counts are what
    `--timing`/statistics report)."""
    hits = {rule.__name__: 0 for rule in rules}
    by_op: dict[str, list[Rule]] = {}

    def offered(op: str) -> list[Rule]:
        if op not in by_op:
            by_op[op] = [r for r in rules if getattr(r, "ops", None) is None or op in r.ops]
        return by_op[op]

    for _ in range(max_rounds):
        fired = False
        for node in list(graph.nodes):
            if node not in graph.nodes:  # removed by an earlier rewrite this round
                continue
            for rule in offered(node.op):
                if rule(graph, node):
                    hits[rule.__name__] += 1
                    fired = True
                    break
        if not fired:
            return hits
    raise QCompilerError(f"rewrite rules did not converge after {max_rounds} rounds: {hits}")
