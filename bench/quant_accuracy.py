"""Quantization fidelity, qcompiler vs ONNX Runtime's quantize_static (QDQ, per-channel int8
weights, uint8 activations, MinMax calibration) on the same calibration data, in one run.

    .venv/bin/python bench/quant_accuracy.py [--skip-fashion]

Prints, per model: the float metric, qcompiler int8, ONNX Runtime int8 (accuracy for the
classifiers, mean cosine to the float embeddings for MiniLM, output SQNR for the random-weight
CNNs on real photos). Not part of `make test`."""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import qcompiler  # noqa: E402
from qcompiler import from_torch  # noqa: E402
from qcompiler.examples import peers, zoo  # noqa: E402
from qcompiler.compare import sqnr_db  # noqa: E402


def ort_int8(model: torch.nn.Module, example: tuple, names: list[str], calibration: list[tuple], tmp: Path):
    float_path = peers.export_onnx(model, example, names, tmp / "float.onnx")
    return peers.session(peers.onnxruntime_int8(float_path, names, calibration, tmp / "int8.onnx"), names)


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(((a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)).mean())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--skip-fashion", action="store_true")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(2)
    rows = []
    console = Console()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)

        def classifier(name, model, data, batch):
            x_train, _, x_test, y_test = data
            example = (torch.from_numpy(x_test[:batch]),)
            cal = [(x_train[i:i + batch],) for i in range(0, 8 * batch, batch)]
            graph = from_torch(model, example)
            result = qcompiler.quantize(graph, cal)
            peer = ort_int8(model, example, ["x"], cal, tmp)
            chunks = range(0, len(x_test) - batch + 1, batch)
            with torch.no_grad():
                f = np.concatenate([model(torch.from_numpy(x_test[i:i + batch])).numpy() for i in chunks])
            q = np.concatenate([result.graph(x_test[i:i + batch])[0] for i in chunks])
            o = np.concatenate([peer(x_test[i:i + batch]) for i in chunks])
            labels = y_test[:len(f)]
            rows.append((name, "top-1 accuracy", f"{zoo.accuracy(f, labels):.4f}", f"{zoo.accuracy(q, labels):.4f}",
                         f"{zoo.accuracy(o, labels):.4f}"))
            agree = f.argmax(-1)  # fidelity: how often int8 predicts what the float model predicts
            rows.append((name, "top-1 agreement with float", "1.0000", f"{zoo.accuracy(q, agree):.4f}",
                         f"{zoo.accuracy(o, agree):.4f}"))

        with console.status("digits CNN..."):
            model, data = zoo.train_digits_cnn()
            classifier("digits CNN (sklearn, 360 test)", model, data, 40)
        if not args.skip_fashion:
            with console.status("Fashion-MNIST CNN (training 2 epochs)..."):
                model, data = zoo.train_fashion_cnn()
                classifier("Fashion-MNIST CNN (10k test)", model, data, 100)

        with console.status("MiniLM..."):
            encoder, tokenizer = zoo.load_minilm()
            ids, mask = zoo.tokenize(tokenizer, zoo.SENTENCES, 128)
            cal_ids, cal_mask = zoo.tokenize(tokenizer, zoo.CALIBRATION_SENTENCES, 128)
            cal = [(cal_ids.numpy(), cal_mask.numpy())]
            graph = from_torch(encoder, (ids, mask))
            result = qcompiler.quantize(graph, cal)
            peer = ort_int8(encoder, (ids, mask), ["input_ids", "attention_mask"], cal, tmp)
            with torch.no_grad():
                f = encoder(ids, mask).numpy()
            rows.append(("all-MiniLM-L6-v2 (8 sentences)", "mean cosine to float", "1.0000",
                         f"{cosine(f, result.graph(ids.numpy(), mask.numpy())[0]):.4f}",
                         f"{cosine(f, peer(ids.numpy(), mask.numpy())):.4f}"))

        for name in ("resnet18", "mobilenet_v2"):
            with console.status(f"{name}..."):
                model = getattr(zoo, name)()
                cal = [(x,) for x in zoo.photo_crops(8, seed=0)]
                evaluation = zoo.photo_crops(4, seed=1)
                graph = from_torch(model, (torch.from_numpy(evaluation[0]),))
                result = qcompiler.quantize(graph, cal)
                peer = ort_int8(model, (torch.from_numpy(evaluation[0]),), ["x"], cal, tmp)
                ours = np.median([sqnr_db(graph(x)[0], result.graph(x)[0]) for x in evaluation])
                theirs = np.median([sqnr_db(graph(x)[0], peer(x)) for x in evaluation])
                rows.append((f"{name} (random weights, real photos)", "output SQNR dB (median)", "inf",
                             f"{ours:.1f}", f"{theirs:.1f}"))

    table = Table(title="int8 fidelity: qcompiler vs ONNX Runtime quantize_static (same calibration data)")
    for col in ("model", "metric", "float", "qcompiler int8", "ONNX Runtime int8"):
        table.add_column(col)
    for row in rows:
        table.add_row(*row)
    console.print(table)


if __name__ == "__main__":
    start = time.time()
    main()
    print(f"({time.time() - start:.0f} s)")
