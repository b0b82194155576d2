"""The robustness corpus: bad ONNX files, bad calibration data, tampered artifacts, hostile
manifests and output paths, nonsense gates. Each case runs the CLI (in process, through
``qcompiler.cli.main``) and asserts its exit code, a one-line message saying what and where, and
that nothing outside the output path changed (an output that is refused is not created)."""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from qcompiler.cli import main


@dataclass
class Case:
    name: str
    make: Callable[[Path], list[str]]  # prepares the work folder, returns the CLI arguments
    code: int
    message: str  # a regex the one error line must match
    output: str | None = None  # the path (relative to the work folder) the command may create


def _tiny_onnx(path: Path) -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4)).eval()
    torch.onnx.export(model, (torch.randn(2, 6),), str(path), input_names=["x"], output_names=["y"], dynamo=False)


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A model, its data, and an llvm artifact built from them: what each case starts from."""
    root = tmp_path_factory.mktemp("corpus_base")
    _tiny_onnx(root / "model.onnx")
    rng = np.random.default_rng(0)
    np.savez(root / "cal.npz", x=rng.standard_normal((4, 2, 6)).astype(np.float32))
    np.savez(root / "eval.npz", x=rng.standard_normal((3, 2, 6)).astype(np.float32), labels=rng.integers(0, 4, 6))
    assert main(["compile", str(root / "model.onnx"), "--calibration", str(root / "cal.npz"), "-o",
                 str(root / "art"), "--quiet"]) == 0
    assert main(["import", str(root / "model.onnx"), "-o", str(root / "model.qir")]) == 0
    return root


def _manifest_edit(edit: Callable[[dict], None]) -> Callable[[Path], None]:
    def apply(work: Path) -> None:
        path = work / "art" / "manifest.json"
        manifest = json.loads(path.read_text())
        edit(manifest)
        path.write_text(json.dumps(manifest))
    return apply


def _then_run(prepare: Callable[[Path], None], *extra: str) -> Callable[[Path], list[str]]:
    def make(work: Path) -> list[str]:
        prepare(work)
        return ["run", "art", "--inputs", "cal.npz", *extra]
    return make


def _write(name: str, data: bytes, args: list[str]) -> Callable[[Path], list[str]]:
    def make(work: Path) -> list[str]:
        (work / name).write_bytes(data)
        return args
    return make


def _npz(name: str, args: list[str], **arrays) -> Callable[[Path], list[str]]:
    def make(work: Path) -> list[str]:
        np.savez(work / name, **arrays)
        return args
    return make


def _truncated_onnx(work: Path) -> list[str]:
    (work / "m.onnx").write_bytes((work / "model.onnx").read_bytes()[:200])
    return ["compile", "m.onnx", "-o", "out"]


def _unsupported_op(work: Path) -> list[str]:
    from onnx import TensorProto, helper, save

    node = helper.make_node("FancyOp", ["x"], ["y"], name="fancy_1", domain="acme")
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 6])])
    save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("acme", 1)]),
         work / "odd.onnx")
    return ["compile", "odd.onnx", "-o", "out"]


def _symlink_library(work: Path) -> list[str]:
    (work / "art" / "model.so").unlink()
    os.symlink("/dev/zero", work / "art" / "model.so")
    return ["run", "art", "--inputs", "cal.npz"]


def _web_folder(work: Path) -> list[str]:
    (work / "site").mkdir()
    (work / "site" / "manifest.json").write_text('{"short_name": "app"}')
    (work / "site" / "index.html").write_text("<html></html>")
    return ["compile", "model.onnx", "--calibration", "cal.npz", "-o", "site", "--target", "reference"]


def _full_disk(work: Path) -> list[str]:
    os.symlink("/dev/full", work / "out.npz")
    return ["run", "art", "--inputs", "cal.npz", "-o", "out.npz"]


def _opt_without_data(work: Path) -> list[str]:
    return ["opt", "model.qir", "-p", "range-analysis", "--reproducer-dir", "repro"]


def _other_model_ranges(work: Path) -> list[str]:
    """A well-formed calibration record whose graph digest is not this model's."""
    record = {"format": "qcompiler-ranges/1", "graph_digest": "sha256:" + "0" * 64, "calibration": "range-analysis",
              "activation_dtype": "u8", "ranges": {"x": [0.0, 1.0]}, "biases": {}, "exclude": {}}
    (work / "other.json").write_text(json.dumps(record))
    return ["compile", "model.onnx", "--ranges", "other.json", "-o", "out", "--target", "reference"]


def _failing_loader(work: Path) -> list[str]:
    (work / "broken_loader.py").write_text("def batches():\n    yield 1 / 0\n")
    return ["compile", "model.onnx", "--calibration", "broken_loader:batches", "-o", "out", "--target", "reference"]


C = ["compile", "model.onnx", "--calibration", "cal.npz", "--target", "reference"]
CASES = [
    # bad ONNX files
    Case("truncated onnx", _truncated_onnx, 2, r"m\.onnx: "),
    Case("text as onnx", _write("t.onnx", b"hello, not a model\n", ["compile", "t.onnx", "-o", "out"]), 2, r"t\.onnx: "),
    Case("empty onnx", _write("e.onnx", b"", ["compile", "e.onnx", "-o", "out"]), 2, r"e\.onnx: "),
    Case("unsupported op", _unsupported_op, 2, r"odd\.onnx.*FancyOp.*fancy_1"),
    Case("missing model", lambda w: ["compile", "nope.onnx", "-o", "out"], 2, r"nope\.onnx"),
    Case("path with a colon", lambda w: ["import", "model.onnx:v2"], 2, r"model\.onnx:v2: no such file"),
    # bad calibration data and configs
    Case("NaN calibration", _npz("nan.npz", C[:3] + ["nan.npz", "--target", "reference", "-o", "out"],
                                 x=np.full((2, 2, 6), np.nan, np.float32)), 2, r"calibration batch 0, input %x: contains NaN"),
    Case("wrong shape", _npz("shape.npz", C[:3] + ["shape.npz", "--target", "reference", "-o", "out"],
                             x=np.zeros((2, 3, 5), np.float32)), 2, r"shape\.npz: array 'x' of shape \[2, 3, 5\]"),
    Case("object array", _npz("obj.npz", C[:3] + ["obj.npz", "--target", "reference", "-o", "out"],
                              x=np.array([{"a": 1}, None], dtype=object)), 2, r"obj\.npz: array 'x' cannot be read"),
    Case("calibration not npz", _write("cal.txt", b"1,2,3\n", C[:3] + ["cal.txt", "-o", "out"]), 2,
         r"cal\.txt: expected an \.npz"),
    Case("binary config", _write("cfg.json", bytes(range(256)), C + ["--config", "cfg.json", "-o", "out"]), 2,
         r"cfg\.json: not a text file"),
    Case("config of wrong types", _write("cfg.json", b'{"per_channel": "no"}', C + ["--config", "cfg.json", "-o", "out"]),
         2, r"per_channel must be true or false"),
    Case("image options on arrays", lambda w: C + ["--image-mean", "0.5", "0.5", "0.5", "-o", "out"], 2,
         r"--image-mean/--image-std normalize a folder of images"),
    Case("empty comparison data", _npz("zero.npz", ["compare", "model.onnx", "--calibration", "cal.npz", "--inputs",
                                                    "zero.npz"], x=np.zeros((0, 2, 6), np.float32)), 2,
         r"zero\.npz: holds no batch"),
    # tampered artifacts and hostile manifests
    Case("library changed", _then_run(lambda w: (w / "art" / "model.so").write_bytes(b"\x7fELF" + b"\0" * 64)), 2,
         r"model\.so: checksum mismatch"),
    Case("manifest path escapes", _then_run(_manifest_edit(lambda m: m["files"].update({"../x": "0" * 64}))), 2,
         r"'\.\./x' is not a plain name"),
    Case("manifest absolute path", _then_run(_manifest_edit(lambda m: m["files"].update({"/etc/passwd": "0" * 64}))),
         2, r"'/etc/passwd' is not a plain name"),
    Case("manifest names a device", _then_run(_manifest_edit(lambda m: m["files"].update({"/dev/zero": "0" * 64}))),
         2, r"'/dev/zero' is not a plain name"),
    Case("library is a link to a device", _symlink_library, 2, r"model\.so: not a regular file"),
    Case("unlisted file", _then_run(lambda w: (w / "art" / "extra.py").write_text("import os")), 2,
         r"does not list \(extra\.py\)"),
    Case("manifest not json", _then_run(lambda w: (w / "art" / "manifest.json").write_text("{ nope")), 2,
         r"corrupt manifest"),
    Case("future format", _then_run(_manifest_edit(lambda m: m.update(format_version=99)))
         , 2, r"artifact format 99 is not 1"),
    Case("wrong pinned digest", _then_run(lambda w: None, "--expect-digest", "sha256:" + "ab" * 32), 2,
         r"not the artifact you pinned"),
    # outputs that would replace inputs or a user's folder
    Case("compile over a web app", _web_folder, 2, r"site: holds a manifest\.json that is not a qcompiler manifest"),
    Case("compile to the current folder", lambda w: C + ["-o", "."], 2, r"the artifact goes to its own folder"),
    Case("show over the model", lambda w: ["show", "model.qir", "-o", "model.qir"], 2, r"refusing to overwrite the input"),
    Case("ranges record over data", lambda w: C + ["-o", "out", "--save-ranges", "cal.npz"],
         2, r"refusing to overwrite the input cal\.npz"),
    Case("ranges from another model", _other_model_ranges, 2, r"calibrated for another model"),
    Case("ranges file that is not a record", lambda w: ["compile", "model.onnx", "--ranges", "cal.npz", "-o", "out"],
         2, r"cal\.npz: not a calibration record"),
    Case("ranges and calibration together", lambda w: C + ["-o", "out", "--ranges", "cal.npz"],
         2, r"--calibration and --ranges: give one"),
    Case("data loader that raises", _failing_loader, 2, r"the data loader raised ZeroDivisionError"),
    Case("run output over its inputs", lambda w: ["run", "art", "--inputs", "cal.npz", "-o", "cal.npz"], 2,
         r"refusing to overwrite the input"),
    Case("run output inside the artifact", lambda w: ["run", "art", "--inputs", "cal.npz", "-o", "art/out.npz"], 2,
         r"inside the artifact"),
    Case("opt output over its input", lambda w: ["opt", "model.qir", "-p", "fold-constants", "-o", "model.qir"], 2,
         r"refusing to overwrite the input"),
    Case("full disk keeps its reason", _full_disk, 2, r"No space left on device"),
    # gates that must not pass on nonsense
    Case("one-hot labels", _npz("oh.npz", C + ["--eval", "oh.npz", "--max-accuracy-drop", "1", "-o", "out"],
                                x=np.zeros((3, 2, 6), np.float32), labels=np.eye(4)[[0, 1, 2, 3, 0, 1]]), 2,
         r"'labels' must be integer class ids of shape \[samples\]"),
    Case("string labels", _npz("s.npz", C + ["--eval", "s.npz", "--max-accuracy-drop", "1", "-o", "out"],
                               x=np.zeros((3, 2, 6), np.float32), labels=np.array(list("abcdef"))), 2,
         r"array 'labels' holds <U1 values, not numbers"),
    Case("labels past the classes", _npz("big.npz", C + ["--eval", "big.npz", "--max-accuracy-drop", "1", "-o", "out"],
                                         x=np.zeros((3, 2, 6), np.float32), labels=np.arange(6)), 2,
         r"class ids in \[0, 4\)"),
    Case("too few labels", _npz("few.npz", C + ["--eval", "few.npz", "--max-accuracy-drop", "1", "-o", "out"],
                                x=np.zeros((3, 2, 6), np.float32), labels=np.arange(3)), 2, r"3 labels for 6 samples"),
    Case("failed gate writes nothing", lambda w: C + ["--min-sqnr", "200", "-o", "out"], 3,
         r"gate failed: sqnr; no artifact written"),
    # debugging commands
    Case("opt usage error writes no reproducer", _opt_without_data, 2, r"needs calibration data"),
    Case("unknown pass to print", lambda w: ["opt", "model.qir", "-p", "fold-constants", "--print-ir-after",
                                             "fold-constant"], 2, r"--print-ir-after fold-constant: not a pass"),
]


def _snapshot(root: Path) -> dict[str, tuple]:
    state = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        if path.is_symlink():
            state[rel] = ("link", os.readlink(path))
        elif path.is_file():
            state[rel] = ("file", hashlib.sha256(path.read_bytes()).hexdigest(), path.stat().st_mode)
        else:
            state[rel] = ("dir",)
    return state


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_case(case: Case, base: Path, tmp_path: Path, capsys, monkeypatch):
    work = tmp_path / "work"
    shutil.copytree(base, work, symlinks=True)
    monkeypatch.chdir(work)
    argv = case.make(work)
    capsys.readouterr()
    before = _snapshot(work)
    code = main(argv)
    err = capsys.readouterr().err
    assert code == case.code, err
    if code == 2:  # progress lines (``qcompiler: [  0.1 s] capture``), then the one error line
        lines = err.strip().splitlines()
        assert lines[-1].startswith("qcompiler: error: ") and len(lines[-1]) < 400, err
        assert all(line.startswith("qcompiler: [") for line in lines[:-1]), err
    last = err.strip().splitlines()[-1]
    assert re.search(case.message, last), last
    assert "Traceback" not in err and "internal error" not in err
    assert _snapshot(work) == before  # nothing changed, nothing created: not even the output
