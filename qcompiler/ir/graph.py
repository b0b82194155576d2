"""The graph IR: an SSA function of typed values, ordered nodes and named constants.

Values are identified by object, named for printing. Constants are values too (printed
``@name``) whose data lives in ``Graph.constants``; nodes never hold arrays themselves, so a
pass that rewrites weights replaces a constant, and the printer can elide big ones."""
from __future__ import annotations

import copy
import itertools
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from .packing import Int4Groups
from .types import TensorType

if TYPE_CHECKING:
    import networkx


# runs a graph on arrays; set by qcompiler.interpreter when it is imported (the IR knows nothing of it)
EVALUATOR: "Callable[[Graph, list[Any]], list[np.ndarray]] | None" = None


class Value:
    """One SSA value: a graph input, a constant, or one output of a node. ``range`` is the
    calibrated [min, max] of a float activation (set by range analysis, printed in the IR); on
    a constant, the range it is quantized over when that is wider than its own values (a
    position table cut to a shorter sequence shares the full table's grid)."""

    __slots__ = ("name", "type", "producer", "is_constant", "range")

    def __init__(self, name: str, type: TensorType, producer: "Node | None" = None,
                 is_constant: bool = False):
        self.name = name
        self.type = type
        self.producer = producer
        self.is_constant = is_constant
        self.range: tuple[float, float] | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        return self.type.shape

    @property
    def dtype(self) -> str:
        return self.type.dtype

    def __repr__(self) -> str:
        return f"{'@' if self.is_constant else '%'}{self.name}: {self.type}"


class Operands(list):
    """A node's inputs: a list that tells the node's graph of every change, so that the graph's
    use lists stay current however a pass edits them (``node.inputs[i] = v``, ``append``, ...)."""

    __slots__ = ("_node",)

    def __init__(self, values: Iterable[Value], node: Node):
        super().__init__(values)
        self._node = node


def _tracked(name: str) -> Callable[..., Any]:
    """``list.<name>``, then the node's graph told what the inputs were before."""
    def edit(self: Operands, *args: Any, **kwargs: Any) -> Any:
        before = list(self)
        result = getattr(list, name)(self, *args, **kwargs)
        self._node._inputs_changed(before)
        return self if name == "__iadd__" else result
    edit.__name__ = name
    return edit


for _name in ("__setitem__", "__delitem__", "__iadd__", "append", "extend", "insert", "pop", "remove", "clear",
              "sort", "reverse"):
    setattr(Operands, _name, _tracked(_name))


class Node:
    """One op application. ``meta`` carries ``source`` (the original torch/ONNX name) and
    ``handle`` (a debug handle, stable across passes, that ties a rewritten node to its origin).
    Its ``inputs`` keep the graph's use lists current (see :class:`Operands`)."""

    __slots__ = ("op", "_inputs", "outputs", "attrs", "meta", "_graph")

    def __init__(self, op: str, inputs: list[Value], outputs: list[Value],
                 attrs: dict[str, Any], meta: dict[str, Any]):
        self._graph: Graph | None = None
        self.op = op
        self._inputs = Operands(inputs, self)
        self.outputs = outputs
        self.attrs = attrs
        self.meta = meta

    @property
    def inputs(self) -> Operands:
        return self._inputs

    @inputs.setter
    def inputs(self, values: Iterable[Value]) -> None:
        before = list(self._inputs)
        self._inputs = Operands(values, self)
        self._inputs_changed(before)

    def _inputs_changed(self, before: list[Value]) -> None:
        if self._graph is not None:
            self._graph._track(self, before, list(self._inputs))

    @property
    def output(self) -> Value:
        """The single output; an error for multi-output nodes, where it would be ambiguous."""
        if len(self.outputs) != 1:
            raise ValueError(f"node {self.describe()} has {len(self.outputs)} outputs")
        return self.outputs[0]

    @property
    def handle(self) -> int:
        return int(self.meta["handle"])

    @property
    def source(self) -> str:
        return str(self.meta.get("source", ""))

    def describe(self) -> str:
        """``op 'source' (%out)``: how error messages name a node."""
        src = f" '{self.source}'" if self.source else ""
        outs = ", ".join("%" + v.name for v in self.outputs)
        return f"{self.op}{src} ({outs})"

    def __repr__(self) -> str:
        return f"<Node {self.describe()}>"


class Graph:
    """An SSA function: ``inputs`` -> ``nodes`` (topologically ordered) -> ``outputs``."""

    def __init__(self, name: str = "main"):
        self.name = name
        self.inputs: list[Value] = []
        self.nodes: list[Node] = []
        self._uses: dict[int, list[Node]] = {}  # id(value) -> the nodes reading it, kept as edits happen
        self.outputs: list[Value] = []
        self.constants: dict[str, np.ndarray] = {}
        self.storage: dict[str, Int4Groups] = {}  # constants stored packed (``ir.packing``)
        self._const_values: dict[str, Value] = {}
        self._names: set[str] = set()
        self._counter = itertools.count()
        self._handles = itertools.count()

    # ---- construction -------------------------------------------------------------------
    def fresh_name(self, hint: str | None = None) -> str:
        """A value name unused in this graph: ``hint`` if free, else ``hint_N``, else a number."""
        if hint and hint not in self._names:
            return hint
        while True:
            name = f"{hint}_{next(self._counter)}" if hint else str(next(self._counter))
            if name not in self._names:
                return name

    def _claim(self, name: str) -> str:
        if name in self._names:
            raise ValueError(f"value name '%{name}' is already defined")
        self._names.add(name)
        return name

    def has_value_name(self, name: str) -> bool:
        return name in self._names

    def rename_value(self, value: Value, name: str) -> None:
        if value.is_constant:
            raise ValueError("constants are renamed through add_constant")
        self._names.discard(value.name)
        value.name = self._claim(name)

    def add_input(self, name: str, type: TensorType) -> Value:
        value = Value(self._claim(name), type)
        self.inputs.append(value)
        return value

    def add_constant(self, name: str, array: np.ndarray, *, unique: bool = True,
                     storage: Int4Groups | None = None) -> Value:
        """Register ``array`` under ``name`` (made unique unless ``unique=False``, which
        replaces an existing constant of that name) and return its value. ``storage``: how the
        array is stored (an int8 weight that holds 4-bit values per group); it must fit."""
        array = np.asarray(array)
        if storage is not None and storage.multipliers(array) is None:
            raise ValueError(f"constant @{name} ({array.dtype}{list(array.shape)}) does not fit storage {storage}")
        if unique:
            base, i = name, 0
            while name in self.constants:
                i += 1
                name = f"{base}_{i}"
        self.constants[name] = array
        self.storage.pop(name, None)
        if storage is not None:
            self.storage[name] = storage
        value = Value(name, TensorType.of(array), is_constant=True)
        self._const_values[name] = value
        return value

    def constant_value(self, name: str) -> Value:
        return self._const_values[name]

    def constant_array(self, value: Value) -> np.ndarray:
        return self.constants[value.name]

    def constant_nbytes(self, name: str) -> int:
        """Bytes the constant takes stored (packed where it is)."""
        array = self.constants[name]
        return self.storage[name].nbytes(array) if name in self.storage else int(array.nbytes)

    def add_node(self, op: str, inputs: Sequence[Value], attrs: dict[str, Any] | None = None, *,
                 name: str | None = None, output_names: Sequence[str] | None = None,
                 num_outputs: int | None = None,
                 output_types: Sequence[TensorType] | None = None,
                 meta: dict[str, Any] | None = None, before: Node | None = None) -> Node:
        """Append (or insert before ``before``) a node; output types are inferred from the op
        registry unless given. Output values are named ``name``, ``name.1``, ... (made unique),
        or exactly ``output_names``. Attributes are checked and completed with defaults."""
        from .ops import get_op  # local: ops imports graph-free helpers only

        opdef = get_op(op)
        attrs = opdef.normalize_attrs(dict(attrs or {}), where=op)
        if output_types is None:
            output_types = opdef.infer([v.type for v in inputs], attrs)
        if num_outputs is not None and num_outputs != len(output_types):
            raise ValueError(f"{op}: expected {num_outputs} outputs, inferred {len(output_types)}")
        meta = dict(meta or {})
        if "handle" not in meta:
            meta["handle"] = next(self._handles)
        else:
            self.note_handle(int(meta["handle"]))
        node = Node(op, list(inputs), [], attrs, meta)
        if output_names is not None and len(output_names) != len(output_types):
            raise ValueError(f"{op}: {len(output_names)} names for {len(output_types)} outputs")
        for i, t in enumerate(output_types):
            if output_names is not None:
                value_name = output_names[i]
            else:
                value_name = self.fresh_name(name if i == 0 else (f"{name}.{i}" if name else None))
            node.outputs.append(Value(self._claim(value_name), t, node))
        if before is None:
            self.nodes.append(node)
        else:
            self.nodes.insert(self.nodes.index(before), node)
        node._graph = self
        self._track(node, [], list(node.inputs))
        return node

    def _track(self, node: Node, before: list[Value], after: list[Value]) -> None:
        """Move ``node``'s uses from the values it read to those it reads now."""
        for v in before:
            readers = self._uses.get(id(v))
            if readers is not None and node in readers:
                readers.remove(node)
                if not readers:
                    del self._uses[id(v)]
        for v in after:
            self._uses.setdefault(id(v), []).append(node)

    def users_of(self, value: Value) -> list[Node]:
        """The nodes reading ``value`` (once per operand that reads it), from the use lists the
        graph keeps: no scan over the graph."""
        return list(self._uses.get(id(value), ()))

    def note_handle(self, handle: int) -> None:
        """Make sure handles given later are larger than ``handle`` (parser, copies)."""
        current = next(self._handles)
        self._handles = itertools.count(max(current, handle + 1))

    def set_outputs(self, outputs: Iterable[Value]) -> None:
        self.outputs = list(outputs)

    def name_outputs(self, names: Sequence[str]) -> None:
        """Give the outputs these names again: rewrites replace an output value (a quantized
        model's last node is a new dequantize), and a model's output names are its interface.
        A value holding a wanted name is renamed out of the way; inputs and constants keep theirs."""
        holders = {v.name: v for v in self.inputs + [v for n in self.nodes for v in n.outputs]}
        done: set[int] = set()
        for value, name in zip(self.outputs, names):
            if value.name == name or value.is_constant or value in self.inputs or id(value) in done:
                continue
            holder = holders.get(name)
            if holder is not None:
                if holder in self.inputs:
                    continue
                self.rename_value(holder, self.fresh_name(name))
                holders[holder.name] = holder
            del holders[value.name]
            self.rename_value(value, name)
            holders[name] = value
            done.add(id(value))

    # ---- queries and edits --------------------------------------------------------------
    def users(self) -> dict[Value, list[Node]]:
        """Map from each value to the nodes that read it, in node order."""
        uses: dict[Value, list[Node]] = {}
        for node in self.nodes:
            for v in node.inputs:
                uses.setdefault(v, []).append(node)
        return uses

    def replace_all_uses(self, old: Value, new: Value) -> None:
        for node in dict.fromkeys(self.users_of(old)):  # each reader once, however many operands
            node.inputs = [new if v is old else v for v in node.inputs]
        self.outputs = [new if v is old else v for v in self.outputs]

    def live_nodes(self) -> list[Node]:
        """The nodes some output depends on, in graph order."""
        live = {id(v) for v in self.outputs}
        kept = []
        for node in reversed(self.nodes):
            if any(id(v) in live for v in node.outputs):
                live.update(id(v) for v in node.inputs)
                kept.append(node)
        return kept[::-1]

    def remove_node(self, node: Node) -> None:
        """Remove ``node``, which nothing may still read (rewire its users first, as torch.fx's
        ``erase_node`` insists): a dangling use is caught where it is made, not by the verifier
        after the pass. A violation is a bug in the caller, hence ValueError."""
        produced = {id(v) for v in node.outputs}
        readers = [n for v in node.outputs for n in self.users_of(v) if n is not node]
        if readers or any(id(v) in produced for v in self.outputs):
            what = ", ".join(n.describe() for n in readers[:3]) or "the graph's outputs"
            raise ValueError(f"remove_node: {node.describe()} is still read by {what}; replace its uses first")
        self.nodes.remove(node)
        self._track(node, list(node.inputs), [])
        node._graph = None
        for v in node.outputs:
            self._names.discard(v.name)

    def remove_unused_constants(self) -> int:
        used = {v.name for n in self.nodes for v in n.inputs if v.is_constant}
        used |= {v.name for v in self.outputs if v.is_constant}
        dead = [k for k in self.constants if k not in used]
        for k in dead:
            del self.constants[k]
            del self._const_values[k]
            self.storage.pop(k, None)
        return len(dead)

    def op_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for node in self.nodes:
            counts[node.op] = counts.get(node.op, 0) + 1
        return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))

    def copy(self) -> "Graph":
        """A structural copy: new values and nodes (attributes deep-copied, meta copied), the same
        constant arrays (the IR treats them as immutable). Built directly rather than printed and
        parsed: the searches copy a graph per trial, and the text round trip (0.09 s on MiniLM)
        was 40 % of SmoothQuant's per-group search. A node reading a constant by a stale value
        object reads the constant of that name, as the text form would."""
        copied = Graph(self.name)
        mapped: dict[int, Value] = {}

        def clone(value: Value, producer: Node | None = None) -> Value:
            twin = Value(value.name, value.type, producer, value.is_constant)
            twin.range = value.range
            mapped[id(value)] = twin
            return twin

        def lookup(value: Value, where: str) -> Value:
            twin = mapped.get(id(value))
            if twin is None and value.is_constant and value.name in copied._const_values:
                twin = copied._const_values[value.name]
            if twin is None:
                raise ValueError(f"{where} reads %{value.name}, which this graph does not define")
            return twin

        copied.constants, copied.storage = dict(self.constants), dict(self.storage)
        copied._const_values = {name: clone(v) for name, v in self._const_values.items()}
        copied.inputs = [clone(v) for v in self.inputs]
        for node in self.nodes:
            twin = Node(node.op, [lookup(v, node.describe()) for v in node.inputs], [], copy.deepcopy(node.attrs),
                        dict(node.meta))
            twin.outputs = [clone(v, twin) for v in node.outputs]
            twin._graph = copied
            copied.nodes.append(twin)
            copied._track(twin, [], list(twin.inputs))
        copied.outputs = [lookup(v, "the graph's return") for v in self.outputs]
        copied._names = set(self._names)
        handle = next(self._handles)  # the next handle, shared by both from here on
        self._handles, copied._handles = itertools.count(handle), itertools.count(handle)
        return copied

    def to_networkx(self) -> "networkx.MultiDiGraph":
        """Nodes are node indices (plus ``in:NAME`` / ``out:i`` terminals); edges carry the value."""
        import networkx as nx

        g = nx.MultiDiGraph()
        producer: dict[Value, str] = {}
        for v in self.inputs:
            g.add_node(f"in:{v.name}", label=v.name, kind="input")
            producer[v] = f"in:{v.name}"
        for i, node in enumerate(self.nodes):
            g.add_node(i, label=node.op, kind="op", node=node)
            for v in node.inputs:
                if v in producer:
                    g.add_edge(producer[v], i, value=v)
            for v in node.outputs:
                producer[v] = i
        for i, v in enumerate(self.outputs):
            g.add_node(f"out:{i}", label=v.name, kind="output")
            if v in producer:
                g.add_edge(producer[v], f"out:{i}", value=v)
        return g

    # ---- running --------------------------------------------------------------------------
    def __call__(self, *inputs: Any) -> list[np.ndarray]:
        """Run the reference interpreter on numpy arrays (or torch tensors). The IR does not
        import the interpreter: ``qcompiler.interpreter`` installs itself here (``EVALUATOR``),
        and ``import qcompiler`` imports it."""
        if EVALUATOR is None:
            raise RuntimeError("no interpreter: import qcompiler (or qcompiler.interpreter) to run graphs")
        return EVALUATOR(self, list(inputs))

    def __str__(self) -> str:
        from .text import print_graph

        return print_graph(self)
