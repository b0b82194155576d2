"""all-MiniLM-L6-v2 in the forms its ONNX files are published in, each run by the runtimes that
read it, in fresh processes, interleaved: the plain export (opset 17), ONNX Runtime's
``quantize_dynamic`` of it (DynamicQuantizeLinear + MatMulInteger: what "model_quantized.onnx"
usually is), and ONNX Runtime's transformer-optimizer output (com.microsoft Attention,
EmbedLayerNormalization, SkipLayerNormalization, BiasGelu). qcompiler compiles each file as
given (the dynamic one without calibration: its integer products are the model's), and the
optimized one also quantized with calibration sentences. Latency: medians over ``--rounds``
processes (each the median of its own runs); fidelity: the sentence embedding's cosine to
PyTorch fp32 (worst of the 8 sentences) and its SQNR.

    .venv/bin/python bench/published_forms.py [--rounds 3] [--seconds 3]

Run with nothing else busy on the cores. Not part of `make test`."""
from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from compare_peers import first_output, measure, sqnr_db  # noqa: E402

import qcompiler  # noqa: E402
from qcompiler.examples import peers, zoo  # noqa: E402

NAMES = ["input_ids", "attention_mask"]
SEQ = 128
# label -> (runtime, model file); qcompiler's builds are made once beforehand
RUNS = {
    "ONNX Runtime fp32 (plain export)": ("ort", "plain.onnx"),
    "OpenVINO default (plain export)": ("ov", "plain.onnx"),
    "ONNX Runtime, its quantize_dynamic model": ("ort", "dynamic.onnx"),
    "OpenVINO, the quantize_dynamic model": ("ov", "dynamic.onnx"),
    "qcompiler, the quantize_dynamic model as given": ("qc", "qc-dynamic"),
    "ONNX Runtime, its transformer-optimized model": ("ort", "optimized.onnx"),
    "qcompiler fp32, the optimized model": ("qc", "qc-optimized-fp32"),
    "qcompiler int8 (calibrated), the optimized model": ("qc", "qc-optimized-int8"),
}


def prepare(directory: Path, console: Console) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.transformers import optimizer

    encoder, tokenizer = zoo.load_minilm()
    config = encoder.bert.config
    if hasattr(encoder.bert, "set_attn_implementation"):  # the attention pattern ONNX Runtime's optimizer fuses
        encoder.bert.set_attn_implementation("eager")
    ids, mask = zoo.tokenize(tokenizer, zoo.SENTENCES[:8], SEQ)
    with torch.no_grad():
        reference = encoder(ids, mask).numpy()
    np.savez(directory / "inputs.npz", ids.numpy(), mask.numpy())
    np.save(directory / "reference.npy", reference)
    plain = peers.export_onnx(encoder, (ids[:1], mask[:1]), NAMES, directory / "plain.onnx",
                              dynamic_axes={n: {0: "batch"} for n in NAMES})
    quantize_dynamic(str(plain), str(directory / "dynamic.onnx"), weight_type=QuantType.QInt8)
    optimized = optimizer.optimize_model(str(plain), model_type="bert", num_heads=config.num_attention_heads,
                                         hidden_size=config.hidden_size, opt_level=1)
    optimized.save_model_to_file(str(directory / "optimized.onnx"))
    fused = sorted({n.op_type for n in optimized.model.graph.node if n.domain == "com.microsoft"})
    console.print(f"ONNX Runtime's optimizer fused: {', '.join(fused)}")
    shapes = {n: [8, SEQ] for n in NAMES}
    cal_ids, cal_mask = zoo.tokenize(tokenizer, zoo.CALIBRATION_SENTENCES, SEQ)  # 8 sentences: one batch
    calibration = [(cal_ids.numpy(), cal_mask.numpy())]
    for name, path, data in (("qc-dynamic", "dynamic.onnx", None), ("qc-optimized-fp32", "optimized.onnx", None),
                             ("qc-optimized-int8", "optimized.onnx", calibration)):
        console.print(f"compiling {name} ...")
        compiled = qcompiler.compile(str(directory / path), calibration=data, input_shapes=shapes)
        compiled.save(directory / name)
        report = compiled.report()
        (directory / f"{name}.json").write_text(json.dumps({"ops": report["ops"]["integer"],
                                                            "total": report["ops"]["total"]}))


def runner(runtime: str, path: Path):
    if runtime == "ort":
        return peers.session(path, NAMES)
    if runtime == "ov":
        return peers.openvino_session(path, NAMES)
    return qcompiler.load(path)


def worker(label: str, directory: Path, seconds: float) -> None:
    warnings.filterwarnings("ignore")
    logging.getLogger().setLevel(logging.ERROR)
    runtime, file = RUNS[label]
    with np.load(directory / "inputs.npz") as data:
        inputs = [data["arr_0"], data["arr_1"]]
    fn = runner(runtime, directory / file)
    np.save(directory / f"out-{file}-{runtime}.npy", first_output(fn(*inputs)).astype(np.float32))
    median, _ = measure(fn, inputs, seconds)
    print(json.dumps({"median": median}))


def in_fresh_process(label: str, directory: Path, seconds: float) -> float | None:
    done = subprocess.run([sys.executable, __file__, "--worker", label, str(directory), "--seconds", str(seconds)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        print(f"{label}: failed: {(done.stderr.strip().splitlines() or ['?'])[-1][:120]}")
        return None
    return json.loads(done.stdout.strip().splitlines()[-1])["median"]


def fidelity(reference: np.ndarray, got: np.ndarray, mask: np.ndarray) -> tuple[float, float]:
    """(worst sentence's cosine of the embedding, its SQNR; token states are mean-pooled first)."""
    if got.shape != reference.shape:
        return float("nan"), float("nan")
    if reference.ndim == 2:  # already pooled sentence vectors
        a, b = reference, got
    else:
        weights = mask[..., None].astype(np.float64)
        a, b = (reference * weights).sum(1) / weights.sum(1), (got * weights).sum(1) / weights.sum(1)
    cosine = (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)
    real = mask.astype(bool) if reference.ndim == 3 else slice(None)
    return float(cosine.min()), sqnr_db(reference[real], got[real])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--worker", nargs=2, metavar=("LABEL", "DIR"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker[0], Path(args.worker[1]), args.seconds)
        return
    console = Console()
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        prepare(directory, console)
        times: dict[str, list[float]] = {label: [] for label in RUNS}
        for round_ in range(args.rounds):
            for label in RUNS:
                ms = in_fresh_process(label, directory, args.seconds)
                if ms is not None:
                    times[label].append(ms)
            console.print(f"round {round_ + 1} of {args.rounds} done")
        reference = np.load(directory / "reference.npy")
        mask = np.load(directory / "inputs.npz")["arr_1"]
        medians = {label: statistics.median(t) for label, t in times.items() if t}
        best = min(medians.values())
        table = Table(title=f"all-MiniLM-L6-v2, batch 8 x {SEQ} tokens, {os.cpu_count()} threads: ms (median of "
                            f"{args.rounds} processes)")
        for column in ("runtime and model file", "ms", "x fastest", "worst sentence cosine", "SQNR", "note"):
            table.add_column(column)
        for label, (runtime, file) in RUNS.items():
            if label not in medians:
                table.add_row(label, "failed", "", "", "", "")
                continue
            cosine, sqnr = fidelity(reference, np.load(directory / f"out-{file}-{runtime}.npy"), mask)
            note = ""
            if runtime == "qc":
                ops = json.loads((directory / f"{file}.json").read_text())
                note = f"{ops['ops']} integer ops of {ops['total']}"
            table.add_row(label, f"{medians[label]:.2f}", f"{medians[label] / best:.2f}", f"{cosine:.4f}",
                          f"{sqnr:.1f} dB", note)
        console.print(table)


if __name__ == "__main__":
    main()
