"""MetaSchedule tuning (``tune=True``) into a JSON database that later builds reuse without
tuning; tuned kernels checked against the interpreter like every other build."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

import qcompiler
from qcompiler.errors import QCompilerError


@pytest.fixture(scope="module")
def tuned(digits, tmp_path_factory):
    model, (x_train, _, x_test, _) = digits
    example = (torch.from_numpy(x_test[:8]),)
    database = tmp_path_factory.mktemp("tuning")
    compiled = qcompiler.compile(model, example, calibration=[x_train[:8], x_train[8:16]], tune=True,
                                 tuning_db=database, tuning_trials=4)
    return model, example, [x_train[:8], x_train[8:16]], database, compiled


def test_tuning_records_kernels_and_keeps_outputs_exact(tuned):
    _, example, _, database, compiled = tuned
    tuning = compiled.report()["tuning"]
    assert tuning["tasks_tuned"] >= 1 and tuning["trials"] == 4
    assert tuning["kernels_from_database"] + tuning["records_slower_than_default"] >= 1
    records = (database / "database_tuning_record.json").read_text().splitlines()
    assert len(records) == 4 and all(json.loads(line) for line in records)
    decided = json.loads((database / "qcompiler_default_wins.json").read_text())  # each record timed once
    assert len(decided["default_wins"]) == tuning["records_slower_than_default"]
    assert len(decided["default_wins"]) + len(decided["record_wins"]) >= 1
    x = example[0].numpy()
    np.testing.assert_array_equal(compiled(x), compiled.graph(x)[0])


def test_a_later_build_reuses_the_database_without_tuning(tuned):
    model, example, calibration, database, first = tuned
    size = (database / "database_tuning_record.json").stat().st_size
    again = qcompiler.compile(model, example, calibration=calibration, tuning_db=database)
    tuning = again.report()["tuning"]
    assert tuning["trials"] == 0
    for key in ("kernels_from_database", "records_slower_than_default"):  # decided when tuning: the same build
        assert tuning[key] == first.report()["tuning"][key]
    assert (database / "database_tuning_record.json").stat().st_size == size
    x = example[0].numpy()
    np.testing.assert_array_equal(again(x), first(x))


def test_cli_compile_reads_the_database(tuned, tmp_path):
    model, example, calibration, database, first = tuned
    from qcompiler import from_torch, save

    save(from_torch(model, example), tmp_path / "m.qir")
    np.savez(tmp_path / "cal.npz", x=np.concatenate(calibration))
    result = subprocess.run([sys.executable, "-m", "qcompiler", "compile", str(tmp_path / "m.qir"), "--calibration",
                             str(tmp_path / "cal.npz"), "--tuning-db", str(database), "-o", str(tmp_path / "out"),
                             "--json"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout)
    assert report["tuning"]["kernels_from_database"] == first.report()["tuning"]["kernels_from_database"]


def test_tuning_errors_are_clear(digits, tmp_path):
    model, (x_train, _, x_test, _) = digits
    example = (torch.from_numpy(x_test[:8]),)
    (tmp_path / "file").write_text("not a directory")
    with pytest.raises(QCompilerError, match="a tuning database is a directory"):
        qcompiler.compile(model, example, tuning_db=tmp_path / "file")
    with pytest.raises(QCompilerError, match="tuning applies to TVM targets"):
        qcompiler.compile(model, example, target="reference", tune=True)
    with pytest.raises(QCompilerError, match="tuning_trials must be at least 1"):
        qcompiler.compile(model, example, tune=True, tuning_trials=0)
