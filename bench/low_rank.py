"""Quantized low-rank factorization: weight bytes and accuracy of the digits MLP (64-256-256-10),
float vs qcompiler int8 vs qcompiler int8 with ``LowRank(energy)`` (and, at the lowest energy,
two epochs of quantization-aware training on the factors, next to the float model fine-tuned
the same way) vs ONNX Runtime's int8 QDQ model (quantize_static, per-channel int8 weights), in
one run, on the same calibration data.

    .venv/bin/python bench/low_rank.py [--energies 0.9,0.95,0.98]

Bytes are the weights as each ships them: qcompiler's ``size_bytes.compiled`` (int8 weights, int32
biases, scales), ONNX Runtime's the initializers of its model file. Accuracy on the 360 held-out
digits. Both MLPs are in the table: trained with decoupled weight decay (``zoo.train_digits_mlp``,
as models meant for low-rank compression are) and without. Not part of `make test`."""
from __future__ import annotations

import argparse
import copy
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import qcompiler  # noqa: E402
from qcompiler.examples import peers, zoo  # noqa: E402

BATCH = 72


def _onnx_weight_bytes(path: Path) -> int:
    import onnx

    return sum(onnx.numpy_helper.to_array(t).nbytes for t in onnx.load(str(path)).graph.initializer)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--energies", default="0.9,0.95,0.98")
    energies = [float(e) for e in parser.parse_args().energies.split(",")]
    table = Table(title="digits MLP 64-256-256-10: weight bytes and accuracy (360 held-out digits)")
    for column in ("training", "build", "weight bytes", "vs int8", "accuracy", "layers factored (rank)"):
        table.add_column(column)
    for label, weight_decay in (("weight decay 0.5", 0.5), ("plain Adam", 0.0)):
        model, (x_train, y_train, x_test, y_test) = zoo.train_digits_mlp(weight_decay=weight_decay)
        calibration = [x_train[i:i + BATCH] for i in range(0, 8 * BATCH, BATCH)]
        tests = [x_test[i:i + BATCH] for i in range(0, 360, BATCH)]
        labels = y_test[:360]
        example = (torch.from_numpy(tests[0]),)

        def accuracy(run) -> float:
            return zoo.accuracy(np.concatenate([run(b) for b in tests]), labels)

        with torch.no_grad():
            table.add_row(label, "float", f"{sum(p.numel() * 4 for p in model.parameters()):,}", "",
                          f"{accuracy(lambda b: model(torch.from_numpy(b)).numpy()):.4f}", "")
        plain = qcompiler.compile(model, example, calibration=calibration)
        int8_bytes = plain.report()["size_bytes"]["compiled"]
        table.add_row(label, "qcompiler int8", f"{int8_bytes:,}", "1.00", f"{accuracy(plain):.4f}", "")
        with tempfile.TemporaryDirectory() as folder:
            float_path = peers.export_onnx(model, example, ["x"], Path(folder) / "mlp.onnx")
            ort_path = peers.onnxruntime_int8(float_path, ["x"], [[b] for b in calibration], Path(folder) / "q.onnx")
            run = peers.session(ort_path, ["x"], simulated=True)
            ort_bytes = _onnx_weight_bytes(ort_path)
            table.add_row(label, "ONNX Runtime int8", f"{ort_bytes:,}", f"{ort_bytes / int8_bytes:.2f}",
                          f"{accuracy(run):.4f}", "")
        for energy in energies:
            built = qcompiler.compile(model, example, calibration=calibration,
                                      config=qcompiler.QuantConfig(low_rank=qcompiler.LowRank(energy=energy)))
            report = built.report()
            size = report["size_bytes"]["compiled"]
            ranks = ", ".join(f"{e['layer']} ({e['rank']}/{e['full_rank']})" for e in report["low_rank"]["layers"])
            table.add_row(label, f"qcompiler int8 + low rank {energy:g}", f"{size:,}", f"{size / int8_bytes:.2f}",
                          f"{accuracy(built):.4f}", ranks or "none pays")
        energy = min(energies)  # the factors that lose the most, fine-tuned with quantization in the loop
        config = qcompiler.QuantConfig(low_rank=qcompiler.LowRank(energy=energy))
        prepared = qcompiler.qat.prepare(model, example, calibration, config)
        zoo.fine_tune(prepared, x_train, y_train, epochs=2, batch=BATCH, lr=1e-3)
        built = qcompiler.compile(prepared, example)
        size = built.report()["size_bytes"]["compiled"]
        table.add_row(label, f"qcompiler int8 + low rank {energy:g} + QAT (2 epochs)", f"{size:,}",
                      f"{size / int8_bytes:.2f}", f"{accuracy(built):.4f}", "")
        tuned = copy.deepcopy(model)
        zoo.fine_tune(tuned, x_train, y_train, epochs=2, batch=BATCH, lr=1e-3)
        with torch.no_grad():
            table.add_row(label, "float, 2 more epochs (the same fine-tuning, no quantization)", "", "",
                          f"{accuracy(lambda b: tuned(torch.from_numpy(b)).numpy()):.4f}", "")
    Console(width=200).print(table)


if __name__ == "__main__":
    main()
