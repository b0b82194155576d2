"""The core install: qcompiler's wheel (as `pip install .` builds it) with only the distributions
its core dependencies pull in. The README's Python blocks run on exactly that
(tests/test_readme.py); here, that the core leaves the extras out and that the wheel carries
what the quick start needs."""
from __future__ import annotations

import subprocess

import pytest

from tests.core_install import core_distributions, core_python


def test_the_core_install_is_the_core(core_site, tmp_path):
    assert not core_distributions() & {"scikit-learn", "onnxruntime", "pytest", "psutil", "onnxscript"}, \
        "the core dependencies pull in an extra's package"
    site = core_site
    assert (site / "qcompiler" / "examples" / "data" / "digits.npz").is_file()  # package data travels in the wheel
    python, env = core_python(site)
    probe = subprocess.run(python + ["-c", "import qcompiler, sklearn"], capture_output=True, text=True, env=env,
                           cwd=tmp_path)  # not the checkout: `-c` puts the working folder first on the path
    assert "No module named 'sklearn'" in probe.stderr  # the check is real: the test extra is not visible
    loads = subprocess.run(python + ["-c", "import qcompiler; from qcompiler.examples import zoo; "
                                     "assert qcompiler.__file__.startswith(%r); print(len(zoo.load_digits_split()[0]))"
                                     % str(site)],
                           capture_output=True, text=True, env=env, cwd=tmp_path)
    assert loads.returncode == 0 and loads.stdout.strip() == "1437", loads.stderr[-2000:]


def test_features_of_an_extra_say_which_extra_to_install(monkeypatch):
    import importlib.util

    import torch

    import qcompiler
    from qcompiler.errors import QCompilerError

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in ("onnxruntime", "psutil")
                        else real(name, *a))
    net = torch.nn.Linear(3, 2).eval()
    with pytest.raises(QCompilerError, match=r"the onnx target needs onnxruntime.*pip install 'qcompiler\[onnxruntime\]'"):
        qcompiler.compile(net, (torch.randn(1, 3),), target="onnx")
    with pytest.raises(QCompilerError, match=r"tune=True \(--tune\) needs psutil.*'qcompiler\[tune\]'"):
        qcompiler.compile(net, (torch.randn(1, 3),), tune=True)
