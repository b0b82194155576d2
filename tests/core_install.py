"""A site folder holding qcompiler as `pip install .` builds it (the wheel) and only the
distributions its core dependencies pull in, linked from this venv: run a script with
``python -S`` and that folder as PYTHONPATH and it sees what a core install has, nothing more."""
from __future__ import annotations

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


def core_distributions() -> set[str]:
    """Every installed distribution the core requirements reach (extras' requirements left out)."""
    env = {**default_environment(), "extra": ""}
    seen: set[str] = set()
    pending = [Requirement(r) for r in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]]
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


def build_core_site(tmp: Path) -> Path:
    """The wheel of this checkout (built from a copy: the checkout gets no build/ folder) unpacked
    into ``tmp/site``, with the core dependencies linked beside it."""
    source = tmp / "src"
    source.mkdir()
    for name in SOURCES:
        (shutil.copytree if (ROOT / name).is_dir() else shutil.copy)(ROOT / name, source / name)
    wheel = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                            str(tmp / "dist"), str(source)], capture_output=True, text=True)
    assert wheel.returncode == 0, wheel.stderr[-2000:]
    site = tmp / "site"
    shutil.unpack_archive(next((tmp / "dist").glob("qcompiler-*.whl")), site, "zip")
    for name in core_distributions():
        _link_distribution(name, site)
    return site


def core_python(site: Path) -> tuple[list[str], dict[str, str]]:
    """The command prefix and environment of an interpreter seeing only ``site`` (``-S``: no
    site-packages; ``-I`` would drop PYTHONPATH too)."""
    return [sys.executable, "-S"], {"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin", "HOME": str(site.parent)}
