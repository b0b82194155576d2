"""``make demo``: the foundation at work on a real, bundled example.

Trains the digits CNN on scikit-learn's bundled digits (seconds), captures it from PyTorch and
from its ONNX export, runs both through the reference interpreter on the held-out digits, and
prints the IR, the op counts and the agreement with PyTorch. (Quantization and TVM compilation
arrive with the issues that build on this one; the demo will grow with them.)"""
from __future__ import annotations

import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from . import from_onnx, from_torch, print_graph, zoo


def main() -> None:
    warnings.filterwarnings("ignore")
    console = Console()
    with console.status("training the digits CNN on scikit-learn's 8x8 digits..."):
        start = time.perf_counter()
        model, (_, _, x_test, y_test) = zoo.train_digits_cnn()
        train_s = time.perf_counter() - start
    batch = torch.from_numpy(x_test)
    with torch.no_grad():
        reference = model(batch).numpy()
    console.print(f"trained in {train_s:.1f} s; PyTorch test accuracy {zoo.accuracy(reference, y_test):.2%} "
                  f"on {len(y_test)} held-out digits")

    with tempfile.TemporaryDirectory() as tmp:
        onnx_path = str(Path(tmp) / "digits.onnx")
        with console.status("capturing from PyTorch and from ONNX..."):
            torch.onnx.export(model, (batch,), onnx_path, input_names=["image"], verbose=False)
            graphs = {"torch.export": from_torch(model, (batch,)), "ONNX": from_onnx(onnx_path)}

    console.rule("IR captured with torch.export (weights elided)")
    print(print_graph(graphs["torch.export"]))

    table = Table(title="digits CNN through the reference interpreter")
    table.add_column("captured from")
    table.add_column("nodes", justify="right")
    table.add_column("op counts")
    table.add_column("accuracy", justify="right")
    table.add_column("max rel. error vs PyTorch", justify="right")
    for name, graph in graphs.items():
        out = graph(x_test)[0]
        err = float(np.abs(out - reference).max() / np.abs(reference).max())
        counts = ", ".join(f"{op} {n}" for op, n in graph.op_counts().items())
        table.add_row(name, str(len(graph.nodes)), counts, f"{zoo.accuracy(out, y_test):.2%}", f"{err:.1e}")
    console.print(table)


if __name__ == "__main__":
    main()
