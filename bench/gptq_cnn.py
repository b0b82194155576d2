"""GPTQ on convolutions: output SQNR of the benchmark CNNs (random weights, real photo crops,
the calibration of ``bench/quant_accuracy.py``) with 8-bit and 4-bit weights (group 32), each
rounded to nearest and with GPTQ, and which layers GPTQ rounded. SQNR is deterministic, so
this needs no quiet machine. No peer quantizes convolution weights to 4 bits (ONNX Runtime's
MatMulNBits and NNCF's weight compression cover MatMul/linear only).

    .venv/bin/python bench/gptq_cnn.py
"""
from __future__ import annotations

import sys
import warnings
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import qcompiler  # noqa: E402
from qcompiler import from_torch  # noqa: E402
from qcompiler.compare import sqnr_db  # noqa: E402
from qcompiler.examples import zoo  # noqa: E402

CONFIGS = {"int8 weights": {}, "int8 weights + GPTQ": {"gptq": True},
           "4-bit weights": {"weight_dtype": "i4"}, "4-bit weights + GPTQ": {"weight_dtype": "i4", "gptq": True}}


def main() -> None:
    warnings.filterwarnings("ignore")
    torch.set_num_threads(2)
    table = Table(title="GPTQ on convolutions: output SQNR dB (median of 4 held-out crops)")
    for column in ("model", *CONFIGS, "layers GPTQ rounded (4-bit)"):
        table.add_column(column)
    console = Console()
    for name in ("resnet18", "mobilenet_v2"):
        with console.status(f"{name}..."):
            model = getattr(zoo, name)()
            calibration = [(x,) for x in zoo.photo_crops(8, seed=0)]
            evaluation = zoo.photo_crops(4, seed=1)
            graph = from_torch(model, (torch.from_numpy(evaluation[0]),))
            cells, rounded = [], ""
            for config in CONFIGS.values():
                result = qcompiler.quantize(graph, calibration, qcompiler.QuantConfig(**config))
                cells.append(f"{np.median([sqnr_db(graph(x)[0], result.graph(x)[0]) for x in evaluation]):.1f}")
                if "gptq" in result.report and config.get("weight_dtype") == "i4":
                    layers = result.report["gptq"]["layers"]
                    rounded = f"{sum(e['rounding'] == 'gptq' for e in layers)} of {len(layers)}"
            table.add_row(name, *cells, rounded)
    console.print(table)


if __name__ == "__main__":
    main()
