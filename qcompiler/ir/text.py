"""The textual IR: a printer and a parser that round-trip exactly.

    func @main(%x: f32[1,3,8,8]) -> f32[1,4] {
      const @fc.weight : f32[4,48]              // data in the .npz beside the text
      const @shape : i64[2] = [1, 48]           // small constants print inline
      %0 = conv2d(%x, @c.weight) {pads=[1,1,1,1]} : f32[1,3,8,8] loc(#0 "c")
      return %0
    }

Attributes equal to their schema default are not printed (the parser fills them back in), so
the text shows only what is particular to a node. ``loc(#handle "source")`` carries the debug
handle and the source name through passes and files."""
from __future__ import annotations

import io
import json
import math
import os
import re
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ParseError, QCompilerError
from ..files import atomic_write
from .graph import Graph, Node, Value
from .packing import MULTIPLIERS, NIBBLES, parse_storage
from .ops import get_op
from .types import DTYPES, MAX_CONSTANT_BYTES, TensorType, dtype_name

INLINE_LIMIT = 16  # constants with at most this many elements print inline
_BARE_NAME = re.compile(r"^[A-Za-z0-9_][\w.$]*$")


# ---- printing ---------------------------------------------------------------------------------
def _name(sigil: str, name: str) -> str:
    return sigil + (name if _BARE_NAME.match(name) else json.dumps(name))


def _ref(v: Value) -> str:
    return _name("@" if v.is_constant else "%", v.name)


def _scalar(v: Any) -> str:
    if isinstance(v, (bool, np.bool_)):
        return "true" if v else "false"
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    if isinstance(v, (float, np.floating)):
        f = float(v)
        if math.isnan(f):
            return "nan"
        if math.isinf(f):
            return "inf" if f > 0 else "-inf"
        text = repr(f)
        return text if any(c in text for c in ".en") else text + ".0"
    if isinstance(v, str):
        return json.dumps(v)
    raise TypeError(f"cannot print attribute value {v!r}")


def _element(x: np.generic) -> str:
    """A constant's element in the shortest text that parses back to the same value of its
    own dtype (numpy prints float32 0.1 as '0.1', not as the float64 0.10000000149...)."""
    if isinstance(x, np.floating) and np.isfinite(x):
        text = str(x)
        return text if any(c in text for c in ".en") else text + ".0"
    return _scalar(x.item())


def _attr_value(v: Any) -> str:
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(_scalar(x) for x in v) + "]"
    return _scalar(v)


def _typed(v: Value) -> str:
    """``f32[1,8]``, with `` range(lo, hi)`` once range analysis has calibrated the value."""
    if v.range is None:
        return str(v.type)
    return f"{v.type} range({_scalar(v.range[0])}, {_scalar(v.range[1])})"


def print_node(node: Node) -> str:
    opdef = get_op(node.op)
    shown = {k: v for k, v in node.attrs.items() if not opdef.is_default(k, v)}
    text = ", ".join(_ref(v) for v in node.outputs) + f" = {node.op}("
    text += ", ".join(_ref(v) for v in node.inputs) + ")"
    if shown:
        text += " {" + ", ".join(f"{k}={_attr_value(v)}" for k, v in sorted(shown.items())) + "}"
    text += " : " + ", ".join(_typed(v) for v in node.outputs)
    source = node.meta.get("source")
    text += f" loc(#{node.meta['handle']}" + (f" {json.dumps(source)}" if source else "") + ")"
    return text


def print_graph(graph: Graph, elide_above: int | None = INLINE_LIMIT) -> str:
    """The text of ``graph``; constants larger than ``elide_above`` elements print as a
    declaration only (``None`` prints every constant inline)."""
    params = ", ".join(f"{_ref(v)}: {_typed(v)}" for v in graph.inputs)
    results = [str(v.type) for v in graph.outputs]
    result_text = results[0] if len(results) == 1 else "(" + ", ".join(results) + ")"
    lines = [f"func {_name('@', graph.name)}({params}) -> {result_text} {{"]
    for name, array in graph.constants.items():
        calibrated = graph.constant_value(name).range  # a constant quantized over more than its values
        line = f"  const {_name('@', name)} : {TensorType.of(array)}" + (
            f" range({_scalar(calibrated[0])}, {_scalar(calibrated[1])})" if calibrated is not None else "")
        if name in graph.storage:
            line += f' stored "{graph.storage[name]}"'
        if elide_above is None or array.size <= elide_above:
            line += " = [" + ", ".join(_element(x) for x in array.reshape(-1)) + "]"
        lines.append(line)
    lines += ["  " + print_node(n) for n in graph.nodes]
    lines.append("  return " + ", ".join(_ref(v) for v in graph.outputs))
    lines.append("}")
    return "\n".join(lines) + "\n"


# ---- parsing ----------------------------------------------------------------------------------
_TOKEN = re.compile(r"""
    (?P<ws>[ \t\r]+) | (?P<nl>\n) | (?P<comment>//[^\n]*)
  | (?P<value>%(?:[A-Za-z0-9_][\w.$]*|"(?:[^"\\]|\\.)*"))
  | (?P<const>@(?:[A-Za-z0-9_][\w.$]*|"(?:[^"\\]|\\.)*"))
  | (?P<handle>\#\d+)
  | (?P<number>-?(?:\d+\.\d*(?:[eE][-+]?\d+)?|\d+[eE][-+]?\d+|\d+|inf(?!\w)|nan(?!\w)))
  | (?P<ident>[A-Za-z_][\w.]*)
  | (?P<string>"(?:[^"\\]|\\.)*")
  | (?P<arrow>->)
  | (?P<punct>[(){}\[\],:=])
""", re.VERBOSE)


class _Tok:
    __slots__ = ("kind", "text", "line", "col")

    def __init__(self, kind: str, text: str, line: int, col: int):
        self.kind, self.text, self.line, self.col = kind, text, line, col


def _tokenize(text: str, filename: str) -> list[_Tok]:
    tokens: list[_Tok] = []
    pos, line, line_start = 0, 1, 0
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if not m:
            raise ParseError(f"{filename}:{line}:{pos - line_start + 1}: unexpected character {text[pos]!r}")
        kind = m.lastgroup or ""
        if kind == "nl":
            line, line_start = line + 1, m.end()
        elif kind not in ("ws", "comment"):
            tokens.append(_Tok(kind, m.group(), line, pos - line_start + 1))
        pos = m.end()
    tokens.append(_Tok("eof", "", line, pos - line_start + 1))
    return tokens


def _unquote(sigiled: str) -> str:
    body = sigiled[1:]
    return json.loads(body) if body.startswith('"') else body


def _number(text: str) -> int | float:
    if text in ("inf", "-inf", "nan", "-nan"):
        return float(text)
    return float(text) if any(c in text for c in ".eE") else int(text)


class _Parser:
    def __init__(self, text: str, filename: str, constants: Mapping[str, np.ndarray] | None):
        self.toks = _tokenize(text, filename)
        self.i = 0
        self.filename = filename
        self.constants = constants or {}
        self.graph: Graph | None = None
        self.values: dict[str, Value] = {}

    # token helpers
    @property
    def tok(self) -> _Tok:
        return self.toks[self.i]

    def error(self, msg: str, tok: _Tok | None = None) -> ParseError:
        tok = tok or self.tok
        return ParseError(f"{self.filename}:{tok.line}:{tok.col}: {msg}")

    def next(self) -> _Tok:
        tok = self.tok
        self.i += 1
        return tok

    def expect(self, kind: str, text: str | None = None) -> _Tok:
        tok = self.tok
        if tok.kind != kind or (text is not None and tok.text != text):
            want = repr(text) if text else {"eof": "end of file", "value": "a %value", "const": "an @name"}.get(kind, kind)
            raise self.error(f"expected {want}, found {tok.text!r}" if tok.text else f"expected {want}, found end of file")
        return self.next()

    def accept(self, kind: str, text: str | None = None) -> bool:
        if self.tok.kind == kind and (text is None or self.tok.text == text):
            self.i += 1
            return True
        return False

    # grammar
    def parse_type(self) -> TensorType:
        tok = self.expect("ident")
        if tok.text not in DTYPES:
            raise self.error(f"unknown dtype '{tok.text}'", tok)
        self.expect("punct", "[")
        dims: list[int] = []
        while not self.accept("punct", "]"):
            if dims:
                self.expect("punct", ",")
            d = self.expect("number")
            if not d.text.isdigit():
                raise self.error(f"bad dimension {d.text!r}", d)
            dims.append(int(d.text))
        return TensorType(tuple(dims), tok.text)

    def parse_range(self) -> tuple[float, float] | None:
        if not self.accept("ident", "range"):
            return None
        self.expect("punct", "(")
        lo = float(self.parse_scalar())
        self.expect("punct", ",")
        hi = float(self.parse_scalar())
        self.expect("punct", ")")
        return (lo, hi)

    def parse_scalar(self) -> Any:
        tok = self.next()
        if tok.kind == "number":
            return _number(tok.text)
        if tok.kind == "ident" and tok.text in ("true", "false"):
            return tok.text == "true"
        if tok.kind == "string":
            return json.loads(tok.text)
        raise self.error(f"expected a value, found {tok.text!r}", tok)

    def parse_list(self) -> list[Any]:
        self.expect("punct", "[")
        items: list[Any] = []
        while not self.accept("punct", "]"):
            if items:
                self.expect("punct", ",")
            items.append(self.parse_scalar())
        return items

    def operand(self) -> Value:
        tok = self.next()
        if tok.kind == "value":
            name = _unquote(tok.text)
            if name not in self.values:
                raise self.error(f"use of undefined value %{name}", tok)
            return self.values[name]
        if tok.kind == "const":
            name = _unquote(tok.text)
            assert self.graph is not None
            if name not in self.graph.constants:
                raise self.error(f"use of undeclared constant @{name}", tok)
            return self.graph.constant_value(name)
        raise self.error(f"expected an operand, found {tok.text!r}", tok)

    def define(self, tok: _Tok) -> str:
        name = _unquote(tok.text)
        if name in self.values:
            raise self.error(f"value %{name} is defined twice", tok)
        return name

    def parse(self) -> Graph:
        self.expect("ident", "func")
        graph = self.graph = Graph(_unquote(self.expect("const").text))
        self.expect("punct", "(")
        while not self.accept("punct", ")"):
            if graph.inputs:
                self.expect("punct", ",")
            tok = self.expect("value")
            name = self.define(tok)
            self.expect("punct", ":")
            self.values[name] = graph.add_input(name, self.parse_type())
            self.values[name].range = self.parse_range()
        self.expect("arrow")
        if self.accept("punct", "("):
            result_types = [self.parse_type()]
            while self.accept("punct", ","):
                result_types.append(self.parse_type())
            self.expect("punct", ")")
        else:
            result_types = [self.parse_type()]
        self.expect("punct", "{")
        while True:
            tok = self.tok
            if tok.kind == "ident" and tok.text == "const":
                self.parse_const()
            elif tok.kind == "ident" and tok.text == "return":
                self.next()
                outs = [self.operand()]
                while self.accept("punct", ","):
                    outs.append(self.operand())
                graph.set_outputs(outs)
                got = [v.type for v in outs]
                if got != result_types:
                    raise self.error(f"return types {', '.join(map(str, got))} differ from the signature "
                                     f"{', '.join(map(str, result_types))}", tok)
                self.expect("punct", "}")
                self.expect("eof")
                return graph
            elif tok.kind == "value":
                self.parse_node()
            else:
                raise self.error(f"expected 'const', a node or 'return', found {tok.text!r}")

    def parse_const(self) -> None:
        self.next()
        tok = self.expect("const")
        name = _unquote(tok.text)
        assert self.graph is not None
        if name in self.graph.constants:
            raise self.error(f"constant @{name} is declared twice", tok)
        self.expect("punct", ":")
        ctype = self.parse_type()
        calibrated = self.parse_range()
        storage = None
        if self.accept("ident", "stored"):
            where = self.expect("string")
            try:
                storage = parse_storage(json.loads(where.text))
            except ValueError as e:
                raise self.error(f"constant @{name}: {e}", where) from None
        if storage is not None and name not in self.constants and name + NIBBLES in self.constants:
            try:
                array = storage.unpack(np.asarray(self.constants[name + NIBBLES]),
                                       np.asarray(self.constants[name + MULTIPLIERS]), ctype.shape)
            except (KeyError, ValueError) as e:
                raise self.error(f"constant @{name} stored {storage}: {e}", tok) from None
        elif self.accept("punct", "="):
            flat = self.parse_list()
            if len(flat) != ctype.size:
                raise self.error(f"constant @{name} has {len(flat)} values for type {ctype}", tok)
            array = np.array(flat, dtype=ctype.np_dtype).reshape(ctype.shape)
        elif name in self.constants:
            declared = getattr(self.constants, "type_of", None)  # check a lazy store before reading it
            if declared is not None and declared(name) != ctype:
                raise self.error(f"constant @{name}: data is {declared(name)}, text says {ctype}", tok)
            array = np.asarray(self.constants[name])
            if TensorType.of(array) != ctype:
                raise self.error(f"constant @{name}: data is {TensorType.of(array)}, text says {ctype}", tok)
        else:
            raise self.error(f"constant @{name} has no data (load the .npz saved beside the IR)", tok)
        try:
            self.graph.add_constant(name, array, unique=False, storage=storage).range = calibrated
        except ValueError as e:
            raise self.error(str(e), tok) from None

    def parse_node(self) -> None:
        assert self.graph is not None
        result_toks = [self.expect("value")]
        while self.accept("punct", ","):
            result_toks.append(self.expect("value"))
        names = [self.define(t) for t in result_toks]
        if len(set(names)) != len(names):
            raise self.error("a node defines the same value twice", result_toks[0])
        self.expect("punct", "=")
        op_tok = self.expect("ident")
        try:
            opdef = get_op(op_tok.text)
        except KeyError:
            raise self.error(f"unknown op '{op_tok.text}'", op_tok) from None
        self.expect("punct", "(")
        inputs: list[Value] = []
        while not self.accept("punct", ")"):
            if inputs:
                self.expect("punct", ",")
            inputs.append(self.operand())
        attrs: dict[str, Any] = {}
        if self.accept("punct", "{"):
            while not self.accept("punct", "}"):
                if attrs:
                    self.expect("punct", ",")
                key = self.expect("ident")
                if key.text in attrs:
                    raise self.error(f"attribute '{key.text}' given twice", key)
                self.expect("punct", "=")
                attrs[key.text] = self.parse_list() if self.tok.text == "[" else self.parse_scalar()
        self.expect("punct", ":")
        types = [self.parse_type()]
        ranges = [self.parse_range()]
        while self.accept("punct", ","):
            types.append(self.parse_type())
            ranges.append(self.parse_range())
        meta: dict[str, Any] = {}
        if self.accept("ident", "loc"):
            self.expect("punct", "(")
            meta["handle"] = int(self.expect("handle").text[1:])
            if self.tok.kind == "string":
                meta["source"] = json.loads(self.next().text)
            self.expect("punct", ")")
        where = f"{self.filename}:{op_tok.line}:{op_tok.col}"
        try:
            opdef.check_arity(len(inputs), where)
            node = self.graph.add_node(op_tok.text, inputs, attrs, output_names=names, output_types=types,
                                       meta=meta)
        except (TypeError, ValueError) as e:
            raise ParseError(str(e) if str(e).startswith(where) else f"{where}: {e}") from None
        for v, r in zip(node.outputs, ranges):
            v.range = r
            self.values[v.name] = v


def parse_graph(text: str, constants: Mapping[str, np.ndarray] | None = None, *,
                filename: str = "<string>", verify: bool = True) -> Graph:
    """Parse the textual IR. Elided constants take their data from ``constants``.
    The result is verified (types re-inferred) unless ``verify=False``."""
    graph = _Parser(text, filename, constants).parse()
    if verify:
        from .verify import verify_graph

        verify_graph(graph, where=filename)
    return graph


# ---- files ------------------------------------------------------------------------------------
def weights_path(path: str | os.PathLike) -> Path:
    return Path(path).with_suffix(".npz")


def save(graph: Graph, path: str | os.PathLike) -> Path:
    """Write ``graph`` as text to ``path`` and its elided constants to ``path`` with ``.npz``."""
    path = Path(path)
    if path.suffix == ".npz":
        raise QCompilerError(f"{path}: the IR text needs its own suffix (e.g. .qir); .npz holds its weights")
    elided = {}
    for k, v in graph.constants.items():
        if v.size <= INLINE_LIMIT:
            continue  # printed inline
        if k in graph.storage:
            elided[k + NIBBLES], elided[k + MULTIPLIERS] = graph.storage[k].pack(v)
        else:
            elided[k] = v
    atomic_write(path, lambda f: f.write(print_graph(graph).encode()))
    if elided:
        atomic_write(weights_path(path), lambda f: np.savez(f, **elided))
    return path


def load_graph(path: str | os.PathLike) -> Graph:
    """Read a graph written by :func:`save` (text plus optional ``.npz`` of weights)."""
    path = Path(path)
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise QCompilerError(f"{path}: cannot read IR file ({e.__class__.__name__}: {e})") from None
    npz = weights_path(path)
    if not npz.exists():
        return parse_graph(text, {}, filename=str(path))
    with NpzWeights(npz) as weights:
        return parse_graph(text, weights, filename=str(path))


class NpzWeights(Mapping):
    """The arrays of an ``.npz``, read on demand; :meth:`type_of` reads only an array's header,
    so the parser checks a constant's shape against the text before decompressing it."""

    def __init__(self, path: str | os.PathLike | io.BytesIO):
        self.path = path
        try:
            self.zip = zipfile.ZipFile(path)
        except (OSError, zipfile.BadZipFile) as e:
            raise QCompilerError(f"{path}: cannot read weights ({e})") from None
        self.members = {n[:-4]: n for n in self.zip.namelist() if n.endswith(".npy")}

    def __enter__(self) -> "NpzWeights":
        return self

    def __exit__(self, *exc: object) -> None:
        self.zip.close()

    def __len__(self) -> int:
        return len(self.members)

    def __contains__(self, name: object) -> bool:
        return name in self.members

    def __iter__(self):
        return iter(self.members)

    def type_of(self, name: str) -> TensorType:
        try:
            with self.zip.open(self.members[name]) as f:
                version = np.lib.format.read_magic(f)
                read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                               else np.lib.format.read_array_header_2_0)
                shape, _, dtype = read_header(f)
            return TensorType(shape, dtype_name(dtype))
        except (OSError, ValueError, zipfile.BadZipFile) as e:
            raise QCompilerError(f"{self.path}: array '{name}' has an unreadable header ({e})") from None

    def __getitem__(self, name: str) -> np.ndarray:
        declared = self.type_of(name)
        if declared.nbytes > MAX_CONSTANT_BYTES:
            raise QCompilerError(f"{self.path}: array '{name}' is {declared} ({declared.nbytes:,} bytes), larger "
                                 f"than {MAX_CONSTANT_BYTES:,} bytes")
        try:
            with self.zip.open(self.members[name]) as f:
                return np.lib.format.read_array(f, allow_pickle=False)
        except (OSError, ValueError, zipfile.BadZipFile) as e:
            raise QCompilerError(f"{self.path}: cannot read array '{name}' ({e})") from None
