"""The ONNX backend node test cases, from two sources, each run through the importer and the
interpreter, and their outcomes:

- ``wheel``: the cases the onnx wheel's own generators make (onnx.backend.test.case.node);
- ``debian``: Debian's ``libonnx-testdata`` (932 stored cases of onnx 1.12, the set ONNX Runtime's
  conformance is quoted on), which ``make test`` unpacks into ``.cache/libonnx-testdata`` with
  ``apt-get download`` where apt is available.

Used by tests/test_onnx_node_suite.py; ``python -m tests.onnx_node_cases`` rewrites the expected
outcomes (tests/onnx_node_expected*.json) after a change that makes more cases pass."""
from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
EXPECTED = {"wheel": Path(__file__).with_name("onnx_node_expected.json"),
            "debian": Path(__file__).with_name("onnx_node_expected_debian.json")}
DEBIAN_NODE_DATA = Path(os.environ.get("QCOMPILER_ONNX_TESTDATA", ROOT / ".cache" / "libonnx-testdata")) \
    / "usr" / "share" / "libonnx-testdata" / "data" / "node"


@dataclass
class StoredCase:
    """One case directory: model.onnx and test_data_set_*/{input,output}_N.pb."""
    name: str
    folder: Path
    data_sets: list[tuple[list[Any], list[Any]]] = field(default_factory=list)

    @property
    def model(self) -> Any:
        import onnx

        return onnx.load(str(self.folder / "model.onnx"))


def wheel_cases() -> list[Any]:
    from onnx.backend.test.case.node import collect_testcases

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return sorted(collect_testcases(None), key=lambda tc: tc.name)


def _stored(path: Path, value_info: Any) -> Any:
    """A stored input or output: a tensor, a sequence or an optional, as the model declares it."""
    import onnx
    from onnx import numpy_helper

    kind = value_info.type.WhichOneof("value")
    proto = {"sequence_type": onnx.SequenceProto, "optional_type": onnx.OptionalProto}.get(kind, onnx.TensorProto)()
    proto.ParseFromString(path.read_bytes())
    if kind == "sequence_type":
        return numpy_helper.to_list(proto)
    if kind == "optional_type":
        return numpy_helper.to_optional(proto)
    return numpy_helper.to_array(proto)


def _numbered(folder: Path, kind: str) -> list[Path]:
    return sorted(folder.glob(f"{kind}_*.pb"), key=lambda p: int(p.stem.rsplit("_", 1)[1]))


def debian_cases() -> list[StoredCase]:
    """Debian's stored cases, or [] when the package is not unpacked."""
    import onnx

    found = []
    for folder in sorted(DEBIAN_NODE_DATA.glob("test_*")) if DEBIAN_NODE_DATA.is_dir() else []:
        case = StoredCase(folder.name, folder)
        graph = onnx.load(str(folder / "model.onnx"), load_external_data=False).graph
        for data_set in sorted(folder.glob("test_data_set_*")):
            case.data_sets.append(([_stored(p, v) for p, v in zip(_numbered(data_set, "input"), graph.input)],
                                   [_stored(p, v) for p, v in zip(_numbered(data_set, "output"), graph.output)]))
        found.append(case)
    return found


SUITES = {"wheel": wheel_cases, "debian": debian_cases}


def close(got, want) -> bool:
    got, want = np.asarray(got), np.asarray(want)
    if got.shape != want.shape:
        return False
    if want.dtype.kind in "fc":
        return bool(np.allclose(got.astype(np.float64), want.astype(np.float64), rtol=1e-3, atol=1e-4, equal_nan=True))
    return bool(np.array_equal(got, want))


def _array(value):
    """Some generators store data as TensorProtos (types numpy lacks, such as float16 bit patterns)."""
    from onnx import TensorProto, numpy_helper

    return numpy_helper.to_array(value) if isinstance(value, TensorProto) else value


OUTCOMES = ("pass", "pass-with-values", "unsupported")  # what a case may be; wrong and crash never

# stored cases whose outputs contradict their own model (fixed in later onnx releases): counted
# as unsupported when they differ, never as passing
STORED_ERRATA = {"test_adam_multiple": "onnx 1.12 computed the outputs with epsilon 1e-2; the node says the default "
                                       "1e-6 (the wheel's case, generated right, passes)"}


def _flat(values) -> list:
    """Sequences' elements in order, empty optionals dropped: how the IR takes and returns them."""
    return [a for v in values for a in (_flat(v) if isinstance(v, list) else [] if v is None else [v])]


def _shapes(value):
    """What ``input_shapes`` is given for a sequence or optional input: its elements' shapes."""
    return None if value is None else [_shapes(v) for v in value] if isinstance(value, list) else list(np.shape(value))


def _structured(tc) -> list[str]:
    """The case's sequence and optional inputs."""
    return [i.name for i in tc.model.graph.input if i.type.WhichOneof("value") in ("sequence_type", "optional_type")]


def _run(graph, data_sets) -> tuple[str, str] | None:
    for inputs, outputs in data_sets:
        gots, outputs = graph(*_flat(inputs)), _flat(outputs)
        if len(gots) != len(outputs) or not all(close(g, w) for g, w in zip(gots, outputs)):
            return "wrong", "outputs differ from the stored ones"
    return None


def _given_values(tc, bindable: list[str], inputs: list) -> tuple[Any, list]:
    """The case's graph with the inputs named in ``bindable`` fixed to their values in
    ``inputs`` (one data set's), and the data set's other inputs."""
    import qcompiler

    given = dict(zip([i.name for i in tc.model.graph.input], inputs))
    graph = qcompiler.from_onnx(tc.model, input_values={n: given.pop(n) for n in bindable})
    return graph, list(given.values())


def first_data_set_graph(tc) -> tuple[Any, list[np.ndarray], list[np.ndarray]]:
    """The case's graph with the inputs its import asks values for bound to its first data set,
    and that data set's remaining inputs and outputs."""
    import qcompiler

    inputs, outputs = ([_array(a) for a in arrays] for arrays in tc.data_sets[0])
    try:
        return qcompiler.from_onnx(tc.model), inputs, outputs
    except qcompiler.UnsupportedOpError as e:
        if not e.bindable:
            raise
        return (*_given_values(tc, e.bindable, inputs), outputs)


def outcome(tc) -> tuple[str, str]:
    """("pass" | "pass-with-values" | "unsupported" | "wrong" | "crash", detail).

    Unsupported is a one-line QCompilerError at import or run (a clear refusal); anything else
    that raises is a crash. A case refused because a shape, axes or sizes operand is a graph
    input passes "with values" when, given the values of the inputs the error names
    (``input_values``, as a user would), it imports and matches on every data set; so does a
    case with sequence or optional inputs, given their elements' shapes."""
    data_sets = [([_array(a) for a in inputs], [_array(a) for a in outputs]) for inputs, outputs in tc.data_sets or []]
    if isinstance(tc, StoredCase) and tc.name in STORED_ERRATA:
        got = _outcome(tc, data_sets)
        return ("unsupported", f"stored outputs wrong: {STORED_ERRATA[tc.name]}") if got[0] == "wrong" else got
    return _outcome(tc, data_sets)


def _structured_outcome(tc, data_sets, structured: list[str]) -> tuple[str, str]:
    """A case with sequence or optional inputs, imported per data set with their elements' shapes
    (and the values the importer asks for, if any)."""
    import qcompiler

    names = [i.name for i in tc.model.graph.input]
    bound: list[str] = []
    for inputs, outputs in data_sets:
        given = dict(zip(names, inputs))
        try:
            graph = qcompiler.from_onnx(tc.model, input_shapes={n: _shapes(v) for n, v in given.items()})
        except qcompiler.UnsupportedOpError as e:
            if not e.bindable:
                raise
            bound = e.bindable
            graph = qcompiler.from_onnx(tc.model, input_values={n: given.pop(n) for n in bound},
                                        input_shapes={n: _shapes(v) for n, v in given.items()})
        failed = _run(graph, [(list(given.values()), outputs)])
        if failed:
            return failed
    return "pass-with-values", f"given the lengths and shapes of {', '.join(structured)}" + (
        f" and the values of {', '.join(bound)}" if bound else "")


def _outcome(tc, data_sets) -> tuple[str, str]:
    import qcompiler

    try:
        structured = _structured(tc)
        if structured and data_sets:  # static shapes: a sequence's length and an optional's presence are given
            return _structured_outcome(tc, data_sets, structured)
        try:
            return _run(qcompiler.from_onnx(tc.model), data_sets) or ("pass", "")
        except qcompiler.UnsupportedOpError as e:
            if not e.bindable or not data_sets:
                raise
            for inputs, outputs in data_sets:
                graph, rest = _given_values(tc, e.bindable, inputs)
                failed = _run(graph, [(rest, outputs)])
                if failed:
                    return failed
            return "pass-with-values", f"given {', '.join(e.bindable)}"
    except qcompiler.QCompilerError as e:
        text = str(e)
        return ("unsupported", text.splitlines()[0][:200]) if "\n" not in text else ("crash", "multi-line error")
    except Exception as e:  # noqa: BLE001  a crash: what the test exists to catch
        return "crash", f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}"


if __name__ == "__main__":
    for suite, collect in SUITES.items():
        found = collect()
        if not found:
            print(f"{suite}: no cases here ({DEBIAN_NODE_DATA} is missing: run `make test` once)")
            continue
        results = {tc.name: outcome(tc) for tc in found}
        broken = {name: result for name, result in results.items() if result[0] not in OUTCOMES}
        if broken:  # never recorded as expected: fix them first
            raise SystemExit(f"{suite}: {len(broken)} cases crash or are wrong: {broken}")
        EXPECTED[suite].write_text(json.dumps({k: v[0] for k, v in results.items()}, indent=0, sort_keys=True) + "\n")
        counts = {k: sum(1 for v, _ in results.values() if v == k) for k in sorted({v for v, _ in results.values()})}
        print(f"{suite}: {len(results)} cases: {counts}")
