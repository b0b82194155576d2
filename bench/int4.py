"""4-bit weights: weight bytes and accuracy of qcompiler's int4 builds against its int8 build and
ONNX Runtime (static int8 QDQ; int4 weight-only MatMulNBits, block 32, symmetric), in one run, on
the same calibration data.

    .venv/bin/python bench/int4.py [--skip-minilm]

- digits CNN: top-1 on the 360 held-out digits; qcompiler int4 at groups of 32 and 16, with
  GPTQ, and after two epochs of quantization-aware training (``qcompiler.qat``).
- all-MiniLM-L6-v2: mean cosine of the sentence embeddings to float on zoo.SENTENCES; qcompiler
  int4 with the default sensitivity floor and with an output target (int4 layers that miss it
  take int8 weights first), with GPTQ, and with the weight-only fallback (layers whose
  activations int8 cannot carry keep 4-bit or int8 weights with float activations). ONNX
  Runtime's MatMulNBits quantizes every MatMul's weights and keeps all activations float.

Bytes are what each ships: qcompiler's ``size_bytes.compiled`` (4-bit weights packed with their
group multipliers, int8 elsewhere, int32 biases, scales, and what stays float), ONNX Runtime's
the initializers of its model file. MiniLM's word embeddings (47 MB float) stay float in every
column. Not part of ``make test``."""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import qcompiler  # noqa: E402
from qcompiler.compiled import model_size_bytes  # noqa: E402
from qcompiler.examples import peers, zoo  # noqa: E402

BATCH = 40


def _onnx_weight_bytes(path: Path) -> int:
    import onnx

    return sum(onnx.numpy_helper.to_array(t).nbytes for t in onnx.load(str(path)).graph.initializer)


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean(np.sum(a * b, 1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))))


def _onnxruntime_int4(float_path: Path, out: Path) -> Path:
    from onnxruntime.quantization import matmul_nbits_quantizer as nbits
    import onnx

    quantizer = nbits.MatMulNBitsQuantizer(onnx.load(str(float_path)), bits=4, block_size=32, is_symmetric=True)
    quantizer.process()
    quantizer.model.save_model_to_file(str(out))
    return out


def _row(table: Table, model: str, build: str, size: int, base: int, metric: float, note: str = "") -> None:
    table.add_row(model, build, f"{size:,}", f"{size / base:.2f}", f"{metric:.4f}", note)


def digits(table: Table, folder: Path) -> None:
    model, (x_train, y_train, x_test, y_test) = zoo.train_digits_cnn()
    calibration = [x_train[i:i + BATCH] for i in range(0, 8 * BATCH, BATCH)]
    tests = [x_test[i:i + BATCH] for i in range(0, 360, BATCH)]
    example = (torch.from_numpy(tests[0]),)

    def accuracy(run) -> float:
        return zoo.accuracy(np.concatenate([run(b) for b in tests]), y_test[:360])

    name = "digits CNN (top-1)"
    float_bytes = sum(p.numel() * 4 for p in model.parameters())
    with torch.no_grad():
        _row(table, name, "float", float_bytes, float_bytes, accuracy(lambda b: model(torch.from_numpy(b)).numpy()))
    for label, config in (("qcompiler int8", qcompiler.QuantConfig()),
                          ("qcompiler int4 g32", qcompiler.QuantConfig(weight_dtype="i4")),
                          ("qcompiler int4 g32 + GPTQ", qcompiler.QuantConfig(weight_dtype="i4", gptq=True)),
                          ("qcompiler int4 g16", qcompiler.QuantConfig(weight_dtype="i4", weight_group_size=16))):
        built = qcompiler.compile(model, example, calibration=calibration, config=config)
        kept = len(built.report().get("int8_weights", []))
        _row(table, name, label, built.report()["size_bytes"]["compiled"], float_bytes, accuracy(built),
             f"{kept} layers int8 weights" if kept else "")
    prepared = qcompiler.qat.prepare(model, example, calibration, qcompiler.QuantConfig(weight_dtype="i4"))
    zoo.fine_tune(prepared, x_train, y_train, epochs=2, batch=BATCH)
    built = qcompiler.compile(prepared, example)
    _row(table, name, "qcompiler int4 g32 + QAT (2 epochs)", built.report()["size_bytes"]["compiled"], float_bytes,
         accuracy(built))
    float_path = peers.export_onnx(model, example, ["x"], folder / "digits.onnx")
    ort_path = peers.onnxruntime_int8(float_path, ["x"], [[b] for b in calibration], folder / "digits_int8.onnx")
    _row(table, name, "ONNX Runtime int8", _onnx_weight_bytes(ort_path), float_bytes,
         accuracy(peers.session(ort_path, ["x"], simulated=True)))


def minilm(table: Table, folder: Path) -> None:
    encoder, tokenizer = zoo.load_minilm()
    ids, mask = zoo.tokenize(tokenizer, zoo.SENTENCES, 128)
    cal_ids, cal_mask = zoo.tokenize(tokenizer, zoo.CALIBRATION_SENTENCES, 128)
    calibration = [(cal_ids.numpy(), cal_mask.numpy())]
    inputs = (ids.numpy(), mask.numpy())
    with torch.no_grad():
        reference = encoder(ids, mask).numpy()
    name = "all-MiniLM-L6-v2 (cosine)"
    float_bytes = sum(p.numel() * 4 for p in encoder.parameters())
    _row(table, name, "float", float_bytes, float_bytes, 1.0)
    graph = qcompiler.from_torch(encoder, (ids, mask))
    int4 = {"weight_dtype": "i4", "gptq": True}
    for label, config in (("qcompiler int8", qcompiler.QuantConfig()),
                          ("qcompiler int4 g32", qcompiler.QuantConfig(weight_dtype="i4")),
                          ("qcompiler int4 g32 + GPTQ", qcompiler.QuantConfig(**int4)),
                          ("qcompiler int4 g32 + GPTQ, target 17 dB",
                           qcompiler.QuantConfig(**int4, target_output_sqnr_db=17.0)),
                          ("qcompiler int4 g32 + GPTQ, weight-only fallback",
                           qcompiler.QuantConfig(**int4, weight_only_fallback=True)),
                          ("qcompiler int4 g32 + GPTQ, weight-only fallback, target 17 dB",
                           qcompiler.QuantConfig(**int4, weight_only_fallback=True, target_output_sqnr_db=17.0))):
        result = qcompiler.quantize(graph, calibration, config)
        report = result.report
        kept = report.get("kept_float", [])
        weight_only = sum("weight-only" in e["reason"] for e in kept)
        note = (f"{len(report.get('int8_weights', []))} layers int8 weights, {weight_only} weight-only, "
                f"{len(kept) - weight_only} float ops")
        _row(table, name, label, model_size_bytes(result.graph), float_bytes,
             _cosine(reference, result.graph(*inputs)[0]), note)
    float_path = peers.export_onnx(encoder, (ids, mask), ["input_ids", "attention_mask"], folder / "minilm.onnx")
    int4_path = _onnxruntime_int4(float_path, folder / "minilm_int4.onnx")
    run = peers.session(int4_path, ["input_ids", "attention_mask"])
    _row(table, name, "ONNX Runtime int4 weight-only (MatMulNBits)", _onnx_weight_bytes(int4_path), float_bytes,
         _cosine(reference, run(*inputs)), "float activations")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-minilm", action="store_true")
    args = parser.parse_args()
    table = Table(title="4-bit weights: bytes shipped and accuracy (same calibration data)")
    for column in ("model", "build", "weight bytes", "vs float", "accuracy", "note"):
        table.add_column(column)
    with tempfile.TemporaryDirectory() as folder:
        digits(table, Path(folder))
        if not args.skip_minilm:
            minilm(table, Path(folder))
    Console(width=220).print(table)


if __name__ == "__main__":
    main()
