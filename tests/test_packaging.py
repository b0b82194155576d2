"""The core install is enough for the quick start: qcompiler built as a wheel (as `pip install .`
builds it) and the README's quick start run in an interpreter that sees only the distributions
the core dependencies pull in (no scikit-learn, no ONNX Runtime, no test tools). The
dependencies are the ones this venv installed (torch pinned first, as the README says), linked
rather than downloaded again."""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("pyproject.toml", "README.md", "qcompiler", "passes", "targets")


def _closure(requirements: list[str]) -> set[str]:
    """Every installed distribution the requirements reach (extras' requirements left out)."""
    env = {**default_environment(), "extra": ""}
    seen: set[str] = set()
    pending = [Requirement(r) for r in requirements]
    while pending:
        req = pending.pop()
        if req.marker is not None and not req.marker.evaluate(env):
            continue
        dist = metadata.distribution(req.name)
        name = dist.metadata["Name"].lower()
        if name not in seen:
            seen.add(name)
            pending.extend(Requirement(r) for r in dist.requires or [])
    return seen


def _link_distribution(name: str, site: Path) -> None:
    dist = metadata.distribution(name)
    for top in {f.parts[0] for f in dist.files or [] if f.parts}:
        if top.endswith((".dist-info", ".pth")) or top in ("..", "__pycache__"):
            continue
        source = Path(dist.locate_file(top))
        if source.exists() and not (site / top).exists():
            (site / top).symlink_to(source)
    (site / Path(dist._path).name).symlink_to(dist._path)  # its metadata: versions() reads it


def test_quick_start_runs_on_the_core_install(tmp_path):
    core = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    dists = _closure(core)
    assert not dists & {"scikit-learn", "onnxruntime", "pytest", "psutil"}, "the core pulls in an extra's package"
    source = tmp_path / "src"
    source.mkdir()
    for name in SOURCES:
        (shutil.copytree if (ROOT / name).is_dir() else shutil.copy)(ROOT / name, source / name)
    wheel = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                            str(tmp_path / "dist"), str(source)], capture_output=True, text=True)
    assert wheel.returncode == 0, wheel.stderr[-2000:]
    site = tmp_path / "site"
    shutil.unpack_archive(next((tmp_path / "dist").glob("qcompiler-*.whl")), site, "zip")
    assert (site / "qcompiler" / "data" / "digits.npz").is_file()  # package data travels in the wheel
    for name in dists:
        _link_distribution(name, site)
    readme = (ROOT / "README.md").read_text()
    quick_start = re.search(r"## Quick start.*?```python\n(.*?)```", readme, re.S).group(1)
    work = tmp_path / "work"
    work.mkdir()
    # -S: no site-packages, only the wheel and the core closure on the path; -I would drop PYTHONPATH
    done = subprocess.run([sys.executable, "-S", "-c", quick_start], capture_output=True, text=True, cwd=work,
                          env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    assert done.returncode == 0, done.stderr[-3000:]
    assert re.search(r"accuracy 0\.9\d", done.stdout), done.stdout
    probe = subprocess.run([sys.executable, "-S", "-c", "import qcompiler, sklearn"], capture_output=True, text=True,
                           env={"PYTHONPATH": str(site)})
    assert "No module named 'sklearn'" in probe.stderr  # the check is real: the test extra is not visible


def test_features_of_an_extra_say_which_extra_to_install(monkeypatch):
    import importlib.util

    import pytest

    import qcompiler
    from qcompiler.errors import QCompilerError

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in ("onnxruntime", "psutil")
                        else real(name, *a))
    import torch

    net = torch.nn.Linear(3, 2).eval()
    with pytest.raises(QCompilerError, match=r"the onnx target needs onnxruntime.*pip install 'qcompiler\[onnxruntime\]'"):
        qcompiler.compile(net, (torch.randn(1, 3),), target="onnx")
    with pytest.raises(QCompilerError, match=r"tune=True \(--tune\) needs psutil.*'qcompiler\[tune\]'"):
        qcompiler.compile(net, (torch.randn(1, 3),), tune=True)
