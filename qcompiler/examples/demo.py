"""``make demo``: quantize and compile a real model, and compare it with the peer.

Trains a CNN on scikit-learn's bundled handwritten digits (seconds), quantizes it to int8 with
real calibration data, compiles it for this CPU through TVM, and prints one table: accuracy,
size and latency of the float model, qcompiler's int8 build, and ONNX Runtime's int8
(quantize_static, same calibration data) as the peer."""
from __future__ import annotations

import logging
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from .. import compile as compile_model
from . import peers, zoo
from ..extras import installed

BATCH = 40


def _median_ms(fn, batch, repeats: int = 30) -> float:
    fn(batch)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(batch)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def main() -> None:
    warnings.filterwarnings("ignore")
    logging.getLogger().setLevel(logging.ERROR)  # ONNX Runtime's quantizer logs advice at WARNING
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)  # and the exporter notes missing torchvision
    console = Console()
    with console.status("training a CNN on the bundled 8x8 handwritten digits..."):
        model, (x_train, _, x_test, y_test) = zoo.train_digits_cnn()
    calibration = [x_train[i:i + BATCH] for i in range(0, 8 * BATCH, BATCH)]
    test = [x_test[i:i + BATCH] for i in range(0, len(x_test) - BATCH + 1, BATCH)]
    labels = y_test[:len(test) * BATCH]

    def torch_float(x):
        with torch.no_grad():
            return model(torch.from_numpy(x)).numpy()

    float_size = sum(p.numel() * p.element_size() for p in model.state_dict().values())
    with console.status("quantizing and compiling for this CPU (TVM, llvm)..."):
        compiled = compile_model(model, (torch.from_numpy(calibration[0]),), calibration=calibration, target="llvm")
    with tempfile.TemporaryDirectory() as d, console.status("quantizing with ONNX Runtime (peer)..."):
        report = compiled.report()
        runs = [("PyTorch fp32 (eager)", torch_float, float_size),
                ("qcompiler int8 (TVM llvm)", compiled, report["size_bytes"]["compiled"])]
        if installed("bench"):
            float_path = peers.export_onnx(model, (torch.from_numpy(calibration[0]),), ["x"], Path(d) / "digits.onnx")
            int8_path = peers.onnxruntime_int8(float_path, ["x"], [[b] for b in calibration], Path(d) / "int8.onnx")
            runs.append(("ONNX Runtime int8 (QDQ, per-channel)", peers.session(int8_path, ["x"]),
                         int8_path.stat().st_size))

        rows = []
        for name, fn, size in runs:
            preds = np.concatenate([np.asarray(fn(b)).argmax(-1) for b in test])
            rows.append((name, f"{(preds == labels).mean():.2%}", f"{size / 1024:.0f} KiB",
                         f"{_median_ms(fn, test[0]):.3f} ms"))

    console.print(f"compiled in {report['compile_seconds']:.1f} s; pipeline: {compiled.pipeline}", highlight=False)
    console.print(f"{report['ops']['integer']} of {report['ops']['total']} ops integer; "
                  f"output SQNR vs float on calibration data {report['fidelity']['output_sqnr_db']} dB; "
                  f"ops kept float: {len(report['kept_float'])}", highlight=False)
    table = Table(title=f"digits CNN, {len(labels)} held-out images, batch {BATCH}, median latency of 30 runs")
    for col in ("model", "accuracy", "size", "latency"):
        table.add_column(col, justify="left" if col == "model" else "right")
    for row in rows:
        table.add_row(*row)
    console.print(table)
    if len(runs) < 3:
        console.print("The ONNX Runtime int8 peer is left out: it needs pip install 'qcompiler[bench]'.", highlight=False)
    kernels = report["int8_kernels"]["kernels"] or "none: generic integer kernels"
    console.print("Size: qcompiler counts weights and quantization constants; ONNX Runtime the .onnx file; "
                  "PyTorch the state dict. Latency: TVM with qcompiler's hand-written CPU kernels (int8 kernels "
                  f"for this CPU: {kernels}), untuned, on two shared cores; a model this small is mostly "
                  "launch overhead. See bench/RESULTS.md.", highlight=False)


if __name__ == "__main__":
    main()
