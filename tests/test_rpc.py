"""Tuning and benchmarking on a fleet through TVM's RPC tracker: a tracker and two servers started
on localhost, as the README's "Tuning on a fleet" starts them; candidates measured on the servers,
the tuned build bit-exact with the interpreter, ``qcompiler bench`` here and through the tracker.
CUDA runs remotely where a GPU is registered (see :func:`cuda_fleet`), and says why it skipped
elsewhere."""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import qcompiler
from qcompiler.errors import QCompilerError
from qcompiler.rpc import RPC
from tests.conftest import cli_in_process

KEY = "qcompiler-test"
REGISTER_TIMEOUT_S = 120


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(args: list[str], log: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", *args], stdout=log.open("w"), stderr=subprocess.STDOUT,
                            env={**os.environ, "TVM_NUM_THREADS": "1"}, start_new_session=True)


def _wait_for_servers(address: RPC, count: int, processes: list[subprocess.Popen], logs: list[Path]) -> None:
    from qcompiler.targets.tvm import remote

    deadline = time.monotonic() + REGISTER_TIMEOUT_S
    while True:
        try:
            if len(remote.servers(address)) >= count:
                return
        except QCompilerError:
            pass
        if time.monotonic() > deadline or any(p.poll() is not None for p in processes):
            raise RuntimeError("the RPC tracker or servers did not come up:\n" +
                               "\n".join(f"{log.name}: {log.read_text()[-1000:]}" for log in logs))
        time.sleep(1)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    """A tracker and two CPU servers under :data:`KEY`, with their logs."""
    folder = tmp_path_factory.mktemp("fleet")
    port = _free_port()
    logs = [folder / "tracker.log", folder / "server0.log", folder / "server1.log"]
    processes = [_start(["tvm.exec.rpc_tracker", "--host", "127.0.0.1", "--port", str(port),
                         "--port-end", str(port + 1)], logs[0])]
    address = RPC(f"127.0.0.1:{port}", KEY)
    try:
        time.sleep(1)
        for log in logs[1:]:
            server_port = _free_port()
            processes.append(_start(["tvm.exec.rpc_server", "--tracker", address.tracker, "--key", KEY, "--host",
                                     "127.0.0.1", "--port", str(server_port), "--port-end", str(server_port + 1)],
                                    log))
        _wait_for_servers(address, 2, processes, logs)
        yield address, logs[1:]
    finally:
        for process in processes:  # TVM runs each tracker and server in a child process: end the whole group
            os.killpg(process.pid, signal.SIGTERM)
        for process in processes:
            process.wait(timeout=30)


def _modules_loaded(logs: list[Path]) -> list[int]:
    """Per server, how many modules it loaded (one per measured candidate or timed kernel)."""
    return [log.read_text().count("load_module") for log in logs]


@pytest.fixture(scope="module")
def digits_int8(digits):
    model, (x_train, _, x_test, _) = digits
    return model, (torch.from_numpy(x_test[:8]),), [x_train[:8], x_train[8:16]]


@pytest.fixture(scope="module")
def tuned_remotely(fleet, digits_int8, tmp_path_factory):
    address, logs = fleet
    model, example, calibration = digits_int8
    before = _modules_loaded(logs)
    database = tmp_path_factory.mktemp("db")
    compiled = qcompiler.compile(model, example, calibration=calibration, tune=True, tuning_db=database,
                                 tuning_trials=4, rpc=address)
    return compiled, database, sum(_modules_loaded(logs)) - sum(before)


def test_tuning_measures_candidates_on_the_servers_and_stays_exact(fleet, digits_int8, tuned_remotely):
    address, _ = fleet
    compiled, database, loaded = tuned_remotely
    tuning = compiled.report()["tuning"]
    assert tuning["trials"] == 4 and tuning["failed"] == 0
    assert tuning["measured_on"]["tracker"] == address.tracker and tuning["measured_on"]["key"] == KEY
    assert len(tuning["measured_on"]["servers"]) == 2
    assert loaded >= 4, f"the servers loaded {loaded} modules for 4 candidates"
    records = (database / "database_tuning_record.json").read_text().splitlines()
    assert len(records) == 4  # the same database as a local tuning: later builds reuse it
    x = digits_int8[1][0].numpy()
    np.testing.assert_array_equal(compiled(x), compiled.graph(x)[0])


def test_the_compile_summary_says_where_candidates_were_measured(fleet, tuned_remotely, tmp_path):
    from rich.console import Console

    from qcompiler.cli import _print_summary

    address, _ = fleet
    console = Console(record=True, width=250)
    _print_summary(console, tuned_remotely[0].report(), tmp_path, {}, [], None, False)
    assert re.search(rf"4 candidates for \d+ kernels measured on 2 server\(s\) of key '{KEY}' at tracker "
                     rf"{re.escape(address.tracker)}", console.export_text())


def _bench_cli(*args: str) -> subprocess.CompletedProcess:
    return cli_in_process("bench", *args)


@pytest.fixture(scope="module")
def artifact(digits_int8, tmp_path_factory):
    model, example, calibration = digits_int8
    folder = tmp_path_factory.mktemp("bench") / "digits"
    qcompiler.compile(model, example, calibration=calibration).save(folder)
    return folder


def test_bench_through_the_tracker_checks_outputs_against_the_interpreter(fleet, artifact):
    address, logs = fleet
    before = _modules_loaded(logs)
    result = _bench_cli(str(artifact), "--rpc-tracker", address.tracker, "--rpc-key", KEY, "--iterations", "7",
                        "--json")
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads(result.stdout)
    assert summary["where"] == {"tracker": address.tracker, "key": KEY}
    assert summary["iterations"] == 7 and summary["batch"] == 8
    latency = summary["latency_ms"]
    assert 0 < latency["min"] <= latency["median"] <= latency["p90"]
    assert summary["max_abs_diff_vs_reference"] == {"10": 0.0}  # int8: bit-exact on the remote CPU
    assert summary["profile"] is None and "over RPC" in summary["profile_note"]
    assert sum(_modules_loaded(logs)) == sum(before) + 1  # the artifact's library, uploaded once


def test_bench_here_prints_latency_and_a_kernel_profile(artifact, tmp_path):
    result = _bench_cli(str(artifact), "--iterations", "5", "--json")
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads(result.stdout)
    assert summary["where"] == "local" and summary["max_abs_diff_vs_reference"] == {"10": 0.0}
    shares = [k["share"] for k in summary["profile"]]
    assert len(shares) >= 3 and abs(sum(shares) - 1) < 1e-6
    assert any("conv2d" in k["kernel"] for k in summary["profile"])
    assert summary["throughput"]["samples_per_s"] == pytest.approx(8 * 1e3 / summary["latency_ms"]["median"])
    np.savez(tmp_path / "in.npz", x=np.ones((8, 1, 8, 8), np.float32))
    table = _bench_cli(str(artifact), "--iterations", "3", "--inputs", str(tmp_path / "in.npz"), "--top", "2")
    assert table.returncode == 0, table.stderr[-2000:]
    assert "median" in table.stdout and "per-kernel profile" in table.stdout
    assert "bit-exact with the reference interpreter" in table.stdout


def test_bench_of_a_reference_artifact_times_the_call(digits_int8, tmp_path):
    model, example, calibration = digits_int8
    qcompiler.compile(model, example, calibration=calibration, target="reference").save(tmp_path / "ref")
    from qcompiler.benchmark import bench

    result = bench(tmp_path / "ref", [example[0].numpy()], iterations=2, warmup=0)
    assert result.max_abs_diff == {"10": 0.0} and len(result.seconds) == 2
    assert result.profile is None and "llvm builds have one" in result.profile_note
    with pytest.raises(QCompilerError, match="bench over RPC runs TVM artifacts"):
        bench(tmp_path / "ref", [example[0].numpy()], rpc=RPC("127.0.0.1:9", KEY))


def test_bench_gate_fails_when_outputs_differ(artifact, tmp_path, monkeypatch):
    """--atol gates on the difference from the interpreter: a negative tolerance no output meets."""
    result = _bench_cli(str(artifact), "--iterations", "2", "--atol", "-1")
    assert result.returncode == 3
    assert "differ from the reference interpreter beyond --atol -1" in result.stderr


def test_rpc_errors_are_one_line(fleet, digits_int8, artifact):
    address, _ = fleet
    model, example, calibration = digits_int8
    with pytest.raises(QCompilerError, match="expected HOST:PORT"):
        RPC("localhost", KEY)
    with pytest.raises(QCompilerError, match="without spaces"):
        RPC(address.tracker, "two words")
    with pytest.raises(QCompilerError, match="it applies with tune=True"):
        qcompiler.compile(model, example, rpc=address)
    with pytest.raises(QCompilerError, match=f"no RPC server is registered under key 'missing'.*keys there: {KEY}"):
        qcompiler.compile(model, example, calibration=calibration, tune=True, tuning_trials=2,
                          rpc=RPC(address.tracker, "missing"))
    closed = _free_port()
    for args, message in [
        (["--rpc-tracker", f"127.0.0.1:{closed}", "--rpc-key", KEY], f"cannot reach the RPC tracker at 127.0.0.1:{closed}"),
        (["--rpc-tracker", address.tracker], "--rpc-tracker and --rpc-key go together"),
        (["--rpc-tracker", "nonsense", "--rpc-key", KEY], "expected HOST:PORT"),
        (["--iterations", "0"], "must be at least 1"),
    ]:
        result = _bench_cli(str(artifact), *args)
        assert result.returncode == 2, result.stderr
        assert message in result.stderr.strip().splitlines()[-1] and "Traceback" not in result.stderr


def test_cli_compile_refuses_rpc_without_tune_before_compiling(fleet, tmp_path):
    """(The README's "Tuning on a fleet" runs the whole CLI flow through a tracker.)"""
    address, _ = fleet
    base = ["compile", "no-such-model.onnx", "-o", str(tmp_path / "out")]
    for extra, message in [(["--rpc-tracker", address.tracker, "--rpc-key", KEY], "it applies with --tune"),
                           (["--tune", "--rpc-tracker", "nonsense", "--rpc-key", KEY], "expected HOST:PORT"),
                           (["--tune", "--rpc-key", KEY], "--rpc-tracker and --rpc-key go together")]:
        refused = cli_in_process(*base, *extra)
        assert refused.returncode == 2 and message in refused.stderr, refused.stderr


def cuda_fleet() -> RPC | None:
    """A tracker key with a GPU server: ``QCOMPILER_TEST_CUDA_RPC=HOST:PORT/KEY`` (a real fleet)."""
    spec = os.environ.get("QCOMPILER_TEST_CUDA_RPC")
    if not spec:
        return None
    tracker, _, key = spec.partition("/")
    return RPC(tracker, key)


def test_cuda_artifact_runs_on_a_registered_gpu(digits_int8, tmp_path):
    address = cuda_fleet()
    if address is None:
        pytest.skip("no GPU registered with a tracker: set QCOMPILER_TEST_CUDA_RPC=HOST:PORT/KEY for a server "
                    "started with `python -m tvm.exec.rpc_server --tracker HOST:PORT --key KEY` on a GPU machine")
    model, example, calibration = digits_int8
    compiled = qcompiler.compile(model, example, calibration=calibration, target="cuda", tune=True, tuning_trials=4,
                                 tuning_db=tmp_path / "db", rpc=address)
    assert compiled.report()["tuning"]["failed"] == 0
    compiled.save(tmp_path / "cuda")
    from qcompiler.benchmark import bench

    result = bench(tmp_path / "cuda", [example[0].numpy()], iterations=5, rpc=address)
    assert result.max_abs_diff == {"10": 0.0}


def test_cuda_tuning_builds_here_and_says_when_no_candidate_ran(fleet, digits_int8, tmp_path):
    """CUDA candidates are built on this machine (no GPU needed) and measured remotely: servers
    without a GPU run none of them, and the user is told so in one line, not given a build tuned
    on nothing."""
    import shutil

    if shutil.which("nvcc") is None:
        pytest.skip("no nvcc on this machine: TVM compiles CUDA candidates with it")
    address, _ = fleet
    model, example, calibration = digits_int8
    with pytest.raises(QCompilerError, match=rf"none of the 1 candidate\(s\) ran on the servers of key '{KEY}'"):
        qcompiler.compile(model, example, calibration=calibration, target="cuda", tune=True, tuning_trials=1,
                          tuning_db=tmp_path / "db", rpc=address)


def test_tuning_for_a_cpu_this_machine_lacks_needs_a_fleet(digits_int8, monkeypatch):
    """Candidates for another CPU cannot be measured here (they would die on an illegal
    instruction): without rpc that is refused before anything is built."""
    import importlib

    model, example, calibration = digits_int8
    build_module = importlib.import_module("qcompiler.targets.tvm.build")
    monkeypatch.setattr(build_module, "missing_cpu_features", lambda spec: ["amx-int8"])
    with pytest.raises(QCompilerError, match="this machine lacks amx-int8 of CPU 'sapphirerapids': tune through rpc="):
        qcompiler.compile(model, example, calibration=calibration, tune=True, cpu="sapphirerapids")
