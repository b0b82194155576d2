"""The peers the demo and benchmarks measure against, calibrated on the same batches qcompiler
sees: ONNX Runtime's static int8 quantization (QDQ, per-channel QInt8 weights, QUInt8
activations: its fastest form on x86) and, where ``openvino`` and ``nncf`` are installed
(``pip install qcompiler[openvino]``), OpenVINO with NNCF's post-training int8 (default preset)."""
from __future__ import annotations

import contextlib
import io
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch


def export_onnx(model: torch.nn.Module, example: tuple, names: Sequence[str], path: Path,
                dynamic_axes: dict[str, dict[int, str]] | None = None) -> Path:
    with contextlib.redirect_stdout(io.StringIO()):  # the exporter narrates its steps
        torch.onnx.export(model, example, str(path), input_names=list(names), verbose=False,
                          **({"dynamic_axes": dynamic_axes, "dynamo": False} if dynamic_axes else {}))
    return path


def onnxruntime_int8(float_path: Path, names: Sequence[str], calibration: Sequence[Sequence[np.ndarray]],
                     int8_path: Path, activation_type: Any = None) -> Path:
    """ONNX Runtime's static QDQ quantization, per-channel int8 weights; activations u8 unless
    ``activation_type`` (a ``QuantType``) says otherwise."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    batches = iter([dict(zip(names, batch)) for batch in calibration])

    class Reader(CalibrationDataReader):
        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(batches, None)

    quantize_static(str(float_path), str(int8_path), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=activation_type or QuantType.QUInt8, weight_type=QuantType.QInt8)
    return int8_path


def session(path: Path, names: Sequence[str], simulated: bool = False) -> Any:
    """A CPU session over all cores, called like a model: ``run(*arrays) -> first output``.
    ``simulated``: basic graph optimizations only, so a QDQ model runs as dequantize -> float op
    -> quantize (what its quantization algorithm decided, without int8 kernels that saturate
    u8 x s8 pairs on CPUs without VNNI)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = os.cpu_count() or 1
    if simulated:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    sess = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return lambda *xs: sess.run(None, dict(zip(names, xs)))[0]


def _nncf_quantize(model: Any, names: Sequence[str], calibration: Sequence[Sequence[np.ndarray]],
                   transformer: bool) -> Any:
    """NNCF's ``quantize`` with its default preset on every calibration batch (``transformer``:
    its transformer model type), for an OpenVINO or ONNX model."""
    import nncf

    dataset = nncf.Dataset([dict(zip(names, batch)) for batch in calibration])
    kind = {"model_type": nncf.ModelType.TRANSFORMER} if transformer else {}
    with contextlib.redirect_stdout(io.StringIO()):  # NNCF prints progress bars
        return nncf.quantize(model, dataset, subset_size=len(calibration), **kind)


def openvino_nncf_int8(float_path: Path, names: Sequence[str], calibration: Sequence[Sequence[np.ndarray]],
                       transformer: bool = False) -> Any:
    """NNCF's int8 of the ONNX model compiled by OpenVINO for this CPU, called like a model:
    ``run(*arrays) -> first output``. Raises ImportError where openvino or nncf is missing."""
    import openvino as ov

    return openvino_session(_nncf_quantize(ov.Core().read_model(str(float_path)), names, calibration, transformer),
                            names)


def save_openvino_nncf_int8(float_path: Path, names: Sequence[str], calibration: Sequence[Sequence[np.ndarray]],
                            xml_path: Path, transformer: bool = False) -> Path:
    """NNCF's int8 of the ONNX model saved as OpenVINO IR (``.xml`` + ``.bin``), for a fresh
    process to compile (:func:`openvino_session`)."""
    import openvino as ov

    ov.save_model(_nncf_quantize(ov.Core().read_model(str(float_path)), names, calibration, transformer),
                  str(xml_path))
    return xml_path


def openvino_session(model: Any, names: Sequence[str]) -> Any:
    """``model`` (an OpenVINO model, or the path of an ONNX or IR file) compiled by OpenVINO for
    this CPU with its default precision (bf16 where AMX has it, int8 where the model is
    quantized) on all cores, called like a model: ``run(*arrays) -> first output``."""
    import openvino as ov

    core = ov.Core()
    compiled = core.compile_model(model if not isinstance(model, Path) else str(model), "CPU",
                                  {"INFERENCE_NUM_THREADS": os.cpu_count() or 1})
    return lambda *xs: next(iter(compiled(dict(zip(names, xs))).values()))


def nncf_onnx_int8(float_path: Path, names: Sequence[str], calibration: Sequence[Sequence[np.ndarray]],
                   int8_path: Path, transformer: bool = False) -> Path:
    """NNCF's int8 decisions written as a QDQ ONNX model (its ONNX backend), to run simulated
    (``session(..., simulated=True)``): the algorithm's fidelity on any CPU."""
    import onnx

    onnx.save(_nncf_quantize(onnx.load(str(float_path)), names, calibration, transformer), str(int8_path))
    return int8_path
