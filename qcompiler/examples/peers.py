"""The peer the demo and benchmarks measure against: ONNX Runtime's static int8 quantization
(QDQ, per-channel QInt8 weights, QUInt8 activations: its fastest form on x86), calibrated on
the same batches qcompiler sees."""
from __future__ import annotations

import contextlib
import io
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch


def export_onnx(model: torch.nn.Module, example: tuple, names: Sequence[str], path: Path) -> Path:
    with contextlib.redirect_stdout(io.StringIO()):  # the exporter narrates its steps
        torch.onnx.export(model, example, str(path), input_names=list(names), verbose=False)
    return path


def onnxruntime_int8(float_path: Path, names: Sequence[str], calibration: Sequence[Sequence[np.ndarray]],
                     int8_path: Path) -> Path:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    batches = iter([dict(zip(names, batch)) for batch in calibration])

    class Reader(CalibrationDataReader):
        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(batches, None)

    quantize_static(str(float_path), str(int8_path), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    return int8_path


def session(path: Path, names: Sequence[str]) -> Any:
    """A CPU session over all cores, called like a model: ``run(*arrays) -> first output``."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = os.cpu_count() or 1
    sess = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return lambda *xs: sess.run(None, dict(zip(names, xs)))[0]
