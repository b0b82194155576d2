"""The arrows point one way (DESIGN.md): the IR imports neither torch, the interpreter, passes nor
targets; a pass never imports a target. Checked on the source, function-local imports included,
and by importing ``qcompiler.ir`` in a fresh process."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# source folder -> the package its files belong to
PACKAGES = {ROOT / "qcompiler": "qcompiler", ROOT / "passes": "qcompiler.passes", ROOT / "targets": "qcompiler.targets"}


def _module_of(path: Path) -> str:
    for folder, package in PACKAGES.items():
        if folder in path.parents:
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            return ".".join([package, *parts])
    raise ValueError(path)


def imports_of(path: Path) -> set[str]:
    """Every module ``path`` imports, anywhere in the file (relative imports resolved)."""
    module = _module_of(path)
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.add(target)
            found |= {f"{target}.{alias.name}" for alias in node.names}  # `from . import interpreter`
    return found


def _violations(folder: Path, forbidden: tuple[str, ...]) -> list[str]:
    return [f"{path.relative_to(ROOT)} imports {name}" for path in sorted(folder.rglob("*.py"))
            for name in sorted(imports_of(path)) if any(name == f or name.startswith(f + ".") for f in forbidden)]


@pytest.mark.parametrize("folder, forbidden", [
    (ROOT / "qcompiler" / "ir", ("torch", "qcompiler.interpreter", "qcompiler.passes", "qcompiler.targets",
                                 "qcompiler.capture", "qcompiler.compiled")),
    (ROOT / "passes", ("qcompiler.targets", "tvm", "onnxruntime")),
], ids=["ir", "passes"])
def test_dependencies_point_one_way(folder, forbidden):
    assert _violations(folder, forbidden) == []


def test_the_pass_infrastructure_imports_no_pass():
    """pipeline.py (passes as values, parsing, the rule driver) takes its registry from the
    caller: the passes import it, never the other way round."""
    assert not {name for name in imports_of(ROOT / "qcompiler" / "pipeline.py") if name.startswith("qcompiler.passes")}


def test_the_compiler_imports_no_example():
    """Demo models, data and the peer (qcompiler.examples) use the compiler; the compiler never
    uses them."""
    offenders = [f"{p.relative_to(ROOT)} imports {name}" for folder in PACKAGES for p in sorted(folder.rglob("*.py"))
                 if "examples" not in p.parts for name in sorted(imports_of(p)) if name.startswith("qcompiler.examples")]
    assert offenders == []


def test_the_checker_sees_function_local_imports(tmp_path):
    sample = ROOT / "qcompiler" / "ir" / "graph.py"
    assert "qcompiler.ir.types" in imports_of(sample)
    assert "qcompiler.interpreter" in imports_of(ROOT / "qcompiler" / "__init__.py")  # `from . import interpreter`


def test_importing_the_ir_loads_no_torch_and_is_quick():
    code = ("import sys, time; t = time.perf_counter(); import qcompiler.ir; dt = time.perf_counter() - t; "
            "print(dt, 'torch' in sys.modules, 'tvm' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out[1:] == ["False", "False"], out
    assert float(out[0]) < 1.0, out


def test_the_package_exports_the_functions_not_their_modules():
    """`qcompiler.quantize` is the function even after `qcompiler.quantize` (the module) is imported."""
    code = ("import qcompiler, qcompiler.quantize, qcompiler.compare, qcompiler.compiled, qcompiler.capture; "
            "print(all(callable(getattr(qcompiler, n)) for n in ('quantize', 'compare', 'compile', 'load', "
            "'from_onnx', 'from_torch')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "True"
