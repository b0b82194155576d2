"""Shared fixtures: models are built once per session; ONNX files are exported into a temp dir."""
from __future__ import annotations

import os
import subprocess
import warnings

# One core per xdist worker: numpy's BLAS, torch and TVM's thread pool each start a thread per
# core, and with a worker per core, three pools spinning on two cores oversubscribe them
# (test_quantization + test_dynamic_sequence: 175 s wall and 315 s CPU without this, 111 s and 166 s with).
# Set before numpy, torch or TVM load (they read these once). Subprocesses inherit them.
if "PYTEST_XDIST_WORKER_COUNT" in os.environ:  # a worker (not the controller, whose env workers inherit)
    _THREADS = max(1, len(os.sched_getaffinity(0)) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "TVM_NUM_THREADS"):
        os.environ.setdefault(_var, str(_THREADS))
else:
    _THREADS = len(os.sched_getaffinity(0))

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from qcompiler.examples import zoo  # noqa: E402

warnings.filterwarnings("ignore", category=UserWarning)
warnings.filterwarnings("ignore", category=DeprecationWarning)
warnings.filterwarnings("ignore", category=FutureWarning)
torch.set_num_threads(_THREADS)


def rel_err(got: np.ndarray, want: np.ndarray) -> float:
    """max |got - want| relative to the largest |want|: the issue's 1e-4 criterion."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-30))


def export_onnx(model: torch.nn.Module, args: tuple, path, input_names: list[str]) -> str:
    """Export with torch.onnx.export's default (dynamo) exporter, as a user would."""
    torch.onnx.export(model, args, str(path), input_names=input_names, verbose=False)
    return str(path)


@pytest.fixture(scope="session")
def digits():
    model, data = zoo.train_digits_cnn()
    return model, data


@pytest.fixture(scope="session")
def minilm():
    encoder, tokenizer = zoo.load_minilm()
    ids, mask = zoo.tokenize(tokenizer, zoo.SENTENCES, 128)
    return encoder, ids, mask


@pytest.fixture(scope="session")
def image_batch():
    torch.manual_seed(0)
    return torch.randn(1, 3, 224, 224)


@pytest.fixture(scope="session")
def core_site(tmp_path_factory):
    """A core install of this checkout (tests/core_install.py), built once per session."""
    from tests.core_install import build_core_site

    return build_core_site(tmp_path_factory.mktemp("core"))


@pytest.fixture(scope="session")
def ort_qdq_digits(digits, tmp_path_factory):
    """The digits CNN quantized by ONNX Runtime's quantize_static (QDQ), batch 1."""
    from qcompiler.examples import peers

    model, (x_train, _, x_test, _) = digits
    tmp = tmp_path_factory.mktemp("ort_qdq")
    float_path = peers.export_onnx(model, (torch.from_numpy(x_test[:1]),), ["image"], tmp / "f.onnx")
    return str(peers.onnxruntime_int8(float_path, ["image"], [[x_train[i:i + 1]] for i in range(64)], tmp / "q.onnx"))


def cli_in_process(*args: str, cwd=None) -> subprocess.CompletedProcess:
    """The CLI in this process (no interpreter start: seconds per call), with its exit status
    and what it printed."""
    import contextlib
    import io
    import os

    from qcompiler.cli import main

    out, err, before = io.StringIO(), io.StringIO(), os.getcwd()
    try:
        if cwd is not None:
            os.chdir(cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(list(args))
            except SystemExit as e:  # argparse's refusals
                code = e.code
    finally:
        os.chdir(before)
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


def assert_pipeline_reproduces(graph, result, calibration) -> None:
    """``result.pipeline`` (a quantize result's reproducer) run alone over ``graph`` with the same
    ``calibration`` gives ``result.graph``, text for text (outputs named as quantize names them)."""
    from qcompiler import print_graph
    from qcompiler.pass_manager import run_pipeline
    from qcompiler.pipeline import PassContext

    again = run_pipeline(graph.copy(), result.pipeline, context=PassContext(calibration=calibration))
    again.name_outputs([v.name for v in graph.outputs])
    assert print_graph(again) == print_graph(result.graph)
